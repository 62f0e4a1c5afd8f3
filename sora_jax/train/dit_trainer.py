"""Training the text-conditioned DiT (rectified flow or DDPM) on (cached) VAE latents."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.convert.bert import load_text_encoder
from sora_jax.diffusion import ddpm, flow
from sora_jax.diffusion.conditioning import MaskRates, sample_train_masks
from sora_jax.models.dit import DiT, DiTConfig, dit_config, validate_latent_grid
from sora_jax.parallel.mesh import batch_sharding, global_batch
from sora_jax.train import checkpoint
from sora_jax.train.latent_cache import LatentCache, build_latent_cache, cache_key, make_cache_loader
from sora_jax.train.loop import train_sharded
from sora_jax.train.setup import dataclass_to_json, mesh_and_rules, per_process_batch, to_python
from sora_jax.train.state import TrainState, create_sharded_state, make_optimizer
from sora_jax.train.vae_trainer import physics_sources, load_vae

DIT_CONFIG_FILE = "dit_config.json"
RUN_FILE = "run.json"


def null_text(batch: int, length: int, dim: int) -> tuple[jax.Array, jax.Array]:
    """The unconditional text: one zero token (a learned bias key/value), the rest padding."""
    emb = jnp.zeros((batch, length, dim), jnp.float32)
    mask = jnp.zeros((batch, length), bool).at[:, 0].set(True)
    return emb, mask


def mask_rates(diff_cfg: ml_collections.ConfigDict) -> MaskRates:
    """The conditioning-mask strategy rates of config.diffusion.mask_rates (all 0 if absent)."""
    rates = diff_cfg.get("mask_rates", None)
    return MaskRates(**{k: float(v) for k, v in (rates.items() if rates is not None else ())})


OBJECTIVES = ("flow", "ddpm")


def objective_from(diff_cfg: ml_collections.ConfigDict) -> flow.FlowObjective | ddpm.DDPMObjective:
    """The training objective of config.diffusion: rectified flow, or DDPM with eps/v prediction."""
    kind = str(diff_cfg.get("objective", "flow"))
    weighting = dict(weighting=str(diff_cfg.get("weighting", "none")), snr_gamma=float(diff_cfg.get("snr_gamma", 5.0)))
    if kind == "flow":
        return flow.FlowObjective(timestep_sampling=str(diff_cfg.timestep_sampling), shift=float(diff_cfg.shift),
                                  **weighting)
    if kind == "ddpm":
        return ddpm.DDPMObjective(**to_python(diff_cfg.get("ddpm", {})), **weighting)
    raise ValueError(f"unknown config.diffusion.objective {kind!r}; use one of {OBJECTIVES}")


def objective_to_json(objective: flow.FlowObjective | ddpm.DDPMObjective) -> dict:
    """The objective as run.json records it, so sampling picks the matching solver and schedule."""
    kind = "ddpm" if isinstance(objective, ddpm.DDPMObjective) else "flow"
    return {"kind": kind, **dataclasses.asdict(objective)}


def make_dit_step(model: DiT, diff_cfg: ml_collections.ConfigDict):
    """The (state, batch, rng) -> (state, metrics) function of one flow-matching or DDPM update."""
    objective = objective_from(diff_cfg)
    p_drop = float(diff_cfg.text_dropout)
    rates = mask_rates(diff_cfg)

    def loss_fn(params, batch, rng):
        x0, text, mask = batch["latents"], batch["text"], batch["text_mask"]
        b = x0.shape[0]
        if rates.enabled:
            rng, r_given = jax.random.split(rng)
            given = sample_train_masks(r_given, rates, b, x0.shape[1:4])  # [B, T', H', W', 1], 1 = given
        else:
            given = None  # the unmasked step keeps its random stream and loss exactly
        r_drop, r_time, r_noise = jax.random.split(rng, 3)
        drop = jax.random.bernoulli(r_drop, p_drop, (b,))
        n_emb, n_mask = null_text(b, text.shape[1], text.shape[2])
        text = jnp.where(drop[:, None, None], n_emb, text)
        mask = jnp.where(drop[:, None], n_mask, mask)
        time = objective.sample_times(r_time, b)  # flow: sigma in (0, 1); DDPM: integer step
        noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
        x_t = objective.add_noise(x0, noise, time)
        if given is not None:
            # Conditioning cells are seen clean (noise level 0 there), as the sampler holds them, and not scored.
            x_t = jnp.where(given > 0, x0, x_t)
        pred = model.apply(params, x_t, objective.model_time(time), text, mask)
        loss = objective.loss(pred, x0, noise, time, given=given).mean()
        return loss, {"loss": loss}

    def step(state: TrainState, batch: dict, rng: jax.Array):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, rng)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return state.apply_gradients(grads), metrics

    return step


def dit_config_from(config: ml_collections.ConfigDict, *, channels: int, text_dim: int) -> DiTConfig:
    """The DiT dataclass of a run: variant table + config.model overrides + data-derived dims."""
    overrides = to_python(config.model)
    return dit_config(config.variant, in_channels=channels, out_channels=channels, text_dim=text_dim, **overrides)


def _latent_cache(config, workdir: Path) -> LatentCache:
    d = config.data
    vae_config = Path(config.vae_workdir).absolute() / "vae_config.json"
    if not vae_config.is_file():
        raise checkpoint.CheckpointError(
            f"{vae_config} not found; train the VAE first or pass the right --config.vae_workdir")
    key = cache_key(d.size, d.frames, d.num_train, d.seed, str(Path(config.vae_workdir).absolute()),
                    vae_config.read_text(),
                    config.text.encoder_dir, config.text.max_length)
    path = workdir / f"latents-{key}.npz"
    if path.exists():
        return LatentCache.load(path)
    # Data, VAE and text encoder are loaded only to build the cache: a resumed run starts faster.
    sources = physics_sources(config)
    vae, vae_params = load_vae(config.vae_workdir)
    text_encoder = load_text_encoder(config.text.encoder_dir or None, max_length=config.text.max_length)
    cache = build_latent_cache(sources["train"], vae, vae_params, text_encoder)
    workdir.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache


def train_dit(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train (or resume) a DiT run in config.workdir on latents of the VAE in config.vae_workdir."""
    workdir = Path(config.workdir).absolute()
    mesh, rules = mesh_and_rules(config)
    local_batch = per_process_batch(config.data.batch_size, mesh)
    cache = _latent_cache(config, workdir)
    grid = cache.latents.shape[1:4]
    dit_cfg = dit_config_from(config, channels=cache.latents.shape[-1], text_dim=cache.text.shape[-1])
    validate_latent_grid(dit_cfg, grid)

    model = DiT(dit_cfg)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    dummy = (
        jnp.zeros((n_shards, *cache.latents.shape[1:]), jnp.float32),
        jnp.zeros((n_shards,), jnp.float32),
        jnp.zeros((n_shards, *cache.text.shape[1:]), jnp.float32),
        jnp.ones((n_shards, cache.text.shape[1]), bool),
    )
    tx = make_optimizer(config.optim, config.train.steps)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    state, shardings = create_sharded_state(
        lambda k: model.init({"params": k}, *dummy), tx, float(config.optim.ema_decay), mesh, rules, init_rng
    )
    manager = checkpoint.make_manager(workdir / "ckpt", keep=config.train.keep)
    data_iter = iter(make_cache_loader(cache, batch_size=local_batch, seed=config.seed,
                                       worker_count=config.data.worker_count))
    if manager.latest_step() is not None:
        state = checkpoint.restore(manager, state, data_iter)
    checkpoint.write_json_atomic(workdir / DIT_CONFIG_FILE, dataclass_to_json(dit_cfg))
    checkpoint.write_json_atomic(workdir / RUN_FILE, {
        "vae_workdir": str(Path(config.vae_workdir).absolute()),
        "text_encoder_dir": config.text.encoder_dir,
        "text_max_length": config.text.max_length,
        "latent_grid": list(grid),
        "sample": to_python(config.sample),
        "objective": objective_to_json(objective_from(config.diffusion)),
        "video": {"frames": config.data.frames, "size": config.data.size},
    })

    state, logger = train_sharded(
        step=make_dit_step(model, config.diffusion), state=state, state_shardings=shardings,
        batch_shardings={k: batch_sharding(mesh, n) for k, n in (("latents", 5), ("text", 3), ("text_mask", 2))},
        mesh=mesh, rules=rules, data_iter=data_iter, to_device=lambda b: global_batch(mesh, b),
        train_cfg=config.train, manager=manager, logdir=workdir / "tb", rng=train_rng, desc="train-dit",
    )
    manager.close()
    final = logger.history[-1] if logger.history else {}
    return {"step": int(state.step), "final": final, "history": logger.history,
            "num_captions": len(cache.captions)}
