"""Training the causal 3D VAE: L1 + KL on random spacetime crops, sharded over the mesh."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.data.physics_tfds import build_physics_dataset
from sora_jax.data.pipeline import make_loader, numpy_batch
from sora_jax.eval.video import psnr
from sora_jax.models.vae import CausalVAE, VAEConfig, init_vae_variables, kl_divergence, validate_video_shape
from sora_jax.parallel.mesh import batch_sharding, global_batch
from sora_jax.train import checkpoint
from sora_jax.train.loop import train_sharded
from sora_jax.train.setup import (
    dataclass_from,
    dataclass_from_json,
    dataclass_to_json,
    mesh_and_rules,
    on_one_device,
    per_process_batch,
)
from sora_jax.train.state import TrainState, create_sharded_state, make_optimizer

VAE_CONFIG_FILE = "vae_config.json"


def vae_config_from(config: ml_collections.ConfigDict) -> VAEConfig:
    """The model dataclass of a VAE run config."""
    return dataclass_from(VAEConfig, config.model)


def make_vae_step(model: CausalVAE, loss_cfg: ml_collections.ConfigDict):
    """The (state, batch, rng) -> (state, metrics) function of one VAE update."""
    l1_w, l2_w, kl_w = float(loss_cfg.l1), float(loss_cfg.l2), float(loss_cfg.kl)
    sample = bool(loss_cfg.sample_posterior)

    def loss_fn(params, video, rng):
        recon, mean, logvar = model.apply(params, video, sample_rng=rng if sample else None)
        err = recon.astype(jnp.float32) - video
        l1 = jnp.abs(err).mean()
        l2 = jnp.square(err).mean()
        kl = kl_divergence(mean, logvar).mean()
        loss = l1_w * l1 + l2_w * l2 + kl_w * kl
        return loss, {"loss": loss, "l1": l1, "mse": l2, "kl": kl}

    def step(state: TrainState, batch: dict, rng: jax.Array):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch["video"], rng)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return state.apply_gradients(grads), metrics

    return step


def physics_sources(config: ml_collections.ConfigDict) -> dict:
    """The train/test data sources named by config.data (built on first use)."""
    d = config.data
    return build_physics_dataset(
        str(Path(d.dir).absolute()), size=d.size, frames=d.frames,
        num_train=d.num_train, num_test=d.num_test, seed=d.seed,
    )


def train_vae(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train (or resume) a VAE run in config.workdir; returns its final metrics and history."""
    workdir = Path(config.workdir).absolute()
    mesh, rules = mesh_and_rules(config)
    vae_cfg = vae_config_from(config)
    frames, crop = int(config.data.crop_frames), int(config.data.crop_size)
    validate_video_shape(vae_cfg, frames, crop, crop)
    validate_video_shape(vae_cfg, config.data.frames, config.data.size, config.data.size)
    local_batch = per_process_batch(config.data.batch_size, mesh)

    sources = physics_sources(config)
    loader = make_loader(
        sources["train"], batch_size=local_batch, seed=config.seed, shuffle=True,
        worker_count=config.data.worker_count, frames=frames, crop=crop,
    )
    model = CausalVAE(vae_cfg)
    tx = make_optimizer(config.optim, config.train.steps)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    state, shardings = create_sharded_state(
        lambda k: init_vae_variables(vae_cfg, k), tx, float(config.optim.ema_decay), mesh, rules, init_rng
    )
    manager = checkpoint.make_manager(workdir / "ckpt", keep=config.train.keep)
    data_iter = iter(loader)
    if manager.latest_step() is not None:
        state = checkpoint.restore(manager, state, data_iter)
    # The model dataclass travels with the checkpoint so inference needs no training config.
    checkpoint.write_json_atomic(workdir / VAE_CONFIG_FILE, dataclass_to_json(vae_cfg))

    state, logger = train_sharded(
        step=make_vae_step(model, config.loss), state=state, state_shardings=shardings,
        batch_shardings={"video": batch_sharding(mesh, 5)}, mesh=mesh, rules=rules, data_iter=data_iter,
        to_device=lambda b: global_batch(mesh, {"video": b["video"]}), train_cfg=config.train,
        manager=manager, logdir=workdir / "tb", rng=train_rng, desc="train-vae",
    )
    # Evaluation runs outside the mesh context: small odd-sized batches need no batch sharding.
    # Latent statistics make DiT inputs unit-scale; they are part of the VAE's config.
    stats = latent_statistics(model, state.eval_params, sources["train"], config.eval.num_clips)
    vae_cfg = dataclasses.replace(vae_cfg, latents_mean=stats[0], latents_std=stats[1])
    checkpoint.write_json_atomic(workdir / VAE_CONFIG_FILE, dataclass_to_json(vae_cfg))
    eval_psnr = evaluate_vae(model, state.eval_params, sources["test"], config.eval.num_clips)
    manager.close()
    final = logger.history[-1] if logger.history else {}
    return {"step": int(state.step), "final": final, "history": logger.history, "psnr": eval_psnr,
            "corrupt_records_skipped": loader.stats.corrupt}


def load_vae(workdir: str | Path) -> tuple[CausalVAE, Any]:
    """Load a trained VAE (config + EMA-or-raw params) from a run directory."""
    workdir = Path(workdir).absolute()
    model = CausalVAE(dataclass_from_json(VAEConfig, checkpoint.read_json(workdir / VAE_CONFIG_FILE)))
    abstract = jax.eval_shape(lambda: nn.meta.unbox(init_vae_variables(model.cfg, jax.random.key(0))))
    return model, checkpoint.restore_params(workdir / "ckpt", on_one_device(abstract))


@functools.partial(jax.jit, static_argnums=0)
def _encode_mean(model: CausalVAE, params, video):
    mean, _ = model.apply(params, video, method=CausalVAE.encode)
    return mean


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(model: CausalVAE, params, video):
    mean, _ = model.apply(params, video, method=CausalVAE.encode)
    return model.apply(params, mean, method=CausalVAE.decode)


def _clips(source, n: int) -> np.ndarray:
    return numpy_batch(source, range(min(n, len(source))))["video"]


def latent_statistics(model: CausalVAE, params, source, num_clips: int) -> tuple[tuple, tuple]:
    """Per-channel mean and std of posterior means over the first clips of a split."""
    clips = _clips(source, max(num_clips, 8))
    z = np.concatenate([np.asarray(_encode_mean(model, params, clips[i:i + 4])) for i in range(0, len(clips), 4)])
    flat = z.reshape(-1, z.shape[-1])
    return tuple(float(v) for v in flat.mean(0)), tuple(float(v) for v in flat.std(0) + 1e-6)


def evaluate_vae(model: CausalVAE, params, source, num_clips: int) -> float:
    """Reconstruction PSNR (dB) of whole held-out clips through encode(mean) -> decode."""
    clips = _clips(source, num_clips)
    recon = np.concatenate(
        [np.asarray(_reconstruct(model, params, clips[i:i + 4])) for i in range(0, len(clips), 4)]
    )
    return float(psnr(recon, clips))
