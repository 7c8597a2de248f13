"""DiffSegmenter's keys, and those of the DAAM baseline, the category filter and the caption augmentation
(defaults: the reference code's computation). Each key's comment, default and range side by side."""
from .keys import NON_NEGATIVE, POSITIVE, UNIT, Keys

#: DiffSegmenter's carrier prompt for ``CONDITIONING: shared`` (and DAAM's joint prompt), "{}" -> the
#: joined class names: the config default and the model's.
CARRIER_TEMPLATE = "a photograph of {}."


def add_diffsegmenter_keys(k: Keys) -> None:
    # --- DiffSegmenter (defaults: the reference code's computation) ---------------------------
    # Side of the square the image is resized to before the VAE (512 for SD 1.5).
    k("IMAGE_SIZE", 512, POSITIVE)
    # Antialias when resizing to IMAGE_SIZE. The reference resizes without (False); True is ours.
    k("RESIZE_ANTIALIAS", False)
    # VAE latent: "sample" draws from the posterior (the reference; seeded by SEED, so reproducible);
    # "mean" takes the posterior mean (ours, noise-free).
    k("VAE_LATENT", "sample")
    # Diffusion timestep (of the scheduler's 1000) at which noise is added before the one UNet pass.
    k("NOISE_STEP", 100, NON_NEGATIVE)
    # Seed of the VAE sample and the added noise, drawn per image; the same image always gets the same.
    k("SEED", 0)
    # Prompt of each class; "{}" is replaced by the class's prompt name.
    k("PROMPT_TEMPLATE", "a photograph of {}")
    # Words used in prompts instead of a class name, as "class name=prompt word" pairs (the evaluated
    # class names stay the dataset's), e.g. the reference's single-token VOC names "dining table=table".
    k("PROMPT_NAMES", [])
    # Weight of the tokens of each class name's last word in its prompt: embedding = empty +
    # w * (z - empty), what the reference's Compel markup "name++" computes (1.21); 1 = no weighting.
    k("CLASS_TOKEN_WEIGHT", 1.21, (0.0, None, ">= 0"))
    # Which of a class name's tokens are read: "first" (the reference's VOC script), "last" (its
    # COCO script) or "mean" (ours: all sub-tokens averaged).
    k("TOKEN_SELECTION", "first")
    # The reference's "-ing" rule: when the word after the class name ends in "ing" (a caption
    # continuation such as "dog running"), the token after the read one is averaged in too.
    k("ING_RULE", True)
    # "per_class": every class prompt conditions its own batch element, as in the reference (cost
    # linear in classes); "shared" (ours): ONE UNet pass conditioned on CARRIER_TEMPLATE, every class
    # prompt's cross-attention read out against that pass's queries (cost nearly flat in classes).
    k("CONDITIONING", "per_class")
    # Self-attention of the refinement with "per_class": "own" refines each class with the
    # self-attention of its own pass (the reference); "averaged" (ours) with the mean over all passes.
    k("REFINEMENT", "own")
    # Carrier prompt of "shared" conditioning; "{}" is replaced by the comma-joined class names.
    k("CARRIER_TEMPLATE", CARRIER_TEMPLATE)
    # Most class prompts per batched UNet call with "per_class" conditioning (larger vocabularies are
    # chunked). 4 keeps the peak memory of 20 classes on SD 1.5 within 1.5x a plain UNet pass at the
    # same speed on CPU as 8 (BENCHMARKS.md, sd15); larger chunks can be faster on a GPU.
    k("CLASS_CHUNK_SIZE", 4, POSITIVE)
    # Latent downsampling factors whose cross-attention is read: 8, 4, 2, 1 are the 8/16/32/64 maps of SD 1.5 at 512.
    k("CROSS_ATTN_FACTORS", [8, 4, 2, 1], POSITIVE)
    # Weight of each factor's min-max normalised map in the sum (same order as CROSS_ATTN_FACTORS).
    k("CROSS_ATTN_WEIGHTS", [0.3, 0.5, 0.1, 0.1], (0.0, None, ">= 0"))
    # Refine the class maps with the self-attention averaged at this latent factor (1 = 64x64 for SD 1.5).
    k("SELF_ATTN_FACTOR", 1, POSITIVE)
    # Apply the self-attention refinement M = S @ c.
    k("REFINE", True)
    # On a diffusion transformer (SD3 / SD3.5, FLUX.1), which joint-attention blocks are read instead of
    # CROSS_ATTN_FACTORS / SELF_ATTN_FACTOR (those name UNet resolutions). Names as diffusers numbers the
    # blocks: "transformer_blocks.N" (SD3's joint blocks, FLUX's double-stream ones) and
    # "single_transformer_blocks.M" (FLUX's single-stream ones).
    # Blocks whose class maps are averaged (each map: the class word's attention probability, normalised
    # over ALL keys of the joint sequence, mean over heads and the word's selected tokens). Empty: every block.
    k("TRANSFORMER.BLOCKS", [])
    # Blocks whose image-to-image attention (rows normalised over all keys, mean over heads and blocks)
    # refines the maps, as SELF_ATTN_FACTOR's does on a UNet; applied by the fused attention kernel, never an
    # N x N matrix.
    k("TRANSFORMER.REFINE_BLOCKS", [])
    # Which tokens of the text sequence the class word is read from: "t5" or, on SD3, "clip".
    k("TRANSFORMER.TEXT_SEGMENT", "t5")
    # "image_to_text" (image queries on the class tokens' keys, Seg4Diff's choice) or "text_to_image".
    k("TRANSFORMER.DIRECTION", "image_to_text")
    # "attention": the class words' attention probabilities (above); "concept" (FLUX only): ConceptAttention's
    # maps in the attention-output space, one pass on the empty prompt with each class a concept token
    # travelling through the double-stream BLOCKS (empty: all of them), a softmax over the classes.
    k("TRANSFORMER.READOUT", "attention")
    # Score of the background channel; a pixel whose normalised class scores all fall below it is background.
    k("BACKGROUND_THRESHOLD", 0.4, UNIT)
    # Class names to segment; empty = the stuff_classes of DATASETS.TEST[0].
    k("VOCABULARY", [])

    # --- DAAM baseline (META_ARCHITECTURE "DAAM"): DAAM's aggregation on the same UNet --------
    # Timesteps at which the image is noised (one shared noise sample) and the UNet run on the
    # carrier prompt; every cross-attention layer of every pass is summed. DAAM sums over a whole
    # generation's trajectory; ten points spread over the schedule stand in for it on real images.
    k("DAAM.TIMESTEPS", [901, 801, 701, 601, 501, 401, 301, 201, 101, 1], NON_NEGATIVE)

    # --- category filter ----------------------------------------------------------------------
    # Prompt only the classes CLIP judges present in the image. The reference segments only the
    # classes of each image's entry in a precomputed label file (CLIP image similarity and BLIP
    # caption matching; about 1.3 classes per VOC val image) and skips an image without one; the
    # procedure that made the files was not released: this CLIP filter stands in for it.
    k("CATEGORY_FILTER.ENABLED", True)
    # Keep a class when its softmax probability over the vocabulary (CLIP image-text) is at least this.
    k("CATEGORY_FILTER.THRESHOLD", 0.02, UNIT)
    # Keep at most this many classes (the most probable); 0 = no cap.
    k("CATEGORY_FILTER.TOP_K", 0, NON_NEGATIVE)
    # The reference's own per-image class lists instead of the CLIP filter: the path of a label file
    # in its format (dataset/voc12/predict_syn_txt_0.8_img_0.97.json of its repository: tables of
    # image -> prompt words), matched by each input's file name; words map back to classes through
    # PROMPT_NAMES. An image the file does not list is an error (the reference skips it).
    k("CATEGORY_FILTER.CLASS_LISTS", "")
    # The tables of that file whose lists are joined per image (the reference's VOC script's choice).
    k("CATEGORY_FILTER.CLASS_LISTS_TABLES", ["image_similarity", "text_similarity"])

    # --- caption augmentation -----------------------------------------------------------------
    # Continue every class prompt with a caption of the image (the reference's prompt augmentation).
    k("CAPTION.ENABLED", True)
    # Captioner (transformers BLIP): a hub id or a local folder (the reference: BLIP large).
    k("CAPTION.WEIGHTS", "Salesforce/blip-image-captioning-large")
    # True: BLIP captions the image starting FROM each class prompt and what it adds follows the
    # class word (the reference: one generation per class); False (ours): one caption per image,
    # appended to every prompt after a space.
    k("CAPTION.CONDITIONED", True)
    # Most generated tokens; 0 = the model's own generation settings (the reference's).
    k("CAPTION.MAX_NEW_TOKENS", 0, NON_NEGATIVE)
