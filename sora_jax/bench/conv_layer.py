"""One causal 3x3x3 VAE conv layer, timed three ways on the same CPU: the per-layer view of bench_vae.

JAX as one 3D convolution (`VAEConfig.conv_impl="xla"`), JAX as per-frame 2D convs summed over the
time taps (`vae_blocks.conv3d_sum_time`, the CPU default) and torch's `F.conv3d` (diffusers' call),
with the conv backend torch picks for the shape. Same input and weights; outputs compared.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax import lax

from sora_jax.bench.harness import default_threads, interleaved, summarize
from sora_jax.models.vae_blocks import conv3d_sum_time

_PADDING = ((0, 0), (1, 1), (1, 1))  # the input already holds the 2 causal past frames


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """Output shape [batch, frames, size, size, channels_out] of a 3x3x3 conv with `channels_in` inputs."""

    batch: int = 1
    frames: int = 4
    size: int = 96
    channels_in: int = 96
    channels_out: int = 96
    repeats: int = 5

    @property
    def flops(self) -> int:
        """2 x multiply-adds of the direct convolution."""
        return 2 * self.batch * self.frames * self.size**2 * 27 * self.channels_in * self.channels_out


def run_layer(layer: ConvLayer) -> dict[str, Any]:
    """Time the three versions alternately; GFLOP/s of the direct-conv FLOPs, torch's backend, agreement."""
    import torch

    torch.set_num_threads(default_threads())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((layer.batch, layer.frames + 2, layer.size, layer.size, layer.channels_in), np.float32)
    w = rng.standard_normal((3, 3, 3, layer.channels_in, layer.channels_out), np.float32) * 0.05
    dims = ("NDHWC", "DHWIO", "NDHWC")
    xla = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1, 1), _PADDING, dimension_numbers=dims))
    sum_time = jax.jit(lambda x, w: conv3d_sum_time(x, w, (1, 1, 1), _PADDING))
    xj, wj = jax.numpy.asarray(x), jax.numpy.asarray(w)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))  # [B, C, T, H, W]
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(4, 3, 0, 1, 2)))  # [O, I, kT, kH, kW]

    def torch_conv() -> Any:
        with torch.inference_mode():
            return torch.nn.functional.conv3d(xt, wt, padding=(0, 1, 1))

    ref = np.asarray(xla(xj, wj))
    agreement = {
        "sum_time": float(np.abs(np.asarray(sum_time(xj, wj)) - ref).max()),
        "torch": float(np.abs(torch_conv().numpy().transpose(0, 2, 3, 4, 1) - ref).max()),
        "ref_max_abs": float(np.abs(ref).max()),
    }
    fns = {
        "jax_xla_3d": lambda: xla(xj, wj).block_until_ready(),
        "jax_sum_time": lambda: sum_time(xj, wj).block_until_ready(),
        "torch_conv3d": torch_conv,
    }
    load = list(os.getloadavg())
    timings = {k: summarize(v) for k, v in interleaved(fns, layer.repeats, warmup=1).items()}
    backend = torch._C._select_conv_backend(xt, wt, None, [1, 1, 1], [0, 1, 1], [1, 1, 1], False, [0, 0, 0], 1, None)
    return {
        "layer": dataclasses.asdict(layer),
        "gflops": {k: layer.flops / t["median_s"] / 1e9 for k, t in timings.items()},
        "timings": timings,
        "torch_backend": str(backend).rsplit(".", 1)[-1],
        "agreement_max_abs_diff": agreement,
        "threads": default_threads(),
        "loadavg_start": load,
        "loadavg_end": list(os.getloadavg()),
    }


def format_row(r: dict[str, Any]) -> str:
    """A markdown table row: layer, GFLOP/s of each version, torch's backend, load."""
    lay, g = r["layer"], r["gflops"]
    shape = f"{lay['batch']}x{lay['frames']}x{lay['size']}x{lay['size']}, {lay['channels_in']}->{lay['channels_out']}"
    return (f"| {shape} | {g['jax_xla_3d']:.0f} | {g['jax_sum_time']:.0f} | {g['torch_conv3d']:.0f} "
            f"({r['torch_backend']}) | {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f} |")
