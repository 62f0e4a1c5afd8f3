"""Input readers: time the train loop's thread spends fetching a batch, beside a simulated step.

The DiT trains from an ArrayRecord latent cache, and its loop fetches each batch in the thread that
dispatches the step. When the step is short (DiT S on a GPU: about 20-30 ms), whatever `next()`
costs that thread is a direct loss. This compares the reader as shipped with grain's default read
options and no batch prefetch (the reader before), in one run. The VAE trains from the physics
dataset's records through `pipeline.make_loader` (a grain DataLoader); it is timed as shipped, with
4 read threads but batches built in `next()`, and with grain's default read options too. Each is
timed against a consumer that either does nothing or sleeps for `step_ms`. Sleeping releases the
GIL, as waiting on an accelerator does.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import grain

from sora_jax.bench.data_speed import DataBenchOptions, write_synthetic_cache
from sora_jax.bench.harness import machine_info
from sora_jax.data.physics_tfds import build_physics_dataset
from sora_jax.data.pipeline import close_read_threads, make_loader
from sora_jax.train.latent_records import make_cache_loader


@dataclasses.dataclass(frozen=True)
class ReaderBenchOptions:
    """The cache (the physics reference's latent shape by default) and how long to time."""

    clips: int = 256
    # 128x128x17 under the synthetic cache's 4x8x8 gives 5x16x16x16 latents (+ 24x384 text): the record
    # of the physics reference's cache (64 px under its 4x4x4 VAE).
    bucket: tuple[int, int, int] = (128, 128, 17)
    batch: int = 16
    batches: int = 300
    warmup: int = 20
    step_ms: tuple[float, ...] = (0.0, 20.0)
    # The VAE's loader: the physics reference's batch and crop, on clips generated for the run.
    vae_clips: int = 128
    vae_batch: int = 4
    vae_crop: int = 32


# The reader before this benchmark's change: grain's default ReadOptions, batches built on demand.
READERS: dict[str, dict[str, Any]] = {
    "grain defaults, no batch prefetch": {"read_options": grain.ReadOptions(), "batches_ahead": 0},
    "as shipped": {},
}
# The VAE loader before session 29 (grain's default ReadOptions), after it (4 read threads), and as
# shipped (also batches assembled two ahead in a thread).
VAE_READERS: dict[str, dict[str, Any]] = {
    "VAE loader, grain defaults, no batch prefetch": {"read_options": grain.ReadOptions(), "batches_ahead": 0},
    "VAE loader, 4 read threads, no batch prefetch": {"batches_ahead": 0},
    "VAE loader, as shipped": {},
}


def time_reader(cache_dir: Path, opts: ReaderBenchOptions, step_ms: float, **loader_kw) -> dict[str, float]:
    """The latent-cache loader's ms per step and ms inside next() per step."""
    h, w, f = opts.bucket
    return _time_next(make_cache_loader(cache_dir, {f"{h}x{w}x{f}": opts.batch}, seed=0, **loader_kw), opts, step_ms)


def time_vae_loader(source: Any, opts: ReaderBenchOptions, step_ms: float, **loader_kw) -> dict[str, float]:
    """The VAE's record loader's ms per step and ms inside next() per step."""
    loader = make_loader(source, batch_size=opts.vae_batch, seed=0, crop=opts.vae_crop, **loader_kw)
    return _time_next(iter(loader), opts, step_ms)


def _time_next(it: Any, opts: ReaderBenchOptions, step_ms: float) -> dict[str, float]:
    """ms per step and ms inside next() per step, over `opts.batches` batches after a warm-up; closes `it`."""
    try:
        for _ in range(opts.warmup):
            next(it)
        inside = 0.0
        t0 = time.perf_counter()
        for _ in range(opts.batches):
            t = time.perf_counter()
            next(it)
            inside += time.perf_counter() - t
            if step_ms:
                time.sleep(step_ms / 1e3)
        total = time.perf_counter() - t0
    finally:
        # A row's read threads would otherwise go on filling its buffers while the next row is timed.
        close_read_threads(it)
    return {"ms_per_step": 1e3 * total / opts.batches, "ms_in_next": 1e3 * inside / opts.batches}


def run_benchmark(opts: ReaderBenchOptions, workdir: str | None = None) -> dict[str, Any]:
    """Every reader against every consumer (a synthetic cache; generated physics clips); returns a JSON-able dict."""
    data = DataBenchOptions(clips=opts.clips, bucket=opts.bucket, batch=opts.batch)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cache = Path(tmp) / "cache"
        write_synthetic_cache(cache, data)
        rows = [{"reader": name, "step_ms": ms, **time_reader(cache, opts, ms, **kw)}
                for ms in opts.step_ms for name, kw in READERS.items()]
        vae_source = build_physics_dataset(str(Path(tmp) / "physics"), num_train=opts.vae_clips, num_test=8)["train"]
        rows += [{"reader": name, "step_ms": ms, **time_vae_loader(vae_source, opts, ms, **kw)}
                 for ms in opts.step_ms for name, kw in VAE_READERS.items()]
    return {"options": dataclasses.asdict(opts), "machine": machine_info(), "rows": rows}


def format_report(r: dict[str, Any]) -> str:
    """Markdown table: per consumer, each reader's ms per step and ms in next()."""
    o = r["options"]
    lines = [f"cache of {o['clips']} clips, bucket {'x'.join(map(str, o['bucket']))}, batch {o['batch']}; VAE loader "
             f"on {o['vae_clips']} physics clips, batch {o['vae_batch']}, crop {o['vae_crop']}; "
             f"{o['batches']} batches timed", "",
             "| simulated step | reader | ms per step | ms in next() |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['step_ms']:.0f} ms | {row['reader']} | {row['ms_per_step']:.2f} | {row['ms_in_next']:.2f} |")
    return "\n".join(lines)
