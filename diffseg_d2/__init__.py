"""diffseg_d2: text-to-image diffusion models as open-vocabulary segmenters, for Detectron2.

``import diffseg_d2`` registers every meta-architecture and dataset of the
package. It loads no weights and imports none of diffusers, transformers or
open_clip: those are imported when a model is built.
"""
import warnings

# fvcore (a detectron2 dependency) compiles a loss with torch.jit.script when it is imported, which
# recent torch reports as deprecated on every run; nothing a user of this package can act on.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "diffseg_d2 needs detectron2, which is not on the package registry. Install it with "
        "`python tools/install_detectron2.py` from a diffseg_d2 checkout (it keeps a detectron2 that is "
        "already installed), or `make test`."
    ) from e

from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers meta-architectures)
from .config import add_diffseg_config, get_diffseg_cfg, merge_config_file

__version__ = "0.1.0"
__all__ = ["add_diffseg_config", "get_diffseg_cfg", "merge_config_file", "__version__"]
