"""Latent-cache reader: ms the train loop's thread spends in next() per batch, the reader as shipped
against grain's defaults without batch prefetch, beside a simulated 0 / 20 ms step (one run).

    python scripts/bench_cache_reader.py                  # 256 clips, batch 16, 300 batches per row, ~1 min
"""

import argparse
import dataclasses

from sora_jax.bench.cache_reader import ReaderBenchOptions, format_report, run_benchmark
from sora_jax.bench.harness import write_report
from sora_jax.parallel.backends import skip_absent_tpu


def main() -> None:
    d = ReaderBenchOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=d.clips)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--batches", type=int, default=d.batches, help="timed batches per row")
    p.add_argument("--step-ms", type=float, nargs="+", default=list(d.step_ms), help="simulated step times")
    p.add_argument("--out", default="bench_cache_reader.json")
    a = p.parse_args()
    skip_absent_tpu()
    opts = dataclasses.replace(d, clips=a.clips, batch=a.batch, batches=a.batches, step_ms=tuple(a.step_ms))
    result = run_benchmark(opts)
    write_report(result, format_report(result), a.out)


if __name__ == "__main__":
    main()
