"""`sora-jax export`: a DiT run -> an inference folder that loads and samples as the run does."""

import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sora_jax.cli import main
from sora_jax.pipeline import TextToVideo
from sora_jax.train import checkpoint
from sora_jax.train.export import EXPORT_FILE

PROMPT = "two balls: red and blue; the red ball falls"


def _export(capsys, src, dst, *flags):
    code = main(["export", str(src), str(dst), *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "exported" in out.out
    return checkpoint.read_json(dst / EXPORT_FILE)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def original(tiny_runs):
    run = tiny_runs["dit_cfg"].workdir
    t2v = TextToVideo.load(run)
    return run, t2v, t2v.generate([PROMPT], seed=3, sampler=t2v.make_sampler(steps=2))


def test_float32_export_samples_exactly_as_the_run(capsys, original, tiny_runs, tmp_path):
    run, t2v, video = original
    dst = tmp_path / "export"
    record = _export(capsys, run, dst)
    assert record["step"] == tiny_runs["dit"]["step"]
    # Weights only: no optimiser moments, no raw parameters beside the EMA, no data position.
    manager = checkpoint.make_manager(dst / "ckpt")
    assert checkpoint.saved_state_keys(manager) == {"step", "params"}
    manager.close()
    assert checkpoint.read_json(dst / "run.json")["vae_workdir"] == "vae"

    moved = tmp_path / "elsewhere"
    shutil.move(dst, moved)  # self-contained: nothing points back at the run or its VAE by path
    loaded = TextToVideo.load(moved)
    for a, b in zip(_leaves(t2v.dit_params), _leaves(loaded.dit_params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(t2v.vae_params), _leaves(loaded.vae_params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.generate([PROMPT], seed=3, sampler=loaded.make_sampler(steps=2)), video)


def test_bfloat16_export_holds_the_rounded_ema_weights(capsys, original, tmp_path):
    run, t2v, _ = original
    dst = tmp_path / "bf16"
    assert _export(capsys, run, dst, "--dtype", "bfloat16")["dtype"] == "bfloat16"
    loaded = TextToVideo.load(dst)
    assert loaded.dit_cfg.param_dtype == jnp.bfloat16
    changed = rounded = 0
    for a, b in zip(_leaves(t2v.dit_params), _leaves(loaded.dit_params), strict=True):
        # Leaves the model keeps in float32 whatever param_dtype says stay exact.
        assert b.dtype in (ml_dtypes.bfloat16, np.float32)
        np.testing.assert_array_equal(a.astype(b.dtype), b)
        rounded += b.dtype == ml_dtypes.bfloat16
        changed += int(np.any(b.astype(np.float32) != a))
    assert rounded > len(_leaves(loaded.dit_params)) // 2
    assert changed > 0  # the rounding happened: float32 weights are not all bfloat16-exact
    f32 = _export(capsys, run, tmp_path / "f32")
    bf16_bytes = sum(f.stat().st_size for f in (dst / "ckpt").rglob("*") if f.is_file())
    f32_bytes = sum(f.stat().st_size for f in (tmp_path / "f32" / "ckpt").rglob("*") if f.is_file())
    assert bf16_bytes < 0.75 * f32_bytes, (bf16_bytes, f32_bytes, f32)


def test_export_without_vae_loads_once_the_vae_is_copied_in(capsys, original, tiny_runs, tmp_path):
    run, t2v, _ = original
    dst = tmp_path / "novae"
    record = _export(capsys, run, dst, "--no-vae")
    assert not (dst / "vae").exists() and "left out" in record["vae"]
    with pytest.raises(checkpoint.CheckpointError, match="copy that VAE's run folder there"):
        TextToVideo.load(dst)
    shutil.copytree(tiny_runs["vae_cfg"].workdir, dst / "vae")
    loaded = TextToVideo.load(dst)
    for a, b in zip(_leaves(t2v.vae_params), _leaves(loaded.vae_params), strict=True):
        np.testing.assert_array_equal(a, b)
