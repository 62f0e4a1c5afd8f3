"""Peak memory of VAE decode (or encode) for short vs 4x longer videos, chunked vs whole clip.

    python scripts/bench_vae_memory.py --config wan2.1 --frames 17,69 --size 128 --out bench_vae_memory.json
"""

from __future__ import annotations

import argparse
import json

from sora_jax.bench.vae_memory import CONFIGS, MemoryPoint, sweep
from sora_jax.parallel.backends import skip_absent_tpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="wan2.1", choices=sorted(CONFIGS))
    p.add_argument("--op", default="decode", choices=("decode", "encode"))
    p.add_argument("--frames", default="17,69", help="comma-separated frame counts (4k+1)")
    p.add_argument("--size", type=int, default=128, help="height (and width unless --width)")
    p.add_argument("--width", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--modes", default="chunked,whole", help="chunked and/or whole")
    p.add_argument("--compile-only", action="store_true", help="compiled buffer plan only, no real call")
    p.add_argument("--out", default="bench_vae_memory.json")
    a = p.parse_args()
    skip_absent_tpu()
    points = [
        MemoryPoint(a.config, a.op, mode == "chunked", int(f), a.size, a.width, a.batch, not a.compile_only)
        for mode in a.modes.split(",") for f in a.frames.split(",")
    ]
    result = sweep(points)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{a.config} {a.op} {a.size}x{a.width or a.size}, batch {a.batch}; {result['env']}")
    print("| path | frames | compiled peak MiB (x) | temp MiB | RSS peak MiB (x) | RSS growth MiB (x) |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {'chunked' if r['chunked'] else 'whole'} | {r['frames']} | error: {r['error']} | | | |")
            continue
        rss = (f"{r['rss_peak_mib']:.0f} ({r['rss_peak_ratio']:.2f}x) | {r['rss_growth_mib']:.0f} "
               f"({r['rss_growth_ratio']:.2f}x)") if "rss_peak_mib" in r else "- | -"
        print(f"| {'chunked' if r['chunked'] else 'whole'} | {r['frames']} | {r['compiled_peak_mib']:.0f} "
              f"({r['compiled_peak_ratio']:.2f}x) | {r['temp_mib']:.0f} | {rss} |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
