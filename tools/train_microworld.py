#!/usr/bin/env python
"""Train the micro-world models on CPU (see diffseg_d2/microworld/).

    python tools/train_microworld.py diffusion --output diffseg_d2/microworld/weights/diffusion
    python tools/train_microworld.py diffusion --output /tmp/plain --align-weight 0     # without the auxiliary signal
    python tools/train_microworld.py diffusion --output /tmp/quick --vae-steps 20 --steps 20   # a quick check
    python tools/train_microworld.py --threads 1 transformer --output diffseg_d2/microworld/weights/diffusion_sd3
    python tools/train_microworld.py --threads 1 transformer --output diffseg_d2/microworld/weights/diffusion_sd3_plain --align-weight 0
    python tools/train_microworld.py --threads 1 clip  --output diffseg_d2/microworld/weights/clip
    python tools/train_microworld.py --threads 1 dense --output diffseg_d2/microworld/weights/dense

Interrupted runs continue with --resume. The weights are deterministic given the seed and the
thread count (--threads).
"""
import argparse
import logging
import shlex
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="model", required=True)
    d = sub.add_parser("diffusion", help="text-to-image diffusion model (VAE, UNet, text encoder)")
    d.add_argument("--output", required=True, help="folder of the diffusers pipeline to write")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--vae-steps", type=int, default=None)
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--batch", type=int, default=None)
    d.add_argument("--align-weight", type=float, default=None,
                   help="weight of the cross-attention/object-mask alignment loss (0 = denoising loss only)")
    d.add_argument("--resume", action="store_true", help="continue from <output>/train_state.pt")
    t = sub.add_parser("transformer", help="text-to-image diffusion transformer (SD3 family; reuses the micro VAE)")
    t.add_argument("--output", required=True, help="folder of the diffusers pipeline to write")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch", type=int, default=None)
    t.add_argument("--align-weight", type=float, default=None,
                   help="weight of the joint-attention/object-mask alignment loss (0 = flow-matching loss only)")
    t.add_argument("--resume", action="store_true", help="continue from <output>/train_state.pt")
    for name, what in (("clip", "micro CLIP (image and text towers), contrastive on scenes and captions"),
                       ("dense", "dense image encoder standing in for DINOv2 (timm ViT)")):
        m = sub.add_parser(name, help=what)
        m.add_argument("--output", required=True, help="folder to write (loaded with MODEL.DIFFSEG.*.WEIGHTS)")
        m.add_argument("--seed", type=int, default=0)
        m.add_argument("--steps", type=int, default=None)
        m.add_argument("--resume", action="store_true", help="continue from <output>/train_state.pt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = the cores this process may use)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    import os

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    command = shlex.join(["python", "tools/train_microworld.py", *(sys.argv[1:] if argv is None else argv)])
    if args.model == "diffusion":
        from diffseg_d2.microworld.train_diffusion import DiffusionTrainingSettings, train_micro_diffusion

        settings = DiffusionTrainingSettings(seed=args.seed)
        for key in ("vae_steps", "steps", "batch", "align_weight"):
            if getattr(args, key) is not None:
                setattr(settings, key, getattr(args, key))
        out = train_micro_diffusion(args.output, settings, resume=args.resume, command=command)
    elif args.model == "transformer":
        from diffseg_d2.microworld.train_transformer import TransformerTrainingSettings, train_micro_transformer

        settings = TransformerTrainingSettings(seed=args.seed)
        for key in ("steps", "batch", "align_weight"):
            if getattr(args, key) is not None:
                setattr(settings, key, getattr(args, key))
        out = train_micro_transformer(args.output, settings, resume=args.resume, command=command)
    elif args.model == "clip":
        from diffseg_d2.microworld.train_clip import ClipTrainingSettings, train_micro_clip

        settings = ClipTrainingSettings(seed=args.seed)
        if args.steps is not None:
            settings.steps = args.steps
        out = train_micro_clip(args.output, settings, resume=args.resume, command=command)
    else:
        from diffseg_d2.microworld.train_dense import DenseTrainingSettings, train_micro_dense

        settings = DenseTrainingSettings(seed=args.seed)
        if args.steps is not None:
            settings.steps = args.steps
        out = train_micro_dense(args.output, settings, resume=args.resume, command=command)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
