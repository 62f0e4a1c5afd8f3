"""Bounded-memory VAE encode/decode: temporal chunks with a causal feature cache, spatial tiles.

- Chunks: the encoder sees frame 0, then `temporal_factor` frames at a time; the decoder one latent
  frame at a time. Each causal conv carries its last input frames from chunk to chunk in the flax
  `cache` collection (see `vae_blocks`), so the result equals the whole-clip pass while activation
  memory stays that of one chunk. The chunks run in one `lax.scan`: compiled once, whatever the length.
- Tiles: overlapping spatial tiles, each encoded/decoded on its own and blended linearly over the
  overlap, in the same order and with the same weights as diffusers' `AutoencoderKLWan.tiled_*`
  (so a converted Wan2.1 VAE with tiling on gives diffusers' tiled output).

`VideoCodec` bundles the choice; its `encode`/`decode` are jitted with the codec as a static arg.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from sora_jax.models.vae import CausalVAE, denormalize_latents, split_moments, validate_video_shape

Params = Any


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Spatial tiles in pixels (diffusers' tile_sample_min_* / tile_sample_stride_*)."""

    tile: int = 256
    stride: int = 192

    def check(self, spatial_factor: int) -> None:
        """Raise a one-line ValueError unless the tiles line up with latent pixels."""
        if not 0 < self.stride < self.tile:
            raise ValueError(f"tiling needs 0 < stride < tile; got tile={self.tile}, stride={self.stride}")
        if self.tile % spatial_factor or self.stride % spatial_factor:
            raise ValueError(
                f"tile={self.tile} and stride={self.stride} must be multiples of the VAE's spatial "
                f"factor {spatial_factor}"
            )


def encode_moments_chunked(model: CausalVAE, params: Params, video: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] -> float32 moments [B, t, h, w, 2z], fed 1 then `temporal_factor` frames at a time."""
    tf = model.cfg.temporal_factor
    first, state = model.apply(params, video[:, :1], method=CausalVAE.encode_moments, mutable=["cache"])
    chunks = (video.shape[1] - 1) // tf
    if chunks == 0:
        return first
    b, _, h, w, c = video.shape
    rest = video[:, 1:].reshape(b, chunks, tf, h, w, c).swapaxes(0, 1)  # [chunks, B, tf, H, W, 3]
    rest_out = _scan_chunks(model, params, CausalVAE.encode_moments, state["cache"], rest)
    return jnp.concatenate([first, rest_out], axis=1)


def decode_unclamped_chunked(model: CausalVAE, params: Params, z: jax.Array) -> jax.Array:
    """[B, t, h, w, z] -> float32 unclamped [B, 1+tf(t-1), H, W, 3], one latent frame at a time."""
    first, state = model.apply(params, z[:, :1], method=CausalVAE.decode_unclamped, mutable=["cache"])
    if z.shape[1] == 1:
        return first
    rest = z[:, 1:, None].swapaxes(0, 1)  # [t-1, B, 1, h, w, z]
    return jnp.concatenate(
        [first, _scan_chunks(model, params, CausalVAE.decode_unclamped, state["cache"], rest)], axis=1
    )


def _scan_chunks(model: CausalVAE, params: Params, method: Callable, cache: Any, chunks: jax.Array) -> jax.Array:
    """Run `method` over chunks [n, B, ...] carrying the cache; outputs joined along time."""

    def body(cache, chunk):
        out, state = model.apply({**params, "cache": cache}, chunk, method=method, mutable=["cache"])
        return state["cache"], out

    _, outs = lax.scan(body, cache, chunks)  # [n, B, frames_per_chunk, ...]
    outs = outs.swapaxes(0, 1)
    return outs.reshape(outs.shape[0], -1, *outs.shape[3:])


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """diffusers' blend_v/blend_h: the first `extent` rows of b fade in from the last rows of a."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    ramp = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
    tail = lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head = lax.slice_in_dim(b, 0, extent, axis=axis)
    body = lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([tail * (1 - ramp) + head * ramp, body], axis=axis)


def _tiled(
    x: jax.Array, fn: Callable[[jax.Array], jax.Array], tile: int, stride: int, out_tile: int, out_stride: int,
    out_hw: tuple[int, int],
) -> jax.Array:
    """Apply fn to overlapping tiles of x [B, T, H, W, C] and blend; a tile maps to out_tile pixels.

    Tiles of one shape run through a single `lax.map`: the model is traced and compiled once per
    distinct tile shape (at most four: full, short last row, short last column, corner) instead of
    once per tile, and tiles still run one after another, so memory stays that of one tile.
    """
    height, width = x.shape[2:4]
    starts = [(i, j) for i in range(0, height, stride) for j in range(0, width, stride)]
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j in starts:
        groups.setdefault((min(tile, height - i), min(tile, width - j)), []).append((i, j))
    done = {}
    for (th, tw), where in groups.items():
        tiles = jnp.stack([x[:, :, i : i + th, j : j + tw] for i, j in where])  # [n, B, T, th, tw, C]
        outs = fn(tiles[0])[None] if len(where) == 1 else lax.map(fn, tiles)
        done.update({ij: outs[k] for k, ij in enumerate(where)})
    rows = [[done[(i, j)] for j in range(0, width, stride)] for i in range(0, height, stride)]
    blend, keep = out_tile - out_stride, out_stride
    # Blending order matters (diffusers blends in place): a tile takes the already-blended tile
    # above, then the already-blended tile to its left.
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], blend, axis=2)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], blend, axis=3)
        out_rows.append(jnp.concatenate([t[:, :, :keep, :keep] for t in row], axis=3))
    return jnp.concatenate(out_rows, axis=2)[:, :, : out_hw[0], : out_hw[1]]


@dataclasses.dataclass(frozen=True)
class VideoCodec:
    """How to run a CausalVAE: whole clip or chunked in time, optionally tiled in space."""

    model: CausalVAE
    chunked: bool = True
    tiling: Tiling | None = None

    def _moments(self, params: Params, video: jax.Array) -> jax.Array:
        if self.chunked:
            return encode_moments_chunked(self.model, params, video)
        return self.model.apply(params, video, method=CausalVAE.encode_moments)

    def _pixels(self, params: Params, z: jax.Array) -> jax.Array:
        if self.chunked:
            return decode_unclamped_chunked(self.model, params, z)
        return self.model.apply(params, z, method=CausalVAE.decode_unclamped)

    def encode_fn(self, params: Params, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video [B, T, H, W, 3] in [-1, 1] -> (mean, logvar) float32; traceable (not jitted)."""
        cfg = self.model.cfg
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"video must be [batch, frames, height, width, 3]; got shape {tuple(video.shape)}")
        validate_video_shape(cfg, *video.shape[1:4])
        height, width = video.shape[2:4]
        t = self.tiling
        if t is not None and (height > t.tile or width > t.tile):
            t.check(cfg.spatial_factor)
            s = cfg.spatial_factor
            moments = _tiled(
                video, functools.partial(self._moments, params), t.tile, t.stride, t.tile // s, t.stride // s,
                (height // s, width // s),
            )
        else:
            moments = self._moments(params, video)
        return split_moments(moments)

    def decode_fn(self, params: Params, z: jax.Array) -> jax.Array:
        """latent [B, t, h, w, z] -> video [B, T, H, W, 3] in [-1, 1]; traceable (not jitted)."""
        cfg = self.model.cfg
        if z.ndim != 5 or z.shape[-1] != cfg.z_dim:
            raise ValueError(f"latent must be [batch, frames, height, width, {cfg.z_dim}]; got shape {tuple(z.shape)}")
        s, t = cfg.spatial_factor, self.tiling
        h, w = z.shape[2:4]
        if t is not None and (h > t.tile // s or w > t.tile // s):
            t.check(s)
            out = _tiled(
                z, functools.partial(self._pixels, params), t.tile // s, t.stride // s, t.tile, t.stride, (h * s, w * s)
            )
        else:
            out = self._pixels(params, z)
        return jnp.clip(out, -1.0, 1.0)

    @functools.partial(jax.jit, static_argnums=0)
    def encode(self, params: Params, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Jitted `encode_fn`."""
        return self.encode_fn(params, video)

    @functools.partial(jax.jit, static_argnums=0)
    def decode(self, params: Params, z: jax.Array) -> jax.Array:
        """Jitted `decode_fn`."""
        return self.decode_fn(params, z)


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(vae: CausalVAE, params: Any, z: jax.Array) -> jax.Array:
    """Normalized latents [B, T', H', W', C] -> videos [B, T, H, W, 3] in [-1, 1] (chunked VAE decode)."""
    # Chunked: decoder memory stays that of one latent frame, whatever the video length.
    return VideoCodec(vae, chunked=True).decode_fn(params, denormalize_latents(z, vae.cfg))
