"""Gradient accumulation: one optimiser update from several microbatches of the global batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

GradFn = Callable[[Any, dict, jax.Array], tuple[Any, dict]]


def tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a pytree (the gradient norm that clipping sees)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def split_microbatches(batch: dict, microbatches: int) -> dict:
    """[B, ...] -> [microbatches, B / microbatches, ...], microbatch i = examples i, i+k, i+2k, ...

    Strided rather than contiguous: each device holds a contiguous run of the batch-sharded dim, so
    every microbatch then draws equally from every device and no example moves between devices.
    """

    def split(x):
        b = x.shape[0]
        x = x.reshape(b // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def accumulate_gradients(grad_fn: GradFn, params: Any, batch: dict, rng: jax.Array, microbatches: int) -> tuple[Any, dict]:
    """Mean gradients and metrics of grad_fn over `microbatches` equal slices of the batch.

    Equals grad_fn on the whole batch (up to float rounding) when its loss is a per-example mean;
    with 1 microbatch it *is* grad_fn on the whole batch, the same program bit for bit. Microbatch i
    draws its noise from fold_in(rng, i). Gradients are summed in float32 whatever the compute dtype.
    """
    if microbatches == 1:
        return grad_fn(params, batch, rng)
    micro = split_microbatches(batch, microbatches)

    def body(carry, xs):
        grad_sum, metric_sum = carry
        i, mb = xs
        grads, metrics = grad_fn(params, mb, jax.random.fold_in(rng, i))
        add = lambda a, b: a + b.astype(jnp.float32)  # noqa: E731
        return (jax.tree.map(add, grad_sum, grads), jax.tree.map(add, metric_sum, metrics)), None

    _, metric_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    # zeros_like(params): the accumulator takes the parameters' sharding, not a replicated copy.
    init = (jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params),
            jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shape))
    (grad_sum, metric_sum), _ = jax.lax.scan(body, init, (jnp.arange(microbatches), micro))
    grads = jax.tree.map(lambda g, p: (g / microbatches).astype(p.dtype), grad_sum, params)
    return grads, jax.tree.map(lambda m: m / microbatches, metric_sum)
