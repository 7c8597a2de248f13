"""ODISE's own trainable parts: the implicit captioner, the open-vocabulary classifier, and the
mapping of the authors' released checkpoints onto ours. The backbone is
``modeling.backbone.diffusion_unet``, the Mask2Former head ``modeling.heads``, the meta
architecture ``modeling.meta_arch.odise``."""
