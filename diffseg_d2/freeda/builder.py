"""Building a FreeDA prototype bank from captions (the offline stage).

For caption ``i`` (seed ``SEED + i``): generate an image with Stable Diffusion
while recording the cross-attention of every noun of the caption over all
denoising steps (DAAM: summed over steps and layers, averaged over heads,
upsampled to the latent grid, min-max normalised); binarise each noun map at
``MASK_THRESHOLD``; average-pool dense DINOv2 features inside the mask into an
L2-normalised prototype; its key is the CLIP embedding of the noun in its
caption. Captions are processed in fixed shards; each shard is written
atomically, so a build can be killed at any point and resumed, and several
processes can split the shards (``build_bank(rank, world_size)``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import (
    AttentionStore,
    FrozenDiffusionTransformer,
    JointAttentionStore,
    attention_blocks,
    available_factors,
    minmax_per_map,
    record_attention,
    record_joint_attention,
    summed_cross_maps,
)
from ..diffusion.joint_attention import checked_blocks
from ..diffusion.prompts import token_mean_table
from ..diffusion.substrate import FrozenDiffusion
from .bank import (
    MANIFEST_FILE,
    SHARD_DIR,
    SPEC_FILE,
    BankError,
    BankPathError,
    Shard,
    bank_path,
    check_file,
    check_fingerprint,
    finalize_bank,
    manifest_file,
    read_json,
    read_shard,
    shard_name,
    verify_bank_files,
    write_json,
    write_shard,
)

logger = logging.getLogger(__name__)


@dataclass
class CaptionPrototypes:
    """What one caption gives: K nouns with their keys (K, Dk), prototypes (K, Dp) and mask areas (K,).

    ``image`` (3, S, S) and the nouns' ``masks`` (K, h, w) are kept for inspection; ``skipped``
    counts the caption's nouns that got no row.
    """

    nouns: List[str]
    keys: torch.Tensor
    prototypes: torch.Tensor
    areas: torch.Tensor
    skipped: int
    image: torch.Tensor
    masks: torch.Tensor


class PrototypeBankBuilder(nn.Module):
    """Turns captions into bank rows with frozen SD, CLIP and DINOv2.

    Args:
        diffusion: the frozen SD substrate (generation and attention).
        clip: ``OpenCLIP`` (keys: nouns in their caption's context).
        dino: ``DenseDINO`` (prototypes).
        nouns: callable ``caption -> list of nouns`` with a ``fingerprint()``.
        models: the weights strings of the three models, recorded in the bank.
        image_size: side of the generated images.
        steps: DDIM steps.
        guidance_scale: classifier-free guidance weight.
        seed: caption ``i`` is generated with seed ``seed + i``.
        cross_attn_factors: latent factors whose cross-attention is summed (empty = all); UNets.
        transformer_blocks: on a diffusion transformer, the blocks whose image-to-text attention is
            averaged (empty = all; ``MODEL.DIFFSEG.TRANSFORMER.BLOCKS``): the joint-attention blocks of SD3 /
            FLUX, the cross-attention blocks of PixArt-Σ (summed as a UNet's layers are).
        mask_threshold: binarisation threshold of the normalised noun maps.
        shard_size: captions per shard.
        keep_images: also save images and masks under ``<bank>/inspect/``.
    """

    def __init__(self, *, diffusion: FrozenDiffusion, clip: nn.Module, dino: nn.Module, nouns, models: dict,
                 image_size: int = 512, steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                 cross_attn_factors: Sequence[int] = (), transformer_blocks: Sequence[str] = (),
                 mask_threshold: float = 0.4, shard_size: int = 64, keep_images: bool = False):
        super().__init__()
        self.is_transformer = isinstance(diffusion, FrozenDiffusionTransformer)
        factors, blocks = [], []
        if self.is_transformer:
            blocks = checked_blocks(diffusion.transformer, transformer_blocks, "MODEL.DIFFSEG.TRANSFORMER.BLOCKS",
                                    diffusion.family.title)
            multiple = diffusion.latent_factor * diffusion.patch
        elif getattr(diffusion, "layers_by_block", False):  # a cross-attention transformer: one token grid
            model = diffusion.denoiser
            blocks = checked_blocks(model, transformer_blocks, "MODEL.DIFFSEG.TRANSFORMER.BLOCKS", diffusion.family.title,
                                    attention_blocks(model, "cross"), "cross-attention")
            factors = [diffusion.patch]
            multiple = diffusion.latent_factor * diffusion.patch
        else:
            have = available_factors(diffusion.unet, "cross")
            factors = [int(f) for f in cross_attn_factors] or have
            if any(f not in have for f in factors):
                raise ValueError(f"MODEL.DIFFSEG.FREEDA.BUILD.CROSS_ATTN_FACTORS = {list(cross_attn_factors)}, but "
                                 f"this UNet has cross-attention only at latent factors {have}.")
            multiple = diffusion.latent_factor * max(have)
        if image_size <= 0 or image_size % multiple:
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.BUILD.IMAGE_SIZE = {image_size} must be a positive multiple of "
                             f"{multiple}.")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.BUILD.MASK_THRESHOLD must be in (0, 1), got {mask_threshold}.")
        if shard_size < 1 or steps < 1:
            raise ValueError("MODEL.DIFFSEG.FREEDA.BUILD.SHARD_SIZE and STEPS must be at least 1.")
        self.diffusion = diffusion
        self.clip = clip
        self.dino = dino
        self.nouns = nouns
        self.models = dict(models)
        self.image_size = int(image_size)
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.seed = int(seed)
        self.cross_attn_factors = factors
        self.transformer_blocks = blocks
        self.mask_threshold = float(mask_threshold)
        self.shard_size = int(shard_size)
        self.keep_images = bool(keep_images)
        #: seconds per stage of the last ``caption_prototypes`` call, for benchmarks: "nouns" (finding
        #: them and their tokens), "text encoder" (SD's), "generation" (the DDIM steps with attention
        #: recorded, and the VAE decode), "masks" (noun maps from the recorded attention), "dino"
        #: (DINOv2 features and pooling), "clip keys"; only the stages the caption reached
        self.last_timings: Dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg) -> "PrototypeBankBuilder":
        """Build from ``MODEL.DIFFSEG`` (the noun source is checked before any model loads)."""
        from ..diffusion import load_diffusion
        from ..pretrained.clip import OpenCLIP
        from ..pretrained.dino import DenseDINO
        from ..nouns import build_noun_extractor

        d, b = cfg.MODEL.DIFFSEG, cfg.MODEL.DIFFSEG.FREEDA.BUILD
        nouns = build_noun_extractor(b.NOUNS, b.NOUN_LIST)
        return cls(
            diffusion=load_diffusion(d.SD.WEIGHTS, d.SD.REVISION, dtype=d.SD.DTYPE),
            clip=OpenCLIP.from_weights(d.CLIP.WEIGHTS, d.CLIP.TEMPLATES),
            dino=DenseDINO.from_weights(d.DINO.WEIGHTS),
            nouns=nouns,
            models={"sd": d.SD.WEIGHTS, "sd_revision": d.SD.REVISION, "clip": d.CLIP.WEIGHTS, "dino": d.DINO.WEIGHTS},
            image_size=b.IMAGE_SIZE,
            steps=b.STEPS,
            guidance_scale=b.GUIDANCE_SCALE,
            seed=b.SEED,
            cross_attn_factors=list(b.CROSS_ATTN_FACTORS),
            transformer_blocks=list(d.TRANSFORMER.BLOCKS),
            mask_threshold=b.MASK_THRESHOLD,
            shard_size=b.SHARD_SIZE,
            keep_images=b.KEEP_IMAGES,
        )

    def spec(self, captions: Sequence[str]) -> dict:
        """Everything that determines the bank's rows; two builds with equal specs give equal banks."""
        nouns = self.nouns.fingerprint()
        digest = hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()
        return {
            "models": self.models,
            "build": {
                "image_size": self.image_size, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "seed": self.seed, "cross_attn_factors": self.cross_attn_factors,
                **({"transformer_blocks": self.transformer_blocks} if self.transformer_blocks else {}),
                "mask_threshold": self.mask_threshold, "shard_size": self.shard_size,
            },
            "nouns": {"source": nouns.pop("source"),
                      "sha256": hashlib.sha256(str(sorted(nouns.items())).encode("utf-8")).hexdigest()},
            "captions": {"count": len(captions), "sha256": digest},
        }

    # ------------------------------------------------------------------ one caption
    def _noun_tokens(self, caption: str, nouns: Sequence[str]):
        """The caption's token ids (of the diffusion model's text encoders) and, per usable noun, its
        positions in the text the denoiser reads (a transformer's T5 tokens)."""
        d = self.diffusion
        ids = d.tokenize([caption], truncate=True)
        segment = d.text_segments[-1]  # the UNets' one CLIP tokenisation; a transformer's T5 tokens
        kept, positions = [], []
        for noun in nouns:
            found = d.word_positions(ids, 0, noun).get(segment)
            # nouns cut off by either model's context length get no map
            if found is None or self.clip.word_positions(caption, noun) is None:
                continue
            kept.append(noun)
            positions.append(found)
        return ids, kept, positions

    @contextlib.contextmanager
    def _stage(self, name: str):
        """Time the block into ``last_timings[name]`` (s). CUDA work is waited for at both ends, so
        that each stage is charged with its own kernels (two synchronisations per stage)."""
        device = self.diffusion.device
        wait = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        wait()
        start = time.perf_counter()
        yield
        wait()
        self.last_timings[name] = self.last_timings.get(name, 0.0) + time.perf_counter() - start

    @torch.no_grad()
    def caption_prototypes(self, index: int, caption: str) -> Optional[CaptionPrototypes]:
        """Bank rows of caption ``index``; None when it has no noun. Stage times go to ``last_timings``."""
        self.last_timings = {}
        with self._stage("nouns"):
            nouns = self.nouns(caption)
            found = self._noun_tokens(caption, nouns) if nouns else None
        if found is None:
            return None
        ids, kept, positions = found
        skipped = len(nouns) - len(kept)
        d = self.diffusion
        side = self.image_size // d.latent_factor
        if not kept:
            empty = torch.zeros(0)
            return CaptionPrototypes([], empty, empty, empty, skipped, torch.zeros(3, 0, 0), torch.zeros(0, side, side))
        k = len(kept)
        token_index, token_weight = token_mean_table(positions)
        with self._stage("text encoder"):
            context = d.encode_text(ids)
        # A CPU generator: the same caption gets the same image on any device.
        generator = torch.Generator().manual_seed(self.seed + index)
        if self.is_transformer:
            # Element 0 of each call: the prompted half of a guided batch.
            store = JointAttentionStore(token_index, token_weight)
            recording = record_joint_attention(d.transformer, store, self.transformer_blocks, d.text_layout.length)
        else:
            store = AttentionStore((side, side), token_index, token_weight, readout_context=d.cross_attention_states(context))
            layers = (dict(cross_blocks=self.transformer_blocks) if self.transformer_blocks else
                      dict(cross_factors=self.cross_attn_factors))
            recording = record_attention(d.denoiser, store, **layers)
        with self._stage("generation"), recording:
            image = d.generate(context, image_size=self.image_size, steps=self.steps,
                               guidance_scale=self.guidance_scale, generator=generator)
        with self._stage("masks"):
            if self.is_transformer:
                # The mean over blocks and steps on the token grid, to the latent grid as the UNet's factors are.
                grid = store.maps().view(k, side // d.patch, side // d.patch)
                heat = F.interpolate(grid[None], size=(side, side), mode="bicubic", align_corners=False)[0].clamp_(min=0)
            else:
                heat = summed_cross_maps(store, self.cross_attn_factors, (side, side))
            masks = minmax_per_map(heat) >= self.mask_threshold  # (K, side, side)

        with self._stage("dino"):
            feats = self.dino(image)[0]  # (D, g, g)
            grid = feats.shape[-2:]
            weights = F.interpolate(masks.float()[None], size=grid, mode="area")[0].flatten(1).to(feats.device)
            mass = weights.sum(1)
            has_mask = mass > 0
            pooled = (weights @ feats.flatten(1).T) / mass.clamp(min=1e-12)[:, None]
        with self._stage("clip keys"):
            keys = self.clip.encode_words_in_context([caption] * k, kept)
        sel = has_mask.nonzero().flatten().cpu()
        return CaptionPrototypes(
            nouns=[kept[i] for i in sel.tolist()],
            keys=keys.cpu()[sel],
            prototypes=F.normalize(pooled, dim=-1).cpu()[sel],
            areas=masks.float().mean((1, 2)).cpu()[sel],
            skipped=skipped + int(k - len(sel)),
            image=image[0].cpu(),
            masks=masks.cpu()[sel],
        )

    def build_shard(self, shard_index: int, captions: Sequence[str], inspect_dir: Optional[Path] = None,
                    progress=None) -> Shard:
        """Rows of captions ``[shard_index * shard_size, ...)``; ``progress`` (tqdm) is advanced per caption."""
        start = shard_index * self.shard_size
        stop = min(len(captions), start + self.shard_size)
        keys, protos, cap_idx, seeds, areas, nouns, no_nouns, skipped = [], [], [], [], [], [], [], 0
        for i in range(start, stop):
            result = self.caption_prototypes(i, captions[i])
            if result is None:
                no_nouns.append(i)
            else:
                skipped += result.skipped
                n = len(result.nouns)
                if n:
                    keys.append(result.keys)
                    protos.append(result.prototypes)
                    areas.append(result.areas)
                    nouns.extend(result.nouns)
                    cap_idx.append(torch.full((n,), i, dtype=torch.long))
                    seeds.append(torch.full((n,), self.seed + i, dtype=torch.long))
                if inspect_dir is not None:
                    save_inspection(inspect_dir, i, result)
            if progress is not None:
                progress.update(1)
        return Shard(
            keys=torch.cat(keys) if keys else torch.zeros(0, self.clip.embed_dim),
            prototypes=torch.cat(protos) if protos else torch.zeros(0, self.dino.embed_dim),
            caption_index=torch.cat(cap_idx) if cap_idx else torch.zeros(0, dtype=torch.long),
            seed=torch.cat(seeds) if seeds else torch.zeros(0, dtype=torch.long),
            area=torch.cat(areas) if areas else torch.zeros(0),
            nouns=nouns,
            captions=(start, stop),
            captions_without_nouns=no_nouns,
            nouns_skipped=skipped,
        )


def save_inspection(folder: Path, index: int, result: CaptionPrototypes) -> None:
    """Write the generated image and each kept noun's mask as PNGs (for looking at a bank)."""
    from PIL import Image

    from ..paths import write_atomically

    folder.mkdir(parents=True, exist_ok=True)

    def save(array, name):
        write_atomically(folder / name, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))

    save(result.image.permute(1, 2, 0).clamp(0, 255).byte().numpy(), f"caption-{index:06d}.png")
    for noun, mask in zip(result.nouns, result.masks):
        safe = "".join(c if c.isalnum() else "_" for c in noun)
        save((mask.numpy() * 255).astype("uint8"), f"caption-{index:06d}-{safe}.png")


# ----------------------------------------------------------------------------- the whole build
# The temporary name a killed ``write_shard`` leaves in the shard folder (``paths.write_atomically``:
# ".<stem>.<pid>.<32 hex digits><suffix>"): the only files a resume deletes there besides damaged shards.
_SHARD_TEMPORARY = re.compile(r"\.shard-[0-9]{5,}\.[0-9]+\.[0-9a-f]{32}\.safetensors")


def _shard_done(folder: Path, index: int, expected: tuple) -> bool:
    path = bank_path(folder, shard_name(index), "bank shard")
    if not path.is_file():
        return False
    try:
        shard = read_shard(path)
    except BankError as e:
        logger.warning("rebuilding shard %d: %s", index, e)
        return False
    if tuple(shard.captions) != tuple(expected):
        logger.warning("rebuilding shard %d: it covers captions %s, expected %s", index, shard.captions, expected)
        return False
    return True


def _drop_damaged_shards(folder: Path) -> None:
    """Before a resume: delete shards that fail the checksums of a (stale) manifest, then the
    manifest itself, and temporary files a killed write left behind. What is deleted is rebuilt.

    Only the bank's shards are deleted: a manifest entry naming anything else (a path outside the
    folder, the manifest, the build record, the index, a folder) raises ``BankPathError`` before
    anything is deleted (``manifest_file``).
    """
    manifest_path = bank_path(folder, MANIFEST_FILE, "bank manifest")
    shard_dir = bank_path(folder, SHARD_DIR, "bank shard folder")
    if manifest_path.is_file():
        try:
            entries = read_json(manifest_path, "bank manifest").get("shards", [])
        except (BankError, AttributeError):
            entries = []
        named = []
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            try:
                named.append((manifest_file(folder, entry, f"shards[{i}]"), entry, f"shards[{i}]"))
            except BankPathError:
                raise
            except BankError as e:  # no file name: nothing to check; the shard's range is checked later
                logger.warning("rebuilding the manifest: %s", e)
        for path, entry, name in named:  # every path is checked before the first is deleted
            try:
                check_file(folder, path, entry, name, "bank shard")
            except BankError as e:
                logger.warning("rebuilding: %s", e)
                path.unlink(missing_ok=True)
        manifest_path.unlink()  # stale: shards are about to change
    for tmp in shard_dir.iterdir() if shard_dir.is_dir() else ():
        if _SHARD_TEMPORARY.fullmatch(tmp.name) and (tmp.is_file() or tmp.is_symlink()):
            tmp.unlink(missing_ok=True)


def check_output_folder(folder: Path) -> None:
    """Refuse an output that is a file, or a non-empty folder that holds no bank (cheap; no models needed)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BankError(f"--output '{folder}' is a file, not a folder.")
    if folder.is_dir() and not (folder / SPEC_FILE).is_file() and any(folder.iterdir()):
        raise BankError(f"'{folder}' is not empty and holds no bank. Choose a new or empty folder for --output.")


def prepare_output(folder: Path, spec: dict, fingerprint: dict, resume: bool) -> Optional[dict]:
    """Check that ``folder`` may receive this bank and record the build spec in it.

    Returns the manifest when the folder already holds this bank, complete and intact.

    Raises:
        BankError: the folder holds another bank or other files, or a partial build of
            this bank while ``resume`` is False.
    """
    check_output_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = bank_path(folder, SPEC_FILE, "bank build record")
    if spec_path.is_file():
        recorded = read_json(spec_path, "bank build record")
        differs = sorted(k for k in set(spec) | set(recorded.get("spec", {}))
                         if spec.get(k) != recorded.get("spec", {}).get(k))
        if differs:
            raise BankError(
                f"'{folder}' already holds a different bank (it differs in: {', '.join(differs)}). "
                "Choose another --output, or delete that folder to rebuild it."
            )
        check_fingerprint(recorded.get("fingerprint", {}), fingerprint, f"the bank being built in '{folder}'")
        manifest = verify_bank_files(folder)
        if manifest is not None:
            return manifest
        if not resume:
            state = "a damaged copy of this bank" if (folder / MANIFEST_FILE).is_file() else \
                "an unfinished build of this bank"
            raise BankError(
                f"'{folder}' holds {state}. Pass --resume to continue or repair it "
                "(intact shards are kept), or choose another --output."
            )
        _drop_damaged_shards(folder)
        return None
    write_json(spec_path, {"spec": spec, "fingerprint": fingerprint})
    return None


def build_bank(builder: PrototypeBankBuilder, captions: Sequence[str], output, *, resume: bool = False,
               index_settings: Optional[dict] = None, show_progress: bool = True) -> Optional[dict]:
    """Build (or resume) the bank of ``captions`` in ``output``; returns the manifest on the main process.

    Under detectron2's ``launch``, every process takes the shards ``i`` with
    ``i % world_size == rank`` and the main process merges them into one index
    and manifest once all are written.
    """
    from detectron2.utils import comm
    from tqdm import tqdm

    from .bank import model_fingerprint

    output = Path(output)
    rank, world = comm.get_rank(), comm.get_world_size()
    spec = builder.spec(captions)
    fingerprint = model_fingerprint(builder.clip, builder.dino)
    done = None
    if rank == 0:
        done = prepare_output(output, spec, fingerprint, resume)
    done = comm.all_gather(done is not None)[0] if world > 1 else done is not None
    if done:
        logger.info("'%s' already holds this bank, complete: nothing to build.", output)
        return read_json(bank_path(output, MANIFEST_FILE, "bank manifest"), "bank manifest") if rank == 0 else None

    num_shards = math.ceil(len(captions) / builder.shard_size)
    ranges = {i: (i * builder.shard_size, min(len(captions), (i + 1) * builder.shard_size)) for i in range(num_shards)}
    mine = [i for i in range(num_shards) if i % world == rank]
    todo = [i for i in mine if not _shard_done(output, i, ranges[i])]
    if len(todo) < len(mine):
        logger.info("process %d: %d of its %d shards are already built", rank, len(mine) - len(todo), len(mine))
    total = sum(ranges[i][1] - ranges[i][0] for i in todo)
    inspect_dir = bank_path(output, "inspect", "inspection folder") if builder.keep_images else None
    with tqdm(total=total, unit="caption", desc=f"bank shards of process {rank}",
              disable=not show_progress or rank != 0) as bar:
        for i in todo:
            shard = builder.build_shard(i, captions, inspect_dir, bar)
            write_shard(bank_path(output, shard_name(i), "bank shard"), shard)
    comm.synchronize()
    if rank != 0:
        return None
    return finalize_bank(output, spec, fingerprint, num_shards, index_settings or {})
