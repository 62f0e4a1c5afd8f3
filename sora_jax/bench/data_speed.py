"""Input-pipeline throughput against the train step's consumption, in clips per second.

Three rates on the same machine in one run:
  - decode: real MP4s through the grain loader (PyAV decode, frame sampling, crop-resize into a
    bucket, batching) for several grain worker counts;
  - cache read: the same number of clips' latents + text embeddings from an ArrayRecord latent cache
    (what `sora-jax train` reads);
  - train step: the DiT update (tiny and S) on batches of that bucket's latent shape.
Input is not the bottleneck when a source delivers clips faster than the step consumes them.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs import dit as dit_configs
from sora_jax.bench.harness import machine_info, summarize
from sora_jax.data.buckets import Bucket, BucketSpec
from sora_jax.data.real_video import make_bucketed_loader
from sora_jax.data.video import write_mp4
from sora_jax.models.dit import DiT, dit_config
from sora_jax.train.dit_trainer import make_dit_step
from sora_jax.train.latent_records import build_cache, make_cache_loader
from sora_jax.train.state import TrainState, make_optimizer


@dataclasses.dataclass(frozen=True)
class DataBenchOptions:
    """What to measure: the synthetic clips, the bucket, the worker counts, the step configs."""

    clips: int = 48
    src_frames: int = 33
    src_height: int = 288
    src_width: int = 384
    bucket: tuple[int, int, int] = (256, 256, 17)
    batch: int = 8
    workers: tuple[int, ...] = (0, 1, 2)
    batches: int = 12  # timed batches per measurement, after one warm-up batch
    variants: tuple[str, ...] = ("tiny", "S")
    latent_channels: int = 16
    text_len: int = 24
    text_dim: int = 384
    step_repeats: int = 5


def write_clips(folder: Path, opts: DataBenchOptions) -> list[Path]:
    """Synthetic MP4s with moving content (so the codec does real work) and captions."""
    rng = np.random.default_rng(0)
    t, h, w = opts.src_frames, opts.src_height, opts.src_width
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(opts.clips):
        phase = rng.uniform(0, 2 * np.pi, 3)
        frames = np.stack([
            np.stack([127 + 120 * np.sin(xx / (9 + c) + yy / 13 + 0.3 * f + phase[c]) for c in range(3)], -1)
            for f in range(t)]).astype(np.uint8)
        paths.append(write_mp4(folder / f"clip{i:03d}.mp4", frames))
        (folder / f"clip{i:03d}.txt").write_text(f"synthetic clip {i}")
    return paths


def _rate(it, batch: int, batches: int) -> dict[str, Any]:
    next(it)  # warm-up: worker start, first decode
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    return {"clips_per_s": batch * batches / dt, "seconds": dt, "batches": batches}


def decode_rates(folder: Path, opts: DataBenchOptions) -> dict[str, Any]:
    """Clips/s of the real-video grain loader per worker count."""
    h, w, f = opts.bucket
    spec = BucketSpec((Bucket(h, w, f, opts.batch),))
    out = {}
    for workers in opts.workers:
        loader = make_bucketed_loader(folder, spec, seed=0, worker_count=workers)
        out[f"workers={workers}"] = _rate(iter(loader), opts.batch, opts.batches)
    return out


def cache_read_rate(cache_dir: Path, opts: DataBenchOptions) -> dict[str, Any]:
    """Clips/s of the ArrayRecord latent-cache reader (shuffled, repeating)."""
    h, w, f = opts.bucket
    it = make_cache_loader(cache_dir, {f"{h}x{w}x{f}": opts.batch}, seed=0)
    return _rate(it, opts.batch, opts.batches)


def latent_shape(opts: DataBenchOptions) -> tuple[int, int, int, int]:
    """The bucket's latent (t, h, w, z) under 4x8x8 compression."""
    h, w, f = opts.bucket
    return (1 + (f - 1) // 4, h // 8, w // 8, opts.latent_channels)


def write_synthetic_cache(cache_dir: Path, opts: DataBenchOptions) -> None:
    """A latent cache of random records of the bucket's latent shape (the reader's cost only)."""
    h, w, f = opts.bucket
    name = f"{h}x{w}x{f}"
    rng = np.random.default_rng(0)
    z = latent_shape(opts)

    class _Batches:
        def __init__(self):
            self.i = 0

        def __next__(self):
            if self.i >= opts.clips // opts.batch:
                raise StopIteration
            self.i += 1
            return {"bucket": name, "n": opts.batch}

        def get_state(self):
            return {"i": self.i}

        def set_state(self, state):
            self.i = state["i"]

    def encode(batch):
        return [{"latents": rng.standard_normal(z).astype(np.float32),
                 "text": rng.standard_normal((opts.text_len, opts.text_dim)).astype(np.float32),
                 "text_mask": np.ones(opts.text_len, bool), "caption": "x", "bucket": name}
                for _ in range(batch["n"])]

    build_cache(cache_dir, _Batches(), encode, source={"synthetic": True})


def step_rate(variant: str, opts: DataBenchOptions) -> dict[str, Any]:
    """Clips/s the DiT train step consumes at the bucket's latent shape (one process, all its devices)."""
    cfg = dit_config(variant, in_channels=opts.latent_channels, out_channels=opts.latent_channels,
                     text_dim=opts.text_dim)
    model = DiT(cfg)
    config = dit_configs.get_config(f"variant={variant}")
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.standard_normal((opts.batch, *latent_shape(opts))), jnp.float32),
             "text": jnp.asarray(rng.standard_normal((opts.batch, opts.text_len, opts.text_dim)), jnp.float32),
             "text_mask": jnp.ones((opts.batch, opts.text_len), bool)}
    params = model.init(jax.random.key(0), batch["latents"], jnp.zeros((opts.batch,)), batch["text"],
                        batch["text_mask"])
    tx = make_optimizer(config.optim, 1000)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       ema_params=jax.tree.map(jnp.copy, params), tx=tx, ema_decay=0.999)
    step = jax.jit(make_dit_step(model, config.diffusion), donate_argnums=0)
    state, m = step(state, batch, jax.random.key(1))
    jax.block_until_ready(m)
    times = []
    for i in range(opts.step_repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch, jax.random.key(2 + i))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    s = summarize(times)
    tokens = int(np.prod(latent_shape(opts)[:3])) // 4  # patch 1x2x2
    return {"step_s": s, "clips_per_s": opts.batch / s["median_s"], "tokens_per_clip": tokens}


def run_benchmark(opts: DataBenchOptions, workdir: str | None = None) -> dict[str, Any]:
    """Measure decode, cache-read and train-step clip rates; returns a JSON-able dict."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        t0 = time.perf_counter()
        write_clips(folder, opts)
        write_s = time.perf_counter() - t0
        decode = decode_rates(folder, opts)
        write_synthetic_cache(Path(tmp) / "cache", opts)
        cache = cache_read_rate(Path(tmp) / "cache", opts)
    steps = {v: step_rate(v, opts) for v in opts.variants}
    return {"options": dataclasses.asdict(opts), "machine": machine_info(), "write_clips_s": write_s,
            "decode": decode, "cache_read": cache, "train_step": steps}


def format_report(r: dict[str, Any]) -> str:
    """Markdown table of the rates and which side limits training."""
    o = r["options"]
    h, w, f = o["bucket"]
    lines = [f"source {o['clips']} MP4s {o['src_frames']}x{o['src_height']}x{o['src_width']} -> bucket "
             f"{h}x{w}x{f}, batch {o['batch']}", "", "| source / consumer | clips/s |", "|---|---|"]
    for k, v in r["decode"].items():
        lines.append(f"| decode MP4 (grain, {k}) | {v['clips_per_s']:.2f} |")
    lines.append(f"| latent cache read (ArrayRecord) | {r['cache_read']['clips_per_s']:.1f} |")
    for k, v in r["train_step"].items():
        lines.append(f"| DiT {k} train step ({v['tokens_per_clip']} tokens/clip, {v['step_s']['median_s']:.3f} s/step) "
                     f"| {v['clips_per_s']:.2f} |")
    best_decode = max(v["clips_per_s"] for v in r["decode"].values())
    for k, v in r["train_step"].items():
        lines.append(f"- {k}: cache read / step = {r['cache_read']['clips_per_s'] / v['clips_per_s']:.1f}x, "
                     f"best decode / step = {best_decode / v['clips_per_s']:.2f}x")
    return "\n".join(lines)
