"""`sora-jax convert`: diffusers model folders -> our checkpoint folders (Orbax params + config JSON).

The output folder has the layout of a training run, so everything that loads a run loads it:
`vae_config.json` + `ckpt/` for the VAE (`train.vae_trainer.load_vae`), `dit_config.json` + `ckpt/`
for the DiT. It is written next to DST and renamed into place at the end, so an interrupted
conversion never leaves a half-written DST and never touches an existing one unless asked to.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.convert.safetensors_io import read_safetensors
from sora_jax.train import checkpoint
from sora_jax.train.setup import dataclass_to_json

SOURCE_FILE = "converted_from.json"


def read_json_file(path: Path, fix: str) -> dict[str, Any]:
    """A source folder's JSON file; a missing or broken one is a one-line error ending in `fix`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from None


def read_model_config(src: str | Path, class_name: str) -> dict[str, Any]:
    """The config.json of a diffusers model folder, checked to be of `class_name`."""
    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder; pass the diffusers {class_name} folder (config.json + safetensors)")
    config = read_json_file(src / "config.json", f"pass the diffusers {class_name} folder (config.json + safetensors)")
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"{src} holds a {found}, not a {class_name}; pass the right subfolder")
    return config


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse a non-empty dst unless overwriting: called before slow work, and again before writing."""
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} already exists and is not empty; choose a new folder or pass --overwrite")


def write_folder_atomically(dst: Path, overwrite: bool, fill: Callable[[Path], None]) -> None:
    """Build the output in a temporary sibling folder, then move it to dst."""
    dst = dst.absolute()
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        fill(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_wan_vae(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Convert a diffusers AutoencoderKLWan folder into a VAE checkpoint folder; returns a summary."""
    from sora_jax.convert.wan_vae import convert_wan_vae_state_dict
    from sora_jax.models.vae import VAEConfig
    from sora_jax.train.vae_trainer import VAE_CONFIG_FILE

    config = read_model_config(src, "AutoencoderKLWan")
    cfg = VAEConfig.from_diffusers(config)
    # Stored as the variables dict ({"params": ...}), like a training run's state.params.
    params = convert_wan_vae_state_dict(read_safetensors(src), cfg)

    return _export(src, dst, overwrite, params, VAE_CONFIG_FILE, cfg, "AutoencoderKLWan")


def convert_wan_dit(
    src: str | Path, dst: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> dict[str, Any]:
    """Convert a diffusers WanTransformer3DModel folder (single or sharded) into a DiT checkpoint folder."""
    from sora_jax.convert.wan_dit import convert_wan_dit_state_dict, dit_config_from_diffusers
    from sora_jax.train.dit_trainer import DIT_CONFIG_FILE

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r} is not supported; use float32 or bfloat16")
    config = read_model_config(src, "WanTransformer3DModel")
    cfg = dit_config_from_diffusers(config, param_dtype=jnp.dtype(dtype))
    params = {"params": convert_wan_dit_state_dict(read_safetensors(src), cfg)}

    return _export(src, dst, overwrite, params, DIT_CONFIG_FILE, cfg, "WanTransformer3DModel")


def _export(
    src: str | Path, dst: str | Path, overwrite: bool, params: Any, config_file: str, cfg: Any, class_name: str
) -> dict[str, Any]:
    """Write params + model config + provenance into DST atomically; returns a summary."""

    def fill(out: Path) -> None:
        checkpoint.save_params(out / "ckpt", params)
        checkpoint.write_json_atomic(out / config_file, dataclass_to_json(cfg))
        checkpoint.write_json_atomic(out / SOURCE_FILE, {"source": str(Path(src).absolute()), "class": class_name})

    write_folder_atomically(Path(dst), overwrite, fill)
    return {"dst": str(Path(dst).absolute()), "params": count_params(params), "config": cfg}


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
