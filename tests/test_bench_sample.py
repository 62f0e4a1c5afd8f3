"""Smoke test of the whole-sample benchmark (scripts/bench_sample.py) at the smallest size: fields and agreement."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")


def test_bench_sample_smoke(tmp_path):
    from sora_jax.bench.sample_speed import STAGES, SampleBenchOptions, format_report, run_benchmark

    # no staged JAX copy: its second compile would double the test's time (the benchmark runs it)
    opts = SampleBenchOptions(size="tiny", frames=5, height=32, width=32, steps=2, repeats=1, max_sequence_length=16,
                              stages=False)
    r = json.loads(json.dumps(run_benchmark(opts, tmp_path)))  # JSON-able as the script writes it
    for key in ("options", "machine", "video", "model", "agreement", "first_call", "timings", "stages",
                "speedup_vs_torch", "speedup_vs_torch_min", "speedup_per_round", "loop_gflop"):
        assert key in r, key
    assert r["video"]["latent_ours"] == [1, 2, 4, 4, 4]
    assert {"loadavg_start", "loadavg_end", "torch_threads", "jax"} <= set(r["machine"])
    for side in ("jax", "torch"):
        assert len(r["timings"][side]["times_s"]) == 1 and r["timings"][side]["median_s"] > 0
    assert set(r["stages"]["torch"]) == set(STAGES) and "jax" not in r["stages"]
    assert r["first_call"]["jax_compile_s"] > 0 and r["first_call"]["jax_s"] >= r["first_call"]["jax_compile_s"]
    for name, a in r["agreement"].items():
        assert a["shape_ours"] == a["shape_torch"] == [5, 32, 32, 3], name
        assert a["max_abs_diff"] <= 2e-3, (name, a)
    assert r["agreement"]["generate_vs_diffusers"]["ref_std"] > 0.01  # not a flat video agreeing trivially
    assert "torch/JAX" in format_report(r)
    assert not list(tmp_path.iterdir())  # the pipeline folders were cleaned up
