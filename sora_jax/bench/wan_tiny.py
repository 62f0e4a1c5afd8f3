"""Random, weight-perturbed diffusers WanPipelines of named sizes, for parity tests and benchmarks.

Each pipeline is VAE (AutoencoderKLWan), DiT (WanTransformer3DModel), umT5 encoder, a T5 tokenizer
over a SentencePiece model trained here on a few ball captions, and Wan's UniPC flow scheduler.
Every weight is moved off its init so a mixed-up weight shows in a comparison.
Needs torch, diffusers, transformers and sentencepiece.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

from sora_jax.bench.harness import perturb_weights

SENTENCES = [
    "two balls, red and blue; the red ball falls", "a blue ball bounces off the wall",
    "three balls roll to the left", "the green ball rests on the floor", "a small red ball jumps high",
    "balls collide and scatter across the table", "one ball: cyan; it moves right slowly",
]


@dataclasses.dataclass(frozen=True)
class WanSize:
    """Constructor kwargs of the three models of one pipeline size."""

    vae: dict[str, Any]
    transformer: dict[str, Any]
    umt5: dict[str, Any]
    vocab_size: int = 120


SIZES: dict[str, WanSize] = {
    # the sizes tests/test_wan_pipeline.py has always used
    "tiny": WanSize(
        vae=dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                 temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                 latents_std=[2.0, 1.5, 0.8, 1.2]),
        transformer=dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=32,
                         freq_dim=32, ffn_dim=64, num_layers=2),
        umt5=dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16),
    ),
    # DiT = our config S (as scripts/bench_dit.py); VAE = the Wan2.1 layout (dim_mult 1,2,4,4, two res
    # blocks, 16 latent channels, Wan2.1's latent mean/std) at base_dim 32 instead of 96; a small umT5
    # whose d_model is the DiT's text_dim.
    "S": WanSize(
        vae=dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True]),
        transformer=dict(num_attention_heads=6, attention_head_dim=64, in_channels=16, out_channels=16,
                         text_dim=384, freq_dim=256, ffn_dim=1536, num_layers=12),
        umt5=dict(d_model=384, d_kv=64, d_ff=1024, num_layers=4, num_heads=6, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128),
    ),
}


def train_tokenizer(folder: str | Path, vocab_size: int = 120) -> Any:
    """A T5TokenizerFast over a SentencePiece unigram model trained on SENTENCES (T5 ids: pad 0, eos 1, unk 2)."""
    import sentencepiece as spm
    import transformers

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    folder = Path(folder)
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return transformers.T5TokenizerFast.from_pretrained(str(folder), extra_ids=0)


def build_wan_pipeline(size: str, workdir: str | Path, *, shift: float = 3.0, scale: float = 0.05) -> Any:
    """A random diffusers WanPipeline of SIZES[size] (its tokenizer trained into workdir/spm), progress bar off."""
    import diffusers
    import torch
    import transformers

    if size not in SIZES:
        raise ValueError(f"unknown Wan pipeline size {size!r}; use one of {sorted(SIZES)}")
    s = SIZES[size]
    tokenizer = train_tokenizer(Path(workdir) / "spm", s.vocab_size)
    torch.manual_seed(0)
    vae = perturb_weights(diffusers.AutoencoderKLWan(**s.vae), scale)
    transformer = perturb_weights(diffusers.WanTransformer3DModel(**s.transformer), scale)
    t5_cfg = transformers.UMT5Config(vocab_size=len(tokenizer), dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                     **s.umt5)
    text_encoder = perturb_weights(transformers.UMT5EncoderModel(t5_cfg), scale)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=shift)
    pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_wan_pipeline(size: str, workdir: str | Path, *, shift: float = 3.0) -> tuple[Any, Path]:
    """Build `build_wan_pipeline(size)` and save it to workdir/diffusers; returns (pipeline, folder)."""
    pipe = build_wan_pipeline(size, workdir, shift=shift)
    src = Path(workdir) / "diffusers"
    pipe.save_pretrained(src)
    return pipe, src
