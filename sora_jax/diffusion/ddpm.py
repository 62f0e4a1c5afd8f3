"""DDPM objective: discrete variance-preserving diffusion with epsilon- or v-prediction.

Forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for integer t in [0, T), with
abar_t = prod_{s<=t} (1 - beta_s). Schedules and conventions follow diffusers' DDPM/DDIM schedulers,
so a model trained here samples with `DDIMScheduler(beta_schedule=...)` and vice versa:
  - "linear":  betas = linspace(beta_start, beta_end, T) (Ho et al. 2020);
  - "cosine":  abar(t) = cos((t/T + 0.008) / 1.008 * pi/2)^2, betas = 1 - abar(t+1)/abar(t) capped at
               0.999 (Nichol & Dhariwal 2021; diffusers' "squaredcos_cap_v2").
v-prediction (Salimans & Ho 2022): v = sqrt(abar) eps - sqrt(1 - abar) x0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion.weighting import WEIGHTINGS, loss_weight, per_example_mean

BETA_SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v_prediction")
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}  # diffusers' name for the cosine schedule


def linear_betas(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s linear betas [T], float32."""
    return np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine betas [T], float32, capped at max_beta."""
    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], np.float32)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s) [T], float32."""
    # Accumulated in float64 and rounded once, as torch's CPU cumprod does for float32 input.
    return np.cumprod((1.0 - betas.astype(np.float32)).astype(np.float64)).astype(np.float32)


def _bcast(a: jax.Array, ndim: int) -> jax.Array:
    return a.reshape((-1,) + (1,) * (ndim - 1))  # [B] -> [B, 1, ..., 1]


def add_noise(x0: jax.Array, noise: jax.Array, abar: jax.Array) -> jax.Array:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, with abar one per example [B]."""
    a = _bcast(abar, x0.ndim).astype(jnp.float32)
    return (jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise).astype(x0.dtype)


def v_target(x0: jax.Array, noise: jax.Array, abar: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(abar) eps - sqrt(1 - abar) x0."""
    a = _bcast(abar, x0.ndim).astype(jnp.float32)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def x0_and_eps(x_t: jax.Array, pred: jax.Array, abar: jax.Array, prediction: str) -> tuple[jax.Array, jax.Array]:
    """The clean sample and the noise implied by a model output at noise level abar (scalar or [B])."""
    a = abar if jnp.ndim(abar) == 0 else _bcast(abar, x_t.ndim)
    sa, sb = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if prediction == "epsilon":
        return (x_t - sb * pred) / sa, pred
    if prediction == "v_prediction":
        return sa * x_t - sb * pred, sa * pred + sb * x_t
    raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")


@dataclasses.dataclass(frozen=True)
class DDPMObjective:
    """Hyper-parameters of DDPM training: beta schedule, prediction target and loss weighting."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "epsilon"
    weighting: str = "none"
    snr_gamma: float = 5.0

    def __post_init__(self):
        object.__setattr__(self, "beta_schedule", _SCHEDULE_ALIASES.get(self.beta_schedule, self.beta_schedule))
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; use one of {BETA_SCHEDULES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; use one of {PREDICTIONS}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; use one of {WEIGHTINGS}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    def betas(self) -> np.ndarray:
        """The beta schedule [T], float32."""
        if self.beta_schedule == "linear":
            return linear_betas(self.num_train_timesteps, self.beta_start, self.beta_end)
        return cosine_betas(self.num_train_timesteps)

    def alphas_cumprod(self) -> np.ndarray:
        """abar_t for t = 0..T-1, float32."""
        return alphas_cumprod(self.betas())

    def _abar(self, t: jax.Array) -> jax.Array:
        return jnp.asarray(self.alphas_cumprod())[t]

    def sample_timesteps(self, rng: jax.Array, batch: int) -> jax.Array:
        """Uniform integer training timesteps [batch] in [0, T)."""
        return jax.random.randint(rng, (batch,), 0, self.num_train_timesteps)

    sample_times = sample_timesteps  # the training interface shared with FlowObjective

    def model_time(self, t: jax.Array) -> jax.Array:
        """The timestep the network sees: the integer DDPM step, as DDIM feeds it."""
        return t.astype(jnp.float32)

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """Forward process at integer timesteps t [B]."""
        return add_noise(x0, noise, self._abar(t))

    def snr(self, t: jax.Array) -> jax.Array:
        """abar_t / (1 - abar_t) at integer timesteps t."""
        a = self._abar(t)
        return a / (1.0 - a)

    def target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """The regression target: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        if self.prediction == "epsilon":
            return noise.astype(jnp.float32)
        return v_target(x0, noise, self._abar(t))

    def weight(self, t: jax.Array) -> jax.Array:
        """Per-example weight of the target MSE at timesteps t [B]."""
        return loss_weight(self.snr(t), self.weighting, self.prediction, self.snr_gamma)

    def loss(
        self, pred: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array, given: jax.Array | None = None,
        cells: jax.Array | None = None,
    ) -> jax.Array:
        """Weighted MSE of the prediction per example [B], conditioning cells (`given`) left out, `cells` per-cell weights."""
        err = jnp.square(pred.astype(jnp.float32) - self.target(x0, noise, t))
        per_example = per_example_mean(err, given, cells)
        return per_example if self.weighting == "none" else per_example * self.weight(t)
