"""Causal 3D VAE: shapes, causality, validation, logical axis names, Wan2.1 parity."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models.vae import (
    CausalVAE,
    VAEConfig,
    denormalize_latents,
    init_vae_variables,
    kl_divergence,
    normalize_latents,
    validate_video_shape,
)

B, H, W = 2, 16, 16  # one batch/spatial shape for all jitted tests: compile once per frame count


@pytest.fixture(scope="module")
def vae():
    """(model, params, jitted encode, jitted decode, jitted call) for the tiny config."""
    cfg = VAEConfig.tiny()
    model = CausalVAE(cfg)
    params = nn.unbox(jax.jit(lambda k: init_vae_variables(cfg, k))(jax.random.PRNGKey(0)))
    enc = jax.jit(lambda p, x: model.apply(p, x, method=CausalVAE.encode))
    dec = jax.jit(lambda p, z: model.apply(p, z, method=CausalVAE.decode))
    call = jax.jit(lambda p, x, rng: model.apply(p, x, rng))
    return model, params, enc, dec, call


def _video(frames: int, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.PRNGKey(seed), (B, frames, H, W, 3), minval=-1.0, maxval=1.0)


def test_config_factors():
    assert VAEConfig().temporal_factor == 4 and VAEConfig().spatial_factor == 8
    tiny = VAEConfig.tiny()
    assert (tiny.temporal_factor, tiny.spatial_factor) == (4, 8)
    wan = VAEConfig.wan21()
    assert len(wan.latents_mean) == len(wan.latents_std) == wan.z_dim == 16
    assert wan.temperal_downsample == (False, True, True)
    assert VAEConfig(dim_mult=[1, 2, 4, 4]) == VAEConfig()  # lists normalised: hashable for jit
    hash(wan)
    assert wan.latent_shape(17, 480, 832) == (5, 60, 104, 16)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes(vae, frames):
    model, params, enc, dec, call = vae
    t = 1 + (frames - 1) // 4
    mean, logvar = enc(params, _video(frames))
    assert mean.shape == logvar.shape == (B, t, H // 8, W // 8, 8)
    assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0
    out = dec(params, mean)
    assert out.shape == (B, frames, H, W, 3)
    assert float(jnp.abs(out).max()) <= 1.0


def test_call_samples_the_posterior(vae):
    _, params, enc, dec, call = vae
    x = _video(1)
    mean, _ = enc(params, x)
    recon, m2, lv2 = call(params, x, jax.random.PRNGKey(1))
    assert recon.shape == x.shape and m2.shape == lv2.shape == mean.shape
    np.testing.assert_allclose(m2, mean, atol=1e-6)
    assert not np.allclose(recon, dec(params, mean))  # decoded a posterior sample, not the mean


def test_encoder_is_causal(vae):
    _, params, enc, _, _ = vae
    x = _video(9)
    base = np.asarray(enc(params, x)[0])
    # latent j sees input frames <= 4j: frame 4 belongs to latent 1, frame 5 to latent 2.
    for frame, first_changed in [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2)]:
        x2 = x.at[:, frame].set(-x[:, frame])
        got = np.asarray(enc(params, x2)[0])
        np.testing.assert_array_equal(got[:, :first_changed], base[:, :first_changed])
        for j in range(first_changed, 3):
            assert np.abs(got[:, j] - base[:, j]).max() > 1e-6, (frame, j)


def test_decoder_is_causal(vae):
    _, params, enc, dec, _ = vae
    z = enc(params, _video(9))[0]
    base = np.asarray(dec(params, z))
    # output frames of latent j: 0 for j=0, 4j-3..4j otherwise.
    for j, first_frame in [(0, 0), (1, 1), (2, 5)]:
        z2 = z.at[:, j].add(1.0)
        got = np.asarray(dec(params, z2))
        np.testing.assert_array_equal(got[:, :first_frame], base[:, :first_frame])
        assert np.abs(got[:, first_frame:] - base[:, first_frame:]).max() > 1e-6, j


def test_chunked_codec_equals_whole_clip(vae):
    from sora_jax.models.vae_codec import VideoCodec

    model, params, enc, dec, _ = vae
    codec = VideoCodec(model, chunked=True)
    x = _video(9, seed=4)
    mean, logvar = enc(params, x)
    m2, l2 = codec.encode(params, x)
    np.testing.assert_allclose(np.asarray(m2), np.asarray(mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(logvar), atol=1e-4, rtol=0)
    z = mean + 0.5 * jax.random.normal(jax.random.PRNGKey(5), mean.shape)
    np.testing.assert_allclose(np.asarray(codec.decode(params, z)), np.asarray(dec(params, z)), atol=1e-4, rtol=0)


# (kernel, strides, padding) of every 3D conv kind in the VAE, plus a general strided one
CONV3D_CASES = [
    ((3, 3, 3), (1, 1, 1), ((2, 0), (1, 1), (1, 1))),  # causal 3x3x3
    ((3, 1, 1), (2, 1, 1), ((0, 0), (0, 0), (0, 0))),  # temporal downsample
    ((3, 1, 1), (1, 1, 1), ((2, 0), (0, 0), (0, 0))),  # temporal upsample
    ((1, 1, 1), (1, 1, 1), ((0, 0), (0, 0), (0, 0))),  # shortcut
    ((3, 4, 4), (2, 2, 2), ((1, 1), (1, 2), (0, 1))),  # strided on every axis, both-sided pads
]


@pytest.mark.parametrize("kernel, strides, padding", CONV3D_CASES)
def test_sum_time_lowering_equals_3d_conv(kernel, strides, padding):
    from jax import lax

    from sora_jax.models.vae_blocks import conv3d_sum_time

    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (2, 7, 6, 5, 4))
    w = jax.random.normal(kw, (*kernel, 4, 3))
    want = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    got = jax.jit(conv3d_sum_time, static_argnums=(2, 3))(x, w, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_conv_impl_is_validated():
    with pytest.raises(ValueError, match="unknown conv_impl 'cudnn'; choose one of auto, xla, sum_time"):
        VAEConfig.tiny(conv_impl="cudnn")
    assert VAEConfig.tiny().conv_lowering == ("sum_time" if jax.default_backend() == "cpu" else "xla")


def test_chunked_decode_memory_does_not_grow_with_length():
    """XLA's compiled buffer plan: chunked decode temp bytes stay flat for 4x frames; whole-clip grows."""
    from sora_jax.models.vae_codec import VideoCodec

    cfg = VAEConfig.tiny()
    model = CausalVAE(cfg)
    params = jax.eval_shape(lambda k: nn.unbox(init_vae_variables(cfg, k)), jax.random.PRNGKey(0))
    temp = {}
    for chunked in (True, False):
        decode = jax.jit(VideoCodec(model, chunked=chunked).decode_fn)
        for t in (3, 12):  # 9 vs 45 frames
            z = jax.ShapeDtypeStruct((1, t, 4, 4, cfg.z_dim), jnp.float32)
            temp[chunked, t] = decode.lower(params, z).compile().memory_analysis().temp_size_in_bytes
    assert temp[True, 12] <= 1.3 * temp[True, 3], temp
    assert temp[False, 12] >= 3 * temp[False, 3], temp  # so the bound above is not vacuous
    assert temp[True, 12] < temp[False, 12] / 2, temp


def test_tiling_rejects_misaligned_tiles():
    from sora_jax.models.vae_codec import Tiling

    with pytest.raises(ValueError, match="0 < stride < tile"):
        Tiling(tile=32, stride=32).check(8)
    with pytest.raises(ValueError, match="multiples of the VAE's spatial factor 8"):
        Tiling(tile=36, stride=16).check(8)


@pytest.mark.parametrize(
    "shape, message",
    [
        (
            (8, 16, 16),
            "frame count 8 cannot be encoded by the causal VAE: it needs 4k+1 frames (1, 5, 9, 13, 17, ...); use 9",
        ),
        ((16, 16, 16), "use 17"),
        ((0, 16, 16), "use 1"),
        ((5, 20, 16), "height/width must be multiples of 8; got 20x16"),
        ((5, 16, 4), "height/width must be multiples of 8"),
    ],
)
def test_bad_shapes_raise_clear_error(vae, shape, message):
    model, params, *_ = vae
    with pytest.raises(ValueError) as err:
        validate_video_shape(model.cfg, *shape)
    assert message in str(err.value) and "\n" not in str(err.value)
    if shape[0] > 0:
        with pytest.raises(ValueError, match="must be multiples|cannot be encoded"):
            model.apply(params, jnp.zeros((1, *shape, 3)), method=CausalVAE.encode)


def test_parameters_have_logical_names():
    cfg = VAEConfig.tiny(attn_scales=(1.0,))
    abstract = jax.eval_shape(CausalVAE(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 5, H, W, 3)))
    specs = nn.get_partition_spec(abstract)["params"]
    shapes = nn.unbox(abstract)["params"]
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
    flat_shapes = dict(jax.tree_util.tree_leaves_with_path(shapes))
    assert len(flat_specs) == len(flat_shapes) > 0
    kernels = 0
    for path, spec in flat_specs:
        shape = flat_shapes[path].shape
        assert len(spec) == len(shape) and any(spec), (jax.tree_util.keystr(path), spec)
        if path[-1].key == "kernel":
            kernels += 1
            # taps are unnamed: flax forbids one logical name on several dims, and they never shard
            expected = (None,) * (len(shape) - 2) + ("conv_in", "conv_out")
            assert tuple(spec) == expected, jax.tree_util.keystr(path)
        elif path[-1].key == "gamma":
            assert tuple(spec) == ("norm",)
        else:
            assert tuple(spec) == ("conv_out",)
    assert kernels > 20
    # every name is in the shared vocabulary, so every preset can map it
    from sora_jax.parallel.rules import LOGICAL_AXES

    assert {n for _, s in flat_specs for n in s} - {None} <= set(LOGICAL_AXES)


def test_latent_normalization_and_kl():
    cfg = VAEConfig.wan21()
    z = np.random.default_rng(0).normal(size=(2, 3, 4, 4, 16)).astype(np.float32)
    np.testing.assert_allclose(denormalize_latents(normalize_latents(z, cfg), cfg), z, atol=1e-5)
    np.testing.assert_allclose(normalize_latents(z, VAEConfig.tiny(z_dim=16)), z)
    kl = kl_divergence(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32))
    assert kl.shape == (2,) and float(np.abs(kl).max()) == 0.0
    kl1 = kl_divergence(np.ones((1, 5), np.float32), np.zeros((1, 5), np.float32))
    assert float(kl1[0]) == pytest.approx(0.5)


def test_fast_init_matches_module_init():
    """init_vae_variables has model.init's tree, shapes, dtypes and logical names, torch-like scales."""
    cfg = VAEConfig.tiny()
    rng = jax.random.PRNGKey(0)
    ref = jax.eval_shape(CausalVAE(cfg).init, rng, jnp.zeros((1, 5, H, W, 3)))
    fast = jax.eval_shape(lambda k: init_vae_variables(cfg, k), rng)
    assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(fast)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ref) == jax.tree.map(lambda a: (a.shape, a.dtype), fast)
    assert nn.get_partition_spec(ref) == nn.get_partition_spec(fast)


# --------------------------------------------------------------------------- Wan2.1 parity

_PARITY_KW = dict(
    base_dim=16,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],  # diffusers' chunked encoder crashes with attention in down_blocks
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)


@pytest.fixture(scope="module")
def wan_pair():
    """A small random diffusers AutoencoderKLWan (weights perturbed off init) and our converted params."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import AutoencoderKLWan

    from sora_jax.convert.wan_vae import convert_wan_vae_state_dict

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**_PARITY_KW).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # gammas/biases off their 1/0 init
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    cfg = VAEConfig.from_diffusers(dict(ref.config))
    return ref, cfg, state, convert_wan_vae_state_dict(state, cfg)


def _channels_last(a) -> np.ndarray:
    """diffusers [B, C, T, H, W] torch tensor -> our [B, T, H, W, C] array."""
    return a.numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize("frames, conv_impl", [(1, "auto"), (9, "auto"), (17, "auto"), (9, "xla")])
def test_parity_with_diffusers(wan_pair, frames, conv_impl):
    """Whole-clip and chunked (feature-cached) paths both equal diffusers' AutoencoderKLWan.

    "auto" is the per-frame 2D-conv lowering on CPU; "xla" checks the native 3D convs too.
    """
    import dataclasses

    import torch

    from sora_jax.models.vae_codec import VideoCodec

    ref, cfg, _, params = wan_pair
    model = CausalVAE(dataclasses.replace(cfg, conv_impl=conv_impl))
    torch.manual_seed(frames)
    x = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        # decode a latent away from the mean too, so clamping does not hide differences
        z = dist.mean * 0.3
        out = ref.decode(z).sample

    for codec in (VideoCodec(model, chunked=False), VideoCodec(model, chunked=True)):
        mean, logvar = codec.encode(params, _channels_last(x))
        recon = codec.decode(params, _channels_last(z))
        assert mean.shape == (2, 1 + (frames - 1) // 4, 2, 3, cfg.z_dim)
        np.testing.assert_allclose(np.asarray(mean), _channels_last(dist.mean), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(logvar), _channels_last(dist.logvar), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(recon), _channels_last(out), atol=1e-4, rtol=0)


def test_tiled_parity_with_diffusers(wan_pair):
    """Spatial tiles with overlap blending give diffusers' tiled encode/decode (and differ from untiled)."""
    import torch

    from sora_jax.models.vae_codec import Tiling, VideoCodec

    ref, cfg, _, params = wan_pair
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                      tile_sample_stride_height=16, tile_sample_stride_width=16)
    try:
        torch.manual_seed(3)
        x = torch.rand(1, 3, 5, 48, 48) * 2 - 1  # 3 x 3 tiles, the last row/column cut short
        with torch.no_grad():
            dist = ref.encode(x).latent_dist
            z = dist.mean * 0.3
            out = ref.decode(z).sample
        ref.disable_tiling()
        with torch.no_grad():
            untiled = _channels_last(ref.decode(z).sample)
    finally:
        ref.disable_tiling()
    codec = VideoCodec(CausalVAE(cfg), chunked=True, tiling=Tiling(tile=32, stride=16))
    mean, logvar = codec.encode(params, _channels_last(x))
    recon = np.asarray(codec.decode(params, _channels_last(z)))
    np.testing.assert_allclose(np.asarray(mean), _channels_last(dist.mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), _channels_last(dist.logvar), atol=1e-4, rtol=0)
    np.testing.assert_allclose(recon, _channels_last(out), atol=1e-4, rtol=0)
    assert np.abs(untiled - recon).max() > 1e-2  # the tiles really were decoded separately


def test_converter_names_the_bad_tensor(wan_pair):
    from sora_jax.convert.wan_vae import convert_wan_vae_state_dict

    _, cfg, state, _ = wan_pair
    missing = {k: v for k, v in state.items() if k != "decoder.mid_block.attentions.0.proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensor 'decoder\.mid_block\.attentions\.0\.proj\.weight'"):
        convert_wan_vae_state_dict(missing, cfg)
    bad = dict(state, **{"encoder.conv_in.weight": np.zeros((3, 3, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"tensor 'encoder\.conv_in\.weight' has shape"):
        convert_wan_vae_state_dict(bad, cfg)
    extra = dict(state, **{"encoder.extra.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match="encoder.extra.weight"):
        convert_wan_vae_state_dict(extra, cfg)


def test_wan21_names_and_shapes_match_diffusers():
    """The full Wan2.1 config has exactly diffusers' tensors, shape for shape (no weights computed)."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import AutoencoderKLWan

    from sora_jax.convert.wan_vae import diffusers_name, param_shapes

    with torch.device("meta"):
        ref = AutoencoderKLWan()
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {diffusers_name(p): s for p, s in param_shapes(VAEConfig.wan21()).items()}
    assert set(ours) == set(theirs)
    for name, shape in ours.items():
        t = theirs[name]
        if len(t) == 5:
            t = (t[2], t[3], t[4], t[1], t[0])
        elif len(t) == 4 and len(shape) == 4:
            t = (t[2], t[3], t[1], t[0])
        else:
            t = (int(np.prod(t)),)
        assert shape == t, name
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(p.numel() for p in ref.parameters())
