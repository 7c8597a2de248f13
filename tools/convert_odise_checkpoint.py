#!/usr/bin/env python
"""Convert a released ODISE checkpoint (NVlabs/ODISE, e.g. odise_label_coco_50e) for MODEL.WEIGHTS.

    python tools/convert_odise_checkpoint.py --config-file configs/odise/Base-ODISE.yaml \
        odise_label_coco_50e-b67d2efc.pth output/odise_label_coco_50e.pth
    python tools/train_net.py --config-file configs/odise/Base-ODISE.yaml --eval-only \
        MODEL.WEIGHTS output/odise_label_coco_50e.pth

The model is built from the config (so its Stable Diffusion and CLIP weights must be reachable)
to learn its parameter names and shapes; the released file is read with
``torch.load(weights_only=True)`` (no unpickling of code), its trainable parameters are renamed
(``diffseg_d2.modeling.odise.released``: no shape is changed but the reference's extra leading
dimension of two known parameters, and no parameter may come from two released keys), checked
against the model (every parameter present, every shape equal) and saved as
``{"model": state_dict}``. The released model was trained with Stable Diffusion v1.3: set
``MODEL.DIFFSEG.SD.WEIGHTS CompVis/stable-diffusion-v1-3`` to evaluate it as released.
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config-file", required=True, help="the ODISE config the checkpoint will be used with")
    p.add_argument("released", help="the released .pth file")
    p.add_argument("output", help="where to write the converted .pth")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = p.parse_args(argv)

    import torch
    from detectron2.modeling import build_model

    from diffseg_d2 import get_diffseg_cfg
    from diffseg_d2.checkpoint_safety import require_fit
    from diffseg_d2.modeling.odise.released import ReleasedCheckpointError, convert_released_state_dict

    cfg = get_diffseg_cfg(args.config_file, args.opts + ["MODEL.WEIGHTS", ""])
    if cfg.MODEL.META_ARCHITECTURE != "ODISE":
        print(f"error: {args.config_file} builds {cfg.MODEL.META_ARCHITECTURE}, not ODISE.", file=sys.stderr)
        return 1
    try:
        loaded = torch.load(args.released, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal is reported the same way
        print(f"error: {args.released} cannot be read as weights only ({type(e).__name__}: {e}).", file=sys.stderr)
        return 1
    released = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(released, dict):
        print(f"error: {args.released} holds no state dict (expected a dict, or one under 'model').", file=sys.stderr)
        return 1
    model = build_model(cfg)
    ours = model.state_dict()
    try:
        converted = convert_released_state_dict(
            released, model.backbone.released_projection_order(),
            lambda key: tuple(ours[key].shape) if key in ours else None,
        )
        require_fit(model, converted.items())
    except (ReleasedCheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": converted}, args.output)
    print(f"wrote {args.output}: {len(converted)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
