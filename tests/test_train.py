"""Sharded training steps, checkpoint round trips, resume, and the trained-run fixtures."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import dit as dit_configs
from sora_jax.models.dit import DiT, dit_config
from sora_jax.parallel.mesh import batch_sharding, global_batch, make_mesh
from sora_jax.parallel.rules import get_rules
from sora_jax.train import checkpoint
from sora_jax.diffusion import flow
from sora_jax.train.dit_trainer import make_dit_step, objective_from, token_mask
from sora_jax.train.state import TrainState, create_sharded_state, make_optimizer

GRID, TEXT_LEN, TEXT_DIM, CH = (2, 4, 4), 6, 32, 4


def _dit_setup(mesh_shape, preset="fsdp", seed=0):
    mesh = make_mesh(mesh_shape)
    rules = get_rules(preset)
    cfg = dit_config("tiny", in_channels=CH, out_channels=CH, text_dim=TEXT_DIM)
    model = DiT(cfg)
    dummy = (jnp.zeros((8, *GRID, CH)), jnp.zeros((8,)), jnp.zeros((8, TEXT_LEN, TEXT_DIM)),
             jnp.ones((8, TEXT_LEN), bool))
    config = dit_configs.get_config("variant=tiny,runlocal=True")
    tx = make_optimizer(config.optim, 10)
    state, shardings = create_sharded_state(
        lambda k: model.init({"params": k}, *dummy), tx, 0.99, mesh, rules, jax.random.key(seed)
    )
    return mesh, rules, model, config, state, shardings


def _batch(mesh, seed=0):
    r = np.random.default_rng(seed)
    return global_batch(mesh, {
        "latents": r.standard_normal((8, *GRID, CH)).astype(np.float32),
        "text": r.standard_normal((8, TEXT_LEN, TEXT_DIM)).astype(np.float32),
        "text_mask": np.arange(TEXT_LEN)[None, :] < r.integers(1, TEXT_LEN + 1, (8, 1)),
    })


def _fsdp_sharded_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec))]


@pytest.fixture(scope="module")
def fsdp_dit():
    return _dit_setup({"data": 2, "fsdp": 4})


def test_train_step_keeps_params_and_optimizer_state_sharded(fsdp_dit):
    mesh, rules, model, config, state, shardings = fsdp_dit
    assert len(mesh.devices.flat) == 8
    sharded_params = _fsdp_sharded_leaves(state.params)
    assert sharded_params, "no parameter is sharded over fsdp"
    for x in sharded_params:  # really split: each device holds a quarter along one dim
        assert x.addressable_shards[0].data.size * 4 == x.size
    adam = state.opt_state[1][0]
    assert isinstance(adam, optax.ScaleByAdamState)
    assert len(_fsdp_sharded_leaves(adam.mu)) == len(sharded_params)
    assert len(_fsdp_sharded_leaves(adam.nu)) == len(sharded_params)
    assert len(_fsdp_sharded_leaves(state.ema_params)) == len(sharded_params)

    step = jax.jit(make_dit_step(model, config.diffusion),
                   in_shardings=(shardings, {k: batch_sharding(mesh, n) for k, n in
                                             (("latents", 5), ("text", 3), ("text_mask", 2))}, None),
                   out_shardings=(shardings, None), donate_argnums=0)
    before = jax.device_get(state.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        new_state, metrics = step(state, _batch(mesh), jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert int(new_state.step) == 1
    assert len(_fsdp_sharded_leaves(new_state.params)) == len(sharded_params)
    assert len(_fsdp_sharded_leaves(new_state.opt_state[1][0].mu)) == len(sharded_params)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.device_get(new_state.params))
    assert any(jax.tree.leaves(changed)), "the step did not update any parameter"


def test_padded_video_cells_reach_neither_loss_nor_gradients():
    """A batch of clips padded to one latent grid (video_mask) trains as if the padding were absent."""
    mesh, rules, model, config, state, _ = _dit_setup({"data": 2, "fsdp": 4}, seed=1)
    step = jax.jit(make_dit_step(model, config.diffusion))
    r = np.random.default_rng(3)
    real = np.ones((8, *GRID), bool)
    real[1::2, -1] = False  # odd examples are one latent frame shorter
    real[2, :, :, 2:] = False  # example 2 is narrower (one token column)
    latents = r.standard_normal((8, *GRID, CH)).astype(np.float32)
    zeros = np.where(real[..., None], latents, 0.0).astype(np.float32)
    junk = np.where(real[..., None], latents, 50.0 * r.standard_normal(latents.shape)).astype(np.float32)
    text = {"text": r.standard_normal((8, TEXT_LEN, TEXT_DIM)).astype(np.float32),
            "text_mask": np.ones((8, TEXT_LEN), bool)}

    def run(x, mask):
        batch = dict(text, latents=x) | ({} if mask is None else {"video_mask": mask})
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            new, metrics = step(state, global_batch(mesh, batch), jax.random.key(1))
        return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(new.params)

    masked_zero, masked_junk = run(zeros, real), run(junk, real)
    np.testing.assert_allclose(masked_zero[:2], masked_junk[:2], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), masked_zero[2], masked_junk[2])
    # The same program does see a change in a real cell: the check can fail (and, with the key mask
    # removed from the step, it does: the padded junk then reaches real tokens through attention).
    moved = zeros.copy()
    moved[2, 0, 0, 0] += 5.0
    assert abs(run(moved, real)[0] - masked_zero[0]) > 1e-4


def test_token_mask_keeps_tokens_with_any_real_cell_and_rejects_a_grid_the_patch_does_not_divide():
    real = np.zeros((1, 2, 4, 4), bool)
    real[0, 0, :3, :1] = True  # rows 0-2 of column 0 in latent frame 0
    np.testing.assert_array_equal(np.asarray(token_mask(real, (1, 2, 2)))[0, 0], [[True, False], [True, False]])
    assert not np.asarray(token_mask(real, (1, 2, 2)))[0, 1].any()
    with pytest.raises(ValueError, match=r"video_mask grid \(2, 4, 5\) is not divisible by the DiT patch"):
        token_mask(np.ones((1, 2, 4, 5), bool), (1, 2, 2))


def test_checkpoint_round_trip_onto_another_mesh(tmp_path, fsdp_dit):
    mesh, rules, model, config, _, _ = fsdp_dit
    _, _, _, _, state, _ = _dit_setup({"data": 2, "fsdp": 4}, seed=3)
    manager = checkpoint.make_manager(tmp_path / "ckpt")
    state = state.replace(step=jnp.asarray(7, jnp.int32))
    checkpoint.save(manager, state, force=True)
    manager.wait_until_finished()
    expected = jax.device_get(state)

    # Restore onto a different layout (pure data parallel, 8-way) from a differently seeded init.
    _, _, _, _, target, _ = _dit_setup({"data": 8, "fsdp": 1}, preset="data", seed=4)
    restored = checkpoint.restore(checkpoint.make_manager(tmp_path / "ckpt"), target)
    assert int(restored.step) == 7
    for a, b in zip(jax.tree.leaves(expected.params), jax.tree.leaves(jax.device_get(restored.params))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(expected.opt_state), jax.tree.leaves(jax.device_get(restored.opt_state))):
        np.testing.assert_array_equal(a, b)
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.spec == P() or "fsdp" not in str(leaf.sharding.spec)


def test_restore_params_missing_directory_is_clear(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.restore_params(tmp_path / "nope", {})


def test_tiny_runs_trained_and_resume(tiny_runs, tmp_path):
    import shutil

    from sora_jax.config_overrides import apply_overrides
    from sora_jax.train.vae_trainer import train_vae

    vae, dit = tiny_runs["vae"], tiny_runs["dit"]
    assert vae["step"] == 2 and dit["step"] == 2
    assert np.isfinite(vae["final"]["loss"]) and np.isfinite(dit["final"]["loss"])
    assert np.isfinite(vae["psnr"])
    # 5 frames = latent frames {0} and {1..4}: their MSEs, weighted by frame count, give the clip's.
    mse = [4 * 10 ** (-p / 10) for p in vae["psnr_by_latent_frame"]]
    assert len(mse) == 2 and (mse[0] + 4 * mse[1]) / 5 == pytest.approx(4 * 10 ** (-vae["psnr"] / 10), rel=1e-4)
    # The VAE's periodic hooks ran at step 2: held-out losses, and originals over reconstructions.
    assert [r["step"] for r in vae["eval_history"]] == [2]
    assert np.isfinite(vae["eval_history"][0]["eval/loss"]) and vae["eval_history"][0]["eval/mse"] > 0
    # The tiny source stores the simulator state, so the reconstructions were parsed too: at step 2
    # the same weights and (its 4 held-out clips, each twice) the same clips as the final evaluation,
    # so the same numbers; a parse of the originals instead would give a finite error (< 0.5 px).
    row = vae["eval_history"][0]
    for key in ("parse_error_px", "parse_colour_err", "parse_spurious_per_frame"):
        got, want = row[f"eval/{key}"], vae[key]
        assert np.isnan(got) == np.isnan(want) and (np.isnan(want) or got == pytest.approx(want, rel=1e-3)), key
    assert row["eval/parse_spurious_per_frame"] >= 0
    _assert_gif(tiny_runs["vae_cfg"].workdir, "samples/reconstruction", step=2,
                size=(4 * tiny_runs["vae_cfg"].data.size, 2 * tiny_runs["vae_cfg"].data.size))
    # Resume: asking for 3 steps continues from the saved step 2 and runs exactly one more. The
    # loss may change on resume (nothing of it is in the checkpoint): here foreground weighting.
    shutil.copytree(tiny_runs["vae_cfg"].workdir, tmp_path / "vae")
    cfg = apply_overrides(tiny_runs["vae_cfg"].copy_and_resolve_references(),
                          ["--config.train.steps=3", f"--config.workdir={tmp_path}/vae", "--config.loss.fg_weight=4"])
    out = train_vae(cfg)
    assert out["step"] == 3
    assert [row["step"] for row in out["history"]] == [3]
    row = out["history"][0]
    assert 0.0 < row["fg_fraction"] < 1.0 and np.isfinite(row["fg_l1"]) and row["fg_l1"] > 0


def test_restore_params_prefers_ema(tmp_path):
    """Inference loads the EMA weights when the checkpoint has them (a fresh manager, as at load time)."""
    import orbax.checkpoint as ocp

    from sora_jax.train import checkpoint

    params = {"w": np.arange(4, dtype=np.float32)}
    ema = {"w": np.full(4, 7.0, np.float32)}
    manager = checkpoint.make_manager(tmp_path / "ckpt", async_save=False)
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": 3, "params": params, "ema_params": ema})))
    manager.close()
    abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    np.testing.assert_array_equal(checkpoint.restore_params(tmp_path / "ckpt", abstract)["w"], ema["w"])
    raw = checkpoint.restore_params(tmp_path / "ckpt", abstract, use_ema=False)
    np.testing.assert_array_equal(raw["w"], params["w"])


def test_unknown_objective_is_refused():
    """An objective name the trainer does not know is one clear error, not a silent flow run."""
    cfg = dit_configs.get_config("variant=tiny,runlocal=True")
    cfg.diffusion.objective = "edm"
    with pytest.raises(ValueError, match="unknown config.diffusion.objective 'edm'; use one of"):
        make_dit_step(DiT(dit_config("tiny")), cfg.diffusion)


class _Oracle(nn.Module):
    """Predicts the exact target from x_t and the timestep it is given, knowing the clean latents.

    A trainer whose noising, model timestep and loss target agree gives it zero loss on every
    generated cell; any mismatch (time scale, schedule, target, masked cells scored) does not.
    """

    x0: np.ndarray
    objective: object

    @nn.compact
    def __call__(self, x_t, t, text, text_mask):
        self.param("unused", nn.initializers.zeros, ())
        x0 = jnp.asarray(self.x0)
        obj = self.objective
        if isinstance(obj, flow.FlowObjective):
            sigma = (t / flow.TIME_SCALE)[:, None, None, None, None]
            return (x_t - x0) / sigma  # eps - x0 with eps = (x_t - (1 - sigma) x0) / sigma
        abar = jnp.asarray(obj.alphas_cumprod())[t.astype(jnp.int32)][:, None, None, None, None]
        eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
        return eps if obj.prediction == "epsilon" else jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0


@pytest.mark.parametrize("objective,prediction,weighting", [
    ("flow", None, "min_snr"), ("ddpm", "epsilon", "none"), ("ddpm", "v_prediction", "min_snr"),
])
def test_objective_wiring_gives_an_exact_predictor_zero_loss(objective, prediction, weighting):
    """Noise, model time and target of the DiT step agree for flow and DDPM (eps, v), masks included."""
    cfg = dit_configs.get_config("variant=tiny,runlocal=True").diffusion
    cfg.objective, cfg.weighting = objective, weighting
    cfg.ddpm.beta_schedule = "cosine"
    if prediction:
        cfg.ddpm.prediction = prediction
    # Conditioning masks on: given cells are fed clean, where the oracle's implied target is wrong,
    # so a zero loss also shows they are left out of it.
    cfg.mask_rates.first_k = cfg.mask_rates.random_box = 0.5
    x0 = np.random.default_rng(0).standard_normal((4, 3, 4, 4, 2)).astype(np.float32)
    oracle = _Oracle(x0, objective_from(cfg))
    batch = {"latents": jnp.asarray(x0), "text": jnp.zeros((4, 3, 8)), "text_mask": jnp.ones((4, 3), bool)}
    params = oracle.init(jax.random.key(0), batch["latents"], jnp.ones((4,)), batch["text"], batch["text_mask"])
    tx = optax.sgd(0.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None, tx=tx)
    _, metrics = jax.jit(make_dit_step(oracle, cfg))(state, batch, jax.random.key(1))
    assert float(metrics["loss"]) < 1e-6
    # The same oracle told the wrong clean latents is far from zero: the check can fail.
    wrong = _Oracle(x0 + 1.0, objective_from(cfg))
    _, metrics = jax.jit(make_dit_step(wrong, cfg))(state, batch, jax.random.key(1))
    assert float(metrics["loss"]) > 1e-2


def test_a_finished_vae_run_is_reused_with_other_training_data(tiny_runs, tmp_path):
    """A finished run reads no more data, so its data position is not restored: a reference run can
    keep its VAE and train the DiT on more clips. Unfinished, the other sampler is refused in one line."""
    import shutil

    from sora_jax.config_overrides import apply_overrides
    from sora_jax.train.vae_trainer import train_vae

    shutil.copytree(tiny_runs["vae_cfg"].workdir, tmp_path / "vae")
    more = [f"--config.workdir={tmp_path}/vae", "--config.data.num_train=24", "--config.train.eval_every=0",
            "--config.train.sample_every=0"]
    out = train_vae(apply_overrides(tiny_runs["vae_cfg"].copy_and_resolve_references(), more))
    assert out["step"] == 2 and out["psnr"] == pytest.approx(tiny_runs["vae"]["psnr"], rel=1e-5)
    with pytest.raises(checkpoint.DataMismatchError, match=r"sampler differs \(num_records \d+ there, 24 now"):
        train_vae(apply_overrides(tiny_runs["vae_cfg"].copy_and_resolve_references(), more + ["--config.train.steps=3"]))


def test_ddpm_run_trains_and_samples_with_ddim(tiny_runs, tmp_path):
    """A DDPM (v-prediction) run trains through `train_dit`, records its objective, and samples with DDIM."""
    from sora_jax.config_overrides import apply_overrides
    from sora_jax.diffusion.ddim import DDIMSampler
    from sora_jax.pipeline import TextToVideo
    from sora_jax.train.dit_trainer import train_dit

    cfg = apply_overrides(tiny_runs["dit_cfg"].copy_and_resolve_references(), [
        f"--config.workdir={tmp_path}/dit", "--config.diffusion.objective=ddpm",
        # The flow run's latent cache: same data, VAE and text encoder (and no second encode here).
        f"--config.data.latents={checkpoint.read_json(tiny_runs['dit_cfg'].workdir + '/run.json')['latent_cache']}",
        "--config.diffusion.ddpm.prediction=v_prediction", "--config.diffusion.weighting=min_snr"])
    out = train_dit(cfg)
    assert out["step"] == 2 and np.isfinite(out["final"]["loss"])
    t2v = TextToVideo.load(tmp_path / "dit")
    sampler = t2v.make_sampler()  # config solver "auto" -> DDIM with the run's own schedule
    assert isinstance(sampler, DDIMSampler)
    assert sampler.objective == objective_from(cfg.diffusion) and sampler.num_steps == 2
    video = t2v.generate(["a red ball"], seed=0)
    assert video.shape == (1, cfg.data.frames, cfg.data.size, cfg.data.size, 3) and np.isfinite(video).all()
    with pytest.raises(ValueError, match="does not fit a model trained with the ddpm objective; use --sampler ddim"):
        t2v.make_sampler("euler")
    flow_run = TextToVideo.load(tiny_runs["dit_cfg"].workdir)
    with pytest.raises(ValueError, match="does not fit a model trained with the flow objective"):
        flow_run.make_sampler("ddim")


def test_budget_clock_run_counts_its_seconds_into_the_checkpoint_and_resumes_from_them(tiny_runs, tmp_path):
    """optim.schedule_clock=budget through `train_dit` on the 8-device mesh: the seconds spent are
    saved with each step and a resume continues from them, as the learning rate's clock."""
    import orbax.checkpoint as ocp

    from sora_jax.config_overrides import apply_overrides
    from sora_jax.train.dit_trainer import train_dit

    def seconds(step: int) -> float:
        saved = ocp.StandardCheckpointer().restore(tmp_path / "dit" / "ckpt" / str(step) / "state")
        return float(np.asarray(saved["budget_seconds"]))

    base = [f"--config.workdir={tmp_path}/dit", "--config.optim.schedule_clock=budget", "--config.train.max_minutes=30",
            f"--config.data.latents={checkpoint.read_json(tiny_runs['dit_cfg'].workdir + '/run.json')['latent_cache']}",
            "--config.train.eval_every=0", "--config.train.sample_every=0", "--config.train.ckpt_every=1"]
    out = train_dit(apply_overrides(tiny_runs["dit_cfg"].copy_and_resolve_references(), base))
    assert out["step"] == 2 and np.isfinite(out["final"]["loss"])
    first = seconds(2)
    assert 0 < first < 30 * 60 and seconds(1) < first
    out = train_dit(apply_overrides(tiny_runs["dit_cfg"].copy_and_resolve_references(), base + ["--config.train.steps=3"]))
    assert out["step"] == 3 and seconds(3) > first
    steps_cfg = apply_overrides(tiny_runs["dit_cfg"].copy_and_resolve_references(),
                                [*base[:1], *base[3:], "--config.train.steps=4"])
    with pytest.raises(checkpoint.CheckpointError, match="resume it with --config.optim.schedule_clock=budget"):
        train_dit(steps_cfg)


def test_flow_shift_follows_resolution_and_duration():
    """With shift_by_resolution, 4x the tokens doubles the flow shift, in training and in the run's sampler."""
    from sora_jax.train.dit_trainer import objective_for_grid

    cfg = dit_configs.get_config("variant=tiny").diffusion
    cfg.shift = 3.0
    base = objective_for_grid(cfg, (21, 60, 104), (1, 2, 2))
    assert base.shift == 3.0  # off by default: the configured shift whatever the grid
    cfg.shift_by_resolution = True
    assert objective_for_grid(cfg, (21, 60, 104), (1, 2, 2)).shift == pytest.approx(3.0)  # the 32,760-token base
    assert objective_for_grid(cfg, (21, 120, 208), (1, 2, 2)).shift == pytest.approx(6.0)  # 4x tokens
    assert objective_for_grid(cfg, (84, 60, 104), (1, 2, 2)).shift == pytest.approx(6.0)  # 4x frames
    cfg.objective = "ddpm"  # no shift in DDPM
    assert objective_for_grid(cfg, (84, 60, 104), (1, 2, 2)) == objective_from(cfg)

    from sora_jax.pipeline import TextToVideo

    sample = dict(dit_configs.get_config("variant=tiny").sample, shift_by_resolution=True, shift=2.0,
                  shift_base_tokens=100)
    t2v = TextToVideo(None, None, None, None, None, {"sample": sample})
    assert t2v.make_sampler(num_tokens=400).shift == pytest.approx(4.0)
    assert t2v.make_sampler().shift == pytest.approx(2.0)


def test_dit_run_writes_heldout_eval_and_sample_videos(tiny_runs):
    """train.eval_every / sample_every in the fixture's DiT run: held-out losses of the EMA weights on the
    physics test split (not the training clips), equal to recomputing them from the checkpoint, and a
    video grid of reconstructions over samples in TensorBoard."""
    from pathlib import Path

    from sora_jax.train.dit_trainer import objective_for_grid
    from sora_jax.train.evaluation import heldout_rows, make_dit_eval
    from sora_jax.train.latent_records import read_records

    cfg = tiny_runs["dit_run_cfg"]
    rows = tiny_runs["dit"]["eval_history"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r[f"eval/loss_t{t}"]) for r in rows for t in (0.1, 0.3, 0.5, 0.7, 0.9))
    assert rows[0]["eval/loss"] != rows[1]["eval/loss"]  # the weights moved; data and noise did not

    # The held-out clips are the test split's own cache, none of them a training clip.
    train_cache = Path(checkpoint.read_json(f"{cfg.workdir}/run.json")["latent_cache"])
    caches = sorted(Path(cfg.workdir).glob("latents-*"))
    assert len(caches) == 2 and train_cache in caches
    held = read_records(next(c for c in caches if c != train_cache), 8)
    train = read_records(train_cache, 64)
    assert not any(np.allclose(h, t) for h in held["latents"] for t in train["latents"])

    # Recomputed outside the trainer from the saved EMA weights: the step-2 row.
    mesh = make_mesh({"data": 2, "fsdp": 4})
    model = DiT(dataclass_from_run(cfg.workdir))
    params = checkpoint.restore_params(Path(cfg.workdir) / "ckpt", _abstract_params(model, held))
    params = jax.device_put(params, NamedSharding(mesh, P()))  # replicated: another layout than training's
    batch = global_batch(mesh, heldout_rows(held, 8, 8))
    grid = held["latents"].shape[1:4]
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules("fsdp")):
        again = make_dit_eval(model, objective_for_grid(cfg.diffusion, grid, model.cfg.patch_size))(params, batch)
    # Float32 sums in another order (replicated vs fsdp weights): agreement to 1e-4 relative.
    np.testing.assert_allclose(float(again["eval/loss"]), rows[1]["eval/loss"], rtol=1e-4)
    # eval.train_clips: the same losses on the first training clips, with the same fixed noise.
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules("fsdp")):
        seen = make_dit_eval(model, objective_for_grid(cfg.diffusion, grid, model.cfg.patch_size))(
            params, global_batch(mesh, heldout_rows(train, 8, 8)))
    for t in ("", "_t0.1", "_t0.9"):
        np.testing.assert_allclose(float(seen[f"eval/loss{t}"]), rows[1][f"eval_train/loss{t}"], rtol=1e-4)
    assert rows[1]["eval_train/loss"] != rows[1]["eval/loss"]
    # 2 columns (eval.videos): VAE reconstructions of the held-out latents over the samples.
    _assert_gif(cfg.workdir, "samples/heldout", step=2, size=(2 * cfg.data.size, 2 * cfg.data.size))


def test_heldout_cache_from_another_text_encoder_is_refused(tiny_runs, tmp_path):
    """--config.eval.latents must be encoded like the run's own latents; a mismatch is one clear error."""
    import json
    import shutil
    from pathlib import Path

    from sora_jax.config_overrides import apply_overrides
    from sora_jax.train.dit_data import heldout_cache_dir
    from sora_jax.train.latent_records import CacheError

    cfg = tiny_runs["dit_run_cfg"]
    train_cache = Path(checkpoint.read_json(f"{cfg.workdir}/run.json")["latent_cache"])
    held = next(c for c in Path(cfg.workdir).glob("latents-*") if c != train_cache)
    ok = apply_overrides(cfg.copy_and_resolve_references(), [f"--config.eval.latents={held}"])
    assert heldout_cache_dir(ok, tmp_path) == held
    other = tmp_path / "other"
    shutil.copytree(held, other)
    info = json.loads((other / "cache_info.json").read_text())
    info["source"]["text_max_length"] += 1
    (other / "cache_info.json").write_text(json.dumps(info))
    bad = apply_overrides(cfg.copy_and_resolve_references(), [f"--config.eval.latents={other}"])
    with pytest.raises(CacheError, match="another VAE or text encoder"):
        heldout_cache_dir(bad, tmp_path)


def dataclass_from_run(workdir):
    """The DiT config a run saved."""
    from sora_jax.models.dit import DiTConfig
    from sora_jax.train.dit_trainer import DIT_CONFIG_FILE
    from sora_jax.train.setup import dataclass_from_json

    return dataclass_from_json(DiTConfig, checkpoint.read_json(f"{workdir}/{DIT_CONFIG_FILE}"))


def _abstract_params(model, held):
    from sora_jax.train.setup import on_one_device

    dummy = (jnp.zeros((1, *held["latents"].shape[1:])), jnp.zeros((1,)), jnp.zeros((1, *held["text"].shape[1:])),
             jnp.ones((1, held["text"].shape[1]), bool))
    return on_one_device(jax.eval_shape(lambda: nn.meta.unbox(model.init({"params": jax.random.key(0)}, *dummy))))


def _assert_gif(workdir, tag: str, *, step: int, size: tuple[int, int]) -> None:
    """The run's TensorBoard events hold one GIF under `tag`, at `step`, of `size` (width, height)."""
    import io
    from pathlib import Path

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(workdir) / "tb"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images(tag)
    assert [e.step for e in images] == [step]
    gif = Image.open(io.BytesIO(images[0].encoded_image_string))
    assert gif.format == "GIF" and gif.size == size


def test_resuming_a_dit_on_another_vaes_latents_is_flagged(tiny_runs, tmp_path):
    """The trained tiny DiT's own run.json: its VAE's weights pass; other weights give one warning line."""
    from sora_jax.train.dit_trainer import RUN_FILE, resumed_on_other_vae

    workdir = tiny_runs["dit_cfg"].workdir
    run = checkpoint.read_json(f"{workdir}/{RUN_FILE}")
    own = {"vae_step": run["vae_step"], "vae_params": run["vae_params"]}
    assert resumed_on_other_vae(workdir, own) is None
    other = {"vae_step": run["vae_step"] + 1, "vae_params": "f" * len(run["vae_params"])}
    msg = resumed_on_other_vae(workdir, other)
    assert msg is not None and "\n" not in msg
    assert run["vae_params"] in msg and other["vae_params"] in msg and "new --config.workdir" in msg and "new --outdir" in msg
    assert resumed_on_other_vae(tmp_path, other) is None  # no run record yet: a fresh run
