"""`sora-jax convert wan` + `sora-jax sample --checkpoint` against diffusers' WanPipeline end to end.

A tiny random WanPipeline (VAE, DiT, umT5, a SentencePiece tokenizer trained here, UniPC scheduler),
every weight moved off its init, is saved, converted through the CLI and sampled by both sides from
the same noise; the decoded frames ([0, 1]) must agree within ATOL.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sora_jax.cli import main
from tests.test_cli import _run_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

ATOL = 2e-3
SHIFT = 3.0
H = W = 32
FRAMES = 5
STEPS = 3
GUIDANCE = 4.0
MAX_LEN = 16
PROMPT = "two balls,  red and blue; the red ball &amp; falls"
@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(diffusers WanPipeline, its saved folder, our converted folder, initial noise .npy)."""
    from sora_jax.bench.wan_tiny import save_wan_pipeline

    root = tmp_path_factory.mktemp("wan_pipeline")
    pipe, src = save_wan_pipeline("tiny", root, shift=SHIFT)
    dst = root / "converted"
    assert main(["convert", "wan", str(src), str(dst)]) == 0
    noise = np.random.default_rng(0).standard_normal((1, 4, 2, H // 8, W // 8)).astype(np.float32)
    np.save(root / "noise.npy", noise)
    return pipe, src, dst, root / "noise.npy"


def _diffusers_frames(pipe, noise_path, negative_prompt):
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=negative_prompt, height=H, width=W, num_frames=FRAMES,
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=torch.from_numpy(np.load(noise_path)), max_sequence_length=MAX_LEN,
                   output_type="np").frames
    return np.asarray(out[0], np.float32)


def _ours(capsys, wan, tmp_path, sampler, negative_prompt):
    _, _, dst, noise = wan
    out = tmp_path / f"{sampler}.npy"
    argv = ["sample", "--checkpoint", str(dst), "--prompt", PROMPT, "--latents", str(noise), "--output", str(out),
            "--height", str(H), "--width", str(W), "--frames", str(FRAMES), "--steps", str(STEPS),
            "--guidance", str(GUIDANCE), "--sampler", sampler, "--max-sequence-length", str(MAX_LEN)]
    if negative_prompt is not None:
        argv += ["--negative-prompt", negative_prompt]
    assert main(argv) == 0, capsys.readouterr().err
    return np.load(out)


def test_converted_folder_layout(wan):
    _, _, dst, _ = wan
    pipe = json.loads((dst / "pipeline.json").read_text())
    assert pipe["kind"] == "wan" and pipe["text_encoder"] == "umt5"
    assert pipe["solver"] == "unipc" and pipe["shift"] == SHIFT
    for part, config in (("vae", "vae_config.json"), ("dit", "dit_config.json"), ("text_encoder", "t5_config.json")):
        assert (dst / part / config).is_file() and (dst / part / "ckpt").is_dir()
    assert (dst / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("sampler,negative_prompt", [("unipc", "blurry,  dark &amp; static"), ("euler", None)])
def test_sample_matches_diffusers(capsys, wan, tmp_path, sampler, negative_prompt):
    pipe = wan[0]
    if sampler == "euler":
        # diffusers' Euler with the same shift: its grid is the one our "diffusers_euler" schedule walks.
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    else:
        pipe.scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                           flow_shift=SHIFT)
    ref = _diffusers_frames(pipe, wan[3], negative_prompt)
    ours = _ours(capsys, wan, tmp_path, sampler, negative_prompt)
    assert ours.shape == ref.shape == (FRAMES, H, W, 3) and ours.dtype == np.float32
    assert ref.std() > 0.01  # not a flat image that would agree trivially
    err = float(np.abs(ours - ref).max())
    print(f"{sampler}: max abs difference {err:.3g}")
    assert err <= ATOL, f"{sampler}: max abs difference {err:.3g} > {ATOL}"


def test_convert_errors(capsys, wan, tmp_path):
    _, src, _, _ = wan
    partial = tmp_path / "partial"
    shutil.copytree(src, partial, ignore=shutil.ignore_patterns("transformer"))
    _run_error(capsys, ["convert", "wan", str(partial), str(tmp_path / "o1")], "transformer not found")
    index = json.loads((src / "model_index.json").read_text())
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model_index.json").write_text(json.dumps({**index, "_class_name": "CogVideoXPipeline"}))
    _run_error(capsys, ["convert", "wan", str(wrong), str(tmp_path / "o2")], "not a WanPipeline")
    (wrong / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    _run_error(capsys, ["convert", "wan", str(wrong), str(tmp_path / "o3")], "lists vae as AutoencoderKL")
    _run_error(capsys, ["convert", "wan", str(tmp_path / "nope"), str(tmp_path / "o4")], "is not a folder")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing half-written


def test_sample_bad_latents(capsys, wan, tmp_path):
    _, _, dst, _ = wan
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 4, 2, 2, 2), np.float32))
    _run_error(capsys, ["sample", "--checkpoint", str(dst), "--prompt", "a ball", "--latents", str(bad),
                        "--height", str(H), "--width", str(W), "--frames", str(FRAMES), "--output",
                        str(tmp_path / "x.npy")], "latents have shape (1, 4, 2, 2, 2) but 1 prompt(s)")
    _run_error(capsys, ["sample", "--checkpoint", str(dst), "--prompt", "a ball", "--latents",
                        str(tmp_path / "missing.npy")], "--latents")
