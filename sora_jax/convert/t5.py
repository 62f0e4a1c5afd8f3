"""Hugging Face T5 / umT5 safetensors -> `T5Encoder` params, and the umT5 tokenizer from `tokenizer.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from sora_jax.convert.safetensors_io import read_safetensors
from sora_jax.models.text.t5 import T5Config, T5Encoder
from sora_jax.models.text.tokenizer import TextTokenizer

_ANCHOR = "encoder.final_layer_norm.weight"
_EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
_BIAS = "layer.0.SelfAttention.relative_attention_bias.weight"

# Our per-layer param path -> (HF name under `encoder.block.{i}.`, transpose?).
_LAYER = {
    ("attn_norm", "scale"): ("layer.0.layer_norm.weight", False),
    ("q", "kernel"): ("layer.0.SelfAttention.q.weight", True),
    ("k", "kernel"): ("layer.0.SelfAttention.k.weight", True),
    ("v", "kernel"): ("layer.0.SelfAttention.v.weight", True),
    ("o", "kernel"): ("layer.0.SelfAttention.o.weight", True),
    ("mlp_norm", "scale"): ("layer.1.layer_norm.weight", False),
    ("wo", "kernel"): ("layer.1.DenseReluDense.wo.weight", True),
}
_GATED = {
    ("wi_0", "kernel"): ("layer.1.DenseReluDense.wi_0.weight", True),
    ("wi_1", "kernel"): ("layer.1.DenseReluDense.wi_1.weight", True),
}
_UNGATED = {("wi", "kernel"): ("layer.1.DenseReluDense.wi.weight", True)}


def abstract_t5_params(config: T5Config) -> Any:
    """Shapes/dtypes of the (unboxed) `{'params': ...}` tree of a `T5Encoder`."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return nn.unbox(jax.eval_shape(T5Encoder(config).init, jax.random.key(0), ids, ids))


def _find_prefix(tensors: dict[str, np.ndarray], path: Path) -> str:
    """Key prefix ('' or e.g. 'text_encoder.') under which the T5 weights live."""
    candidates = sorted(k[: -len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR))
    if not candidates:
        raise ValueError(
            f"{path}: missing tensor '{_ANCHOR}'; pass a Hugging Face T5/umT5 (encoder) safetensors checkpoint"
        )
    return candidates[0]


def _check_shape(value: np.ndarray, expected: tuple[int, ...], key: str, path: Path) -> None:
    """Raise a one-line ValueError when a tensor does not have the shape config.json implies."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{path}: tensor '{key}' has shape {tuple(value.shape)} but config.json implies "
            f"{tuple(expected)}; use the config.json that belongs to this checkpoint"
        )


def convert_t5_state_dict(
    tensors: dict[str, np.ndarray], config: T5Config, path: Path | str = "<tensors>"
) -> dict:
    """Map a Hugging Face T5/umT5 encoder state dict (numpy) to our `{'params': ...}` tree."""
    path = Path(path)
    abstract = abstract_t5_params(config)["params"]
    prefix = _find_prefix(tensors, path)
    dtype = np.dtype(config.param_dtype)
    used: set[str] = set()

    def get(name: str, expected: tuple[int, ...], transpose: bool = False) -> np.ndarray:
        key = prefix + name
        if key not in tensors:
            raise ValueError(
                f"{path}: missing tensor '{key}'; the checkpoint is incomplete or does not match "
                "config.json (T5 vs umT5, gated vs plain FFN, num_layers) - re-download or fix the config"
            )
        used.add(key)
        # torch Linear stores [out, in]; our kernels are [in, out].
        value = tensors[key].T if transpose else tensors[key]
        _check_shape(value, expected, key + (" (transposed)" if transpose else ""), path)
        return value.astype(dtype)

    # The encoder's embedding is tied to `shared`; checkpoints store either name (or both).
    emb_name = next((n for n in _EMBEDDING_NAMES if prefix + n in tensors), _EMBEDDING_NAMES[0])
    params: dict = {
        "embedding": get(emb_name, abstract["embedding"].shape),
        "final_norm": {"scale": get("encoder.final_layer_norm.weight", abstract["final_norm"]["scale"].shape)},
        "layers": {},
    }
    used.update(prefix + n for n in _EMBEDDING_NAMES if prefix + n in tensors)
    layer_map = {**_LAYER, **(_GATED if config.is_gated else _UNGATED)}
    if config.per_layer_position_bias:
        layer_map[("relative_attention_bias",)] = (_BIAS, False)
    else:
        params["relative_attention_bias"] = get(
            f"encoder.block.0.{_BIAS}", abstract["relative_attention_bias"].shape
        )
    for ours, (name, transpose) in layer_map.items():
        leaf = abstract["layers"]
        for k in ours:
            leaf = leaf[k]
        per_layer = [get(f"encoder.block.{i}.{name}", leaf.shape[1:], transpose) for i in range(config.num_layers)]
        tree = params["layers"]
        for k in ours[:-1]:
            tree = tree.setdefault(k, {})
        tree[ours[-1]] = np.stack(per_layer)  # [layers, ...]

    # Leftover encoder tensors mean config.json describes a different model (more layers, a T5
    # checkpoint read as umT5 or vice versa); the decoder and lm_head of full T5s are ignored.
    leftover = sorted(k for k in tensors if k.startswith(prefix + "encoder.") and k not in used)
    if leftover:
        raise ValueError(
            f"{path}: unexpected tensor '{leftover[0]}' ({len(leftover)} unused encoder tensors); "
            "config.json does not match this checkpoint (num_layers, model_type t5/umt5, feed_forward_proj)"
        )
    return {"params": params}


def _check_shards(folder: Path) -> None:
    """Fail early, naming the shard, when a sharded checkpoint's index lists a missing file."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ValueError(
            f"shard {missing[0]} listed in {index.name} is missing from {folder} "
            f"({len(missing)} of {len(files)} shards missing); finish the download"
        )


def load_t5_encoder(folder: str | os.PathLike, **overrides: Any) -> tuple[T5Config, dict]:
    """Read `config.json` + safetensors (single or sharded) from a folder into `(T5Config, params)`."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"no config.json in {folder}; pass a Hugging Face T5/umT5 text-encoder folder")
    config = T5Config.from_hf(json.loads(cfg_path.read_text()), **overrides)
    _check_shards(folder)
    params = convert_t5_state_dict(read_safetensors(folder), config, folder)
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def load_t5_tokenizer(path: str | os.PathLike, max_length: int = 512) -> TextTokenizer:
    """Fixed-length umT5/T5 tokenizer from a `tokenizer.json` (or a folder holding one), never from a hub.

    Calling it on a batch of strings returns `(ids, mask)` int32 `[batch, max_length]`: `</s>` is
    appended by the file's post-processor and kept on truncation, padding uses the pad token.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no tokenizer.json at {path}; pass the text encoder's tokenizer folder or file")
    pad_token = "<pad>"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        meta = file.parent / name
        if meta.is_file():
            pad = json.loads(meta.read_text()).get("pad_token")
            if pad:
                # Newer files store special tokens as AddedToken dicts.
                pad_token = pad["content"] if isinstance(pad, dict) else pad
                break
    return TextTokenizer(Tokenizer.from_file(str(file)), max_length=max_length, pad_token=pad_token)
