"""tools/benchmark.py and its package tools/benchmarks/: the freeda-build preset (FreeDA's offline stage:
one caption of the bank build, per stage, and captions per hour) and the ODISE preset's floating-point
operation counts, run on the tiny presets; the full-size presets' configs (random weights presets)."""
import math
import os
import statistics
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402
from benchmarks import diffsegmenter, freeda, freeda_build, harness, odise  # noqa: E402

STEPS = 2
CAPTIONS = 3


def tiny_spec(**extra) -> dict:
    return {"preset": freeda_build.PRESET, "name": freeda_build.PRESET, "kind": freeda_build.PRESET,
            "device": "cpu", "dtype": "float32", "threads": 1, "models": "tiny", "steps": STEPS,
            "repeats": CAPTIONS, "label": "one caption", **extra}


@pytest.fixture(scope="module")
def measured(_session_cache):
    """The tiny build measured in this process (three captions at two steps)."""
    return freeda_build.measure(tiny_spec())


def one_run(result: dict, spec: dict = None) -> dict:
    return {"preset": freeda_build.PRESET, "specs": [spec or tiny_spec()],
            "results": {freeda_build.PRESET: result}, "wall_s": 1.0}


def test_build_measurement_per_caption_and_stage(measured):
    r = measured
    assert r["models"] == "tiny"
    assert r["steps"] == STEPS and r["config_steps"] == 10  # configs/tiny/freeda.yaml's BUILD.STEPS
    assert r["image_size"] == 128 and r["latent_shape"] == [1, 4, 16, 16]
    calls = r["calls"]
    assert [c["caption"] for c in calls] == list(freeda_build.BUILD_CAPTIONS[:CAPTIONS])
    for c in calls:
        # every caption has nouns of the list, so every stage of the builder ran, inside the caption's time
        assert set(c["stages"]) == set(freeda_build.BUILD_STAGES)
        assert all(v >= 0 for v in c["stages"].values())
        assert sum(c["stages"].values()) <= c["seconds"]
        assert c["rows"] > 0
    # no warm-up: the first caption is apart, the times are the later ones
    assert r["first_s"] == calls[0]["seconds"]
    assert r["times"] == [c["seconds"] for c in calls[1:]]
    assert set(r["pieces"]) == set(freeda_build.BUILD_STAGES) | {"other"}
    assert all(v >= 0 for v in r["pieces"].values())
    assert r["pieces"]["generation"] == statistics.median(c["stages"]["generation"] for c in calls[1:])
    assert r["decode_s"] > 0 and math.isfinite(r["peak_mib"])


def test_throughput_is_consistent_with_the_caption_time(measured):
    e = freeda_build.extrapolate_build(measured)
    assert e["extrapolated"] and (e["steps"], e["config_steps"]) == (STEPS, 10)
    assert e["measured_s"] == pytest.approx(statistics.median(measured["times"]))
    assert e["measured_captions_per_hour"] * e["measured_s"] == pytest.approx(3600)
    assert e["captions_per_hour"] * e["caption_s"] == pytest.approx(3600)
    assert e["caption_s"] == pytest.approx(e["rest_s"] + measured["decode_s"] + 10 * e["step_s"])
    assert e["step_s"] >= 0 and e["rest_s"] >= 0
    assert e["caption_s"] >= e["measured_s"] - measured["decode_s"]  # more steps cannot cost less


def synthetic(steps: int, config_steps: int, step_s: float, decode_s: float, rest_s: float) -> dict:
    """A result whose captions took exactly rest + decode + steps x step (first caption slower)."""
    gen = decode_s + steps * step_s
    calls = [{"caption": "c", "seconds": rest_s + gen + extra, "rows": 1,
              "stages": {"generation": gen + extra, "dino": rest_s}} for extra in (5.0, 0.0, 0.0)]
    return {"steps": steps, "config_steps": config_steps, "decode_s": decode_s, "calls": calls}


def test_extrapolation_formula():
    e = freeda_build.extrapolate_build(synthetic(steps=2, config_steps=50, step_s=20.0, decode_s=15.0, rest_s=8.0))
    # the slow first caption is left out; decode and rest are paid once, the step 50 times
    assert e["step_s"] == pytest.approx(20.0) and e["rest_s"] == pytest.approx(8.0)
    assert e["measured_s"] == pytest.approx(8.0 + 15.0 + 2 * 20.0)
    assert e["caption_s"] == pytest.approx(8.0 + 15.0 + 50 * 20.0)
    assert e["captions_per_hour"] == pytest.approx(3600 / 1023.0)
    same = freeda_build.extrapolate_build(synthetic(steps=50, config_steps=50, step_s=20.0, decode_s=15.0, rest_s=8.0))
    assert not same["extrapolated"] and same["caption_s"] == same["measured_s"]


def test_rendered_section_has_the_rows(measured):
    text = freeda_build.render(one_run(measured), "python tools/benchmark.py --preset freeda-build")
    e = freeda_build.extrapolate_build(measured)
    assert text.startswith("### freeda-build: FreeDA bank build, one caption, the tiny random-weight presets")
    assert "configs/tiny/freeda.yaml" in text and "**2 DDIM steps**" in text
    table_row = next(line for line in text.splitlines() if line.startswith("| one caption"))
    for stage in (*freeda_build.BUILD_STAGES, "other"):
        assert f"{stage} {harness.fmt_s(measured['pieces'][stage])}" in table_row
    assert "Extrapolation to BUILD.STEPS = 10 from this run at 2 steps" in text
    assert "| one DDIM step (UNet on the guided batch of 2, attention recorded) |" in text
    assert f"| **one caption at 10 steps (extrapolated)** | **{harness.fmt_s(e['caption_s'])} s** |" in text
    assert (f"| **captions per hour at 10 steps (extrapolated)** | **{harness.fmt_rate(e['captions_per_hour'])}"
            in text)
    assert f"| captions per hour at 2 steps (measured) | {harness.fmt_rate(e['measured_captions_per_hour'])}" \
        in text


def test_rendered_section_without_extrapolation_or_result():
    r = {**synthetic(steps=50, config_steps=50, step_s=20.0, decode_s=15.0, rest_s=8.0), "guidance_scale": 7.5,
         "image_size": 512, "latent_shape": [1, 4, 64, 64], "first_s": 1048.0, "times": [1023.0, 1023.0],
         "pieces": {"generation": 1015.0, "other": 0.0}, "peak_mib": 1.0}
    text = freeda_build.render(one_run(r, tiny_spec(models="reference")), "cmd")
    assert "SD 1.5 + DINOv2 ViT-L/14 + CLIP ViT-L/14 architectures, random weights" in text
    assert "Throughput at BUILD.STEPS = 50 (measured; no extrapolation)" in text
    assert "extrapolated" not in text
    assert "| captions per hour at 50 steps (measured) | 3.5 |" in text
    failed = freeda_build.render(one_run({"error": "exit code 1"}), "cmd")
    assert "| one caption | failed: exit code 1 |" in failed


def test_builder_stage_times_start_afresh_per_caption(_session_cache):
    from diffseg_d2.freeda.builder import PrototypeBankBuilder

    builder = PrototypeBankBuilder.from_config(freeda_build.freeda_build_cfg("tiny", steps=1))
    assert builder.steps == 1
    assert builder.caption_prototypes(0, freeda_build.BUILD_CAPTIONS[0]) is not None
    assert set(builder.last_timings) == set(freeda_build.BUILD_STAGES)
    assert builder.caption_prototypes(1, "the sky is clear today") is None  # no noun: only the noun stage ran
    assert set(builder.last_timings) == {"nouns"}


@pytest.mark.slow
def test_preset_writes_its_section(tmp_path, _session_cache):
    """As a user runs it: the worker in its own process, the section between its markers, others kept."""
    out = tmp_path / "BENCHMARKS.md"
    other = "<!-- tools/benchmark.py freeda: begin -->\nkept\n<!-- tools/benchmark.py freeda: end -->\n"
    out.write_text("# Benchmarks\n\n" + other)
    benchmark.main(["--preset", "freeda-build", "--build-models", "tiny", "--build-steps", "1", "--repeats", "2",
                    "--threads", "1", "--device", "cpu", "--write", str(out)])
    text = out.read_text()
    assert other in text
    section = text.split("<!-- tools/benchmark.py freeda-build: begin -->\n", 1)[1]
    section = section.split("<!-- tools/benchmark.py freeda-build: end -->", 1)[0]
    assert "| one caption: `PrototypeBankBuilder.caption_prototypes`, 1 DDIM step |" in section
    assert "failed" not in section
    assert "| **captions per hour at 10 steps (extrapolated)** |" in section


# ---------------------------------------------------------------------- the ODISE preset on the tiny ODISE
def odise_spec(kind: str) -> dict:
    return {"preset": odise.PRESET, "name": kind, "kind": kind, "device": "cpu", "threads": 1, "repeats": 1,
            "models": "tiny", "label": odise.KINDS[kind]}


@pytest.fixture(scope="module")
def odise_measured(_session_cache):
    """plain and the backbones with and without the VAE decoder taps (captioner off) on configs/tiny/odise.yaml,
    measured in this process: one repeat each, then one call counted."""
    return {kind: odise.measure(odise_spec(kind)) for kind in odise.FLOP_KINDS}


def test_odise_flops_by_part(odise_measured):
    plain, reference, no_decoder = (odise_measured[k]["flops"] for k in odise.FLOP_KINDS)
    assert set(plain) == {"VAE encode", "UNet pass"} and all(v > 0 for v in plain.values())
    for backbone in (reference, no_decoder):
        # the same VAE encode and UNet pass as plain on the same window, and no operation outside the parts
        assert backbone["VAE encoder"] == plain["VAE encode"] and backbone["UNet"] == plain["UNet pass"]
        assert backbone["other"] == 0 and backbone["projections"] > 0
    # without the decoder taps, neither the decoder nor the projections of its taps run
    assert no_decoder["VAE decoder"] == 0 < reference["VAE decoder"]
    assert no_decoder["projections"] < reference["projections"]
    assert sum(plain.values()) < sum(no_decoder.values()) < sum(reference.values())
    for r in odise_measured.values():
        assert len(r["times"]) == 1 and r["times"][0] > 0 and math.isfinite(r["peak_mib"])
    assert set(odise_measured["odise-plain"]["pieces"]) == {"VAE encode", "UNet pass"}


def test_odise_decoder_part_is_the_decoder_run_to_its_last_tap(odise_measured):
    """Counted on its own, the VAE decoder as far as the config's last tap costs what the backbone's part says."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffseg_d2.diffusion import decoder_inputs, load_stable_diffusion

    d = odise.odise_cfg("tiny", "cpu", "odise-backbone").MODEL.DIFFSEG
    vae = load_stable_diffusion(d.SD.WEIGHTS).vae
    side = d.ODISE.BACKBONE.WINDOW // 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        decoder_inputs(vae, torch.randn(1, vae.config.latent_channels, side, side), d.ODISE.BACKBONE.VAE_DECODER_BLOCKS)
    assert counter.get_total_flops() == odise_measured["odise-backbone"]["flops"]["VAE decoder"]


def test_odise_target_gives_the_time_and_flop_ratios():
    """The section on the operation counts of SD 1.5 at 512 (as counted on a CPU): the target line has both
    ratios, the FLOP ratio is called a floor, and the configuration without decoder taps has its own line."""
    g = 1e9

    def result(seconds: float, flops: dict) -> dict:
        return {"times": [seconds], "peak_mib": 100.0, "other_load": 0.0, "flops": flops}

    results = {
        "odise-plain": {**result(2.0, {"VAE encode": 1082 * g, "UNet pass": 678 * g}),
                        "pieces": {"VAE encode": 1.2, "UNet pass": 0.8}},
        "odise-backbone": result(3.0, {"VAE encoder": 1082 * g, "UNet": 678 * g, "VAE decoder": 589 * g,
                                       "projections": 30 * g, "other": 0}),
        "odise-backbone-nodecoder": result(2.1, {"VAE encoder": 1082 * g, "UNet": 678 * g, "VAE decoder": 0,
                                                 "projections": 31.7 * g, "other": 0}),
    }
    specs = [{"name": k, "label": label} for k, label in odise.KINDS.items()]
    results.update({s["name"]: {"error": "exit code 1"} for s in specs if s["name"] not in results})
    text = odise.render({"specs": specs, "results": results, "wall_s": 60.0}, "cmd")
    assert ("- **FAIL** backbone features <= 1.15x plain: time 3.00 s / 2.00 s = **1.50x**; "
            "operations 2379 / 1760 GFLOP = **1.352x**") in text
    assert "- The FLOP ratio (1.352x) is a floor for any implementation that computes the same features" in text
    assert ("- **PASS** backbone features without the VAE decoder taps <= 1.15x plain: time 2.10 s / 2.00 s = "
            "**1.05x**; operations 1792 / 1760 GFLOP = **1.018x**") in text
    assert "| 2379 | 1.352x | VAE encoder 1082, UNet 678, VAE decoder 589, projections 30 |" in text
    assert f"| {odise.KINDS['odise-train-step']} | failed: exit code 1 |" in text


# ---------------------------------------------------------------------- full-size models: random presets, no patching
def test_full_size_models_come_from_configs_naming_random_presets():
    """Every full-size model is the config's, with random:<architecture> weights and the reference settings."""
    d = diffsegmenter.model_cfg("sd15", "cpu", "float32", "per_class", captions=True).MODEL.DIFFSEG
    assert (d.SD.WEIGHTS, d.CAPTION.ENABLED, d.CAPTION.WEIGHTS) == ("random:sd15", True, "random:large")
    assert (d.IMAGE_SIZE, list(d.CROSS_ATTN_FACTORS), list(d.CROSS_ATTN_WEIGHTS), d.SELF_ATTN_FACTOR) == \
        (512, [8, 4, 2, 1], [0.3, 0.5, 0.1, 0.1], 1)
    assert not d.CATEGORY_FILTER.ENABLED and d.CONDITIONING == "per_class"
    # The other families at their native sizes, with the factors their configs read.
    d = diffsegmenter.model_cfg("sd21", "cpu", "float32", "per_class").MODEL.DIFFSEG
    assert (d.SD.WEIGHTS, d.IMAGE_SIZE, list(d.CROSS_ATTN_FACTORS), d.CAPTION.ENABLED) == \
        ("random:sd21", 768, [8, 4, 2, 1], False)
    d = diffsegmenter.model_cfg("sdxl", "cpu", "float32", "shared").MODEL.DIFFSEG
    assert (d.SD.WEIGHTS, d.IMAGE_SIZE, list(d.CROSS_ATTN_FACTORS), d.SELF_ATTN_FACTOR, d.CONDITIONING) == \
        ("random:sdxl", 1024, [4, 2], 2, "shared")
    for kind in odise.KINDS:
        d = odise.odise_cfg("reference", "cpu", kind).MODEL.DIFFSEG
        assert (d.SD.WEIGHTS, d.CLIP.WEIGHTS) == ("random:sd15", "random:ViT-L-14-336")
        assert d.ODISE.CAPTIONER.ENABLED == (kind not in ("odise-backbone", "odise-backbone-nodecoder"))
        assert list(d.ODISE.BACKBONE.VAE_DECODER_BLOCKS) == ([] if kind == "odise-backbone-nodecoder" else [2, 5])
    d = freeda.freeda_cfg("freeda-whole", "cpu", "bank").MODEL.DIFFSEG
    assert (d.CLIP.WEIGHTS, d.DINO.WEIGHTS, d.FREEDA.PIPELINE) == ("random:ViT-L-14", "random:vitl14", "whole")
    d = freeda_build.freeda_build_cfg("reference").MODEL.DIFFSEG
    assert (d.SD.WEIGHTS, d.CLIP.WEIGHTS, d.DINO.WEIGHTS) == ("random:sd15", "random:ViT-L-14", "random:vitl14")


def test_random_bank_loads_through_the_config_path(tmp_path, _session_cache):
    """The freeda preset's random bank, written for the config's models, is read by FreeDA as built from the
    config (its fingerprint check passes), with one prototype per class of a new vocabulary."""
    from detectron2.modeling import build_model

    from diffseg_d2 import get_diffseg_cfg

    cfg = get_diffseg_cfg(harness.config_path("tiny", "freeda.yaml"), ["MODEL.DIFFSEG.FREEDA.BANK", str(tmp_path)])
    freeda.write_random_bank(str(tmp_path), cfg, 500)
    model = build_model(cfg).eval()
    assert len(model.bank) == 500
    assert (model.bank.key_dim, model.bank.prototype_dim) == (model.clip.embed_dim, model.dino.embed_dim)
    prototypes, found = model.class_prototypes(("cat", "dog"))
    assert prototypes.shape == (2, model.dino.embed_dim) and found.shape == (2,)


def test_no_benchmark_module_patches_the_package():
    """Beside the behaviour above: nothing under tools/benchmarks/ (nor the command line) uses unittest.mock."""
    folder = os.path.join(ROOT, "tools", "benchmarks")
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py")]
    for path in files + [os.path.join(ROOT, "tools", "benchmark.py")]:
        with open(path, encoding="utf-8") as f:
            assert "mock" not in f.read(), path
    assert {"harness.py", "diffsegmenter.py", "retrieval.py", "odise.py", "freeda.py", "freeda_build.py"} <= \
        set(map(os.path.basename, files))


def test_transformer_readout_rows_compare_the_same_maps(monkeypatch):
    """The sd3 / flux presets' materialised row computes the maps ours does (so the table compares two ways of
    one result), on the released widths with one block at 128x128; and the section renders its targets."""
    import torch

    from benchmarks import transformer_readout as tr
    from diffseg_d2.diffusion import JointAttentionStore, joint_attention_layers, record_joint_attention

    monkeypatch.setattr(tr, "IMAGE_SIZE", 128)
    transformer, inputs, text = tr.build("sd3", (1,))
    layers = list(joint_attention_layers(transformer))
    index, weight = torch.tensor([[3], [80], [300]]), torch.ones(3, 1)
    ours, materialised = JointAttentionStore(index, weight), tr._materialised_store(index, weight)
    for store in (ours, materialised):
        with torch.no_grad(), record_joint_attention(transformer, store, layers, text):
            transformer(**inputs)
    torch.testing.assert_close(ours.maps(), materialised.maps(), rtol=1e-4, atol=1e-7)
    result = {"times": [2.0], "peak_mib": 100.0, "layers": 6, "blocks": [6], "tokens": 4429, "other_load": 0.0}
    run = {"preset": "sd3", "wall_s": 1.0, "specs": [{"name": k, "label": v, "repeats": 1} for k, v in tr.KINDS.items()],
           "results": {"plain": result, "ours-maps": {**result, "times": [2.2], "peak_mib": 110.0},
                       "ours-refine": {**result, "times": [3.0]}, "materialised": {**result, "peak_mib": 900.0}}}
    text_out = tr.render(run, "python tools/benchmark.py --preset sd3")
    assert "**PASS** ours-maps: time <= 1.3x plain: 2.20 s / 2.00 s = **1.10x**" in text_out
    assert "**FAIL** ours-refine: time <= 1.3x plain: 3.00 s / 2.00 s = **1.50x**" in text_out
    assert "materialised, for comparison: 1.00x the time, 9.00x the peak memory of plain" in text_out
