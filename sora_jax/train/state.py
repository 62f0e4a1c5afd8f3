"""Train state, optimiser, and sharded initialisation (eval_shape -> shardings -> jit(init))."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
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

    def apply_gradients(self, grads) -> "TrainState":
        """One optimiser update plus the EMA update."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
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


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, after global-norm clipping of the gradients to optim.grad_clip."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )


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
