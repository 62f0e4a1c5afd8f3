"""Rectified flow (flow matching): x_t = (1 - s) x0 + s eps, target velocity eps - x0.

Timesteps follow the Wan/diffusers convention: the network sees t = 1000 * sigma.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIME_SCALE = 1000.0


def shift_sigmas(sigma: jax.Array, shift: float) -> jax.Array:
    """Resolution shift of the noise schedule (shift > 1 spends more steps at high noise)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigmas(rng: jax.Array, batch: int, method: str = "logit_normal", shift: float = 1.0) -> jax.Array:
    """Draw training noise levels in (0, 1)."""
    if method == "uniform":
        sigma = jax.random.uniform(rng, (batch,), minval=1e-4, maxval=1.0)
    elif method == "logit_normal":
        sigma = jax.nn.sigmoid(jax.random.normal(rng, (batch,)))
    else:
        raise ValueError(f"unknown timestep_sampling {method!r}; use 'uniform' or 'logit_normal'")
    return shift_sigmas(sigma, shift)


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """Interpolate data and noise at noise level sigma (one per example)."""
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The rectified-flow regression target d x_t / d sigma."""
    return noise - x0


def flow_loss(pred: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Mean squared error of the predicted velocity, per example."""
    err = jnp.square(pred.astype(jnp.float32) - velocity_target(x0, noise).astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)
