"""BERT encoder (inference only) in Flax Linen, numerically matching `transformers.BertModel`.

Used as the frozen text encoder (all-MiniLM-L6-v2 by default). Parameters carry logical axis
names from `sora_jax.parallel.rules`; the identical layers are scanned so their weights are
stacked along a leading `layers` axis (the converter in `sora_jax.convert.bert` stacks them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.layers import logical_param

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}; fix the model's config.json"
            )

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, d: dict, **overrides: Any) -> "BertConfig":
        """Build from a Hugging Face BERT `config.json` dict (only absolute-position, GELU BERTs)."""
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(
                f"BERT config has hidden_act={act!r}; only exact 'gelu' is supported (use a standard BERT checkpoint)"
            )
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(
                f"BERT config has position_embedding_type={pos!r}; only 'absolute' is supported"
            )
        try:
            kwargs = dict(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                intermediate_size=int(d["intermediate_size"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 512)),
                type_vocab_size=int(d.get("type_vocab_size", 2)),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            )
        except KeyError as e:
            raise ValueError(
                f"BERT config.json lacks key {e.args[0]!r}; pass a Hugging Face BertModel config"
            ) from None
        kwargs.update(overrides)
        return cls(**kwargs)


_kernel_init = nn.initializers.normal(stddev=0.02)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (BERT's post-LN), cast back to the compute dtype."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = logical_param(self, "scale", nn.initializers.ones, (d,), ("norm",), self.param_dtype)
        bias = logical_param(self, "bias", nn.initializers.zeros, (d,), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Dense(nn.Module):
    """Linear layer with a named kernel `[in, out]` and bias `[out]`."""

    features: int
    axes: tuple[str, str]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = logical_param(
            self, "kernel", _kernel_init, (x.shape[-1], self.features), self.axes, self.param_dtype
        )
        bias = logical_param(
            self, "bias", nn.initializers.zeros, (self.features,), self.axes[1:], self.param_dtype
        )
        y = jnp.einsum("bli,io->blo", x.astype(self.dtype), kernel.astype(self.dtype))  # [batch, length, out]
        return y + bias.astype(self.dtype)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings followed by LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        init = _kernel_init
        word = logical_param(self, "word_embeddings", init, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        pos = logical_param(
            self, "position_embeddings", init, (c.max_position_embeddings, c.hidden_size), (None, "embed"), c.param_dtype
        )
        typ = logical_param(self, "token_type_embeddings", init, (c.type_vocab_size, c.hidden_size), (None, "embed"), c.param_dtype)
        length = input_ids.shape[1]
        x = (
            jnp.take(word, input_ids, axis=0)  # [batch, length, embed]
            + pos[None, :length]  # [1, length, embed]
            + jnp.take(typ, token_type_ids, axis=0)  # [batch, length, embed]
        )
        return LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="layer_norm")(x)


class BertLayer(nn.Module):
    """One post-LN transformer block: self-attention, add & norm, GELU FFN, add & norm."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array) -> tuple[jax.Array, None]:
        c = self.config
        b, length, _ = x.shape
        h, d = c.num_heads, c.head_dim
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)

        def heads(name: str) -> jax.Array:
            y = Dense(c.hidden_size, ("embed", "heads"), name=name, **kw)(x)
            return y.reshape(b, length, h, d)  # [batch, length, heads, head_dim]

        q, k, v = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # [batch, heads, q_len, k_len]
        logits = logits / jnp.sqrt(jnp.float32(d)) + mask_bias  # mask_bias: [batch, 1, 1, k_len]
        probs = jax.nn.softmax(logits, axis=-1).astype(c.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [batch, q_len, heads, head_dim]
        ctx = ctx.reshape(b, length, c.hidden_size)  # [batch, length, heads*head_dim]
        attn = Dense(c.hidden_size, ("heads", "embed"), name="attn_out", **kw)(ctx)
        x = LayerNorm(c.layer_norm_eps, name="attn_norm", **kw)(x + attn)

        y = Dense(c.intermediate_size, ("embed", "mlp"), name="mlp_in", **kw)(x)  # [batch, length, mlp]
        y = jax.nn.gelu(y, approximate=False)  # BERT uses the exact erf GELU
        y = Dense(c.hidden_size, ("mlp", "embed"), name="mlp_out", **kw)(y)  # [batch, length, embed]
        x = LayerNorm(c.layer_norm_eps, name="mlp_norm", **kw)(x + y)
        return x, None


class BertEncoder(nn.Module):
    """BERT encoder returning the last hidden state `[batch, length, hidden]`."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids)  # [batch, length, embed]
        # Additive mask like transformers: padded keys get the most negative float, so a fully
        # padded row still softmaxes to finite values.
        keep = attention_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1, k_len]
        mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        layers = nn.scan(
            BertLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(c, name="layers")(x, mask_bias)
        return x
