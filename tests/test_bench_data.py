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


def test_cache_reader_bench_times_both_readers_against_each_step(tmp_path):
    from sora_jax.bench.cache_reader import READERS, VAE_READERS, ReaderBenchOptions, format_report
    from sora_jax.bench.cache_reader import run_benchmark as run_reader_bench

    opts = ReaderBenchOptions(clips=8, bucket=(32, 32, 5), batch=2, batches=3, warmup=1, step_ms=(0.0, 5.0),
                              vae_clips=8, vae_batch=2, vae_crop=16)
    r = run_reader_bench(opts, workdir=str(tmp_path))
    assert [(row["reader"], row["step_ms"]) for row in r["rows"]] == (
        [(n, ms) for ms in (0.0, 5.0) for n in READERS] + [(n, ms) for ms in (0.0, 5.0) for n in VAE_READERS])
    slept = [row for row in r["rows"] if row["step_ms"] == 5.0]
    assert all(row["ms_per_step"] >= 5.0 and 0 < row["ms_in_next"] < row["ms_per_step"] for row in slept)
    assert "| 5 ms | as shipped |" in format_report(r) and "| 5 ms | VAE loader, as shipped |" in format_report(r)
