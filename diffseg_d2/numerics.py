"""A clear error, instead of a silent wrong answer, when a model part produces NaN or infinity.

Corrupted weights (a damaged safetensors payload still has a valid header) or an
overflow in half precision make a network output NaN; every later step then turns it
into plausible-looking labels (an argmax over NaN is class 0 or 1 everywhere). The
methods call ``require_finite`` on what each frozen part returns, so the error names
the part and the config key of its weights.
"""
from __future__ import annotations

import torch


class NonFiniteError(FloatingPointError):
    """A model part produced NaN or infinite values.

    Attributes:
        part: what produced them, e.g. "the VAE encoder (MODEL.DIFFSEG.SD.WEIGHTS)".
    """

    def __init__(self, part: str, bad: int, total: int):
        self.part = part
        super().__init__(
            f"{part} produced non-finite values ({bad} of {total} NaN or infinite). Its weights may be "
            "corrupted (download them again and compare checksums), or half precision overflowed "
            "(try MODEL.DIFFSEG.SD.DTYPE float32)."
        )


def require_finite(tensor: torch.Tensor, part: str) -> torch.Tensor:
    """Return ``tensor`` unchanged, or raise ``NonFiniteError`` naming ``part`` if any value is NaN or infinite."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise NonFiniteError(part, int((~finite).sum()), finite.numel())
    return tensor
