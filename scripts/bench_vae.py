"""Encode/decode wall time of our JAX CausalVAE vs diffusers' AutoencoderKLWan (same CPU, weights, input).

Prints a markdown table and writes JSON (config, machine, agreement, compile times, timings).
Each `--xla-flags=...` runs the benchmark once more in a fresh process with those XLA flags (XLA
reads its flags once per process); `--xla-flags=` is the default set.

    python scripts/bench_vae.py                                  # small config, 1x17x96x96
    python scripts/bench_vae.py --config wan2.1 --size 256 --repeats 5
    python scripts/bench_vae.py --variants whole whole+xla whole+fold_time chunked --conv-breakdown
    python scripts/bench_vae.py --xla-flags= --xla-flags=--xla_cpu_use_onednn=true
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU comparison, even where an accelerator exists

from sora_jax.bench.vae_speed import CONFIGS, BenchOptions, format_report  # noqa: E402


def main() -> None:
    d = BenchOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default=d.config)
    p.add_argument("--frames", type=int, default=d.frames, help="4k+1")
    p.add_argument("--size", type=int, default=d.size, help="height = width, a multiple of 8")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds (the agreement check warms up too)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all usable cores, as XLA:CPU always uses; restrict both with taskset)")
    p.add_argument("--fused", action="store_true", help="also time encode+decode as one jitted program")
    p.add_argument("--conv-breakdown", action="store_true", help="estimate the share of time in convs")
    p.add_argument("--variants", nargs="+", default=list(d.variants),
                   help="JAX variants PATH[+CONV] timed side by side: PATH whole|chunked; CONV xla|sum_time "
                        "(the model's 3D-conv lowerings, VAEConfig.conv_impl) or fold_time (a prototype); "
                        "none = the model as shipped (auto: sum_time on CPU)")
    p.add_argument("--xla-flags", action="append", default=None, metavar="FLAGS",
                   help="repeatable, a fresh process per set: --xla-flags= --xla-flags=--xla_cpu_use_onednn=true")
    p.add_argument("--out", default="bench_vae.json")
    a = p.parse_args()
    opts = BenchOptions(
        config=a.config, frames=a.frames, size=a.size, batch=a.batch, repeats=a.repeats, warmup=a.warmup,
        threads=a.threads, fused=a.fused, conv_breakdown=a.conv_breakdown, variants=tuple(a.variants),
    )
    if a.xla_flags is None:
        from sora_jax.bench.vae_speed import run_benchmark

        results = [run_benchmark(opts)]
    else:
        from sora_jax.bench.vae_speed import run_isolated

        results = [run_isolated(opts, flags) for flags in a.xla_flags]
    for r in results:
        print("\n" + format_report(r))
    with open(a.out, "w") as f:
        json.dump(results[0] if len(results) == 1 else results, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
