"""ODISE: open-vocabulary panoptic segmentation with a frozen diffusion UNet as the backbone.

Data flow of one batch::

    images ─► DiffusionUNetBackbone (frozen SD + implicit captioner, trainable projections)
           ─► DeformablePixelDecoder ─► mask features + 3 scales
           ─► MaskedAttentionDecoder ─► per query: mask logits, mask embedding
               (pixel embeddings pooled under the mask + query state)
           ─► OpenVocabClassifier vs projected CLIP text embeddings of the
               vocabulary's synonyms (+ "no object", learned from CLIP(""))
    training:  Hungarian matching, class CE + point-sampled mask BCE and dice
               (+ caption grounding on every decoder layer)
    inference: geometric ensemble with MaskCLIP (CLIP's class token attending
               to each mask's patches), then Mask2Former's semantic / panoptic /
               instance outputs

Every default is the released ODISE's computation; ``MODEL.DIFFSEG.ODISE.TEST.ENSEMBLE_CLIP
pooled_patches`` is ours (mask-pooled final-layer patch tokens instead of MaskCLIP), and so is
``TEST.CLIP_MASK_EXTENT image`` (CLIP reads the masks cropped to the image).

Training classes come from ``DATASETS.TRAIN[0]``'s metadata; at test time the
vocabulary is the evaluated dataset's (``set_vocabulary_from_dataset``), one given
to ``set_vocabulary``, or an input's ``vocabulary`` key.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from torch import nn

from ...checkpoint_safety import refuse_partial_loads
from ...config import check_config
from ...numerics import require_finite
from ...pretrained.clip import OpenCLIP
from ...pretrained.frozen import exclude_from_checkpoints
from ...vocabulary import classes_from_metadata, parse_vocabulary, split_synonyms
from ..heads import (
    DeformablePixelDecoder,
    HungarianMatcher,
    MaskedAttentionDecoder,
    SetCriterion,
    caption_grounding_loss,
)
from ..odise.classifier import OpenVocabClassifier, max_over_synonyms
from .open_vocab import OpenVocabularyMixin, thing_mask, vocabulary_args_from_config

logger = logging.getLogger(__name__)

_KEY = "MODEL.DIFFSEG.ODISE"


def _through_log(probs: torch.Tensor) -> torch.Tensor:
    """``softmax(log(p + 1e-8))``: the reference hands Mask2Former's inference ``log(p + 1e-8)`` of
    its ensembled (or caption-trained) probabilities, and that inference takes a softmax of it again.
    Equal to ``p`` up to ~1e-8, but computed as the reference computes it, so that exact ties among
    queries resolve the same way there and here."""
    return torch.log(probs + 1e-8).softmax(-1)


@META_ARCH_REGISTRY.register()
class ODISE(OpenVocabularyMixin, nn.Module):
    """The trained open-vocabulary panoptic segmenter (see the module docstring).

    Args:
        backbone: a backbone with ``res2..res5`` (normally ``DiffusionUNetBackbone``).
        pixel_decoder: multi-scale pixel decoder.
        decoder: masked-attention transformer decoder; its embeddings are CLIP-sized.
        classifier: open-vocabulary classifier of the decoder's embeddings.
        criterion: set criterion (its ``weight_dict`` weighs class, mask and dice losses).
        grounding_weight: weight of the caption-grounding loss (used when ``nouns`` is given).
        clip: frozen CLIP for text embeddings and the inference ensemble.
        pixel_mean, pixel_std: input normalisation (the backbone reads RGB in [-1, 1]).
        input_format: "RGB" or "BGR".
        train_classes: the training vocabulary (classes of ``DATASETS.TRAIN[0]``).
        vocabulary, thing_classes, stuff_classes: the test vocabulary at build time (or None) and
            which of its classes are things or stuff (see ``panoptic_roles``).
        semantic_on, panoptic_on, instance_on: which outputs inference returns.
        object_mask_threshold, overlap_threshold: panoptic segment filters.
        detections_per_image: instances kept per image.
        ensemble: ensemble with CLIP's classifier at inference.
        ensemble_alpha, ensemble_beta: CLIP's exponent for seen / novel classes.
        ensemble_clip: "maskclip" (the reference) or "pooled_patches" (ours).
        clip_mask_extent: what CLIP's side reads: "padded" (the reference: the masks over the
            padded batch, the image over its own extent, so the two are misaligned unless the image
            fills the padded size) or "image" (ours: the masks cropped to the image, at full
            resolution).
        ensemble_template: CLIP's prompt for the class synonyms on the ensemble's side.
        nouns: callable caption -> nouns for the grounding loss, or None (no grounding).
        grounding_template: prompt of each noun for the grounding loss.
        variant: "label" (the reference's label-trained model: class targets, bare class names) or
            "caption" (its caption-trained model: class-agnostic mask targets with a binary head,
            classes learned from the caption grounding alone, class names in ``grounding_template``).
    """

    # Read by tools/train_net.py: ODISE trains ...
    TRAINING_FREE = False
    # ... on inputs from the panoptic mapper (read by DiffSegTrainer).
    TRAIN_MAPPER = "panoptic"

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        decoder: nn.Module,
        classifier: Optional[OpenVocabClassifier] = None,
        criterion: nn.Module,
        grounding_weight: float = 0.0,
        clip: Optional[OpenCLIP] = None,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        train_classes: Sequence[str] = (),
        vocabulary: Optional[Sequence[str]] = None,
        thing_classes: Optional[Sequence[str]] = None,
        stuff_classes: Optional[Sequence[str]] = None,
        semantic_on: bool = True,
        panoptic_on: bool = True,
        instance_on: bool = True,
        object_mask_threshold: float = 0.0,
        overlap_threshold: float = 0.8,
        detections_per_image: int = 100,
        ensemble: bool = True,
        ensemble_alpha: float = 0.3,
        ensemble_beta: float = 0.7,
        ensemble_clip: str = "maskclip",
        clip_mask_extent: str = "padded",
        ensemble_template: str = "a photo of a {}.",
        nouns=None,
        grounding_template: str = "a photo of a {}.",
        variant: str = "label",
    ):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for ODISE, not {input_format!r}.")
        for name, value in (("ENSEMBLE_ALPHA", ensemble_alpha), ("ENSEMBLE_BETA", ensemble_beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{_KEY}.TEST.{name} must be in [0, 1], got {value}.")
        if variant not in ("label", "caption"):
            raise ValueError(f"{_KEY}.VARIANT must be 'label' or 'caption', not {variant!r}.")
        if variant == "caption" and (nouns is None or grounding_weight <= 0):
            raise ValueError(
                f"{_KEY}.VARIANT caption learns classes from captions only: set {_KEY}.LOSS.GROUNDING_WEIGHT > 0 "
                "(1.0 in the reference) and train on a dataset whose records have captions."
            )
        if variant == "caption" and getattr(decoder, "class_head", None) is None:
            raise ValueError(f"{_KEY}.VARIANT caption needs the decoder's class-agnostic head (class_agnostic=True).")
        if ensemble_clip not in ("maskclip", "pooled_patches"):
            raise ValueError(f"{_KEY}.TEST.ENSEMBLE_CLIP must be 'maskclip' or 'pooled_patches', not {ensemble_clip!r}.")
        for name, template in (("TEST.ENSEMBLE_TEMPLATE", ensemble_template), ("LOSS.GROUNDING_TEMPLATE", grounding_template)):
            if "{}" not in template:
                raise ValueError(f"{_KEY}.{name} must contain '{{}}', got {template!r}.")
        if clip is None:  # the captioner's, shared
            clip = getattr(backbone, "clip", None)
            if clip is None:
                raise ValueError("ODISE needs a CLIP model: give `clip`, or a backbone with the implicit captioner "
                                 "(whose CLIP it then shares).")
        if classifier is None:
            classifier = OpenVocabClassifier.for_clip(clip, decoder.embed_dim, no_object=variant == "label")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.classifier = classifier
        self.criterion = criterion
        self.grounding_weight = float(grounding_weight)
        self.clip = clip
        # The backbone's CLIP may be this same module; either way it is never checkpointed.
        exclude_from_checkpoints(self, ["clip"])
        refuse_partial_loads(self)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.input_format = input_format
        self.train_classes = parse_vocabulary(list(train_classes)) if train_classes else []
        # A class is "seen" when one of its synonyms IS a training synonym: exact strings, as the
        # reference compares them ("Person" is not "person").
        self._seen = {s for name in self.train_classes for s in split_synonyms(name)}
        self.semantic_on, self.panoptic_on, self.instance_on = semantic_on, panoptic_on, instance_on
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.detections_per_image = int(detections_per_image)
        self.ensemble, self.ensemble_alpha, self.ensemble_beta = ensemble, float(ensemble_alpha), float(ensemble_beta)
        self.ensemble_clip, self.ensemble_template = ensemble_clip, ensemble_template
        if clip_mask_extent not in ("padded", "image"):
            raise ValueError(f"{_KEY}.TEST.CLIP_MASK_EXTENT must be 'padded' or 'image', not {clip_mask_extent!r}.")
        self.clip_mask_extent = clip_mask_extent
        self.nouns, self.grounding_template = nouns, grounding_template
        self.variant = variant
        # The head's class prompts: bare names (label-trained) or the grounding prompt (caption-trained).
        self.head_template = "{}" if variant == "label" else grounding_template
        self._init_vocabulary(stuff_classes)
        if vocabulary:
            self.set_vocabulary(vocabulary, thing_classes)

    @classmethod
    def from_config(cls, cfg):
        check_config(cfg)
        o = cfg.MODEL.DIFFSEG.ODISE
        backbone = build_backbone(cfg)
        clip = getattr(backbone, "clip", None)
        if clip is None:
            clip = OpenCLIP.from_weights(cfg.MODEL.DIFFSEG.CLIP.WEIGHTS, cfg.MODEL.DIFFSEG.CLIP.TEMPLATES)
        h, loss = o.HEAD, o.LOSS
        pixel_decoder = DeformablePixelDecoder(
            input_shape=backbone.output_shape(),
            transformer_in_features=tuple(h.TRANSFORMER_IN_FEATURES),
            conv_dim=h.CONV_DIM,
            mask_dim=h.MASK_DIM,
            num_layers=h.ENCODER_LAYERS,
            num_heads=h.NUM_HEADS,
            ffn_dim=h.ENCODER_FFN_DIM,
        )
        decoder = MaskedAttentionDecoder(
            in_channels=h.CONV_DIM,
            hidden_dim=h.HIDDEN_DIM,
            num_queries=h.NUM_QUERIES,
            num_heads=h.NUM_HEADS,
            ffn_dim=h.DECODER_FFN_DIM,
            num_layers=h.DECODER_LAYERS,
            mask_dim=h.MASK_DIM,
            embed_dim=h.MASK_DIM,
            class_agnostic=o.VARIANT == "caption",
        )
        matcher = HungarianMatcher(
            cost_class=loss.CLASS_WEIGHT, cost_mask=loss.MASK_WEIGHT, cost_dice=loss.DICE_WEIGHT,
            num_points=loss.NUM_POINTS,
        )
        criterion = SetCriterion(
            matcher=matcher,
            weight_dict={"loss_ce": loss.CLASS_WEIGHT, "loss_mask": loss.MASK_WEIGHT, "loss_dice": loss.DICE_WEIGHT},
            eos_coef=loss.NO_OBJECT_WEIGHT,
            num_points=loss.NUM_POINTS,
            oversample_ratio=loss.OVERSAMPLE_RATIO,
            importance_sample_ratio=loss.IMPORTANCE_SAMPLE_RATIO,
            deep_supervision=loss.DEEP_SUPERVISION,
        )
        train_classes: List[str] = []
        if len(cfg.DATASETS.TRAIN):
            train_classes = classes_from_metadata(cfg.DATASETS.TRAIN[0])[0]
        nouns = None
        if loss.GROUNDING_WEIGHT > 0:
            from ...nouns import ListNouns  # the noun finder of FreeDA's bank builder too

            nouns = ListNouns.from_file(loss.GROUNDING_NOUNS) if loss.GROUNDING_NOUNS else ListNouns(
                [s.lower() for name in train_classes for s in split_synonyms(name)]
            )
        return dict(
            backbone=backbone,
            pixel_decoder=pixel_decoder,
            decoder=decoder,
            classifier=OpenVocabClassifier.for_clip(clip, h.MASK_DIM, no_object=o.VARIANT != "caption"),
            criterion=criterion,
            grounding_weight=loss.GROUNDING_WEIGHT,
            clip=clip,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            input_format=cfg.INPUT.FORMAT,
            train_classes=train_classes,
            **vocabulary_args_from_config(cfg),
            semantic_on=o.TEST.SEMANTIC_ON,
            panoptic_on=o.TEST.PANOPTIC_ON,
            instance_on=o.TEST.INSTANCE_ON,
            object_mask_threshold=o.TEST.OBJECT_MASK_THRESHOLD,
            overlap_threshold=o.TEST.OVERLAP_THRESHOLD,
            detections_per_image=o.TEST.DETECTIONS_PER_IMAGE,
            ensemble=o.TEST.ENSEMBLE,
            ensemble_alpha=o.TEST.ENSEMBLE_ALPHA,
            ensemble_beta=o.TEST.ENSEMBLE_BETA,
            ensemble_clip=o.TEST.ENSEMBLE_CLIP,
            clip_mask_extent=o.TEST.CLIP_MASK_EXTENT,
            ensemble_template=o.TEST.ENSEMBLE_TEMPLATE,
            nouns=nouns,
            grounding_template=loss.GROUNDING_TEMPLATE,
            variant=o.VARIANT,
        )

    # ------------------------------------------------------------------ vocabulary
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _text(self, names: Sequence[str], template: str = "{}") -> Tuple[torch.Tensor, torch.Tensor]:
        """CLIP embeddings (S, D), not normalised, of every synonym of ``names`` written into
        ``template`` (the head's are bare, as in the reference), and (S,) the class of each."""
        text, owner = self.clip.encode_class_synonyms(list(names), template)
        return text, owner.to(self.device)

    # ------------------------------------------------------------------ forward
    def _images(self, batched_inputs: List[Dict]) -> Tuple[ImageList, List[torch.Tensor]]:
        """Normalised, padded batch (B, 3, H', W') and the raw RGB images (3, H, W) in [0, 255]."""
        raw = []
        for x in batched_inputs:
            image = x["image"]
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"ODISE expects (3, H, W) images in INPUT.FORMAT, got {tuple(image.shape)}.")
            image = image.to(self.device, dtype=torch.float32)
            raw.append(image.flip(0) if self.input_format == "BGR" else image)
        div = int(self.backbone.size_divisibility) or 1
        H = -(-max(r.shape[-2] for r in raw) // div) * div
        W = -(-max(r.shape[-1] for r in raw) // div) * div
        # Padded with black (0 before normalisation), as the reference pads.
        padded = [F.pad(r, (0, W - r.shape[-1], 0, H - r.shape[-2])) for r in raw]
        batch = torch.stack([(p - self.pixel_mean) / self.pixel_std for p in padded])
        return ImageList(batch, [tuple(r.shape[-2:]) for r in raw]), raw

    def _predict(self, images: ImageList) -> Dict:
        features = self.backbone(images.tensor)
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.decoder(multi_scale, mask_features)

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 inputs: ``image`` (3, H, W) in INPUT.FORMAT, and in
                training ``instances`` (``gt_classes`` over the training classes, ``gt_masks``
                (N, H, W)) and optional ``captions``; at test time optional ``height``/``width``
                and ``vocabulary``.

        Returns:
            training: a dict of weighted losses. Inference: one dict per image with
            ``sem_seg`` (K, h, w) probabilities, ``panoptic_seg`` (ids (h, w), segments_info)
            and ``instances``, as switched on by ``MODEL.DIFFSEG.ODISE.TEST``.
        """
        images, raw = self._images(batched_inputs)
        if self.training:
            return self._losses(batched_inputs, images)
        return self._inference(batched_inputs, images, raw)

    # ------------------------------------------------------------------ training
    def _losses(self, batched_inputs: List[Dict], images: ImageList) -> Dict[str, torch.Tensor]:
        if not self.train_classes:
            raise ValueError(
                "ODISE needs training classes: set DATASETS.TRAIN to a registered dataset whose metadata "
                "has stuff_classes."
            )
        if any("instances" not in x for x in batched_inputs):
            raise ValueError(
                "ODISE trains on inputs with 'instances' (gt_classes, gt_masks): use a panoptic dataset "
                "and the panoptic mapper (DiffSegTrainer does this for ODISE)."
            )
        outputs = self._predict(images)
        text, owner = self._text(self.train_classes, self.head_template)
        K = len(self.train_classes)

        def classify(out):
            if self.variant == "caption":  # object vs no object only
                return {"pred_logits": out["pred_binary"], "pred_masks": out["pred_masks"]}
            return {"pred_logits": self.classifier(out["pred_embeds"], text, owner, K), "pred_masks": out["pred_masks"]}

        scored = classify(outputs)
        scored["aux_outputs"] = [classify(a) for a in outputs.get("aux_outputs", [])]
        H, W = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            masks = inst.gt_masks.tensor if isinstance(inst.gt_masks, BitMasks) else inst.gt_masks
            padded = masks.new_zeros((masks.shape[0], H, W))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            labels = inst.gt_classes.long()
            if labels.numel() and int(labels.max()) >= K:
                raise ValueError(f"gt class {int(labels.max())} is outside the {K} training classes.")
            if self.variant == "caption":
                labels = torch.zeros_like(labels)  # class-agnostic targets
            targets.append({"labels": labels, "masks": padded})
        losses = self.criterion.weighted(self.criterion(scored, targets))
        if self.nouns is not None and self.grounding_weight > 0:
            # On every decoder layer, as the class and mask losses (the reference).
            layers = [outputs["pred_embeds"]] + [a["pred_embeds"] for a in outputs.get("aux_outputs", [])]
            nouns = self._caption_nouns(batched_inputs, layers[0])
            for i, embeds in enumerate(layers):
                name = "loss_grounding" if i == 0 else f"loss_grounding_{i - 1}"
                grounding = caption_grounding_loss(F.normalize(embeds, dim=-1), nouns, self.classifier.scale())
                losses[name] = self.grounding_weight * grounding
        return losses

    def _caption_nouns(self, batched_inputs: List[Dict], embeds: torch.Tensor) -> List[torch.Tensor]:
        """Per image, the projected, L2-normalised embeddings (N_i, E) of the nouns of its captions."""
        per_image = [sorted({n for c in x.get("captions", []) for n in self.nouns(c)}) for x in batched_inputs]
        # One text-encoder call for the batch's nouns; each image takes its rows.
        batch_nouns = sorted({n for nouns in per_image for n in nouns})
        if not batch_nouns:
            return [embeds.new_zeros(0, embeds.shape[-1]) for _ in per_image]
        table = self.classifier.project_text(self.clip.encode_texts([self.grounding_template.format(n) for n in batch_nouns]))
        row = {n: i for i, n in enumerate(batch_nouns)}
        return [table[[row[n] for n in nouns]] if nouns else embeds.new_zeros(0, embeds.shape[-1]) for nouns in per_image]

    # ------------------------------------------------------------------ inference
    def _inference(self, batched_inputs: List[Dict], images: ImageList, raw: List[torch.Tensor]) -> List[Dict]:
        outputs = self._predict(images)
        results = []
        for i, x in enumerate(batched_inputs):
            names, roles = self._input_vocabulary(x)
            things = thing_mask(roles)  # ODISE's own panoptic inference: a class is a thing or not
            h, w = images.image_sizes[i]
            out_h, out_w = int(x.get("height", h)), int(x.get("width", w))
            masks = F.interpolate(
                outputs["pred_masks"][i : i + 1].float(), size=images.tensor.shape[-2:], mode="bilinear",
                align_corners=False,
            )[0]
            valid = masks[:, :h, :w]  # (Q, h, w) logits on the input image
            require_finite(valid, "ODISE's mask head (MODEL.WEIGHTS)")
            clip_image, clip_masks = self._clip_view(raw, i, outputs["pred_masks"][i], valid)
            probs = require_finite(
                self._class_probabilities(outputs["pred_embeds"][i], clip_masks, clip_image, names,
                                          outputs["pred_binary"][i] if "pred_binary" in outputs else None),
                "ODISE's classifier",
            )
            masks = sem_seg_postprocess(masks, (h, w), out_h, out_w)  # (Q, out_h, out_w) logits
            result = {}
            if self.semantic_on:
                result["sem_seg"] = torch.einsum("qk,qhw->khw", probs[:, :-1], masks.sigmoid())
            if self.panoptic_on:
                result["panoptic_seg"] = self._panoptic(probs, masks, things)
            if self.instance_on:
                result["instances"] = self._instances(probs, masks, things)
            results.append(result)
        return results

    def seen_classes(self, names: Sequence[str]) -> torch.Tensor:
        """(K,) bool: whether each class was seen in training (one of its synonyms is, as an exact
        string, a training class's synonym), which picks ENSEMBLE_ALPHA over ENSEMBLE_BETA."""
        return torch.tensor([any(s in self._seen for s in split_synonyms(n)) for n in names], dtype=torch.bool)

    def _clip_view(self, raw: List[torch.Tensor], i: int, low: torch.Tensor,
                   valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The image (3, h', w') in [0, 255] and mask logits (Q, h'', w'') that CLIP's side of the
        ensemble reads for image ``i`` of the batch (``TEST.CLIP_MASK_EXTENT``).

        "padded", the reference: the head's masks at their own resolution (H / 4, W / 4) over the
        whole padded batch, and the image padded with black only to the batch's largest image (its
        batch of images /255 is padded without size divisibility); CLIP resizes both to its input
        square, so unless the image fills the padded size the masks land shifted and stretched on it.
        "image", ours: ``valid``, the masks upsampled and cropped to the image exactly, and the image.
        """
        if self.clip_mask_extent == "image":
            return raw[i], valid
        h = max(r.shape[-2] for r in raw)
        w = max(r.shape[-1] for r in raw)
        return F.pad(raw[i], (0, w - raw[i].shape[-1], 0, h - raw[i].shape[-2])), low

    def _class_probabilities(
        self, embeds: torch.Tensor, masks: torch.Tensor, image: torch.Tensor, names: Sequence[str],
        binary: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(Q, K + 1) class probabilities of the queries, the last column "no object".

        With the ensemble (the reference's): ``p = p_head^(1 - a) p_clip^a`` renormalised over the
        K classes, times the head's foreground probability ``1 - p_void``; ``a`` is ENSEMBLE_ALPHA
        for classes seen in training and ENSEMBLE_BETA for the others. Computed in log space.

        Args:
            embeds: (Q, E) the decoder's embeddings of one image.
            masks: (Q, h', w') mask logits over the unpadded image (any resolution).
            image: (3, h, w) RGB in [0, 255].
            binary: (Q, 2) object / no-object logits of the caption-trained model (its "no object").
        """
        K = len(names)
        text, owner = self._text(names, self.head_template)
        logits = self.classifier(embeds[None], text, owner, K)[0]
        log_head = logits[:, :K].log_softmax(-1)
        if binary is not None:  # caption-trained: classes from the text, "no object" from the binary head
            void = binary.float().softmax(-1)[:, 1:]
            if not self.ensemble:
                return _through_log(torch.cat([log_head.exp() * (1 - void), void], dim=-1))
        else:
            probs = logits.softmax(-1)
            if not self.ensemble:
                return probs
            void = probs[:, K:]
        clip_text, clip_owner = self._text(names, self.ensemble_template)
        clip_text = F.normalize(clip_text, dim=-1)
        if self.ensemble_clip == "maskclip":
            regions = self.clip.encode_masked(image[None], masks[None])[0]  # (Q, D)
        else:  # ours: final-layer patch tokens averaged under the soft mask
            dense = self.clip.encode_dense(image[None])[0]  # (D, gh, gw)
            weights = F.interpolate(masks[None].sigmoid(), size=dense.shape[-2:], mode="bilinear", align_corners=False)[0]
            regions = torch.einsum("qhw,dhw->qd", weights, dense) / weights.sum((1, 2)).clamp(min=1e-6)[:, None]
        scale = self.clip.model.logit_scale.exp().float().clamp(max=100.0) if hasattr(self.clip.model, "logit_scale") else 100.0
        log_clip = max_over_synonyms(scale * F.normalize(regions, dim=-1) @ clip_text.T, clip_owner, K).log_softmax(-1)
        alpha = torch.where(self.seen_classes(names).to(logits.device), self.ensemble_alpha, self.ensemble_beta)
        mixed = ((1 - alpha) * log_head + alpha * log_clip).softmax(-1) * (1 - void)
        return _through_log(torch.cat([mixed, void], dim=-1))

    def _panoptic(self, probs: torch.Tensor, masks: torch.Tensor, things: Sequence[bool]):
        """Panoptic output: ids (h, w) int32 (0 = no segment) and segments_info (detectron2's format)."""
        K = probs.shape[-1] - 1
        scores, labels = probs.max(-1)
        keep = labels.ne(K) & (scores > self.object_mask_threshold)
        scores, labels, soft = scores[keep], labels[keep], masks[keep].sigmoid()
        ids = torch.zeros(masks.shape[-2:], dtype=torch.int32, device=masks.device)
        segments = []
        if soft.shape[0] == 0:
            return ids, segments
        owner = (scores[:, None, None] * soft).argmax(0)
        stuff_ids: Dict[int, int] = {}
        for k in range(soft.shape[0]):
            cls = int(labels[k])
            isthing = bool(things[cls])
            own = owner == k
            full = soft[k] >= 0.5
            # Mask2Former's overlap test: the query's whole share of the argmax over its own >= 0.5 mask.
            area, original, kept = int(own.sum()), int(full.sum()), int((own & full).sum())
            if area == 0 or original == 0 or kept == 0 or area / original < self.overlap_threshold:
                continue
            if not isthing and cls in stuff_ids:  # one segment per stuff class
                ids[own & full] = stuff_ids[cls]
                continue
            segment_id = len(segments) + 1
            if not isthing:
                stuff_ids[cls] = segment_id
            ids[own & full] = segment_id
            segments.append({"id": segment_id, "isthing": isthing, "category_id": cls})
        return ids, segments

    def _instances(self, probs: torch.Tensor, masks: torch.Tensor, things: Sequence[bool]) -> Instances:
        """Instance output (Mask2Former's): the top ``detections_per_image`` (query, class) pairs over
        all classes, then, when panoptic output is on, the pairs of stuff classes dropped; scored by
        class probability times mean mask probability inside the mask."""
        K = probs.shape[-1] - 1
        scores = probs[:, :K]
        k = min(self.detections_per_image, scores.numel())
        top, flat = scores.flatten().topk(k)
        queries, classes = flat // K, flat % K
        if self.panoptic_on:
            keep = torch.tensor(list(things), dtype=torch.bool, device=probs.device)[classes]
            top, queries, classes = top[keep], queries[keep], classes[keep]
        m = masks[queries]
        binary = m > 0
        quality = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        out = Instances(masks.shape[-2:])
        out.pred_masks = binary
        out.pred_boxes = BitMasks(binary).get_bounding_boxes() if len(binary) else Boxes(masks.new_zeros(0, 4))
        out.scores = top * quality
        out.pred_classes = classes
        return out
