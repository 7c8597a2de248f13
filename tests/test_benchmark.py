"""tools/benchmark.py's freeda-build preset (FreeDA's offline stage: one caption of the bank build, per
stage, and captions per hour), run on the tiny presets with a few DDIM steps."""
import math
import os
import statistics
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402

STEPS = 2
CAPTIONS = 3


def tiny_spec(**extra) -> dict:
    return {"preset": benchmark.FREEDA_BUILD, "name": benchmark.FREEDA_BUILD, "kind": benchmark.FREEDA_BUILD,
            "device": "cpu", "dtype": "float32", "threads": 1, "models": "tiny", "steps": STEPS,
            "repeats": CAPTIONS, "label": "one caption", **extra}


@pytest.fixture(scope="module")
def measured(_session_cache):
    """The tiny build measured in this process (three captions at two steps)."""
    return benchmark.measure_freeda_build(tiny_spec())


def one_run(result: dict, spec: dict = None) -> dict:
    return {"preset": benchmark.FREEDA_BUILD, "specs": [spec or tiny_spec()],
            "results": {benchmark.FREEDA_BUILD: result}, "wall_s": 1.0}


def test_build_measurement_per_caption_and_stage(measured):
    r = measured
    assert r["models"] == "tiny"
    assert r["steps"] == STEPS and r["config_steps"] == 10  # configs/tiny/freeda.yaml's BUILD.STEPS
    assert r["image_size"] == 128 and r["latent_shape"] == [1, 4, 16, 16]
    calls = r["calls"]
    assert [c["caption"] for c in calls] == list(benchmark.BUILD_CAPTIONS[:CAPTIONS])
    for c in calls:
        # every caption has nouns of the list, so every stage of the builder ran, inside the caption's time
        assert set(c["stages"]) == set(benchmark.BUILD_STAGES)
        assert all(v >= 0 for v in c["stages"].values())
        assert sum(c["stages"].values()) <= c["seconds"]
        assert c["rows"] > 0
    # no warm-up: the first caption is apart, the times are the later ones
    assert r["first_s"] == calls[0]["seconds"]
    assert r["times"] == [c["seconds"] for c in calls[1:]]
    assert set(r["pieces"]) == set(benchmark.BUILD_STAGES) | {"other"}
    assert all(v >= 0 for v in r["pieces"].values())
    assert r["pieces"]["generation"] == statistics.median(c["stages"]["generation"] for c in calls[1:])
    assert r["decode_s"] > 0 and math.isfinite(r["peak_mib"])


def test_throughput_is_consistent_with_the_caption_time(measured):
    e = benchmark.extrapolate_build(measured)
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
    e = benchmark.extrapolate_build(synthetic(steps=2, config_steps=50, step_s=20.0, decode_s=15.0, rest_s=8.0))
    # the slow first caption is left out; decode and rest are paid once, the step 50 times
    assert e["step_s"] == pytest.approx(20.0) and e["rest_s"] == pytest.approx(8.0)
    assert e["measured_s"] == pytest.approx(8.0 + 15.0 + 2 * 20.0)
    assert e["caption_s"] == pytest.approx(8.0 + 15.0 + 50 * 20.0)
    assert e["captions_per_hour"] == pytest.approx(3600 / 1023.0)
    same = benchmark.extrapolate_build(synthetic(steps=50, config_steps=50, step_s=20.0, decode_s=15.0, rest_s=8.0))
    assert not same["extrapolated"] and same["caption_s"] == same["measured_s"]


def test_rendered_section_has_the_rows(measured):
    text = benchmark.render_freeda_build(one_run(measured), "python tools/benchmark.py --preset freeda-build")
    e = benchmark.extrapolate_build(measured)
    assert text.startswith("### freeda-build: FreeDA bank build, one caption, the tiny random-weight presets")
    assert "configs/tiny/freeda.yaml" in text and "**2 DDIM steps**" in text
    table_row = next(line for line in text.splitlines() if line.startswith("| one caption"))
    for stage in (*benchmark.BUILD_STAGES, "other"):
        assert f"{stage} {benchmark._fmt_s(measured['pieces'][stage])}" in table_row
    assert "Extrapolation to BUILD.STEPS = 10 from this run at 2 steps" in text
    assert "| one DDIM step (UNet on the guided batch of 2, attention recorded) |" in text
    assert f"| **one caption at 10 steps (extrapolated)** | **{benchmark._fmt_s(e['caption_s'])} s** |" in text
    assert (f"| **captions per hour at 10 steps (extrapolated)** | **{benchmark._fmt_rate(e['captions_per_hour'])}"
            in text)
    assert f"| captions per hour at 2 steps (measured) | {benchmark._fmt_rate(e['measured_captions_per_hour'])}" \
        in text


def test_rendered_section_without_extrapolation_or_result():
    r = {**synthetic(steps=50, config_steps=50, step_s=20.0, decode_s=15.0, rest_s=8.0), "guidance_scale": 7.5,
         "image_size": 512, "latent_shape": [1, 4, 64, 64], "first_s": 1048.0, "times": [1023.0, 1023.0],
         "pieces": {"generation": 1015.0, "other": 0.0}, "peak_mib": 1.0}
    text = benchmark.render_freeda_build(one_run(r, tiny_spec(models="reference")), "cmd")
    assert "SD 1.5 + DINOv2 ViT-L/14 + CLIP ViT-L/14 architectures, random weights" in text
    assert "Throughput at BUILD.STEPS = 50 (measured; no extrapolation)" in text
    assert "extrapolated" not in text
    assert "| captions per hour at 50 steps (measured) | 3.5 |" in text
    failed = benchmark.render_freeda_build(one_run({"error": "exit code 1"}), "cmd")
    assert "| one caption | failed: exit code 1 |" in failed


def test_builder_stage_times_start_afresh_per_caption(_session_cache):
    from diffseg_d2.freeda.builder import PrototypeBankBuilder

    builder = PrototypeBankBuilder.from_config(benchmark.freeda_build_cfg("tiny", steps=1))
    assert builder.steps == 1
    assert builder.caption_prototypes(0, benchmark.BUILD_CAPTIONS[0]) is not None
    assert set(builder.last_timings) == set(benchmark.BUILD_STAGES)
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
