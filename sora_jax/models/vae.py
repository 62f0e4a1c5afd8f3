"""Causal 3D VAE: video [B, T, H, W, 3] in [-1, 1] <-> latent [B, 1+(T-1)/4, H/8, W/8, z_dim].

`VAEConfig.wan21()` is exactly diffusers' `AutoencoderKLWan` (Wan2.1); smaller configs of the same
code train from scratch. `encode`/`decode` process the whole clip in one pass with the same outputs
as diffusers' chunked, feature-cached path; `vae_codec` runs the same modules chunk by chunk (and
tile by tile) when memory must not grow with the video.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.vae_blocks import (
    AttentionBlock,
    MidBlock,
    Resample,
    ResidualBlock,
    RMSNorm,
    UpBlock,
    causal_conv3d,
    torch_like_init,
)

CONV_IMPLS = ("auto", "xla", "sum_time")  # VAEConfig.conv_impl values

# diffusers' AutoencoderKLWan defaults: per-channel statistics of Wan2.1 latents.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the causal VAE (names follow diffusers' AutoencoderKLWan)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    # diffusers spells it `temperal_downsample`; the `temperal_downsample` property aliases it.
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    attention_backend: str = "xla"
    # How 3D convs are lowered: "xla" (3D convolutions), "sum_time" (per-frame 2D convs summed over
    # the time taps; 1.1-2.6x faster on XLA:CPU, docs/benchmarks.md) or "auto" (sum_time on CPU,
    # xla elsewhere).
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        # Lists from a ConfigDict / JSON would make the dataclass unhashable (jit static args).
        for f in ("dim_mult", "attn_scales", "temporal_downsample", "latents_mean", "latents_std"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(v))
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv_impl {self.conv_impl!r}; choose one of {', '.join(CONV_IMPLS)}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample has {len(self.temporal_downsample)} entries but dim_mult "
                f"{self.dim_mult} has {len(self.dim_mult) - 1} downsampling stages; give one bool per stage"
            )
        for f in ("latents_mean", "latents_std"):
            v = getattr(self, f)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(
                    f"{f} has {len(v)} values but z_dim is {self.z_dim}; give one per latent channel"
                )

    @property
    def conv_lowering(self) -> str:
        """The 3D-conv lowering the model traces with: `conv_impl` with "auto" resolved for this backend."""
        if self.conv_impl != "auto":
            return self.conv_impl
        # Only measured on XLA:CPU; GPU/TPU keep the native 3D convolution until benchmarked there.
        return "sum_time" if jax.default_backend() == "cpu" else "xla"

    @property
    def temperal_downsample(self) -> tuple[bool, ...]:
        """diffusers' spelling of `temporal_downsample`."""
        return self.temporal_downsample

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first)."""
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along height and width."""
        return 2 ** (len(self.dim_mult) - 1)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent [t, h, w, z_dim] of a valid video shape."""
        validate_video_shape(self, frames, height, width)
        s = self.spatial_factor
        return 1 + (frames - 1) // self.temporal_factor, height // s, width // s, self.z_dim

    @classmethod
    def wan21(cls, **overrides: Any) -> "VAEConfig":
        """Exactly the Wan2.1 VAE (diffusers AutoencoderKLWan defaults)."""
        kw = dict(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
        return cls(**{**kw, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "VAEConfig":
        """Small config for tests and demos; keeps the 4x temporal and 8x spatial compression."""
        kw = dict(base_dim=16, z_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
        return cls(**{**kw, **overrides})

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **overrides: Any) -> "VAEConfig":
        """Build from an AutoencoderKLWan `config.json` dict (Wan2.1 layout only)."""
        base = config.get("base_dim", 96)
        wan21_values = {"is_residual": (False,), "patch_size": (None, 1), "decoder_base_dim": (None, base)}
        for key, ok in wan21_values.items():
            if config.get(key, ok[0]) not in ok:
                raise ValueError(
                    f"AutoencoderKLWan {key}={config[key]!r} (Wan2.2 layout) is not supported; only Wan2.1"
                )
        kw = dict(
            base_dim=config.get("base_dim", 96),
            z_dim=config.get("z_dim", 16),
            dim_mult=tuple(config.get("dim_mult", (1, 2, 4, 4))),
            num_res_blocks=config.get("num_res_blocks", 2),
            attn_scales=tuple(config.get("attn_scales", ())),
            temporal_downsample=tuple(config.get("temperal_downsample", (False, True, True))),
            dropout=config.get("dropout", 0.0),
            latents_mean=tuple(config["latents_mean"]) if config.get("latents_mean") else None,
            latents_std=tuple(config["latents_std"]) if config.get("latents_std") else None,
        )
        return cls(**{**kw, **overrides})


def validate_video_shape(cfg: VAEConfig, frames: int, height: int, width: int) -> None:
    """Raise a one-line ValueError unless the VAE can encode a video of this shape."""
    tf, s = cfg.temporal_factor, cfg.spatial_factor
    if frames < 1 or (frames - 1) % tf:
        fix = 1 + tf * max(0, -(-(frames - 1) // tf))
        examples = ", ".join(str(1 + tf * i) for i in range(5))
        raise ValueError(
            f"frame count {frames} cannot be encoded by the causal VAE: it needs {tf}k+1 frames "
            f"({examples}, ...); use {fix}"
        )
    if height < s or width < s or height % s or width % s:
        lo = f"{max(s, height // s * s)}x{max(s, width // s * s)}"
        hi = f"{-(-height // s) * s}x{-(-width // s) * s}"
        raise ValueError(
            f"height/width must be multiples of {s}; got {height}x{width}: crop/resize to {lo} or pad to {hi}"
        )


def _stat(values: tuple[float, ...], dtype: Any) -> jax.Array:
    return jnp.asarray(values, dtype=dtype)


def normalize_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """(z - latents_mean) / latents_std over the channel axis; identity when the stats are None."""
    if cfg.latents_mean is None or cfg.latents_std is None:
        return z
    return (z - _stat(cfg.latents_mean, z.dtype)) / _stat(cfg.latents_std, z.dtype)


def denormalize_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """Inverse of `normalize_latents`."""
    if cfg.latents_mean is None or cfg.latents_std is None:
        return z
    return z * _stat(cfg.latents_std, z.dtype) + _stat(cfg.latents_mean, z.dtype)


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., 2z] encoder moments -> (mean, logvar) with logvar clipped to [-30, 20] as diffusers does."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over all non-batch elements: shape [batch]."""
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).mean(axis=-1)


class Encoder3d(nn.Module):
    """`WanEncoder3d` (Wan2.1): conv_in, flat down_blocks list, mid_block, norm_out, conv_out."""

    cfg: VAEConfig
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """[B, T, H, W, 3] -> [B, t, h, w, out_channels]."""
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        ckw, rkw = dict(kw, impl=cfg.conv_lowering), dict(kw, conv_impl=cfg.conv_lowering)
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        x = causal_conv3d(dims[0], 3, 1, name="conv_in", **ckw)(x)
        k, scale = 0, 1.0
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, cfg.dropout, name=f"down_blocks_{k}", **rkw)(x, deterministic)
                k += 1
                if scale in cfg.attn_scales:
                    x = AttentionBlock(cfg.attention_backend, name=f"down_blocks_{k}", **kw)(x)
                    k += 1
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                x = Resample(out_dim, mode, name=f"down_blocks_{k}", **rkw)(x)
                k += 1
                scale /= 2.0
        x = MidBlock(dims[-1], cfg.dropout, cfg.attention_backend, name="mid_block", **rkw)(x, deterministic)
        x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
        return causal_conv3d(self.out_channels, 3, 1, name="conv_out", **ckw)(x)


class Decoder3d(nn.Module):
    """`WanDecoder3d` (Wan2.1): conv_in, mid_block, up_blocks, norm_out, conv_out."""

    cfg: VAEConfig
    out_channels: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """[B, t, h, w, z_dim] -> [B, 1+4(t-1), 8h, 8w, out_channels] (unclamped)."""
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        ckw, rkw = dict(kw, impl=cfg.conv_lowering), dict(kw, conv_impl=cfg.conv_lowering)
        dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        x = causal_conv3d(dims[0], 3, 1, name="conv_in", **ckw)(x)
        x = MidBlock(dims[0], cfg.dropout, cfg.attention_backend, name="mid_block", **rkw)(x, deterministic)
        for i, out_dim in enumerate(dims[1:]):
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            up = UpBlock(out_dim, cfg.num_res_blocks, mode, cfg.dropout, name=f"up_blocks_{i}", **rkw)
            x = up(x, deterministic)
        x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
        return causal_conv3d(self.out_channels, 3, 1, name="conv_out", **ckw)(x)


class CausalVAE(nn.Module):
    """Wan-style causal video VAE; call `encode`, `decode` or the full autoencoder via `apply`."""

    cfg: VAEConfig

    def setup(self) -> None:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, impl=cfg.conv_lowering)
        self.encoder = Encoder3d(cfg, out_channels=2 * cfg.z_dim)
        self.quant_conv = causal_conv3d(2 * cfg.z_dim, 1, **kw)
        self.post_quant_conv = causal_conv3d(cfg.z_dim, 1, **kw)
        self.decoder = Decoder3d(cfg)

    def encode(self, video: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """video [B, T, H, W, 3] in [-1, 1] -> float32 (mean, logvar), each [B, 1+(T-1)/4, H/8, W/8, z]."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(
                f"video must be [batch, frames, height, width, 3]; got shape {tuple(video.shape)}"
            )
        validate_video_shape(self.cfg, *video.shape[1:4])
        return split_moments(self.encode_moments(video, deterministic))

    def encode_moments(self, video: jax.Array, deterministic: bool = True) -> jax.Array:
        """Unchecked encoder + quant_conv: [B, T, H, W, 3] -> float32 [B, t, h, w, 2z] (mean | logvar).

        Also the per-chunk call of the streaming codec, where T is 1 or `temporal_factor`.
        """
        x = nn.with_logical_constraint(video, ("batch", None, None, None, None))
        return self.quant_conv(self.encoder(x, deterministic)).astype(jnp.float32)

    def decode(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        """latent [B, t, h, w, z_dim] -> video [B, 1+4(t-1), 8h, 8w, 3] clamped to [-1, 1], float32."""
        if z.ndim != 5 or z.shape[-1] != self.cfg.z_dim:
            raise ValueError(
                f"latent must be [batch, frames, height, width, {self.cfg.z_dim}]; got shape {tuple(z.shape)}"
            )
        return jnp.clip(self.decode_unclamped(z, deterministic), -1.0, 1.0)

    def decode_unclamped(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        """Unchecked post_quant_conv + decoder, float32 and not clamped (tiles blend before clamping)."""
        z = nn.with_logical_constraint(z, ("batch", None, None, None, None))
        return self.decoder(self.post_quant_conv(z), deterministic).astype(jnp.float32)

    def __call__(
        self, video: jax.Array, sample_rng: jax.Array | None = None, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Autoencode: (recon, mean, logvar); z is sampled from the posterior when sample_rng is given."""
        mean, logvar = self.encode(video, deterministic)
        z = mean
        if sample_rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_rng, mean.shape, mean.dtype)
        return self.decode(z.astype(self.cfg.dtype), deterministic), mean, logvar


def init_vae_variables(cfg: VAEConfig, rng: jax.Array) -> dict[str, Any]:
    """Same as `CausalVAE(cfg).init` (boxed with logical names, same distributions) but fast to compile.

    `model.init` derives one threefry key per parameter and XLA:CPU compiles each derivation
    separately (tens of seconds for ~100 convs); here every kernel comes from one uniform draw.
    """
    s = cfg.spatial_factor
    dummy = jax.ShapeDtypeStruct((1, 1 + cfg.temporal_factor, s, s, 3), jnp.float32)
    return torch_like_init(jax.eval_shape(CausalVAE(cfg).init, rng, dummy), rng)
