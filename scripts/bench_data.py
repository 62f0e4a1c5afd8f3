"""Data-pipeline throughput (clips/s): real MP4 decode with grain workers and latent-cache reads,
against the DiT train step's consumption (tiny and S), in one run on this machine.

    python scripts/bench_data.py                          # 48 clips 33x288x384 -> 256x256x17, ~5 min
    python scripts/bench_data.py --variants tiny --clips 16 --batches 4
"""

import argparse
import dataclasses

from sora_jax.bench.data_speed import DataBenchOptions, format_report, run_benchmark
from sora_jax.bench.harness import write_report
from sora_jax.parallel.backends import skip_absent_tpu


def main() -> None:
    d = DataBenchOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=d.clips)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--batches", type=int, default=d.batches, help="timed batches per loader measurement")
    p.add_argument("--workers", type=int, nargs="+", default=list(d.workers), help="grain worker counts")
    p.add_argument("--bucket", type=int, nargs=3, default=list(d.bucket), metavar=("H", "W", "FRAMES"))
    p.add_argument("--variants", nargs="+", default=list(d.variants), help="DiT configs for the step rate")
    p.add_argument("--out", default="bench_data.json")
    a = p.parse_args()
    skip_absent_tpu()
    opts = dataclasses.replace(d, clips=a.clips, batch=a.batch, batches=a.batches, workers=tuple(a.workers),
                               bucket=tuple(a.bucket), variants=tuple(a.variants))
    result = run_benchmark(opts)
    write_report(result, format_report(result), a.out)


if __name__ == "__main__":
    main()
