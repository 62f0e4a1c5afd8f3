"""Periodic evaluation during training: held-out loss at fixed timesteps, and videos for TensorBoard.

The training loss is noisy (random timesteps, noise, dropout); comparing checkpoints needs a loss
that only the weights can move: the same held-out batch, the same noise levels, the same noise.
Sample videos likewise start from fixed noise and fixed held-out captions, so a TensorBoard
timeline of them shows what training changed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion import ddpm, flow
from sora_jax.diffusion.samplers import Conditioning, LoopSampler
from sora_jax.models.dit import DiTDenoiser
from sora_jax.models.vae import CausalVAE
from sora_jax.models.vae_codec import decode_latents
from sora_jax.parallel.mesh import batch_sharding, replicated
from sora_jax.train.latent_records import FEATURES, null_text
from sora_jax.train.loop import Periodic

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


def heldout_rows(records: dict[str, Any], shards: int, num_clips: int) -> dict[str, np.ndarray]:
    """`num_clips` rounded to a multiple of the batch shards (at least one per shard), cycling the records."""
    have = len(records["latents"])
    n = max(shards, num_clips // shards * shards)
    take = [i % have for i in range(n)]
    return {k: np.asarray(records[k])[take] for k in FEATURES}


def _process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of a batch every process holds whole."""
    n, p, i = len(batch["latents"]), jax.process_count(), jax.process_index()
    return {k: v[i * n // p:(i + 1) * n // p] for k, v in batch.items()}


def make_dit_periodic(
    model: Any, objective: flow.FlowObjective | ddpm.DDPMObjective, mesh, heldout: dict[str, np.ndarray], *,
    eval_every: int, sample_every: int, sampler: LoopSampler | None = None, vae: CausalVAE | None = None,
    vae_params: Any = None, num_videos: int = 4, seed: int = 0, train_rows: dict[str, np.ndarray] | None = None,
) -> tuple[Periodic, ...]:
    """Held-out denoising losses every `eval_every` steps and sampled videos every `sample_every`.

    `heldout` (latents, text, text_mask; the same on every process, a multiple of the batch shards)
    is placed once; so is `train_rows`, training clips scored the same way as eval_train/...
    Videos: the VAE decode of the first `num_videos` held-out latents over samples for their
    captions from fixed noise, with the EMA weights, as one grid per write.
    """
    out: list[Periodic] = []
    if eval_every > 0:
        evaluate = make_dit_eval(model, objective, seed=seed)

        def place(rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
            local = _process_rows(rows)
            return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}

        batch = place(heldout)
        seen = place(train_rows) if train_rows is not None else None

        def losses(state) -> dict[str, jax.Array]:
            row = evaluate(state.eval_params, batch)
            if seen is not None:  # equal row counts give both sets the same noise draws per level
                row.update({k.replace("eval/", "eval_train/", 1): v
                            for k, v in evaluate(state.eval_params, seen).items()})
            return row

        out.append(Periodic(eval_every, losses))
    if sample_every > 0:
        if sampler is None or vae is None:
            raise ValueError("sample videos need a sampler and the run's VAE")
        k = max(1, min(num_videos, len(heldout["latents"])))
        everywhere = replicated(mesh)
        # Host numpy first: the VAE was restored onto one device, and a multi-process mesh takes
        # only values every process holds.
        vae_params = jax.device_put(jax.tree.map(np.asarray, vae_params), everywhere)
        latents, text, mask = (jax.device_put(heldout[key][:k], everywhere) for key in FEATURES)
        n_text, n_mask = (jax.device_put(np.asarray(a), everywhere) for a in null_text(k, text.shape[1], text.shape[2]))
        noise = jax.device_put(np.asarray(jax.random.normal(jax.random.key(seed), latents.shape)), everywhere)
        inputs = (latents, noise, Conditioning(text, mask, n_text, n_mask))
        denoiser = DiTDenoiser(model.cfg)

        @functools.partial(jax.jit, out_shardings=everywhere)
        def truth_and_samples(params, vae_params, latents, noise, cond):
            z = sampler(denoiser, params, noise, cond)
            # One decode of both rows: the held-out latents (what the captions show) over the samples.
            return decode_latents(vae, vae_params, jnp.concatenate([latents, z]))

        def videos(state):
            grid = np.asarray(truth_and_samples(state.eval_params, vae_params, *inputs), np.float32)
            return {"samples/heldout": video_grid(grid, columns=k)}

        out.append(Periodic(sample_every, videos, kind="videos"))
    return tuple(out)
