"""diffusers `AutoencoderKLWan` (Wan2.1) state dict -> `CausalVAE` variables.

Our module tree mirrors diffusers', so the name map is mechanical: `down_blocks.3` <-> `down_blocks_3`,
`weight` <-> `kernel` (convs) or `gamma` (norms). Layouts: Conv3d OIDHW -> DHWIO, Conv2d OIHW -> HWIO,
RMS-norm gammas (C, 1, 1[, 1]) -> (C,).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sora_jax.convert.safetensors_io import read_safetensors
from sora_jax.models.vae import CausalVAE, VAEConfig


def diffusers_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the diffusers state-dict key it is read from."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _to_ours(name: str, tensor: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Change one tensor's layout from PyTorch to ours."""
    if tensor.ndim == 5:  # Conv3d [out, in, t, h, w] -> [t, h, w, in, out]
        tensor = tensor.transpose(2, 3, 4, 1, 0)
    elif tensor.ndim == 4 and len(target_shape) == 4:  # Conv2d [out, in, h, w] -> [h, w, in, out]
        tensor = tensor.transpose(2, 3, 1, 0)
    elif name.endswith(("gamma", "bias")) and len(target_shape) == 1:  # norm (C, 1, 1, 1) -> (C,)
        tensor = tensor.reshape(-1)
    if tuple(tensor.shape) != tuple(target_shape):
        raise ValueError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} after layout change but the model expects "
            f"{tuple(target_shape)}; does the VAEConfig match the checkpoint?"
        )
    return tensor


def param_shapes(cfg: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of CausalVAE parameters (computed abstractly, no memory)."""
    s = cfg.spatial_factor
    video = jax.ShapeDtypeStruct((1, 1 + cfg.temporal_factor, s, s, 3), jnp.float32)
    abstract = jax.eval_shape(CausalVAE(cfg).init, jax.random.PRNGKey(0), video)
    flat = traverse_util.flatten_dict(abstract["params"])
    # Leaves may be boxed (nn.Partitioned); both expose .shape via unbox.
    return {k: tuple(getattr(v, "value", v).shape) for k, v in flat.items()}


def convert_wan_vae_state_dict(
    state_dict: Mapping[str, Any], cfg: VAEConfig, dtype: Any = None
) -> dict[str, Any]:
    """diffusers AutoencoderKLWan state dict (name -> array) -> `{'params': ...}` for CausalVAE.apply.

    Raises ValueError naming the first missing, mismatched or unexpected tensor.
    """
    dtype = dtype or cfg.param_dtype
    shapes = param_shapes(cfg)
    used: set[str] = set()
    flat: dict[tuple[str, ...], jax.Array] = {}
    for path, shape in shapes.items():
        name = diffusers_name(path)
        if name not in state_dict:
            raise ValueError(
                f"checkpoint is missing tensor {name!r} (for {'/'.join(path)}); "
                "is it a Wan2.1 AutoencoderKLWan state dict?"
            )
        tensor = np.asarray(state_dict[name], dtype=np.float32)
        flat[path] = jnp.asarray(_to_ours(name, tensor, shape), dtype=dtype)
        used.add(name)
    extra = sorted(set(state_dict) - used)
    if extra:
        raise ValueError(
            f"checkpoint has {len(extra)} tensor(s) the model does not use, first {extra[0]!r}; "
            "does the VAEConfig (base_dim, dim_mult, num_res_blocks, attn_scales) match the checkpoint?"
        )
    return {"params": traverse_util.unflatten_dict(flat)}


def load_wan_vae_safetensors(path: str, cfg: VAEConfig | None = None, dtype: Any = None) -> dict[str, Any]:
    """Read a Wan2.1 VAE safetensors file or folder (diffusers layout) into CausalVAE variables."""
    return convert_wan_vae_state_dict(read_safetensors(path), cfg or VAEConfig.wan21(), dtype)
