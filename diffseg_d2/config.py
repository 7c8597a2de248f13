"""Configuration of diffseg_d2: every key lives under ``MODEL.DIFFSEG``.

``add_diffseg_config(cfg)`` adds the node with the reference settings as defaults
and is idempotent, so it can be called after (or before) other projects'
``add_*_config``. ``get_diffseg_cfg(config_file, opts)`` is the one setup helper
used by the tools, the tests and user code; ``merge_config_file(cfg, path)`` is how
it (and any project that builds its own config) reads a yaml file: as data only.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_diffseg_config", "get_diffseg_cfg", "merge_config_file"]

#: DiffSegmenter's carrier prompt for ``CONDITIONING: shared`` (and DAAM's joint prompt), "{}" -> the
#: joined class names: the config default and the model's.
CARRIER_TEMPLATE = "a photograph of {}."


#: FreeDA's class-query templates (the reference's seven), MODEL.DIFFSEG.FREEDA.QUERY_TEMPLATES's default.
FREEDA_QUERY_TEMPLATES = (
    "itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)


def add_diffseg_config(cfg: CN) -> CN:
    """Add the ``MODEL.DIFFSEG`` node to ``cfg`` (in place; a no-op if present)."""
    if "DIFFSEG" in cfg.MODEL:
        return cfg
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    _c = cfg.MODEL.DIFFSEG = CN()

    # --- evaluation (tools/train_net.py --eval-only) -------------------------------
    # Also write each image's semantic confusion matrix (sem_seg_per_image.npz next to the results)
    # for bootstrap intervals over images (tools/benchmark_quality.py turns it on).
    cfg.TEST.PER_IMAGE_CONFUSION = False

    # --- the shared Stable Diffusion substrate -----------------------------------
    _c.SD = CN()
    # Hub id, local diffusers folder (model_index.json + unet/ vae/ text_encoder/
    # tokenizer/ scheduler/), "tiny" (small random weights built once into the cache), "micro"
    # (the micro-world model) or "random:<architecture>" (random weights of "sd15", "micro" or
    # "tiny" built in memory, for speed measurements; every weights key below has such presets).
    _c.SD.WEIGHTS = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # Hub revision (branch, tag or commit); empty for the default branch.
    _c.SD.REVISION = ""
    # Compute dtype of the frozen SD parts: float32, float16 (CUDA only: float32 on CPU) or bfloat16.
    _c.SD.DTYPE = "float32"

    # --- panoptic output of the training-free methods (DiffSegmenter, FreeDA, DAAM) ----------
    # Their panoptic_seg is made from the semantic argmax: a stuff class's pixels are one segment,
    # a thing class is split into connected regions. With a dataset's vocabulary its thing_classes
    # are the things (its other classes, "background" included, stuff); with a vocabulary of the
    # user's (MODEL.DIFFSEG.VOCABULARY, set_vocabulary, the input's "vocabulary") "background" is
    # void (id 0, no segment, as in detectron2 and Mask2Former) and every other class is a thing
    # unless STUFF_CLASSES names it. None of the papers makes panoptic output: ours.
    _c.PANOPTIC = CN()
    # Return panoptic_seg next to sem_seg (False: sem_seg only).
    _c.PANOPTIC.ENABLED = True
    # Segments under this fraction of the image's pixels are dropped (their pixels: no segment).
    _c.PANOPTIC.MIN_AREA = 0.001
    # The classes of a user's vocabulary that are stuff (one segment each, never split), e.g.
    # ["sky", "grass"]; [] makes every class but "background" a thing.
    _c.PANOPTIC.STUFF_CLASSES = []

    # --- DiffSegmenter (defaults: the reference code's computation) -------------------------
    # Side of the square the image is resized to before the VAE (512 for SD 1.5).
    _c.IMAGE_SIZE = 512
    # Antialias when resizing to IMAGE_SIZE. The reference resizes without (False); True is ours.
    _c.RESIZE_ANTIALIAS = False
    # VAE latent: "sample" draws from the posterior (the reference; seeded by SEED, so reproducible);
    # "mean" takes the posterior mean (ours, noise-free).
    _c.VAE_LATENT = "sample"
    # Diffusion timestep (of the scheduler's 1000) at which noise is added before the one UNet pass.
    _c.NOISE_STEP = 100
    # Seed of the VAE sample and the added noise, drawn per image; the same image always gets the same.
    _c.SEED = 0
    # Prompt of each class; "{}" is replaced by the class's prompt name.
    _c.PROMPT_TEMPLATE = "a photograph of {}"
    # Words used in prompts instead of a class name, as "class name=prompt word" pairs (the evaluated
    # class names stay the dataset's), e.g. the reference's single-token VOC names "dining table=table".
    _c.PROMPT_NAMES = []
    # Weight of the tokens of each class name's last word in its prompt: embedding = empty +
    # w * (z - empty), what the reference's Compel markup "name++" computes (1.21); 1 = no weighting.
    _c.CLASS_TOKEN_WEIGHT = 1.21
    # Which of a class name's tokens are read: "first" (the reference's VOC script), "last" (its
    # COCO script) or "mean" (ours: all sub-tokens averaged).
    _c.TOKEN_SELECTION = "first"
    # The reference's "-ing" rule: when the word after the class name ends in "ing" (a caption
    # continuation such as "dog running"), the token after the read one is averaged in too.
    _c.ING_RULE = True
    # "per_class": every class prompt conditions its own batch element, as in the reference (cost
    # linear in classes); "shared" (ours): ONE UNet pass conditioned on CARRIER_TEMPLATE, every class
    # prompt's cross-attention read out against that pass's queries (cost nearly flat in classes).
    _c.CONDITIONING = "per_class"
    # Self-attention of the refinement with "per_class": "own" refines each class with the
    # self-attention of its own pass (the reference); "averaged" (ours) with the mean over all passes.
    _c.REFINEMENT = "own"
    # Carrier prompt of "shared" conditioning; "{}" is replaced by the comma-joined class names.
    _c.CARRIER_TEMPLATE = CARRIER_TEMPLATE
    # Most class prompts per batched UNet call with "per_class" conditioning (larger vocabularies are
    # chunked). 4 keeps the peak memory of 20 classes on SD 1.5 within 1.5x a plain UNet pass at the
    # same speed on CPU as 8 (BENCHMARKS.md, sd15); larger chunks can be faster on a GPU.
    _c.CLASS_CHUNK_SIZE = 4
    # Latent downsampling factors whose cross-attention is read: 8, 4, 2, 1 are the 8/16/32/64 maps of SD 1.5 at 512.
    _c.CROSS_ATTN_FACTORS = [8, 4, 2, 1]
    # Weight of each factor's min-max normalised map in the sum (same order as CROSS_ATTN_FACTORS).
    _c.CROSS_ATTN_WEIGHTS = [0.3, 0.5, 0.1, 0.1]
    # Refine the class maps with the self-attention averaged at this latent factor (1 = 64x64 for SD 1.5).
    _c.SELF_ATTN_FACTOR = 1
    # Apply the self-attention refinement M = S @ c.
    _c.REFINE = True
    # On a diffusion transformer (SD3 / SD3.5, FLUX.1), which joint-attention blocks are read instead of
    # CROSS_ATTN_FACTORS / SELF_ATTN_FACTOR (those name UNet resolutions). Names as diffusers numbers the
    # blocks: "transformer_blocks.N" (SD3's joint blocks, FLUX's double-stream ones) and
    # "single_transformer_blocks.M" (FLUX's single-stream ones).
    _c.TRANSFORMER = CN()
    # Blocks whose class maps are averaged (each map: the class word's attention probability, normalised
    # over ALL keys of the joint sequence, mean over heads and the word's selected tokens). Empty: every block.
    _c.TRANSFORMER.BLOCKS = []
    # Blocks whose image-to-image attention (rows normalised over all keys, mean over heads and blocks)
    # refines the maps, as SELF_ATTN_FACTOR's does on a UNet; applied in row blocks, never an N x N matrix.
    _c.TRANSFORMER.REFINE_BLOCKS = []
    # Which tokens of the text sequence the class word is read from: "t5" or, on SD3, "clip".
    _c.TRANSFORMER.TEXT_SEGMENT = "t5"
    # "image_to_text" (image queries on the class tokens' keys, Seg4Diff's choice) or "text_to_image".
    _c.TRANSFORMER.DIRECTION = "image_to_text"
    # "attention": the class words' attention probabilities (above); "concept" (FLUX only): ConceptAttention's
    # maps in the attention-output space, one pass on the empty prompt with each class a concept token
    # travelling through the double-stream BLOCKS (empty: all of them), a softmax over the classes.
    _c.TRANSFORMER.READOUT = "attention"
    # Score of the background channel; a pixel whose normalised class scores all fall below it is background.
    _c.BACKGROUND_THRESHOLD = 0.4
    # Class names to segment; empty = the stuff_classes of DATASETS.TEST[0].
    _c.VOCABULARY = []

    # --- DAAM baseline (META_ARCHITECTURE "DAAM"): DAAM's aggregation on the same UNet -----
    _c.DAAM = CN()
    # Timesteps at which the image is noised (one shared noise sample) and the UNet run on the
    # carrier prompt; every cross-attention layer of every pass is summed. DAAM sums over a whole
    # generation's trajectory; ten points spread over the schedule stand in for it on real images.
    _c.DAAM.TIMESTEPS = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]

    # --- CLIP, shared by the category filter (and later methods) -----------------------
    _c.CLIP = CN()
    # open_clip weights: a hub id (loaded as "hf-hub:<id>"), a local folder with open_clip_config.json
    # and weights, or "tiny" (small random weights built once into the cache).
    _c.CLIP.WEIGHTS = "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
    # Prompt templates whose text embeddings are averaged per class.
    _c.CLIP.TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a photograph of a {}."]

    # --- category filter -----------------------------------------------------------------
    _c.CATEGORY_FILTER = CN()
    # Prompt only the classes CLIP judges present in the image. The reference segments only the
    # classes of each image's entry in a precomputed label file (CLIP image similarity and BLIP
    # caption matching; about 1.3 classes per VOC val image) and skips an image without one; the
    # procedure that made the files was not released: this CLIP filter stands in for it.
    _c.CATEGORY_FILTER.ENABLED = True
    # Keep a class when its softmax probability over the vocabulary (CLIP image-text) is at least this.
    _c.CATEGORY_FILTER.THRESHOLD = 0.02
    # Keep at most this many classes (the most probable); 0 = no cap.
    _c.CATEGORY_FILTER.TOP_K = 0
    # The reference's own per-image class lists instead of the CLIP filter: the path of a label file
    # in its format (dataset/voc12/predict_syn_txt_0.8_img_0.97.json of its repository: tables of
    # image -> prompt words), matched by each input's file name; words map back to classes through
    # PROMPT_NAMES. An image the file does not list is an error (the reference skips it).
    _c.CATEGORY_FILTER.CLASS_LISTS = ""
    # The tables of that file whose lists are joined per image (the reference's VOC script's choice).
    _c.CATEGORY_FILTER.CLASS_LISTS_TABLES = ["image_similarity", "text_similarity"]

    # --- caption augmentation --------------------------------------------------------------
    _c.CAPTION = CN()
    # Continue every class prompt with a caption of the image (the reference's prompt augmentation).
    _c.CAPTION.ENABLED = True
    # Captioner (transformers BLIP): a hub id or a local folder (the reference: BLIP large).
    _c.CAPTION.WEIGHTS = "Salesforce/blip-image-captioning-large"
    # True: BLIP captions the image starting FROM each class prompt and what it adds follows the
    # class word (the reference: one generation per class); False (ours): one caption per image,
    # appended to every prompt after a space.
    _c.CAPTION.CONDITIONED = True
    # Most generated tokens; 0 = the model's own generation settings (the reference's).
    _c.CAPTION.MAX_NEW_TOKENS = 0

    # --- DINOv2 dense features (FreeDA) ------------------------------------------------
    _c.DINO = CN()
    # timm weights: a hub id (loaded as "hf-hub:<id>"), a local timm folder (config.json +
    # model.safetensors), or "tiny" (small random weights built once into the cache). FreeDA's
    # reference uses DINOv2 ViT-L/14.
    _c.DINO.WEIGHTS = "timm/vit_large_patch14_dinov2.lvd142m"

    # --- FreeDA (defaults: the reference code's test time) --------------------------------
    _c.FREEDA = CN()
    # Folder of the prototype bank: one written by tools/build_freeda_bank.py, or the authors'
    # released bank (a faiss knn.index and a folder of .npy prototypes, see README).
    _c.FREEDA.BANK = ""
    # Keys retrieved per class query; their prototypes are averaged into the class prototype.
    _c.FREEDA.TOP_K = 350
    # Ours: a class whose nearest key has a lower cosine similarity has no prototype and falls back
    # to the global CLIP score alone (logged). -1 = never (the reference has no such fallback).
    _c.FREEDA.MIN_KEY_SIMILARITY = -1.0
    # Class query: "sentence" = CLIP sentence embeddings of QUERY_TEMPLATES, averaged (the reference;
    # the same vector is the global score's text embedding); "token" (ours) = the contextual
    # embedding of the class word's tokens in those prompts, like the bank's noun keys.
    _c.FREEDA.QUERY = "sentence"
    # Prompt templates of the class query and the global text embedding (the reference's
    # "sub_imagenet_template").
    _c.FREEDA.QUERY_TEMPLATES = list(FREEDA_QUERY_TEMPLATES)
    # Weight of the local (superpixel-prototype) score; the global CLIP score gets 1 minus it.
    _c.FREEDA.LOCAL_WEIGHT = 0.8
    # The local score is the sigmoid of the cosine similarity (the reference); False (ours) = the cosine.
    _c.FREEDA.LOCAL_SIGMOID = True
    # "window": superpixels, DINOv2, the CLIP global score and the scores computed per sliding window,
    # window scores averaged per pixel, then bilinear to the image (the reference); "whole" (ours):
    # superpixels and the global score on the whole image, DINOv2 features pooled across windows,
    # each pixel takes its superpixel's score.
    _c.FREEDA.PIPELINE = "window"
    # Superpixel pooling with PIPELINE "window": "token_grid" = superpixel masks bilinearly
    # downsampled (align_corners) to DINOv2's token grid, weighted mean of tokens, pixels of a
    # superpixel that gets no weight take the per-token score (the reference); "exact" (ours) =
    # the exact mean of the bilinearly upsampled features over each superpixel.
    _c.FREEDA.POOLING = "token_grid"
    # Side DINOv2 reads each window at with PIPELINE "window" (518 = 37 patches of 14 for a 448
    # window, the reference); 0 = the window's own size.
    _c.FREEDA.DINO_SIZE = 518
    # Felzenszwalb superpixels (skimage.segmentation.felzenszwalb), set per dataset in the configs.
    _c.FREEDA.SUPERPIXEL = CN()
    # Felzenszwalb scale: larger gives larger segments.
    _c.FREEDA.SUPERPIXEL.SCALE = 100.0
    # Gaussian smoothing (pixels) before segmenting.
    _c.FREEDA.SUPERPIXEL.SIGMA = 1.0
    # Smallest segment, in pixels of the resized image.
    _c.FREEDA.SUPERPIXEL.MIN_SIZE = 20
    # The image is resized so that its short side is this many pixels before anything else ...
    _c.FREEDA.SHORT_SIDE = 448
    # ... unless its long side would exceed this (then the long side is this), with PIPELINE "window".
    _c.FREEDA.LONG_SIDE_CAP = 2048
    # How that resize is computed with PIPELINE "window": "cv2" = OpenCV's bilinear on 8-bit values
    # (the reference's mmseg pipeline; needs opencv-python-headless, in the [freeda] extra);
    # "torch" (ours) = torch's bilinear, rounded to 8-bit values.
    _c.FREEDA.RESIZE = "cv2"
    # DINOv2 reads square crops of this side (sliding window) ...
    _c.FREEDA.WINDOW = 448
    # ... every STRIDE pixels; features are averaged where crops overlap.
    _c.FREEDA.STRIDE = 224
    # HNSW search breadth (faiss efSearch); raised to at least TOP_K. Ignored by exact indexes.
    # The reference's 50000 makes the search effectively exhaustive.
    _c.FREEDA.EF_SEARCH = 50000
    # IVF lists visited per query (faiss nprobe). Ignored by other indexes.
    _c.FREEDA.NPROBE = 16
    # Where the bank's index is searched: "auto" = on the model's GPU when MODEL.DEVICE is CUDA and faiss is a
    # GPU build (extra freeda-gpu; flat and IVF indexes, faiss has no GPU HNSW), else on the CPU; "cpu" = always.
    _c.FREEDA.INDEX_DEVICE = "auto"

    # --- FreeDA offline bank building (tools/build_freeda_bank.py) ------------------------
    _c.FREEDA.BUILD = CN()
    # Side of the generated square images (512 for SD 1.5).
    _c.FREEDA.BUILD.IMAGE_SIZE = 512
    # DDIM denoising steps per generated image.
    _c.FREEDA.BUILD.STEPS = 50
    # Classifier-free guidance scale of the generation.
    _c.FREEDA.BUILD.GUIDANCE_SCALE = 7.5
    # Seed of caption i's image is SEED + i: a bank is reproducible caption by caption.
    _c.FREEDA.BUILD.SEED = 0
    # Latent factors whose cross-attention is summed into the noun maps (DAAM); empty = every one.
    _c.FREEDA.BUILD.CROSS_ATTN_FACTORS = []
    # A noun's mask is where its min-max normalised attention map is at least this (DAAM's tau).
    _c.FREEDA.BUILD.MASK_THRESHOLD = 0.4
    # Where nouns come from: "nltk" (NLTK's perceptron POS tagger; its data must be installed,
    # see README) or "list" (words and phrases of NOUN_LIST found in the caption).
    _c.FREEDA.BUILD.NOUNS = "nltk"
    # Noun list file, one noun or phrase per line (used when NOUNS is "list").
    _c.FREEDA.BUILD.NOUN_LIST = ""
    # Captions per shard: the unit of work that is written atomically and resumed.
    _c.FREEDA.BUILD.SHARD_SIZE = 64
    # Nearest-neighbour index over the keys: "flat" (exact), "hnsw", "ivf", or "auto"
    # (flat up to EXACT_UP_TO keys, HNSW above).
    _c.FREEDA.BUILD.INDEX = "auto"
    # Largest bank that "auto" indexes exactly.
    _c.FREEDA.BUILD.EXACT_UP_TO = 200000
    # HNSW graph degree (faiss M).
    _c.FREEDA.BUILD.HNSW_M = 32
    # HNSW construction breadth (faiss efConstruction).
    _c.FREEDA.BUILD.HNSW_EF_CONSTRUCTION = 200
    # IVF lists; 0 = 4 * sqrt(number of keys).
    _c.FREEDA.BUILD.IVF_NLIST = 0
    # Also save each generated image and its noun masks under <bank>/inspect/ (for looking at).
    _c.FREEDA.BUILD.KEEP_IMAGES = False

    # --- ODISE (trained; see configs/odise/) ----------------------------------------------
    # Large-scale jitter for the panoptic training mapper (replaces INPUT.MIN_SIZE_TRAIN/CROP when on):
    # horizontal flip, resize to a random scale in [MIN_SCALE, MAX_SCALE] of a SIZE square, crop/pad to it.
    cfg.INPUT.LSJ = CN()
    cfg.INPUT.LSJ.ENABLED = False
    cfg.INPUT.LSJ.MIN_SCALE = 0.1
    cfg.INPUT.LSJ.MAX_SCALE = 2.0
    cfg.INPUT.LSJ.SIZE = 1024
    _c.ODISE = CN()
    # Optimizer of tools/train_net.py for ODISE: "ADAMW" or "SGD" (detectron2's default), with SOLVER.* rates.
    _c.ODISE.OPTIMIZER = "ADAMW"
    # Learning-rate multiplier of the backbone's trainable parts (projections and captioner).
    _c.ODISE.BACKBONE_LR_MULTIPLIER = 1.0
    # Which released model to build: "label" (odise_label_coco_50e: trained on the class labels) or
    # "caption" (odise_caption_coco_50e: class-agnostic masks, classes learned from the caption
    # grounding alone; needs LOSS.GROUNDING_WEIGHT > 0 and captions; configs/odise/caption_coco.yaml).
    _c.ODISE.VARIANT = "label"
    # Diffusion backbone (MODEL.BACKBONE.NAME DiffusionUNetBackbone or build_diffusion_unet_fpn_backbone).
    _c.ODISE.BACKBONE = CN()
    # Tapped layers, as the reference numbers them (each tap is the layer's INPUT). UNet: the layers
    # of the up blocks in order (SD 1.5: 12, three per block; a layer's input is the previous
    # output concatenated with the skip). 2, 5, 8, 11 = the last layer of each block, at strides
    # 64 (2560 channels), 32 (1920), 16 (960) and 8 (640).
    _c.ODISE.BACKBONE.UNET_BLOCKS = [2, 5, 8, 11]
    # VAE encoder: its resnets in order (SD: 8, two per level); 5 and 7 sit at strides 4 and 8 (512 channels).
    _c.ODISE.BACKBONE.VAE_ENCODER_BLOCKS = [5, 7]
    # VAE decoder (run on the image's latent): its resnets in order (SD: 12, three per level);
    # 2 and 5 sit at strides 8 and 4 (512 channels). The decoder runs only as far as the last tap.
    _c.ODISE.BACKBONE.VAE_DECODER_BLOCKS = [2, 5]
    # Output levels (strides 4, 8, 16, 32); a tap goes to the level of its stride, clamped to 4..32.
    _c.ODISE.BACKBONE.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Channels of every output level: each tap is resized (nearest) to its level and projected by
    # a ResNet bottleneck block (GroupNorm, OUT_CHANNELS / 4 inside); a level sums its taps.
    _c.ODISE.BACKBONE.OUT_CHANNELS = 512
    # Side of the square the UNet reads, in pixels (512 for SD 1.5). Inputs are cut into squares
    # of side min(WINDOW, short side) that are resized to WINDOW (the reference's sliding window).
    _c.ODISE.BACKBONE.WINDOW = 512
    # Step between those squares; 0 = their side (the reference). The last is aligned with the border.
    _c.ODISE.BACKBONE.WINDOW_STRIDE = 0
    # Most windows per UNet call.
    _c.ODISE.BACKBONE.WINDOW_BATCH = 4
    # Scheduler timestep of the noise added to the latent (0 = the least noise, as the reference).
    _c.ODISE.BACKBONE.NOISE_STEP = 0
    # Seed of that fixed noise (42 in the reference).
    _c.ODISE.BACKBONE.SEED = 42
    # Implicit captioner: the CLIP image embedding (not normalised) -> a linear layer + positional
    # embedding -> added to the empty prompt's encoding through a per-element tanh gate that starts
    # at zero; a second gated path adds it to the UNet's time embedding.
    _c.ODISE.CAPTIONER = CN()
    # False = the UNet is conditioned on the empty prompt.
    _c.ODISE.CAPTIONER.ENABLED = True
    # The gated path into the UNet's time embedding (the reference's learnable_time_embed).
    _c.ODISE.CAPTIONER.TIME_EMBEDDING = True
    # Mask2Former-style mask head.
    _c.ODISE.HEAD = CN()
    # Backbone levels read by the deformable-attention pixel decoder's encoder (the rest go through its FPN).
    _c.ODISE.HEAD.TRANSFORMER_IN_FEATURES = ["res3", "res4", "res5"]
    # Channels inside the pixel decoder.
    _c.ODISE.HEAD.CONV_DIM = 256
    # Channels of the per-pixel mask embedding.
    _c.ODISE.HEAD.MASK_DIM = 256
    # Deformable-attention encoder layers of the pixel decoder.
    _c.ODISE.HEAD.ENCODER_LAYERS = 6
    # Feed-forward width of those encoder layers.
    _c.ODISE.HEAD.ENCODER_FFN_DIM = 1024
    # Width of the transformer decoder.
    _c.ODISE.HEAD.HIDDEN_DIM = 256
    # Object queries (mask proposals per image).
    _c.ODISE.HEAD.NUM_QUERIES = 100
    # Masked-attention decoder layers.
    _c.ODISE.HEAD.DECODER_LAYERS = 9
    # Attention heads in the encoder and the decoder.
    _c.ODISE.HEAD.NUM_HEADS = 8
    # Feed-forward width of the decoder layers.
    _c.ODISE.HEAD.DECODER_FFN_DIM = 2048
    # Losses (Hungarian matching on the same costs).
    _c.ODISE.LOSS = CN()
    # Weight of the classification cross-entropy.
    _c.ODISE.LOSS.CLASS_WEIGHT = 2.0
    # Weight of the point-sampled mask binary cross-entropy.
    _c.ODISE.LOSS.MASK_WEIGHT = 5.0
    # Weight of the point-sampled dice loss.
    _c.ODISE.LOSS.DICE_WEIGHT = 5.0
    # Cross-entropy weight of the "no object" class.
    _c.ODISE.LOSS.NO_OBJECT_WEIGHT = 0.1
    # Points sampled per mask for the matching costs and the mask losses.
    _c.ODISE.LOSS.NUM_POINTS = 12544
    # Candidate points per sampled point for importance sampling.
    _c.ODISE.LOSS.OVERSAMPLE_RATIO = 3.0
    # Share of the points taken where the prediction is most uncertain.
    _c.ODISE.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75
    # Add the losses of every intermediate decoder layer.
    _c.ODISE.LOSS.DEEP_SUPERVISION = True
    # Weight of the caption-grounding loss (nouns of the image captions vs mask embeddings); 0 = off.
    _c.ODISE.LOSS.GROUNDING_WEIGHT = 0.0
    # File of nouns and noun phrases (one per line) looked for in captions; empty = the training classes.
    _c.ODISE.LOSS.GROUNDING_NOUNS = ""
    # Prompt of each noun for the grounding loss (CLIP embedding, then the classifier's text projection).
    _c.ODISE.LOSS.GROUNDING_TEMPLATE = "a photo of a {}."
    # Inference.
    _c.ODISE.TEST = CN()
    # Return "sem_seg" (per-class scores).
    _c.ODISE.TEST.SEMANTIC_ON = True
    # Return "panoptic_seg".
    _c.ODISE.TEST.PANOPTIC_ON = True
    # Return "instances" (the top (query, class) pairs over all classes; with panoptic output on,
    # those of stuff classes are then dropped).
    _c.ODISE.TEST.INSTANCE_ON = True
    # A query becomes a panoptic segment when its best class probability is above this (0.0 in the
    # reference's config; Mask2Former's own default is 0.8).
    _c.ODISE.TEST.OBJECT_MASK_THRESHOLD = 0.0
    # ... and it keeps at least this share of its own mask after overlaps are resolved.
    _c.ODISE.TEST.OVERLAP_THRESHOLD = 0.8
    # Instances kept per image.
    _c.ODISE.TEST.DETECTIONS_PER_IMAGE = 100
    # Ensemble with CLIP's classifier of each mask (geometric mean of the two probabilities).
    _c.ODISE.TEST.ENSEMBLE = True
    # CLIP's exponent for classes seen in training: p = p_head^(1 - ALPHA) * p_clip^ALPHA
    # (0.3 for the reference's label-trained model, 0.35 for its caption-trained one).
    _c.ODISE.TEST.ENSEMBLE_ALPHA = 0.3
    # CLIP's exponent for classes not seen in training (0.7 label-trained, 0.65 caption-trained).
    _c.ODISE.TEST.ENSEMBLE_BETA = 0.7
    # CLIP's view of a mask: "maskclip" (the reference: copies of the class token attending only
    # to the mask's patches, at CLIP's input size) or "pooled_patches" (ours: final-layer patch
    # tokens averaged under the soft mask).
    _c.ODISE.TEST.ENSEMBLE_CLIP = "maskclip"
    # What CLIP's side reads: "padded" (the reference: the head's masks over the padded batch, the
    # image over its own extent, misaligned on sizes that are not multiples of the backbone's 64) or
    # "image" (ours: the masks upsampled and cropped to the image).
    _c.ODISE.TEST.CLIP_MASK_EXTENT = "padded"
    # CLIP's prompt for each class synonym on the ensemble's side.
    _c.ODISE.TEST.ENSEMBLE_TEMPLATE = "a photo of a {}."

    if was_frozen:
        cfg.freeze()
    return cfg


class ConfigKeyError(KeyError):
    """A config file or ``KEY VALUE`` override naming a key that does not exist, or a missing file."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class UnsafeConfigError(ConfigKeyError):
    """A config file with a yaml tag that would construct a Python object (and so run code)."""


def merge_config_file(cfg: CN, config_file: str) -> CN:
    """Merge a yaml config file and its ``_BASE_`` chain into ``cfg`` (in place), read as data only.

    detectron2's ``merge_from_file`` allows "unsafe" yaml by default: when a file holds a Python tag
    (``!!python/object/apply:...``), fvcore reads it again with ``yaml.unsafe_load``, which calls
    whatever the tag names while the file is read. Here every file of the chain is read with
    ``yaml.safe_load`` only.

    Raises:
        UnsafeConfigError: a file of the chain holds such a tag (the message names the file and line).
        ConfigKeyError: the file does not exist and is not the name of a shipped config.
    """
    import yaml

    from .model_zoo import find_config_file

    if not os.path.isfile(config_file):
        # A shipped config's name ("diffsegmenter/voc21.yaml", or "configs/..." outside a clone).
        shipped = find_config_file(config_file)
        if shipped is None:
            raise ConfigKeyError(f"The config file {config_file} does not exist, nor is it the name of a shipped "
                                 "config (diffseg_d2.model_zoo.list_configs() lists them).")
        config_file = str(shipped)
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else config_file
        raise UnsafeConfigError(
            f"{where}: {e.problem or 'a tag that constructs an object'}. Config files are read as data "
            "only (such a tag would make the yaml reader construct a Python object, that is, run code): "
            "write a plain value instead."
        ) from None
    return cfg


def get_diffseg_cfg(config_file: Optional[str] = None, opts: Optional[Sequence[str]] = None) -> CN:
    """A detectron2 config with the diffseg_d2 keys, merged from a yaml and ``KEY VALUE`` opts.

    Every registry entry a config may name exists by now: importing this module ran
    ``diffseg_d2/__init__.py``, which registers the meta-architectures and datasets. The yaml is
    read as data only (:func:`merge_config_file`).

    Raises:
        ConfigKeyError: ``config_file`` does not exist, or it or ``opts`` name an unknown key.
        UnsafeConfigError: ``config_file`` (or a ``_BASE_`` of it) holds a Python yaml tag.
    """
    cfg = get_cfg()
    add_diffseg_config(cfg)
    merges = [(config_file, lambda path: merge_config_file(cfg, path), config_file)] if config_file else []
    if opts:
        merges.append(("the KEY VALUE overrides", cfg.merge_from_list, list(opts)))
    for source, merge, value in merges:
        try:
            merge(value)
        except ConfigKeyError:
            raise
        except (AssertionError, KeyError) as e:
            # yacs reports unknown keys with a bare assert; say where the known ones are.
            raise ConfigKeyError(
                f"{e} (in {source}). Keys under MODEL.DIFFSEG are listed in diffseg_d2/config.py; "
                "other keys are detectron2's (detectron2/config/defaults.py)."
            ) from e
    return cfg


# ---------------------------------------------------------------------------- checks at build time
# Numeric keys and the ranges their values must lie in: (key under MODEL.DIFFSEG, low, high, what).
# Checked by ``check_config`` when a model is built, so a wrong value is named before weights load.
_UNIT = (0.0, 1.0, "in [0, 1]")
_POSITIVE = (1, None, ">= 1")
_NON_NEGATIVE = (0, None, ">= 0")
_RANGES = {
    "IMAGE_SIZE": _POSITIVE,
    "NOISE_STEP": _NON_NEGATIVE,  # the upper end (the scheduler's length) is checked against the loaded UNet
    "CLASS_CHUNK_SIZE": _POSITIVE,
    "SELF_ATTN_FACTOR": _POSITIVE,
    "BACKGROUND_THRESHOLD": _UNIT,
    "CROSS_ATTN_FACTORS": _POSITIVE,
    "CROSS_ATTN_WEIGHTS": (0.0, None, ">= 0"),
    "DAAM.TIMESTEPS": _NON_NEGATIVE,
    "CATEGORY_FILTER.THRESHOLD": _UNIT,
    "CATEGORY_FILTER.TOP_K": _NON_NEGATIVE,
    "CAPTION.MAX_NEW_TOKENS": _NON_NEGATIVE,
    "CLASS_TOKEN_WEIGHT": (0.0, None, ">= 0"),
    "FREEDA.TOP_K": _POSITIVE,
    "FREEDA.LOCAL_WEIGHT": _UNIT,
    "FREEDA.SUPERPIXEL.SCALE": (0.0, None, ">= 0"),
    "FREEDA.SUPERPIXEL.SIGMA": (0.0, None, ">= 0"),
    "FREEDA.SUPERPIXEL.MIN_SIZE": _NON_NEGATIVE,
    "FREEDA.SHORT_SIDE": _POSITIVE,
    "FREEDA.LONG_SIDE_CAP": _POSITIVE,
    "FREEDA.WINDOW": _POSITIVE,
    "FREEDA.STRIDE": _POSITIVE,
    "FREEDA.DINO_SIZE": _NON_NEGATIVE,
    "FREEDA.EF_SEARCH": _POSITIVE,
    "FREEDA.NPROBE": _POSITIVE,
    "FREEDA.BUILD.IMAGE_SIZE": _POSITIVE,
    "FREEDA.BUILD.STEPS": _POSITIVE,
    "FREEDA.BUILD.GUIDANCE_SCALE": (0.0, None, ">= 0"),
    "FREEDA.BUILD.CROSS_ATTN_FACTORS": _POSITIVE,
    "FREEDA.BUILD.MASK_THRESHOLD": _UNIT,
    "FREEDA.BUILD.SHARD_SIZE": _POSITIVE,
    "FREEDA.BUILD.EXACT_UP_TO": _NON_NEGATIVE,
    "FREEDA.BUILD.HNSW_M": _POSITIVE,
    "FREEDA.BUILD.HNSW_EF_CONSTRUCTION": _POSITIVE,
    "FREEDA.BUILD.IVF_NLIST": _NON_NEGATIVE,
    "ODISE.BACKBONE_LR_MULTIPLIER": (0.0, None, ">= 0"),
    "ODISE.BACKBONE.OUT_CHANNELS": _POSITIVE,
    "ODISE.BACKBONE.WINDOW": _POSITIVE,
    "ODISE.BACKBONE.WINDOW_STRIDE": _NON_NEGATIVE,
    "ODISE.BACKBONE.WINDOW_BATCH": _POSITIVE,
    "ODISE.BACKBONE.NOISE_STEP": _NON_NEGATIVE,
    "ODISE.HEAD.CONV_DIM": _POSITIVE,
    "ODISE.HEAD.MASK_DIM": _POSITIVE,
    "ODISE.HEAD.ENCODER_LAYERS": _NON_NEGATIVE,
    "ODISE.HEAD.ENCODER_FFN_DIM": _POSITIVE,
    "ODISE.HEAD.HIDDEN_DIM": _POSITIVE,
    "ODISE.HEAD.NUM_QUERIES": _POSITIVE,
    "ODISE.HEAD.DECODER_LAYERS": _POSITIVE,
    "ODISE.HEAD.NUM_HEADS": _POSITIVE,
    "ODISE.HEAD.DECODER_FFN_DIM": _POSITIVE,
    "ODISE.LOSS.CLASS_WEIGHT": (0.0, None, ">= 0"),
    "ODISE.LOSS.MASK_WEIGHT": (0.0, None, ">= 0"),
    "ODISE.LOSS.DICE_WEIGHT": (0.0, None, ">= 0"),
    "ODISE.LOSS.NO_OBJECT_WEIGHT": (0.0, None, ">= 0"),
    "ODISE.LOSS.NUM_POINTS": _POSITIVE,
    "ODISE.LOSS.OVERSAMPLE_RATIO": (1.0, None, ">= 1"),
    "ODISE.LOSS.IMPORTANCE_SAMPLE_RATIO": _UNIT,
    "ODISE.LOSS.GROUNDING_WEIGHT": (0.0, None, ">= 0"),
    "ODISE.TEST.OBJECT_MASK_THRESHOLD": _UNIT,
    "ODISE.TEST.OVERLAP_THRESHOLD": _UNIT,
    "ODISE.TEST.DETECTIONS_PER_IMAGE": _POSITIVE,
    "ODISE.TEST.ENSEMBLE_ALPHA": _UNIT,
    "ODISE.TEST.ENSEMBLE_BETA": _UNIT,
}


def _lookup(node: CN, dotted: str):
    for part in dotted.split("."):
        node = node[part]
    return node


def check_device(device: str) -> None:
    """Raise a clear error when ``MODEL.DEVICE`` names no device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"MODEL.DEVICE = {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'.") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"MODEL.DEVICE = {device!r}, but this machine has no usable CUDA GPU (torch "
                f"{torch.__version__}, torch.cuda.is_available() is False). Set MODEL.DEVICE cpu."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"MODEL.DEVICE = {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})."
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"MODEL.DEVICE = {device!r}, but MPS is not available here. Set MODEL.DEVICE cpu.")


def check_config(cfg: CN) -> None:
    """Every check a model of the package runs on ``cfg`` when it is built, before any weights load:
    the numeric ``MODEL.DIFFSEG`` keys are in range, ``MODEL.DEVICE`` exists on this machine, and
    ``MODEL.WEIGHTS`` is empty or a checkpoint that loads weights-only (never a pickle)."""
    from .checkpoint_safety import check_checkpoint_file

    d = cfg.MODEL.DIFFSEG
    for key, (low, high, what) in _RANGES.items():
        value = _lookup(d, key)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"MODEL.DIFFSEG.{key} = {value!r} must be a number {what}.")
            if (low is not None and v < low) or (high is not None and v > high):
                raise ValueError(f"MODEL.DIFFSEG.{key} = {value!r} is out of range: it must be {what}.")
    check_device(cfg.MODEL.DEVICE)
    check_checkpoint_file(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
