"""Train state, optimiser, and sharded initialisation (eval_shape -> shardings -> jit(init))."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from sora_jax.parallel.mesh import logical_shardings, unbox_abstract


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; donated to the step."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any  # None when EMA is off
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)
    # Wall-time seconds of the run's time budget spent before this step, summed over resumes; the
    # loop writes it. A scalar only under optim.schedule_clock="budget" (None keeps older checkpoints'
    # tree unchanged).
    budget_seconds: Any = None

    def apply_gradients(self, grads) -> "TrainState":
        """One optimiser update plus the EMA update."""
        extra = {} if self.budget_seconds is None else {"budget_seconds": self.budget_seconds}
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if ema is not None:
            d = self.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema)

    @property
    def eval_params(self):
        """The weights to sample/evaluate with: EMA when kept, else the raw params."""
        return self.ema_params if self.ema_params is not None else self.params


def lr_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr over optim.warmup_steps, then cosine decay to lr * min_lr_ratio.

    The schedule spans total_steps unless the config sets optim.decay_steps: fixing it lets a run be
    stopped early or extended (more train.steps on resume) without changing the learning rates.
    """
    total_steps = int(cfg.get("decay_steps", 0) or total_steps)
    warmup = max(1, min(int(cfg.warmup_steps), total_steps - 1)) if total_steps > 1 else 1
    return optax.warmup_cosine_decay_schedule(
        # Starting at peak/warmup rather than 0 keeps the very first update from being a no-op.
        init_value=cfg.lr / warmup,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


SCHEDULE_CLOCKS = ("steps", "budget")


class BudgetClockState(NamedTuple):
    """Updates applied so far (the step side of the budget clock's progress)."""

    count: jax.Array


class BudgetClockOptimizer(optax.GradientTransformationExtraArgs):
    """An optimiser whose update needs `budget_seconds` (TrainState carries it; see `make_optimizer`)."""


def budget_cosine(progress: jax.Array, min_ratio: float) -> jax.Array:
    """Cosine from 1 at progress 0 to min_ratio at progress >= 1."""
    p = jnp.clip(progress, 0.0, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * p))


def scale_by_budget_cosine(
    total_steps: int, warmup_steps: int, budget_seconds: float, min_ratio: float
) -> BudgetClockOptimizer:
    """Scale updates by `budget_cosine` of the larger of two progress fractions: steps past the warmup
    over the steps after it (the steps schedule's own fraction), and seconds spent over budget_seconds."""
    decay = max(total_steps - warmup_steps, 1)
    budget = float(budget_seconds)

    def init(params):
        del params
        return BudgetClockState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, budget_seconds: jax.Array, **extra):
        del params, extra
        progress = jnp.maximum((state.count - warmup_steps) / decay, budget_seconds / budget)
        factor = budget_cosine(progress, min_ratio)
        return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), BudgetClockState(count=state.count + 1)

    return BudgetClockOptimizer(init, update)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, *, budget_minutes: float = 0.0
) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, after global-norm clipping of the gradients to optim.grad_clip.

    With optim.schedule_clock="budget" the cosine decay instead follows whichever runs out first,
    the steps (optim.decay_steps or total_steps) or the wall-time budget (`budget_minutes`, the run's
    train.max_minutes): a time-budgeted run then ends with its learning rate decayed however fast the
    machine is, where a schedule sized in steps would be cut short on a slow machine. The price is
    that the learning rates, so the weights, depend on the machine's speed. With no budget
    (`budget_minutes` 0) it is the steps schedule.
    """
    clock = cfg.get("schedule_clock", "steps")
    if clock not in SCHEDULE_CLOCKS:
        raise ValueError(f"optim.schedule_clock must be one of {list(SCHEDULE_CLOCKS)}, got {clock!r}")
    clip = optax.clip_by_global_norm(cfg.grad_clip)
    if clock == "steps" or not budget_minutes > 0:
        # Without a time budget only the steps can run out: the budget clock is the steps schedule.
        return optax.chain(
            clip, optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
        )
    total = max(int(cfg.get("decay_steps", 0) or total_steps), 1)
    warmup = max(1, min(int(cfg.warmup_steps), total - 1)) if total > 1 else 1
    # Warmup stays in steps (it guards the first updates, not the budget); the decay is applied after
    # AdamW, which scales its weight decay by the learning rate too, so both follow the clock as in
    # the steps schedule.
    warm = optax.warmup_constant_schedule(init_value=cfg.lr / warmup, peak_value=cfg.lr, warmup_steps=warmup)
    chained = optax.chain(
        clip,
        optax.adamw(warm, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
        scale_by_budget_cosine(max(total, warmup + 1), warmup, 60.0 * budget_minutes, float(cfg.min_lr_ratio)),
    )
    return BudgetClockOptimizer(chained.init, chained.update)


def uses_budget_clock(tx: optax.GradientTransformation) -> bool:
    """Whether `tx` is a `make_optimizer` built with optim.schedule_clock="budget"."""
    return isinstance(tx, BudgetClockOptimizer)


def _nested(state: TrainState) -> dict[str, TrainState]:
    """Train states held in `state`'s fields (a GAN's discriminator), by field name."""
    return {f.name: v for f in dataclasses.fields(state) if isinstance(v := getattr(state, f.name), TrainState)}


def budget_seconds_spent(state: TrainState) -> float | None:
    """Seconds of the time budget a budget-clock state has spent (also a nested discriminator's); None without one."""
    if state.budget_seconds is not None:
        return float(state.budget_seconds)
    return next((s for s in map(budget_seconds_spent, _nested(state).values()) if s is not None), None)


def with_budget_seconds(state: TrainState, seconds: float) -> TrainState:
    """`state` (and any train state nested in it) with its budget clock set to `seconds`, in its sharding."""
    changes: dict[str, Any] = {k: with_budget_seconds(v, seconds) for k, v in _nested(state).items()}
    if state.budget_seconds is not None:
        # The same value from every process (the loop agrees it), placed like the rest of the state.
        changes["budget_seconds"] = jax.make_array_from_callback(
            (), state.budget_seconds.sharding, lambda _: np.asarray(seconds, np.float32))
    return state.replace(**changes) if changes else state


def _state_initializer(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, ema_decay: float
) -> Callable[[jax.Array], TrainState]:
    """key -> TrainState whose leaves keep their LogicallyPartitioned boxes."""

    def init_boxed(key):
        params = init_params(key)  # LogicallyPartitioned leaves
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            # Optax maps over the boxes, so moments inherit the parameters' logical names.
            opt_state=tx.init(params),
            ema_params=params if ema_decay > 0 else None,
            tx=tx,
            ema_decay=ema_decay,
            budget_seconds=jnp.zeros((), jnp.float32) if uses_budget_clock(tx) else None,
        )

    return init_boxed


def create_sharded_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    ema_decay: float,
    mesh: Mesh,
    rules,
    rng: jax.Array,
) -> tuple[TrainState, Any]:
    """Initialise a TrainState directly into its shardings; returns (state, state_shardings)."""
    init_boxed = _state_initializer(init_params, tx, ema_decay)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_boxed, rng)
        shardings = logical_shardings(abstract, mesh, rules)
        state = jax.jit(lambda k: nn.meta.unbox(init_boxed(k)), out_shardings=shardings)(rng)
    return state, shardings


def abstract_sharded_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    ema_decay: float,
    mesh: Mesh,
    rules,
) -> tuple[TrainState, Any]:
    """The TrainState as ShapeDtypeStructs with shardings, allocating nothing: (state, state_shardings).

    For ahead-of-time compiles (layout benchmarks), where the mesh may be made of compile-only devices.
    """
    init_boxed = _state_initializer(init_params, tx, ema_decay)
    key = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_boxed, key)
        shardings = logical_shardings(abstract, mesh, rules)
    return abstract_state(shardings, unbox_abstract(abstract)), shardings


def abstract_state(state_shardings, abstract_unboxed) -> Any:
    """ShapeDtypeStructs carrying shardings: the restore target for Orbax."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_unboxed, state_shardings
    )
