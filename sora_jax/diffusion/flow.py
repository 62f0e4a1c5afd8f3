"""Rectified flow (flow matching): x_t = (1 - s) x0 + s eps, target velocity eps - x0.

Timesteps follow the Wan/diffusers convention: the network sees t = 1000 * sigma.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion.weighting import WEIGHTINGS, loss_weight, per_example_mean

TIME_SCALE = 1000.0
# Sampling schedules (sigma grids) a flow sampler can walk; see `flow_schedule`.
FLOW_SCHEDULES = ("linear", "diffusers_euler", "diffusers_unipc")


def shift_sigmas(sigma: jax.Array, shift: float) -> jax.Array:
    """Resolution shift of the noise schedule (shift > 1 spends more steps at high noise)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def latent_tokens(grid: Sequence[int], patch: Sequence[int] = (1, 2, 2)) -> int:
    """Number of DiT tokens of a latent grid (T', H', W') cut into patches (pt, ph, pw)."""
    return math.prod(g // p for g, p in zip(grid, patch))


def resolution_shift(num_tokens: int, base_tokens: int = 21 * 30 * 52, base_shift: float = 3.0) -> float:
    """Shift for `num_tokens` tokens, scaled from a reference shift by sqrt(num_tokens / base_tokens)."""
    # SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 5.3.2, eq. 23): a sequence of
    # m tokens is as noisy at shifted time alpha*t/(1+(alpha-1)t) as one of n tokens at t, with
    # alpha = sqrt(m/n). Shifts compose multiplicatively (shift(shift(t, a), b) = shift(t, a*b)), so the
    # shift at m tokens is base_shift * sqrt(m/n). The default reference is Wan2.1 at 480x832x81 frames
    # (latent 21x60x104, patches 1x2x2 -> 32760 tokens) with its shift 3.0; 720p x 81 frames then gets
    # 4.56 (Wan2.1 ships 5.0 for 720p).
    if num_tokens < 1 or base_tokens < 1 or base_shift <= 0:
        raise ValueError(f"need positive num_tokens/base_tokens/base_shift, got {num_tokens}/{base_tokens}/{base_shift}")
    return float(base_shift * math.sqrt(num_tokens / base_tokens))


def dynamic_shift(
    num_tokens: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux-style "dynamic shifting": exp(mu), mu linear in the token count."""
    # diffusers `calculate_shift` (pipelines/flux/pipeline_flux.py) gives mu, and the schedulers'
    # exponential `time_shift(mu, 1.0, t) = e^mu / (e^mu + 1/t - 1)` equals shift_sigmas(t, e^mu).
    # Its defaults are calibrated for images of 256..4096 tokens; video token counts far beyond that
    # extrapolate to huge shifts, so prefer `resolution_shift` there.
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + m * (num_tokens - base_seq_len)
    return float(math.exp(mu))


def flow_schedule(num_steps: int, shift: float, kind: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Sampling grid: sigmas [num_steps + 1] ending at 0 and the model timesteps [num_steps], float32."""
    # Built in numpy at trace time (num_steps and shift are static), so the diffusers grids are
    # reproduced bit for bit, including their float64 intermediate steps and integer timesteps.
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        sigmas = np.asarray(shift_sigmas(np.linspace(1.0, 0.0, num_steps + 1), shift), np.float32)
        return sigmas, sigmas[:-1] * np.float32(TIME_SCALE)
    n_train = int(TIME_SCALE)
    if kind == "diffusers_euler":
        # FlowMatchEulerDiscreteScheduler(shift=s): its sigma_min is the float32 *shifted* 1/1000 of
        # __init__, and set_timesteps shifts the linspace again (the min is shifted twice).
        train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
        s32 = np.float32(shift)
        train = s32 * train / (np.float32(1) + (s32 - np.float32(1)) * train)
        t = np.linspace(float(train[0]) * n_train, float(train[-1]) * n_train, num_steps)
        sigmas = np.asarray(shift_sigmas(t / n_train, shift), np.float32)
        return np.concatenate([sigmas, [0.0]]).astype(np.float32), sigmas * np.float32(n_train)
    if kind == "diffusers_unipc":
        # UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s, final_sigmas_type="zero").
        sigmas = shift_sigmas(np.linspace(1.0, 1.0 / n_train, num_steps + 1)[:-1], shift)
        if abs(sigmas[0] - 1.0) < 1e-6:
            sigmas[0] -= 1e-6  # diffusers: keeps log(alpha) = log(1 - sigma) finite in UniPC's first steps
        timesteps = (sigmas * n_train).astype(np.int64)  # truncated: the network sees integer timesteps
        return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps.astype(np.float32)
    raise ValueError(f"unknown flow schedule {kind!r}; use one of {FLOW_SCHEDULES}")


def sample_sigmas(
    rng: jax.Array,
    batch: int,
    method: str = "logit_normal",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> jax.Array:
    """Draw training noise levels in (0, 1)."""
    if method == "uniform":
        sigma = jax.random.uniform(rng, (batch,), minval=1e-4, maxval=1.0)
    elif method == "logit_normal":
        sigma = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
    else:
        raise ValueError(f"unknown timestep_sampling {method!r}; use 'uniform' or 'logit_normal'")
    return shift_sigmas(sigma, shift)


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """Interpolate data and noise at noise level sigma: one per example [B], or one scalar for all."""
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)  # [B] -> [B, 1, ..., 1]
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The rectified-flow regression target d x_t / d sigma."""
    return noise - x0


def flow_snr(sigma: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ((1 - sigma) / sigma)^2 of x_t = (1 - sigma) x0 + sigma eps."""
    return jnp.square((1.0 - sigma) / sigma)


def flow_loss(
    pred: jax.Array, x0: jax.Array, noise: jax.Array, weight: jax.Array | None = None, given: jax.Array | None = None,
    cells: jax.Array | None = None,
) -> jax.Array:
    """Mean squared error of the predicted velocity, per example, times an optional per-example weight.

    `given` (broadcastable to x0, 1 = a conditioning cell fed clean) leaves those cells out of the mean;
    `cells` (per-cell weights) makes it a weighted mean.
    """
    err = jnp.square(pred.astype(jnp.float32) - velocity_target(x0, noise).astype(jnp.float32))
    per_example = per_example_mean(err, given, cells)
    return per_example if weight is None else per_example * weight


@dataclasses.dataclass(frozen=True)
class FlowObjective:
    """Hyper-parameters of flow-matching training: timestep sampling, shift and loss weighting."""

    timestep_sampling: str = "logit_normal"
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str = "none"
    snr_gamma: float = 5.0

    def __post_init__(self):
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown timestep_sampling {self.timestep_sampling!r}; use 'uniform' or 'logit_normal'")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; use one of {WEIGHTINGS}")

    def sample_sigmas(self, rng: jax.Array, batch: int) -> jax.Array:
        """Training noise levels [batch] in (0, 1)."""
        return sample_sigmas(rng, batch, self.timestep_sampling, self.shift, self.logit_mean, self.logit_std)

    sample_times = sample_sigmas  # the training interface shared with DDPMObjective

    def add_noise(self, x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
        """Forward process at noise levels sigma [B]."""
        return add_noise(x0, noise, sigma)

    def model_time(self, sigma: jax.Array) -> jax.Array:
        """The timestep the network sees: 1000 sigma (Wan/diffusers convention)."""
        return sigma * TIME_SCALE

    def weight(self, sigma: jax.Array) -> jax.Array:
        """Per-example weight of the velocity MSE at noise levels sigma [B]."""
        return loss_weight(flow_snr(sigma), self.weighting, "flow", self.snr_gamma)

    def loss(
        self, pred: jax.Array, x0: jax.Array, noise: jax.Array, sigma: jax.Array, given: jax.Array | None = None,
        cells: jax.Array | None = None,
    ) -> jax.Array:
        """Weighted velocity MSE per example [B], conditioning cells (`given`) left out, `cells` per-cell weights."""
        return flow_loss(pred, x0, noise, None if self.weighting == "none" else self.weight(sigma), given, cells)
