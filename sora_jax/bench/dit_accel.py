"""Train-step time, memory and MFU of the DiT on an accelerator (GPU or TPU), e.g. Wan2.1-1.3B at 480x832x81.

A train step is forward + MSE loss + backward + AdamW (float32 master weights and moments, compute
in `dtype`), jitted with the state donated: the same step as the CPU benchmark (`dit_speed.jax_fns`).
Inputs are random; nothing is loaded. Each configuration runs in its own interpreter, so an
out-of-memory configuration is reported and the sweep goes on.

MFU = analytic model FLOPs of a train step (`dit_speed.dit_flops`: 3 forwards, remat recompute not
counted) / median step time, against two peaks: a bf16 matmul measured in the same process (what
this chip delivers to a large GEMM) and the chip's datasheet dense bf16 rate where it is known.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.bench.harness import interleaved, run_in_fresh_process, summarize

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s, by device_kind.
DATASHEET_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
    "NVIDIA H200": 989.4e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,
}
# The Wan VAE's compression: 4x in time (causal: first frame alone), 8x in space.
VAE_STRIDES = (4, 8, 8)


@dataclasses.dataclass(frozen=True)
class AccelOptions:
    """One configuration: model variant, pixel video size, batch, text length, precision, attention, remat."""

    variant: str = "wan2.1-1.3b"
    frames: int = 81
    height: int = 480
    width: int = 832
    batch: int = 1
    text_len: int = 512  # Wan pads umT5 text to 512 tokens
    dtype: str = "bfloat16"
    attention: str = "cudnn"
    remat: str = "full"
    steps: int = 8
    warmup: int = 2
    peak_size: int = 8192
    allow_cpu: bool = False  # tests only: a CPU step says nothing about accelerator MFU

    def latent_grid(self) -> tuple[int, int, int]:
        """Latent (T, H, W) of the pixel video under the VAE's strides; one clear error if it does not divide."""
        st, sh, sw = VAE_STRIDES
        if (self.frames - 1) % st or self.height % (2 * sh) or self.width % (2 * sw):
            raise ValueError(
                f"video {self.frames}x{self.height}x{self.width} does not fit the VAE + 1x2x2 patch: frames "
                f"must be 4k+1 and height/width multiples of 16 (e.g. 81x480x832)"
            )
        return (self.frames - 1) // st + 1, self.height // sh, self.width // sw

    @property
    def tokens(self) -> int:
        """Video tokens per example (patch 1x2x2)."""
        t, h, w = self.latent_grid()
        return t * (h // 2) * (w // 2)


def matmul_peak(n: int, dtype: str = "bfloat16", repeats: int = 50) -> dict[str, Any]:
    """Median FLOP/s of a jitted n x n x n matmul on random data, output in `dtype` (as the model's)."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype) for _ in range(2))
    mm = jax.jit(jnp.matmul).lower(a, b).compile()
    timing = summarize(interleaved({"mm": lambda: mm(a, b).block_until_ready()}, repeats, warmup=3)["mm"])
    return {"n": n, "dtype": dtype, "median_s": timing["median_s"], "flops_per_s": 2.0 * n**3 / timing["median_s"]}


def train_step_benchmark(opts: AccelOptions) -> dict[str, Any]:
    """Compile and time one configuration's donated AdamW train step; a JSON-able dict."""
    import flax.linen as nn

    from sora_jax.bench.dit_speed import BenchOptions, dit_flops, jax_fns, make_inputs
    from sora_jax.models.dit import DiT, dit_config

    dtype = jnp.dtype(opts.dtype)
    cfg = dit_config(opts.variant, attention=opts.attention, remat=opts.remat, dtype=dtype, param_dtype=jnp.float32)
    grid = opts.latent_grid()
    device = jax.devices()[0]
    if device.platform == "cpu" and not opts.allow_cpu:
        raise ValueError("this benchmark needs a GPU or TPU but JAX runs on cpu; on CPU use scripts/bench_dit.py")
    batch = jax.device_put(make_inputs(BenchOptions(grid=grid, batch=opts.batch, text_len=opts.text_len), cfg))
    fns = jax_fns(cfg, lr=1e-4, weight_decay=0.01)
    # Parameters do not depend on the grid: initialise from a 1-token example, on the device.
    small = (jnp.zeros((1, 1, 2, 2, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.text_dim)))
    params = jax.jit(lambda k: nn.unbox(DiT(cfg).init(k, *small)["params"]))(jax.random.key(0))
    state = (params, jax.jit(fns["init_opt"])(params))
    n_params = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(params))

    t0 = time.perf_counter()
    compiled = jax.jit(fns["step"], donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    plan = {
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
    }
    times, losses = [], []
    for i in range(opts.warmup + opts.steps):
        t0 = time.perf_counter()
        state, loss = compiled(state, batch)
        losses.append(float(loss))  # blocks until the step is done
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss in the timed steps: {losses}")
    stats = device.memory_stats() or {}
    peak = matmul_peak(opts.peak_size)
    flops = dit_flops(cfg, opts.batch, opts.tokens, opts.text_len)["train_step"]
    step_s = statistics.median(times)
    datasheet = DATASHEET_BF16_PEAK.get(device.device_kind)
    return {
        "options": dataclasses.asdict(opts), "latent_grid": list(grid), "tokens": opts.tokens,
        "params": n_params, "device": device.device_kind, "platform": device.platform,
        "jax": jax.__version__, "compile_s": compile_s, "step_median_s": step_s, "step_min_s": min(times),
        "step_times_s": times, "losses": losses, "model_flops_per_step": flops,
        "achieved_flops_per_s": flops / step_s, "matmul_peak": peak,
        "mfu_vs_measured_matmul": flops / step_s / peak["flops_per_s"],
        "datasheet_bf16_peak": datasheet, "mfu_vs_datasheet": flops / step_s / datasheet if datasheet else None,
        "buffer_plan": plan, "device_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "device_bytes_limit": stats.get("bytes_limit"),
    }


def train_step_benchmark_json(options_json: str) -> dict[str, Any]:
    """`train_step_benchmark` of options given as JSON text (the entry point a fresh process calls)."""
    return train_step_benchmark(AccelOptions(**json.loads(options_json)))


def run_isolated(opts: AccelOptions, timeout: float | None = 900) -> dict[str, Any]:
    """One configuration in a fresh interpreter on the default accelerator; an 'error' entry if it fails."""
    r = run_in_fresh_process(
        "sora_jax.bench.dit_accel:train_step_benchmark_json", [json.dumps(dataclasses.asdict(opts))],
        timeout=timeout, platforms=None,
    )
    return {"options": dataclasses.asdict(opts), "error": r["error"]} if "error" in r else r


def format_results(results: list[dict[str, Any]]) -> str:
    """Markdown table: configuration, tokens, step time, achieved TFLOP/s, both MFUs, memory, compile time."""
    rows = ["| variant | video (latent) | tokens x batch | dtype | attention | remat | step | TFLOP/s | "
            "MFU (measured bf16 matmul) | MFU (datasheet) | device peak mem | compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        o = r["options"]
        video = f"{o['frames']}x{o['height']}x{o['width']}"
        if "error" in r:
            rows.append(f"| {o['variant']} | {video} | | {o['dtype']} | {o['attention']} | {o['remat']} | "
                        f"failed: {r['error'][:200]} | | | | | |")
            continue
        mem = r["device_peak_bytes_in_use"]
        ds = r["mfu_vs_datasheet"]
        rows.append(
            f"| {o['variant']} | {video} ({'x'.join(map(str, r['latent_grid']))}) | {r['tokens']} x {o['batch']} | "
            f"{o['dtype']} | {o['attention']} | {o['remat']} | {r['step_median_s'] * 1e3:.0f} ms | "
            f"{r['achieved_flops_per_s'] / 1e12:.0f} | {r['mfu_vs_measured_matmul']:.1%} "
            f"(peak {r['matmul_peak']['flops_per_s'] / 1e12:.0f}) | {'n/a' if ds is None else f'{ds:.1%}'} | "
            f"{'n/a' if mem is None else f'{mem / 2**30:.1f} GiB'} | {r['compile_s']:.0f} s |"
        )
    return "\n".join(rows)
