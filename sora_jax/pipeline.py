"""Text-to-video inference: prompt -> text encoder -> jitted flow sampler over the DiT -> VAE decode.

Two kinds of model folder load: our training runs (`TextToVideo.load`, BERT text encoder) and
folders written by `sora-jax convert wan` from a diffusers WanPipeline (`from_pretrained`, umT5),
whose sampling reproduces diffusers' WanPipeline (prompt handling, CFG, scheduler grid, decode).
"""

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
from sora_jax.convert.t5 import abstract_t5_params
from sora_jax.convert.wan_pipeline import PIPELINE_FILE, PIPELINE_KIND, T5_CONFIG_FILE
from sora_jax.data.pipeline import uint8_to_float
from sora_jax.diffusion import conditioning as lc
from sora_jax.diffusion import flow
from sora_jax.diffusion.samplers import Conditioning, LoopSampler, sampler_for_run
from sora_jax.models.text.encoder import T5TextEncoder, check_prompts
from sora_jax.models.dit import DiT, DiTConfig, DiTDenoiser, validate_latent_grid
from sora_jax.models.text.t5 import T5Config
from sora_jax.models.vae import CausalVAE, normalize_latents
from sora_jax.models.vae_codec import VideoCodec, decode_latents
from sora_jax.train import checkpoint
from sora_jax.train.dit_trainer import DIT_CONFIG_FILE, RUN_FILE, null_text
from sora_jax.train.setup import dataclass_from_json, on_one_device
from sora_jax.train.vae_trainer import VAE_CONFIG_FILE, load_vae, load_vae_at


@functools.partial(jax.jit, static_argnums=0)
def _encode_latents(vae: CausalVAE, params, video):
    # The posterior mean, normalized as the DiT's training latents are (latent_records.py).
    return normalize_latents(VideoCodec(vae, chunked=True).encode_fn(params, video)[0], vae.cfg)


Input = str | Path | np.ndarray  # an image/video file, or frames [T, H, W, 3] / [H, W, 3] (uint8, or float in [-1, 1])


def restore_dit(folder: Path, text_len: int, step: int | None = None, param_dtype: Any = None
                ) -> tuple[DiTConfig, int, Any]:
    """(config, step, EMA-or-raw params) of a DiT run or converted folder (dit_config.json + ckpt/): checkpoint
    `step`, or the newest readable one; with `param_dtype`, cast to it on restore (the config says so too)."""
    cfg = dataclass_from_json(DiTConfig, checkpoint.read_json(folder / DIT_CONFIG_FILE))
    if param_dtype is not None:
        # Layers the model keeps in float32 whatever param_dtype says stay float32.
        cfg = dataclasses.replace(cfg, param_dtype=jnp.dtype(param_dtype))
    at, params = checkpoint.restore_params_at(folder / "ckpt", on_one_device(abstract_dit_params(cfg, text_len)),
                                              step=step)
    return cfg, at, params


def load_run_vae(dit_workdir: Path, run: dict, fix: str) -> tuple[CausalVAE, Any, dict[str, Any]]:
    """The VAE a DiT run trained on, as `load_vae_at` returns it; a missing or other VAE is one line ending in `fix`.

    The step the DiT trained on (runs from before it was recorded: the newest), and only those weights: a VAE
    folder since replaced or trained on would decode the wrong latents. A relative vae_workdir (an exported
    folder's "vae") is relative to the DiT folder.
    """
    vae_dir = dit_workdir / run["vae_workdir"]
    if not (vae_dir / VAE_CONFIG_FILE).is_file():
        raise checkpoint.CheckpointError(
            f"the VAE this DiT was trained on (step {run.get('vae_step')}, weights {run.get('vae_params')}) is not "
            f"at {vae_dir}; {fix}")
    vae, vae_params, vae_id = load_vae_at(vae_dir, run.get("vae_step"))
    if run.get("vae_params") not in (None, vae_id["vae_params"]):
        raise checkpoint.CheckpointError(
            f"the VAE in {vae_dir} at step {vae_id['vae_step']} is not the one this DiT was trained on (weights "
            f"{vae_id['vae_params']}, run.json says {run['vae_params']}); {fix}")
    return vae, vae_params, vae_id


def abstract_dit_params(cfg: DiTConfig, text_len: int) -> Any:
    """Shapes and dtypes of a DiT's variables ({"params": ...}); allocates nothing."""
    # The parameter shapes do not depend on the latent grid: initialise on the smallest one.
    dummy = (jnp.zeros((1, *cfg.patch_size, cfg.in_channels)), jnp.zeros((1,)),
             jnp.zeros((1, text_len, cfg.text_dim)), jnp.ones((1, text_len), bool))
    return jax.eval_shape(lambda: nn.meta.unbox(DiT(cfg).init({"params": jax.random.key(0)}, *dummy)))


def to_unit_range(videos: np.ndarray) -> np.ndarray:
    """[-1, 1] videos -> float32 [0, 1], as diffusers' VideoProcessor.postprocess_video(output_type="np")."""
    return np.clip(np.asarray(videos, np.float32) / 2 + 0.5, 0.0, 1.0)


def noise_from_diffusers(latents: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """Initial noise in diffusers' layout (B, C, T', H', W') -> ours (B, T', H', W', C), shape checked.

    `expected` is our channels-last latent shape (see `TextToVideo.latent_shape`).
    """
    b, t, h, w, c = expected
    want = (b, c, t, h, w)
    if tuple(np.shape(latents)) != want:
        raise ValueError(f"latents have shape {tuple(np.shape(latents))} but {b} prompt(s) at this height/width/frames "
                         f"need {want} (batch, channels, latent frames, latent height, latent width); "
                         "match --height/--width/--frames and the prompt count to the noise")
    return np.transpose(np.asarray(latents, np.float32), (0, 2, 3, 4, 1))


@dataclasses.dataclass
class TextToVideo:
    """A loaded text-to-video model: VAE, DiT and text encoder with their weights."""

    vae: CausalVAE
    vae_params: Any
    dit_cfg: DiTConfig
    dit_params: Any
    text_encoder: Any
    defaults: dict
    kind: str = "run"  # "run": our training run (BERT); "wan": converted diffusers WanPipeline (umT5)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TextToVideo":
        """Load a folder written by `sora-jax convert wan`, or else a DiT training run's work directory."""
        path = Path(path).absolute()
        if not (path / PIPELINE_FILE).is_file():
            return cls.load(path)
        pipe = checkpoint.read_json(path / PIPELINE_FILE)
        if pipe.get("kind") != PIPELINE_KIND:
            raise ValueError(f"{path / PIPELINE_FILE} is of kind {pipe.get('kind')!r}; re-run sora-jax convert wan")
        vae, vae_params = load_vae(path / "vae")
        text_len = pipe["text_max_length"]
        dit_cfg, _, dit_params = restore_dit(path / "dit", text_len)
        t5_cfg = dataclass_from_json(T5Config, checkpoint.read_json(path / "text_encoder" / T5_CONFIG_FILE))
        t5_params = checkpoint.restore_params(path / "text_encoder" / "ckpt", on_one_device(abstract_t5_params(t5_cfg)))
        text_encoder = T5TextEncoder(t5_cfg, t5_params, path / "tokenizer", max_length=text_len)
        defaults = {
            "video": {"frames": pipe["frames"], "size": [pipe["height"], pipe["width"]]},
            "sample": {k: pipe[k] for k in ("solver", "steps", "guidance", "shift", "fps")},
            "text_max_length": text_len,
        }
        return cls(vae, vae_params, dit_cfg, dit_params, text_encoder, defaults, kind=PIPELINE_KIND)

    @classmethod
    def load(cls, dit_workdir: str | Path) -> "TextToVideo":
        """Load a DiT run (and the VAE run it was trained on) from its work directory."""
        dit_workdir = Path(dit_workdir).absolute()
        run = checkpoint.read_json(dit_workdir / RUN_FILE)
        vae, vae_params, _ = load_run_vae(dit_workdir, run, "copy that VAE's run folder there, or point "
                                          f"vae_workdir in {dit_workdir / RUN_FILE} at it")
        text_encoder = load_text_encoder(run["text_encoder_dir"] or None, max_length=run["text_max_length"])
        dit_cfg, _, params = restore_dit(dit_workdir, run["text_max_length"])
        return cls(vae, vae_params, dit_cfg, params, text_encoder, run)

    def make_sampler(self, solver: str | None = None, steps: int | None = None, guidance: float | None = None,
                     num_tokens: int | None = None) -> LoopSampler:
        """The sampler of this model's defaults (flow solver, or DDIM for a DDPM run), any field overridden.

        A run trained with sample.shift_by_resolution scales its flow shift to `num_tokens` (the
        video's DiT tokens, see `num_tokens`) as training did.
        """
        return sampler_for_run(self.defaults["sample"], self.defaults.get("objective"), solver=solver, steps=steps,
                               guidance=guidance, num_tokens=num_tokens, diffusers_grid=self.kind == PIPELINE_KIND)

    def _size(self, frames: int | None, size: int | Sequence[int] | None) -> tuple[int, int, int]:
        frames = frames or self.defaults["video"]["frames"]
        size = size or self.defaults["video"]["size"]
        height, width = (size, size) if isinstance(size, int) else size
        return frames, height, width

    def num_tokens(self, frames: int | None = None, size: int | Sequence[int] | None = None) -> int:
        """DiT tokens of one video of this size (the defaults where None)."""
        return flow.latent_tokens(self.latent_shape(1, frames, size)[1:4], self.dit_cfg.patch_size)

    def latent_shape(self, batch: int, frames: int | None = None, size: int | Sequence[int] | None = None) -> tuple[int, ...]:
        """Our channels-last noise shape (B, T', H', W', C) for a video size, validated against VAE and DiT."""
        frames, height, width = self._size(frames, size)
        grid = self.vae.cfg.latent_shape(frames, height, width)[:3]
        validate_latent_grid(self.dit_cfg, grid)
        return (batch, *grid, self.dit_cfg.in_channels)

    def encode_prompts(self, prompts: list[str], max_length: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Text embeddings [B, L, D] and mask [B, L] of prompts, with this model's text encoder."""
        if self.kind == PIPELINE_KIND:
            return self.text_encoder.encode(prompts, max_length)
        if max_length is not None:
            raise ValueError("max_sequence_length applies to converted Wan pipelines; a training run keeps its text_max_length")
        return self.text_encoder.encode(prompts)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        frames: int | None = None,
        size: int | tuple[int, int] | None = None,
        sampler: LoopSampler | None = None,
        negative_prompt: str | None = None,
        noise: np.ndarray | None = None,
        max_sequence_length: int | None = None,
        mode: str = "t2v",
        inputs: Sequence[Input] = (),
        mask_box: Sequence[int] | None = None,
        mask_frames: Sequence[int] | None = None,
        strength: float = 0.6,
        direction: str = "forward",
        cond_frames: int | None = None,
        return_latents: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Sample one video per prompt; returns float videos in [-1, 1], [B, T, H, W, 3].

        `noise` (our layout, `latent_shape`) replaces the noise drawn from `seed`. The unconditional
        branch encodes `negative_prompt`; without one it is "" for Wan pipelines (as diffusers) and the
        training runs' null text otherwise. `mode` and the mode options are those of `condition`;
        `return_latents` also returns the final latents [B, T', H', W', C] (given cells = conditioning).
        """
        prompts = check_prompts(prompts)
        if mode == "t2i":
            if frames not in (None, 1):
                raise ValueError(f"t2i makes one frame but frames={frames} was asked; drop frames or use t2v")
            frames = 1
        shape = self.latent_shape(len(prompts), frames, size)
        latent_cond = self.condition(mode, shape, inputs, mask_box=mask_box, mask_frames=mask_frames,
                                     strength=strength, direction=direction, cond_frames=cond_frames)
        if sampler is None:
            sampler = self.make_sampler(num_tokens=flow.latent_tokens(shape[1:4], self.dit_cfg.patch_size))
        text, mask = self.encode_prompts(prompts, max_sequence_length)
        text, mask = jnp.asarray(text), jnp.asarray(mask)
        # An empty negative prompt for a training run means its null text (BERT rejects empty prompts).
        if negative_prompt or self.kind == PIPELINE_KIND:
            n_text, n_mask = self.encode_prompts([negative_prompt or ""] * len(prompts), max_sequence_length)
        else:
            n_text, n_mask = null_text(len(prompts), text.shape[1], text.shape[2])
        if noise is None:
            noise = jax.random.normal(jax.random.key(seed), shape)
        elif tuple(np.shape(noise)) != shape:
            raise ValueError(f"noise has shape {tuple(np.shape(noise))}, expected {shape} (B, T', H', W', C)")
        z = sampler(DiTDenoiser(self.dit_cfg), self.dit_params, jnp.asarray(noise, jnp.float32),
                    Conditioning(text, mask, jnp.asarray(n_text), jnp.asarray(n_mask)), None, latent_cond)
        videos = np.asarray(decode_latents(self.vae, self.vae_params, z))
        return (videos, np.asarray(z)) if return_latents else videos

    def encode_video(self, video: np.ndarray) -> jax.Array:
        """Frames [T, H, W, 3] (uint8, or float in [-1, 1]) -> normalized latents [1, T', H', W', C]."""
        video = np.asarray(video)
        if video.dtype == np.uint8:
            video = uint8_to_float(video)  # the training loaders' mapping, so inputs match training data
        return _encode_latents(self.vae, self.vae_params, jnp.asarray(video, jnp.float32)[None])

    def load_input(self, item: Input, height: int, width: int, frames: int, what: str = "input") -> np.ndarray:
        """The first `frames` frames of an input, resized and center-cropped: uint8 [frames, height, width, 3]."""
        from sora_jax.data.video import fit_video, read_frames

        video = read_frames(item, max_frames=frames) if isinstance(item, (str, Path)) else np.asarray(item)
        if video.ndim == 3:
            video = video[None]
        name = item if isinstance(item, (str, Path)) else f"array of shape {video.shape}"
        if video.ndim == 4 and len(video) < frames:
            raise ValueError(f"{what} {name} has {len(video)} frame(s) but {frames} are needed; "
                             "pass a longer clip, or fewer --frames / --cond-frames")
        return fit_video(video[:frames], height, width)

    def condition(
        self,
        mode: str,
        shape: Sequence[int],
        inputs: Sequence[Input] = (),
        *,
        mask_box: Sequence[int] | None = None,
        mask_frames: Sequence[int] | None = None,
        strength: float = 0.6,
        direction: str = "forward",
        cond_frames: int | None = None,
    ) -> lc.LatentCondition | None:
        """The latent conditioning of a prompting mode for output latents `shape` (None for t2v/t2i).

        i2v: the first frame of inputs[0] is the first frame. extend: the first `cond_frames` frames
        (4k+1; default about half the output) of inputs[0] open the video (direction "forward") or close
        it ("backward"). interpolate: the first `cond_frames` (default 1) frames of inputs[0] open it and
        of inputs[1] close it. inpaint: inputs[0]'s frames are kept except `mask_box` (y0, x0, y1, x1
        pixels, end-exclusive) within `mask_frames` (a, b: frames a..b-1), each defaulting to everything.
        sdedit: inputs[0]'s frames noised to `strength`, then denoised.
        """
        cond = self._condition(mode, shape, inputs, mask_box=mask_box, mask_frames=mask_frames, strength=strength,
                               direction=direction, cond_frames=cond_frames)
        # A DiT trained with given_t0 saw its given cells clean at timestep 0; hold them that way.
        t0 = bool(self.defaults.get("given_t0", False))
        return cond if cond is None or not t0 else dataclasses.replace(cond, t0=True)

    def _condition(self, mode, shape, inputs, *, mask_box, mask_frames, strength, direction, cond_frames):
        if mode not in lc.MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(lc.MODES)}")
        n_inputs = {"t2v": 0, "t2i": 0, "interpolate": 2}.get(mode, 1)
        if len(inputs) != n_inputs:
            raise ValueError(f"mode {mode} takes {n_inputs} input(s) but got {len(inputs)}; "
                             f"pass {n_inputs} --input file(s)")
        if n_inputs == 0:
            return None
        b, t_lat, h_lat, w_lat, _ = shape
        tf, sf = self.vae.cfg.temporal_factor, self.vae.cfg.spatial_factor
        height, width, frames = h_lat * sf, w_lat * sf, 1 + tf * (t_lat - 1)

        def latents(item, n, what="input"):
            z = self.encode_video(self.load_input(item, height, width, n, what))
            return jnp.broadcast_to(z, (b, *z.shape[1:]))  # one input, every prompt

        if mode == "i2v":
            return lc.first_frames(shape, latents(inputs[0], 1))
        if mode in ("extend", "interpolate"):
            default = 1 if mode == "interpolate" else 1 + tf * (max(1, t_lat // 2) - 1)
            n = default if cond_frames is None else cond_frames
            if n < 1 or (n - 1) % tf:
                raise ValueError(f"cond_frames {n} is not {tf}k+1 (1, {1 + tf}, {1 + 2 * tf}, ...); pick one of those")
            if mode == "interpolate":
                return lc.both_ends(shape, latents(inputs[0], n, "first input"), latents(inputs[1], n, "second input"))
            if n >= frames:
                raise ValueError(f"extend conditions on {n} of {frames} frames, leaving none to generate; "
                                 "use more --frames or fewer --cond-frames")
            if direction not in ("forward", "backward"):
                raise ValueError(f"unknown direction {direction!r}; use 'forward' or 'backward'")
            z = latents(inputs[0], n)
            return lc.first_frames(shape, z) if direction == "forward" else lc.last_frames(shape, z)
        z = latents(inputs[0], frames)
        if mode == "sdedit":
            return lc.sdedit(z, strength)
        # inpaint: True = keep, in pixels; the regenerated region is box x frame range.
        if mask_box is None and mask_frames is None:
            raise ValueError("inpaint needs a region to regenerate; pass mask_box (--mask-box y0,x0,y1,x1) "
                             "and/or mask_frames (--mask-frames a:b)")
        y0, x0, y1, x1 = (0, 0, height, width) if mask_box is None else mask_box
        a, e = (0, frames) if mask_frames is None else mask_frames
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise ValueError(f"mask box {tuple(mask_box)} is not inside the {height}x{width} video; "
                             "use y0,x0,y1,x1 with 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width")
        if not 0 <= a < e <= frames:
            raise ValueError(f"mask frames {a}:{e} are not inside the {frames}-frame video; use a:b with 0 <= a < b <= {frames}")
        keep = np.ones((frames, height, width), bool)
        keep[a:e, y0:y1, x0:x1] = False
        return lc.region(z, lc.pixel_to_latent_mask(keep, tf, sf))
