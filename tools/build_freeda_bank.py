#!/usr/bin/env python
"""Build FreeDA's prototype bank from captions (the offline stage).

    python tools/build_freeda_bank.py --config-file configs/tiny/freeda.yaml \
        --captions configs/tiny/freeda_captions.txt --output output/tiny_freeda/bank
    python tools/build_freeda_bank.py --config-file configs/freeda/Base-FreeDA.yaml \
        --captions captions_train2017.json --output banks/freeda_coco_sd15 --num-gpus 8 MODEL.DEVICE cuda

An interrupted build continues with --resume (finished shards are kept). With
--num-gpus N, N processes split the shards and the first merges them.
"""
import argparse
import logging
import sys

import diffseg_d2  # noqa: F401, I001  (first: it silences fvcore's torch.jit deprecation warning)
import torch
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.freeda import BankError, CaptionsError, read_captions

logger = logging.getLogger("diffseg_d2.build_freeda_bank")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="a FreeDA config: its MODEL.DIFFSEG.FREEDA.BUILD settings and the SD, CLIP and DINOv2 weights")
    parser.add_argument("--captions", required=True, help="captions: a text file (one per line) or COCO captions JSON")
    parser.add_argument("--output", required=True, help="bank folder to create (or to continue with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted build in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (one GPU each) that split the captions")
    parser.add_argument("--num-machines", type=int, default=1, help="machines taking part (detectron2's launch)")
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank among them")
    parser.add_argument("--dist-url", default="auto", help="rendezvous URL of the processes (detectron2's launch)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.DEVICE cuda MODEL.DIFFSEG.FREEDA.BUILD.STEPS 25")
    return parser.parse_args(argv)


def main(args) -> None:
    from diffseg_d2.freeda.builder import PrototypeBankBuilder, build_bank

    setup_logger(name="diffseg_d2", distributed_rank=comm.get_rank())
    setup_logger(name="detectron2", distributed_rank=comm.get_rank())
    cfg = get_diffseg_cfg(args.config_file, args.opts)
    cfg.freeze()
    # Input errors first, before any model loads.
    captions = read_captions(args.captions)
    builder = PrototypeBankBuilder.from_config(cfg)
    device = torch.device(cfg.MODEL.DEVICE)
    if device.type == "cuda" and comm.get_world_size() > 1:
        device = torch.device("cuda", comm.get_local_rank())
    builder.to(device)
    b = cfg.MODEL.DIFFSEG.FREEDA.BUILD
    index_settings = dict(kind=b.INDEX, exact_up_to=b.EXACT_UP_TO, hnsw_m=b.HNSW_M,
                          hnsw_ef_construction=b.HNSW_EF_CONSTRUCTION, ivf_nlist=b.IVF_NLIST)
    manifest = build_bank(builder, captions, args.output, resume=args.resume, index_settings=index_settings,
                          show_progress=not args.no_progress)
    if comm.is_main_process() and manifest is not None:
        c = manifest["counts"]
        print(
            f"Bank ready in {args.output}: {c['prototypes']} prototypes from {c['captions']} captions "
            f"({c['captions_without_nouns']} caption(s) without nouns skipped, {c['nouns_skipped']} noun(s) without a mask "
            f"skipped), {manifest['index']['type']} index.\nUse it with MODEL.DIFFSEG.FREEDA.BANK {args.output}",
            flush=True,
        )


def check_processes(args) -> None:
    """Refuse, in one line and before any process starts, a device or a number of GPUs this machine lacks.
    On the CPU, --num-gpus N starts N CPU processes (joined by gloo), as detectron2's launch does."""
    from diffseg_d2.config import check_device

    device = get_diffseg_cfg(args.config_file, args.opts).MODEL.DEVICE
    check_device(device)
    if args.num_gpus > 1 and torch.device(device).type == "cuda" and args.num_gpus > torch.cuda.device_count():
        have = torch.cuda.device_count()
        raise ValueError(f"--num-gpus {args.num_gpus} starts one process per GPU, but this machine has {have} CUDA "
                         f"device(s); use --num-gpus {have} (or MODEL.DEVICE cpu for CPU processes).")


def cli(argv=None) -> int:
    from diffseg_d2.freeda.builder import check_output_folder

    args = parse_args(argv)
    try:
        # Checked here too, so that with several processes the error is this message, not a
        # traceback from a child process.
        read_captions(args.captions)
        check_output_folder(args.output)
        check_processes(args)
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except (BankError, CaptionsError, FileNotFoundError, LookupError, ValueError) as e:
        print(f"build_freeda_bank: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
