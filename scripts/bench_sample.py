"""Whole 50-step text-to-video sample: our TextToVideo.generate vs diffusers' WanPipeline on the same CPU.

Same random pipeline (converted), prompt, negative prompt, noise, UniPC steps and guidance on both
sides; JAX compiled by a first call, then alternating rounds. Prints a markdown summary (end to end,
per stage, output agreement) and writes JSON.

    python scripts/bench_sample.py                          # size tiny, 17x64x64, 50 steps, 5 rounds
    python scripts/bench_sample.py --size S --repeats 3     # DiT config S, Wan2.1-layout VAE at base_dim 32
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU comparison, even where an accelerator exists

from sora_jax.bench.sample_speed import SampleBenchOptions  # noqa: E402


def main() -> None:
    d = SampleBenchOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=d.size, choices=["tiny", "S"])
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--max-sequence-length", type=int, default=d.max_sequence_length)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--no-stages", action="store_true", help="skip the staged JAX copy (no per-stage split for JAX)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    p.add_argument("--out", default=None, help="JSON path (default bench_sample_<size>.json)")
    a = p.parse_args()
    from sora_jax.bench.sample_speed import format_report, run_benchmark

    opts = SampleBenchOptions(size=a.size, frames=a.frames, height=a.height, width=a.width, steps=a.steps,
                              guidance=a.guidance, max_sequence_length=a.max_sequence_length, repeats=a.repeats,
                              stages=not a.no_stages, threads=a.threads)
    result = run_benchmark(opts)
    print(format_report(result))
    out = a.out or f"bench_sample_{a.size}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
