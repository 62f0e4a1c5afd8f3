"""Building blocks of the causal 3D VAE (Wan2.1 `AutoencoderKLWan` layout, channels-last).

Two modes, same weights, same numbers:
- whole clip (default): every block sees `[batch, frames, height, width, channels]` at once; a causal
  conv zero-pads 2 frames on the past side and the temporal resamplers treat frame 0 the way the
  first chunk is treated;
- streaming: when the caller makes the `cache` collection mutable (see `models/vae_codec.py`), every
  causal conv keeps the last frames of its input in `cache` and the temporal resamplers keep theirs,
  so a clip can be fed chunk by chunk (encoder: frame 0, then 4 frames; decoder: one latent frame at
  a time), as diffusers does with its feature caches, in memory that does not grow with length.
The first chunk is the call that finds no cache yet.

Module names mirror diffusers (`resnets_0` <-> `resnets.0`) so converting a safetensors checkpoint
is a mechanical rename.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from sora_jax.models.attention import attention

Dtype = jnp.dtype


def _kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = taps x in_channels.

    Drawn with the `rbg` generator because XLA:CPU spends ~0.5 s compiling each threefry draw: the
    tiny `model.init` compiled in ~70 s with threefry, ~12 s with this (flax's per-parameter key
    derivations remain; `vae.init_vae_variables` avoids those too).
    """
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = data.reshape(-1).astype(jnp.uint32)
    # rbg keys hold 4 words; derive them deterministically from whatever key flax hands us.
    words = jnp.concatenate([data, data * jnp.uint32(0x9E3779B9) + jnp.uint32(1)])[:4]
    rbg_key = jax.random.wrap_key_data(words, impl="rbg")
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(rbg_key, shape, jnp.float32, -bound, bound).astype(dtype)


def torch_like_init(abstract: dict[str, Any], rng: jax.Array, ones: tuple[str, ...] = ("gamma", "scale")) -> dict[str, Any]:
    """Fill boxed abstract conv-net params: PyTorch-default uniform kernels, ones for norm scales, zeros else.

    Equivalent in distribution to `module.init`, but every kernel comes from one uniform draw:
    flax derives one threefry key per parameter and XLA:CPU compiles each derivation separately
    (tens of seconds for ~100 convs).
    """
    flat = traverse_util.flatten_dict(abstract["params"])
    sizes = [math.prod(box.value.shape) for path, box in flat.items() if path[-1] == "kernel"]
    draw = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, offset = {}, 0
    for path, box in flat.items():
        shape, dtype = box.value.shape, box.value.dtype
        if path[-1] == "kernel":
            n = math.prod(shape)
            # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = taps x in_channels.
            value = draw[offset : offset + n].reshape(shape) / math.sqrt(math.prod(shape[:-1]))
            offset += n
        elif path[-1] in ones:
            value = jnp.ones(shape)
        else:
            value = jnp.zeros(shape)
        out[path] = box.replace_boxed(value.astype(dtype))
    return {"params": traverse_util.unflatten_dict(out)}


def streaming(module: nn.Module) -> bool:
    """True when the caller feeds chunks and carries the `cache` collection between them."""
    return module.is_mutable_collection("cache") and not module.is_initializing()


def _conv_param_names(ndim_spatial: int) -> tuple[str, ...]:
    return (None,) * ndim_spatial + ("conv_in", "conv_out")


class Conv(nn.Module):
    """N-d convolution over the trailing spatial axes; `padding` is explicit (lo, hi) per axis.

    With 2 spatial axes the leading axes (batch, frames) are all batch: a per-frame 2D conv.
    `impl` picks how a 3D conv is lowered: "xla" (one 3D convolution) or "sum_time" (see
    `conv3d_sum_time`); same parameters and, up to rounding, same numbers.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: Sequence[tuple[int, int]] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the convolution to a channels-last array."""
        nd = len(self.kernel_size)
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_kernel_init, _conv_param_names(nd)),
            (*self.kernel_size, in_features, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            (self.features,),
            self.param_dtype,
        )
        padding = tuple(self.padding or ((0, 0),) * nd)
        if nd == 3 and padding[0][0] > 0 and streaming(self):
            # The past-side zero padding becomes the previous chunk's last input frames.
            past = padding[0][0]
            cache = self.variable("cache", "past", jnp.zeros, (x.shape[0], past, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.value, x.astype(cache.value.dtype)], axis=1)
            cache.value = x[:, -past:]
            padding = ((0, padding[0][1]), *padding[1:])
        strides = tuple(self.strides or (1,) * nd)
        batch_shape = x.shape[: x.ndim - nd - 1]
        x = x.reshape((-1, *x.shape[x.ndim - nd - 1 :])).astype(self.dtype)
        if nd == 3 and self.impl == "sum_time":
            y = conv3d_sum_time(x, kernel.astype(self.dtype), strides, padding)
        else:
            spatial = "DHW"[3 - nd :]
            y = lax.conv_general_dilated(
                x,
                kernel.astype(self.dtype),
                window_strides=strides,
                padding=padding,
                dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
            )
        y = y + bias.astype(self.dtype)
        return y.reshape((*batch_shape, *y.shape[1:]))


def conv3d_sum_time(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Sequence[tuple[int, int]]
) -> jax.Array:
    """A [N, T, H, W, C] x [kt, kh, kw, C, O] conv as the sum over time taps of per-frame 2D convs.

    Same result as the 3D conv up to float summation order. Why: XLA:CPU (jaxlib 0.10) lowers
    3-spatial-dim convolutions to a generic loop nest but 2D ones to YNNPACK kernels: the VAE runs
    2.2-2.6x faster on a small config, 1.1-1.25x at Wan2.1 width (docs/benchmarks.md). 1x1
    spatial taps become plain matmuls.
    """
    kt = kernel.shape[0]
    st, sh, sw = strides
    (pt_lo, pt_hi), ph, pw = padding
    if (pt_lo, pt_hi) != (0, 0):
        x = jnp.pad(x, ((0, 0), (pt_lo, pt_hi), (0, 0), (0, 0), (0, 0)))
    n, t_in = x.shape[:2]
    t_out = (t_in - kt) // st + 1
    out = None
    for k in range(kt):
        tap = lax.slice_in_dim(x, k, k + st * (t_out - 1) + 1, st, axis=1)  # [N, t_out, H, W, C]
        w = kernel[k]  # [kh, kw, C, O]
        if w.shape[:2] == (1, 1) and (sh, sw) == (1, 1) and tuple(ph) == tuple(pw) == (0, 0):
            y = jnp.einsum("nthwc,co->nthwo", tap, w[0, 0])  # [N, t_out, H, W, O]
        else:
            y = lax.conv_general_dilated(
                tap.reshape(n * t_out, *tap.shape[2:]), w, (sh, sw), (tuple(ph), tuple(pw)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            y = y.reshape(n, t_out, *y.shape[1:])
        out = y if out is None else out + y
    return out


def causal_conv3d(
    features: int,
    kernel: int | tuple[int, int, int],
    padding: int | tuple[int, int, int] = 0,
    strides: tuple[int, int, int] = (1, 1, 1),
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    impl: str = "xla",
    name: str | None = None,
) -> Conv:
    """`WanCausalConv3d`: time padding 2*p on the past side only, spatial padding p on both sides."""
    k = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
    p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    pads = ((2 * p[0], 0), (p[1], p[1]), (p[2], p[2]))
    return Conv(features, k, strides, pads, dtype=dtype, param_dtype=param_dtype, impl=impl, name=name)


class RMSNorm(nn.Module):
    """`WanRMS_norm`: L2-normalise over channels, times sqrt(C) * gamma (+ bias); float32 math."""

    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise the last axis."""
        dim = x.shape[-1]
        gamma = self.param(
            "gamma",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (dim,),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        # F.normalize divides by max(||x||, 1e-12); sqrt(max(sumsq, 1e-24)) is the same number.
        inv = lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), 1e-24))
        y = x32 * inv * (dim**0.5) * gamma.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                (dim,),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class ResidualBlock(nn.Module):
    """`WanResidualBlock`: (RMSNorm, SiLU, causal 3x3x3 conv) x2 plus a 1x1x1 shortcut if C changes."""

    out_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # lowering of 3D convs, see `Conv.impl`

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Apply the block to [B, T, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(kw, impl=self.conv_impl)
        if x.shape[-1] != self.out_dim:
            h = causal_conv3d(self.out_dim, 1, name="conv_shortcut", **ckw)(x)
        else:
            h = x
        x = nn.silu(RMSNorm(name="norm1", **kw)(x))
        x = causal_conv3d(self.out_dim, 3, 1, name="conv1", **ckw)(x)
        x = nn.silu(RMSNorm(name="norm2", **kw)(x))
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = causal_conv3d(self.out_dim, 3, 1, name="conv2", **ckw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """`WanAttentionBlock`: single-head self-attention within each frame (no mixing across time)."""

    backend: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to [B, T, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, hh, ww, c = x.shape
        y = RMSNorm(name="norm", **kw)(x)
        qkv = Conv(3 * c, (1, 1), name="to_qkv", **kw)(y)
        qkv = qkv.reshape(b * t, hh * ww, 1, 3 * c)  # frames are independent batch entries
        q, k, v = jnp.split(qkv, 3, axis=-1)
        y = attention(q, k, v, backend=self.backend).reshape(b, t, hh, ww, c)
        y = Conv(c, (1, 1), name="proj", **kw)(y)
        return y + x


class Resample(nn.Module):
    """`WanResample` (Wan2.1 modes): spatial x2 down/up per frame, plus a causal time x2 for the 3d modes."""

    dim: int
    mode: str  # downsample2d | downsample3d | upsample2d | upsample3d
    upsample_out_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # lowering of 3D convs, see `Conv.impl`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Resample [B, T, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(kw, impl=self.conv_impl)
        if self.mode == "upsample3d":
            x = self._time_upsample(x, ckw)
        if self.mode.startswith("upsample"):
            out_dim = self.upsample_out_dim or self.dim // 2
            # nearest-exact with an exact factor 2 is a plain repeat; diffusers does it in float32.
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            x = Conv(out_dim, (3, 3), padding=((1, 1), (1, 1)), name="resample_1", **kw)(x)
        elif self.mode.startswith("downsample"):
            # ZeroPad2d((0, 1, 0, 1)) then a valid stride-2 conv: pad right/bottom only.
            x = Conv(self.dim, (3, 3), (2, 2), ((0, 1), (0, 1)), name="resample_1", **kw)(x)
        else:
            raise ValueError(f"unknown resample mode {self.mode!r}")
        if self.mode == "downsample3d":
            x = self._time_downsample(x, ckw)
        return x

    def _time_downsample(self, x: jax.Array, kw: dict) -> jax.Array:
        # Chunked diffusers passes the first chunk (frame 0) through untouched and then runs the
        # stride-2 kernel-3 conv over [last cached frame, new chunk]; over the whole clip that is
        # frame 0 followed by a valid strided conv starting at frame 0.
        conv = causal_conv3d(self.dim, (3, 1, 1), 0, (2, 1, 1), name="time_conv", **kw)
        if streaming(self):
            if not self.has_variable("cache", "time_past"):
                self.variable("cache", "time_past", lambda: x[:, -1:])
                return x
            cache = self.variable("cache", "time_past")
            y = conv(jnp.concatenate([cache.value, x], axis=1))
            cache.value = x[:, -1:]
            return y
        if x.shape[1] < 3:
            if self.is_initializing():
                conv(jnp.zeros((*x.shape[:1], 3, *x.shape[2:]), x.dtype))
            return x[:, :1]
        return jnp.concatenate([x[:, :1], conv(x)], axis=1)

    def _time_upsample(self, x: jax.Array, kw: dict) -> jax.Array:
        # The first latent frame is never time-upsampled (diffusers marks its cache "Rep"); the
        # later frames go through a causal conv whose past starts with zeros, not with frame 0,
        # and each yields two output frames (channel halves) that are interleaved in time.
        b, t, hh, ww, c = x.shape
        if streaming(self):
            if not self.has_variable("cache", "time_past"):
                self.variable("cache", "time_past", jnp.zeros, (b, 2, hh, ww, c), x.dtype)
                return x
            cache = self.variable("cache", "time_past")
            x = jnp.concatenate([cache.value, x], axis=1)
            cache.value = x[:, -2:]
            y = Conv(2 * c, (3, 1, 1), name="time_conv", **kw)(x)  # past already prepended
            return _interleave_halves(y).astype(x.dtype)
        conv = causal_conv3d(2 * c, (3, 1, 1), (1, 0, 0), name="time_conv", **kw)
        if t == 1:
            if self.is_initializing():
                conv(x)
            return x
        y = _interleave_halves(conv(x[:, 1:]))
        return jnp.concatenate([x[:, :1], y.astype(x.dtype)], axis=1)


def _interleave_halves(y: jax.Array) -> jax.Array:
    """[B, t, H, W, 2C] -> [B, 2t, H, W, C]: channel half k of frame i becomes frame 2i+k."""
    b, t, hh, ww, c2 = y.shape
    y = y.reshape(b, t, hh, ww, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)  # [B, t, 2, H, W, C]
    return y.reshape(b, 2 * t, hh, ww, c2 // 2)


class MidBlock(nn.Module):
    """`WanMidBlock`: resnet, per-frame attention, resnet."""

    dim: int
    dropout: float = 0.0
    backend: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # lowering of 3D convs, see `Conv.impl`

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Apply the block to [B, T, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rkw = dict(kw, conv_impl=self.conv_impl)
        x = ResidualBlock(self.dim, self.dropout, name="resnets_0", **rkw)(x, deterministic)
        x = AttentionBlock(self.backend, name="attentions_0", **kw)(x)
        return ResidualBlock(self.dim, self.dropout, name="resnets_1", **rkw)(x, deterministic)


class UpBlock(nn.Module):
    """`WanUpBlock`: num_res_blocks+1 resnets, then an optional upsampler (`upsamplers_0`)."""

    out_dim: int
    num_res_blocks: int
    upsample_mode: str | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # lowering of 3D convs, see `Conv.impl`

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Apply the block to [B, T, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rkw = dict(kw, conv_impl=self.conv_impl)
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.out_dim, self.dropout, name=f"resnets_{j}", **rkw)(x, deterministic)
        if self.upsample_mode is not None:
            x = Resample(self.out_dim, self.upsample_mode, name="upsamplers_0", **rkw)(x)
        return x
