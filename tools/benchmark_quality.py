#!/usr/bin/env python
"""Segmentation quality on held-out micro-world scenes, with the micro models trained by the project.

    python tools/benchmark_quality.py                          # the table on stdout
    python tools/benchmark_quality.py --write BENCHMARKS.md    # and into its section of BENCHMARKS.md
    python tools/benchmark_quality.py --count 50 --rows DAAM   # a quick look: fewer scenes, some rows
    python tools/benchmark_quality.py --split test             # the test split instead of val
    python tools/benchmark_quality.py --rows "reference mode (the paper" "transformer" \
        --section transformer --write BENCHMARKS.md              # some rows, in a section of their own
    python tools/benchmark_quality.py --objects-only --rows FreeDA  # background pixels ignored, as VOC20
    python tools/benchmark_quality.py --split train --count 100 --rows FreeDA \
        --opts MODEL.DIFFSEG.BACKGROUND_THRESHOLD 0.3          # choosing a setting: on train scenes only

Every method row runs ``tools/train_net.py --eval-only`` in its own process on the
evaluated datasets (detectron2's ``SemSegEvaluator``: mIoU; ``COCOPanopticEvaluator``:
PQ); the trivial baselines (all background, a uniformly random class per pixel) go
through the same evaluator in this process. Every setting was fixed before the
held-out splits were looked at: the configs name them, this tool only switches the
parts being measured on and off.

Each mIoU comes with a 95 % bootstrap interval over scenes (1000 resamples of the
evaluated scenes with replacement, from the per-scene confusion matrices that
``TEST.PER_IMAGE_CONFUSION`` writes). Each departure row is also compared with its
reference-mode row on the same resamples (a paired bootstrap): the difference and its
interval, marked ``*`` when the interval excludes zero. Choose settings on train
scenes; run val while working and test only for the final table.

Two rows need something built first, from TRAIN scenes only, which this tool does
when it is missing (and continues when it was interrupted):

* FreeDA: the prototype bank (``tools/make_microworld.py --captions``, then
  ``tools/build_freeda_bank.py``) in ``output/micro_freeda/``: 17 min (2026-12-01, on one thread
  while three other jobs shared the two cores);
* ODISE: the head trained on the panoptic train split (``tools/train_net.py``) in
  ``output/micro_odise/``: 32 min (the same day, one thread, beside the bank build);
  the row without the VAE decoder taps trains its own head in ``output/micro_odise_no_vae_decoder/``.

Delete those folders to rebuild them after a change of their configs.
"""
import argparse
import datetime
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MICRO = os.path.join(ROOT, "configs", "micro")
DIFFSEGMENTER = os.path.join(MICRO, "diffsegmenter.yaml")
DIFFSEGMENTER_SD3 = os.path.join(MICRO, "diffsegmenter_sd3.yaml")
SECTION = "tools/benchmark_quality.py microworld"
FREEDA = os.path.join(MICRO, "freeda.yaml")
FREEDA_OURS_ALL = [
    "MODEL.DIFFSEG.FREEDA.PIPELINE", "whole", "MODEL.DIFFSEG.FREEDA.QUERY", "token",
    "MODEL.DIFFSEG.FREEDA.QUERY_TEMPLATES", "['a photo of a {}.', 'a photo of the {}.', 'there is a {} in the scene.']",
    "MODEL.DIFFSEG.FREEDA.LOCAL_SIGMOID", "False", "MODEL.DIFFSEG.FREEDA.MIN_KEY_SIMILARITY", "0.5",
]
# Every departure of ours from the reference at once (the package's default before reference mode,
# which had the category filter too; the filter is part of reference mode now).
OURS_ALL = [
    "MODEL.DIFFSEG.CONDITIONING", "shared", "MODEL.DIFFSEG.VAE_LATENT", "mean",
    "MODEL.DIFFSEG.TOKEN_SELECTION", "mean", "MODEL.DIFFSEG.CLASS_TOKEN_WEIGHT", "1.0",
    "MODEL.DIFFSEG.ING_RULE", "False", "MODEL.DIFFSEG.RESIZE_ANTIALIAS", "True",
]
PLAIN_WEIGHTS = os.path.join(ROOT, "diffseg_d2", "microworld", "weights", "diffusion_plain")
# Built from train scenes when missing; the configs' own output folders, so that following a
# config's comment and running this tool share them.
FREEDA_DIR = os.path.join(ROOT, "output", "micro_freeda")
FREEDA_CAPTIONS = 600
ODISE_DIR = os.path.join(ROOT, "output", "micro_odise")


def semseg_datasets(split: str, objects_only: bool = False) -> List[str]:
    """The semantic datasets of a split; ``objects_only``: their variants without a background class
    (its pixels ignored, as VOC20 and the benchmarks of FreeDA's paper)."""
    suffix = "_objects" if objects_only else ""
    return [f"diffseg_microworld_shapes{suffix}_{split}", f"diffseg_microworld_colourshapes{suffix}_{split}"]


def panoptic_dataset(split: str) -> str:
    return f"diffseg_microworld_panoptic_{split}"


def _run(cmd: Sequence[str], env) -> subprocess.CompletedProcess:
    logger.info("$ %s", shlex.join(cmd))
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=ROOT, env=env)


def _failure(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def freeda_bank(env) -> List[str]:
    """The micro FreeDA bank (built when missing): the opts that point the config at it."""
    bank = os.path.join(FREEDA_DIR, "bank")
    if not os.path.exists(os.path.join(bank, "manifest.json")):
        captions = os.path.join(FREEDA_DIR, "captions.txt")
        tools = os.path.join(ROOT, "tools")
        for cmd in (
            [sys.executable, os.path.join(tools, "make_microworld.py"), "--splits", "--count", str(FREEDA_CAPTIONS),
             "--captions", captions],
            [sys.executable, os.path.join(tools, "build_freeda_bank.py"), "--config-file",
             os.path.join(MICRO, "freeda.yaml"), "--captions", captions, "--output", bank, "--no-progress",
             *(["--resume"] if os.path.isdir(bank) else [])],
        ):
            proc = _run(cmd, env)
            if proc.returncode != 0:
                raise RuntimeError(f"building the FreeDA bank failed: {_failure(proc)}")
    return ["MODEL.DIFFSEG.FREEDA.BANK", bank]


def odise_checkpoint_in(folder: str, train_opts: Sequence[str] = ()) -> Callable:
    """A ``prepare`` for ODISE rows: the micro ODISE trained in ``folder`` with ``train_opts`` (when
    missing; continued when interrupted), returning the opts that load it and repeat ``train_opts``."""
    def prepare(env) -> List[str]:
        final = os.path.join(folder, "model_final.pth")
        if not os.path.exists(final):
            cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file",
                   os.path.join(MICRO, "odise.yaml"), "OUTPUT_DIR", folder, *train_opts]
            if os.path.exists(os.path.join(folder, "last_checkpoint")):
                cmd.insert(2, "--resume")
            # Trained on the whole train split, whatever scene count this run evaluates.
            env = {k: v for k, v in env.items() if k != "DIFFSEG_D2_MICROWORLD_COUNT"}
            proc = _run(cmd, env)
            if proc.returncode != 0 or not os.path.exists(final):
                raise RuntimeError(f"training the micro ODISE in {folder} failed: {_failure(proc)}")
        return ["MODEL.WEIGHTS", final, *train_opts]
    return prepare


odise_checkpoint = odise_checkpoint_in(ODISE_DIR)
# The backbone without the reference's VAE decoder taps (with them it costs 1.35x plain's operations on
# SD 1.5, see BENCHMARKS.md): a head of its own, trained on the same split and schedule.
NO_DECODER = ["MODEL.DIFFSEG.ODISE.BACKBONE.VAE_DECODER_BLOCKS", "[]"]
odise_no_decoder_checkpoint = odise_checkpoint_in(os.path.join(ROOT, "output", "micro_odise_no_vae_decoder"), NO_DECODER)


class Row(NamedTuple):
    label: str
    config: str
    opts: List[str]
    # Builds what the row needs (from train scenes) and returns opts that point at it.
    prepare: Optional[Callable] = None
    # Also evaluated on the panoptic split (PQ).
    panoptic: bool = False
    # Label of the reference-mode row this row departs from (its difference gets an interval).
    against: Optional[str] = None


DIFFSEG_REF = ("DiffSegmenter, reference mode (the paper configs' computation: only the classes the micro CLIP "
               "filter keeps are prompted; no captioner)")
FREEDA_REF = (f"FreeDA, reference mode (bank: {FREEDA_CAPTIONS} train captions, micro diffusion + dense encoder "
              "+ CLIP)")
DIFFSEG_SD3_REF = ("DiffSegmenter, reference mode, micro diffusion TRANSFORMER (SD3 family, joint-attention "
                   "read-outs; blocks and step chosen on train scenes)")
ODISE_REF = "ODISE, reference mode (head trained on the panoptic train split; colour-shapes are open-vocabulary)"


# Rows whose weights are missing are reported as failed, not skipped silently.
ROWS = [
    Row("DAAM baseline (DAAM's aggregation, same micro diffusion model)", os.path.join(MICRO, "daam.yaml"), [],
        panoptic=True, against=DIFFSEG_REF),
    # The training-free methods' PQ: their panoptic_seg made from the semantic argmax (things split
    # into connected regions), a step of ours; on the reference rows only.
    Row(DIFFSEG_REF, DIFFSEGMENTER, [], panoptic=True),
    Row("DiffSegmenter, reference mode, cross-attention only (no refinement)", DIFFSEGMENTER,
        ["MODEL.DIFFSEG.REFINE", "False"], against=DIFFSEG_REF),
    # Our departures, one at a time against reference mode.
    Row("DiffSegmenter, ours: shared pass for all classes", DIFFSEGMENTER, ["MODEL.DIFFSEG.CONDITIONING", "shared"],
        against=DIFFSEG_REF),
    Row("DiffSegmenter, ours: refinement averaged over the class passes", DIFFSEGMENTER,
        ["MODEL.DIFFSEG.REFINEMENT", "averaged"], against=DIFFSEG_REF),
    Row("DiffSegmenter, ours: VAE posterior mean", DIFFSEGMENTER, ["MODEL.DIFFSEG.VAE_LATENT", "mean"],
        against=DIFFSEG_REF),
    Row("DiffSegmenter, ours: mean over the class name's tokens", DIFFSEGMENTER,
        ["MODEL.DIFFSEG.TOKEN_SELECTION", "mean"], against=DIFFSEG_REF),
    Row("DiffSegmenter, ours: no ++ weighting of the class word", DIFFSEGMENTER,
        ["MODEL.DIFFSEG.CLASS_TOKEN_WEIGHT", "1.0"], against=DIFFSEG_REF),
    Row("DiffSegmenter, ours: antialiased resize", DIFFSEGMENTER, ["MODEL.DIFFSEG.RESIZE_ANTIALIAS", "True"],
        against=DIFFSEG_REF),
    Row("DiffSegmenter, without the category filter (every class of the vocabulary prompted)", DIFFSEGMENTER,
        ["MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False"], against=DIFFSEG_REF),
    Row("DiffSegmenter, ours: all of the above at once (the former default, which also filtered)", DIFFSEGMENTER,
        OURS_ALL, against=DIFFSEG_REF),
    Row("DiffSegmenter, reference mode, model trained WITHOUT the alignment loss", DIFFSEGMENTER,
        ["MODEL.DIFFSEG.SD.WEIGHTS", PLAIN_WEIGHTS], against=DIFFSEG_REF),
    # The same method on the micro diffusion transformer (configs/micro/diffsegmenter_sd3.yaml).
    Row(DIFFSEG_SD3_REF, DIFFSEGMENTER_SD3, [], panoptic=True, against=DIFFSEG_REF),
    Row("DiffSegmenter, micro transformer, joint attention only (no refinement)", DIFFSEGMENTER_SD3,
        ["MODEL.DIFFSEG.REFINE", "False"], against=DIFFSEG_SD3_REF),
    Row("DiffSegmenter, micro transformer, the class word's T5 tokens instead of its CLIP tokens", DIFFSEGMENTER_SD3,
        ["MODEL.DIFFSEG.TRANSFORMER.TEXT_SEGMENT", "t5"], against=DIFFSEG_SD3_REF),
    Row("DiffSegmenter, micro transformer, text-to-image direction (the class tokens' queries on the image keys)",
        DIFFSEGMENTER_SD3, ["MODEL.DIFFSEG.TRANSFORMER.DIRECTION", "text_to_image"], against=DIFFSEG_SD3_REF),
    Row("DiffSegmenter, micro transformer trained WITHOUT the alignment loss", DIFFSEGMENTER_SD3,
        ["MODEL.DIFFSEG.SD.WEIGHTS", "micro-sd3-plain"], against=DIFFSEG_SD3_REF),
    Row(FREEDA_REF, FREEDA, [], prepare=freeda_bank, panoptic=True),
    # Our departures, one at a time against reference mode.
    Row("FreeDA, ours: whole-image pipeline", FREEDA, ["MODEL.DIFFSEG.FREEDA.PIPELINE", "whole"], prepare=freeda_bank,
        against=FREEDA_REF),
    Row("FreeDA, ours: exact superpixel pooling", FREEDA, ["MODEL.DIFFSEG.FREEDA.POOLING", "exact"],
        prepare=freeda_bank, against=FREEDA_REF),
    Row("FreeDA, ours: class-word token queries", FREEDA, ["MODEL.DIFFSEG.FREEDA.QUERY", "token"], prepare=freeda_bank,
        against=FREEDA_REF),
    Row("FreeDA, ours: cosine local score (no sigmoid)", FREEDA, ["MODEL.DIFFSEG.FREEDA.LOCAL_SIGMOID", "False"],
        prepare=freeda_bank, against=FREEDA_REF),
    Row("FreeDA, ours: global score alone for classes with no key above 0.5", FREEDA,
        ["MODEL.DIFFSEG.FREEDA.MIN_KEY_SIMILARITY", "0.5"], prepare=freeda_bank, against=FREEDA_REF),
    Row("FreeDA, ours: all of the above (the former default)", FREEDA, FREEDA_OURS_ALL, prepare=freeda_bank,
        against=FREEDA_REF),
    Row(ODISE_REF, os.path.join(MICRO, "odise.yaml"), [], prepare=odise_checkpoint, panoptic=True),
    # Our departures at inference, on the same trained head.
    Row("ODISE, ours: ensemble with mask-pooled CLIP patch tokens instead of MaskCLIP", os.path.join(MICRO, "odise.yaml"),
        ["MODEL.DIFFSEG.ODISE.TEST.ENSEMBLE_CLIP", "pooled_patches"], prepare=odise_checkpoint, panoptic=True,
        against=ODISE_REF),
    Row("ODISE, ours: CLIP reads the masks cropped to the image at full resolution", os.path.join(MICRO, "odise.yaml"),
        ["MODEL.DIFFSEG.ODISE.TEST.CLIP_MASK_EXTENT", "image"], prepare=odise_checkpoint, panoptic=True,
        against=ODISE_REF),
    Row("ODISE, the head alone (no CLIP ensemble)", os.path.join(MICRO, "odise.yaml"),
        ["MODEL.DIFFSEG.ODISE.TEST.ENSEMBLE", "False"], prepare=odise_checkpoint, panoptic=True,
        against=ODISE_REF),
    Row("ODISE, ours: no VAE decoder taps (head trained without them)", os.path.join(MICRO, "odise.yaml"), [],
        prepare=odise_no_decoder_checkpoint, panoptic=True, against=ODISE_REF),
]

logger = logging.getLogger("diffseg_d2.benchmark_quality")


def read_metric(stdout: str, dataset: str, task: str, metric: str) -> Optional[float]:
    """A value of train_net's results table (``<dataset> [<task>]`` then ``| <metric> | value |``).

    The evaluators' own .pth files hold pickled numpy scalars, which are not loaded here.
    """
    block = stdout.split(f"{dataset} [{task}]", 1)
    if len(block) != 2:
        return None
    for line in block[1].lstrip("\n").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] == metric:
            return float(cells[1])
        if not line.strip():
            break
    return None


def per_image_confusion(folder: str):
    """The (N, K+1, K+1) per-scene confusion matrices an evaluator wrote into ``folder``, ordered by file name."""
    import numpy as np

    from diffseg_d2.evaluation.bootstrap import PER_IMAGE_FILE, load_per_image_confusion

    names, confusion = load_per_image_confusion(os.path.join(folder, PER_IMAGE_FILE))
    order = np.argsort(names)
    return names[order], confusion[order]


def run_row(row: Row, datasets: Sequence[str], panoptic: Optional[str], env) -> dict:
    """{column: value} of one row through tools/train_net.py --eval-only (or {"error": why}).

    ``result["per_image"][dataset]`` holds the (file names, per-scene confusion matrices).
    """
    try:
        opts = row.prepare(env) if row.prepare else []
    except RuntimeError as e:
        return {"error": str(e)}
    evaluated = list(datasets) + ([panoptic] if row.panoptic and panoptic else [])
    with tempfile.TemporaryDirectory(prefix="quality-") as out:
        cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", row.config, "--eval-only",
               "DATASETS.TEST", "(" + "".join(f"'{d}'," for d in evaluated) + ")", "OUTPUT_DIR", out,
               "TEST.PER_IMAGE_CONFUSION", "True", *row.opts, *opts]
        proc = _run(cmd, env)
        if proc.returncode != 0:
            return {"error": _failure(proc)}
        results: Dict = {"per_image": {}}
        for d in datasets:
            results[d] = read_metric(proc.stdout, d, "sem_seg", "mIoU")
            if results[d] is None:
                return {"error": f"no mIoU for {d} in train_net's output"}
            results["per_image"][d] = per_image_confusion(os.path.join(out, "inference", d))
    if row.panoptic and panoptic:
        results["PQ"] = read_metric(proc.stdout, panoptic, "panoptic_seg", "PQ")
        if results["PQ"] is None:
            return {"error": f"no PQ for {panoptic} in train_net's output"}
    return results


def trivial_baselines(datasets, seed: int = 0) -> dict:
    """mIoU of "all background" (all the first class) and "uniform random class" predictions
    through SemSegEvaluator."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from diffseg_d2.evaluation import build_evaluator

    first = MetadataCatalog.get(datasets[0]).stuff_classes[0]
    out = {f"all {first}": {"per_image": {}}, "random class per pixel": {"per_image": {}}}
    for d in datasets:
        records = DatasetCatalog.get(d)
        k = len(MetadataCatalog.get(d).stuff_classes)
        rng = np.random.default_rng(seed)
        for name in out:
            folder = tempfile.mkdtemp(prefix="quality-baseline-")
            evaluator = build_evaluator(d, output_dir=folder, distributed=False, per_image=True)
            evaluator.reset()
            for r in records:
                h, w = r["height"], r["width"]
                if name.startswith("all "):
                    labels = torch.zeros(h, w, dtype=torch.long)
                else:
                    labels = torch.from_numpy(rng.integers(0, k, (h, w)))
                scores = torch.nn.functional.one_hot(labels, k).permute(2, 0, 1).float()
                evaluator.process([{"file_name": r["file_name"]}], [{"sem_seg": scores}])
            out[name][d] = float(evaluator.evaluate()["sem_seg"]["mIoU"])
            out[name]["per_image"][d] = per_image_confusion(folder)
            shutil.rmtree(folder, ignore_errors=True)
    return out


def interval_cells(rows, datasets, resamples: int = 1000) -> Dict[str, Dict[str, str]]:
    """Per row label and dataset, "mIoU [low, high]" and for departure rows the paired difference.

    ``rows`` are ``(label, result, against)``; results without per-scene matrices keep their plain value.
    """
    from diffseg_d2.evaluation.bootstrap import bootstrap_difference, bootstrap_miou, bootstrap_weights, excludes_zero

    by_label = {label: result for label, result, _ in rows}
    cells: Dict[str, Dict[str, str]] = {}
    for d in datasets:
        per_image = {label: r["per_image"][d] for label, r in by_label.items() if d in r.get("per_image", {})}
        if not per_image:
            continue
        weights = bootstrap_weights(len(next(iter(per_image.values()))[0]), resamples)
        for label, result, against in rows:
            if label not in per_image:
                continue
            names, confusion = per_image[label]
            point, low, high = bootstrap_miou(confusion, weights)
            text = f"{point:.1f} [{low:.1f}, {high:.1f}]"
            if against in per_image and label != against:
                ref_names, ref_confusion = per_image[against]
                if list(ref_names) != list(names):
                    raise RuntimeError(f"'{label}' and '{against}' were evaluated on different scenes of {d}")
                diff = bootstrap_difference(confusion, ref_confusion, weights)
                mark = " *" if excludes_zero(diff) else ""
                text += f"; {diff[0]:+.1f} [{diff[1]:+.1f}, {diff[2]:+.1f}]{mark}"
            cells.setdefault(label, {})[d] = text
    return cells


def render(rows, datasets, args, wall_s: float) -> str:
    """The markdown section; ``rows`` are ``(label, result, against)``."""
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    columns = list(datasets) + (["PQ"] if any("PQ" in result for _, result, _ in rows) else [])
    intervals = interval_cells([r for r in rows if "error" not in r[1]], datasets)
    names = {d: d.replace("diffseg_microworld_", "").replace(f"_{args.split}", "") for d in datasets}
    classes = ("shapes: 4 shapes; colourshapes: 16 colour-shape classes; background pixels ignored (as VOC20 "
               "and FreeDA's benchmarks), no background class scored." if args.objects_only else
               "shapes: background + 4 shapes; colourshapes: background + 16 colour-shape classes; "
               "PQ: background stuff + 4 shape things.")
    names["PQ"] = f"PQ ({panoptic_dataset(args.split).replace('diffseg_microworld_', '')})"
    lines = [
        f"### Micro-world quality: mIoU on {'held-out ' if args.split != 'train' else ''}{args.split} scenes"
        f"{', objects only' if args.objects_only else ''} (micro models trained by the project)",
        "",
        f"- Date: {date}; {args.count} {args.split} scenes per dataset; wall time {wall_s / 60:.1f} min",
        f"- Command: `{shlex.join(['python', 'tools/benchmark_quality.py', *sys.argv[1:]])}`",
        f"- {classes}",
        "- mIoU [95 % bootstrap interval over scenes]; on departure rows then the difference from the reference "
        "row it departs from [paired 95 % interval], `*` where that interval excludes 0. PQ without an interval.",
        "",
        "| method | " + " | ".join(names[c] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, result, _ in rows:
        if "error" in result:
            lines.append(f"| {label} | failed: {result['error'][:160]} |" + " |" * (len(columns) - 1))
        else:
            cells = [intervals.get(label, {}).get(c) or (f"{result[c]:.1f}" if c in result else "-") for c in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=("val", "test", "train"),
                   help="held-out split to evaluate on (train: for choosing a setting, never val or test)")
    p.add_argument("--count", type=int, default=500, help="scenes per dataset (the first N of the split)")
    p.add_argument("--rows", nargs="+", metavar="TEXT", default=None,
                   help="only the method rows whose label contains one of these (case-insensitive); "
                        "the trivial baselines always run")
    p.add_argument("--opts", nargs="+", metavar="KEY VALUE", default=[],
                   help="config overrides added to every method row (e.g. to compare settings on train scenes)")
    p.add_argument("--objects-only", action="store_true",
                   help="evaluate on the splits without a background class (its pixels ignored), no PQ")
    p.add_argument("--write", metavar="FILE", help="also replace this tool's section in FILE (e.g. BENCHMARKS.md)")
    p.add_argument("--section", metavar="NAME", default="",
                   help="with --write and --rows: write a section of its own, named 'microworld NAME' (e.g. "
                        "'transformer'), instead of replacing the full table's")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    rows_wanted = [r for r in ROWS if not args.rows or any(t.lower() in r.label.lower() for t in args.rows)]
    if not rows_wanted and args.rows:
        p.error(f"no row matches {args.rows}; rows: {[r.label for r in ROWS]}")
    os.environ["DIFFSEG_D2_MICROWORLD_COUNT"] = f"{args.split}={args.count}"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    datasets = semseg_datasets(args.split, args.objects_only)
    start = time.perf_counter()
    rows = [(label, result, None) for label, result in trivial_baselines(datasets).items()]
    for row in rows_wanted:
        logger.info("%s", row.label)
        row = row._replace(opts=row.opts + args.opts)
        panoptic = None if args.objects_only else panoptic_dataset(args.split)
        rows.append((row.label, run_row(row, datasets, panoptic, env), row.against))
        logger.info("  -> %s", {k: v for k, v in rows[-1][1].items() if k != "per_image"})
    section = render(rows, datasets, args, time.perf_counter() - start)
    print(section, flush=True)
    if args.write:
        from diffseg_d2.evaluation.report import update_marked_section

        name = SECTION + (f" {args.section}" if args.section else "") + (" objects-only" if args.objects_only else "")
        update_marked_section(args.write, name if args.split == "val" else f"{name} {args.split}", section)
    return rows


if __name__ == "__main__":
    main()
