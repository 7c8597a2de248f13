"""Keys every method shares: the diffusion substrate's weights, CLIP, the panoptic output of the
training-free methods, and what evaluation writes. Each key's comment, default and range side by side."""
from .keys import Keys


def add_common_keys(k: Keys) -> None:
    # --- evaluation (tools/train_net.py --eval-only) ------------------------------------------
    # Also write each image's semantic confusion matrix (sem_seg_per_image.npz next to the results)
    # for bootstrap intervals over images (tools/benchmark_quality.py turns it on).
    k.top("TEST.PER_IMAGE_CONFUSION", False)

    # --- the shared Stable Diffusion substrate ------------------------------------------------
    # Hub id, local diffusers folder (model_index.json + unet/ vae/ text_encoder/
    # tokenizer/ scheduler/), "tiny" (small random weights built once into the cache), "micro"
    # (the micro-world model) or "random:<architecture>" (random weights of "sd15", "micro" or
    # "tiny" built in memory, for speed measurements; every weights key below has such presets).
    k("SD.WEIGHTS", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    # Hub revision (branch, tag or commit); empty for the default branch.
    k("SD.REVISION", "")
    # Compute dtype of the frozen SD parts: float32, float16 (CUDA only: float32 on CPU) or bfloat16.
    k("SD.DTYPE", "float32")

    # --- panoptic output of the training-free methods (DiffSegmenter, FreeDA, DAAM) -----------
    # Their panoptic_seg is made from the semantic argmax: a stuff class's pixels are one segment,
    # a thing class is split into connected regions. With a dataset's vocabulary its thing_classes
    # are the things (its other classes, "background" included, stuff); with a vocabulary of the
    # user's (MODEL.DIFFSEG.VOCABULARY, set_vocabulary, the input's "vocabulary") "background" is
    # void (id 0, no segment, as in detectron2 and Mask2Former) and every other class is a thing
    # unless STUFF_CLASSES names it. None of the papers makes panoptic output: ours.
    # Return panoptic_seg next to sem_seg (False: sem_seg only).
    k("PANOPTIC.ENABLED", True)
    # Segments under this fraction of the image's pixels are dropped (their pixels: no segment).
    k("PANOPTIC.MIN_AREA", 0.001)
    # The classes of a user's vocabulary that are stuff (one segment each, never split), e.g.
    # ["sky", "grass"]; [] makes every class but "background" a thing.
    k("PANOPTIC.STUFF_CLASSES", [])

    # --- CLIP, shared by the category filter (and later methods) ------------------------------
    # open_clip weights: a hub id (loaded as "hf-hub:<id>"), a local folder with open_clip_config.json
    # and weights, or "tiny" (small random weights built once into the cache).
    k("CLIP.WEIGHTS", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K")
    # Prompt templates whose text embeddings are averaged per class.
    k("CLIP.TEMPLATES", ["a photo of a {}.", "a photo of the {}.", "a photograph of a {}."])
