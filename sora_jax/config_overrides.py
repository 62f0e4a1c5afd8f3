"""Loading `configs/*.py` by name or path and applying `--config.a.b=value` overrides."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load "dit", "dit:variant=S" or "path/to/file.py:arg" via its get_config(arg)."""
    name, _, arg = spec.partition(":")
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"config file {path} not found; pass --config dit, vae or a path to a .py file")
        module_spec = importlib.util.spec_from_file_location(f"_sora_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"configs.{name}")
        except ModuleNotFoundError:
            raise ValueError(f"unknown config {name!r}; use 'vae', 'dit' or a path to a .py file") from None
    return module.get_config(arg or None)


def _parse_value(raw: str, current):
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, str):
        return raw
    return ast.literal_eval(raw)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ["--config.train.steps=100", ...]; unknown keys and bad values raise ValueError."""
    for item in overrides:
        if not item.startswith("--config."):
            raise ValueError(f"unrecognised argument {item!r}; config overrides look like --config.train.steps=100")
        key, eq, raw = item[len("--config."):].partition("=")
        if not eq:
            raise ValueError(f"override {item!r} has no value; write --config.{key}=VALUE")
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "<top>"
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ValueError(f"unknown config key {key!r}: {where!r} has no field {part!r} (known: {known})")
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise ValueError(f"config key {key!r} is a group; override one of its fields: {sorted(current.keys())}")
        try:
            value = _parse_value(raw, current)
        except (ValueError, SyntaxError):
            raise ValueError(f"bad value {raw!r} for config key {key!r} (currently {current!r})") from None
        with node.ignore_type():
            node[parts[-1]] = value
    return config
