"""Convert a diffusers `WanTransformer3DModel` state dict (Wan2.1 T2V) into `DiT` params.

Linear weights [out, in] become kernels [in, out]; the patch Conv3d OIDHW becomes DHWIO; per-block
tensors are stacked on a leading `layers` axis when the config scans over layers. Every expected
tensor must be present with the expected shape and nothing else may be left over, so a wrong
config or checkpoint fails loudly with the offending name.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.convert.safetensors_io import read_safetensors
from sora_jax.models.dit import DiT, DiTConfig

Transform = Callable[[np.ndarray], np.ndarray]

_linear: Transform = lambda w: np.transpose(w)  # [out, in] -> [in, out]
_same: Transform = lambda w: w
_conv: Transform = lambda w: np.transpose(w, (2, 3, 4, 1, 0))  # [O, I, D, H, W] -> [D, H, W, I, O]


def _dense(ours: tuple[str, ...], theirs: str) -> list[tuple[tuple[str, ...], str, Transform]]:
    """Mapping rows of one Linear layer (kernel and bias)."""
    return [(ours + ("kernel",), f"{theirs}.weight", _linear), (ours + ("bias",), f"{theirs}.bias", _same)]


def _block_rows(cfg: DiTConfig) -> list[tuple[tuple[str, ...], str, Transform]]:
    """Rows for one transformer block: (path inside the block, diffusers suffix, transform)."""
    rows = [(("scale_shift_table",), "scale_shift_table", _same)]
    for attn in ("attn1", "attn2"):
        for proj, theirs in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            rows += _dense((attn, proj), f"{attn}.{theirs}")
        if cfg.qk_norm:
            rows += [((attn, "norm_q", "scale"), f"{attn}.norm_q.weight", _same),
                     ((attn, "norm_k", "scale"), f"{attn}.norm_k.weight", _same)]
    if cfg.cross_attn_norm:
        rows += [(("norm2", "scale"), "norm2.weight", _same), (("norm2", "bias"), "norm2.bias", _same)]
    rows += _dense(("ffn", "proj_in"), "ffn.net.0.proj") + _dense(("ffn", "proj_out"), "ffn.net.2")
    return rows


def _top_rows() -> list[tuple[tuple[str, ...], str, Transform]]:
    """Rows outside the blocks."""
    return [
        (("patch_embedding", "kernel"), "patch_embedding.weight", _conv),
        (("patch_embedding", "bias"), "patch_embedding.bias", _same),
        *_dense(("time_embedding_1",), "condition_embedder.time_embedder.linear_1"),
        *_dense(("time_embedding_2",), "condition_embedder.time_embedder.linear_2"),
        *_dense(("time_projection",), "condition_embedder.time_proj"),
        *_dense(("text_embedding_1",), "condition_embedder.text_embedder.linear_1"),
        *_dense(("text_embedding_2",), "condition_embedder.text_embedder.linear_2"),
        (("scale_shift_table",), "scale_shift_table", _same),
        *_dense(("proj_out",), "proj_out"),
    ]


def _expected_shapes(cfg: DiTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of DiT(cfg) params, from an allocation-free abstract init."""
    pt, ph, pw = cfg.patch_size
    abstract = jax.eval_shape(
        DiT(cfg).init,
        jax.random.key(0),
        jnp.zeros((1, pt, ph, pw, cfg.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, cfg.text_dim)),
    )
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract["params"]))
    return {k: tuple(v.shape) for k, v in flat.items()}


def convert_wan_dit_state_dict(state_dict: dict[str, np.ndarray], cfg: DiTConfig) -> dict[str, Any]:
    """diffusers WanTransformer3DModel state dict -> DiT params tree (numpy; apply with {'params': tree})."""
    dtype = np.dtype(cfg.param_dtype)
    expected = _expected_shapes(cfg)
    used: set[str] = set()

    def take(key: str, transform: Transform, shape: tuple[int, ...]) -> np.ndarray:
        if key not in state_dict:
            raise ValueError(f"Wan DiT checkpoint is missing tensor {key!r} (config: {cfg})")
        value = transform(np.asarray(state_dict[key]))
        if value.shape != shape:
            raise ValueError(
                f"Wan DiT tensor {key!r} has shape {np.shape(state_dict[key])} -> {value.shape} after "
                f"conversion, but the config expects {shape}; check the variant/config"
            )
        used.add(key)
        return value.astype(dtype)

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for ours, theirs, transform in _top_rows():
        flat[ours] = take(theirs, transform, expected[ours])
    for ours, theirs, transform in _block_rows(cfg):
        if cfg.scan_layers:
            path = ("blocks",) + ours
            layer_shape = expected[path][1:]
            flat[path] = np.stack(
                [take(f"blocks.{i}.{theirs}", transform, layer_shape) for i in range(cfg.num_layers)]
            )
        else:
            for i in range(cfg.num_layers):
                path = (f"blocks_{i}",) + ours
                flat[path] = take(f"blocks.{i}.{theirs}", transform, expected[path])

    leftover = sorted(set(state_dict) - used)
    if leftover:
        raise ValueError(
            f"Wan DiT checkpoint has {len(leftover)} tensors this config does not use, e.g. {leftover[:5]} "
            "(image-conditioning I2V weights and extra layers are not supported; check num_layers)"
        )
    missing = sorted(set(expected) - set(flat))
    if missing:  # the row tables and the module disagree: a bug here, not in the checkpoint
        raise ValueError(f"no conversion rule for DiT params {missing[:5]}")
    return flax.traverse_util.unflatten_dict(flat)


def load_wan_dit_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a diffusers Wan DiT checkpoint (file or folder of shards) as numpy arrays."""
    return read_safetensors(path)


def dit_config_from_diffusers(config: dict[str, Any], **overrides: Any) -> DiTConfig:
    """DiTConfig from a WanTransformer3DModel `config.json` dict (Wan2.1 text-to-video layout)."""
    if config.get("image_dim") or config.get("added_kv_proj_dim"):
        raise ValueError("this WanTransformer3DModel has image conditioning (Wan I2V); only T2V is supported")
    fields = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
              "ffn_dim", "num_layers", "patch_size", "freq_dim", "cross_attn_norm", "eps", "rope_max_seq_len")
    missing = [f for f in fields[:7] if f not in config]
    if missing:
        raise ValueError(f"transformer config.json lacks {missing}; is it a WanTransformer3DModel config?")
    kw = {f: config[f] for f in fields if f in config}
    if config.get("qk_norm") not in (None, "rms_norm_across_heads"):
        raise ValueError(f"qk_norm={config['qk_norm']!r} is not supported (Wan2.1 uses 'rms_norm_across_heads')")
    return DiTConfig(**{**kw, **overrides})
