"""VAE training extras: PatchGAN discriminator, VAE+GAN steps and checkpoints, SSIM, parse error."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sora_jax.data.physics import BACKGROUND, PALETTE_RGB, PhysicsConfig, simulate
from sora_jax.eval.physics import centroid_errors, parse_error
from sora_jax.eval.video import ssim
from sora_jax.models.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator3D,
    hinge_d_loss,
    hinge_g_loss,
    init_discriminator_variables,
)
from sora_jax.parallel.rules import LOGICAL_AXES
from tests.conftest import tiny_overrides

# --- discriminator ---------------------------------------------------------------------------


def test_discriminator_logits_shape_and_logical_names():
    cfg = DiscriminatorConfig(channels=8, num_layers=2, num_groups=4)
    boxed = init_discriminator_variables(cfg, jax.random.key(0))
    flat = traverse_util.flatten_dict(boxed["params"])
    # Same tree and shapes as flax's own init.
    ref = nn.meta.unbox(PatchDiscriminator3D(cfg).init(jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3))))
    assert jax.tree.map(jnp.shape, nn.meta.unbox(boxed)) == jax.tree.map(jnp.shape, ref)
    assert all(isinstance(b, nn.Partitioned) for b in flat.values()), "a parameter has no logical names"
    for path, box in flat.items():
        assert len(box.names) == box.value.ndim, path
        assert all(n is None or n in LOGICAL_AXES for n in box.names), (path, box.names)
        if path[-1] == "kernel":
            assert box.names == (None, None, None, "conv_in", "conv_out"), path
    assert flat[("norm_1", "scale")].names == ("norm",)

    params = nn.meta.unbox(boxed)
    video = jax.random.uniform(jax.random.key(1), (2, 3, 16, 24, 3), minval=-1, maxval=1)
    logits = PatchDiscriminator3D(cfg).apply(params, video)
    assert logits.shape == (2, 3, 4, 6) == (2, *cfg.logits_shape(3, 16, 24))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="divisible by 4"):
        cfg.logits_shape(3, 18, 16)
    with pytest.raises(ValueError, match="odd"):
        DiscriminatorConfig(temporal_kernel=2)


def test_hinge_losses_on_hand_made_logits():
    real = jnp.array([[2.0, 0.5], [-1.0, 1.0]])  # relu(1 - r) = 0, 0.5, 2, 0 -> mean 0.625
    fake = jnp.array([[-2.0, 0.0], [1.0, -0.5]])  # relu(1 + f) = 0, 1, 2, 0.5 -> mean 0.875
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.625 + 0.875)
    assert float(hinge_g_loss(fake)) == pytest.approx(0.375)
    # A confident, correct discriminator has zero loss; the generator's loss is unbounded below.
    assert float(hinge_d_loss(jnp.full((3,), 5.0), jnp.full((3,), -5.0))) == 0.0
    assert float(hinge_g_loss(jnp.full((3,), 5.0))) == -5.0


# --- foreground-weighted reconstruction loss --------------------------------------------------


class _FixedRecon:
    """Stands in for the VAE: apply returns the reconstruction held in params, and a zero posterior."""

    def apply(self, params, video, sample_rng=None):
        zeros = jnp.zeros((*video.shape[:-1], 2))
        return params["recon"], zeros, zeros


def _two_object_clip():
    video = np.full((1, 2, 8, 8, 3), -0.8, np.float32)  # a dark background, as physics_balls'
    video[:, :, 1:3, 1:3] = (0.9, -0.8, -0.8)  # a red square
    video[:, 1, 5:7, 4:6] = (-0.8, -0.8, 0.7)  # a blue one, in the second frame only
    return video


def test_foreground_mask_finds_objects_and_grows_by_the_dilation():
    from sora_jax.train.vae_trainer import foreground_mask

    video = _two_object_clip()
    mask = np.asarray(foreground_mask(jnp.asarray(video), 0.1, 0))[..., 0]
    expected = np.zeros((1, 2, 8, 8), bool)
    expected[:, :, 1:3, 1:3] = True
    expected[:, 1, 5:7, 4:6] = True
    np.testing.assert_array_equal(mask.astype(bool), expected)
    # One pixel of dilation: each 2x2 square becomes its 4x4 neighbourhood (clipped at the edge).
    grown = np.asarray(foreground_mask(jnp.asarray(video), 0.1, 1))[..., 0]
    assert grown[0, 0].sum() == 16 and grown[0, 1].sum() == 32 and grown[0, 0, 0, 0] == 1
    # A threshold above every object's distance from the background finds nothing.
    assert float(foreground_mask(jnp.asarray(video), 2.0, 1).sum()) == 0.0


def test_foreground_weighting_charges_object_errors_more_and_keeps_the_plain_metrics():
    import ml_collections

    from sora_jax.train.vae_trainer import vae_loss

    video = _two_object_clip()
    base = dict(l1=1.0, l2=0.0, kl=0.0, sample_posterior=False)
    plain = ml_collections.ConfigDict(base)
    weighted = ml_collections.ConfigDict(dict(base, fg_weight=9.0, fg_threshold=0.1, fg_dilate=0))

    def loss(cfg, recon):
        value, (metrics, _) = vae_loss(_FixedRecon(), cfg, {"recon": jnp.asarray(recon)}, jnp.asarray(video), None)
        return float(value), {k: float(v) for k, v in metrics.items()}

    on_object, on_background = video.copy(), video.copy()
    on_object[0, 0, 1, 1, 1] += 0.5  # one channel of one red pixel
    on_background[0, 0, 6, 1, 1] += 0.5  # the same error on the background
    # Unweighted, where the error lies does not matter; the plain mean over 2*8*8*3 values.
    assert loss(plain, on_object)[0] == pytest.approx(loss(plain, on_background)[0]) == pytest.approx(0.5 / 384)
    # Weighted: 12 of 128 pixels are foreground, weight 10; total weight 12*10 + 116 = 236 pixels.
    obj, obj_metrics = loss(weighted, on_object)
    bg, bg_metrics = loss(weighted, on_background)
    assert obj == pytest.approx(10 * 0.5 / (236 * 3), rel=1e-5)
    assert bg == pytest.approx(0.5 / (236 * 3), rel=1e-5)
    # The metrics stay plain means; fg_l1 averages over the 12 foreground pixels' channels.
    assert obj_metrics["l1"] == bg_metrics["l1"] == pytest.approx(0.5 / 384)
    assert obj_metrics["fg_l1"] == pytest.approx(0.5 / 36) and bg_metrics["fg_l1"] == 0.0
    assert obj_metrics["fg_fraction"] == pytest.approx(12 / 128)
    assert "fg_l1" not in loss(plain, on_object)[1]


# --- VAE + GAN training ----------------------------------------------------------------------


def _gan_config(root, **extra):
    from sora_jax.config_overrides import apply_overrides, load_config

    overrides = tiny_overrides(root) + [
        f"--config.workdir={root}/vae_gan", "--config.data.crop_size=16", "--config.eval.num_clips=2",
        "--config.loss.adv=0.1", "--config.loss.adv_start=1", "--config.disc.channels=8",
        "--config.train.ckpt_every=1", "--config.train.keep=5",
        # Pure data parallel (as tiny_runs): the fsdp compile of the VAE step costs ~2x on CPU;
        # the discriminator's fsdp layout is checked at init below.
        "--config.mesh.shape.data=8", "--config.mesh.shape.fsdp=1", "--config.mesh.rules=data",
    ]
    return apply_overrides(load_config("vae"), overrides + [f"--config.{k}={v}" for k, v in extra.items()])


def _restore_at(cfg, target, step):
    from sora_jax.train import checkpoint

    manager = checkpoint.make_manager(f"{cfg.workdir}/ckpt")
    state = checkpoint.restore(manager, target, step=step)
    manager.close()
    return jax.device_get(state)


def _changed(a, b) -> list[bool]:
    return jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b))


def test_vae_gan_train_warmup_checkpoint_and_resume(tmp_path):
    from sora_jax.train.setup import mesh_and_rules
    from sora_jax.train.vae_trainer import VAEGANState, create_vae_state, load_vae, train_vae

    cfg = _gan_config(tmp_path)
    mesh, rules = mesh_and_rules(cfg)
    assert mesh.devices.size == 8
    out = train_vae(cfg)
    assert out["step"] == 2
    rows = {r["step"]: r for r in out["history"]}
    # adv_start=1: the first update (step 0 -> 1) is warm-up, the second uses the adversarial loss.
    assert rows[1]["adv_weight"] == 0.0 and rows[2]["adv_weight"] == pytest.approx(0.1)
    for key in ("d_loss", "g_loss", "d_real", "d_fake", "rec_loss", "l1", "kl"):
        assert np.isfinite(rows[2][key]), key
    assert rows[2]["loss"] == pytest.approx(rows[2]["rec_loss"] + 0.1 * rows[2]["g_loss"], rel=1e-5)
    assert isinstance(out["psnr"], float) and np.isfinite(out["psnr"])
    assert -1.0 <= out["ssim"] <= 1.0
    assert out["parse_error_true_px"] < 0.5 and out["parse_miss_rate_true"] == 0.0
    assert out["parse_colour_err_true"] < 0.5  # true clips' ball cores are their palette colour

    # Checkpoints hold the discriminator: unchanged by the warm-up step, updated after adv_start.
    init, _, _ = create_vae_state(cfg, mesh, rules, jax.random.split(jax.random.key(cfg.seed))[0])
    init = jax.device_get(init)
    # A differently seeded target: everything compared below must come from the checkpoint.
    target, _, _ = create_vae_state(cfg, mesh, rules, jax.random.key(123))
    s1, s2 = _restore_at(cfg, target, 1), _restore_at(cfg, target, 2)
    assert isinstance(s1, VAEGANState)
    assert int(s1.step) == 1 and int(s1.disc.step) == 0
    assert not any(_changed(init.disc.params, s1.disc.params)), "discriminator moved before adv_start"
    assert not any(_changed(init.disc.opt_state, s1.disc.opt_state))
    assert any(_changed(init.params, s1.params)), "the VAE did not train during warm-up"
    assert int(s2.step) == 2 and int(s2.disc.step) == 1
    assert any(_changed(s1.disc.params, s2.disc.params)), "discriminator did not train after adv_start"
    # Sharded by the same rules as the VAE: on an fsdp mesh discriminator weights and moments split.
    from sora_jax.models.discriminator import init_discriminator_variables
    from sora_jax.parallel.mesh import make_mesh
    from sora_jax.parallel.rules import get_rules
    from sora_jax.train.state import create_sharded_state, make_optimizer
    from sora_jax.train.vae_trainer import disc_config_from

    d_state, _ = create_sharded_state(
        lambda k: init_discriminator_variables(disc_config_from(cfg), k),
        make_optimizer(cfg.disc_optim, 10), 0.0, make_mesh({"data": 2, "fsdp": 4}), get_rules("fsdp"),
        jax.random.key(0),
    )
    for tree in (d_state.params, d_state.opt_state[1][0].mu):
        split = [x for x in jax.tree.leaves(tree) if "fsdp" in str(x.sharding.spec)]
        assert split and all(x.addressable_shards[0].data.size * 4 == x.size for x in split)

    # Inference loading ignores the discriminator.
    model, params = load_vae(cfg.workdir)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, s2.params)

    # Resuming: a GAN target takes everything from a GAN checkpoint ...
    from sora_jax.train import checkpoint
    from sora_jax.train.vae_trainer import _restore, without_discriminator

    manager = checkpoint.make_manager(tmp_path / "vae_gan" / "ckpt")
    assert "disc" in checkpoint.saved_state_keys(manager)
    resumed = jax.device_get(_restore(manager, target, None))
    assert int(resumed.disc.step) == 1 and not any(_changed(s2.disc.params, resumed.disc.params))
    # ... a GAN-less target refuses it with a clear message ...
    with pytest.raises(ValueError, match="trained with a discriminator"):
        _restore(manager, without_discriminator(target), None)
    manager.close()
    # ... and a GAN-less checkpoint starts the GAN phase with a fresh discriminator.
    plain = checkpoint.make_manager(tmp_path / "plain_ckpt", async_save=False)
    checkpoint.save(plain, without_discriminator(_restore_at(cfg, target, 1)), force=True)
    assert "disc" not in checkpoint.saved_state_keys(plain)
    fresh = jax.device_get(_restore(plain, target, None))
    assert isinstance(fresh, VAEGANState) and int(fresh.step) == 1 and int(fresh.disc.step) == 0
    assert not any(_changed(s1.params, fresh.params))
    assert not any(_changed(jax.device_get(target.disc.params), fresh.disc.params))
    plain.close()


# --- SSIM --------------------------------------------------------------------------------------


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Per-image, per-channel SSIM via scipy's Gaussian filter, borders cropped (skimage's recipe)."""
    from scipy.ndimage import gaussian_filter

    sigma, truncate = 1.5, 3.5  # radius int(3.5 * 1.5 + 0.5) = 5 -> 11 taps
    pad = 5
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for img_x, img_y in zip(x.reshape(-1, *x.shape[-3:]), y.reshape(-1, *y.shape[-3:])):
        for ch in range(x.shape[-1]):
            a, b = img_x[..., ch].astype(np.float64), img_y[..., ch].astype(np.float64)

            def f(z):
                return gaussian_filter(z, sigma, truncate=truncate, mode="reflect")

            ma, mb = f(a), f(b)
            va, vb, cab = f(a * a) - ma * ma, f(b * b) - mb * mb, f(a * b) - ma * mb
            s = ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
            values.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(values))


def test_ssim_matches_a_scipy_reference_and_basic_properties():
    rng = np.random.default_rng(0)
    ex = simulate(2, PhysicsConfig(size=32, frames=3))
    clean = ex["video"].astype(np.float32)[None] / 127.5 - 1.0  # [1, T, H, W, 3] in [-1, 1]
    clean = np.concatenate([clean, rng.uniform(-1, 1, clean.shape).astype(np.float32)])  # + texture
    assert ssim(clean, clean) == pytest.approx(1.0, abs=1e-12)
    scores = []
    for noise in (0.02, 0.1, 0.3):
        noisy = np.clip(clean + rng.normal(0, noise, clean.shape), -1, 1)
        got = ssim(noisy, clean)  # defaults: [-1, 1] pixels
        assert got == pytest.approx(_ssim_reference((noisy + 1) / 2, (clean + 1) / 2, 1.0), abs=1e-9)
        scores.append(got)
    assert 1.0 > scores[0] > scores[1] > scores[2]
    # The same clips as [0, 1] or [0, 255] intensities give the same value.
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), -1, 1)
    want = ssim(noisy, clean, data_range=2.0, min_value=-1.0)
    assert ssim((noisy + 1) / 2, (clean + 1) / 2, data_range=1.0, min_value=0.0) == pytest.approx(want, abs=1e-9)
    assert ssim((noisy + 1) * 127.5, (clean + 1) * 127.5, 255.0, min_value=0.0) == pytest.approx(want, abs=1e-9)
    # Non-square frames and a single image both work; too-small frames and shape mismatches do not.
    a = rng.uniform(0, 1, (12, 20, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert ssim(a, b, data_range=1.0, min_value=0.0) == pytest.approx(_ssim_reference(a, b, 1.0), abs=1e-9)
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(np.zeros((2, 10, 16, 3)), np.zeros((2, 10, 16, 3)))
    with pytest.raises(ValueError, match="equal shapes"):
        ssim(np.zeros((2, 16, 16, 3)), np.zeros((1, 16, 16, 3)))


# --- parse error -------------------------------------------------------------------------------


def test_parse_error_small_on_truth_and_grows_with_a_shift():
    cfg = PhysicsConfig(size=64, frames=5)
    exs = [simulate(s, cfg) for s in (1, 2, 3)]
    videos = np.stack([e["video"] for e in exs]).astype(np.float32) / 127.5 - 1.0
    pos, cols = np.stack([e["positions"] for e in exs]), np.stack([e["colors"] for e in exs])
    truth = parse_error(videos, pos, cols)
    assert truth["error_px"] < 0.2 and truth["miss_rate"] == 0.0 and truth["spurious_per_frame"] == 0.0
    # Shift every frame 3 px right (edge-replicated background, no wrap-around).
    shifted = np.concatenate([np.repeat(videos[:, :, :, :1], 3, axis=3), videos[:, :, :, :-3]], axis=3)
    moved = parse_error(shifted, pos, cols)
    assert moved["error_px"] == pytest.approx(3.0, abs=0.3) and moved["miss_rate"] == 0.0
    assert truth["colour_err"] < 0.5 and moved["colour_err"] < 0.5  # a shift moves balls, not colours
    # Every ball pixel 12 RGB units brighter in each channel (~20.8 units off), background untouched.
    u8 = np.stack([e["video"] for e in exs]).astype(np.float32)
    ball = np.abs(u8 - np.asarray(BACKGROUND, np.float32)).sum(-1, keepdims=True) > 0
    tinted = np.clip(u8 + 12.0 * ball, 0, 255) / 127.5 - 1.0
    assert parse_error(tinted, pos, cols)["colour_err"] == pytest.approx(12 * np.sqrt(3), abs=1.0)

    # Misses and spurious blobs are counted apart from the error.
    ex = exs[0]
    blank = np.broadcast_to(np.array(BACKGROUND, np.uint8), ex["video"].shape)
    c = centroid_errors(blank, ex["positions"], ex["colors"])
    assert c["misses"] == c["balls"] == ex["num_balls"] * cfg.frames and c["errors"].size == 0
    assert np.isnan(parse_error(blank[None], ex["positions"][None], ex["colors"][None])["error_px"])
    absent = next(k for k in range(len(PALETTE_RGB)) if k not in ex["colors"])
    painted = ex["video"].copy()
    painted[:, 0:6, 0:6] = PALETTE_RGB[absent].astype(np.uint8)
    c = centroid_errors(painted, ex["positions"], ex["colors"])
    assert c["spurious"] == cfg.frames and c["misses"] == 0
    with pytest.raises(ValueError, match="positions"):
        centroid_errors(ex["video"], ex["positions"][:, :1, 0], ex["colors"])


def test_latent_frame_slices_follow_the_causal_vae_grouping():
    from sora_jax.models.vae import VAEConfig
    from sora_jax.train.vae_trainer import latent_frame_slices

    cfg = VAEConfig.tiny()
    for frames in (1, 5, 17):
        slices = latent_frame_slices(frames, cfg.temporal_factor)
        assert len(slices) == cfg.latent_shape(frames, 16, 16)[0]
        assert [i for s in slices for i in range(frames)[s]] == list(range(frames))
    assert latent_frame_slices(9, 4) == [slice(0, 1), slice(1, 5), slice(5, 9)]
