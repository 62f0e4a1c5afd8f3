"""Text-to-video inference: prompt -> text encoder -> jitted flow sampler over the DiT -> VAE decode."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.convert.bert import load_text_encoder
from sora_jax.diffusion.samplers import Conditioning, LoopSampler, make_flow_sampler
from sora_jax.models.text.encoder import check_prompts
from sora_jax.models.dit import DiT, DiTConfig, validate_latent_grid
from sora_jax.models.vae import CausalVAE, denormalize_latents, validate_video_shape
from sora_jax.models.vae_codec import VideoCodec
from sora_jax.train import checkpoint
from sora_jax.train.dit_trainer import DIT_CONFIG_FILE, RUN_FILE, null_text
from sora_jax.train.setup import dataclass_from_json, on_one_device
from sora_jax.train.vae_trainer import load_vae


@dataclasses.dataclass(frozen=True)
class DiTDenoiser:
    """Hashable (params, x_t, t, text, mask) -> velocity wrapper, so samplers can jit over it."""

    cfg: DiTConfig

    def __call__(self, params, x, t, text, text_mask) -> jax.Array:
        return DiT(self.cfg).apply(params, x, t, text, text_mask)


@functools.partial(jax.jit, static_argnums=0)
def _decode(vae: CausalVAE, params, z):
    # Chunked: decoder memory stays that of one latent frame, whatever the video length.
    return VideoCodec(vae, chunked=True).decode_fn(params, denormalize_latents(z, vae.cfg))


@dataclasses.dataclass
class TextToVideo:
    """A loaded text-to-video model: VAE, DiT and text encoder with their weights."""

    vae: CausalVAE
    vae_params: Any
    dit_cfg: DiTConfig
    dit_params: Any
    text_encoder: Any
    defaults: dict

    @classmethod
    def load(cls, dit_workdir: str | Path) -> "TextToVideo":
        """Load a DiT run (and the VAE run it was trained on) from its work directory."""
        dit_workdir = Path(dit_workdir).absolute()
        run = checkpoint.read_json(dit_workdir / RUN_FILE)
        dit_cfg = dataclass_from_json(DiTConfig, checkpoint.read_json(dit_workdir / DIT_CONFIG_FILE))
        vae, vae_params = load_vae(run["vae_workdir"])
        text_encoder = load_text_encoder(run["text_encoder_dir"] or None, max_length=run["text_max_length"])
        model = DiT(dit_cfg)
        t, h, w = run["latent_grid"]
        dummy = (
            jnp.zeros((1, t, h, w, dit_cfg.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, run["text_max_length"], dit_cfg.text_dim)), jnp.ones((1, run["text_max_length"]), bool),
        )
        abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init({"params": jax.random.key(0)}, *dummy)))
        params = checkpoint.restore_params(dit_workdir / "ckpt", on_one_device(abstract))
        return cls(vae, vae_params, dit_cfg, params, text_encoder, run)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        frames: int | None = None,
        size: int | tuple[int, int] | None = None,
        sampler: LoopSampler | None = None,
    ) -> np.ndarray:
        """Sample one video per prompt; returns float videos in [-1, 1], [B, T, H, W, 3]."""
        prompts = check_prompts(prompts)
        frames = frames or self.defaults["video"]["frames"]
        size = size or self.defaults["video"]["size"]
        height, width = (size, size) if isinstance(size, int) else size
        vcfg = self.vae.cfg
        validate_video_shape(vcfg, frames, height, width)
        grid = (1 + (frames - 1) // vcfg.temporal_factor, height // vcfg.spatial_factor, width // vcfg.spatial_factor)
        validate_latent_grid(self.dit_cfg, grid)
        if sampler is None:
            s = self.defaults["sample"]
            sampler = make_flow_sampler(s["solver"], num_steps=s["steps"], guidance=s["guidance"], shift=s["shift"])
        text, mask = self.text_encoder.encode(prompts)
        text, mask = jnp.asarray(text), jnp.asarray(mask)
        n_text, n_mask = null_text(len(prompts), text.shape[1], text.shape[2])
        noise = jax.random.normal(jax.random.key(seed), (len(prompts), *grid, self.dit_cfg.in_channels))
        z = sampler(DiTDenoiser(self.dit_cfg), self.dit_params, noise, Conditioning(text, mask, n_text, n_mask))
        return np.asarray(_decode(self.vae, self.vae_params, z))
