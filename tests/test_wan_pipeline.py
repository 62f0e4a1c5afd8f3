"""`sora-jax convert wan` + `sora-jax sample --checkpoint` against diffusers' WanPipeline end to end.

A tiny random WanPipeline (VAE, DiT, umT5, a SentencePiece tokenizer trained here, UniPC scheduler),
every weight moved off its init, is saved, converted through the CLI and sampled by both sides from
the same noise; the decoded frames ([0, 1]) must agree within ATOL.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from sora_jax.cli import main
from tests.test_cli import _run_error
from tests.test_convert import _perturbed

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
SENTENCES = [
    "two balls, red and blue; the red ball falls", "a blue ball bounces off the wall",
    "three balls roll to the left", "the green ball rests on the floor", "a small red ball jumps high",
    "balls collide and scatter across the table", "one ball: cyan; it moves right slowly",
]


def _tokenizer(folder):
    """A T5 tokenizer over a tiny SentencePiece unigram model (T5 ids: pad 0, eos 1, unk 2)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    folder.mkdir()
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return transformers.T5TokenizerFast.from_pretrained(str(folder), extra_ids=0)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(diffusers WanPipeline, its saved folder, our converted folder, initial noise .npy)."""
    root = tmp_path_factory.mktemp("wan_pipeline")
    tokenizer = _tokenizer(root / "spm")
    torch.manual_seed(0)
    vae = _perturbed(diffusers.AutoencoderKLWan(
        base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[2.0, 1.5, 0.8, 1.2]))
    transformer = _perturbed(diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=64, num_layers=2))
    t5_cfg = transformers.UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu")
    text_encoder = _perturbed(transformers.UMT5EncoderModel(t5_cfg))
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=SHIFT)
    pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    src = root / "diffusers"
    pipe.save_pretrained(src)
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
