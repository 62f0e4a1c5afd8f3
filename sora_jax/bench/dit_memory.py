"""Compiled peak memory of a DiT train step vs sequence length (compile-only, nothing runs).

The figure is XLA's buffer plan of the jitted AdamW step (`memory_analysis`): arguments (params,
optimiser state, batch) + outputs + temporaries - the outputs aliased to donated arguments, i.e.
what an accelerator would have to hold at once, independent of the host allocator. Each size
compiles in its own interpreter (`run_isolated`), so one compile's caches cannot disturb another.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.bench.harness import run_in_fresh_process
from sora_jax.models.dit import DiT, dit_config

GIB = 1024**3


def grid_for_tokens(tokens: int, frames: int = 16) -> tuple[int, int, int]:
    """Latent (T, H, W) with `frames` latent frames and square frames giving `tokens` at patch 1x2x2."""
    side = math.isqrt(tokens // frames) if tokens % frames == 0 else 0
    if side == 0 or frames * side * side != tokens:
        raise ValueError(f"{tokens} tokens is not {frames} frames x a square token grid; use e.g. 4096, 16384, 65536")
    return frames, 2 * side, 2 * side


def train_step_memory(
    tokens: int, variant: str = "S", attention: str = "blockwise", remat: str = "full",
    batch: int = 1, text_len: int = 32,
) -> dict[str, Any]:
    """Compiled buffer sizes (bytes) of one donated AdamW train step of DiT(variant) at `tokens` per example."""
    from sora_jax.bench.dit_speed import jax_fns

    cfg = dit_config(variant, attention=attention, remat=remat)
    grid = grid_for_tokens(tokens)
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    batch_spec = {
        "latents": spec((batch, *grid, cfg.in_channels)), "timesteps": spec((batch,)),
        "text": spec((batch, text_len, cfg.text_dim)), "target": spec((batch, *grid, cfg.out_channels)),
    }
    fns = jax_fns(cfg, lr=1e-4, weight_decay=0.01)
    small = (spec((1, 1, 2, 2, cfg.in_channels)), spec((1,)), spec((1, 1, cfg.text_dim)))
    params = nn.unbox(jax.eval_shape(DiT(cfg).init, jax.random.key(0), *small)["params"])  # ShapeDtypeStructs
    state = (params, jax.eval_shape(fns["init_opt"], params))
    t0 = time.perf_counter()
    compiled = jax.jit(fns["step"], donate_argnums=0).lower(state, batch_spec).compile()
    m = compiled.memory_analysis()
    sizes = {
        "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
    }
    peak = sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"] - sizes["alias_bytes"]
    n_params = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(params))
    return {
        "tokens": tokens, "grid": list(grid), "batch": batch, "text_len": text_len, "variant": variant,
        "attention": attention, "remat": remat, "params": n_params, **sizes, "peak_bytes": peak,
        "peak_gib": peak / GIB, "compile_s": time.perf_counter() - t0, "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def train_step_memory_at(tokens: str) -> dict[str, Any]:
    """`train_step_memory` of a token count given as text (the entry point `run_isolated` starts)."""
    return train_step_memory(int(tokens))


def run_isolated(tokens: int, timeout: float | None = 1800) -> dict[str, Any]:
    """`train_step_memory` in a fresh interpreter; an 'error' entry if that process fails."""
    r = run_in_fresh_process("sora_jax.bench.dit_memory:train_step_memory_at", [str(tokens)], timeout=timeout)
    return {"tokens": tokens, "error": r["error"]} if "error" in r else r


def sweep(tokens: list[int]) -> dict[str, Any]:
    """Memory at each size (own process each), bytes per token between sizes, and the 16 GiB verdict."""
    load_start = list(os.getloadavg())
    points = [run_isolated(n) for n in tokens]
    ok = [p for p in points if "error" not in p]
    # growth per token between successive sizes: constant = linear in sequence length
    slopes = [(b["peak_bytes"] - a["peak_bytes"]) / (b["tokens"] - a["tokens"]) for a, b in zip(ok, ok[1:])]
    return {
        "points": points,
        "bytes_per_token_between_sizes": slopes,
        "fits_16gib": {p["tokens"]: p["peak_bytes"] <= 16 * GIB for p in ok},
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
    }


def format_sweep(s: dict[str, Any]) -> str:
    """Markdown table of a sweep: sizes, buffer plan parts, peak and compile time."""
    rows = ["| tokens | latent grid | arguments | outputs (aliased) | temporaries | peak | compile |",
            "|---|---|---|---|---|---|---|"]
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    for p in s["points"]:
        if "error" in p:
            rows.append(f"| {p['tokens']} | failed: {p['error']} | | | | | |")
            continue
        rows.append(
            f"| {p['tokens']} | {'x'.join(map(str, p['grid']))} | {mib(p['argument_bytes'])} | "
            f"{mib(p['output_bytes'])} ({mib(p['alias_bytes'])}) | {mib(p['temp_bytes'])} | "
            f"{p['peak_gib']:.2f} GiB | {p['compile_s']:.0f} s |"
        )
    slopes = ", ".join(f"{b / 1024:.1f} KiB" for b in s["bytes_per_token_between_sizes"])
    rows.append(f"peak growth per token between sizes: {slopes}; fits 16 GiB: {s['fits_16gib']}; "
                f"load {s['loadavg_start'][0]:.2f} -> {s['loadavg_end'][0]:.2f}")
    return "\n".join(rows)

