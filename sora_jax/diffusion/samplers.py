"""Jitted flow-matching samplers: the whole solve is one `lax.fori_loop` inside one jit."""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from sora_jax.diffusion import flow


class Denoiser(Protocol):
    """A hashable callable (params, x_t, t, text, text_mask) -> velocity."""

    def __call__(self, params, x, t, text, text_mask) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Text embeddings for the prompt and for the unconditional (empty) prompt."""

    text: jax.Array  # [batch, text_len, text_dim]
    text_mask: jax.Array  # [batch, text_len]
    null_text: jax.Array  # [batch, text_len, text_dim]
    null_mask: jax.Array  # [batch, text_len]


jax.tree_util.register_dataclass(
    Conditioning, data_fields=["text", "text_mask", "null_text", "null_mask"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class FlowSampler:
    """Euler or Heun solver from sigma=1 to 0 with classifier-free guidance."""

    num_steps: int = 30
    guidance: float = 4.0
    shift: float = 3.0
    solver: str = "euler"

    def __post_init__(self):
        if self.solver not in ("euler", "heun"):
            raise ValueError(f"unknown solver {self.solver!r}; use 'euler' or 'heun'")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")

    def sigmas(self) -> jax.Array:
        """The decreasing noise levels visited, num_steps + 1 of them, ending at 0."""
        return flow.shift_sigmas(jnp.linspace(1.0, 0.0, self.num_steps + 1), self.shift)

    def _velocity(self, denoiser: Denoiser, params, x, sigma, cond: Conditioning) -> jax.Array:
        b = x.shape[0]
        t = jnp.full((b,), sigma * flow.TIME_SCALE, jnp.float32)
        if self.guidance == 1.0:
            return denoiser(params, x, t, cond.text, cond.text_mask)
        # One network call on [cond; uncond] halves the number of sequential launches.
        v = denoiser(
            params,
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([cond.text, cond.null_text]),
            jnp.concatenate([cond.text_mask, cond.null_mask]),
        )
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + self.guidance * (v_cond - v_uncond)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def __call__(self, denoiser: Denoiser, params, noise: jax.Array, cond: Conditioning) -> jax.Array:
        """Integrate the probability-flow ODE from pure noise to a clean latent."""
        sigmas = self.sigmas()

        def step(i, x):
            s, s_next = sigmas[i], sigmas[i + 1]
            v = self._velocity(denoiser, params, x, s, cond)
            x_euler = x + (s_next - s) * v
            if self.solver == "euler":
                return x_euler
            # Heun: average the slopes at both ends, except for the last step into sigma=0.
            v_next = self._velocity(denoiser, params, x_euler, s_next, cond)
            x_heun = x + (s_next - s) * 0.5 * (v + v_next)
            return jnp.where(s_next > 0, x_heun, x_euler)

        return jax.lax.fori_loop(0, self.num_steps, step, noise.astype(jnp.float32))
