"""T5 / umT5 encoder (inference only) in Flax Linen, numerically matching `transformers`.

`UMT5EncoderModel` (Wan2.1's text encoder) and `T5EncoderModel` differ only in where the
relative-position bias lives: umT5 has its own bias table in every layer, T5 one table in layer 0
shared by all layers (`T5Config.per_layer_position_bias`). Blocks are pre-norm with T5's RMSNorm,
attention logits are NOT scaled by 1/sqrt(d_kv) (the scale is folded into the weights at
pre-training), and the identical layers are scanned so their weights stack along a leading
`layers` axis (the converter in `sora_jax.convert.t5` stacks them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.layers import logical_param

Dtype = Any

# Activation names as transformers spells them (`dense_act_fn`); "gated-gelu" means gelu_new.
_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 / umT5 encoder (defaults: umT5-xxl as shipped with Wan2.1)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    per_layer_position_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in _ACTIVATIONS:
            raise ValueError(
                f"T5Config: feed_forward_proj={self.feed_forward_proj!r} is not supported; use "
                f"'gated-<act>' or '<act>' with <act> in {sorted(_ACTIVATIONS)}"
            )

    @property
    def is_gated(self) -> bool:
        """Whether the FFN is gated (wi_0 activation * wi_1 linear)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The FFN activation as transformers resolves it ('gated-gelu' -> tanh 'gelu_new')."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        """Width of the merged attention projections (num_heads * d_kv; need not equal d_model)."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, d: dict, **overrides: Any) -> "T5Config":
        """Build from a Hugging Face T5 / mT5 / umT5 `config.json` dict."""
        model_type = d.get("model_type")
        architectures = " ".join(d.get("architectures") or [])
        if model_type is None and not architectures:
            raise ValueError(
                "T5 config.json has neither 'model_type' nor 'architectures'; cannot tell T5 from umT5"
            )
        if model_type not in (None, "t5", "mt5", "umt5"):
            raise ValueError(f"config.json has model_type={model_type!r}; expected 't5', 'mt5' or 'umt5'")
        per_layer = model_type == "umt5" or (model_type is None and "UMT5" in architectures)
        try:
            kwargs = dict(
                vocab_size=int(d["vocab_size"]),
                d_model=int(d["d_model"]),
                d_kv=int(d["d_kv"]),
                d_ff=int(d["d_ff"]),
                num_layers=int(d["num_layers"]),
                num_heads=int(d["num_heads"]),
                relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
                relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
                # transformers' defaults differ: T5 "relu", umT5/mT5 "gated-gelu".
                feed_forward_proj=str(d.get("feed_forward_proj", "gated-gelu" if model_type in ("umt5", "mt5") else "relu")),
                layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
                per_layer_position_bias=per_layer,
            )
        except KeyError as e:
            raise ValueError(
                f"T5 config.json lacks key {e.args[0]!r}; pass a Hugging Face T5/umT5 encoder config"
            ) from None
        kwargs.update(overrides)
        return cls(**kwargs)


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bidirectional T5 relative-position bucket of every (query, key) pair, int32 `[q_len, k_len]`.

    Computed on the host in float32 exactly as transformers' `_relative_position_bucket` does (the
    log bucket is truncated toward zero), so boundary positions land in the same bucket.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # [q_len, k_len]
    half = num_buckets // 2  # one half per direction
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    is_small = distance < max_exact
    with np.errstate(divide="ignore"):  # distance 0 gives log(0); it is masked by is_small
        log_ratio = (
            np.log(distance.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact)
        )
    large = max_exact + np.where(is_small, 0.0, log_ratio).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(is_small, distance, large)).astype(np.int32)


_kernel_init = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    """T5 LayerNorm: scale only, no mean subtraction, no bias; variance accumulated in float32."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # transformers rounds to the weight's dtype before scaling when the weights are half precision.
        if jnp.dtype(self.param_dtype).itemsize < 4:
            y = y.astype(self.param_dtype)
        return (scale * y).astype(self.dtype)


class Linear(nn.Module):
    """Bias-free linear layer with a named kernel `[in, out]` (T5 has no biases anywhere)."""

    features: int
    axes: tuple[str, str]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = logical_param(self, "kernel", _kernel_init, (x.shape[-1], self.features), self.axes, self.param_dtype)
        return jnp.einsum("bti,io->bto", x.astype(self.dtype), kernel.astype(self.dtype))  # [batch, tokens, out]


def _bias_table(module: nn.Module, c: T5Config) -> jax.Array:
    """The `[buckets, num_heads]` relative-attention bias table.

    Named (None, None): it is tiny (32 x 64 for umT5-xxl) and the rules have no name for a
    per-head (not heads x head_dim) axis, so it is replicated.
    """
    return logical_param(
        module,
        "relative_attention_bias",
        _kernel_init,
        (c.relative_attention_num_buckets, c.num_heads),
        (None, None),
        c.param_dtype,
    )


def _position_bias(table: jax.Array, buckets: jax.Array) -> jax.Array:
    """Look the bucket grid up in a bias table: float32 `[heads, q_len, k_len]`."""
    bias = jnp.take(table, buckets, axis=0).astype(jnp.float32)  # [q_len, k_len, heads]
    return jnp.transpose(bias, (2, 0, 1))  # [heads, q_len, k_len]


class T5Block(nn.Module):
    """One pre-norm block: RMSNorm -> self-attention (+ relative bias) -> residual, RMSNorm -> FFN -> residual."""

    config: T5Config

    @nn.compact
    def __call__(
        self, x: jax.Array, keep: jax.Array, buckets: jax.Array, shared_bias: jax.Array | None
    ) -> tuple[jax.Array, None]:
        c = self.config
        b, t, _ = x.shape
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)

        h = RMSNorm(c.layer_norm_epsilon, name="attn_norm", **kw)(x)

        def heads(name: str) -> jax.Array:
            y = Linear(c.inner_dim, ("embed", "heads"), name=name, **kw)(h)
            return y.reshape(b, t, c.num_heads, c.d_kv)  # [batch, tokens, heads, head_dim]

        q, k, v = heads("q"), heads("k"), heads("v")
        bias = _position_bias(_bias_table(self, c), buckets) if c.per_layer_position_bias else shared_bias
        # No 1/sqrt(d_kv): T5 was pre-trained without it.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # [batch, heads, q_len, k_len]
        logits = logits + bias[None]  # bias: [1, heads, q_len, k_len]
        # Padded keys get the most negative float (not -inf) so even an all-pad row stays finite.
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)  # keep: [batch, 1, 1, k_len]
        probs = jax.nn.softmax(logits, axis=-1).astype(c.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [batch, q_len, heads, head_dim]
        ctx = ctx.reshape(b, t, c.inner_dim)  # [batch, tokens, heads*head_dim]
        x = x + Linear(c.d_model, ("heads", "embed"), name="o", **kw)(ctx)

        h = RMSNorm(c.layer_norm_epsilon, name="mlp_norm", **kw)(x)
        act = _ACTIVATIONS[c.activation]
        if c.is_gated:
            y = act(Linear(c.d_ff, ("embed", "mlp"), name="wi_0", **kw)(h))  # [batch, tokens, mlp]
            y = y * Linear(c.d_ff, ("embed", "mlp"), name="wi_1", **kw)(h)
        else:
            y = act(Linear(c.d_ff, ("embed", "mlp"), name="wi", **kw)(h))  # [batch, tokens, mlp]
        x = x + Linear(c.d_model, ("mlp", "embed"), name="wo", **kw)(y)  # [batch, tokens, embed]
        return x, None


class T5Encoder(nn.Module):
    """T5 / umT5 encoder returning the final-normed hidden state `[batch, tokens, d_model]`."""

    config: T5Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        c = self.config
        t = input_ids.shape[1]
        embedding = logical_param(
            self, "embedding", _kernel_init, (c.vocab_size, c.d_model), ("vocab", "embed"), c.param_dtype
        )
        x = jnp.take(embedding, input_ids, axis=0).astype(c.dtype)  # [batch, tokens, embed]
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        keep = attention_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1, k_len]
        buckets = jnp.asarray(
            relative_position_buckets(t, t, c.relative_attention_num_buckets, c.relative_attention_max_distance)
        )  # [q_len, k_len]
        # T5 computes the bias once (layer 0's table) and reuses it in every layer; umT5 layers own theirs.
        shared_bias = None if c.per_layer_position_bias else _position_bias(_bias_table(self, c), buckets)
        layers = nn.scan(
            T5Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(c, name="layers")(x, keep, buckets, shared_bias)
        return RMSNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype, name="final_norm")(x)
