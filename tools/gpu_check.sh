#!/usr/bin/env bash
# The GPU check: everything the CPU test-suite cannot show, in one run of under 10 minutes on one
# H200-class GPU, after `make install` in a fresh checkout.
#
#   bash tools/gpu_check.sh                   # all steps; exit status 0 only if every step passed
#   bash tools/gpu_check.sh --step dtypes     # one step alone, no time limit (names below)
#
# Steps, each under `timeout` with the budget given at BUDGET_* below; a failed step does not stop
# the next ones, and the summary at the end gives PASS / FAIL / TIMEOUT / SKIP per step:
#   env           versions, nvidia-smi, one CUDA matmul; no CUDA GPU: stops here with exit status 3
#   tests-device  the tests that take the model_device fixture (pytest -m device: tiny DiffSegmenter,
#                 FreeDA and ODISE forward and training step), with DIFFSEG_D2_TEST_DEVICE=cuda
#   dtypes        MODEL.DIFFSEG.SD.DTYPE float16 and bfloat16 against float32 on CUDA: tiny DiffSegmenter
#                 outputs, tiny ODISE backbone features, one ODISE training step
#   bench-sd15    python tools/benchmark.py --preset sd15 on CUDA (fewer classes and repeats)
#   bench-odise   python tools/benchmark.py --preset odise on CUDA (one repeat)
#   faiss-gpu     the bank's index searched on the GPU (extra freeda-gpu) against the CPU search: same ids;
#                 not in the default list (it needs faiss's GPU build): GPU_CHECK_STEPS="faiss-gpu"
#   bench-sd3, bench-flux    the diffusion transformers' read-out presets at full size (every block of
#                 SD3-medium / FLUX.1-dev); not in the default list: GPU_CHECK_STEPS="bench-sd3 bench-flux"
#   bench-sd21, bench-sdxl   the sd21 / sdxl presets on CUDA (1 and 20 classes, 2 repeats); not in the
#                 default list, whose 10 minutes they would exceed: GPU_CHECK_STEPS="bench-sd21 bench-sdxl"
#   tests-rest    the rest of the fast suite (pytest -m "not slow and not device"), in what time is left
#
# Results go to ${OUT:-output/gpu_check}/: one log per step, summary.txt, junit XML of the tests, the
# benchmark sections (bench-*.md) and a copy of BENCHMARKS.md with those sections replaced.
#
# Environment: PYTHON (default .venv/bin/python), OUT (the results folder), GPU_CHECK_STEPS (the steps
# to run, space-separated; env always runs), GPU_CHECK_DEVICE (default cuda; "cpu" runs the same steps
# on the CPU to check this script itself on a machine without a GPU: slow, so choose the steps).
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SELF")/.."

# Time budgets in seconds. The total is 10 minutes less 30 s for process starts and the summary.
BUDGET_ENV=30           # imports and one matmul: ~10 s (the first imports on a fresh machine are slower)
BUDGET_TESTS_DEVICE=90  # 6 tests, with the tiny presets and the tiny FreeDA bank built first: ~40 s
BUDGET_DTYPES=60        # 2 dtypes x (tiny DiffSegmenter, tiny ODISE backbone + training step): ~25 s
BUDGET_BENCH_SD15=150   # 7 worker processes, each building SD 1.5 (+ BLIP large) with random weights
BUDGET_BENCH_ODISE=200  # 6 worker processes, each building SD 1.5 + CLIP ViT-L/14-336 with random weights
BUDGET_FAISS_GPU=60     # a 200k-key flat and IVF index, 150 queries, k = 350, on CPU and GPU
BUDGET_BENCH_SD3=180    # 4 worker processes building the 2B SD3-medium transformer, 1024 px
BUDGET_BENCH_FLUX=420   # 4 worker processes building all 57 FLUX.1-dev blocks (12B, float32)
BUDGET_BENCH_SD21=240   # 5 worker processes building SD 2.1 (768 px) with random weights
BUDGET_BENCH_SDXL=420   # 5 worker processes building SDXL base (1024 px, 2.6B UNet) with random weights
BUDGET_TOTAL=570        # tests-rest gets what the steps before it left of this, at most the next line
BUDGET_TESTS_REST_MAX=180  # about 1.5 min on 2 CPU cores; skipped when under 30 s are left

PY="${PYTHON:-.venv/bin/python}"
OUT_DIR="${OUT:-output/gpu_check}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
STEPS="${GPU_CHECK_STEPS:-tests-device dtypes bench-sd15 bench-odise tests-rest}"
# Nothing here downloads (tiny presets, random weights); without network the hub client would
# otherwise retry for minutes before failing.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

# ------------------------------------------------------------------ steps
step_env() {
    echo "checkout: $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(git status --short 2>/dev/null | wc -l) changed files"
    echo "python: $PY; device: $DEVICE"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - "$DEVICE" <<'EOF'
import sys

import torch

device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA build: {torch.version.cuda})")
print(f"torch.cuda.is_available(): {torch.cuda.is_available()}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        print(f"\nNO CUDA: torch.cuda.is_available() is False on this machine (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda}). tools/gpu_check.sh needs a CUDA GPU; nothing else was run.",
              file=sys.stderr, flush=True)
        sys.exit(3)  # the driver stops on this status
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
    print(f"bfloat16 supported: {torch.cuda.is_bf16_supported()}")
    x = torch.randn(1024, 1024, device=device)
    assert torch.isfinite(x @ x).all(), "a 1024x1024 matmul on the GPU gave non-finite values"
    torch.cuda.synchronize()
    print("a 1024x1024 matmul on the GPU: ok")
import detectron2
import diffusers
import transformers

import diffseg_d2

print(f"detectron2 {detectron2.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, diffseg_d2 from {diffseg_d2.__file__}")
EOF
}

step_tests_device() {
    # The device marker comes from the model_device fixture (tests/conftest.py). pytest exits 5
    # when no test is selected: that fails the step too.
    DIFFSEG_D2_TEST_DEVICE="$DEVICE" "$PY" -m pytest tests -m "device and not slow" \
        -v -rfEs -p no:cacheprovider --durations=5 --junitxml="$OUT_DIR/tests-device.xml"
}

step_tests_rest() {
    "$PY" -m pytest tests -m "not slow and not device" \
        -q -rfEs -p no:cacheprovider --durations=5 --junitxml="$OUT_DIR/tests-rest.xml"
}

step_dtypes() {
    "$PY" - "$DEVICE" <<'EOF'
"""float16 and bfloat16 SD parts against float32 on the same device, with the tiny presets."""
import copy
import sys
import time

import torch
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_backbone, build_model

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.data.panoptic_mapper import MaskFormerPanopticMapper

device = sys.argv[1]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
VOCAB = ["background", "person", "chair", "bottle", "dining table"]
failures = []


def check(ok, what):
    print(("  ok    " if ok else "  FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def check_sd_dtype(dtype, name):
    # On CUDA the SD parts run in the configured dtype; on a CPU (this script's dry run) a half
    # dtype may stay float32 (MODEL.DIFFSEG.SD.DTYPE's comment says which).
    want = {DTYPES[name]} if device.startswith("cuda") else {DTYPES[name], torch.float32}
    check(dtype in want, f"SD parts are {dtype} (expected {' or '.join(sorted(map(str, want)))})")


# ---- DiffSegmenter, tiny preset, on the VOC sample photo
record = DatasetCatalog.get("diffseg_sample_voc")[0]
image = torch.as_tensor(read_image(record["file_name"], format="RGB").copy()).permute(2, 0, 1)  # (3, H, W) uint8


def diffsegmenter(dtype):
    cfg = get_diffseg_cfg("configs/tiny/diffsegmenter.yaml", [
        "MODEL.DEVICE", device, "MODEL.DIFFSEG.SD.DTYPE", dtype,
        "DATASETS.TEST", "()", "MODEL.DIFFSEG.VOCABULARY", str(VOCAB)])
    return build_model(cfg).eval()


with torch.no_grad():
    ref = diffsegmenter("float32")([{"image": image}])[0]["sem_seg"]
for name in DTYPES:
    start = time.perf_counter()
    print(f"DiffSegmenter tiny, SD.DTYPE {name}:", flush=True)
    model = diffsegmenter(name)
    check_sd_dtype(model.diffusion.dtype, name)
    with torch.no_grad():
        out = model([{"image": image}])[0]["sem_seg"]
    check(out.shape == ref.shape and out.device.type == torch.device(device).type,
          f"sem_seg {tuple(out.shape)} on {out.device}")
    check(bool(torch.isfinite(out).all()), "sem_seg finite")
    # Classes the category filter kept in both runs (a dropped class scores -1; kept maps are in [0, 1]).
    kept = (ref[1:].flatten(1).max(1).values >= 0) & (out[1:].flatten(1).max(1).values >= 0)
    a, b = ref[1:][kept].flatten().float(), out[1:][kept].flatten().float()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.numel() > 1 else float("nan")
    agree = float((ref.argmax(0) == out.argmax(0)).float().mean())
    # Half precision forced on a CPU gave correlation > 0.999 and argmax agreement > 0.96 with these weights.
    check(corr > 0.98, f"score correlation with float32 {corr:.4f} (> 0.98)")
    check(agree > 0.8, f"argmax agreement with float32 {agree:.3f} (> 0.8)")
    print(f"  {time.perf_counter() - start:.1f} s", flush=True)


# ---- ODISE tiny: backbone features against float32, then one training step
def odise_cfg(dtype, *opts):
    return get_diffseg_cfg("configs/tiny/odise.yaml", ["MODEL.DEVICE", device, "MODEL.DIFFSEG.SD.DTYPE", dtype, *opts])


def backbone(dtype):
    torch.manual_seed(0)  # the same projections whatever the dtype
    return build_backbone(odise_cfg(dtype, "MODEL.DIFFSEG.ODISE.CAPTIONER.ENABLED", "False")).to(device).eval()


x = (torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)  # two windows
with torch.no_grad():
    ref_features = backbone("float32")(x)
panoptic = DatasetCatalog.get("diffseg_sample_voc_panoptic")[0]
for name in DTYPES:
    start = time.perf_counter()
    print(f"ODISE tiny, SD.DTYPE {name}:", flush=True)
    bb = backbone(name)
    check_sd_dtype(bb.diffusion.dtype, name)
    with torch.no_grad():
        features = bb(x)
    for level, f in features.items():
        r = ref_features[level]
        rel = float((f.float() - r).norm() / r.norm())
        # Half precision forced on a CPU: bfloat16 0.02-0.03, float16 under 0.004.
        check(f.shape == r.shape and bool(torch.isfinite(f).all()) and rel < 0.1,
              f"backbone {level} {tuple(f.shape)} {f.dtype} finite, relative difference to float32 {rel:.4f} (< 0.1)")
    torch.manual_seed(0)
    model = build_model(odise_cfg(name)).train()
    mapper = MaskFormerPanopticMapper(odise_cfg(name), True)
    losses = model([mapper(copy.deepcopy(panoptic)) for _ in range(2)])
    total = sum(losses.values())
    check(bool(torch.isfinite(total)), f"training losses finite (total {total.item():.3f})")
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    check(bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads),
          f"{len(grads)} trainable parameters got finite gradients")
    check(all(p.grad is None for p in model.backbone.diffusion.parameters()), "the frozen SD parts got no gradient")
    print(f"  {time.perf_counter() - start:.1f} s", flush=True)

if failures:
    sys.exit(f"{len(failures)} dtype check(s) failed: " + "; ".join(failures))
print("all dtype checks passed")
EOF
}

bench() {  # PRESET, then options of tools/benchmark.py
    local preset=$1 md="$OUT_DIR/bench-$1.md"
    shift
    if [[ ! -f "$OUT_DIR/BENCHMARKS.md" && -f BENCHMARKS.md ]]; then
        cp BENCHMARKS.md "$OUT_DIR/BENCHMARKS.md"
    fi
    # stdout: the preset's markdown section; stderr: the log (here, in the step's log).
    "$PY" tools/benchmark.py --preset "$preset" --device "$DEVICE" --write "$OUT_DIR/BENCHMARKS.md" "$@" >"$md"
    cat "$md"
    if grep -q '\*\*FAIL\*\*' "$md"; then
        echo "note: targets missed (a measurement, not a breakage):"
        grep '\*\*FAIL\*\*' "$md"
    fi
    if grep -q 'failed: ' "$md"; then
        echo "FAILED: a configuration of the $preset preset did not run (its traceback is above)" >&2
        return 1
    fi
}

step_bench_sd15() {
    # 1 and 20 classes (the targets' two ends), 2 repeats: 7 configurations instead of 10.
    bench sd15 --classes 1,20 --repeats 2 --budget-min 2
}

step_bench_odise() {
    bench odise --repeats 1
}

step_faiss_gpu() {
    # The bank's index on the GPU (extra freeda-gpu: faiss's CUDA build) returns what the CPU index returns.
    "$PY" - <<'PY'
import numpy as np, torch
from diffseg_d2.freeda.bank import faiss_has_gpu, index_on_device
import faiss
if not faiss_has_gpu():
    raise SystemExit("faiss is not a GPU build here: pip uninstall -y faiss-cpu && pip install -e '.[freeda-gpu]'")
rng = np.random.default_rng(0)
keys = rng.standard_normal((200_000, 768)).astype("float32"); keys /= np.linalg.norm(keys, axis=1, keepdims=True)
queries = keys[rng.choice(len(keys), 150)] + 0.05 * rng.standard_normal((150, 768)).astype("float32")
flat = faiss.IndexFlatIP(768); flat.add(keys)
ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(768), 768, 1024, faiss.METRIC_INNER_PRODUCT); ivf.train(keys[:50_000]); ivf.add(keys); ivf.nprobe = 16
for name, cpu in (("flat", flat), ("ivf", ivf)):
    gpu = index_on_device(cpu, "cuda")
    assert gpu is not cpu, name
    (sc, ic), (sg, ig) = cpu.search(queries, 350), gpu.search(queries, 350)
    same = float((ic == ig).mean()); diff = float(np.abs(sc - sg).max())
    print(f"{name}: ids equal {100 * same:.2f} %, similarities within {diff:.2e}")
    assert same > 0.999 and diff < 1e-4, name
PY
}

step_bench_sd3() {
    bench sd3 --transformer-blocks 24 --repeats 2
}

step_bench_flux() {
    # Every block of FLUX.1 dev in float32: 12B parameters, ~48 GB, so an 80 GB GPU.
    bench flux --transformer-blocks 19,38 --repeats 2
}

step_bench_sd21() {
    bench sd21 --classes 1,20 --repeats 2 --budget-min 3
}

step_bench_sdxl() {
    bench sdxl --classes 1,20 --repeats 2 --budget-min 6
}

if [[ "${1:-}" == --step ]]; then
    "step_${2//-/_}"
    exit
fi

# ------------------------------------------------------------------ driver
if [[ ! -x "$PY" ]]; then
    echo "No Python at $PY: run 'make install' first (or set PYTHON)." >&2
    exit 2
fi
rm -f "$OUT_DIR/BENCHMARKS.md"  # bench() copies the checkout's afresh
STARTED=$SECONDS
SUMMARY=()
FAILED=0

run_step() {  # NAME BUDGET_S
    local name=$1 budget=$2 start=$SECONDS rc status
    echo
    echo "=== $name (budget ${budget} s, $((SECONDS - STARTED)) s elapsed) ==="
    set +e
    timeout --kill-after=5 "$budget" bash "$SELF" --step "$name" 2>&1 | tee "$OUT_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL (exit $rc)" ;;
    esac
    [[ $rc == 0 ]] || FAILED=1
    SUMMARY+=("$(printf '%-13s %-15s %4d s of %d s' "$name" "$status" $((SECONDS - start)) "$budget")")
    echo "=== $name: $status in $((SECONDS - start)) s"
    return "$rc"
}

skip_step() {  # NAME WHY
    FAILED=1
    SUMMARY+=("$(printf '%-13s %-15s %s' "$1" SKIP "$2")")
    echo "=== $1: SKIP ($2)"
}

rc=0
run_step env "$BUDGET_ENV" || rc=$?
if [[ $rc == 3 ]]; then
    echo "Stopped: no CUDA GPU (see above). Exit status 3." >&2
    exit 3
fi
for step in $STEPS; do
    case $step in
        tests-device) run_step tests-device "$BUDGET_TESTS_DEVICE" || true ;;
        dtypes) run_step dtypes "$BUDGET_DTYPES" || true ;;
        bench-sd15) run_step bench-sd15 "$BUDGET_BENCH_SD15" || true ;;
        bench-odise) run_step bench-odise "$BUDGET_BENCH_ODISE" || true ;;
        faiss-gpu) run_step faiss-gpu "$BUDGET_FAISS_GPU" || true ;;
        bench-sd21) run_step bench-sd21 "$BUDGET_BENCH_SD21" || true ;;
        bench-sd3) run_step bench-sd3 "$BUDGET_BENCH_SD3" || true ;;
        bench-flux) run_step bench-flux "$BUDGET_BENCH_FLUX" || true ;;
        bench-sdxl) run_step bench-sdxl "$BUDGET_BENCH_SDXL" || true ;;
        tests-rest)
            left=$((BUDGET_TOTAL - (SECONDS - STARTED)))
            if ((left > BUDGET_TESTS_REST_MAX)); then left=$BUDGET_TESTS_REST_MAX; fi
            if ((left < 30)); then
                skip_step tests-rest "only ${left} s of the budget left"
            else
                run_step tests-rest "$left" || true
            fi
            ;;
        *) skip_step "$step" "no such step" ;;
    esac
done

{
    echo
    echo "=== tools/gpu_check.sh summary ($DEVICE, $((SECONDS - STARTED)) s in all; logs in $OUT_DIR/)"
    printf '%s\n' "${SUMMARY[@]}"
    if ((FAILED)); then echo "RESULT: FAILED"; else echo "RESULT: all steps passed"; fi
} | tee "$OUT_DIR/summary.txt"
exit "$FAILED"
