"""Jitted samplers: the whole solve is one `lax.scan` inside one jit.

Every sampler is a frozen, hashable dataclass whose fields (step count included) are static, so a
sampler compiles once per configuration and runs all its steps in a single XLA loop. They share:
  - `guided_prediction`: classifier-free guidance, conditional and unconditional (negative-prompt)
    branches in one batched network call;
  - `LoopSampler`: `__call__` (final sample), `trajectory` (the sample after every step, for parity
    tests) and `generate` (noise and stochastic steps from an integer seed);
  - optional latent conditioning (`conditioning.LatentCondition`, flow samplers): given latent cells
    are held at the conditioning latents noised to the current sigma, and come out exactly; an SDEdit
    strength starts the loop part-way down the same grid.
Flow samplers (Euler, Heun here; UniPC in unipc.py) integrate sigma from ~1 to 0; DDIM (ddim.py)
walks the discrete DDPM timesteps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion import flow
from sora_jax.diffusion.conditioning import LatentCondition, finish, hold, network_timesteps, start_index


class Denoiser(Protocol):
    """A hashable callable (params, x_t, t, text, text_mask) -> model output (velocity, eps or v)."""

    def __call__(self, params, x, t, text, text_mask) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Text embeddings for the prompt and for the unconditional branch (empty or negative prompt)."""

    text: jax.Array  # [batch, text_len, text_dim]
    text_mask: jax.Array  # [batch, text_len]
    null_text: jax.Array  # [batch, text_len, text_dim]; same shape as text (they are concatenated)
    null_mask: jax.Array  # [batch, text_len]


jax.tree_util.register_dataclass(
    Conditioning, data_fields=["text", "text_mask", "null_text", "null_mask"], meta_fields=[]
)


def guided_prediction(
    denoiser: Denoiser, params: Any, x: jax.Array, t: jax.Array, cond: Conditioning, guidance: float
) -> jax.Array:
    """Classifier-free guidance out_u + g (out_c - out_u) at timestep t (scalar, or per cell [B, T', H', W'])."""
    b = x.shape[0]
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.full((b,), t)
    if guidance == 1.0:
        # g = 1 is the conditional output exactly; skip the unconditional half of the batch.
        return denoiser(params, x, t, cond.text, cond.text_mask)
    # One network call on [cond; uncond] (batch 2B) halves the number of sequential launches.
    out = denoiser(
        params,
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([cond.text, cond.null_text]),
        jnp.concatenate([cond.text_mask, cond.null_mask]),
    )
    out_cond, out_uncond = out[:b], out[b:]
    return out_uncond + guidance * (out_cond - out_uncond)


def scan_steps(
    step: Callable[[Any, Any], Any], carry: Any, xs: Any, keep: Callable[[Any], jax.Array] | None
) -> tuple[Any, jax.Array | None]:
    """Run `step(carry, x) -> carry` over the leading axis of xs in one lax.scan; stack keep(carry) if given."""
    def body(c, x):
        c = step(c, x)
        return c, (None if keep is None else keep(c))

    return jax.lax.scan(body, carry, xs)


class LoopSampler:
    """Shared entry points of the samplers; subclasses implement `_solve`."""

    num_steps: int
    # Flow samplers take a `latent_cond` keyword in `_solve`; DDIM (a DDPM noise schedule) does not.
    latent_conditioning = False

    def _solve(self, denoiser, params, noise, cond, rng, keep: bool) -> tuple[jax.Array, jax.Array | None]:
        raise NotImplementedError

    def _run(self, denoiser, params, noise, cond, rng, keep, latent_cond):
        if latent_cond is None:
            return self._solve(denoiser, params, noise, cond, rng, keep)
        if not self.latent_conditioning:
            raise ValueError(f"{type(self).__name__} cannot hold latent frames; use a flow sampler (euler, heun, unipc)")
        return self._solve(denoiser, params, noise, cond, rng, keep, latent_cond=latent_cond)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def __call__(
        self, denoiser: Denoiser, params: Any, noise: jax.Array, cond: Conditioning, rng: jax.Array | None = None,
        latent_cond: LatentCondition | None = None,
    ) -> jax.Array:
        """Denoise `noise` to a clean latent; `rng` feeds stochastic samplers (DDIM with eta > 0).

        `latent_cond` holds latent cells at given values (i2v, extend, inpaint, ...) and/or starts
        from a noised input (SDEdit); None is plain text-to-video.
        """
        return self._run(denoiser, params, noise.astype(jnp.float32), cond, rng, False, latent_cond)[0]

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def trajectory(
        self, denoiser: Denoiser, params: Any, noise: jax.Array, cond: Conditioning, rng: jax.Array | None = None,
        latent_cond: LatentCondition | None = None,
    ) -> jax.Array:
        """The noise followed by the sample after each step run: [steps run + 1, *noise.shape]."""
        noise = noise.astype(jnp.float32)
        _, xs = self._run(denoiser, params, noise, cond, rng, True, latent_cond)
        return jnp.concatenate([noise[None], xs])  # [1 + steps run, *noise.shape]

    def generate(self, denoiser: Denoiser, params: Any, shape: tuple[int, ...], cond: Conditioning, seed: int) -> jax.Array:
        """Sample from an integer seed: noise from key(seed), per-step randomness from fold_in(key(seed), 1)."""
        key = jax.random.key(seed)
        noise = jax.random.normal(key, shape, jnp.float32)
        return self(denoiser, params, noise, cond, jax.random.fold_in(key, 1))


def conditioned_start(noise: jax.Array, latent_cond: LatentCondition | None, sigmas: np.ndarray) -> tuple[int, jax.Array]:
    """(first step index, starting sample) of a flow solve on `sigmas` [N + 1] under `latent_cond`."""
    if latent_cond is None:
        return 0, noise
    k = start_index(sigmas, latent_cond.strength)
    x = noise
    if latent_cond.strength is not None:
        # SDEdit: the input noised to the start step's sigma with the run's own noise; with no
        # step left (sigma 0) the input itself.
        x = latent_cond.latents if k == len(sigmas) - 1 else flow.add_noise(latent_cond.latents, noise, sigmas[k])
    return k, hold(x, latent_cond, noise, sigmas[k])


def holder(latent_cond: LatentCondition | None, noise: jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(x, sigma) -> x with the given cells held at sigma; the identity without a condition.

    The identity keeps the unconditioned solve op-for-op what it is without conditioning support.
    """
    if latent_cond is None:
        return lambda x, sigma: x
    return lambda x, sigma: hold(x, latent_cond, noise, sigma)


def conditioned_end(
    x: jax.Array, traj: jax.Array | None, latent_cond: LatentCondition | None
) -> tuple[jax.Array, jax.Array | None]:
    """(final sample, trajectory) with the given cells set to the clean latents exactly.

    Held cells end at (1 - 0) x0 + 0 eps, equal only up to rounding; this makes them bitwise.
    """
    if latent_cond is None:
        return x, traj
    x = finish(x, latent_cond)
    if traj is not None and traj.shape[0]:
        traj = traj.at[-1].set(x)
    return x, traj


@dataclasses.dataclass(frozen=True)
class FlowSampler(LoopSampler):
    """Euler or Heun solver from sigma=1 to 0 with classifier-free guidance.

    `schedule` picks the sigma grid (see `flow.flow_schedule`): "linear" (shifted linspace(1, 0)),
    "diffusers_euler" (exactly diffusers' FlowMatchEulerDiscreteScheduler(shift=shift)) or
    "diffusers_unipc" (the grid of UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)).
    """

    num_steps: int = 30
    guidance: float = 4.0
    shift: float = 3.0
    solver: str = "euler"
    schedule: str = "linear"
    latent_conditioning = True

    def __post_init__(self):
        if self.solver not in ("euler", "heun"):
            raise ValueError(f"unknown solver {self.solver!r}; use 'euler' or 'heun'")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.schedule not in flow.FLOW_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {flow.FLOW_SCHEDULES}")

    def sigmas(self) -> jax.Array:
        """The decreasing noise levels visited, num_steps + 1 of them, ending at 0."""
        return jnp.asarray(flow.flow_schedule(self.num_steps, self.shift, self.schedule)[0])

    def _solve(self, denoiser, params, noise, cond, rng, keep, latent_cond=None):
        sigmas, timesteps = flow.flow_schedule(self.num_steps, self.shift, self.schedule)
        k, x0 = conditioned_start(noise, latent_cond, sigmas)
        # Heun's second evaluation is at the next grid point: its timestep, 0 after the last one.
        t_next = jnp.concatenate([jnp.asarray(timesteps[1:]), jnp.zeros((1,), jnp.float32)])
        xs = (jnp.asarray(sigmas[:-1]), jnp.asarray(sigmas[1:]), jnp.asarray(timesteps), t_next)
        xs = tuple(a[k:] for a in xs)  # SDEdit starts part-way down the grid (k = 0 otherwise)
        held = holder(latent_cond, noise)

        def step(x, per_step):
            s, s_next, t, tn = per_step
            v = guided_prediction(denoiser, params, x, network_timesteps(latent_cond, t), cond, self.guidance)
            x_euler = held(x + (s_next - s) * v, s_next)
            if self.solver == "euler":
                return x_euler

            def heun(_):
                v_next = guided_prediction(denoiser, params, x_euler, network_timesteps(latent_cond, tn), cond,
                                           self.guidance)
                return held(x + (s_next - s) * 0.5 * (v + v_next), s_next)

            # Heun averages the slopes at both ends, except on the last step into sigma=0, where the
            # slope is undefined; lax.cond skips that network call instead of computing and discarding it.
            return jax.lax.cond(s_next > 0, heun, lambda _: x_euler, None)

        return conditioned_end(*scan_steps(step, x0, xs, (lambda x: x) if keep else None), latent_cond)


FLOW_SOLVERS = ("euler", "heun", "unipc")


def make_flow_sampler(solver: str, **fields: Any) -> LoopSampler:
    """A flow sampler by solver name: FlowSampler for 'euler'/'heun', UniPCSampler for 'unipc'."""
    if solver == "unipc":
        from sora_jax.diffusion.unipc import UniPCSampler  # unipc builds on this module: import late

        return UniPCSampler(**fields)
    if solver in ("euler", "heun"):
        return FlowSampler(solver=solver, **fields)
    raise ValueError(f"unknown solver {solver!r}; use one of {FLOW_SOLVERS}")


def sampler_for_run(
    sample: dict, objective: dict | None = None, *, solver: str | None = None, steps: int | None = None,
    guidance: float | None = None, num_tokens: int | None = None, diffusers_grid: bool = False,
) -> LoopSampler:
    """The sampler a run's `sample` settings and training objective call for, any field overridden.

    `sample` holds solver ("auto": euler for flow, ddim for DDPM), steps, guidance, shift and
    optionally shift_by_resolution/shift_base_tokens (then the flow shift scales to `num_tokens`);
    `objective` is run.json's {"kind": "flow"|"ddpm", ...DDPMObjective fields}. `diffusers_grid`
    uses diffusers' Wan scheduler grids (converted pipelines).
    """
    objective = objective or {"kind": "flow"}  # runs from before DDPM support: flow
    ddpm_run = objective["kind"] == "ddpm"
    solver = solver or sample["solver"]
    if solver == "auto":
        solver = "ddim" if ddpm_run else "euler"
    guidance = sample["guidance"] if guidance is None else guidance
    num_steps = steps or sample["steps"]
    if ddpm_run != (solver == "ddim"):
        raise ValueError(
            f"solver {solver!r} does not fit a model trained with the {objective['kind']} objective; use "
            + ("--sampler ddim" if ddpm_run else "--sampler euler, heun or unipc"))
    if ddpm_run:
        from sora_jax.diffusion.ddim import DDIMSampler  # ddim builds on this module: import late
        from sora_jax.diffusion.ddpm import DDPMObjective

        fields = {k: v for k, v in objective.items() if k != "kind"}
        return DDIMSampler(num_steps=num_steps, guidance=guidance, objective=DDPMObjective(**fields))
    shift = sample["shift"]
    if sample.get("shift_by_resolution", False) and num_tokens:
        shift = flow.resolution_shift(num_tokens, int(sample["shift_base_tokens"]), float(shift))
    kw: dict[str, Any] = dict(num_steps=num_steps, shift=shift)
    if diffusers_grid:
        # diffusers' grids: FlowMatchEulerDiscreteScheduler(shift) for Euler/Heun, UniPC's flow sigmas;
        # WanPipeline runs without guidance (conditional branch only) whenever guidance <= 1.
        kw["schedule"] = "diffusers_unipc" if solver == "unipc" else "diffusers_euler"
        guidance = max(guidance, 1.0)
    return make_flow_sampler(solver, guidance=guidance, **kw)
