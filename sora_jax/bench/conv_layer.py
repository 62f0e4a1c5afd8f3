"""One causal 3x3x3 VAE conv layer, timed four ways on the same CPU: the per-layer view of bench_vae.

JAX as one 3D convolution (`VAEConfig.conv_impl="xla"`), JAX as per-frame 2D convs summed over the
time taps (`vae_blocks.conv3d_sum_time`, the CPU default), JAX as Winograd F(2x2, 3x3) (a prototype
kept here, not a model lowering: it lost, see docs/benchmarks.md) and torch's `F.conv3d` (diffusers'
call), with the conv backend torch picks for the shape. Same input and weights; outputs compared.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sora_jax.bench.harness import default_threads, interleaved, summarize
from sora_jax.models.vae_blocks import conv3d_sum_time

_PADDING = ((0, 0), (1, 1), (1, 1))  # the input already holds the 2 causal past frames


def _winograd_input_rows(x: jax.Array, axis: int) -> list[jax.Array]:
    """B^T of F(2, 3) along `axis`: 4-wide windows at stride 2 -> 4 transformed rows, one per tile."""
    tiles = (x.shape[axis] - 2) // 2
    d = [lax.slice_in_dim(x, k, k + 2 * (tiles - 1) + 1, 2, axis=axis) for k in range(4)]
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_kernel_rows(w: jax.Array, axis: int) -> jax.Array:
    """G of F(2, 3) along a 3-tap `axis` -> 4 taps."""
    g0, g1, g2 = (lax.index_in_dim(w, k, axis, keepdims=False) for k in range(3))
    return jnp.stack([g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2], axis=axis)


def winograd_conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """[N, T+2, H, W, C] x [3, 3, 3, C, O] causal conv (spatial padding 1) by Winograd F(2x2, 3x3).

    Per 2x2 output tile y = A^T [(G g G^T) * (B^T d B)] A (Lavin & Gray, 2016): 16 multiplies
    instead of 36, i.e. 16 batched [tiles, C] x [C, O] matmuls per time tap, 2.25x fewer FLOPs than
    the direct conv. Whether XLA:CPU turns that into time is what the benchmark measures.
    """
    n, t, h, w, c = x.shape
    kt, o = kernel.shape[0], kernel.shape[-1]
    th, tw = -(-h // 2), -(-w // 2)
    x = jnp.pad(x, ((0, 0), (0, 0), (1, 1 + 2 * th - h), (1, 1 + 2 * tw - w), (0, 0)))
    v = jnp.stack([col for row in _winograd_input_rows(x, 2) for col in _winograd_input_rows(row, 3)])
    # v: [16, N, T+2, th, tw, C]; u: [16, kt, C, O]
    u = _winograd_kernel_rows(_winograd_kernel_rows(kernel, 1), 2).transpose(1, 2, 0, 3, 4).reshape(16, kt, c, o)
    t_out = t - kt + 1
    m = sum(
        jnp.einsum("pntyxc,pco->pntyxo", v[:, :, k : k + t_out], u[:, k])  # [16, N, T, th, tw, O]
        for k in range(kt)
    ).reshape(4, 4, n, t_out, th, tw, o)
    rows = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])  # A^T along H
    y = jnp.stack([jnp.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], axis=-2) for r in rows], axis=3)
    return y.reshape(n, t_out, 2 * th, 2 * tw, o)[:, :, :h, :w]  # [N, T, H, W, O]


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
    winograd = jax.jit(winograd_conv3d)
    xj, wj = jax.numpy.asarray(x), jax.numpy.asarray(w)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))  # [B, C, T, H, W]
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(4, 3, 0, 1, 2)))  # [O, I, kT, kH, kW]

    def torch_conv() -> Any:
        with torch.inference_mode():
            return torch.nn.functional.conv3d(xt, wt, padding=(0, 1, 1))

    ref = np.asarray(xla(xj, wj))
    agreement = {
        "sum_time": float(np.abs(np.asarray(sum_time(xj, wj)) - ref).max()),
        "winograd": float(np.abs(np.asarray(winograd(xj, wj)) - ref).max()),
        "torch": float(np.abs(torch_conv().numpy().transpose(0, 2, 3, 4, 1) - ref).max()),
        "ref_max_abs": float(np.abs(ref).max()),
    }
    fns = {
        "jax_xla_3d": lambda: xla(xj, wj).block_until_ready(),
        "jax_sum_time": lambda: sum_time(xj, wj).block_until_ready(),
        "jax_winograd": lambda: winograd(xj, wj).block_until_ready(),
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
    """A markdown table row: layer, GFLOP/s of each version (direct-conv FLOPs), torch's backend, load."""
    lay, g = r["layer"], r["gflops"]
    shape = f"{lay['batch']}x{lay['frames']}x{lay['size']}x{lay['size']}, {lay['channels_in']}->{lay['channels_out']}"
    return (f"| {shape} | {g['jax_xla_3d']:.0f} | {g['jax_sum_time']:.0f} | {g['jax_winograd']:.0f} "
            f"| {g['torch_conv3d']:.0f} ({r['torch_backend']}) | {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f} |")
