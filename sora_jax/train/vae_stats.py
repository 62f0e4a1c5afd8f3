"""Per-channel latent statistics of a VAE over a dataset (`sora-jax vae-stats`).

The DiT trains on `(z - mean) / std` so its inputs are unit-scale per channel; the statistics are
part of the VAE's config (`latents_mean`/`latents_std`, as in diffusers) and travel with its checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from sora_jax.models.vae import VAEConfig
from sora_jax.models.vae_codec import VideoCodec


def latent_channel_stats(codec: VideoCodec, params: Any, clips: Iterable[np.ndarray]) -> dict[str, Any]:
    """Mean and std per latent channel of the posterior means of all clips (streamed, float64 sums)."""
    total = total_sq = None
    count = 0
    for batch in clips:
        mean, _ = codec.encode(params, np.asarray(batch, np.float32))
        flat = np.asarray(mean, np.float64).reshape(-1, mean.shape[-1])  # [positions, z]
        total = flat.sum(0) if total is None else total + flat.sum(0)
        total_sq = (flat**2).sum(0) if total_sq is None else total_sq + (flat**2).sum(0)
        count += flat.shape[0]
    if count == 0:
        raise ValueError("no clips to compute latent statistics from; check the dataset path and --num-clips")
    mu = total / count
    std = np.sqrt(np.maximum(total_sq / count - mu**2, 0.0)) + 1e-6
    return {"mean": tuple(float(v) for v in mu), "std": tuple(float(v) for v in std), "positions": count}


def physics_clips(source: Any, num_clips: int, batch_size: int) -> Iterable[np.ndarray]:
    """Batches of whole clips in [-1, 1] from a physics_balls split, skipping corrupt records."""
    from sora_jax.data.pipeline import numpy_batch

    n = min(num_clips, len(source))
    for start in range(0, n, batch_size):
        yield numpy_batch(source, range(start, min(n, start + batch_size)))["video"]


def update_vae_stats(workdir: str | Path, clips: Iterable[np.ndarray]) -> tuple[VAEConfig, dict[str, Any]]:
    """Compute the statistics with the VAE in `workdir` and store them in its config file."""
    from sora_jax.train import checkpoint
    from sora_jax.train.setup import dataclass_to_json
    from sora_jax.train.vae_trainer import VAE_CONFIG_FILE, load_vae

    model, params = load_vae(workdir)
    stats = latent_channel_stats(VideoCodec(model, chunked=True), params, clips)
    cfg = dataclasses.replace(model.cfg, latents_mean=stats["mean"], latents_std=stats["std"])
    checkpoint.write_json_atomic(Path(workdir) / VAE_CONFIG_FILE, dataclass_to_json(cfg))
    return cfg, stats
