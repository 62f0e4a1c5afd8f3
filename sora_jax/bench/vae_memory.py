"""Peak memory of VAE decode/encode vs video length, chunked codec vs whole clip.

Each (mode, frames) point runs in its own interpreter (`run_isolated`), so peak RSS is
that point's alone. Two measures per point:
- XLA's compiled buffer plan (`memory_analysis`): arguments + outputs + temporaries, the figure an
  accelerator would need, independent of the allocator;
- the process's peak RSS during one real call: the kernel's high-water mark (VmHWM) is reset after
  compilation (`/proc/self/clear_refs`), because LLVM's compile-time peak would otherwise hide the
  call; reported also as growth over the RSS just before the call (weights, inputs and the
  compiled program already resident), i.e. the memory the call itself needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from sora_jax.bench.harness import run_in_fresh_process
from sora_jax.models.vae import CausalVAE, VAEConfig, init_vae_variables
from sora_jax.models.vae_codec import VideoCodec

CONFIGS = {"tiny": VAEConfig.tiny, "wan2.1": VAEConfig.wan21}


@dataclasses.dataclass(frozen=True)
class MemoryPoint:
    """One measurement: which VAE, which op, which path, what input size."""

    config: str = "wan2.1"
    op: str = "decode"  # decode | encode
    chunked: bool = True
    frames: int = 17
    size: int = 128  # height
    width: int | None = None  # None: square
    batch: int = 1
    run: bool = True  # False: compiled buffer plan only


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak-RSS high-water mark (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_point(p: MemoryPoint) -> dict[str, Any]:
    """Compile (and optionally run) one point in this process; returns its memory figures in MiB."""
    cfg = CONFIGS[p.config]()
    codec = VideoCodec(CausalVAE(cfg), chunked=p.chunked)
    params = jax.jit(lambda k: jax.tree.map(lambda x: x, init_vae_variables(cfg, k)))(jax.random.key(0))
    params = jax.tree.map(lambda b: getattr(b, "value", b), params, is_leaf=lambda b: hasattr(b, "value"))
    width = p.width or p.size
    t, h, w, z = cfg.latent_shape(p.frames, p.size, width)
    if p.op == "decode":
        x = jax.random.normal(jax.random.key(1), (p.batch, t, h, w, z))
        fn = codec.decode_fn
    else:
        x = jax.random.uniform(jax.random.key(1), (p.batch, p.frames, p.size, width, 3), minval=-1, maxval=1)
        fn = codec.encode_fn
    jax.block_until_ready((params, x))
    baseline = _status_mib("VmRSS")
    compiled = jax.jit(fn).lower(params, x).compile()
    m = compiled.memory_analysis()
    mib = 1 / 2**20
    out: dict[str, Any] = dataclasses.asdict(p) | {
        "argument_mib": m.argument_size_in_bytes * mib,
        "output_mib": m.output_size_in_bytes * mib,
        "temp_mib": m.temp_size_in_bytes * mib,
        "compiled_peak_mib": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) * mib,
        "rss_baseline_mib": baseline,
    }
    if p.run:
        out["rss_peak_is_call_only"] = _reset_peak_rss()
        before = _status_mib("VmRSS")
        jax.block_until_ready(compiled(params, x))
        out["rss_peak_mib"] = _status_mib("VmHWM")
        out["rss_growth_mib"] = out["rss_peak_mib"] - before
    return out


def measure_from_json(point_json: str) -> dict[str, Any]:
    """`measure_point` of a JSON-encoded MemoryPoint (the entry point `run_isolated` starts)."""
    return measure_point(MemoryPoint(**json.loads(point_json)))


def run_isolated(p: MemoryPoint) -> dict[str, Any]:
    """`measure_point` in a fresh interpreter, so peak RSS belongs to this point alone."""
    # platforms=None: the backend the caller's environment selects, as for an in-process run
    r = run_in_fresh_process("sora_jax.bench.vae_memory:measure_from_json", [json.dumps(dataclasses.asdict(p))],
                             platforms=None)
    return dataclasses.asdict(p) | {"error": r["error"]} if "error" in r else r


def sweep(points: list[MemoryPoint]) -> dict[str, Any]:
    """Measure every point in its own process and add peak ratios relative to the shortest video."""
    rows = [run_isolated(p) for p in points]
    for row in rows:
        base = [r for r in rows if "error" not in r and r["op"] == row["op"] and r["chunked"] == row["chunked"]]
        if "error" in row or not base:
            continue
        first = min(base, key=lambda r: r["frames"])
        row["frames_ratio"] = row["frames"] / first["frames"]
        row["compiled_peak_ratio"] = row["compiled_peak_mib"] / first["compiled_peak_mib"]
        if "rss_peak_mib" in row and "rss_peak_mib" in first:
            row["rss_peak_ratio"] = row["rss_peak_mib"] / first["rss_peak_mib"]
            row["rss_growth_ratio"] = row["rss_growth_mib"] / max(first["rss_growth_mib"], 1e-9)
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
           "cpu_count": os.cpu_count()}
    return {"env": env, "rows": rows}

