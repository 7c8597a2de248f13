"""ODISE's keys (trained; see configs/odise/), and the large-scale-jitter input keys of its training mapper.
Each key's comment, default and range side by side."""
from .keys import NON_NEGATIVE, POSITIVE, UNIT, Keys


def add_odise_keys(k: Keys) -> None:
    # --- ODISE (trained; see configs/odise/) --------------------------------------------------
    # Large-scale jitter for the panoptic training mapper (replaces INPUT.MIN_SIZE_TRAIN/CROP when on):
    # horizontal flip, resize to a random scale in [MIN_SCALE, MAX_SCALE] of a SIZE square, crop/pad to it.
    k.top("INPUT.LSJ.ENABLED", False)
    # Smallest scale of the random resize, a fraction of SIZE.
    k.top("INPUT.LSJ.MIN_SCALE", 0.1)
    # Largest scale of the random resize.
    k.top("INPUT.LSJ.MAX_SCALE", 2.0)
    # Side of the square crop (padded where the resized image is smaller).
    k.top("INPUT.LSJ.SIZE", 1024)
    # Optimizer of tools/train_net.py for ODISE: "ADAMW" or "SGD" (detectron2's default), with SOLVER.* rates.
    k("ODISE.OPTIMIZER", "ADAMW")
    # Learning-rate multiplier of the backbone's trainable parts (projections and captioner).
    k("ODISE.BACKBONE_LR_MULTIPLIER", 1.0, (0.0, None, ">= 0"))
    # Which released model to build: "label" (odise_label_coco_50e: trained on the class labels) or
    # "caption" (odise_caption_coco_50e: class-agnostic masks, classes learned from the caption
    # grounding alone; needs LOSS.GROUNDING_WEIGHT > 0 and captions; configs/odise/caption_coco.yaml).
    k("ODISE.VARIANT", "label")
    # Diffusion backbone (MODEL.BACKBONE.NAME DiffusionUNetBackbone or build_diffusion_unet_fpn_backbone).
    # Tapped layers, as the reference numbers them (each tap is the layer's INPUT). UNet: the layers
    # of the up blocks in order (SD 1.5: 12, three per block; a layer's input is the previous
    # output concatenated with the skip). 2, 5, 8, 11 = the last layer of each block, at strides
    # 64 (2560 channels), 32 (1920), 16 (960) and 8 (640).
    k("ODISE.BACKBONE.UNET_BLOCKS", [2, 5, 8, 11])
    # VAE encoder: its resnets in order (SD: 8, two per level); 5 and 7 sit at strides 4 and 8 (512 channels).
    k("ODISE.BACKBONE.VAE_ENCODER_BLOCKS", [5, 7])
    # VAE decoder (run on the image's latent): its resnets in order (SD: 12, three per level);
    # 2 and 5 sit at strides 8 and 4 (512 channels). The decoder runs only as far as the last tap.
    k("ODISE.BACKBONE.VAE_DECODER_BLOCKS", [2, 5])
    # Output levels (strides 4, 8, 16, 32); a tap goes to the level of its stride, clamped to 4..32.
    k("ODISE.BACKBONE.OUT_FEATURES", ["res2", "res3", "res4", "res5"])
    # Channels of every output level: each tap is resized (nearest) to its level and projected by
    # a ResNet bottleneck block (GroupNorm, OUT_CHANNELS / 4 inside); a level sums its taps.
    k("ODISE.BACKBONE.OUT_CHANNELS", 512, POSITIVE)
    # Side of the square the UNet reads, in pixels (512 for SD 1.5). Inputs are cut into squares
    # of side min(WINDOW, short side) that are resized to WINDOW (the reference's sliding window).
    k("ODISE.BACKBONE.WINDOW", 512, POSITIVE)
    # Step between those squares; 0 = their side (the reference). The last is aligned with the border.
    k("ODISE.BACKBONE.WINDOW_STRIDE", 0, NON_NEGATIVE)
    # Most windows per UNet call.
    k("ODISE.BACKBONE.WINDOW_BATCH", 4, POSITIVE)
    # Scheduler timestep of the noise added to the latent (0 = the least noise, as the reference).
    k("ODISE.BACKBONE.NOISE_STEP", 0, NON_NEGATIVE)
    # Seed of that fixed noise (42 in the reference).
    k("ODISE.BACKBONE.SEED", 42)
    # Implicit captioner: the CLIP image embedding (not normalised) -> a linear layer + positional
    # embedding -> added to the empty prompt's encoding through a per-element tanh gate that starts
    # at zero; a second gated path adds it to the UNet's time embedding.
    # False = the UNet is conditioned on the empty prompt.
    k("ODISE.CAPTIONER.ENABLED", True)
    # The gated path into the UNet's time embedding (the reference's learnable_time_embed).
    k("ODISE.CAPTIONER.TIME_EMBEDDING", True)
    # Mask2Former-style mask head.
    # Backbone levels read by the deformable-attention pixel decoder's encoder (the rest go through its FPN).
    k("ODISE.HEAD.TRANSFORMER_IN_FEATURES", ["res3", "res4", "res5"])
    # Channels inside the pixel decoder.
    k("ODISE.HEAD.CONV_DIM", 256, POSITIVE)
    # Channels of the per-pixel mask embedding.
    k("ODISE.HEAD.MASK_DIM", 256, POSITIVE)
    # Deformable-attention encoder layers of the pixel decoder.
    k("ODISE.HEAD.ENCODER_LAYERS", 6, NON_NEGATIVE)
    # Feed-forward width of those encoder layers.
    k("ODISE.HEAD.ENCODER_FFN_DIM", 1024, POSITIVE)
    # Width of the transformer decoder.
    k("ODISE.HEAD.HIDDEN_DIM", 256, POSITIVE)
    # Object queries (mask proposals per image).
    k("ODISE.HEAD.NUM_QUERIES", 100, POSITIVE)
    # Masked-attention decoder layers.
    k("ODISE.HEAD.DECODER_LAYERS", 9, POSITIVE)
    # Attention heads in the encoder and the decoder.
    k("ODISE.HEAD.NUM_HEADS", 8, POSITIVE)
    # Feed-forward width of the decoder layers.
    k("ODISE.HEAD.DECODER_FFN_DIM", 2048, POSITIVE)
    # Losses (Hungarian matching on the same costs).
    # Weight of the classification cross-entropy.
    k("ODISE.LOSS.CLASS_WEIGHT", 2.0, (0.0, None, ">= 0"))
    # Weight of the point-sampled mask binary cross-entropy.
    k("ODISE.LOSS.MASK_WEIGHT", 5.0, (0.0, None, ">= 0"))
    # Weight of the point-sampled dice loss.
    k("ODISE.LOSS.DICE_WEIGHT", 5.0, (0.0, None, ">= 0"))
    # Cross-entropy weight of the "no object" class.
    k("ODISE.LOSS.NO_OBJECT_WEIGHT", 0.1, (0.0, None, ">= 0"))
    # Points sampled per mask for the matching costs and the mask losses.
    k("ODISE.LOSS.NUM_POINTS", 12544, POSITIVE)
    # Candidate points per sampled point for importance sampling.
    k("ODISE.LOSS.OVERSAMPLE_RATIO", 3.0, (1.0, None, ">= 1"))
    # Share of the points taken where the prediction is most uncertain.
    k("ODISE.LOSS.IMPORTANCE_SAMPLE_RATIO", 0.75, UNIT)
    # Add the losses of every intermediate decoder layer.
    k("ODISE.LOSS.DEEP_SUPERVISION", True)
    # Weight of the caption-grounding loss (nouns of the image captions vs mask embeddings); 0 = off.
    k("ODISE.LOSS.GROUNDING_WEIGHT", 0.0, (0.0, None, ">= 0"))
    # File of nouns and noun phrases (one per line) looked for in captions; empty = the training classes.
    k("ODISE.LOSS.GROUNDING_NOUNS", "")
    # Prompt of each noun for the grounding loss (CLIP embedding, then the classifier's text projection).
    k("ODISE.LOSS.GROUNDING_TEMPLATE", "a photo of a {}.")
    # Inference.
    # Return "sem_seg" (per-class scores).
    k("ODISE.TEST.SEMANTIC_ON", True)
    # Return "panoptic_seg".
    k("ODISE.TEST.PANOPTIC_ON", True)
    # Return "instances" (the top (query, class) pairs over all classes; with panoptic output on,
    # those of stuff classes are then dropped).
    k("ODISE.TEST.INSTANCE_ON", True)
    # A query becomes a panoptic segment when its best class probability is above this (0.0 in the
    # reference's config; Mask2Former's own default is 0.8).
    k("ODISE.TEST.OBJECT_MASK_THRESHOLD", 0.0, UNIT)
    # ... and it keeps at least this share of its own mask after overlaps are resolved.
    k("ODISE.TEST.OVERLAP_THRESHOLD", 0.8, UNIT)
    # Instances kept per image.
    k("ODISE.TEST.DETECTIONS_PER_IMAGE", 100, POSITIVE)
    # Ensemble with CLIP's classifier of each mask (geometric mean of the two probabilities).
    k("ODISE.TEST.ENSEMBLE", True)
    # CLIP's exponent for classes seen in training: p = p_head^(1 - ALPHA) * p_clip^ALPHA
    # (0.3 for the reference's label-trained model, 0.35 for its caption-trained one).
    k("ODISE.TEST.ENSEMBLE_ALPHA", 0.3, UNIT)
    # CLIP's exponent for classes not seen in training (0.7 label-trained, 0.65 caption-trained).
    k("ODISE.TEST.ENSEMBLE_BETA", 0.7, UNIT)
    # CLIP's view of a mask: "maskclip" (the reference: copies of the class token attending only
    # to the mask's patches, at CLIP's input size) or "pooled_patches" (ours: final-layer patch
    # tokens averaged under the soft mask).
    k("ODISE.TEST.ENSEMBLE_CLIP", "maskclip")
    # What CLIP's side reads: "padded" (the reference: the head's masks over the padded batch, the
    # image over its own extent, misaligned on sizes that are not multiples of the backbone's 64) or
    # "image" (ours: the masks upsampled and cropped to the image).
    k("ODISE.TEST.CLIP_MASK_EXTENT", "padded")
    # CLIP's prompt for each class synonym on the ensemble's side.
    k("ODISE.TEST.ENSEMBLE_TEMPLATE", "a photo of a {}.")
