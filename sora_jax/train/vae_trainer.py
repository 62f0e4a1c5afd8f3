"""Training the causal 3D VAE: L1 + KL (+ L2, + foreground weighting, + a PatchGAN hinge loss) on random spacetime crops, sharded over the mesh."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.data.physics_tfds import build_physics_dataset
from sora_jax.data.pipeline import make_loader, numpy_batch
from sora_jax.eval.physics import parse_error
from sora_jax.eval.video import psnr, ssim
from sora_jax.models.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator3D,
    hinge_d_loss,
    hinge_g_loss,
    init_discriminator_variables,
)
from sora_jax.models.vae import CausalVAE, VAEConfig, init_vae_variables, kl_divergence, validate_video_shape
from sora_jax.models.vae_codec import VideoCodec
from sora_jax.parallel.mesh import batch_sharding, global_batch, replicated
from sora_jax.train import checkpoint
from sora_jax.train.accumulate import accumulate_gradients, tree_norm
from sora_jax.train.evaluation import video_grid
from sora_jax.train.loop import Periodic, train_sharded
from sora_jax.train.setup import (
    compute_dtype,
    dataclass_from,
    dataclass_from_json,
    dataclass_to_json,
    mesh_and_rules,
    on_one_device,
    per_process_batch,
    validate_layout,
)
from sora_jax.train.state import TrainState, create_sharded_state, make_optimizer
from sora_jax.train.vae_stats import latent_channel_stats, physics_clips

VAE_CONFIG_FILE = "vae_config.json"


def vae_config_from(config: ml_collections.ConfigDict) -> VAEConfig:
    """The model dataclass of a VAE run config; compute dtype from train.dtype unless model.dtype is set."""
    extra = {} if "dtype" in config.model else {"dtype": compute_dtype(config.train.get("dtype", "float32"))}
    return dataclass_from(VAEConfig, config.model, **extra)


@flax.struct.dataclass
class VAEGANState(TrainState):
    """The VAE's train state plus the discriminator's own (params, optimiser, step)."""

    disc: TrainState | None = None


def with_discriminator(state: TrainState, disc: TrainState) -> VAEGANState:
    """A VAEGANState holding `state`'s fields and `disc` (works on shardings trees too)."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}
    return VAEGANState(**fields, disc=disc)


def without_discriminator(state: VAEGANState) -> TrainState:
    """The plain VAE TrainState inside a VAEGANState."""
    return TrainState(**{f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)})


def disc_config_from(config: ml_collections.ConfigDict) -> DiscriminatorConfig:
    """The discriminator dataclass of a VAE run config (config.disc)."""
    return dataclass_from(DiscriminatorConfig, config.disc)


def foreground_mask(video: jax.Array, threshold: float, dilate: int) -> jax.Array:
    """1.0 where a pixel is off its frame's background, grown by `dilate` pixels; [b, t, h, w, 1].

    The background is each frame's per-channel spatial median, which is right wherever objects
    cover under half the frame (sparse scenes such as physics_balls). Dilation takes in the ring
    around each object, where a reconstruction bleeds colour onto the background.
    """
    background = jnp.median(video, axis=(2, 3), keepdims=True)  # [batch, frames, 1, 1, channels]
    mask = (jnp.abs(video - background) > threshold).any(axis=-1, keepdims=True).astype(jnp.float32)
    if dilate > 0:
        k = 2 * dilate + 1
        mask = jax.lax.reduce_window(mask, 0.0, jax.lax.max, (1, 1, k, k, 1), (1,) * 5, "SAME")
    return mask  # [batch, frames, height, width, 1]


def vae_loss(model: CausalVAE, loss_cfg: ml_collections.ConfigDict, params, video: jax.Array,
             sample_rng: jax.Array | None) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """Weighted L1 + L2 + KL of one batch: (loss, (metrics, reconstruction)); no rng: the posterior mean.

    With loss.fg_weight > 0 the L1 and L2 terms are weighted means with weight 1 + fg_weight on
    foreground pixels (`foreground_mask`): on sparse scenes the plain mean is mostly background, so
    errors on the objects (colour bleeding where two touch) cost little. The l1 and mse metrics stay
    plain means either way, comparable across runs; fg_l1 is the L1 over the foreground alone.
    """
    recon, mean, logvar = model.apply(params, video, sample_rng=sample_rng)
    err = recon.astype(jnp.float32) - video
    l1 = jnp.abs(err).mean()
    l2 = jnp.square(err).mean()
    kl = kl_divergence(mean, logvar).mean()
    metrics = {"l1": l1, "mse": l2, "kl": kl}
    rec_l1, rec_l2 = l1, l2
    fg_weight = float(loss_cfg.get("fg_weight", 0.0))
    if fg_weight > 0:
        mask = jax.lax.stop_gradient(
            foreground_mask(video, float(loss_cfg.get("fg_threshold", 0.1)), int(loss_cfg.get("fg_dilate", 1))))
        weight = 1.0 + fg_weight * mask  # [batch, frames, height, width, 1]
        rec_l1 = (weight * jnp.abs(err)).mean() / weight.mean()
        rec_l2 = (weight * jnp.square(err)).mean() / weight.mean()
        metrics["fg_l1"] = (mask * jnp.abs(err)).sum() / jnp.maximum(mask.sum() * err.shape[-1], 1.0)
        metrics["fg_fraction"] = mask.mean()
    loss = float(loss_cfg.l1) * rec_l1 + float(loss_cfg.l2) * rec_l2 + float(loss_cfg.kl) * kl
    return loss, ({"loss": loss, **metrics}, recon)


def make_vae_periodic(model: CausalVAE, config: ml_collections.ConfigDict, mesh, test_source) -> tuple[Periodic, ...]:
    """Held-out reconstruction loss every train.eval_every steps, reconstructions every train.sample_every.

    Fixed clips (the first of the test split, a multiple of the batch shards) and the posterior mean,
    so the numbers move only with the weights. When the source stores the simulator state, the
    reconstructions are also parsed (eval/parse_error_px, eval/parse_spurious_per_frame,
    eval/parse_colour_err): a run that decodes balls in the wrong shade shows it while training.
    Videos: originals over reconstructions.
    """
    t = config.train
    if not (t.get("eval_every", 0) or t.get("sample_every", 0)):
        return ()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n = max(shards, config.eval.num_clips // shards * shards)
    batch = numpy_batch(test_source, [i % len(test_source) for i in range(n)])
    clips = batch["video"]

    # The clips are an argument, not a closed-over constant: XLA would constant-fold the loss's
    # foreground mask (a reduce_window over the clips) at compile time, which took 9 minutes on CPU
    # for 16 64x64x17 clips with loss.fg_weight > 0.
    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def evaluate(params, clips):
        _, (metrics, recon) = vae_loss(model, config.loss, params, clips, None)
        return {f"eval/{k}": v for k, v in metrics.items()}, recon

    def scalars(state):
        metrics, recon = evaluate(state.eval_params, clips)
        if "positions" in batch and "colors" in batch:
            rec = parse_error(np.asarray(recon, np.float32), batch["positions"], batch["colors"])
            metrics |= {"eval/parse_error_px": rec["error_px"], "eval/parse_colour_err": rec["colour_err"],
                        "eval/parse_spurious_per_frame": rec["spurious_per_frame"]}
        return metrics

    def videos(state):
        recon = np.asarray(evaluate(state.eval_params, clips)[1][:4], np.float32)
        return {"samples/reconstruction": video_grid(np.concatenate([clips[:4], recon]), columns=len(recon))}

    return (Periodic(int(t.get("eval_every", 0)), scalars),
            Periodic(int(t.get("sample_every", 0)), videos, kind="videos"))


def make_vae_step(
    model: CausalVAE, loss_cfg: ml_collections.ConfigDict, disc: PatchDiscriminator3D | None = None,
    grad_accum: int = 1,
):
    """The (state, batch, rng) -> (state, metrics) function of one VAE update.

    With `disc` and loss_cfg.adv > 0 the state is a VAEGANState and the step also updates the
    discriminator (see `_gan_step`); otherwise it is the plain reconstruction step. grad_accum > 1
    splits the batch into microbatches (reconstruction step only).
    """
    sample = bool(loss_cfg.sample_posterior)

    def loss_fn(params, video, rng):
        return vae_loss(model, loss_cfg, params, video, rng if sample else None)

    if disc is not None and float(loss_cfg.get("adv", 0.0)) > 0:
        if grad_accum > 1:
            raise ValueError("train.grad_accum > 1 is not supported with the adversarial loss (loss.adv > 0); "
                             "set train.grad_accum=1 or loss.adv=0")
        return _gan_step(loss_fn, disc, float(loss_cfg.adv), int(loss_cfg.adv_start))

    def grad_fn(params, batch, rng):
        grads, (metrics, _) = jax.grad(loss_fn, has_aux=True)(params, batch["video"], rng)
        return grads, metrics

    def step(state: TrainState, batch: dict, rng: jax.Array):
        grads, metrics = accumulate_gradients(grad_fn, state.params, batch, rng, grad_accum)
        metrics["grad_norm"] = tree_norm(grads)
        return state.apply_gradients(grads), metrics

    return step


def _gan_step(rec_loss_fn, disc: PatchDiscriminator3D, adv: float, adv_start: int):
    """VAE + discriminator update: generator loss rec + w * g_loss, w = adv from adv_start on, else 0.

    Both networks step from the same forward pass (the discriminator judges this step's
    reconstructions, detached). The warm-up switch is a traced value, so warm-up and GAN phases
    share one compiled step; the price is that the discriminator runs (discarded) during warm-up.
    Metrics: loss is the generator's total (rec_loss + adv_weight * g_loss), plus d_loss, the
    mean real/fake logits d_real/d_fake, both gradient norms and the adv_weight in force.
    """

    def step(state: VAEGANState, batch: dict, rng: jax.Array):
        video = batch["video"]
        on = state.step >= adv_start
        adv_w = jnp.where(on, adv, 0.0)

        def g_loss_fn(params):
            rec, (metrics, recon) = rec_loss_fn(params, video, rng)
            g_loss = hinge_g_loss(disc.apply(state.disc.params, recon))
            loss = rec + adv_w * g_loss
            return loss, ({**metrics, "loss": loss, "rec_loss": rec, "g_loss": g_loss}, recon)

        grads, (metrics, recon) = jax.grad(g_loss_fn, has_aux=True)(state.params)
        fake = jax.lax.stop_gradient(recon)

        def d_loss_fn(d_params):
            real_logits, fake_logits = disc.apply(d_params, video), disc.apply(d_params, fake)
            return hinge_d_loss(real_logits, fake_logits), (real_logits.mean(), fake_logits.mean())

        (d_loss, (d_real, d_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc.params)
        # Before adv_start the discriminator keeps its params, moments and step exactly: a zero
        # gradient alone would still move it through AdamW's weight decay and bias correction.
        d_state = jax.tree.map(
            lambda new, old: jnp.where(on, new, old), state.disc.apply_gradients(d_grads), state.disc
        )
        metrics.update(grad_norm=tree_norm(grads), d_loss=d_loss, d_real=d_real, d_fake=d_fake,
                       d_grad_norm=tree_norm(d_grads), adv_weight=adv_w)
        return state.apply_gradients(grads).replace(disc=d_state), metrics

    return step


def physics_sources(config: ml_collections.ConfigDict) -> dict:
    """The train/test data sources named by config.data (built on first use)."""
    d = config.data
    return build_physics_dataset(
        str(Path(d.dir).absolute()), size=d.size, frames=d.frames,
        num_train=d.num_train, num_test=d.num_test, seed=d.seed, exclude=str(d.get("exclude", "")),
        zero_gravity=float(d.get("zero_gravity", 0.0)),
    )


def create_vae_state(
    config: ml_collections.ConfigDict, mesh, rules, rng: jax.Array
) -> tuple[TrainState, Any, PatchDiscriminator3D | None]:
    """Sharded initial train state of a VAE run, its shardings, and the discriminator (or None).

    With config.loss.adv > 0 the state is a VAEGANState carrying the discriminator's own
    TrainState (own optimiser, config.disc_optim), sharded by the same logical rules.
    """
    vae_cfg = vae_config_from(config)
    tx = make_optimizer(config.optim, config.train.steps, budget_minutes=config.train.max_minutes)
    state, shardings = create_sharded_state(
        lambda k: init_vae_variables(vae_cfg, k), tx, float(config.optim.ema_decay), mesh, rules, rng
    )
    if float(config.loss.adv) <= 0:
        return state, shardings, None
    disc_cfg = disc_config_from(config)
    disc_state, disc_shardings = create_sharded_state(
        lambda k: init_discriminator_variables(disc_cfg, k),
        make_optimizer(config.disc_optim, config.train.steps, budget_minutes=config.train.max_minutes),
        float(config.disc_optim.ema_decay),
        # fold_in, not a wider split: the VAE's keys stay those of a GAN-less run.
        mesh, rules, jax.random.fold_in(rng, 1),
    )
    state = with_discriminator(state, disc_state)
    return state, with_discriminator(shardings, disc_shardings), PatchDiscriminator3D(disc_cfg)


def train_vae(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train (or resume) a VAE run in config.workdir; returns its final metrics and history."""
    workdir = Path(config.workdir).absolute()
    mesh, rules = mesh_and_rules(config)
    vae_cfg = vae_config_from(config)
    frames = int(config.data.crop_frames) or int(config.data.frames)  # 0: whole clips
    crop = int(config.data.crop_size)
    validate_video_shape(vae_cfg, frames, crop, crop)
    validate_video_shape(vae_cfg, config.data.frames, config.data.size, config.data.size)
    if float(config.loss.adv) > 0:
        disc_config_from(config).logits_shape(frames, crop, crop)
    validate_layout(mesh, rules, rules_name=config.mesh.rules)
    local_batch = per_process_batch(config.data.batch_size, mesh, int(config.train.grad_accum))

    sources = physics_sources(config)
    loader = make_loader(
        sources["train"], batch_size=local_batch, seed=config.seed, shuffle=True,
        worker_count=config.data.worker_count, frames=frames, crop=crop,
    )
    model = CausalVAE(vae_cfg)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    state, shardings, disc = create_vae_state(config, mesh, rules, init_rng)
    manager = checkpoint.make_manager(workdir / "ckpt", keep=config.train.keep)
    data_iter = iter(loader)
    if manager.latest_step() is not None:
        state = _restore(manager, state, data_iter, finished_at=config.train.steps)
    # The model dataclass travels with the checkpoint so inference needs no training config.
    checkpoint.write_json_atomic(workdir / VAE_CONFIG_FILE, dataclass_to_json(vae_cfg))

    state, logger = train_sharded(
        step=make_vae_step(model, config.loss, disc, int(config.train.grad_accum)), state=state,
        state_shardings=shardings, periodic=make_vae_periodic(model, config, mesh, sources["test"]),
        batch_shardings={"video": batch_sharding(mesh, 5)}, mesh=mesh, rules=rules, data_iter=data_iter,
        to_device=lambda b: global_batch(mesh, {"video": b["video"]}), train_cfg=config.train,
        manager=manager, logdir=workdir / "tb", rng=train_rng, desc="train-vae",
    )
    # Evaluation runs outside the mesh context: small odd-sized batches need no batch sharding.
    # Latent statistics make DiT inputs unit-scale; they are part of the VAE's config.
    clips = physics_clips(sources["train"], max(config.eval.num_clips, 8), batch_size=4)
    stats = latent_channel_stats(VideoCodec(model, chunked=False), state.eval_params, clips)
    vae_cfg = dataclasses.replace(vae_cfg, latents_mean=stats["mean"], latents_std=stats["std"])
    checkpoint.write_json_atomic(workdir / VAE_CONFIG_FILE, dataclass_to_json(vae_cfg))
    metrics = evaluate_vae(model, state.eval_params, sources["test"], config.eval.num_clips)
    manager.close()
    final = logger.history[-1] if logger.history else {}
    return {"step": int(state.step), "final": final, "history": logger.history,
            "eval_history": logger.eval_history, **metrics,
            "corrupt_records_skipped": loader.stats.corrupt}


def _restore(manager, state: TrainState, data_iter, finished_at: int | None = None) -> TrainState:
    """Resume from the latest checkpoint; a GAN-less checkpoint may start the GAN phase."""
    has_disc = "disc" in checkpoint.saved_state_keys(manager)
    if isinstance(state, VAEGANState) and not has_disc:
        # Turning the adversarial loss on for a VAE trained without it: fresh discriminator.
        vae = checkpoint.restore(manager, without_discriminator(state), data_iter, finished_at=finished_at)
        return with_discriminator(vae, state.disc)
    if has_disc and not isinstance(state, VAEGANState):
        raise ValueError(
            f"the checkpoint in {manager.directory} was trained with a discriminator; resume it with "
            "--config.loss.adv > 0 (and the same config.disc) or start a new --config.workdir"
        )
    return checkpoint.restore(manager, state, data_iter, finished_at=finished_at)


def load_vae(workdir: str | Path, step: int | None = None) -> tuple[CausalVAE, Any]:
    """Load a trained VAE (config + EMA-or-raw params) from a run directory: checkpoint `step`, or the newest."""
    model, params, _ = load_vae_at(workdir, step)
    return model, params


def load_vae_at(workdir: str | Path, step: int | None = None) -> tuple[CausalVAE, Any, dict[str, Any]]:
    """`load_vae` plus the weights' identity {"vae_step", "vae_params"}: what latent caches and DiT runs record.

    A DiT learns the latents of one set of VAE weights. Keyed by the weights rather than the folder,
    a cache stays valid when the run folder moves and is rebuilt when the VAE trains on in place.
    """
    workdir = Path(workdir).absolute()
    model = CausalVAE(dataclass_from_json(VAEConfig, checkpoint.read_json(workdir / VAE_CONFIG_FILE)))
    abstract = jax.eval_shape(lambda: nn.meta.unbox(init_vae_variables(model.cfg, jax.random.key(0))))
    at, params = checkpoint.restore_params_at(workdir / "ckpt", on_one_device(abstract), step=step)
    return model, params, {"vae_step": int(at), "vae_params": checkpoint.params_fingerprint(params)}


def latent_frame_slices(frames: int, temporal_factor: int) -> list[slice]:
    """The pixel frames each latent frame encodes: frame 0 alone, then temporal_factor at a time."""
    return [slice(0, 1)] + [slice(s, s + temporal_factor) for s in range(1, frames, temporal_factor)]


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(model: CausalVAE, params, video):
    mean, _ = model.apply(params, video, method=CausalVAE.encode)
    return model.apply(params, mean, method=CausalVAE.decode)


def evaluate_vae(model: CausalVAE, params, source, num_clips: int) -> dict[str, Any]:
    """Held-out reconstruction metrics of whole clips through encode(mean) -> decode.

    psnr (dB) over [-1, 1] pixels, also per latent frame (psnr_by_latent_frame), and the standard
    ssim (of [0, 1] intensities); when the source stores the simulator state, the
    ball-centroid parse error (px) of the reconstructions and, as its floor, of the true clips:
    parse_error_px / parse_error_true_px is the issue's "<= 1.5x ground truth" ratio. Likewise
    parse_colour_err (and parse_colour_err_true): the parsed balls' core colour against the palette
    in RGB units, which flags a VAE that decodes balls in the wrong shade (docs/benchmarks.md).
    """
    batch = numpy_batch(source, range(min(num_clips, len(source))))
    clips = batch["video"]
    recon = np.concatenate(
        [np.asarray(_reconstruct(model, params, clips[i:i + 4])) for i in range(0, len(clips), 4)]
    ).astype(np.float32)
    # SSIM's 11-pixel window needs frames at least that large (data.size may be 8).
    fits = min(clips.shape[2:4]) >= 11
    out = {"psnr": float(psnr(recon, clips)),
           "ssim": ssim(recon, clips, data_range=2.0, min_value=-1.0) if fits else float("nan"),
           # Causal padding makes quality depend on the latent frame's index; a model that never
           # saw late latent frames in training shows it here and not in the mean.
           "psnr_by_latent_frame": [float(psnr(recon[:, f], clips[:, f]))
                                    for f in latent_frame_slices(clips.shape[1], model.cfg.temporal_factor)]}
    if "positions" in batch and "colors" in batch:
        rec = parse_error(recon, batch["positions"], batch["colors"])
        true = parse_error(clips, batch["positions"], batch["colors"])
        out.update(
            parse_error_px=rec["error_px"], parse_miss_rate=rec["miss_rate"],
            parse_spurious_per_frame=rec["spurious_per_frame"], parse_colour_err=rec["colour_err"],
            parse_error_true_px=true["error_px"], parse_miss_rate_true=true["miss_rate"],
            parse_colour_err_true=true["colour_err"],
        )
    return out
