"""Smoke test of the data-throughput benchmark (numbers live in docs/benchmarks.md, not here)."""

from sora_jax.bench.data_speed import DataBenchOptions, format_report, latent_shape, run_benchmark


def test_data_bench_measures_every_source_and_the_step(tmp_path):
    opts = DataBenchOptions(clips=4, src_frames=9, src_height=48, src_width=64, bucket=(32, 32, 5), batch=2,
                            workers=(0,), batches=1, variants=("tiny",), step_repeats=1)
    r = run_benchmark(opts, workdir=str(tmp_path))
    assert latent_shape(opts) == (2, 4, 4, 16)
    assert set(r["decode"]) == {"workers=0"} and r["decode"]["workers=0"]["clips_per_s"] > 0
    assert r["cache_read"]["clips_per_s"] > 0 and r["train_step"]["tiny"]["tokens_per_clip"] == 8
    report = format_report(r)
    assert "decode MP4 (grain, workers=0)" in report and "DiT tiny train step (8 tokens/clip" in report
