#!/usr/bin/env python
"""Time and memory of the methods against the least their models must pay, and of FreeDA's retrieval.

    python tools/benchmark.py                                # every preset, markdown on stdout
    python tools/benchmark.py --preset tiny --write BENCHMARKS.md
    python tools/benchmark.py --preset retrieval --write BENCHMARKS.md
    python tools/benchmark.py --preset freeda-build --build-steps 3 --write BENCHMARKS.md

Presets, each measured by a module of tools/benchmarks/ (its docstring says what and how):

* ``tiny``, ``sd15`` (``diffsegmenter``): DiffSegmenter with 1, 5 and 20 classes against one VAE
  encode + one UNet pass, on the tiny presets or on SD 1.5's architecture with random weights;
* ``retrieval``: FreeDA's retrieval over random banks, for each faiss index kind and brute force;
* ``odise``: ODISE's backbone, inference and training step, with floating-point operation counts;
* ``freeda``: FreeDA's test time per stage, reference mode and ours;
* ``freeda-build`` (``freeda_build``): one caption of FreeDA's bank build per stage, extrapolated
  from ``--build-steps`` to the configured DDIM steps;
* ``sd3``, ``flux`` (``transformer_readout``): a diffusion transformer's pass plain, with our exact
  streamed attention read-out, and with the attention matrix materialised per block.

Every full-size model is the real architecture with random weights (the ``random:<architecture>``
weights presets), built by the normal config path: speed and memory do not depend on the weights,
so nothing is downloaded. Every configuration runs in its own process (this script, with
``--worker``), so that its peak memory is its own. The tables give the share of the CPUs that other
processes used while each configuration ran; on a shared machine ``--wait-quiet SECONDS`` waits for
them before each configuration. ``--write FILE`` replaces the preset's section of FILE, between its
``<!-- tools/benchmark.py <preset>: begin/end -->`` markers.
"""
import argparse
import json
import logging
import shlex
import sys
import time

# Run as `python tools/benchmark.py`, this file's folder is on sys.path: the package is tools/benchmarks/.
from benchmarks import diffsegmenter, freeda, freeda_build, harness, odise, retrieval, transformer_readout

logger = logging.getLogger("diffseg_d2.benchmark")

# preset -> the module that measures, runs and renders it
PRESETS = {
    "tiny": diffsegmenter,
    "sd15": diffsegmenter,
    "sd21": diffsegmenter,
    "sdxl": diffsegmenter,
    retrieval.PRESET: retrieval,
    odise.PRESET: odise,
    freeda.PRESET: freeda,
    freeda_build.PRESET: freeda_build,
    "sd3": transformer_readout,
    "flux": transformer_readout,
}


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        result = harness.run_worker(spec, PRESETS[spec["preset"]].measure)
        print(harness.RESULT_PREFIX + json.dumps(result), flush=True)
        return
    cmdline = shlex.join(["python", "tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    presets = tuple(PRESETS) if args.preset == "all" else (args.preset,)
    device = harness.resolve_device(args.device) if set(presets) - {retrieval.PRESET} else "cpu"
    start = time.perf_counter()
    for preset in presets:
        module = PRESETS[preset]
        section = module.render(module.run(preset, args, device), cmdline)
        print(section, flush=True)
        if args.write:
            harness.write_section(args.write, preset, section)
    logger.info("benchmark done in %.1f min", (time.perf_counter() - start) / 60)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark DiffSegmenter against one VAE encode + one UNet pass, "
                                "ODISE and FreeDA, and FreeDA's retrieval (--preset retrieval).")
    p.add_argument("--preset", choices=tuple(PRESETS) + ("all",), default="all")
    defaults = ", ".join(f"{name} {module.DEFAULT_REPEATS}" for name, module in PRESETS.items())
    p.add_argument("--repeats", type=int, help="timed calls per configuration, after one warm-up; "
                   f"{freeda_build.PRESET}: captions, no warm-up (default: {defaults})")
    p.add_argument("--classes", default="1,5,20", help="comma-separated numbers of VOC classes (at most 20)")
    p.add_argument("--no-per-class", action="store_true", help="skip the reference-mode (per_class) rows")
    p.add_argument("--no-captions", action="store_true", help="skip the reference-mode rows with BLIP captions (sd15)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="MODEL.DIFFSEG.SD.DTYPE (half precision applies on CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="torch (and faiss) threads (0: the cores this process may use)")
    p.add_argument("--budget-min", type=float, default=25.0,
                   help="wall-time budget per preset: repeats are lowered, slowest configuration first, to fit "
                   f"({retrieval.PRESET}: an index whose extrapolated build time exceeds what is left is skipped)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each configuration, wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--write", metavar="FILE", help="also update this preset's section in FILE (e.g. BENCHMARKS.md)")
    r = p.add_argument_group(f"{retrieval.PRESET} preset (FreeDA retrieval, always on CPU)")
    r.add_argument("--bank-sizes", default="10000,100000,1000000", help="comma-separated numbers of random keys")
    r.add_argument("--ef-construction", default="200,40",
                   help=f"HNSW efConstruction values (M = {retrieval.HNSW_M}), one index each")
    r.add_argument("--ef-search", default="512,1024", help=f"HNSW efSearch values (raised to at least k = "
                   f"{retrieval.RETRIEVAL_TOP_K} by set_search_breadth)")
    r.add_argument("--nprobe", default="16,64,256", help="IVF nprobe values (nlist: build_index's default)")
    b = p.add_argument_group(f"{freeda_build.PRESET} preset (FreeDA bank build, one caption per stage)")
    b.add_argument("--build-steps", type=int, metavar="N",
                   help="DDIM steps per caption (default: the config's BUILD.STEPS, 50 for the reference); "
                   "fewer steps are extrapolated to the config's, and the table says so")
    b.add_argument("--build-models", choices=tuple(freeda_build.BUILD_MODELS), default="reference",
                   help="reference: SD 1.5, DINOv2 ViT-L/14 and CLIP ViT-L/14 architectures with random weights "
                   "and configs/freeda/Base-FreeDA.yaml's build settings; tiny: configs/tiny/freeda.yaml (seconds)")
    t = p.add_argument_group("sd3 / flux presets (attention read-outs of a diffusion transformer)")
    t.add_argument("--transformer-blocks", metavar="N[,M]",
                   help="blocks to build: sd3 = joint blocks (default 6 of 24); flux = double-stream,single-stream "
                   "(default 2,2 of 19,38)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one configuration
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.build_steps is not None and args.build_steps < 1:
        p.error("--build-steps must be at least 1")

    def int_list(option: str, low: int, high: float = float("inf")) -> list:
        text = getattr(args, option.lstrip("-").replace("-", "_"))
        try:
            values = sorted({int(v) for v in text.split(",") if v.strip()})
        except ValueError:
            p.error(f"{option} must be comma-separated integers, got {text!r}")
        if not values or min(values) < low or max(values) > high:
            p.error(f"{option} must name integers from {low}" + (f" to {high}" if high < float("inf") else ""))
        return values

    args.classes = int_list("--classes", 1, 20)  # the VOC vocabulary
    if args.transformer_blocks:
        try:
            args.transformer_blocks = tuple(int(v) for v in args.transformer_blocks.split(","))
        except ValueError:
            p.error(f"--transformer-blocks must be comma-separated integers, got {args.transformer_blocks!r}")
        if min(args.transformer_blocks) < 1:
            p.error("--transformer-blocks must be at least 1")
    args.bank_sizes = int_list("--bank-sizes", retrieval.RETRIEVAL_TOP_K)
    args.ef_construction = int_list("--ef-construction", 1)
    args.ef_search = int_list("--ef-search", 1)
    args.nprobe = int_list("--nprobe", 1)
    return args


if __name__ == "__main__":
    main()
