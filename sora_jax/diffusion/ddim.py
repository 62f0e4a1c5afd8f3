"""DDIM sampler for DDPM models (Song et al. 2021), epsilon- or v-prediction, eta >= 0.

Matches diffusers' `DDIMScheduler` step for step (its timestep spacings, prev_t = t - T // num_steps,
set_alpha_to_one, optional x0 clipping). With eta = 0 the update is deterministic:
  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps;
with eta > 0 it adds std_t * z, std_t = eta * sqrt((1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)),
z ~ N(0, I) drawn from jax.random.fold_in(rng, step index), and shrinks the eps direction to
sqrt(1 - abar_prev - std_t^2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion import ddpm
from sora_jax.diffusion.samplers import LoopSampler, guided_prediction, scan_steps

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(num_steps: int, num_train_timesteps: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """The decreasing integer timesteps [num_steps] visited, as diffusers' DDIMScheduler.set_timesteps."""
    n, t_max = num_steps, num_train_timesteps
    if not 1 <= n <= t_max:
        raise ValueError(f"num_steps must be in [1, {t_max}], got {n}")
    if spacing == "leading":
        return (np.arange(0, n) * (t_max // n)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(t_max, 0, -t_max / n)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, t_max - 1, n).round()[::-1].astype(np.int64)
    raise ValueError(f"unknown timestep_spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}")


@dataclasses.dataclass(frozen=True)
class DDIMSampler(LoopSampler):
    """DDIM over a DDPM objective's schedule, with classifier-free guidance.

    `clip_sample` clamps the predicted x0 to [-clip_sample, clip_sample] (None: off; diffusers' default
    is on with 1.0, which suits pixels in [-1, 1], not latents).
    """

    num_steps: int = 50
    guidance: float = 4.0
    eta: float = 0.0
    objective: ddpm.DDPMObjective = ddpm.DDPMObjective()
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: float | None = None

    def __post_init__(self):
        if not 1 <= self.num_steps <= self.objective.num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.objective.num_train_timesteps}], got {self.num_steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; use one of {TIMESTEP_SPACINGS}")

    def schedule(self) -> dict[str, np.ndarray]:
        """Per-step constants (float32): timestep t, abar_t, sqrt(abar_prev), eps direction, noise std,
        and the coefficients cx, co of x_prev = cx x_t + co model_output (+ std z) without clipping."""
        obj = self.objective
        ab32 = obj.alphas_cumprod()
        t = ddim_timesteps(self.num_steps, obj.num_train_timesteps, self.timestep_spacing, self.steps_offset)
        # diffusers steps to t - T // num_steps whatever the spacing; below 0 it uses the final abar.
        prev = t - obj.num_train_timesteps // self.num_steps
        ab = ab32.astype(np.float64)
        final = 1.0 if self.set_alpha_to_one else ab[0]
        ab_t = ab[t]
        ab_prev = np.where(prev >= 0, ab[np.maximum(prev, 0)], final)
        std = self.eta * np.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        sa, sb, sap = np.sqrt(ab_t), np.sqrt(1 - ab_t), np.sqrt(ab_prev)
        direction = np.sqrt(1 - ab_prev - std**2)
        # Folding x0 = (x - sb eps)/sa into one linear step avoids forming x0 in float32: at high noise
        # (sa -> 0) that division cancels catastrophically for epsilon-prediction.
        if obj.prediction == "epsilon":
            cx, co = sap / sa, direction - sap * sb / sa
        else:  # v: x0 = sa x - sb v, eps = sa v + sb x
            cx, co = sap * sa + direction * sb, direction * sa - sap * sb
        out = {"t": t, "abar": ab_t, "sqrt_abar_prev": sap, "dir": direction, "std": std, "cx": cx, "co": co}
        return {k: v.astype(np.float32) for k, v in out.items()} | {"index": np.arange(self.num_steps)}

    def _solve(self, denoiser, params, noise, cond, rng, keep):
        stochastic = self.eta > 0
        if stochastic and rng is None:
            raise ValueError("DDIM with eta > 0 needs an rng (pass rng=..., or use sampler.generate(..., seed=...))")
        xs = {k: jnp.asarray(v) for k, v in self.schedule().items()}

        def step(x, s):
            out = guided_prediction(denoiser, params, x, s["t"], cond, self.guidance)
            if self.clip_sample is None:
                x_prev = s["cx"] * x + s["co"] * out
            else:
                x0, eps = ddpm.x0_and_eps(x, out, s["abar"], self.objective.prediction)
                x0 = jnp.clip(x0, -self.clip_sample, self.clip_sample)
                x_prev = s["sqrt_abar_prev"] * x0 + s["dir"] * eps
            if stochastic:
                z = jax.random.normal(jax.random.fold_in(rng, s["index"]), x.shape, x.dtype)
                x_prev = x_prev + s["std"] * z
            return x_prev

        return scan_steps(step, noise, xs, (lambda x: x) if keep else None)
