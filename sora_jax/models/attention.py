"""The one attention entry point of sora_jax; the backend is a config string.

Every model calls `attention(q, k, v, mask, backend=...)`. A backend is a function with the same
signature registered in `_BACKENDS`, so blockwise / ring / ulysses implementations slot in without
touching the models.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, "jax.Array | None"], jax.Array]


def _padding_mask_4d(mask: jax.Array | None) -> jax.Array | None:
    """Key-padding mask [batch, kv_len] -> [batch, 1, 1, kv_len] for jax.nn.dot_product_attention."""
    return None if mask is None else mask.astype(bool)[:, None, None, :]


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """jax.nn.dot_product_attention lowered by XLA (any platform)."""
    return jax.nn.dot_product_attention(q, k, v, mask=_padding_mask_4d(mask), implementation="xla")


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """cuDNN fused attention (NVIDIA GPU only; bf16/fp16 inputs)."""
    return jax.nn.dot_product_attention(q, k, v, mask=_padding_mask_4d(mask), implementation="cudnn")


def _reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Explicit float32 softmax attention; slow and memory-hungry, the yardstick for the others."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum(
        "bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)
    ) * scale  # [batch, heads, q_len, kv_len]
    if mask is not None:
        logits = jnp.where(mask.astype(bool)[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))  # [batch, q_len, heads, head_dim]
    return out.astype(q.dtype)


_BACKENDS: dict[str, AttentionFn] = {"xla": _xla, "cudnn": _cudnn, "reference": _reference}

BACKENDS = tuple(_BACKENDS)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    backend: str = "xla",
) -> jax.Array:
    """Attention of q [b, q_len, heads, d] over k/v [b, kv_len, heads, d]; mask [b, kv_len], True = keep."""
    fn = _BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(_BACKENDS)}")
    if mask is not None and mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"attention mask shape {mask.shape} must be [batch, kv_len]={(k.shape[0], k.shape[1])}"
        )
    return fn(q, k, v, mask)
