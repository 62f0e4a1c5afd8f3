"""3D rotary position embedding over (frame, row, column) token coordinates, as in Wan2.1.

The head dimension is split into three bands: h and w get `2 * (head_dim // 6)` channels each and t
gets the rest; each band rotates interleaved channel pairs (0,1), (2,3), ... by its own coordinate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dimension given to the (t, h, w) coordinates, Wan's split."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    if head_dim % 2 or min(t_dim, h_dim) <= 0:
        raise ValueError(
            f"attention head_dim={head_dim} cannot be split for 3D RoPE: it must be even and >= 6"
        )
    return t_dim, h_dim, w_dim


def _rope_1d(dim: int, max_seq_len: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_seq_len, dim] in float64, each frequency repeated for its interleaved pair."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # [dim/2]
    angles = np.outer(np.arange(max_seq_len, dtype=np.float64), freqs)  # [pos, dim/2]
    return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def rope_freqs_3d(
    head_dim: int,
    grid: tuple[int, int, int],
    max_seq_len: int = 1024,
    theta: float = 10000.0,
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [tokens, head_dim] (float32) for a (T, H, W) token grid flattened row-major."""
    t, h, w = grid
    if max(grid) > max_seq_len:
        raise ValueError(
            f"token grid (T, H, W)={grid} exceeds rope_max_seq_len={max_seq_len}; raise it in DiTConfig"
        )
    # Computed in float64 numpy (at trace time, so a constant in the graph) as the reference does;
    # float32 angles drift visibly at positions in the hundreds.
    bands = []
    for dim, n, axis in zip(rope_split(head_dim), grid, range(3)):
        cos, sin = _rope_1d(dim, max_seq_len, theta)
        shape = [1, 1, 1, dim]
        shape[axis] = n
        bands.append(
            (np.broadcast_to(cos[:n].reshape(shape), (t, h, w, dim)),
             np.broadcast_to(sin[:n].reshape(shape), (t, h, w, dim)))
        )
    cos = np.concatenate([b[0] for b in bands], axis=-1).reshape(t * h * w, head_dim)
    sin = np.concatenate([b[1] for b in bands], axis=-1).reshape(t * h * w, head_dim)
    return cos.astype(np.float32), sin.astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate channel pairs (0,1), (2,3).. of x [batch, tokens, heads, head_dim] by cos/sin [tokens, hd]."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [batch, tokens, heads, head_dim/2]
    c = cos[None, :, None, 0::2]  # [1, tokens, 1, head_dim/2]
    s = sin[None, :, None, 1::2]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)  # [batch, tokens, heads, head_dim/2, 2]
    return out.reshape(x.shape).astype(dtype)
