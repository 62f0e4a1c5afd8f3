"""`sora-jax convert wan`: a diffusers WanPipeline folder -> one folder `TextToVideo.from_pretrained` loads.

Layout of DST (each model part is laid out like a training run, so the usual loaders read it):
  vae/           vae_config.json + ckpt/   (convert_wan_vae)
  dit/           dit_config.json + ckpt/   (convert_wan_dit)
  text_encoder/  t5_config.json + ckpt/    (umT5 / T5 encoder)
  tokenizer/     the source tokenizer files, copied as they are
  pipeline.json  scheduler, default steps/guidance/size, text length, text encoder kind
Everything is built in a temporary sibling of DST and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sora_jax.convert.folders import _export, convert_wan_dit, convert_wan_vae, read_json_file, write_folder_atomically

PIPELINE_FILE = "pipeline.json"
T5_CONFIG_FILE = "t5_config.json"
PIPELINE_KIND = "wan"
# WanPipeline.__call__ defaults (diffusers 0.42), used when the caller does not choose.
WAN_DEFAULTS = dict(steps=50, guidance=5.0, height=480, width=832, frames=81, text_max_length=512, fps=16)

_LAYOUT = "pass a diffusers WanPipeline folder (model_index.json, vae/, transformer/, text_encoder/, tokenizer/, scheduler/)"
# Sub-folder -> class names accepted in model_index.json.
_COMPONENTS = {
    "vae": ("AutoencoderKLWan",),
    "transformer": ("WanTransformer3DModel",),
    "text_encoder": ("UMT5EncoderModel", "T5EncoderModel"),
    "tokenizer": ("T5TokenizerFast", "T5Tokenizer", "AutoTokenizer"),
    "scheduler": ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"),
}
# UniPC settings our UniPCSampler reproduces (its diffusers defaults as Wan ships them).
_UNIPC_EXPECTED = dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2, predict_x0=True,
                       solver_type="bh2", lower_order_final=True, final_sigmas_type="zero", thresholding=False)


def read_model_index(src: str | Path) -> dict[str, Any]:
    """model_index.json of a WanPipeline folder, its components and sub-folders checked."""
    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder; {_LAYOUT}")
    index = read_json_file(src / "model_index.json", _LAYOUT)
    if index.get("_class_name") != "WanPipeline":
        raise ValueError(f"{src} holds a {index.get('_class_name')}, not a WanPipeline; {_LAYOUT}")
    if index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio") is not None:
        raise ValueError(f"{src} is a two-transformer (Wan2.2) pipeline; only single-transformer Wan2.1 T2V is supported")
    if index.get("expand_timesteps"):
        raise ValueError(f"{src} uses expand_timesteps (Wan2.2 TI2V); only Wan2.1 T2V is supported")
    for name, accepted in _COMPONENTS.items():
        entry = index.get(name)
        found = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if found not in accepted:
            raise ValueError(f"{src}/model_index.json lists {name} as {found}, expected one of {list(accepted)}")
        if not (src / name).is_dir():
            raise FileNotFoundError(f"{src / name} not found; {_LAYOUT}")
    return index


def scheduler_settings(src: str | Path) -> dict[str, Any]:
    """Solver name and flow shift from a WanPipeline's scheduler/scheduler_config.json."""
    path = Path(src) / "scheduler" / "scheduler_config.json"
    cfg = read_json_file(path, _LAYOUT)
    name = cfg.get("_class_name")
    if name == "UniPCMultistepScheduler":
        for key, want in _UNIPC_EXPECTED.items():
            if key in cfg and cfg[key] != want:
                raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (need {want!r}); use Wan's UniPC settings")
        if cfg.get("num_train_timesteps", 1000) != 1000:
            raise ValueError(f"{path}: num_train_timesteps={cfg['num_train_timesteps']} is not supported (need 1000)")
        return {"solver": "unipc", "shift": float(cfg.get("flow_shift", 1.0))}
    if name == "FlowMatchEulerDiscreteScheduler":
        unsupported = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                       "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")
        bad = [k for k in unsupported if cfg.get(k)]
        if bad or cfg.get("num_train_timesteps", 1000) != 1000:
            raise ValueError(f"{path}: {bad or 'num_train_timesteps'} is not supported; use a plain shifted flow-match Euler scheduler")
        return {"solver": "euler", "shift": float(cfg.get("shift", 1.0))}
    raise ValueError(f"{path} holds a {name}; expected UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler")


def convert_t5_folder(src: str | Path, dst: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> dict[str, Any]:
    """Convert a transformers UMT5EncoderModel/T5EncoderModel folder into params + t5_config.json."""
    from sora_jax.convert.t5 import load_t5_encoder

    cfg, params = load_t5_encoder(src, param_dtype=jnp.dtype(dtype))
    return _export(src, dst, overwrite, params, T5_CONFIG_FILE, cfg, "UMT5EncoderModel"
                   if cfg.per_layer_position_bias else "T5EncoderModel")


def convert_wan_pipeline(
    src: str | Path, dst: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> dict[str, Any]:
    """Convert a diffusers WanPipeline folder into one folder for `TextToVideo.from_pretrained`; returns a summary."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r} is not supported; use float32 or bfloat16")
    src = Path(src).absolute()
    read_model_index(src)
    sched = scheduler_settings(src)  # checked before any (slow) weight conversion
    if not (src / "tokenizer" / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src / 'tokenizer' / 'tokenizer.json'} not found; save the tokenizer as a fast tokenizer")
    summary: dict[str, Any] = {}

    def fill(out: Path) -> None:
        # The VAE stays float32: it is small and its decode is sensitive to rounding.
        summary["vae"] = convert_wan_vae(src / "vae", out / "vae")
        summary["dit"] = convert_wan_dit(src / "transformer", out / "dit", dtype=dtype)
        summary["text_encoder"] = convert_t5_folder(src / "text_encoder", out / "text_encoder", dtype=dtype)
        shutil.copytree(src / "tokenizer", out / "tokenizer")
        text_kind = "umt5" if summary["text_encoder"]["config"].per_layer_position_bias else "t5"
        pipeline = {"kind": PIPELINE_KIND, "text_encoder": text_kind, "source": str(src), **sched, **WAN_DEFAULTS}
        (out / PIPELINE_FILE).write_text(json.dumps(pipeline, indent=2))

    write_folder_atomically(Path(dst), overwrite, fill)
    params = sum(summary[k]["params"] for k in ("vae", "dit", "text_encoder"))
    return {"dst": str(Path(dst).absolute()), "params": params, **sched}
