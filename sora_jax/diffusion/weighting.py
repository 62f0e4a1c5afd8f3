"""Per-example loss weights as functions of the signal-to-noise ratio, for flow and DDPM targets.

Every scheme is defined by the weight it puts on the *x0* error, and converted to the space the
network regresses in. Writing e for the target error and x0 = a x_t - b * pred:
  - epsilon:      |x0 err|^2 = |e|^2 / snr            -> MSE_eps  = snr       * MSE_x0
  - v_prediction: |x0 err|^2 = sigma^2 |e|^2, VP       -> MSE_v    = (snr + 1) * MSE_x0
  - flow (velocity eps - x0, x0 = x_t - sigma v)       -> MSE_flow = MSE_x0 / sigma^2
                                                          = (1 + sqrt(snr))^2 * MSE_x0
Schemes (x0-space weight):
  - "none":          the plain MSE of the target (no reweighting, weight 1);
  - "min_snr":       min(snr, gamma) (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
                     Weighting Strategy"); gives min(snr, gamma)/snr for epsilon and
                     min(snr, gamma)/(snr + 1) for v, as in their paper and diffusers' train scripts;
  - "truncated_snr": max(snr, 1) (Salimans & Ho 2022, "Progressive Distillation", sec. 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WEIGHTINGS = ("none", "min_snr", "truncated_snr")
TARGETS = ("epsilon", "v_prediction", "flow")


def implied_x0_weight(snr: jax.Array, target: str) -> jax.Array:
    """The x0-space weight that the plain MSE of `target` carries at this snr."""
    if target == "epsilon":
        return snr
    if target == "v_prediction":
        return snr + 1.0
    if target == "flow":
        return jnp.square(1.0 + jnp.sqrt(snr))
    raise ValueError(f"unknown target {target!r}; use one of {TARGETS}")


def loss_weight(snr: jax.Array, scheme: str, target: str, gamma: float = 5.0) -> jax.Array:
    """Weight on the per-example MSE of `target` for weighting `scheme` at signal-to-noise ratio snr."""
    snr = jnp.asarray(snr, jnp.float32)
    if scheme == "none":
        return jnp.ones_like(snr)
    # Keep 0 < snr < inf so the ratios below never form 0/0 or inf/inf at the schedule's ends.
    snr = jnp.clip(snr, 1e-12, 1e12)
    if scheme == "min_snr":
        x0_weight = jnp.minimum(snr, gamma)
    elif scheme == "truncated_snr":
        x0_weight = jnp.maximum(snr, 1.0)
    else:
        raise ValueError(f"unknown weighting {scheme!r}; use one of {WEIGHTINGS}")
    return x0_weight / implied_x0_weight(snr, target)


def per_example_mean(err: jax.Array, given: jax.Array | None = None) -> jax.Array:
    """Mean of a squared error over each example [B, ...] -> [B], skipping conditioning cells.

    `given` (broadcastable to err, 1 = a conditioning cell fed clean) leaves those cells out of the
    mean; an example with no generated cell left contributes 0.
    """
    if given is None:
        return err.reshape(err.shape[0], -1).mean(axis=1)
    free = jnp.broadcast_to(1.0 - given.astype(jnp.float32), err.shape)
    return (err * free).reshape(err.shape[0], -1).sum(axis=1) / jnp.maximum(
        free.reshape(err.shape[0], -1).sum(axis=1), 1.0)
