"""Training the text-conditioned DiT (rectified flow or DDPM) on (cached) VAE latents."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.diffusion import ddpm, flow
from sora_jax.diffusion.conditioning import MaskRates, sample_train_masks
from sora_jax.diffusion.samplers import sampler_for_run
from sora_jax.diffusion.weighting import foreground_cells
from sora_jax.models.dit import DiT, DiTConfig, dit_config, validate_latent_grid
from sora_jax.parallel.mesh import batch_sharding, global_batch
from sora_jax.train import checkpoint
from sora_jax.train.accumulate import accumulate_gradients, tree_norm
from sora_jax.train.dit_data import (bucket_spec, cache_dir_for, default_video, heldout_cache_dir, train_loader,
                                     vae_identity)
from sora_jax.train.evaluation import heldout_rows, make_dit_periodic
from sora_jax.train.latent_records import null_text, read_info, read_records
from sora_jax.train.loop import Periodic, train_sharded
from sora_jax.train.setup import (
    compute_dtype, dataclass_to_json, mesh_and_rules, per_process_batch, to_python, validate_layout,
)
from sora_jax.train.state import TrainState, create_sharded_state, make_optimizer
from sora_jax.train.vae_trainer import load_vae

DIT_CONFIG_FILE = "dit_config.json"
RUN_FILE = "run.json"
log = logging.getLogger(__name__)


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


def objective_for_grid(diff_cfg: ml_collections.ConfigDict, grid: tuple[int, ...], patch: tuple[int, ...]
                       ) -> flow.FlowObjective | ddpm.DDPMObjective:
    """The objective for one latent grid: with diffusion.shift_by_resolution, a flow shift that grows
    as sqrt(tokens / shift_base_tokens) from diffusion.shift (bigger or longer videos are noisier at equal t)."""
    objective = objective_from(diff_cfg)
    if isinstance(objective, flow.FlowObjective) and bool(diff_cfg.get("shift_by_resolution", False)):
        tokens = flow.latent_tokens(grid, patch)
        shift = flow.resolution_shift(tokens, int(diff_cfg.shift_base_tokens), float(diff_cfg.shift))
        objective = dataclasses.replace(objective, shift=shift)
    return objective


def token_mask(real: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """[B, T', H', W'] real-latent-cell mask -> [B, T'/pt, H'/ph, W'/pw] token mask (a token with any real cell)."""
    b, t, h, w = real.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"video_mask grid {(t, h, w)} is not divisible by the DiT patch {patch}; "
                         "pad clips to a latent grid that is a multiple of the patch")
    cells = real.astype(bool).reshape(b, t // pt, pt, h // ph, ph, w // pw, pw)
    return cells.any(axis=(2, 4, 6))


def make_dit_step(model: DiT, diff_cfg: ml_collections.ConfigDict, grad_accum: int = 1):
    """The (state, batch, rng) -> (state, metrics) function of one flow-matching or DDPM update.

    batch: latents [B, T', H', W', C], text [B, L, D], text_mask [B, L], and optionally video_mask
    [B, T', H', W'] (True = a real latent cell) for clips padded to a common shape: padded tokens are
    dropped as attention keys and padded cells are left out of the loss.
    """
    by_resolution = bool(diff_cfg.get("shift_by_resolution", False))
    objective = objective_from(diff_cfg)
    p_drop = float(diff_cfg.text_dropout)
    rates = mask_rates(diff_cfg)
    given_t0 = bool(diff_cfg.get("given_t0", False))
    fg_weight = float(diff_cfg.get("fg_weight", 0.0))
    fg_threshold = float(diff_cfg.get("fg_threshold", 1.0))
    if not fg_weight >= 0 or not fg_threshold > 0:
        raise ValueError(f"diffusion.fg_weight must be >= 0 and diffusion.fg_threshold > 0, got {fg_weight} and "
                         f"{fg_threshold}; e.g. --config.diffusion.fg_weight=10 --config.diffusion.fg_threshold=1")

    def loss_fn(params, batch, rng):
        x0, text, mask = batch["latents"], batch["text"], batch["text_mask"]
        b = x0.shape[0]
        # Shapes are static: each bucket's compiled step carries its own shift.
        obj = objective_for_grid(diff_cfg, x0.shape[1:4], model.cfg.patch_size) if by_resolution else objective
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
        time = obj.sample_times(r_time, b)  # flow: sigma in (0, 1); DDPM: integer step
        noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
        x_t = obj.add_noise(x0, noise, time)
        t_model = obj.model_time(time)  # [B]
        if given is not None:
            # Conditioning cells are seen clean and not scored. Under given_t0 the network is also told
            # so through their timestep (0, per cell); samplers then hold them clean (LatentCondition.t0).
            x_t = jnp.where(given > 0, x0, x_t)
            if given_t0:
                t_model = jnp.where(given[..., 0] > 0, 0.0, t_model[:, None, None, None])  # [B, T', H', W']
        skip, extra = given, {}
        if "video_mask" in batch:
            real = batch["video_mask"]
            extra["video_mask"] = token_mask(real, model.cfg.patch_size)
            pad = 1.0 - real.astype(x0.dtype)[..., None]  # [B, T', H', W', 1], 1 = padding
            skip = pad if given is None else jnp.maximum(given, pad)
        pred = model.apply(params, x_t, t_model, text, mask, **extra)
        aux = {}
        cells = None
        if fg_weight > 0:
            cells, aux["fg_share"] = foreground_cells(x0, fg_weight, fg_threshold)
        loss = obj.loss(pred, x0, noise, time, given=skip, cells=cells).mean()
        return loss, {"loss": loss, **aux}

    def step(state: TrainState, batch: dict, rng: jax.Array):
        grads, metrics = accumulate_gradients(jax.grad(loss_fn, has_aux=True), state.params, batch, rng, grad_accum)
        metrics["grad_norm"] = tree_norm(grads)
        return state.apply_gradients(grads), metrics

    return step


def dit_config_from(config: ml_collections.ConfigDict, *, channels: int, text_dim: int) -> DiTConfig:
    """The DiT dataclass of a run: variant table + config.model overrides + data-derived dims."""
    overrides = to_python(config.model)
    overrides.setdefault("dtype", compute_dtype(config.train.get("dtype", "float32")))  # params stay float32
    return dit_config(config.variant, in_channels=channels, out_channels=channels, text_dim=text_dim, **overrides)


def dit_periodic(config: ml_collections.ConfigDict, workdir: Path, model: DiT, mesh,
                 vae_id: dict[str, Any] | None = None, train_cache: Path | None = None) -> tuple[Periodic, ...]:
    """train.eval_every / train.sample_every: held-out losses and sample videos (see evaluation.py).

    eval.train_clips > 0 scores that many clips of `train_cache` beside the held-out ones.
    """
    eval_every, sample_every = int(config.train.get("eval_every", 0)), int(config.train.get("sample_every", 0))
    if eval_every <= 0 and sample_every <= 0:
        return ()
    ev = config.get("eval", ml_collections.ConfigDict())
    num_clips, num_videos = int(ev.get("num_clips", 8)), int(ev.get("videos", 4))
    records = read_records(heldout_cache_dir(config, workdir, vae_id), max(num_clips, num_videos))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    heldout = heldout_rows(records, shards, num_clips)
    train_clips = int(ev.get("train_clips", 0)) if eval_every > 0 else 0
    train_rows = None
    if train_clips > 0:
        if train_cache is None:
            raise ValueError("eval.train_clips > 0 needs the run's training cache")
        train_rows = heldout_rows(read_records(train_cache, train_clips), shards, train_clips)
    grid = heldout["latents"].shape[1:4]
    objective = objective_for_grid(config.diffusion, grid, model.cfg.patch_size)
    sampler = vae = vae_params = None
    if sample_every > 0:
        vae, vae_params = load_vae(config.vae_workdir, (vae_id or {}).get("vae_step"))
        sampler = sampler_for_run(to_python(config.sample), objective_to_json(objective_from(config.diffusion)),
                                  num_tokens=flow.latent_tokens(grid, model.cfg.patch_size))
    return make_dit_periodic(model, objective, mesh, heldout, eval_every=eval_every, sample_every=sample_every,
                             sampler=sampler, vae=vae, vae_params=vae_params, num_videos=num_videos,
                             seed=int(config.seed), train_rows=train_rows)


def resumed_on_other_vae(workdir: str | Path, vae_id: dict[str, Any]) -> str | None:
    """A warning line when the run in workdir was trained on latents of other VAE weights, else None.

    Resuming then goes on from weights fitted to another latent space: intended when the VAE trained
    on in place (a rerun of a time-budgeted reference run), a mistake when the folder was reused.
    """
    run = Path(workdir) / RUN_FILE
    if not run.is_file():
        return None
    old = checkpoint.read_json(run)
    if old.get("vae_params") in (None, vae_id["vae_params"]):
        return None
    return (f"resuming the DiT in {workdir} (trained on latents of the VAE in {old.get('vae_workdir')}, "
            f"step {old.get('vae_step')}, weights {old.get('vae_params')}) on another VAE's latents "
            f"(step {vae_id['vae_step']}, weights {vae_id['vae_params']}); for a fresh run pass a new "
            "--config.workdir (scripts/train_reference.py: a new --outdir)")


def train_dit(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train (or resume) a DiT run in config.workdir on latents of the VAE in config.vae_workdir."""
    workdir = Path(config.workdir).absolute()
    mesh, rules = mesh_and_rules(config)
    vae_id = vae_identity(config)
    cache_dir = cache_dir_for(config, workdir, vae_id)
    info = read_info(cache_dir)
    spec = bucket_spec(config)
    per_process = {b.name: per_process_batch(b.batch_size, mesh, config.train.grad_accum) for b in spec.buckets}
    shapes = {name: b["shapes"] for name, b in info["buckets"].items()}
    first = shapes[min(shapes)]  # every bucket shares channels and text shape; grids differ
    latent_shape, text_shape = first["latents"], first["text"]
    dit_cfg = dit_config_from(config, channels=latent_shape[-1], text_dim=text_shape[-1])
    for sh in shapes.values():
        grid = validate_latent_grid(dit_cfg, tuple(sh["latents"][:3]))
        validate_layout(mesh, rules, rules_name=config.mesh.rules, heads=dit_cfg.num_attention_heads,
                        ffn=dit_cfg.ffn_dim, tokens=math.prod(grid))

    model = DiT(dit_cfg)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    dummy = (
        jnp.zeros((n_shards, *latent_shape), jnp.float32),
        jnp.zeros((n_shards,), jnp.float32),
        jnp.zeros((n_shards, *text_shape), jnp.float32),
        jnp.ones((n_shards, text_shape[0]), bool),
    )
    tx = make_optimizer(config.optim, config.train.steps, budget_minutes=config.train.max_minutes)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    state, shardings = create_sharded_state(
        lambda k: model.init({"params": k}, *dummy), tx, float(config.optim.ema_decay), mesh, rules, init_rng
    )
    manager = checkpoint.make_manager(workdir / "ckpt", keep=config.train.keep)
    data_iter = train_loader(config, cache_dir, per_process)
    if manager.latest_step() is not None:
        state = checkpoint.restore(manager, state, data_iter, finished_at=config.train.steps)
        if (warning := resumed_on_other_vae(workdir, vae_id)) is not None:
            log.warning(warning)
    checkpoint.write_json_atomic(workdir / DIT_CONFIG_FILE, dataclass_to_json(dit_cfg))
    checkpoint.write_json_atomic(workdir / RUN_FILE, {
        "vae_workdir": str(Path(config.vae_workdir).absolute()),
        # The weights the latents came from: loading the newest step instead would decode with a VAE
        # this DiT never saw if the VAE run went on after it.
        **vae_id,
        "text_encoder_dir": config.text.encoder_dir,
        "text_max_length": config.text.max_length,
        "latent_grid": list(first["latents"][:3]),
        "latent_cache": str(cache_dir),
        "sample": to_python(config.sample),
        "objective": objective_to_json(objective_from(config.diffusion)),
        # Samplers must feed given latent cells as training did (conditioning.LatentCondition.t0).
        "given_t0": bool(config.diffusion.get("given_t0", False)) and mask_rates(config.diffusion).enabled,
        "video": default_video(config, spec),
    })

    state, logger = train_sharded(
        step=make_dit_step(model, config.diffusion, config.train.grad_accum), state=state, state_shardings=shardings,
        periodic=dit_periodic(config, workdir, model, mesh, vae_id, cache_dir),
        batch_shardings={k: batch_sharding(mesh, n) for k, n in (("latents", 5), ("text", 3), ("text_mask", 2))},
        mesh=mesh, rules=rules, data_iter=data_iter, to_device=lambda b: global_batch(mesh, {k: b[k] for k in ("latents", "text", "text_mask")}),
        train_cfg=config.train, manager=manager, logdir=workdir / "tb", rng=train_rng, desc="train-dit",
    )
    manager.close()
    final = logger.history[-1] if logger.history else {}
    return {"step": int(state.step), "final": final, "history": logger.history,
            "eval_history": logger.eval_history, "num_clips": info["num_records"]}
