"""Prompting modes: every mode end to end on the tiny run, conditioned latents exact, training masks, bad inputs."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from PIL import Image

from sora_jax.cli import main
from sora_jax.diffusion import conditioning as lc
from sora_jax.diffusion import flow
from sora_jax.diffusion.samplers import Conditioning, FlowSampler
from sora_jax.diffusion.unipc import UniPCSampler

PROMPT = "one ball: red"


@pytest.fixture(scope="module")
def pipe(tiny_runs):
    from sora_jax.pipeline import TextToVideo

    return TextToVideo.load(tiny_runs["dit_cfg"].workdir)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 5-frame 40x48 MP4 and a 40x48 PNG (not the output size: they get resized and cropped)."""
    from sora_jax.data.video import write_mp4

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (5, 40, 48, 3), dtype=np.uint8)
    write_mp4(root / "clip.mp4", frames)
    Image.fromarray(frames[0]).save(root / "frame.png")
    Image.fromarray(frames[-1]).save(root / "last.jpg")
    return {"mp4": root / "clip.mp4", "png": root / "frame.png", "jpg": root / "last.jpg", "root": root}


def _sampler(pipe, solver="euler"):
    return pipe.make_sampler(solver, 2, None)


def _run(pipe, mode, inputs, solver="euler", **kw):
    """(videos, final latents, the LatentCondition the pipeline built) for one prompt."""
    shape = pipe.latent_shape(1, 1 if mode == "t2i" else None, None)
    opts = {k: kw[k] for k in ("mask_box", "mask_frames", "strength", "direction", "cond_frames") if k in kw}
    cond = pipe.condition(mode, shape, inputs, **opts)
    videos, z = pipe.generate([PROMPT], mode=mode, inputs=inputs, sampler=_sampler(pipe, solver),
                              return_latents=True, **kw)
    return videos, z, cond


def _assert_exact(z, cond):
    given = np.asarray(cond.mask)[..., 0] > 0
    assert given.any() and not given.all()
    np.testing.assert_array_equal(z[given], np.asarray(cond.latents)[given])


def test_t2v_unchanged_and_t2i_one_frame(pipe):
    plain = pipe.generate([PROMPT], sampler=_sampler(pipe), seed=3)
    videos, z = pipe.generate([PROMPT], sampler=_sampler(pipe), seed=3, mode="t2v", return_latents=True)
    np.testing.assert_array_equal(plain, videos)
    assert videos.shape == (1, 5, 32, 32, 3) and z.shape[1] == 2
    image = pipe.generate([PROMPT], sampler=_sampler(pipe), mode="t2i")
    assert image.shape == (1, 1, 32, 32, 3)


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_i2v_first_latent_frame_exact(pipe, clip, solver):
    videos, z, cond = _run(pipe, "i2v", [clip["png"]], solver)
    assert videos.shape == (1, 5, 32, 32, 3)
    _assert_exact(z, cond)
    assert np.asarray(cond.mask)[0, :, 0, 0, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_extend(pipe, clip, direction):
    videos, z, cond = _run(pipe, "extend", [clip["mp4"]], direction=direction)
    assert videos.shape == (1, 5, 32, 32, 3)
    _assert_exact(z, cond)
    held = np.asarray(cond.mask)[0, :, 0, 0, 0].tolist()
    assert held == ([1.0, 0.0] if direction == "forward" else [0.0, 1.0])


def test_condition_follows_the_runs_given_t0(pipe, clip):
    """A run trained with diffusion.given_t0 gets t0 conditions (held clean at timestep 0); others do not."""
    shape = pipe.latent_shape(1, None, None)
    assert pipe.defaults.get("given_t0") is False  # the tiny run trains without masks
    assert not pipe.condition("i2v", shape, [clip["png"]]).t0
    t0_pipe = dataclasses.replace(pipe, defaults={**pipe.defaults, "given_t0": True})
    cond = t0_pipe.condition("i2v", shape, [clip["png"]])
    assert cond.t0 and np.asarray(cond.mask)[0, :, 0, 0, 0].tolist() == [1.0, 0.0]
    assert t0_pipe.condition("t2v", shape) is None


def test_interpolate(pipe, clip):
    # 9 frames -> 3 latent frames: ends given, the middle generated.
    shape = pipe.latent_shape(1, 9, None)
    cond = pipe.condition("interpolate", shape, [clip["png"], clip["jpg"]])
    videos, z = pipe.generate([PROMPT], frames=9, mode="interpolate", inputs=[clip["png"], clip["jpg"]],
                              sampler=_sampler(pipe), return_latents=True)
    assert videos.shape == (1, 9, 32, 32, 3)
    assert np.asarray(cond.mask)[0, :, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]
    _assert_exact(z, cond)


def test_inpaint_box_maps_to_covered_cells(pipe, clip):
    # Box rows/cols 4..20 of 32 px: only latent cells entirely outside the box are given.
    videos, z, cond = _run(pipe, "inpaint", [clip["mp4"]], mask_box=(4, 4, 20, 20))
    _assert_exact(z, cond)
    s = pipe.vae.cfg.spatial_factor
    mask = np.asarray(cond.mask)[0, 0, :, :, 0]
    ys = np.arange(mask.shape[0]) * s
    touched = (ys + s > 4) & (ys < 20)
    np.testing.assert_array_equal(mask, ~(touched[:, None] & touched[None, :]))
    # Frames only: pixel frames 1..4 are latent frame 1.
    _, z2, cond2 = _run(pipe, "inpaint", [clip["mp4"]], mask_frames=(2, 3))
    assert np.asarray(cond2.mask)[0, :, 0, 0, 0].tolist() == [1.0, 0.0]
    _assert_exact(z2, cond2)


def test_sdedit_strength_zero_returns_input(pipe, clip):
    _, z, cond = _run(pipe, "sdedit", [clip["mp4"]], strength=0.0)
    np.testing.assert_array_equal(z, np.asarray(cond.latents))
    videos, z, cond = _run(pipe, "sdedit", [clip["mp4"]], strength=0.5)
    assert videos.shape == (1, 5, 32, 32, 3) and not np.array_equal(z, np.asarray(cond.latents))


def test_pixel_to_latent_mask():
    keep = np.ones((9, 8, 8), bool)
    keep[5, 0, 0] = False  # pixel frame 5 belongs to latent frame 2 (frames 5..8)
    m = lc.pixel_to_latent_mask(keep, 4, 4)
    assert m.shape == (3, 2, 2) and m.sum() == 11 and not m[2, 0, 0]
    keep = np.ones((9, 8, 8), bool)
    keep[0] = False
    assert lc.pixel_to_latent_mask(keep, 4, 4)[0].sum() == 0 and lc.pixel_to_latent_mask(keep, 4, 4)[1:].all()


@dataclasses.dataclass(frozen=True)
class _Smooth:
    def __call__(self, params, x, t, text, text_mask):
        tau = (t / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
        return jnp.sin(1.3 * x + 2.0 * tau) * 0.6 + 0.5 * x * tau


@pytest.mark.parametrize("sampler", [FlowSampler(num_steps=4, solver="heun", guidance=2.0), UniPCSampler(num_steps=4)])
def test_sampler_holds_cells_along_the_trajectory(sampler):
    shape = (2, 3, 4, 4, 2)
    noise = jax.random.normal(jax.random.key(0), shape)
    z = jax.random.normal(jax.random.key(1), shape)
    given = np.zeros(shape[1:4], bool)
    given[0] = True
    given[2, 1:3, 1:3] = True
    cond = lc.region(z, given)
    ones = jnp.ones((2, 2, 3))
    text = Conditioning(ones, jnp.ones((2, 2), bool), -ones, jnp.ones((2, 2), bool))
    traj = np.asarray(sampler.trajectory(_Smooth(), None, noise, text, None, cond))
    sigmas = np.asarray(sampler.sigmas())
    for i, s in enumerate(sigmas[1:], 1):  # traj[0] is the raw noise, by definition of trajectory
        want = np.asarray(flow.add_noise(z, noise, s))
        np.testing.assert_allclose(traj[i][:, given], want[:, given], atol=1e-6)
    np.testing.assert_array_equal(traj[-1][:, given], np.asarray(z)[:, given])
    # sdedit: the loop starts part-way (one jitted scan of the remaining steps).
    k = lc.start_index(sigmas, 0.5)
    part = sampler.trajectory(_Smooth(), None, noise, text, None, lc.sdedit(z, 0.5))
    assert part.shape[0] == 1 + sampler.num_steps - k and 0 < k < sampler.num_steps
    jaxpr = str(jax.make_jaxpr(lambda n: sampler(_Smooth(), None, n, text, None, lc.sdedit(z, 0.5)))(noise))
    assert "scan[" in jaxpr and f"length={sampler.num_steps - k}" in jaxpr.replace(" ", "")


@dataclasses.dataclass(frozen=True)
class _PerCellTime:
    """A velocity field that takes timesteps [B] or per latent cell [B, T', H', W'] and mixes cells."""

    def __call__(self, params, x, t, text, text_mask):
        tau = jnp.broadcast_to((t / 1000.0).reshape(t.shape + (1,) * (x.ndim - t.ndim)), x.shape)
        # The mean over cells makes every output depend on the given cells' timesteps too.
        return jnp.sin(1.3 * x + 2.0 * tau) * 0.6 + tau.mean(axis=(1, 2, 3), keepdims=True) * text[:, :1, :1, None, None]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_t0_condition_holds_clean_cells_at_timestep_zero(guidance):
    """Under t0 the given cells stay clean all the way and the network sees them at timestep 0."""
    shape = (2, 3, 4, 4, 2)
    noise = jax.random.normal(jax.random.key(0), shape)
    z = jax.random.normal(jax.random.key(1), shape)
    cond = dataclasses.replace(lc.first_frames(shape, z[:, :1]), t0=True)
    given = np.asarray(cond.mask)[..., 0] > 0
    ones = jnp.ones((2, 2, 3))
    text = Conditioning(ones, jnp.ones((2, 2), bool), -ones, jnp.ones((2, 2), bool))
    sampler = FlowSampler(num_steps=4, solver="euler", guidance=guidance)
    traj = np.asarray(sampler.trajectory(_PerCellTime(), None, noise, text, None, cond))
    # A plain Euler loop: given cells clean, per-cell timesteps with 0 on them, classifier-free guidance.
    net, x = _PerCellTime(), np.where(given[..., None], np.asarray(z), np.asarray(noise))
    sigmas = np.asarray(sampler.sigmas())
    for i in range(sampler.num_steps):
        t = np.where(given, 0.0, sigmas[i] * 1000.0).astype(np.float32)
        v_c = net(None, jnp.asarray(x), jnp.asarray(t), text.text, None)
        v_u = net(None, jnp.asarray(x), jnp.asarray(t), text.null_text, None)
        v = np.asarray(v_u + guidance * (v_c - v_u))
        x = np.where(given[..., None], np.asarray(z), x + (sigmas[i + 1] - sigmas[i]) * v)
        np.testing.assert_array_equal(traj[i + 1][given], np.asarray(z)[given])
        np.testing.assert_allclose(traj[i + 1], x, atol=1e-5)
    # Without t0 the same run is different (noised given cells, shared timestep): the check can fail.
    plain = np.asarray(sampler(_PerCellTime(), None, noise, text, None, dataclasses.replace(cond, t0=False)))
    assert np.abs(plain - traj[-1])[~given].max() > 1e-3
    # UniPC holds them clean at every step too.
    uni = np.asarray(UniPCSampler(num_steps=4).trajectory(_PerCellTime(), None, noise, text, None, cond))
    for step in uni[1:]:
        np.testing.assert_array_equal(step[given], np.asarray(z)[given])


def test_train_mask_strategies():
    grid = (4, 3, 5)
    masks = np.asarray(jax.jit(lc.strategy_masks, static_argnums=(1, 2))(jax.random.key(0), 64, grid))
    assert masks.shape == (len(lc.MASK_STRATEGIES), 64, *grid)
    by = dict(zip(lc.MASK_STRATEGIES, masks))
    frame = {k: v[:, :, 0, 0] for k, v in by.items()}  # temporal strategies are constant over space
    for k in ("none", "first_frame", "first_k", "last_k", "both_ends", "random_frames"):
        assert (by[k] == by[k][:, :, :1, :1]).all(), k
    assert not frame["none"].any()
    assert (frame["first_frame"] == [1, 0, 0, 0]).all()
    for k in ("first_k", "last_k", "both_ends", "random_frames"):
        assert (frame[k].sum(1) >= 1).all() and (frame[k].sum(1) <= 3).all(), k  # something given, something free
    assert (np.diff(frame["first_k"], axis=1) <= 0).all() and (np.diff(frame["last_k"], axis=1) >= 0).all()
    assert (frame["both_ends"][:, 0] == 1).all() and (frame["both_ends"][:, -1] == 1).all()
    box = by["random_box"]
    assert (box == box[:, :1]).all() and (box.reshape(64, -1).min(1) == 0).all()  # same every frame, a hole
    rates = lc.MaskRates(first_frame=0.5, random_box=0.5)
    m = np.asarray(jax.jit(lc.sample_train_masks, static_argnums=(1, 2, 3))(jax.random.key(1), rates, 64, grid))
    assert m.shape == (64, *grid, 1)
    is_first = (m[:, :, 0, 0, 0] == [1, 0, 0, 0]).all(1) & (m[..., 0] == m[:, :, :1, :1, 0]).all((1, 2, 3))
    assert 10 < is_first.sum() < 54
    assert not lc.MaskRates().enabled
    with pytest.raises(ValueError, match="sum to at most 1"):
        lc.MaskRates(first_frame=0.7, last_k=0.7)


class _PerCell(nn.Module):
    """A velocity model that never mixes latent cells: a given cell's input only moves its own output."""

    @nn.compact
    def __call__(self, x, t, text, text_mask):
        return nn.Dense(x.shape[-1])(x) * (1.0 + t[:, None, None, None, None] / 1000.0)


def test_masked_train_step_excludes_given_cells():
    import ml_collections

    from configs.common import optim_config
    from sora_jax.train.dit_trainer import make_dit_step
    from sora_jax.train.state import TrainState, make_optimizer

    x0 = jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 4))
    pred = jax.random.normal(jax.random.key(1), x0.shape)
    noise = jnp.zeros_like(x0)
    given = jnp.zeros((2, 2, 4, 4, 1)).at[:, 0].set(1.0)
    loss = flow.flow_loss(pred, x0, noise, given=given)
    # Changing the prediction on given cells does not change the loss.
    np.testing.assert_allclose(loss, flow.flow_loss(pred.at[:, 0].add(5.0), x0, noise, given=given))
    np.testing.assert_allclose(loss, flow.flow_loss(pred[:, 1:], x0[:, 1:], noise[:, 1:]), rtol=1e-6)

    # The real train step (a per-cell stand-in for the DiT keeps the compile short): with every example
    # conditioned on its first latent frame, that frame's content cannot move the loss.
    model = _PerCell()
    params = model.init(jax.random.key(0), x0[:1], jnp.zeros((1,)), None, None)
    tx = make_optimizer(optim_config(1e-3, 1), 10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None, tx=tx)
    batch = {"latents": x0, "text": jnp.ones((2, 3, 8)), "text_mask": jnp.ones((2, 3), bool)}
    losses = {}
    for name, rates in (("off", {}), ("first", {"first_frame": 1.0})):
        diff = ml_collections.ConfigDict({"text_dropout": 0.1, "timestep_sampling": "logit_normal", "shift": 1.0,
                                          "mask_rates": rates})
        step = jax.jit(make_dit_step(model, diff))
        for changed in (False, True):
            b = dict(batch, latents=x0.at[:, 0].add(3.0) if changed else x0)
            new, metrics = step(state, b, jax.random.key(2))
            assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
            losses[name, changed] = float(metrics["loss"])
    assert losses["first", False] == losses["first", True]
    assert losses["off", False] != losses["off", True]


def _time_spy(seen: list) -> nn.Module:
    """A per-cell velocity model that appends the timesteps it is fed to `seen` (eagerly, they are concrete)."""

    class TimeSpy(nn.Module):
        @nn.compact
        def __call__(self, x, t, text, text_mask):
            seen.append(t)
            return nn.Dense(x.shape[-1])(x)

    return TimeSpy()


def test_given_t0_feeds_given_cells_at_timestep_zero():
    """diffusion.given_t0: given cells reach the network at t = 0, the rest at their example's timestep."""
    import ml_collections

    from configs.common import optim_config
    from sora_jax.train.dit_trainer import make_dit_step
    from sora_jax.train.state import TrainState, make_optimizer

    x0 = jax.random.normal(jax.random.key(0), (8, 3, 2, 2, 1))
    batch = {"latents": x0, "text": jnp.ones((8, 3, 8)), "text_mask": jnp.ones((8, 3), bool)}
    fed = {}
    for t0 in (False, True):
        seen = []
        model = _time_spy(seen)
        params = model.init(jax.random.key(0), x0[:1], jnp.zeros((1,)), None, None)
        seen.clear()
        tx = make_optimizer(optim_config(1e-3, 1), 10)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None,
                           tx=tx)
        diff = ml_collections.ConfigDict({"text_dropout": 0.0, "timestep_sampling": "uniform", "shift": 1.0,
                                          "given_t0": t0, "mask_rates": {"first_frame": 1.0}})
        with jax.disable_jit():
            make_dit_step(model, diff)(state, batch, jax.random.key(3))
        fed[t0] = np.asarray(seen[-1])
    shared, per_cell = fed[False], fed[True]
    assert shared.shape == (8,) and np.all(shared > 0)
    assert per_cell.shape == (8, 3, 2, 2)
    np.testing.assert_array_equal(per_cell[:, 0], 0.0)  # first_frame: latent frame 0 is given
    np.testing.assert_allclose(per_cell[:, 1:], np.broadcast_to(shared[:, None, None, None], (8, 2, 2, 2)))


def _cli_error(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit code {code}, stderr {err!r}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert expected in err, err


def test_cli_i2v_and_inpaint(capsys, tiny_runs, clip, tmp_path):
    workdir = str(tiny_runs["dit_cfg"].workdir)
    for mode, extra in (("i2v", ["--input", str(clip["png"])]),
                        ("inpaint", ["--input", str(clip["mp4"]), "--mask-box", "8,8,24,24", "--mask-frames", "1:5"])):
        out = tmp_path / f"{mode}.npy"
        code = main(["sample", "--workdir", workdir, "--prompt", PROMPT, "--steps", "2", "--mode", mode,
                     "--output", str(out), *extra])
        assert code == 0, capsys.readouterr().err
        assert np.load(out).shape == (5, 32, 32, 3)


def test_bad_inputs_cli(capsys, tiny_runs, clip, tmp_path):
    workdir = str(tiny_runs["dit_cfg"].workdir)
    base = ["sample", "--workdir", workdir, "--prompt", PROMPT, "--steps", "2"]
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    _cli_error(capsys, base + ["--mode", "i2v", "--input", str(fake)], "cannot read")
    _cli_error(capsys, base + ["--mode", "i2v", "--input", str(tmp_path / "missing.png")], "not found")
    _cli_error(capsys, base + ["--mode", "extend", "--input", str(clip["png"]), "--cond-frames", "5",
                               "--frames", "9"], "has 1 frame(s) but 5 are needed")
    _cli_error(capsys, base + ["--mode", "inpaint", "--input", str(clip["mp4"]), "--mask-box", "1,2"], "--mask-box")


def test_bad_inputs_api(pipe, clip, tmp_path):
    shape = pipe.latent_shape(1)
    cases = [
        ("extend", [clip["mp4"]], {"cond_frames": 5}, "leaving none to generate"),
        ("extend", [clip["mp4"]], {"cond_frames": 3}, "is not 4k+1"),
        ("inpaint", [clip["mp4"]], {}, "needs a region"),
        ("inpaint", [clip["mp4"]], {"mask_box": (0, 0, 40, 8)}, "not inside"),
        ("interpolate", [clip["png"]], {}, "takes 2 input(s)"),
        ("sdedit", [clip["png"]], {}, "has 1 frame(s) but 5"),
        ("sdedit", [clip["mp4"]], {"strength": 1.5}, "outside [0, 1]"),
        ("i2v", [np.zeros((4, 4), np.uint8)], {}, "pass images [H, W, 3]"),
        ("t2v", [clip["png"]], {}, "takes 0 input(s)"),
        ("zoom", [], {}, "unknown mode"),
    ]
    (tmp_path / "x.txt").write_text("hello")
    cases.append(("i2v", [tmp_path / "x.txt"], {}, "unknown file type"))
    for mode, inputs, kw, match in cases:
        with pytest.raises(ValueError, match=re.escape(match)):
            pipe.condition(mode, shape, inputs, **kw)


def test_help_documents_every_mode(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    for mode in lc.MODES:
        assert any(line.strip().startswith(mode + " ") for line in out.splitlines()), mode


def _sparse_batch() -> tuple[jax.Array, np.ndarray]:
    """8 clips on one shared, position-varying background, each with one 'object' cell of its own."""
    rng = np.random.default_rng(0)
    background = rng.normal(size=(1, 2, 4, 4, 3))
    x0 = np.repeat(background, 8, axis=0) + 0.05 * rng.normal(size=(8, 2, 4, 4, 3))
    objects = np.zeros((8, 2, 4, 4, 1), bool)
    for b in range(8):
        t, h, w = b % 2, b // 2, (3 * b) % 4
        x0[b, t, h, w] += 2.0  # |offset| = 2 sqrt(3) ~ 3.5 latent units from the background
        objects[b, t, h, w] = True
    return jnp.asarray(x0, jnp.float32), objects


def test_foreground_cells_weights_the_cells_that_leave_the_batch_background():
    from sora_jax.diffusion.weighting import foreground_cells, per_example_mean

    x0, objects = _sparse_batch()
    cells, share = foreground_cells(x0, 9.0, 1.0)
    np.testing.assert_array_equal(np.asarray(cells), np.where(objects, 10.0, 1.0))
    np.testing.assert_allclose(float(share), objects.mean())
    # A batch of one has no background to differ from.
    np.testing.assert_array_equal(np.asarray(foreground_cells(x0[:1], 9.0, 1.0)[0]), 1.0)

    err = jnp.asarray(np.random.default_rng(1).uniform(size=x0.shape), jnp.float32)
    given = jnp.zeros((8, 2, 4, 4, 1)).at[:, 0].set(1.0)
    keep = np.broadcast_to((1.0 - np.asarray(given)) * np.asarray(cells), err.shape)
    expected = (np.asarray(err) * keep).reshape(8, -1).sum(1) / keep.reshape(8, -1).sum(1)
    np.testing.assert_allclose(per_example_mean(err, given, cells), expected, rtol=1e-6)
    # Unit weights are the plain mean; heavier object cells move the mean towards their error.
    np.testing.assert_allclose(per_example_mean(err, given, jnp.ones_like(cells)), per_example_mean(err, given),
                               rtol=1e-6)
    on_objects = jnp.where(objects, 100.0, 0.0)
    assert np.all(np.asarray(per_example_mean(err + on_objects, None, cells) - per_example_mean(err, None, cells))
                  > np.asarray(per_example_mean(err + on_objects) - per_example_mean(err)))


def test_train_step_fg_weight():
    """diffusion.fg_weight = 0 is the plain step bit for bit; > 0 reweights the loss and reports the share."""
    import ml_collections

    from configs.common import optim_config
    from sora_jax.diffusion.weighting import foreground_cells
    from sora_jax.train.dit_trainer import make_dit_step
    from sora_jax.train.state import TrainState, make_optimizer

    x0, objects = _sparse_batch()
    model = _PerCell()
    params = model.init(jax.random.key(0), x0[:1], jnp.zeros((1,)), None, None)
    tx = make_optimizer(optim_config(1e-3, 1), 10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None, tx=tx)
    batch = {"latents": x0, "text": jnp.ones((8, 3, 8)), "text_mask": jnp.ones((8, 3), bool)}
    base = {"text_dropout": 0.1, "timestep_sampling": "logit_normal", "shift": 1.0, "mask_rates": {"first_k": 0.5}}
    out = {}
    for name, extra in (("absent", {}), ("zero", {"fg_weight": 0.0}), ("ten", {"fg_weight": 10.0})):
        step = jax.jit(make_dit_step(model, ml_collections.ConfigDict({**base, **extra})))
        out[name] = step(state, batch, jax.random.key(2))
    assert float(out["absent"][1]["loss"]) == float(out["zero"][1]["loss"])
    assert "fg_share" not in out["zero"][1]
    np.testing.assert_allclose(float(out["ten"][1]["fg_share"]), float(foreground_cells(x0, 10.0, 1.0)[1]))
    np.testing.assert_allclose(float(out["ten"][1]["fg_share"]), objects.mean())
    assert float(out["ten"][1]["loss"]) != float(out["zero"][1]["loss"])
    for bad in ({"fg_weight": -1.0}, {"fg_weight": 1.0, "fg_threshold": 0.0}):
        with pytest.raises(ValueError, match="diffusion.fg_weight must be >= 0"):
            make_dit_step(model, ml_collections.ConfigDict({**base, **bad}))
