"""Reading diffusers safetensors checkpoints (one file, a folder, or a sharded index) without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def safetensors_files(path: str | Path) -> list[Path]:
    """The files of a checkpoint: a .safetensors file, or a folder with an index or a single file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; pass a diffusers model folder or .safetensors file")
    index = path / (WEIGHTS_NAME + ".index.json")
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"shard {missing[0]} listed in {index.name} is missing from {path} "
                f"({len(missing)} of {len(files)} shards missing); finish the download"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}; only safetensors checkpoints are read")
    return files


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as numpy arrays; bfloat16 stays bfloat16 (ml_dtypes)."""
    from safetensors import safe_open

    state: dict[str, np.ndarray] = {}
    for file in safetensors_files(path):
        try:
            # framework="flax" because numpy has no bfloat16 of its own; jax arrays carry ml_dtypes bf16.
            with safe_open(str(file), framework="flax") as f:
                for key in f.keys():
                    state[key] = np.asarray(f.get_tensor(key))
        except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
            raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be truncated, re-download it") from None
    return state
