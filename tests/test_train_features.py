"""Training features of issue 6: mesh/layout config and validation, cluster flags, gradient accumulation,
clipping, warmup-cosine, EMA, bf16 compute with fp32 params, periodic evaluation and TensorBoard videos."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from sora_jax.diffusion import ddpm, flow
from sora_jax.models.dit import DiT, dit_config
from sora_jax.parallel.distributed import cluster_spec
from sora_jax.parallel.mesh import MeshError, batch_sharding, global_batch, make_mesh, resolve_hybrid_shape, resolve_mesh_shape
from sora_jax.parallel.rules import ALIASES, PRESETS, get_rules
from sora_jax.train.accumulate import accumulate_gradients
from sora_jax.train.evaluation import denoising_loss, fixed_times, make_dit_eval, video_grid
from sora_jax.train.setup import compute_dtype, per_process_batch, validate_layout
from sora_jax.train.state import TrainState, budget_cosine, create_sharded_state, lr_schedule, make_optimizer

TEXT_LEN, TEXT_DIM = 4, 8


# --- mesh and layouts ---------------------------------------------------------------------------

def test_rule_presets_have_the_issue_names_and_keep_the_old_ones():
    assert set(PRESETS) == {"dp", "fsdp", "fsdp_tp", "fsdp_sp"}
    for old, new in ALIASES.items():
        assert get_rules(old) == get_rules(new)
    assert ("heads", "tensor") in get_rules("fsdp_tp") and ("length", "sequence") in get_rules("fsdp_sp")
    with pytest.raises(ValueError, match=r"unknown sharding preset 'tp'.*\['dp', 'fsdp', 'fsdp_tp', 'fsdp_sp'\]"):
        get_rules("tp")


def test_mesh_sizes_ici_and_dcn():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1, 1)
    with pytest.raises(MeshError, match=r"mesh 2x4x1x1 \(data=2, fsdp=4, tensor=1, sequence=1\) needs 8 devices but 4"):
        resolve_mesh_shape({"data": 2, "fsdp": 4}, 4)
    # Two slices of 8: -1 on DCN takes the slices, -1 on ICI the devices of one slice.
    assert resolve_hybrid_shape({"fsdp": -1, "tensor": 2}, {"data": -1}, 16, slices=2) == ((1, 4, 2, 1), (2, 1, 1, 1))
    with pytest.raises(MeshError, match="needs 2 slices but 1 are available"):
        resolve_hybrid_shape({"fsdp": -1}, {"data": 2}, 8, slices=1)
    # The default config (dcn data=-1) on this one-slice host is a plain mesh over all devices.
    cfg = common.mesh_config()
    mesh = make_mesh(dict(cfg.shape), dcn=dict(cfg.dcn))
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1, "sequence": 1}


def test_layout_validation_names_the_problem():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4, "sequence": 1})
    rules = get_rules("fsdp_tp")
    with pytest.raises(ValueError, match="14 heads do not divide over tensor=4"):
        validate_layout(mesh, rules, rules_name="fsdp_tp", heads=14, ffn=256)
    with pytest.raises(ValueError, match="FFN width 102 does not divide over tensor=4"):
        validate_layout(mesh, rules, rules_name="fsdp_tp", heads=8, ffn=102)
    validate_layout(mesh, rules, rules_name="fsdp_tp", heads=8, ffn=256)
    with pytest.raises(ValueError, match="mesh axis tensor=4 is not used by the sharding rules 'fsdp'"):
        validate_layout(mesh, get_rules("fsdp"), rules_name="fsdp", heads=8)
    seq = make_mesh({"data": 1, "fsdp": 2, "tensor": 1, "sequence": 4})
    with pytest.raises(ValueError, match="30 video tokens do not divide over sequence=4"):
        validate_layout(seq, get_rules("fsdp_sp"), rules_name="fsdp_sp", tokens=30)
    dp = make_mesh({"data": 2, "fsdp": 4})
    assert per_process_batch(16, dp, grad_accum=2) == 16
    with pytest.raises(ValueError, match="does not split into 2 microbatch.*multiple of 16"):
        per_process_batch(8, dp, grad_accum=2)


def test_cluster_spec_from_flags_and_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert cluster_spec(env=env) == cluster_spec("10.0.0.2:1234", 4, 3, env={})
    assert cluster_spec(process_id=1, env=env).process_id == 1  # a flag wins over the environment
    assert not cluster_spec(env={}).explicit and cluster_spec("auto", env={}).coordinator == "auto"
    with pytest.raises(ValueError, match="needs all of --coordinator, --num-processes and --process-id"):
        cluster_spec("host:1", 2, env={})
    with pytest.raises(ValueError, match="needs a port"):
        cluster_spec("host", 2, 0, env={})
    with pytest.raises(ValueError, match=r"process_id 2 is outside 0..1"):
        cluster_spec("host:1", 2, 2, env={})


# --- optimiser -----------------------------------------------------------------------------------

def _optim(**kw) -> ml_collections.ConfigDict:
    cfg = common.optim_config(lr=1e-3, warmup=10)
    cfg.update(kw)
    return cfg


def test_warmup_cosine_schedule():
    cfg = _optim(min_lr_ratio=0.1)
    sched = lr_schedule(cfg, 110)
    np.testing.assert_allclose(float(sched(0)), 1e-4, rtol=1e-6)  # lr / warmup: the first update moves
    np.testing.assert_allclose(float(sched(5)), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    for step in (35, 60, 85, 110):  # cosine from peak to lr * min_lr_ratio over the remaining 100 steps
        frac = (step - 10) / 100
        want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5)
    # decay_steps pins the schedule whatever train.steps says.
    assert float(lr_schedule(_optim(decay_steps=110), 5000)(60)) == float(sched(60))


def test_budget_clock_follows_the_steps_schedule_until_the_time_budget_runs_out_first():
    """schedule_clock=budget: the same updates as the steps schedule while time is not binding; past it,
    the decay follows seconds spent / budget; with a spent budget every update is at min_lr_ratio."""
    steps_tx = make_optimizer(_optim(min_lr_ratio=0.1), 110)
    clock_tx = make_optimizer(_optim(min_lr_ratio=0.1, schedule_clock="budget"), 110, budget_minutes=2.0)
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    a, b = steps_tx.init(params), clock_tx.init(params)
    for i in range(60):
        grads = {"w": jnp.cos(params["w"] * (i + 1))}
        ua, a = steps_tx.update(grads, a, params)
        ub, b = clock_tx.update(grads, b, params, budget_seconds=jnp.float32(0.0))
        np.testing.assert_allclose(ub["w"], ua["w"], rtol=2e-5, atol=1e-12)
    grads = {"w": jnp.ones(5)}
    base, _ = clock_tx.update(grads, b, params, budget_seconds=jnp.float32(0.0))  # steps: (60 - 10) / 100 done
    for seconds, progress in ((30.0, 0.25), (90.0, 0.75), (120.0, 1.0), (500.0, 1.0)):  # of 120 s
        got, _ = clock_tx.update(grads, b, params, budget_seconds=jnp.float32(seconds))
        want = float(budget_cosine(max(progress, 0.5), 0.1)) / float(budget_cosine(0.5, 0.1))
        np.testing.assert_allclose(got["w"], base["w"] * want, rtol=2e-5)
    np.testing.assert_allclose(float(budget_cosine(1.0, 0.1)), 0.1)
    # No time budget (train.max_minutes 0, e.g. a notebook's smoke run of the demo configs): the steps schedule.
    no_budget = make_optimizer(_optim(min_lr_ratio=0.1, schedule_clock="budget"), 110)
    assert jax.tree.structure(no_budget.init(params)) == jax.tree.structure(steps_tx.init(params))
    np.testing.assert_allclose(no_budget.update(grads, a, params)[0]["w"], steps_tx.update(grads, a, params)[0]["w"])
    with pytest.raises(ValueError, match="schedule_clock must be one of"):
        make_optimizer(_optim(schedule_clock="wall"), 110, budget_minutes=1.0)


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_global_norm_clipping_bounds_what_adam_sees(scale):
    grads = {"a": jnp.full((3,), scale), "b": jnp.full((4,), -scale)}
    norm = scale * math.sqrt(7)
    cfg = _optim(grad_clip=1.0, b1=0.9)
    tx = make_optimizer(cfg, 100)
    _, opt_state = tx.update(grads, tx.init(grads), grads)
    mu = opt_state[1][0].mu  # chain(clip, adamw): adam's first moment = (1 - b1) * clipped grads
    got = float(optax.tree.norm(mu)) / (1 - cfg.b1)
    np.testing.assert_allclose(got, min(norm, 1.0), rtol=1e-5)


def test_ema_follows_the_configured_decay():
    params = {"w": jnp.arange(4.0)}
    tx = make_optimizer(_optim(), 10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       ema_params={"w": jnp.full((4,), 5.0)}, tx=tx, ema_decay=0.9)
    new = state.apply_gradients({"w": jnp.ones(4)})
    assert not np.allclose(new.params["w"], params["w"])
    np.testing.assert_allclose(new.ema_params["w"], 0.9 * 5.0 + 0.1 * np.asarray(new.params["w"]), rtol=1e-6)
    assert new.eval_params is new.ema_params


# --- DiT: gradient accumulation, bf16, evaluation -----------------------------------------------

@pytest.fixture(scope="module")
def dit():
    """A one-block DiT sharded over data=2 x fsdp=4, its state, and a batch with fixed times and noise."""
    mesh = make_mesh({"data": 2, "fsdp": 4})
    rules = get_rules("fsdp")
    model = DiT(dit_config("tiny", num_layers=1, ffn_dim=64, in_channels=4, out_channels=4, text_dim=TEXT_DIM))
    rng = np.random.default_rng(0)
    b = 16
    host = {
        "latents": rng.standard_normal((b, 1, 4, 4, 4)).astype(np.float32),
        "text": rng.standard_normal((b, TEXT_LEN, TEXT_DIM)).astype(np.float32),
        "text_mask": np.ones((b, TEXT_LEN), bool),
        "time": rng.uniform(0.05, 0.95, b).astype(np.float32),
        "noise": rng.standard_normal((b, 1, 4, 4, 4)).astype(np.float32),
    }
    dummy = tuple(jnp.asarray(host[k][:8]) for k in ("latents", "time", "text", "text_mask"))
    tx = make_optimizer(_optim(), 10)
    state, shardings = create_sharded_state(lambda k: model.init({"params": k}, *dummy), tx, 0.99, mesh, rules,
                                            jax.random.key(0))
    return {"mesh": mesh, "rules": rules, "model": model, "state": state, "shardings": shardings,
            "batch": global_batch(mesh, host), "host": host}


def test_grad_accumulation_equals_the_big_batch_update(dit):
    """Two microbatches of 8 give the update of one batch of 16 (same examples, times and noise)."""
    import flax.linen as nn

    model, objective = dit["model"], flow.FlowObjective()

    def grad_fn(params, batch, rng):
        loss_fn = lambda p: denoising_loss(model, objective, p, batch, batch["time"], batch["noise"])  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return grads, {"loss": loss}

    @jax.jit
    def updates(state, batch):
        out = []
        for k in (1, 2):
            grads, metrics = accumulate_gradients(grad_fn, state.params, batch, jax.random.key(0), k)
            out.append((state.apply_gradients(grads).params, metrics["loss"], grads))
        return out

    with jax.set_mesh(dit["mesh"]), nn.logical_axis_rules(dit["rules"]):
        (p1, l1, g1), *accumulated = updates(dit["state"], dit["batch"])
    p0 = jax.tree.leaves(dit["state"].params)
    for p_k, l_k, g_k in accumulated:
        np.testing.assert_allclose(float(l_k), float(l1), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
        # The optimiser updates (params after - before) agree too; they are lr-sized, so compare them, not params.
        for a, b, p in zip(jax.tree.leaves(p_k), jax.tree.leaves(p1), p0):
            np.testing.assert_allclose(np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p), rtol=1e-3, atol=1e-9)
    assert max(float(jnp.max(jnp.abs(a - p))) for a, p in zip(jax.tree.leaves(p1), p0)) > 0


def test_bf16_compute_keeps_fp32_params_through_an_accumulated_trainer_step(dit):
    """train.dtype=bfloat16: the DiT computes in bf16; params, moments and EMA stay float32 after a step."""
    import flax.linen as nn

    from configs.dit import get_config
    from sora_jax.train.dit_trainer import dit_config_from, make_dit_step

    config = get_config("variant=tiny")
    assert compute_dtype("auto") == jnp.float32  # this CPU backend; TPU/GPU get bfloat16
    config.train.dtype = "bfloat16"
    config.model.update(num_layers=1, ffn_dim=64)
    cfg = dit_config_from(config, channels=4, text_dim=TEXT_DIM)
    assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
    model = DiT(cfg)
    host = dit["host"]
    # Shifted weights: the output projection starts at zero, which both dtypes would reproduce exactly.
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05, dit["state"].params)
    args = [jnp.asarray(host[k][:2]) for k in ("latents", "time", "text", "text_mask")]
    out, ref = model.apply(params, *args), dit["model"].apply(params, *args)
    # Same weights, bf16 arithmetic: close to the fp32 output, not equal to it.
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    assert 0 < err < 0.1 * float(jnp.max(jnp.abs(ref)))

    step = jax.jit(make_dit_step(model, config.diffusion, grad_accum=2))
    batch = {k: dit["batch"][k] for k in ("latents", "text", "text_mask")}
    with jax.set_mesh(dit["mesh"]), nn.logical_axis_rules(dit["rules"]):
        new, metrics = step(dit["state"], batch, jax.random.key(3))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    for tree in (new.params, new.opt_state, new.ema_params):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)


def test_eval_loss_at_fixed_times_is_deterministic(dit):
    model = dit["model"]
    batch = {k: dit["host"][k] for k in ("latents", "text", "text_mask")}
    evaluate = make_dit_eval(model, flow.FlowObjective(), times=(0.25, 0.75))
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05, dit["state"].params)  # output layer starts at 0
    first, again = evaluate(params, batch), evaluate(params, batch)
    assert set(first) == {"eval/loss_t0.25", "eval/loss_t0.75", "eval/loss"}
    assert all(float(first[k]) == float(again[k]) for k in first)  # same weights, same numbers
    moved = evaluate(jax.tree.map(lambda x: x * 1.01, params), batch)
    assert float(moved["eval/loss"]) != float(first["eval/loss"])
    assert float(first["eval/loss_t0.25"]) != float(first["eval/loss_t0.75"])
    # DDPM runs evaluate at integer steps across the schedule.
    obj = ddpm.DDPMObjective(num_train_timesteps=1000)
    assert fixed_times(obj, 0.5, 2).tolist() == [500, 500] and fixed_times(obj, 0.5, 2).dtype == jnp.int32
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        fixed_times(obj, 1.0, 2)


def test_periodic_eval_and_videos_reach_tensorboard(tmp_path):
    """run_loop runs Periodic work at its steps; scalars and GIF clips land in the TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sora_jax.data.pipeline import make_loader
    from sora_jax.train import checkpoint
    from sora_jax.train.loop import Periodic, run_loop
    from sora_jax.train.metrics import MetricLogger

    class Clips:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"video": np.full((3, 4, 4, 3), i * 20, np.uint8), "caption": str(i)}

    params = {"w": jnp.ones(3)}
    tx = make_optimizer(_optim(), 6)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None, tx=tx)
    step_fn = jax.jit(lambda s, b, r: (s.apply_gradients({"w": s.params["w"] * b["video"].mean()}),
                                       {"loss": jnp.sum(s.params["w"] ** 2)}))
    evals: list[int] = []

    def evaluate(s):
        evals.append(int(s.step))
        return {"eval/loss_t0.5": jnp.sum(s.params["w"])}

    def videos(s):
        return {"samples/grid": video_grid(np.linspace(-1, 1, 2 * 3 * 4 * 4 * 3).reshape(2, 3, 4, 4, 3))}

    logger = MetricLogger(tmp_path / "tb", 6, progress=False)
    manager = checkpoint.make_manager(tmp_path / "ckpt", keep=1)
    run_loop(state=state, step_fn=step_fn, data_iter=iter(make_loader(Clips(), batch_size=2, seed=0)),
             to_device=lambda b: {"video": jnp.asarray(b["video"])}, total_steps=6, manager=manager, logger=logger,
             rng=jax.random.key(0), log_every=3,
             periodic=(Periodic(2, evaluate), Periodic(3, videos, kind="videos")))
    logger.close()
    manager.close()
    assert evals == [2, 4, 6] and [r["step"] for r in logger.eval_history] == [2, 4, 6]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss_t0.5")] == [2, 4, 6]
    images = acc.Images("samples/grid")
    assert [e.step for e in images] == [3, 6]
    assert images[0].encoded_image_string[:4] == b"GIF8" and (images[0].width, images[0].height) == (8, 4)
