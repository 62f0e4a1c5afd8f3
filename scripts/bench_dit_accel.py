"""DiT train-step time, memory and MFU on a GPU/TPU: each attention x remat combination in its own process.

Prints a markdown table and writes JSON. Refuses to run on CPU (use scripts/bench_dit.py there).

    python scripts/bench_dit_accel.py                       # Wan2.1-1.3B, 81x480x832 (32760 tokens), bf16, cudnn, full remat
    python scripts/bench_dit_accel.py --remat full dots     # one row per remat policy
    python scripts/bench_dit_accel.py --variant S --video 17 128 128 --batch 8 --attention cudnn xla
"""

import argparse
import dataclasses
import itertools
import json
import sys

from sora_jax.bench.dit_accel import AccelOptions, format_results, run_isolated
from sora_jax.models.dit import VARIANTS


def main() -> None:
    d = AccelOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default=d.variant, choices=VARIANTS)
    p.add_argument("--video", type=int, nargs=3, default=[d.frames, d.height, d.width], metavar=("F", "H", "W"),
                   help="pixel frames, height, width (latent = VAE strides 4x8x8, causal)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--text-len", type=int, default=d.text_len)
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attention", nargs="+", default=[d.attention])
    p.add_argument("--remat", nargs="+", default=[d.remat])
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--out", default="bench_dit_accel.json")
    a = p.parse_args()
    runs = []
    for attention, remat in itertools.product(a.attention, a.remat):
        try:
            opts = AccelOptions(variant=a.variant, frames=a.video[0], height=a.video[1], width=a.video[2],
                                batch=a.batch, text_len=a.text_len, dtype=a.dtype, attention=attention,
                                remat=remat, steps=a.steps, warmup=a.warmup)
            opts.latent_grid()
        except ValueError as e:
            sys.exit(f"error: {e}")
        runs.append(opts)
    results = []
    for opts in runs:
        results.append(run_isolated(opts))
        print(format_results(results[-1:]).splitlines()[-1], flush=True)
    print("\n" + format_results(results))
    with open(a.out, "w") as f:
        json.dump({"runs": results, "options": [dataclasses.asdict(o) for o in runs]}, f, indent=1)
    print(f"\nwrote {a.out}")
    if all("error" in r for r in results):
        sys.exit("error: every configuration failed (see the table); on CPU use scripts/bench_dit.py instead")


if __name__ == "__main__":
    main()
