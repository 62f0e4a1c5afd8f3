"""The one attention entry point of sora_jax; the backend is a config string.

Every model calls `attention(q, k, v, mask, backend=...)` with q [batch, q_len, heads, head_dim],
k/v [batch, kv_len, heads, head_dim] and an optional key-padding mask [batch, kv_len] (True = keep).

Backends:
  xla        jax.nn.dot_product_attention lowered by XLA (any platform).
  cudnn      cuDNN fused attention (GPU only; bf16/fp16). Key padding must be trailing (as text
             and batched videos are padded); an example with any other mask comes back NaN.
  splash     TPU Pallas splash attention (TPU only; Pallas interpret mode elsewhere, for tests).
  blockwise  flash-style online softmax over key/value blocks with `lax.scan` and a hand-written
             backward pass: O(length) memory on any platform.
  ring       sequence parallel over the mesh's `sequence` axis: each device keeps its query block
             and K/V blocks travel around the ring (`ppermute`), merged by online softmax.
  ulysses    sequence parallel (DeepSpeed-Ulysses): all-to-all from sequence- to head-sharded,
             local blockwise attention over the full sequence, all-to-all back.
  reference  explicit float32 softmax; the yardstick for the others.

ring and ulysses take the mesh from `jax.set_mesh(...)` (as the trainers do) and fall back to
blockwise when there is no `sequence` axis larger than 1. They parallelise self-attention only:
cross-attention (q_len != kv_len, i.e. short replicated text keys) goes to xla.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

SEQUENCE_AXIS = "sequence"
DEFAULT_Q_BLOCK = 512
DEFAULT_KV_BLOCK = 512

# Key codes in the float "bias" that travels with K/V blocks: 0 keeps a key; _MASKED (what the
# reference uses) drops a user-masked key unless a row masks all of them (then the row averages
# its keys, as the reference does); -inf drops padding added to fill blocks, always.
_MASKED = float(np.finfo(np.float32).min)
_PAD = -np.inf


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Knobs of the memory-efficient backends (ignored by xla / cudnn / reference)."""

    q_block: int = DEFAULT_Q_BLOCK
    kv_block: int = DEFAULT_KV_BLOCK
    interpret: bool = False  # splash only: run the Pallas kernel in interpret mode (CPU tests)


Array = jax.Array
AttentionFn = Callable[[Array, Array, Array, "Array | None", AttentionOptions], Array]


def _padding_mask_4d(mask: jax.Array | None) -> jax.Array | None:
    """Key-padding mask [batch, kv_len] -> [batch, 1, 1, kv_len] for jax.nn.dot_product_attention."""
    return None if mask is None else mask.astype(bool)[:, None, None, :]


def _platform() -> str:
    """Platform the computation targets: the ambient mesh's devices, else JAX's default backend."""
    # The mesh wins so that ahead-of-time lowering for a TPU topology on a CPU host still works.
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return str(device.platform) if device is not None else jax.default_backend()


def _require_platform(backend: str, platform: str) -> None:
    """Raise one clear line when `backend` cannot run on the platform the computation targets."""
    here = _platform()
    if here != platform:
        runnable = [b for b, p in _PLATFORM.items() if p in (None, here)]
        raise ValueError(
            f"attention backend {backend!r} needs a {platform.upper()} but JAX runs on {here!r}; "
            f"backends that run here: {', '.join(runnable)} (set the model's `attention` config)"
        )


def _xla(q: Array, k: Array, v: Array, mask: Array | None, opts: AttentionOptions) -> Array:
    """jax.nn.dot_product_attention lowered by XLA (any platform)."""
    return jax.nn.dot_product_attention(q, k, v, mask=_padding_mask_4d(mask), implementation="xla")


def _cudnn(q: Array, k: Array, v: Array, mask: Array | None, opts: AttentionOptions) -> Array:
    """cuDNN fused attention (NVIDIA GPU only; bf16/fp16 inputs; key padding must be trailing)."""
    _require_platform("cudnn", "gpu")
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    # cuDNN's training kernels reject odd sequence lengths: pad to even; padded keys lie beyond
    # the per-example key lengths below, padded queries are sliced off.
    q_even, kv_even = q_len + q_len % 2, kv_len + kv_len % 2
    keep = jnp.ones((batch, kv_len), bool) if mask is None else mask.astype(bool)
    lengths = jnp.sum(keep, axis=-1, dtype=jnp.int32)  # [batch]
    # A key-padding mask reaches cuDNN as lengths, not as a bias: its bias must be a full
    # [batch, heads, q_len, kv_len] array, which at video lengths is gigabytes per layer.
    use_lengths = mask is not None or kv_even != kv_len
    out = jax.nn.dot_product_attention(
        _pad_axis(q, 1, q_even), _pad_axis(k, 1, kv_even), _pad_axis(v, 1, kv_even),
        key_value_seq_lengths=lengths if use_lengths else None, implementation="cudnn",
    )[:, :q_len]  # [batch, q_len, heads, head_dim]
    if mask is None:
        return out
    # Lengths are exact for trailing padding (how tokenised text and batched videos are padded);
    # any other mask would be misread silently, so its examples come back as NaN instead.
    trailing = jnp.all(keep == (jnp.arange(kv_len)[None, :] < lengths[:, None]), axis=-1)  # [batch]
    return jnp.where(trailing[:, None, None, None], out, jnp.nan).astype(out.dtype)


def _reference(
    q: Array, k: Array, v: Array, mask: Array | None, opts: AttentionOptions | None = None
) -> Array:
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


# ----------------------------------------------------------------------------------------------
# Blockwise (flash) attention: the local kernel shared by blockwise, ring and ulysses.


def _key_bias(mask: jax.Array | None, batch: int, kv_len: int) -> jax.Array:
    """Key codes [batch, kv_len] float32: 0 keep, _MASKED for mask == False."""
    if mask is None:
        return jnp.zeros((batch, kv_len), jnp.float32)
    return jnp.where(mask.astype(bool), 0.0, _MASKED).astype(jnp.float32)


def _pad_axis(x: jax.Array, axis: int, length: int, value: float = 0.0) -> jax.Array:
    """Pad axis `axis` of x at the end up to `length`."""
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Split `axis` into (n_blocks, block) and move n_blocks to the front (the scan axis)."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_blocks`: fold the leading block axis back into `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _logits(q: jax.Array, k: jax.Array, bias: jax.Array, scale: float) -> jax.Array:
    """Scaled logits [batch, heads, q, kv] float32 with masked / padded keys replaced by their code."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    code = bias[:, None, None, :]  # [batch, 1, 1, kv]
    return jnp.where(code == 0, s, code)


# Online-softmax state per query: running max m [b, h, q], denominator l [b, h, q] and the
# unnormalised output acc [b, h, q, head_dim], all float32.
_State = tuple[jax.Array, jax.Array, jax.Array]


def _init_state(q: jax.Array) -> _State:
    """Empty online-softmax state for queries q [batch, q_len, heads, head_dim]."""
    b, n, h, d = q.shape
    # m starts at _MASKED, not -inf: an all-masked row then averages its keys (like the reference)
    # and an all-padding block leaves the state untouched instead of producing inf - inf.
    return (
        jnp.full((b, h, n), _MASKED, jnp.float32),
        jnp.zeros((b, h, n), jnp.float32),
        jnp.zeros((b, h, n, d), jnp.float32),
    )


def _fwd_kv_scan(q: Array, k: Array, v: Array, bias: Array, state: _State, kv_block: int) -> _State:
    """Fold all of k/v [b, kv, h, d] into the state of q [b, q, h, d], kv_block keys at a time."""
    scale = q.shape[-1] ** -0.5

    def step(carry: _State, kv: tuple[Array, Array, Array]) -> tuple[_State, None]:
        m, l, acc = carry
        k_j, v_j, bias_j = kv
        s = _logits(q, k_j, bias_j, scale)  # [batch, heads, q_block, kv_block]
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum(
            "bhqk,bkhd->bhqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32
        )  # [batch, heads, q_block, head_dim]
        return (m_new, l, acc * correction[..., None] + pv), None

    xs = (_blocks(k, 1, kv_block), _blocks(v, 1, kv_block), _blocks(bias, 1, kv_block))
    return lax.scan(step, state, xs)[0]


def _fwd_chunk(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, state: _State, q_block: int, kv_block: int
) -> _State:
    """Fold k/v into the state of every query, one block of q_block queries at a time."""
    if q.shape[1] == q_block:
        return _fwd_kv_scan(q, k, v, bias, state, kv_block)
    m, l, acc = state
    per_block = lambda qs: _fwd_kv_scan(qs[0], k, v, bias, qs[1:], kv_block)
    m, l, acc = lax.map(per_block, (_blocks(q, 1, q_block), _blocks(m, 2, q_block),
                                    _blocks(l, 2, q_block), _blocks(acc, 2, q_block)))
    return _unblocks(m, 2), _unblocks(l, 2), _unblocks(acc, 2)


def _finish(state: _State, dtype: jnp.dtype) -> jax.Array:
    """State -> output [b, q, h, d] in dtype."""
    m, l, acc = state
    return jnp.swapaxes(acc / l[..., None], 1, 2).astype(dtype)


def _bwd_chunk(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, dout: jax.Array, m: jax.Array,
    l: jax.Array, delta: jax.Array, q_block: int, kv_block: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flash backward of q against one k/v chunk, given the final softmax max m and sum l [b, h, q]
    and delta = sum(dout * out).

    With the final (global) m and l, exp(s - m) / l are the true probabilities even when k/v is
    only part of the keys, so ring attention calls this once per K/V block and sums. m and l are
    kept apart rather than as log-sum-exp because _MASKED + log(l) rounds back to _MASKED, which
    would break rows whose keys are all masked. Returns float32 grads.
    """
    scale = q.shape[-1] ** -0.5
    qs, dos = _blocks(q, 1, q_block), _blocks(dout, 1, q_block)
    ms, inv_ls, deltas = _blocks(m, 2, q_block), _blocks(1.0 / l, 2, q_block), _blocks(delta, 2, q_block)

    def kv_step(dq: jax.Array, kv: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, tuple]:
        k_j, v_j, bias_j = kv
        keep = (bias_j == 0)[:, None, None, :]  # [batch, 1, 1, kv_block]

        def q_step(dkv: tuple[jax.Array, jax.Array], qi: tuple) -> tuple[tuple, jax.Array]:
            dk_j, dv_j = dkv
            q_i, do_i, m_i, inv_l_i, delta_i = qi
            s = _logits(q_i, k_j, bias_j, scale)
            p = jnp.exp(s - m_i[..., None]) * inv_l_i[..., None]  # [batch, heads, q_block, kv_block]
            dv_j = dv_j + jnp.einsum("bhqk,bqhd->bkhd", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, v_j, preferred_element_type=jnp.float32)
            # Masked logits are constants, so no gradient flows through them even where p > 0.
            ds = jnp.where(keep, p * (dp - delta_i[..., None]) * scale, 0.0)  # [batch, heads, q, kv]
            dq_i = jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k_j.dtype), k_j,
                              preferred_element_type=jnp.float32)  # [batch, q_block, heads, head_dim]
            dk_j = dk_j + jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q_i.dtype), q_i,
                                     preferred_element_type=jnp.float32)
            return (dk_j, dv_j), dq_i

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        (dk_j, dv_j), dq_blocks = lax.scan(q_step, (zeros, zeros), (qs, dos, ms, inv_ls, deltas))
        return dq + _unblocks(dq_blocks, 1), (dk_j, dv_j)

    kvs = (_blocks(k, 1, kv_block), _blocks(v, 1, kv_block), _blocks(bias, 1, kv_block))
    dq, (dk, dv) = lax.scan(kv_step, jnp.zeros(q.shape, jnp.float32), kvs)
    return dq, _unblocks(dk, 1), _unblocks(dv, 1)


def _delta(out: jax.Array, dout: jax.Array) -> jax.Array:
    """Row sums of dout * out, [batch, heads, q] float32 (the softmax-Jacobian term)."""
    return jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q: Array, k: Array, v: Array, bias: Array, q_block: int, kv_block: int) -> Array:
    """Blockwise attention on block-aligned inputs; the custom VJP keeps the backward O(length)."""
    return _flash_fwd(q, k, v, bias, q_block, kv_block)[0]


def _flash_fwd(q: Array, k: Array, v: Array, bias: Array, q_block: int, kv_block: int) -> tuple[Array, tuple]:
    """Forward pass; saves inputs, output and the softmax statistics (no score matrix)."""
    m, l, acc = _fwd_chunk(q, k, v, bias, _init_state(q), q_block, kv_block)
    out = _finish((m, l, acc), q.dtype)
    return out, (q, k, v, bias, out, m, l)


def _flash_bwd(q_block: int, kv_block: int, res: tuple, dout: Array) -> tuple[Array, ...]:
    """Backward pass, recomputing scores one [q_block, kv_block] tile at a time."""
    q, k, v, bias, out, m, l = res
    dq, dk, dv = _bwd_chunk(q, k, v, bias, dout, m, l, _delta(out, dout), q_block, kv_block)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(bias)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_plan(length: int, block: int) -> tuple[int, int]:
    """(block, padded length) for a sequence: one block if it fits, else pad to whole blocks."""
    if block <= 0:
        raise ValueError(f"attention block sizes must be positive, got {block}")
    if length <= block:
        return length, length
    return block, -(-length // block) * block


def _blockwise_bias(q: Array, k: Array, v: Array, bias: Array, opts: AttentionOptions) -> Array:
    """Blockwise attention with key codes `bias` [batch, kv_len]; pads to whole blocks and back."""
    q_len, kv_len = q.shape[1], k.shape[1]
    qb, q_pad = _block_plan(q_len, opts.q_block)
    kb, kv_pad = _block_plan(kv_len, opts.kv_block)
    out = _flash(
        _pad_axis(q, 1, q_pad), _pad_axis(k, 1, kv_pad), _pad_axis(v, 1, kv_pad),
        _pad_axis(bias, 1, kv_pad, _PAD), qb, kb,
    )
    return out[:, :q_len]


def _blockwise(q: Array, k: Array, v: Array, mask: Array | None, opts: AttentionOptions) -> Array:
    """Memory-efficient attention on any platform (online softmax over K/V blocks, custom VJP)."""
    return _blockwise_bias(q, k, v, _key_bias(mask, k.shape[0], k.shape[1]), opts)


# ----------------------------------------------------------------------------------------------
# Sequence parallelism over the mesh's `sequence` axis.


def _sequence_size() -> int:
    """Size of the ambient mesh's `sequence` axis (1 without a mesh or without that axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[SEQUENCE_AXIS])


def _ring_perm(n: int) -> list[tuple[int, int]]:
    """Device i sends to i + 1 (mod n)."""
    return [(i, (i + 1) % n) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_flash(q: Array, k: Array, v: Array, bias: Array, n: int, q_block: int, kv_block: int) -> Array:
    """Per-device ring attention (inside shard_map): local q against every device's K/V block."""
    return _ring_fwd(q, k, v, bias, n, q_block, kv_block)[0]


def _ring_fwd(
    q: Array, k: Array, v: Array, bias: Array, n: int, q_block: int, kv_block: int
) -> tuple[Array, tuple]:
    """n - 1 hops of K/V around the ring, folding each visiting block into the local state."""
    perm = _ring_perm(n)

    def step(carry, _):
        state, kvb = carry
        # Send the block on before using it so the transfer can overlap the compute.
        moved = tuple(lax.ppermute(x, SEQUENCE_AXIS, perm) for x in kvb)
        return (_fwd_chunk(q, *kvb, state, q_block, kv_block), moved), None

    (state, kvb), _ = lax.scan(step, (_init_state(q), (k, v, bias)), length=n - 1)
    m, l, acc = _fwd_chunk(q, *kvb, state, q_block, kv_block)
    out = _finish((m, l, acc), q.dtype)
    return out, (q, k, v, bias, out, m, l)


def _ring_bwd(n: int, q_block: int, kv_block: int, res: tuple, dout: Array) -> tuple[Array, ...]:
    """Second trip around the ring: dQ stays home, dK/dV accumulate on their travelling blocks."""
    q, k, v, bias, out, m, l = res
    perm = _ring_perm(n)
    delta = _delta(out, dout)

    def grads(kvb):
        return _bwd_chunk(q, *kvb, dout, m, l, delta, q_block, kv_block)

    def step(carry, _):
        dq, kvb, dkv = carry
        dq_j, dk_j, dv_j = grads(kvb)
        # dK/dV accumulators travel with their K/V block and are home after n hops.
        dkv = (dkv[0] + dk_j, dkv[1] + dv_j)
        moved = tuple(lax.ppermute(x, SEQUENCE_AXIS, perm) for x in (*kvb, *dkv))
        return (dq + dq_j, moved[:3], moved[3:]), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    init = (jnp.zeros(q.shape, jnp.float32), (k, v, bias), (zeros, zeros))
    (dq, kvb, (dk, dv)), _ = lax.scan(step, init, length=n - 1)
    dq_j, dk_j, dv_j = grads(kvb)
    dk, dv = (lax.ppermute(x, SEQUENCE_AXIS, perm) for x in (dk + dk_j, dv + dv_j))
    return ((dq + dq_j).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(bias))


_ring_flash.defvjp(_ring_fwd, _ring_bwd)


def _sequence_parallel(
    local: Callable[[Array, Array, Array, Array], Array],
    q: Array, k: Array, v: Array, mask: Array | None, n: int,
) -> Array:
    """Pad the token axis to a multiple of n and run `local` per device, manual over `sequence`."""
    length = q.shape[1]
    padded = -(-length // n) * n
    bias = _pad_axis(_key_bias(mask, k.shape[0], length), 1, padded, _PAD)
    q, k, v = (_pad_axis(x, 1, padded) for x in (q, k, v))
    tokens, keys = P(None, SEQUENCE_AXIS, None, None), P(None, SEQUENCE_AXIS)
    # Manual only over `sequence`: batch / heads keep whatever sharding GSPMD gave them.
    out = jax.shard_map(
        local, in_specs=(tokens, tokens, tokens, keys), out_specs=tokens,
        axis_names={SEQUENCE_AXIS}, check_vma=False,
    )(q, k, v, lax.stop_gradient(bias))
    return out[:, :length]


def _ring(q: Array, k: Array, v: Array, mask: Array | None, opts: AttentionOptions) -> Array:
    """Ring attention over the `sequence` mesh axis; blockwise without one, xla for cross-attention."""
    n = _sequence_size()
    if n <= 1:
        return _blockwise(q, k, v, mask, opts)
    if q.shape[1] != k.shape[1]:
        return _xla(q, k, v, mask, opts)

    def local(q, k, v, bias):
        qb, q_pad = _block_plan(q.shape[1], opts.q_block)
        kb, kv_pad = _block_plan(k.shape[1], opts.kv_block)
        out = _ring_flash(
            _pad_axis(q, 1, q_pad), _pad_axis(k, 1, kv_pad), _pad_axis(v, 1, kv_pad),
            _pad_axis(bias, 1, kv_pad, _PAD), n, qb, kb,
        )
        return out[:, : q.shape[1]]

    return _sequence_parallel(local, q, k, v, mask, n)


def _ulysses(q: Array, k: Array, v: Array, mask: Array | None, opts: AttentionOptions) -> Array:
    """DeepSpeed-Ulysses: all-to-all tokens <-> heads around local blockwise attention."""
    n = _sequence_size()
    if n <= 1:
        return _blockwise(q, k, v, mask, opts)
    if q.shape[1] != k.shape[1]:
        return _xla(q, k, v, mask, opts)
    heads = q.shape[2]
    if heads % n:
        raise ValueError(
            f"ulysses attention: {heads} heads do not divide over sequence={n}; use a sequence axis "
            "that divides the head count or attention='ring'"
        )

    def local(q, k, v, bias):
        # [batch, tokens/n, heads, head_dim] -> [batch, tokens, heads/n, head_dim]
        to_heads = lambda x: lax.all_to_all(x, SEQUENCE_AXIS, split_axis=2, concat_axis=1, tiled=True)
        full_bias = lax.all_gather(bias, SEQUENCE_AXIS, axis=1, tiled=True)  # [batch, tokens]
        out = _blockwise_bias(to_heads(q), to_heads(k), to_heads(v), full_bias, opts)
        return lax.all_to_all(out, SEQUENCE_AXIS, split_axis=1, concat_axis=2, tiled=True)

    return _sequence_parallel(local, q, k, v, mask, n)


# ----------------------------------------------------------------------------------------------
# TPU splash attention.

_SPLASH_MIN_BLOCK = 128  # the kernel's tiles are multiples of the 128-lane TPU vreg


def _splash_local(q: Array, k: Array, v: Array, keep: Array, opts: AttentionOptions) -> Array:
    """Splash kernel on one device's [batch, tokens, heads, head_dim] shard; keep [batch, kv_len] int32."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    (b, q_len, heads, d), kv_len = q.shape, k.shape[1]
    round_up = lambda n, m: -(-n // m) * m
    bq = min(round_up(opts.q_block, _SPLASH_MIN_BLOCK), round_up(q_len, _SPLASH_MIN_BLOCK))
    bkv = min(round_up(opts.kv_block, _SPLASH_MIN_BLOCK), round_up(kv_len, _SPLASH_MIN_BLOCK))
    q_pad, kv_pad = round_up(q_len, bq), round_up(kv_len, bkv)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                          block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    kernel = sa.make_splash_mha_single_device(
        sa.MultiHeadMask([sa.FullMask((q_pad, kv_pad))] * heads), block_sizes=sizes,
        interpret=opts.interpret,
    )
    # Key padding as segment ids: every query is segment 1, kept keys 1, masked and padded keys 0.
    kv_ids = _pad_axis(keep, 1, kv_pad)
    q_ids = jnp.ones((b, q_pad), jnp.int32)
    # The kernel takes one example [heads, tokens, head_dim] and does not scale the logits.
    to_kernel = lambda x, n: jnp.swapaxes(_pad_axis(x, 1, n), 1, 2)
    qh = to_kernel(q * jnp.asarray(d**-0.5, q.dtype), q_pad)
    per_example = lambda q1, k1, v1, qi, ki: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=qi, kv=ki))
    out = jax.vmap(per_example)(qh, to_kernel(k, kv_pad), to_kernel(v, kv_pad), q_ids, kv_ids)
    return jnp.swapaxes(out, 1, 2)[:, :q_len].astype(q.dtype)  # [batch, q_len, heads, head_dim]


def _mesh_axes_dividing(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The axes among `names` (in order, size > 1) whose running product divides `size`."""
    kept: list[str] = []
    for name in names:
        if name in mesh.axis_names and mesh.shape[name] > 1:
            if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]) == 0:
                kept.append(name)
    return tuple(kept)


def _splash(q: Array, k: Array, v: Array, mask: Array | None, opts: AttentionOptions) -> Array:
    """Pallas splash attention (TPU), wrapped for the [batch, tokens, heads, head_dim] layout."""
    if not opts.interpret:
        _require_platform("splash", "tpu")
    keep = (jnp.ones(k.shape[:2], bool) if mask is None else mask.astype(bool)).astype(jnp.int32)
    local = functools.partial(_splash_local, opts=opts)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, keep)
    # GSPMD cannot partition a Mosaic (Pallas TPU) call, not even over an axis of size 1, so the
    # kernel runs under a shard_map that is manual over every mesh axis: batch shards over data and
    # fsdp, heads over tensor, and replicated over the rest (the token axes stay whole per device).
    batch = _mesh_axes_dividing(mesh, ("data", "fsdp"), q.shape[0]) or None
    heads = _mesh_axes_dividing(mesh, ("tensor",), q.shape[2]) or None
    tokens, keys = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        local, in_specs=(tokens, tokens, tokens, keys), out_specs=tokens, axis_names=set(mesh.axis_names),
        check_vma=False,
    )(q, k, v, keep)


_BACKENDS: dict[str, AttentionFn] = {
    "xla": _xla,
    "cudnn": _cudnn,
    "splash": _splash,
    "blockwise": _blockwise,
    "ring": _ring,
    "ulysses": _ulysses,
    "reference": _reference,
}
# The one platform a backend needs (None: any).
_PLATFORM: dict[str, str | None] = {
    "xla": None, "cudnn": "gpu", "splash": "tpu", "blockwise": None, "ring": None, "ulysses": None,
    "reference": None,
}

BACKENDS = tuple(_BACKENDS)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    backend: str = "xla",
    q_block: int = DEFAULT_Q_BLOCK,
    kv_block: int = DEFAULT_KV_BLOCK,
    interpret: bool = False,
) -> jax.Array:
    """Attention of q [b, q_len, heads, d] over k/v [b, kv_len, heads, d]; mask [b, kv_len], True = keep."""
    fn = _BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(_BACKENDS)}")
    if mask is not None and mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"attention mask shape {mask.shape} must be [batch, kv_len]={(k.shape[0], k.shape[1])}"
        )
    return fn(q, k, v, mask, AttentionOptions(q_block=q_block, kv_block=kv_block, interpret=interpret))
