"""Attention backends against the float32 reference: values, gradients, masks, sequence parallelism."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax.models.attention import attention
from sora_jax.models.dit import DiT, dit_config
from sora_jax.parallel.mesh import logical_shardings, make_mesh
from sora_jax.parallel.rules import get_rules
from tests.test_dit import _inputs, random_params

TOL = 1e-5
# Small blocks so that every test length spans several blocks and needs padding to whole blocks.
BLOCKS = dict(q_block=4, kv_block=8)


def _qkv(q_len, kv_len, heads=4, head_dim=8, batch=2, seed=0):
    """Random q [batch, q_len, heads, head_dim] and k, v [batch, kv_len, heads, head_dim]."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, head_dim), dtype=np.float32)
    k, v = (rng.standard_normal((batch, kv_len, heads, head_dim), dtype=np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _mask(kind, batch, kv_len):
    """Key-padding masks [batch, kv_len]: none, ragged lengths, or one row with every key masked."""
    if kind is None:
        return None
    lengths = {"ragged": [kv_len, kv_len // 3], "all_masked": [kv_len - 1, 0]}[kind][:batch]
    return jnp.arange(kv_len)[None, :] < jnp.asarray(lengths)[:, None]


def _max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def _grads(backend, q, k, v, mask, **kw):
    """d/d(q, k, v) of a scalar that weighs every output element differently."""
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, backend=backend, **kw)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _seq_mesh(sequence):
    return make_mesh({"data": 1, "fsdp": 8 // sequence, "tensor": 1, "sequence": sequence})


def _put_tokens(mesh, *xs):
    """Shard dim 0 over fsdp and dim 1 (tokens) over sequence."""
    spec = lambda x: P("fsdp", "sequence", *([None] * (x.ndim - 2)))
    return [jax.device_put(x, NamedSharding(mesh, spec(x))) for x in xs]


@pytest.mark.parametrize("mask_kind", [None, "ragged", "all_masked"])
@pytest.mark.parametrize("q_len,kv_len", [(37, 37), (5, 29)])
def test_blockwise_matches_reference(q_len, kv_len, mask_kind):
    q, k, v = _qkv(q_len, kv_len)
    mask = _mask(mask_kind, 2, kv_len)
    ref = attention(q, k, v, mask, backend="reference")
    out = jax.jit(lambda *a: attention(*a, backend="blockwise", **BLOCKS))(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _max_err(out, ref) <= TOL
    # xla agrees too (the yardstick of issue #4), except where a row masks every key (undefined).
    if mask_kind != "all_masked":
        assert _max_err(attention(q, k, v, mask, backend="xla"), ref) <= TOL


def test_blockwise_bfloat16():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(21, 19))
    mask = _mask("ragged", 2, 19)
    out = attention(q, k, v, mask, backend="blockwise", **BLOCKS)
    assert out.dtype == jnp.bfloat16
    assert _max_err(out, attention(q, k, v, mask, backend="reference")) <= 2e-2
    grads = _grads("blockwise", q, k, v, mask, **BLOCKS)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_blockwise_scans_over_blocks():
    q, k, v = _qkv(37, 37)
    jaxpr = str(jax.make_jaxpr(lambda *a: attention(*a, backend="blockwise", **BLOCKS))(q, k, v))
    assert "scan" in jaxpr and "custom_vjp" in jaxpr
    # No [batch, heads, q_len, kv_len] logits: the largest score tile is [.., 4 queries, 8 keys].
    assert "f32[2,4,37,37]" not in jaxpr and "f32[2,4,40,40]" not in jaxpr


@pytest.mark.parametrize("mask_kind", [None, "all_masked"])
def test_blockwise_gradients_match_reference(mask_kind):
    q, k, v = _qkv(21, 19)
    mask = _mask(mask_kind, 2, 19)
    ref = _grads("reference", q, k, v, mask)
    out = _grads("blockwise", q, k, v, mask, **BLOCKS)
    for name, g, r in zip("qkv", out, ref):
        assert _max_err(g, r) <= TOL, name


@pytest.mark.parametrize(
    "backend,sequence,length", [("ring", 4, 36), ("ulysses", 4, 36), ("ring", 8, 37), ("ulysses", 8, 37)]
)
def test_sequence_parallel_matches_reference(backend, sequence, length):
    q, k, v = _qkv(length, length, heads=8)
    mask = _mask("ragged", 2, length)
    ref = attention(q, k, v, mask, backend="reference")
    mesh = _seq_mesh(sequence)
    fn = jax.jit(lambda *a: attention(*a, backend=backend, **BLOCKS))
    with jax.set_mesh(mesh):
        # A length the mesh divides arrives sequence-sharded; 37 tokens are padded inside.
        args = _put_tokens(mesh, q, k, v, mask) if length % sequence == 0 else (q, k, v, mask)
        out = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
    assert _max_err(out, ref) <= TOL
    if backend == "ring":
        assert "collective-permute" in hlo
        if length % sequence == 0:
            # K/V travel around the ring; nothing gathers the whole sequence onto one device
            # (unsharded inputs get a replicated output, which is gathered at the end).
            assert "all-gather" not in hlo
    else:
        assert "all-to-all" in hlo


@pytest.mark.parametrize("backend", ["ring", "ulysses"])
def test_sequence_parallel_gradients_match_reference(backend):
    q, k, v = _qkv(36, 36, heads=4)
    mask = _mask("ragged", 2, 36)
    ref = _grads("reference", q, k, v, mask)
    mesh = _seq_mesh(4)
    with jax.set_mesh(mesh):
        mask = jax.device_put(mask, NamedSharding(mesh, P()))
        out = _grads(backend, *_put_tokens(mesh, q, k, v), mask, **BLOCKS)
    for name, g, r in zip("qkv", out, ref):
        assert _max_err(g, r) <= TOL, name


def test_ulysses_heads_must_divide_sequence():
    q, k, v = _qkv(16, 16, heads=12)
    with jax.set_mesh(_seq_mesh(8)):
        with pytest.raises(ValueError, match=r"12 heads do not divide over sequence=8"):
            jax.eval_shape(lambda *a: attention(*a, backend="ulysses"), q, k, v)


@pytest.mark.parametrize("backend", ["ring", "ulysses"])
def test_sequence_parallel_fallbacks(backend):
    # No mesh: plain (blockwise) attention, no collectives.
    q, k, v = _qkv(13, 13)
    mask = _mask("ragged", 2, 13)
    fn = lambda *a: attention(*a, backend=backend, **BLOCKS)
    assert _max_err(fn(q, k, v, mask), attention(q, k, v, mask, backend="reference")) <= TOL
    assert "ppermute" not in str(jax.make_jaxpr(fn)(q, k, v, mask))
    # Cross-attention under a sequence mesh (queries are video tokens, keys are text): no ring.
    q, k, v = _qkv(16, 7)
    mask = _mask("ragged", 2, 7)
    with jax.set_mesh(_seq_mesh(4)):
        out = jax.jit(fn)(q, k, v, mask)
    assert _max_err(out, attention(q, k, v, mask, backend="reference")) <= TOL


@pytest.mark.parametrize("mask_kind", [None, "ragged"])
def test_splash_interpret_matches_reference(mask_kind):
    # Pallas interpret mode runs the TPU kernel's program on CPU: checks our layout, scaling and
    # segment-id masking; a row with every key masked is undefined for splash, so not tested.
    q, k, v = _qkv(29, 37, heads=2, head_dim=16)
    mask = _mask(mask_kind, 2, 37)
    ref = attention(q, k, v, mask, backend="reference")
    fn = jax.jit(lambda *a: attention(*a, backend="splash", interpret=True))
    assert _max_err(fn(q, k, v, mask), ref) <= TOL
    # Under a mesh the kernel is mapped over batch (fsdp) and head (tensor) shards.
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2})
    with jax.set_mesh(mesh):
        out = fn(q, k, v, mask)
    assert _max_err(out, ref) <= TOL


@pytest.mark.parametrize("backend,platform", [("splash", "TPU"), ("cudnn", "GPU")])
def test_backend_needing_accelerator_says_so(backend, platform):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the error on CPU")
    q, k, v = _qkv(8, 8)
    with pytest.raises(ValueError, match=rf"{backend}' needs a {platform} but JAX runs on 'cpu'.*blockwise"):
        attention(q, k, v, backend=backend)


gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")


def _rel_err(a, b):
    """||a - b|| / ||b|| in float32."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@gpu_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mask_kind", [None, "ragged"])
@pytest.mark.parametrize("q_len,kv_len", [(256, 256), (77, 33)])
def test_cudnn_matches_reference_on_gpu(q_len, kv_len, mask_kind, dtype):
    # cuDNN's fused kernel takes half-precision inputs only; the yardstick is the float32
    # reference on the same (rounded) inputs, so the error is the kernel's own, at bf16/fp16 level.
    q, k, v = (x.astype(dtype) for x in _qkv(q_len, kv_len, heads=4, head_dim=64, seed=1))
    mask = _mask(mask_kind, 2, kv_len)
    ref = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, backend="reference")
    out = jax.jit(lambda *a: attention(*a, backend="cudnn"))(q, k, v, mask)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 2e-2 if dtype == jnp.bfloat16 else 4e-3
    assert _rel_err(out, ref) <= tol
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    for g, g_ref in zip(_grads("cudnn", q, k, v, mask), _grads("reference", *f32, mask)):
        assert _rel_err(g, g_ref) <= 2 * tol


@gpu_only
def test_cudnn_refuses_non_trailing_mask_loudly_on_gpu():
    # cuDNN sees key padding as lengths: a mask with a hole would be misread, so that example is NaN.
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(64, 64, heads=2, head_dim=64))
    mask = jnp.ones((2, 64), bool).at[1, 10].set(False)
    out = np.asarray(attention(q, k, v, mask, backend="cudnn"), np.float32)
    assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()


@gpu_only
def test_dit_cudnn_matches_xla_on_gpu():
    # The whole tiny DiT in bf16 with cuDNN attention against the same bf16 model with XLA's.
    cfg = dit_config("tiny", num_layers=2, dtype=jnp.bfloat16, attention="xla")
    latents, t, text = _inputs(cfg, (3, 8, 8))
    text_mask = jnp.arange(text.shape[1])[None, :] < jnp.array([[text.shape[1]], [2]])
    params = random_params(cfg)
    ref = jax.jit(DiT(cfg).apply)({"params": params}, latents, t, text, text_mask)
    cfg_c = dit_config("tiny", num_layers=2, dtype=jnp.bfloat16, attention="cudnn")
    out = jax.jit(DiT(cfg_c).apply)({"params": params}, latents, t, text, text_mask)
    assert _rel_err(out, ref) <= 2e-2


@pytest.fixture(scope="module")
def dit_setup():
    cfg = dit_config("tiny", num_layers=2)
    inputs = _inputs(cfg, (3, 4, 4))  # 3 x 2 x 2 = 12 video tokens
    video_mask = jnp.arange(12)[None, :] < jnp.array([[12], [8]])  # example 1: last latent frame padded
    params = random_params(cfg)
    ref = jax.jit(DiT(cfg).apply)({"params": params}, *inputs, None, video_mask)
    return cfg, params, inputs, video_mask, ref


def test_dit_video_mask_drops_padded_tokens(dit_setup):
    cfg, params, (latents, t, text), video_mask, ref = dit_setup
    apply = jax.jit(DiT(cfg).apply)
    junk = latents.at[1, 2].set(100.0)  # the padded latent frame of example 1
    out = apply({"params": params}, junk, t, text, None, video_mask)
    np.testing.assert_allclose(np.asarray(out[1, :2]), np.asarray(ref[1, :2]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=1e-5)
    unmasked = apply({"params": params}, junk, t, text)
    assert _max_err(unmasked[1, :2], ref[1, :2]) > 1e-3  # without the mask the junk leaks in
    with pytest.raises(ValueError, match="video_mask has shape"):
        apply({"params": params}, latents, t, text, None, video_mask[:, :5])


def test_dit_blockwise_matches_xla(dit_setup):
    cfg, params, inputs, video_mask, ref = dit_setup
    cfg_b = dit_config("tiny", num_layers=2, attention="blockwise")
    out = jax.jit(DiT(cfg_b).apply)({"params": params}, *inputs, None, video_mask)
    assert _max_err(out, ref) <= TOL


def test_dit_ring_under_fsdp_sequence_matches_xla(dit_setup):
    cfg, params, inputs, video_mask, ref = dit_setup
    cfg_r = dit_config("tiny", num_layers=2, attention="ring")
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 1, "sequence": 4})
    rules = get_rules("fsdp_sequence")
    abstract = jax.eval_shape(DiT(cfg_r).init, jax.random.key(0), *inputs)
    sharded = jax.device_put(params, logical_shardings(abstract["params"], mesh, rules))
    fn = jax.jit(lambda p, *a: DiT(cfg_r).apply({"params": p}, *a))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = fn(sharded, *inputs, None, video_mask)
        hlo = fn.lower(sharded, *inputs, None, video_mask).as_text()
    assert "collective_permute" in hlo  # the ring really ran (StableHLO spelling)
    assert _max_err(out, ref) <= TOL
