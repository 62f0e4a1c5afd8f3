"""The step loop shared by VAE and DiT training: steps, logging, checkpoints, time budget, SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sora_jax.train import checkpoint
from sora_jax.train.metrics import MetricLogger
from sora_jax.train.state import TrainState, budget_seconds_spent, with_budget_seconds

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The loss became NaN/Inf; nothing after the last good checkpoint was saved."""


class Preempted(SystemExit):
    """SIGTERM arrived: the checkpoint at the stopping step is written; exit status 0."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


@contextlib.contextmanager
def _sigterm_flag():
    """An Event set by SIGTERM while the loop runs (the previous handler is put back after)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_flags(sigterm: bool, over_budget: bool, step: int, every: int) -> tuple[bool, bool]:
    """Whether any process has seen SIGTERM, and whether any has spent its time budget; every process
    must take the same decision to stop or the collective save deadlocks.

    One process checks every step. Several exchange both flags in one all-gather, only every `every`
    steps (the log interval, where the loop waits for the device anyway): hosts are preempted, and
    read their clocks, at different moments, so a local decision alone would leave some hosts in the
    collective save while others run the next step, and an all-gather per step would stop the host
    from running ahead of the device.
    """
    if jax.process_count() == 1:
        return bool(sigterm), bool(over_budget)
    if step % every:
        return False, False
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.array([sigterm, over_budget], np.int32)))
    return bool(flags[..., 0].max()), bool(flags[..., 1].max())


def _agreed_seconds(elapsed: float, step: int, every: int) -> float | None:
    """The wall time every process feeds the budget clock: its own with one process; with several, the
    largest of theirs, exchanged at log steps only (None between them: keep the last agreed value), since
    the learning rate must be the same on every host.
    """
    if jax.process_count() == 1:
        return elapsed
    if step % every:
        return None
    from jax.experimental import multihost_utils

    return float(np.asarray(multihost_utils.process_allgather(np.array([elapsed], np.float64))).max())


# The first step whose loss was not finite (0: none yet), kept on device so checking it is free
# until it is read at a log or checkpoint boundary, where the loop syncs anyway.
_first_bad = jax.jit(lambda bad, loss, step: jnp.where((bad == 0) & ~jnp.all(jnp.isfinite(loss)), step, bad))


def _check_finite(bad: Any, manager: ocp.CheckpointManager) -> None:
    """Raise NonFiniteLossError if any loss so far was NaN/Inf."""
    if bad is None or int(bad) == 0:
        return
    manager.wait_until_finished()  # saves in flight are of earlier, finite steps: let them land
    manager.reload()
    good = manager.latest_step()
    where = f"last good checkpoint is step {good} in {manager.directory}" if good is not None else "no checkpoint was saved"
    raise NonFiniteLossError(
        f"non-finite loss at step {int(bad)}; {where}; lower optim.lr (or check the data) and resume"
    )


@dataclasses.dataclass(frozen=True)
class Periodic:
    """Work every `every` steps on the current state: eval scalars (kind "eval") or videos (kind "videos").

    `fn(state)` returns {tag: scalar} or {tag: uint8 [T, H, W, 3]}; every process calls it (it may run
    sharded computations), only process 0 writes what it returns.
    """

    every: int
    fn: Callable[[TrainState], dict]
    kind: str = "eval"

    def due(self, step: int) -> bool:
        """Whether to run after `step`."""
        return self.every > 0 and step % self.every == 0


def _run_periodic(periodic: tuple[Periodic, ...], state: TrainState, step: int, logger: MetricLogger) -> None:
    for p in periodic:
        if not p.due(step):
            continue
        out = p.fn(state)
        if p.kind == "videos":
            logger.log_videos(step, out)
        else:
            logger.log_eval(step, out)


def run_loop(
    *,
    state: TrainState,
    step_fn: Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]],
    data_iter: Iterator,
    to_device: Callable[[Any], Any],
    total_steps: int,
    manager: ocp.CheckpointManager,
    logger: MetricLogger,
    rng: jax.Array,
    log_every: int = 10,
    ckpt_every: int = 0,
    max_minutes: float = 0.0,
    periodic: tuple[Periodic, ...] = (),
) -> TrainState:
    """Run steps until total_steps (or the time budget, or SIGTERM), checkpointing along the way.

    `periodic` evaluations/sample writers run after the steps they are due at, before the next step.

    Raises Preempted (exit status 0) after saving on SIGTERM, NonFiniteLossError on a NaN/Inf loss.
    """
    step = int(state.step)
    # A resumed run keeps the noise stream it started with, whatever config.seed says now.
    rng = checkpoint.restore_rng(manager, step, rng) if step else rng
    saved_step = manager.latest_step()
    # Under optim.schedule_clock="budget" the budget is the run's, summed over resumes (the state
    # carries what earlier invocations spent); otherwise each invocation gets max_minutes afresh.
    spent = budget_seconds_spent(state)
    if spent is not None:
        if not max_minutes > 0:
            raise ValueError("optim.schedule_clock=budget needs train.max_minutes > 0 (the budget its learning "
                             "rate decays over); set it, or optim.schedule_clock=steps")
        if spent >= 60.0 * max_minutes:
            log.warning("time budget train.max_minutes=%g was already spent at step %d (optim.schedule_clock=budget, "
                        "learning rate decayed): nothing to train; raise train.max_minutes to go on", max_minutes, step)
            return state
    spent0 = spent or 0.0
    start = time.perf_counter()
    pending = None
    metrics = None
    bad = jnp.zeros((), jnp.int32)
    with _sigterm_flag() as sigterm:
        while step < total_steps:
            batch = to_device(next(data_iter))
            state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
            step += 1
            elapsed = time.perf_counter() - start
            # Stamped after the step, so the next step and any checkpoint saved now carry the time spent.
            if spent is not None and (now := _agreed_seconds(elapsed, step, log_every)) is not None:
                state = with_budget_seconds(state, spent0 + now)
            if "loss" in metrics:
                bad = _first_bad(bad, metrics["loss"], step)
            logger.advance()
            # Reading metrics of the previous logged step lets the device run ahead by one step.
            if pending is not None:
                _check_finite(pending[2], manager)
                logger.log(*pending[:2])
                pending = None
            if step % log_every == 0 or step == total_steps:
                pending = (step, metrics, bad)
            stop, out_of_time = _stop_flags(sigterm.is_set(),
                                            bool(max_minutes) and spent0 + elapsed > 60.0 * max_minutes,
                                            step, log_every)
            if stop:
                _check_finite(bad, manager)
                if pending is not None:
                    logger.log(*pending[:2])
                if saved_step != step:
                    checkpoint.save(manager, state, data_iter, rng=rng, force=True)
                manager.wait_until_finished()
                log.warning("SIGTERM: saved checkpoint step %d in %s; exiting", step, manager.directory)
                raise Preempted(step)
            if ckpt_every and step % ckpt_every == 0:
                _check_finite(bad, manager)  # never save a state that a NaN/Inf went into
                checkpoint.save(manager, state, data_iter, rng=rng)
                saved_step = step
            _run_periodic(periodic, state, step, logger)
            if out_of_time:
                if spent is not None:
                    log.info("time budget train.max_minutes=%g spent at step %d of at most %d; the learning rate "
                             "decayed over it (optim.schedule_clock=budget)", max_minutes, step, total_steps)
                elif step < total_steps:
                    # The loop does not see the schedule: optim.decay_steps may have sized it apart from train.steps.
                    log.warning("time budget train.max_minutes=%g spent at step %d of %d: a learning-rate schedule "
                                "sized for train.steps (optim.decay_steps unset) has not decayed; run again to resume",
                                max_minutes, step, total_steps)
                break
    _check_finite(bad, manager)
    if pending is not None:
        logger.log(*pending[:2])
    elif metrics is not None and (not logger.history or logger.history[-1]["step"] != step):
        logger.log(step, metrics)
    if saved_step != step:
        checkpoint.save(manager, state, data_iter, rng=rng, force=True)
    manager.wait_until_finished()
    return state


def train_sharded(
    *,
    step: Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]],
    state: TrainState,
    state_shardings: Any,
    batch_shardings: Any,
    mesh,
    rules,
    data_iter: Iterator,
    to_device: Callable[[Any], Any],
    train_cfg,
    manager: ocp.CheckpointManager,
    logdir,
    rng: jax.Array,
    desc: str,
    periodic: tuple[Periodic, ...] = (),
) -> tuple[TrainState, MetricLogger]:
    """Jit `step` with the state's shardings (donating it) and run it under the mesh and rules."""
    step_fn = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, None),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    logger = MetricLogger(logdir, train_cfg.steps, int(state.step), desc=desc, progress=train_cfg.progress)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state = run_loop(
                state=state, step_fn=step_fn, data_iter=data_iter, to_device=to_device,
                total_steps=train_cfg.steps, manager=manager, logger=logger, rng=rng,
                log_every=train_cfg.log_every, ckpt_every=train_cfg.ckpt_every, max_minutes=train_cfg.max_minutes,
                periodic=periodic,
            )
    finally:
        logger.close()  # flush TensorBoard on SIGTERM and errors too
    return state, logger
