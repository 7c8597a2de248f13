"""Stable Diffusion's components, for every UNet family: where they come from and how they are loaded.

A **family** is what a diffusers folder's ``model_index.json`` names (``_class_name``): Stable
Diffusion 1.x and 2.x (``StableDiffusionPipeline``: one CLIP text encoder, its last hidden state)
and SDXL (``StableDiffusionXLPipeline``: two CLIP text encoders whose penultimate hidden states
are concatenated, the second's pooled embedding and the image's size and crop as added
conditions). What differs between them is data, held by one ``UNetFamily`` record each
(``UNET_FAMILIES``); ``diffseg_d2.diffusion.FrozenStableDiffusion`` reads it, the methods never do.

``load_stable_diffusion`` reads the parts from a hub id, a local diffusers folder (safetensors only,
through ``from_pretrained``), a ``tiny`` preset (random weights of a small model of a family, saved
as a diffusers folder by diffusers' own pipeline class and read back by the same code: ``tiny``
(SD 1.x), ``tiny-sd2``, ``tiny-sdxl``), the ``micro`` preset (the micro-world model trained by the
project), or ``random:<architecture>`` (random weights of a real architecture built in memory, for
benchmarks). A folder of another family (SD3, FLUX, an img2img refiner, ...) is an error that names
the families supported.

Random weights segment nothing; their outputs carry no meaning.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..optional_imports import require
from .frozen import RANDOM_SEED, load_pretrained, random_init
from .tokens import write_clip_tokenizer_files
from .weights import TINY, MissingWeightsError, WeightsLocation, random_architecture, resolve_weights

SD_WEIGHTS_KEY = "MODEL.DIFFSEG.SD.WEIGHTS"
TINY_SD_FOLDER = "tiny-stable-diffusion-v1"
# The square side the tiny SD presets work at: their VAE downsamples by 8 to a 16x16 latent.
TINY_SD_IMAGE_SIZE = 128


@dataclass(frozen=True)
class UNetFamily:
    """What one family of UNet text-to-image models is, as data.

    Args:
        name: the family's short name (``sd1``, ``sd2``, ``sdxl``).
        title: how messages name it.
        pipeline: the diffusers pipeline class its folders name in ``model_index.json``.
        text_encoders: the folders of its text encoders, in the order their hidden states are
            concatenated; the first folder's tokenizer is ``tokenizer``, the second's ``tokenizer_2``.
        hidden_layer: which hidden state the UNet reads: -1 the last (``last_hidden_state``, after the
            final norm), -2 the penultimate (before it), as the family's pipeline encodes prompts.
        pooled: the text encoder whose projected end-of-text embedding is an added condition
            (SDXL's ``text_embeds``), or None.
        size_conditioning: whether the UNet takes the image's original size, crop and target size
            (SDXL's ``time_ids``).
        zero_unconditional: the unconditional half of guidance is zeros, not the encoded empty prompt
            (SDXL's ``force_zeros_for_empty_prompt``).
        native_size: the square side the released models were trained at (the configs' IMAGE_SIZE).
    """

    name: str
    title: str
    pipeline: str
    text_encoders: Tuple[str, ...]
    hidden_layer: int
    pooled: Optional[str]
    size_conditioning: bool
    zero_unconditional: bool
    native_size: int

    @property
    def required_files(self) -> Tuple[str, ...]:
        """What a local folder of this family must hold for the loader (weights as safetensors only)."""
        tokenizers = ["tokenizer"] + [f"tokenizer_{i + 1}" for i in range(1, len(self.text_encoders))]
        return (("unet/config.json", "unet/*.safetensors", "vae/config.json", "vae/*.safetensors")
                + tuple(f for t in self.text_encoders for f in (f"{t}/config.json", f"{t}/*.safetensors"))
                + tuple(f"{t}/tokenizer_config.json" for t in tokenizers)
                + ("scheduler/scheduler_config.json",))


UNET_FAMILIES: Dict[str, UNetFamily] = {
    f.name: f for f in (
        UNetFamily("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", ("text_encoder",), -1, None,
                   False, False, 512),
        # SD 2.x's text encoder is OpenCLIP ViT-H in transformers' format, cut to its penultimate layer
        # when converted: its last hidden state is what the pipeline reads.
        UNetFamily("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", ("text_encoder",), -1, None,
                   False, False, 768),
        UNetFamily("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
                   -2, "text_encoder_2", True, True, 1024),
    )
}
# What a local folder of any family must hold before its model_index.json is read.
SD_REQUIRED_FILES = UNET_FAMILIES["sd1"].required_files


class UnsupportedFamilyError(ValueError):
    """A diffusers folder of a model family the package does not run (a ValueError, so that a hub
    loader's OSError handling never turns it into "could not download")."""


def _all_families() -> list:
    """Every family record the package loads: the UNets', the diffusion transformers', PixArt's."""
    # The other families' modules build on this one: imported when asked, not at import time.
    from .diffusion_transformers import TRANSFORMER_FAMILIES
    from .pixart import PIXART_FAMILIES

    return [*UNET_FAMILIES.values(), *TRANSFORMER_FAMILIES.values(), *PIXART_FAMILIES.values()]


def supported_families() -> str:
    """Every supported family with its diffusers pipeline class, for messages."""
    return "; ".join(f"{f.title} ({f.pipeline})" for f in _all_families())


def supported_pipelines() -> frozenset:
    """The diffusers pipeline classes (``model_index.json``'s ``_class_name``) of every supported family."""
    return frozenset(f.pipeline for f in _all_families())


def family_of_folder(model_index: Optional[dict], text_encoder_config: Optional[dict], where: str) -> UNetFamily:
    """The family of a diffusers folder from its ``model_index.json`` (None: an SD 1.x/2.x folder
    without one, as older exports) and its text encoder's config (SD 2.x's OpenCLIP encoder uses
    GELU, SD 1.x's OpenAI CLIP QuickGELU).

    Raises:
        UnsupportedFamilyError: the folder holds another pipeline.
    """
    pipeline = (model_index or {}).get("_class_name", "StableDiffusionPipeline")
    if pipeline == "StableDiffusionXLPipeline":
        return UNET_FAMILIES["sdxl"]
    if pipeline == "StableDiffusionPipeline":
        act = (text_encoder_config or {}).get("hidden_act", "quick_gelu")
        return UNET_FAMILIES["sd2" if act == "gelu" else "sd1"]
    raise UnsupportedFamilyError(
        f"{where} holds a {pipeline}; {SD_WEIGHTS_KEY} must name a model of a supported family: "
        f"{supported_families()}."
    )


@dataclass
class StableDiffusionParts:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    # SDXL's second text encoder (CLIPTextModelWithProjection) and its tokenizer; None for SD 1.x / 2.x.
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: UNetFamily = UNET_FAMILIES["sd1"]


# UNet, VAE and text-encoder sizes of each architecture built here, with its family. "text2" is
# SDXL's second text encoder; "prediction" the scheduler's prediction type (SD 2.1 at 768: v).
_TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 sample_size=TINY_SD_IMAGE_SIZE)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SD_ARCHITECTURES = {
    # 3 UNet levels (latent factors 1, 2, 4) with cross-attention at factors 1, 2 and in the
    # mid block (4); a VAE downsampling by 8; a 2-layer 32-wide CLIP text transformer.
    "tiny": {
        "family": "sd1",
        "unet": dict(
            sample_size=TINY_SD_IMAGE_SIZE // 8, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        ),
        "vae": _TINY_VAE,
        "text": _TINY_TEXT,
    },
    # SD 2.x's shape in small: heads per level, linear projections, a GELU text encoder, v-prediction.
    "tiny-sd2": {
        "family": "sd2",
        "unet": dict(
            sample_size=TINY_SD_IMAGE_SIZE // 8, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4, 4), use_linear_projection=True,
            upcast_attention=True, norm_num_groups=8,
        ),
        "vae": _TINY_VAE,
        "text": dict(_TINY_TEXT, hidden_act="gelu"),
        "prediction": "v_prediction",
    },
    # SDXL's shape in small: no attention at the first level, two transformer layers at the last,
    # two 32-wide text encoders (64-wide keys), pooled text and size conditions.
    "tiny-sdxl": {
        "family": "sdxl",
        "unet": dict(
            sample_size=TINY_SD_IMAGE_SIZE // 8, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, attention_head_dim=(2, 4, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
        ),
        "vae": dict(_TINY_VAE, scaling_factor=0.13025),
        "text": _TINY_TEXT,
        "text2": dict(_TINY_TEXT, hidden_act="gelu", projection_dim=32),
    },
    # The micro-world model (diffseg_d2.microworld), trained by the project on CPU: 64x64 images,
    # a VAE downsampling by 4 to a 16x16 latent, cross-attention at 16x16 (factor 1) and 8x8
    # (factor 2, and the mid block), a 2-layer 64-wide text encoder trained with it.
    "micro": {
        "family": "sd1",
        "unet": dict(
            sample_size=16, layers_per_block=1, block_out_channels=(64, 96),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
        ),
        "vae": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=64),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    },
    # Stable Diffusion 1.5: UNet 860M, VAE 84M, text encoder 123M parameters, 512x512.
    "sd15": {
        "family": "sd1",
        "unet": dict(
            sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    },
    # Stable Diffusion 2.1 (768x768, v-prediction): UNet 866M, OpenCLIP ViT-H text encoder cut to 23 layers.
    "sd21": {
        "family": "sd2",
        "unet": dict(
            sample_size=96, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            upcast_attention=True,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=768),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                     hidden_act="gelu"),
        "prediction": "v_prediction",
    },
    # SDXL base 1.0 (1024x1024): UNet 2.6B, CLIP ViT-L and OpenCLIP ViT-bigG text encoders.
    "sdxl": {
        "family": "sdxl",
        "unet": dict(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                    scaling_factor=0.13025),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        "text2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280),
    },
}


def random_vae(diffusers, sizes: dict):
    """An ``AutoencoderKL`` of ``sizes`` (its ``block_out_channels`` set the number of levels; 4 latent
    channels unless ``sizes`` says otherwise) with the weights of the current random state."""
    levels = len(sizes["block_out_channels"])
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, **{"latent_channels": 4, **sizes},
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
    )


def clip_text_encoder(transformers, tokenizer, sizes: dict, with_projection: bool = False):
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes,
    )
    return (transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel)(config)


def random_stable_diffusion(architecture: str, tokenizer, seed: int = RANDOM_SEED, tokenizer_2=None):
    """UNet, VAE, text encoder(s) and SD's DDIM noise schedule with random weights.

    Args:
        architecture: a key of ``SD_ARCHITECTURES``.
        tokenizer: the CLIP tokenizer the text encoder is sized for.
        tokenizer_2: SDXL's second tokenizer (its padding token differs); the first one if None.

    Returns:
        ``StableDiffusionParts`` (float32, CPU).
    """
    diffusers = require("diffusers", "diffusers", "Random Stable Diffusion models")
    transformers = require("transformers", "transformers", "Random Stable Diffusion models")
    sizes = SD_ARCHITECTURES[architecture]
    family = UNET_FAMILIES[sizes["family"]]
    text_encoder_2 = None
    with random_init(seed):
        unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **sizes["unet"])
        vae = random_vae(diffusers, sizes["vae"])
        text_encoder = clip_text_encoder(transformers, tokenizer, sizes["text"])
        if "text2" in sizes:
            tokenizer_2 = tokenizer_2 or tokenizer
            text_encoder_2 = clip_text_encoder(transformers, tokenizer_2, sizes["text2"], with_projection=True)
    # SD's training noise schedule (1.x, 2.x and XL share it).
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type=sizes.get("prediction", "epsilon"),
    )
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler,
                                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2 if text_encoder_2 else None,
                                family=family)


def write_clip_tokenizer(transformers, folder: Path, pad_token: Optional[str] = None, model_max_length: int = 77):
    """SD's tokenizer folder (vocab.json, merges.txt, tokenizer_config.json), read back through from_pretrained."""
    write_clip_tokenizer_files(folder)
    config = {"model_max_length": model_max_length, **({"pad_token": pad_token} if pad_token else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def build_tiny_stable_diffusion(folder: Path, architecture: str = "tiny") -> None:
    """Save a tiny diffusers pipeline folder of ``architecture``'s family (about 18 MB) into ``folder``,
    through diffusers' own pipeline class of that family."""
    diffusers = require("diffusers", "diffusers", "The tiny Stable Diffusion presets")
    transformers = require("transformers", "transformers", "The tiny Stable Diffusion presets")
    tokenizer = write_clip_tokenizer(transformers, folder / "tokenizer")
    if UNET_FAMILIES[SD_ARCHITECTURES[architecture]["family"]].name == "sdxl":
        # SDXL's second tokenizer pads with "!" (OpenCLIP's convention), the first with end-of-text.
        tokenizer_2 = write_clip_tokenizer(transformers, folder / "tokenizer_2", pad_token="!")
        parts = random_stable_diffusion(architecture, tokenizer, tokenizer_2=tokenizer_2)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=parts.unet, scheduler=parts.scheduler,
        )
    else:
        parts = random_stable_diffusion(architecture, tokenizer)
        pipe = diffusers.StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=tokenizer, unet=parts.unet,
            scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(str(folder), safe_serialization=True)


# The tiny presets of MODEL.DIFFSEG.SD.WEIGHTS: preset name -> (cache folder, architecture).
TINY_SD_PRESETS = {
    TINY: (TINY_SD_FOLDER, "tiny"),
    "tiny-sd2": ("tiny-stable-diffusion-2-v1", "tiny-sd2"),
    "tiny-sdxl": ("tiny-stable-diffusion-xl-v1", "tiny-sdxl"),
}


def resolve_sd_weights(weights: str) -> WeightsLocation:
    """Where ``MODEL.DIFFSEG.SD.WEIGHTS`` points (a hub id, a local folder, a tiny preset or the micro model)."""
    weights = (weights or "").strip()
    if weights in TINY_SD_PRESETS:
        folder, architecture = TINY_SD_PRESETS[weights]
        return resolve_weights(TINY, config_key=SD_WEIGHTS_KEY,
                               tiny=(folder, functools.partial(build_tiny_stable_diffusion, architecture=architecture)))
    return resolve_weights(weights, config_key=SD_WEIGHTS_KEY, required_files=SD_REQUIRED_FILES, micro="diffusion")


def check_family_folder(location: WeightsLocation, family) -> None:
    """Raise ``MissingWeightsError`` naming the files a local folder of ``family`` lacks (any family
    record with ``title`` and ``required_files``); a hub id is checked by its download."""
    if not location.is_local:
        return
    missing = [f for f in family.required_files if not list(Path(location.path).glob(f))]
    if missing:
        raise MissingWeightsError(
            f"The {family.title} folder '{location.path}' ({SD_WEIGHTS_KEY}) is incomplete: missing "
            f"{', '.join(missing)}. Download the whole model into it."
        )


def read_weights_json(location: WeightsLocation, name: str, kwargs: dict) -> Optional[dict]:
    """A json file of the weights (a local folder's, or downloaded from the hub), None when it has none."""
    if location.is_local:
        path = Path(location.path) / name
        if not path.is_file():
            return None
    else:
        hub = require("huggingface_hub", "huggingface_hub", "Reading a model from the hub")
        try:
            path = hub.hf_hub_download(location.path, name, **kwargs)
        except hub.errors.EntryNotFoundError:
            return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class FolderParts:
    """Reads the parts of one diffusers folder or hub id: ``weights(cls, subfolder)`` a model, from safetensors
    only, in ``dtype`` (None: as the class loads it, float32); ``files(cls, subfolder)`` a tokenizer or a
    scheduler config. ``kwargs``: what every read passes on (a hub revision)."""

    def __init__(self, location: WeightsLocation, kwargs: dict, dtype=None):
        self.location, self.kwargs, self.dtype = location, kwargs, dtype

    def weights(self, cls, subfolder: str):
        # diffusers names the load dtype torch_dtype, transformers 5 dtype.
        name = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
        extra = {} if self.dtype is None else {name: self.dtype}
        return self.files(cls, subfolder, use_safetensors=True, **extra)

    def files(self, cls, subfolder: str, **extra):
        return cls.from_pretrained(self.location.path, subfolder=subfolder, **extra, **self.kwargs)


def resolve_pipeline_weights(weights: str, tiny_presets: Dict[str, Tuple[str, str]], build_tiny) -> WeightsLocation:
    """Where ``MODEL.DIFFSEG.SD.WEIGHTS`` points for a family whose tiny presets are ``tiny_presets`` (name ->
    (cache folder, architecture), built on first use by ``build_tiny(folder, architecture=...)``): that cache
    folder, or a hub id / local folder holding a ``model_index.json`` (the family's own files are checked once
    it has named the family)."""
    weights = (weights or "").strip()
    if weights in tiny_presets:
        folder, architecture = tiny_presets[weights]
        return resolve_weights(TINY, config_key=SD_WEIGHTS_KEY,
                               tiny=(folder, functools.partial(build_tiny, architecture=architecture)))
    return resolve_weights(weights, config_key=SD_WEIGHTS_KEY, required_files=("model_index.json",))


def pipeline_named_by(weights: str, revision: Optional[str] = None) -> Tuple[Optional[str], str]:
    """``(pipeline class, where)``: the ``_class_name`` that the ``model_index.json`` of a folder or hub id names
    and the resolved path; ``(None, ...)`` when there is none or it cannot be read (the loaders report
    unreadable weights with the full message)."""
    try:
        location = resolve_weights(weights, config_key=SD_WEIGHTS_KEY)
        kwargs = {} if location.is_local or not revision else {"revision": revision}
        model_index = read_weights_json(location, "model_index.json", kwargs)
    except Exception:  # noqa: BLE001 - see the docstring
        return None, str(weights)
    return (model_index or {}).get("_class_name"), location.path


def load_stable_diffusion(weights: str, revision: Optional[str] = None) -> StableDiffusionParts:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and a DDIM scheduler (float32, CPU), of the family
    the weights name (see the module docstring).

    Args:
        weights: hub id, local diffusers folder, a tiny preset (``"tiny"``, ``"tiny-sd2"``,
            ``"tiny-sdxl"``), ``"micro"``, or ``"random:<architecture>"`` (random weights of a
            ``SD_ARCHITECTURES`` entry, built in memory: for speed and memory measurements, they
            segment nothing). See ``MODEL.DIFFSEG.SD.WEIGHTS``.
        revision: hub revision; ignored for local folders.

    Raises:
        UnsupportedFamilyError: the folder holds a model of another family.
        MissingWeightsError: a missing or incomplete folder, or an unreachable hub id.
    """
    diffusers = require("diffusers", "diffusers", "Loading Stable Diffusion")
    transformers = require("transformers", "transformers", "Loading Stable Diffusion")
    architecture = random_architecture(weights, config_key=SD_WEIGHTS_KEY, choices=SD_ARCHITECTURES)
    if architecture is not None:
        # The real CLIP BPE vocabulary, from the tiny presets' folders.
        folder = resolve_sd_weights("tiny-sdxl" if "text2" in SD_ARCHITECTURES[architecture] else TINY).path
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        tokenizer_2 = (transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
                       if "text2" in SD_ARCHITECTURES[architecture] else None)
        return random_stable_diffusion(architecture, tokenizer, tokenizer_2=tokenizer_2)
    location = resolve_sd_weights(weights)
    kwargs = {} if location.is_local or not revision else {"revision": revision}

    def load() -> StableDiffusionParts:
        model_index = read_weights_json(location, "model_index.json", kwargs)
        family = family_of_folder(model_index, read_weights_json(location, "text_encoder/config.json", kwargs),
                                  f"{SD_WEIGHTS_KEY} = '{location.path}'")
        check_family_folder(location, family)

        part = FolderParts(location, kwargs)
        second = family.text_encoders[1:] and family.text_encoders[1]
        return StableDiffusionParts(
            unet=part.weights(diffusers.UNet2DConditionModel, "unet"),
            vae=part.weights(diffusers.AutoencoderKL, "vae"),
            text_encoder=part.weights(transformers.CLIPTextModel, "text_encoder"),
            tokenizer=part.files(transformers.CLIPTokenizer, "tokenizer"),
            # SD 1.5 ships a PNDM scheduler config, SDXL an Euler one; the noise schedule (betas,
            # prediction type) is what matters here and DDIM reads the same keys.
            scheduler=part.files(diffusers.DDIMScheduler, "scheduler"),
            text_encoder_2=part.weights(transformers.CLIPTextModelWithProjection, second) if second else None,
            tokenizer_2=part.files(transformers.CLIPTokenizer, "tokenizer_2") if second else None,
            family=family,
        )

    return load_pretrained(location, "Stable Diffusion components", load)
