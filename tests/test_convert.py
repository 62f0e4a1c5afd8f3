"""`sora-jax convert wan-vae|wan-dit` and `sora-jax vae-stats` through the real CLI."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.bench.harness import perturb_weights
from sora_jax.cli import main
from tests.test_cli import _run_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

_VAE_KW = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True], latents_mean=[0.1] * 4, latents_std=[2.0] * 4)


@pytest.fixture(scope="module")
def wan_vae_folder(tmp_path_factory):
    """A diffusers AutoencoderKLWan saved the way the hub ships it (config.json + safetensors)."""
    torch.manual_seed(0)
    ref = perturb_weights(diffusers.AutoencoderKLWan(**_VAE_KW), 0.05)  # every weight off its init
    src = tmp_path_factory.mktemp("wan_vae")
    ref.save_pretrained(src)
    return ref, src


def test_convert_wan_vae_round_trip(capsys, wan_vae_folder, tmp_path):
    """The converted folder loads like a training run and reproduces diffusers' encode and decode."""
    from sora_jax.models.vae_codec import VideoCodec
    from sora_jax.train.vae_trainer import load_vae

    ref, src = wan_vae_folder
    dst = tmp_path / "vae"
    assert main(["convert", "wan-vae", str(src), str(dst)]) == 0, capsys.readouterr().err
    assert "converted" in capsys.readouterr().out
    model, params = load_vae(dst)
    assert model.cfg.latents_mean == (0.1,) * 4 and model.cfg.base_dim == 16
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        out = ref.decode(dist.mean).sample
    codec = VideoCodec(model)
    mean, _ = codec.encode(params, x.numpy().transpose(0, 2, 3, 4, 1))
    recon = codec.decode(params, mean)
    np.testing.assert_allclose(np.asarray(mean), dist.mean.numpy().transpose(0, 2, 3, 4, 1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(recon), out.numpy().transpose(0, 2, 3, 4, 1), atol=1e-4, rtol=0)
    # an existing DST is never overwritten by accident, and --overwrite swaps it whole
    _run_error(capsys, ["convert", "wan-vae", str(src), str(dst)], "already exists and is not empty")
    assert main(["convert", "wan-vae", str(src), str(dst), "--overwrite"]) == 0
    assert sorted(p.name for p in dst.parent.iterdir()) == ["vae"]  # no temporary folders left behind


def test_convert_wan_vae_bad_sources(capsys, wan_vae_folder, tmp_path):
    from safetensors.numpy import save_file

    from sora_jax.convert.safetensors_io import read_safetensors

    _, src = wan_vae_folder
    _run_error(capsys, ["convert", "wan-vae", str(tmp_path / "nope"), str(tmp_path / "o1")], "is not a folder")
    (tmp_path / "empty").mkdir()
    _run_error(capsys, ["convert", "wan-vae", str(tmp_path / "empty"), str(tmp_path / "o2")], "config.json not found")

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(src / "config.json", partial / "config.json")
    state = read_safetensors(src)
    del state["decoder.conv_out.bias"]
    save_file(state, str(partial / "diffusion_pytorch_model.safetensors"))
    _run_error(capsys, ["convert", "wan-vae", str(partial), str(tmp_path / "o3")],
               "missing tensor 'decoder.conv_out.bias'")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    shutil.copy(src / "config.json", truncated / "config.json")
    blob = (src / "diffusion_pytorch_model.safetensors").read_bytes()
    (truncated / "diffusion_pytorch_model.safetensors").write_bytes(blob[: len(blob) // 2])
    _run_error(capsys, ["convert", "wan-vae", str(truncated), str(tmp_path / "o4")], "may be truncated")

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    _run_error(capsys, ["convert", "wan-vae", str(wrong), str(tmp_path / "o5")],
               "holds a WanTransformer3DModel, not a AutoencoderKLWan")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))  # nothing half-written


def test_convert_wan_dit_sharded(capsys, tmp_path):
    """A sharded (index.json) transformer converts; a missing shard is named."""
    from sora_jax.convert.safetensors_io import read_safetensors
    from sora_jax.convert.wan_dit import convert_wan_dit_state_dict, dit_config_from_diffusers
    from sora_jax.models.dit import DiT
    from sora_jax.train import checkpoint
    from sora_jax.train.setup import dataclass_from_json, on_one_device

    torch.manual_seed(0)
    ref = perturb_weights(diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=24,
        ffn_dim=64, num_layers=2), 0.05)
    src = tmp_path / "transformer"
    ref.save_pretrained(src, max_shard_size="40KB")
    index = src / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() and len(list(src.glob("*.safetensors"))) > 1
    dst = tmp_path / "dit"
    assert main(["convert", "wan-dit", str(src), str(dst), "--dtype", "bfloat16"]) == 0, capsys.readouterr().err

    cfg = dataclass_from_json(type(dit_config_from_diffusers(dict(ref.config))),
                              json.loads((dst / "dit_config.json").read_text()))
    assert cfg.param_dtype == jnp.bfloat16 and cfg.num_layers == 2
    expected = convert_wan_dit_state_dict(read_safetensors(src), cfg)
    abstract = jax.eval_shape(lambda: {"params": expected})
    restored = checkpoint.restore_params(dst / "ckpt", on_one_device(abstract))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored["params"], expected)
    # the restored weights run
    x = jnp.zeros((1, 1, 2, 2, 4), jnp.bfloat16)
    out = DiT(cfg).apply(restored, x, jnp.zeros((1,)), jnp.zeros((1, 3, 24), jnp.bfloat16))
    assert out.shape == (1, 1, 2, 2, 4)

    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.unlink()
    _run_error(capsys, ["convert", "wan-dit", str(src), str(tmp_path / "dit2")], f"shard {shard.name} listed in")


def test_vae_stats(capsys, tiny_runs, tmp_path):
    """Per-channel stats land in vae_config.json and equal a direct whole-clip computation."""
    from sora_jax.data.physics_tfds import build_physics_dataset
    from sora_jax.data.pipeline import numpy_batch
    from sora_jax.models.vae import CausalVAE
    from sora_jax.train.vae_trainer import load_vae

    workdir = tmp_path / "vae"
    shutil.copytree(tiny_runs["vae_cfg"].workdir, workdir)
    data = tmp_path / "data"
    argv = ["vae-stats", "--workdir", str(workdir), "--data-dir", str(data), "--size", "16", "--frames", "5",
            "--num-train", "6", "--num-clips", "5", "--batch-size", "2"]
    code, out = main(argv), capsys.readouterr()
    assert code == 0, out.err
    assert "latent statistics over" in out.out
    model, params = load_vae(workdir)
    clips = numpy_batch(build_physics_dataset(str(data), size=16, frames=5, num_train=6, num_test=32, seed=0)["train"],
                        range(5))["video"]
    mean = np.asarray(model.apply(params, clips, method=CausalVAE.encode)[0], np.float64).reshape(-1, model.cfg.z_dim)
    np.testing.assert_allclose(model.cfg.latents_mean, mean.mean(0), atol=1e-4)
    np.testing.assert_allclose(model.cfg.latents_std, mean.std(0), atol=1e-4)
    _run_error(capsys, argv[:-4] + ["--num-clips", "0"], "--num-clips and --batch-size must be at least 1")
