"""Periodic evaluation during training: held-out loss at fixed timesteps, and videos for TensorBoard.

The training loss is noisy (random timesteps, noise, dropout); comparing checkpoints needs a loss
that only the weights can move: the same held-out batch, the same noise levels, the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion import ddpm, flow

# Noise levels (fractions of the way from data to noise) that eval/loss_t{...} reports.
DEFAULT_EVAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def fixed_times(objective: flow.FlowObjective | ddpm.DDPMObjective, fraction: float, batch: int) -> jax.Array:
    """The objective's time variable at `fraction` of the noise range: sigma for flow, an integer step for DDPM."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval time {fraction} must lie strictly between 0 and 1")
    if isinstance(objective, ddpm.DDPMObjective):
        return jnp.full((batch,), round(fraction * (objective.num_train_timesteps - 1)), jnp.int32)
    return jnp.full((batch,), fraction, jnp.float32)


def denoising_loss(
    model: Any, objective: flow.FlowObjective | ddpm.DDPMObjective, params: Any, batch: dict, time: jax.Array,
    noise: jax.Array,
) -> jax.Array:
    """Mean denoising loss of a (latents, text, text_mask) batch at given times and noise: no randomness inside."""
    x0 = batch["latents"]
    pred = model.apply(params, objective.add_noise(x0, noise, time), objective.model_time(time),
                       batch["text"], batch["text_mask"])
    return objective.loss(pred, x0, noise, time).mean()


def make_dit_eval(
    model: Any, objective: flow.FlowObjective | ddpm.DDPMObjective, times: Sequence[float] = DEFAULT_EVAL_TIMES,
    seed: int = 0,
) -> Callable[[Any, dict], dict[str, jax.Array]]:
    """(params, held-out batch) -> {"eval/loss_t0.1": ..., ..., "eval/loss": mean}: deterministic.

    Each time gets its own fixed noise (from `seed`), the same at every call, so two evaluations
    differ only through the weights. Text is never dropped and no frame is given.
    """
    times = tuple(float(t) for t in times)

    @jax.jit
    def evaluate(params, batch):
        x0 = batch["latents"]
        out = {}
        for i, t in enumerate(times):  # a handful of fixed levels, unrolled: not a diffusion loop
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), x0.shape, x0.dtype)
            out[f"eval/loss_t{t:g}"] = denoising_loss(model, objective, params, batch,
                                                      fixed_times(objective, t, x0.shape[0]), noise)
        out["eval/loss"] = sum(out.values()) / len(times)
        return out

    return evaluate


def video_grid(videos: np.ndarray, columns: int = 4) -> np.ndarray:
    """[N, T, H, W, 3] in [-1, 1] -> one uint8 clip [T, rows*H, columns*W, 3] tiling the N videos."""
    videos = np.asarray(videos, np.float32)
    n, t, h, w, c = videos.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    pad = np.full((rows * columns - n, t, h, w, c), -1.0, np.float32)
    tiles = np.concatenate([videos, pad]).reshape(rows, columns, t, h, w, c)
    grid = tiles.transpose(2, 0, 3, 1, 4, 5).reshape(t, rows * h, columns * w, c)
    return np.clip(np.rint((grid + 1.0) * 127.5), 0, 255).astype(np.uint8)
