"""FreeDA's keys: DINOv2, test time (defaults: the reference code's) and the offline bank build. Each key's
comment, default and range side by side."""
from .keys import NON_NEGATIVE, POSITIVE, UNIT, Keys

#: FreeDA's class-query templates (the reference's seven), MODEL.DIFFSEG.FREEDA.QUERY_TEMPLATES's default.
FREEDA_QUERY_TEMPLATES = (
    "itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)


def add_freeda_keys(k: Keys) -> None:
    # --- DINOv2 dense features (FreeDA) -------------------------------------------------------
    # timm weights: a hub id (loaded as "hf-hub:<id>"), a local timm folder (config.json +
    # model.safetensors), or "tiny" (small random weights built once into the cache). FreeDA's
    # reference uses DINOv2 ViT-L/14.
    k("DINO.WEIGHTS", "timm/vit_large_patch14_dinov2.lvd142m")

    # --- FreeDA (defaults: the reference code's test time) ------------------------------------
    # Folder of the prototype bank: one written by tools/build_freeda_bank.py, or the authors'
    # released bank (a faiss knn.index and a folder of .npy prototypes, see README).
    k("FREEDA.BANK", "")
    # Keys retrieved per class query; their prototypes are averaged into the class prototype.
    k("FREEDA.TOP_K", 350, POSITIVE)
    # Ours: a class whose nearest key has a lower cosine similarity has no prototype and falls back
    # to the global CLIP score alone (logged). -1 = never (the reference has no such fallback).
    k("FREEDA.MIN_KEY_SIMILARITY", -1.0)
    # Class query: "sentence" = CLIP sentence embeddings of QUERY_TEMPLATES, averaged (the reference;
    # the same vector is the global score's text embedding); "token" (ours) = the contextual
    # embedding of the class word's tokens in those prompts, like the bank's noun keys.
    k("FREEDA.QUERY", "sentence")
    # Prompt templates of the class query and the global text embedding (the reference's
    # "sub_imagenet_template").
    k("FREEDA.QUERY_TEMPLATES", list(FREEDA_QUERY_TEMPLATES))
    # Weight of the local (superpixel-prototype) score; the global CLIP score gets 1 minus it.
    k("FREEDA.LOCAL_WEIGHT", 0.8, UNIT)
    # The local score is the sigmoid of the cosine similarity (the reference); False (ours) = the cosine.
    k("FREEDA.LOCAL_SIGMOID", True)
    # "window": superpixels, DINOv2, the CLIP global score and the scores computed per sliding window,
    # window scores averaged per pixel, then bilinear to the image (the reference); "whole" (ours):
    # superpixels and the global score on the whole image, DINOv2 features pooled across windows,
    # each pixel takes its superpixel's score.
    k("FREEDA.PIPELINE", "window")
    # Superpixel pooling with PIPELINE "window": "token_grid" = superpixel masks bilinearly
    # downsampled (align_corners) to DINOv2's token grid, weighted mean of tokens, pixels of a
    # superpixel that gets no weight take the per-token score (the reference); "exact" (ours) =
    # the exact mean of the bilinearly upsampled features over each superpixel.
    k("FREEDA.POOLING", "token_grid")
    # Side DINOv2 reads each window at with PIPELINE "window" (518 = 37 patches of 14 for a 448
    # window, the reference); 0 = the window's own size.
    k("FREEDA.DINO_SIZE", 518, NON_NEGATIVE)
    # Felzenszwalb superpixels (skimage.segmentation.felzenszwalb), set per dataset in the configs.
    # Felzenszwalb scale: larger gives larger segments.
    k("FREEDA.SUPERPIXEL.SCALE", 100.0, (0.0, None, ">= 0"))
    # Gaussian smoothing (pixels) before segmenting.
    k("FREEDA.SUPERPIXEL.SIGMA", 1.0, (0.0, None, ">= 0"))
    # Smallest segment, in pixels of the resized image.
    k("FREEDA.SUPERPIXEL.MIN_SIZE", 20, NON_NEGATIVE)
    # The image is resized so that its short side is this many pixels before anything else ...
    k("FREEDA.SHORT_SIDE", 448, POSITIVE)
    # ... unless its long side would exceed this (then the long side is this), with PIPELINE "window".
    k("FREEDA.LONG_SIDE_CAP", 2048, POSITIVE)
    # How that resize is computed with PIPELINE "window": "cv2" = OpenCV's bilinear on 8-bit values
    # (the reference's mmseg pipeline; needs opencv-python-headless, in the [freeda] extra);
    # "torch" (ours) = torch's bilinear, rounded to 8-bit values.
    k("FREEDA.RESIZE", "cv2")
    # DINOv2 reads square crops of this side (sliding window) ...
    k("FREEDA.WINDOW", 448, POSITIVE)
    # ... every STRIDE pixels; features are averaged where crops overlap.
    k("FREEDA.STRIDE", 224, POSITIVE)
    # HNSW search breadth (faiss efSearch); raised to at least TOP_K. Ignored by exact indexes.
    # The reference's 50000 makes the search effectively exhaustive.
    k("FREEDA.EF_SEARCH", 50000, POSITIVE)
    # IVF lists visited per query (faiss nprobe). Ignored by other indexes.
    k("FREEDA.NPROBE", 16, POSITIVE)
    # Where the bank's index is searched: "auto" = on the model's GPU when MODEL.DEVICE is CUDA and faiss is a
    # GPU build (extra freeda-gpu; flat and IVF indexes, faiss has no GPU HNSW), else on the CPU; "cpu" = always.
    k("FREEDA.INDEX_DEVICE", "auto")

    # --- FreeDA offline bank building (tools/build_freeda_bank.py) ----------------------------
    # Side of the generated square images (512 for SD 1.5).
    k("FREEDA.BUILD.IMAGE_SIZE", 512, POSITIVE)
    # DDIM denoising steps per generated image.
    k("FREEDA.BUILD.STEPS", 50, POSITIVE)
    # Classifier-free guidance scale of the generation.
    k("FREEDA.BUILD.GUIDANCE_SCALE", 7.5, (0.0, None, ">= 0"))
    # Seed of caption i's image is SEED + i: a bank is reproducible caption by caption.
    k("FREEDA.BUILD.SEED", 0)
    # Latent factors whose cross-attention is summed into the noun maps (DAAM); empty = every one.
    k("FREEDA.BUILD.CROSS_ATTN_FACTORS", [], POSITIVE)
    # A noun's mask is where its min-max normalised attention map is at least this (DAAM's tau).
    k("FREEDA.BUILD.MASK_THRESHOLD", 0.4, UNIT)
    # Where nouns come from: "nltk" (NLTK's perceptron POS tagger; its data must be installed,
    # see README) or "list" (words and phrases of NOUN_LIST found in the caption).
    k("FREEDA.BUILD.NOUNS", "nltk")
    # Noun list file, one noun or phrase per line (used when NOUNS is "list").
    k("FREEDA.BUILD.NOUN_LIST", "")
    # Captions per shard: the unit of work that is written atomically and resumed.
    k("FREEDA.BUILD.SHARD_SIZE", 64, POSITIVE)
    # Nearest-neighbour index over the keys: "flat" (exact), "hnsw", "ivf", or "auto"
    # (flat up to EXACT_UP_TO keys, HNSW above).
    k("FREEDA.BUILD.INDEX", "auto")
    # Largest bank that "auto" indexes exactly.
    k("FREEDA.BUILD.EXACT_UP_TO", 200000, NON_NEGATIVE)
    # HNSW graph degree (faiss M).
    k("FREEDA.BUILD.HNSW_M", 32, POSITIVE)
    # HNSW construction breadth (faiss efConstruction).
    k("FREEDA.BUILD.HNSW_EF_CONSTRUCTION", 200, POSITIVE)
    # IVF lists; 0 = 4 * sqrt(number of keys).
    k("FREEDA.BUILD.IVF_NLIST", 0, NON_NEGATIVE)
    # Also save each generated image and its noun masks under <bank>/inspect/ (for looking at).
    k("FREEDA.BUILD.KEEP_IMAGES", False)
