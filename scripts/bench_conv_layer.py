"""GFLOP/s of one causal 3x3x3 conv: JAX 3D conv, JAX sum of 2D convs, JAX Winograd, torch conv3d.

Each LAYER is BATCHxFRAMESxSIZE:CHANNELS (output frames; channels in = out). Prints a markdown
table and writes JSON.

    python scripts/bench_conv_layer.py 1x4x96:96 1x4x96:32 2x4x96:32
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU comparison, even where an accelerator exists

from sora_jax.bench.conv_layer import ConvLayer, format_row, run_layer  # noqa: E402


def _layer(text: str, repeats: int) -> ConvLayer:
    try:
        shape, channels = text.split(":")
        batch, frames, size = (int(v) for v in shape.split("x"))
        return ConvLayer(batch, frames, size, int(channels), int(channels), repeats)
    except ValueError:
        raise argparse.ArgumentTypeError(f"layer {text!r} is not BATCHxFRAMESxSIZE:CHANNELS, e.g. 1x4x96:96") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("layers", nargs="+", help="BATCHxFRAMESxSIZE:CHANNELS")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_conv_layer.json")
    a = p.parse_args()
    layers = [_layer(t, a.repeats) for t in a.layers]
    print("| layer (out B x T x H x W, C in->out) | JAX 3D conv GFLOP/s | JAX sum_time GFLOP/s | JAX Winograd GFLOP/s "
          "| torch conv3d GFLOP/s (backend) | load |")
    print("|---|---|---|---|---|---|")
    results = []
    for layer in layers:
        results.append(run_layer(layer))
        print(format_row(results[-1]), flush=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
