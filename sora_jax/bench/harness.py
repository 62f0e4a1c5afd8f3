"""What every benchmark here shares: machine facts, interleaved timing, fresh-process runs, perturbed torch weights.

Timings alternate the compared functions call by call (A B A B ...) because the machine may be
shared: load drifts then hit every side alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax


def default_threads() -> int:
    """Cores this process may use: what XLA:CPU sizes its Eigen pool by (affinity, not cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """Cores, thread counts, versions and load: what a timing needs to be read."""
    import diffusers
    import flax
    import jaxlib
    import torch

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": default_threads(),
        "jax_threads": default_threads(),  # XLA:CPU's pool; not settable per process
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }


def summarize(times: list[float]) -> dict[str, Any]:
    """Median, min and every time of a list of wall times (the timing fields of every benchmark JSON)."""
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall time of each fn per round, fns alternating within a round; warm-up rounds dropped."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return times


def run_in_fresh_process(
    target: str, args: list[str], xla_flags: str = "", timeout: float | None = None, platforms: str | None = "cpu"
) -> dict[str, Any]:
    """Call `module:function(*args)` (returning a JSON-able dict) in a fresh Python with extra XLA flags.

    XLA reads its flags once, when the backend starts, so a flag set needs its own process. A
    failure comes back as {"xla_flags", "error": last lines of output} so a sweep goes on.
    """
    module, func = target.split(":")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    if platforms is not None:
        env.setdefault("JAX_PLATFORMS", platforms)
    code = (
        "import json, sys\n"
        f"from {module} import {func}\n"
        f"r = {func}(*sys.argv[1:])\n"
        "sys.stdout.write('\\n@@RESULT@@' + json.dumps(r))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"xla_flags": xla_flags, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1])


def perturb_weights(model: Any, scale: float, seed: int | None = 0) -> Any:
    """A torch module with every parameter moved off its init by N(0, scale^2) noise, in eval mode.

    Zero/one inits (norm gammas, zero heads) would let a weight mix-up in a conversion go unseen.
    `seed` None keeps the caller's torch RNG stream.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def write_report(result: dict[str, Any], report: str, out: str) -> None:
    """Print a benchmark's table and write its result as JSON to `out` (what each scripts/bench_*.py ends with)."""
    print(report)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
