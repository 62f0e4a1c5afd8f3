"""Latent-frame conditioning: every prompting mode is "hold these latent cells at these values".

A `LatentCondition` is (latents [B, T', H', W', C], mask [B, T', H', W', 1] with 1 = given) plus an
optional SDEdit strength. Flow samplers overwrite the given cells at the start and after every step,
and with the clean latents at the end, so given cells come out bit for bit. What they are overwritten
with depends on how the DiT was trained (`t0`): a DiT trained with conditioning masks and
`diffusion.given_t0` saw its given cells clean at timestep 0, so they are held clean and the network
gets per-cell timesteps (0 on given cells); any other DiT (e.g. Wan2.1 text-to-video) gets them at
the current noise level, (1 - sigma) x0 + sigma eps with the run's own starting noise eps
(replacement).
`strength` starts the solve part-way: from the sampler step whose sigma is closest to it, at
x = (1 - sigma_k) latents + sigma_k eps everywhere (SDEdit, Meng et al. 2022).

Training (`MaskRates`, `sample_train_masks`) draws the same kinds of masks at random, as Open-Sora
does, so one DiT serves every mode: given cells are fed clean (x_t = x0) and left out of the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion.flow import add_noise

MODES = ("t2v", "t2i", "i2v", "extend", "interpolate", "inpaint", "sdedit")
MODE_HELP = {
    "t2v": "text to video",
    "t2i": "text to image (a 1-frame video)",
    "i2v": "animate --input (image, or a video's first frame) given as the first frame",
    "extend": "continue --input forward in time (--direction backward: generate what came before it)",
    "interpolate": "connect --input A to --input B (clips or frames) with generated frames between them",
    "inpaint": "regenerate --mask-box y0,x0,y1,x1 and/or --mask-frames a:b of --input, keep the rest",
    "sdedit": "edit --input with the prompt: noise it to --strength s in [0, 1], then denoise",
}


@dataclasses.dataclass(frozen=True)
class LatentCondition:
    """Latent cells held fixed while sampling (mask 1 = given), and an optional SDEdit start strength."""

    latents: jax.Array  # [B, T', H', W', C] normalized latents (values only matter where mask = 1, or with strength)
    mask: jax.Array  # [B, T', H', W', 1] float32, 1 = given
    strength: float | None = None  # static: the sampler start step depends on it
    # static: given cells are held clean and seen at timestep 0 (a DiT trained with diffusion.given_t0)
    t0: bool = False


jax.tree_util.register_dataclass(LatentCondition, data_fields=["latents", "mask"], meta_fields=["strength", "t0"])


def hold(x: jax.Array, cond: LatentCondition, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    """x with the given cells replaced by the conditioning latents: clean under t0, else noised to sigma."""
    given = cond.latents if cond.t0 else add_noise(cond.latents, eps, sigma)
    return jnp.where(cond.mask > 0, given, x)


def network_timesteps(cond: LatentCondition | None, t: jax.Array) -> jax.Array:
    """The timestep the network sees: t itself, or per latent cell [B, T', H', W'] with given cells at 0 under t0."""
    if cond is None or not cond.t0:
        return t
    return jnp.where(cond.mask[..., 0] > 0, 0.0, jnp.asarray(t, jnp.float32))


def finish(x: jax.Array, cond: LatentCondition) -> jax.Array:
    """x with the given cells set to the clean conditioning latents, bitwise."""
    return jnp.where(cond.mask > 0, cond.latents, x)


def start_index(sigmas: np.ndarray, strength: float | None) -> int:
    """First step of an SDEdit solve: the grid point whose sigma is closest to `strength` (0 without one)."""
    if strength is None:
        return 0
    _check_strength(strength)
    return int(np.argmin(np.abs(np.asarray(sigmas, np.float64) - strength)))


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength} is outside [0, 1]; use e.g. 0.6 (1 = ignore the input, 0 = keep it)")


# ----------------------------------------------------------------------------------------------
# Builders at the latent level. `shape` is the output latent shape (B, T', H', W', C); the input
# latents are [B, t, H', W', C] with t <= T'.


def _place(shape: Sequence[int], parts: Sequence[tuple[int, jax.Array]]) -> LatentCondition:
    """Latent frames `z` [B, t, H', W', C] written at frame offset `start`, masked as given."""
    latents = jnp.zeros(shape, jnp.float32)
    mask = jnp.zeros((*shape[:-1], 1), jnp.float32)
    for start, z in parts:
        _check_fits(shape, z, start)
        latents = latents.at[:, start:start + z.shape[1]].set(z.astype(jnp.float32))
        mask = mask.at[:, start:start + z.shape[1]].set(1.0)
    return LatentCondition(latents, mask)


def _check_fits(shape: Sequence[int], z: jax.Array, start: int) -> None:
    if z.ndim != 5 or z.shape[0] != shape[0] or tuple(z.shape[2:]) != tuple(shape[2:]):
        raise ValueError(f"conditioning latents of shape {tuple(z.shape)} do not fit the output latents {tuple(shape)}; "
                         "encode inputs at the output's height and width")
    if start < 0 or start + z.shape[1] > shape[1]:
        raise ValueError(f"{z.shape[1]} conditioning latent frame(s) at offset {start} do not fit in {shape[1]}; "
                         "use fewer conditioning frames or more output frames")


def first_frames(shape: Sequence[int], z: jax.Array) -> LatentCondition:
    """Given: the first z.shape[1] latent frames (i2v with one frame, extend forward with more)."""
    return _place(shape, [(0, z)])


def last_frames(shape: Sequence[int], z: jax.Array) -> LatentCondition:
    """Given: the last z.shape[1] latent frames (extend backward)."""
    return _place(shape, [(shape[1] - z.shape[1], z)])


def both_ends(shape: Sequence[int], head: jax.Array, tail: jax.Array) -> LatentCondition:
    """Given: `head` at the start and `tail` at the end (interpolate); at least one frame between them."""
    if head.shape[1] + tail.shape[1] >= shape[1]:
        raise ValueError(f"{head.shape[1]} + {tail.shape[1]} conditioning latent frames leave none of {shape[1]} to "
                         "generate; use more output frames or shorter input clips")
    return _place(shape, [(0, head), (shape[1] - tail.shape[1], tail)])


def pixel_to_latent_mask(given: np.ndarray, temporal_factor: int, spatial_factor: int) -> np.ndarray:
    """Pixel mask [T, H, W] (True = keep) -> latent mask [T', H', W'] for a causal VAE.

    A latent cell is given only if every pixel of every frame it encodes is given: latent frame 0
    encodes pixel frame 0, latent frame j >= 1 frames 1 + tf (j - 1) .. tf j.
    """
    given = np.asarray(given, bool)
    t, h, w = given.shape
    tf, s = temporal_factor, spatial_factor
    if (t - 1) % tf or h % s or w % s:
        raise ValueError(f"pixel mask {given.shape} is not a {tf}k+1 frames x multiple-of-{s} grid; match the video size")
    first = given[:1]
    rest = given[1:].reshape((t - 1) // tf, tf, h, w).all(axis=1)
    frames = np.concatenate([first, rest])  # [T', H, W]
    return frames.reshape(len(frames), h // s, s, w // s, s).all(axis=(2, 4))


def region(z: jax.Array, latent_given: np.ndarray) -> LatentCondition:
    """Given: the latent cells of `z` [B, T', H', W', C] where latent_given [T', H', W'] is True (inpaint)."""
    if tuple(latent_given.shape) != tuple(z.shape[1:4]):
        raise ValueError(f"mask grid {tuple(latent_given.shape)} does not match latents {tuple(z.shape[1:4])}")
    mask = jnp.broadcast_to(jnp.asarray(latent_given, jnp.float32)[None, ..., None], (*z.shape[:-1], 1))
    return LatentCondition(z.astype(jnp.float32), mask)


def sdedit(z: jax.Array, strength: float) -> LatentCondition:
    """Start from `z` noised to `strength`, nothing held (video-to-video editing)."""
    _check_strength(strength)
    return LatentCondition(z.astype(jnp.float32), jnp.zeros((*z.shape[:-1], 1), jnp.float32), float(strength))


# ----------------------------------------------------------------------------------------------
# Training-time masks.

MASK_STRATEGIES = ("none", "first_frame", "first_k", "last_k", "both_ends", "random_frames", "random_box")


@dataclasses.dataclass(frozen=True)
class MaskRates:
    """Probability of each conditioning-mask strategy per training example; "none" takes the rest."""

    first_frame: float = 0.0
    first_k: float = 0.0
    last_k: float = 0.0
    both_ends: float = 0.0
    random_frames: float = 0.0
    random_box: float = 0.0

    def __post_init__(self):
        rates = dataclasses.astuple(self)
        if min(rates) < 0 or sum(rates) > 1 + 1e-9:
            raise ValueError(f"mask rates {dataclasses.asdict(self)} must be >= 0 and sum to at most 1")

    @property
    def enabled(self) -> bool:
        """Whether any strategy other than "none" can be drawn."""
        return sum(dataclasses.astuple(self)) > 0

    def probs(self) -> np.ndarray:
        """Probabilities in MASK_STRATEGIES order."""
        rates = np.asarray(dataclasses.astuple(self), np.float64)
        return np.concatenate([[max(0.0, 1.0 - rates.sum())], rates])


def strategy_masks(rng: jax.Array, batch: int, grid: Sequence[int]) -> jax.Array:
    """Every strategy's mask for every example: [S, B, T', H', W'] float32 (S = len(MASK_STRATEGIES))."""
    t_len, h_len, w_len = grid
    r_k, r_k2, r_frames, r_box = jax.random.split(rng, 4)
    t = jnp.arange(t_len)[None]  # [1, T']
    # Temporal strategies keep at least one latent frame to generate: k in [1, T' - 1].
    k = jax.random.randint(r_k, (batch, 1), 1, max(t_len, 2))  # [B, 1]
    k_end = jax.random.randint(r_k2, (batch, 1), 1, max((t_len - 1) // 2, 1) + 1)  # [B, 1], both ends
    # random frames: n in [1, T' - 1] of them, at uniformly random positions (the n lowest ranks).
    r_n, r_u = jax.random.split(r_frames)
    n = jax.random.randint(r_n, (batch, 1), 1, max(t_len, 2))  # [B, 1]
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(r_u, (batch, t_len)), axis=1), axis=1)  # [B, T']
    frames = (rank < n) & (t_len > 1)
    temporal = jnp.stack([
        jnp.zeros((batch, t_len), bool),  # none
        jnp.broadcast_to(t == 0, (batch, t_len)) & (t_len > 1),  # first frame
        (t < k) & (t_len > 1),  # first k
        (t >= t_len - k) & (t_len > 1),  # last k
        ((t < k_end) | (t >= t_len - k_end)) & (t_len > 2),  # both ends
        frames,  # random frames
    ]).astype(jnp.float32)  # [6, B, T']
    temporal = jnp.broadcast_to(temporal[..., None, None], (*temporal.shape, h_len, w_len))
    # random box: a box of cells (all frames) is regenerated, everything around it given (inpainting).
    size = jax.random.randint(r_box, (2, batch, 1), 1, jnp.array([h_len, w_len])[:, None, None] + 1)  # [2, B, 1]
    start = jax.random.randint(jax.random.fold_in(r_box, 1), (2, batch, 1), 0,
                               jnp.array([h_len, w_len])[:, None, None] - size + 1)  # [2, B, 1]
    ys, xs = jnp.arange(h_len)[None], jnp.arange(w_len)[None]  # [1, H'], [1, W']
    in_y = (ys >= start[0]) & (ys < start[0] + size[0])  # [B, H']
    in_x = (xs >= start[1]) & (xs < start[1] + size[1])  # [B, W']
    box = ~(in_y[:, :, None] & in_x[:, None, :])  # [B, H', W'] given outside the box
    box = jnp.broadcast_to(box[:, None], (batch, t_len, h_len, w_len)).astype(jnp.float32)
    return jnp.concatenate([temporal, box[None]])  # [S, B, T', H', W']


def sample_train_masks(rng: jax.Array, rates: MaskRates, batch: int, grid: Sequence[int]) -> jax.Array:
    """One random strategy per example -> given-cell masks [B, T', H', W', 1] float32 (1 = given)."""
    r_pick, r_masks = jax.random.split(rng)
    pick = jax.random.categorical(r_pick, jnp.log(jnp.asarray(rates.probs(), jnp.float32)), shape=(batch,))  # [B]
    masks = strategy_masks(r_masks, batch, grid)  # [S, B, T', H', W']
    chosen = jnp.take_along_axis(masks, pick[None, :, None, None, None], axis=0)[0]  # [B, T', H', W']
    return chosen[..., None]
