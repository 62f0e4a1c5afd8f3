"""Small shared layers: logically named Dense, FP32 LayerNorm, RMSNorm, sinusoidal time embedding.

Every parameter carries logical axis names (see `sora_jax/parallel/rules.py`) so that a preset of
logical->mesh rules can shard it; names are given by the caller because the same Dense is an
up-projection in one place and a down-projection in another.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


def logical_param(module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...], axes: tuple, dtype: Dtype):
    """Create a parameter of `module` annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Dense(nn.Module):
    """Linear layer over the last axis whose kernel and bias carry logical axis names."""

    features: int
    kernel_axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply `x @ kernel + bias` in `dtype`."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, kernel)  # [..., features]
        if self.use_bias:
            bias = self.param(
                "bias",
                # A bias lives on the output axis, so it shares the kernel's output name.
                nn.with_logical_partitioning(self.bias_init, (self.kernel_axes[-1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class LayerNormFP32(nn.Module):
    """LayerNorm over the last axis computed (and returned) in float32, optional affine."""

    epsilon: float = 1e-6
    use_affine: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise `x` in float32; callers cast back after their own float32 modulation."""
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_affine:
            features = x.shape[-1]
            scale = self.param(
                "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                (features,), self.param_dtype,
            )
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                (features,), self.param_dtype,
            )
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale; statistics in float32."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Return `x / rms(x) * scale` in `dtype`."""
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding [batch, dim] of (fractional) timesteps [batch], as diffusers' Timesteps."""
    half = dim // 2
    # Same op order as diffusers (float32 exponent, then exp) so the two agree to the last bit.
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - downscale_freq_shift)
    freqs = jnp.exp(exponent)  # [half]
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]  # [batch, half]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb  # [batch, dim]
