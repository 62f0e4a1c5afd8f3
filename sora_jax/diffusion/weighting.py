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


def per_example_mean(err: jax.Array, given: jax.Array | None = None, cells: jax.Array | None = None) -> jax.Array:
    """Mean of a squared error over each example [B, ...] -> [B], skipping conditioning cells.

    `given` (broadcastable to err, 1 = a conditioning cell fed clean) leaves those cells out of the
    mean; an example with no generated cell left contributes 0. `cells` (broadcastable to err, >= 1
    where scored) makes it a weighted mean, as `foreground_cells` builds.
    """
    if given is None and cells is None:
        return err.reshape(err.shape[0], -1).mean(axis=1)
    free = jnp.ones((), jnp.float32) if given is None else 1.0 - given.astype(jnp.float32)
    if cells is not None:
        free = free * cells.astype(jnp.float32)
    free = jnp.broadcast_to(free, err.shape)
    return (err * free).reshape(err.shape[0], -1).sum(axis=1) / jnp.maximum(
        free.reshape(err.shape[0], -1).sum(axis=1), 1.0)


def foreground_cells(x0: jax.Array, weight: float, threshold: float) -> tuple[jax.Array, jax.Array]:
    """Per-cell loss weights [B, T', H', W', 1]: 1 + weight where a latent differs from the batch's background.

    The background of each latent cell is the median over the batch of its latent vector: on data
    whose clips share a static background and whose objects are small (physics_balls), most clips
    show background at any one cell, so the median is the background and a cell more than
    `threshold` (latent units; the DiT's latents are unit-scale per channel) from it holds an
    object. Objects and their halo are a minority of the cells (0.22-0.34 per batch on physics_balls
    at threshold 1), so in a plain mean the background's errors dominate; this is the DiT's
    counterpart of the VAE's `loss.fg_weight`. It needs a
    batch of several clips (a batch of one has no foreground). Returns (weights, foreground share).
    """
    background = jnp.median(x0.astype(jnp.float32), axis=0, keepdims=True)  # [1, T', H', W', C]
    distance = jnp.linalg.norm(x0.astype(jnp.float32) - background, axis=-1, keepdims=True)  # [B, T', H', W', 1]
    foreground = (distance > threshold).astype(jnp.float32)
    return 1.0 + weight * foreground, foreground.mean()
