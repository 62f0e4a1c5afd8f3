"""The step loop shared by VAE and DiT training: steps, logging, checkpoints, time budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from sora_jax.train import checkpoint
from sora_jax.train.metrics import MetricLogger
from sora_jax.train.state import TrainState


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
) -> TrainState:
    """Run steps until total_steps (or the wall-time budget), checkpointing along the way."""
    step = int(state.step)
    saved_step = manager.latest_step()
    start = time.perf_counter()
    pending = None
    metrics = None
    while step < total_steps:
        batch = to_device(next(data_iter))
        state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
        step += 1
        logger.advance()
        # Reading metrics of the previous logged step lets the device run ahead by one step.
        if pending is not None:
            logger.log(*pending)
            pending = None
        if step % log_every == 0 or step == total_steps:
            pending = (step, metrics)
        if ckpt_every and step % ckpt_every == 0:
            checkpoint.save(manager, state, data_iter)
            saved_step = step
        if max_minutes and time.perf_counter() - start > 60.0 * max_minutes:
            break
    if pending is not None:
        logger.log(*pending)
    elif metrics is not None and (not logger.history or logger.history[-1]["step"] != step):
        logger.log(step, metrics)
    if saved_step != step:
        checkpoint.save(manager, state, data_iter, force=True)
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
) -> tuple[TrainState, MetricLogger]:
    """Jit `step` with the state's shardings (donating it) and run it under the mesh and rules."""
    step_fn = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, None),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    logger = MetricLogger(logdir, train_cfg.steps, int(state.step), desc=desc, progress=train_cfg.progress)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = run_loop(
            state=state, step_fn=step_fn, data_iter=data_iter, to_device=to_device,
            total_steps=train_cfg.steps, manager=manager, logger=logger, rng=rng,
            log_every=train_cfg.log_every, ckpt_every=train_cfg.ckpt_every, max_minutes=train_cfg.max_minutes,
        )
    logger.close()
    return state, logger
