"""3D PatchGAN discriminator for adversarial VAE training, and its hinge losses.

A video [B, T, H, W, 3] in [-1, 1] becomes one logit per spacetime patch [B, T, H/2^n, W/2^n]
(n = `num_layers`): pix2pix's PatchGAN with 3D kernels, so each logit judges the texture and
short-range motion of one receptive field rather than the whole clip.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.vae_blocks import Conv, torch_like_init


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Hyper-parameters of the 3D PatchGAN discriminator."""

    channels: int = 64  # width of the first conv; doubles per strided layer up to max_mult x
    num_layers: int = 3  # stride-2 (spatial) convs: logits are H/2^n x W/2^n per frame
    max_mult: int = 8
    temporal_kernel: int = 3  # odd; time is never strided, so every frame gets its own logits
    num_groups: int = 8  # GroupNorm groups (clamped to the channel count)
    negative_slope: float = 0.2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.channels < 1 or self.max_mult < 1:
            raise ValueError(
                f"discriminator needs num_layers, channels, max_mult >= 1, got "
                f"{self.num_layers}, {self.channels}, {self.max_mult}"
            )
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(f"discriminator temporal_kernel must be odd, got {self.temporal_kernel}")

    def width(self, layer: int) -> int:
        """Channels after strided conv `layer` (0-based); layer=num_layers: the stride-1 conv before the logits."""
        return self.channels * min(2**layer, self.max_mult)

    def logits_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, h, w) of the logits for a [T, H, W, 3] clip; ValueError if H or W does not divide."""
        f = 2**self.num_layers
        if height % f or width % f:
            raise ValueError(
                f"discriminator with num_layers={self.num_layers} needs H and W divisible by {f}, "
                f"got {height}x{width}; change data.crop_size or disc.num_layers"
            )
        return frames, height // f, width // f


def _norm(cfg: DiscriminatorConfig, features: int, name: str) -> nn.GroupNorm:
    # GroupNorm rather than PatchGAN's BatchNorm: no running statistics to carry in the train state
    # and no cross-device batch reductions; statistics cover all of (T, H, W) within a group.
    groups = math.gcd(cfg.num_groups, features)
    return nn.GroupNorm(
        num_groups=groups, epsilon=1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class PatchDiscriminator3D(nn.Module):
    """Video [B, T, H, W, 3] -> per-patch real/fake logits [B, T, H/2^n, W/2^n] (float32)."""

    cfg: DiscriminatorConfig

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        """Score every spacetime patch of a batch of clips."""
        c = self.cfg
        c.logits_shape(*video.shape[1:4])
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        pt = c.temporal_kernel // 2
        # Plain (symmetric) conv3d, not causal: the discriminator only ever sees whole training
        # crops, never a frame stream, so looking at both temporal neighbours costs nothing.
        down = dict(strides=(1, 2, 2), padding=((pt, pt), (1, 1), (1, 1)), **kw)  # 4x4 s2 p1: H -> H/2
        same = dict(strides=(1, 1, 1), padding=((pt, pt), (1, 1), (1, 1)), **kw)  # 3x3 s1 p1: H -> H
        x = nn.with_logical_constraint(video, ("batch", None, None, None, None))
        x = Conv(c.width(0), (c.temporal_kernel, 4, 4), name="conv_in", **down)(x)
        x = nn.leaky_relu(x, c.negative_slope)  # no norm on the first layer, as in PatchGAN
        for i in range(1, c.num_layers):
            x = Conv(c.width(i), (c.temporal_kernel, 4, 4), name=f"down_{i}", **down)(x)
            x = nn.leaky_relu(_norm(c, c.width(i), f"norm_{i}")(x), c.negative_slope)
        x = Conv(c.width(c.num_layers), (c.temporal_kernel, 3, 3), name="conv_mid", **same)(x)
        x = nn.leaky_relu(_norm(c, c.width(c.num_layers), "norm_mid")(x), c.negative_slope)
        logits = Conv(1, (c.temporal_kernel, 3, 3), name="conv_out", **same)(x)
        return logits[..., 0].astype(jnp.float32)  # [B, T, H/2^n, W/2^n]


def init_discriminator_variables(cfg: DiscriminatorConfig, rng: jax.Array) -> dict[str, Any]:
    """`PatchDiscriminator3D(cfg).init` (boxed with logical names) from one uniform draw.

    As `init_vae_variables`: flax derives a threefry key per parameter and XLA:CPU compiles each
    derivation separately; one draw for all kernels keeps init compile time flat.
    """
    s = 2**cfg.num_layers
    dummy = jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.float32)
    abstract = jax.eval_shape(PatchDiscriminator3D(cfg).init, rng, dummy)
    return torch_like_init(abstract, rng)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    real = jnp.mean(jax.nn.relu(1.0 - real_logits.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + fake_logits.astype(jnp.float32)))
    return real + fake


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """Generator hinge loss: -mean(D(fake))."""
    return -jnp.mean(fake_logits.astype(jnp.float32))
