"""Train-step and forward time of our JAX DiT vs diffusers' WanTransformer3DModel on the same CPU.

Prints a markdown table (times, JAX/torch ratios, GFLOP/s and MFU against a matmul peak measured in
the same run) and writes JSON. `--memory` adds the compiled peak memory of an S train step
(blockwise attention, full remat) at 4k/16k/64k tokens, compile-only, each size in a fresh process.

    python scripts/bench_dit.py                      # config S, batch 4 x 256 tokens, ~3 min
    python scripts/bench_dit.py --memory             # + compiled memory at 4k/16k/64k tokens
    python scripts/bench_dit.py --memory-only --tokens 4096 16384 65536
    python scripts/bench_dit.py --profile --xla-flags= --xla-flags=--xla_cpu_use_onednn=true   # JAX only
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU comparison, even where an accelerator exists

from sora_jax.bench.dit_speed import BenchOptions  # noqa: E402


def main() -> None:
    d = BenchOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=d.num_layers)
    p.add_argument("--grid", type=int, nargs=3, default=list(d.grid), metavar=("T", "H", "W"), help="latent grid")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--text-len", type=int, default=d.text_len)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    p.add_argument("--memory", action="store_true", help="also the compiled train-step memory sweep")
    p.add_argument("--memory-only", action="store_true", help="only the memory sweep")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536], help="memory sweep sizes")
    p.add_argument("--profile", action="store_true",
                   help="JAX train step only, profiled by thunk category; one fresh process per --xla-flags")
    p.add_argument("--xla-flags", action="append", default=None, metavar="FLAGS", help="repeatable, with --profile")
    p.add_argument("--out", default="bench_dit.json")
    a = p.parse_args()
    result = {}
    opts = BenchOptions(num_layers=a.layers, grid=tuple(a.grid), batch=a.batch, text_len=a.text_len,
                        repeats=a.repeats, warmup=a.warmup, threads=a.threads)
    if a.profile:
        import tempfile

        from sora_jax.bench.dit_speed import format_profiles, run_isolated_profile

        with tempfile.TemporaryDirectory() as tmp:
            result["profile"] = [run_isolated_profile(opts, f, os.path.join(tmp, str(i)))
                                 for i, f in enumerate(a.xla_flags or [""])]
        print(format_profiles(result["profile"]))
    elif not a.memory_only:
        from sora_jax.bench.dit_speed import format_report, run_benchmark

        result["speed"] = run_benchmark(opts)
        print(format_report(result["speed"]))
    if a.memory or a.memory_only:
        from sora_jax.bench.dit_memory import format_sweep, sweep

        result["memory"] = sweep(a.tokens)
        print("\n" + format_sweep(result["memory"]))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
