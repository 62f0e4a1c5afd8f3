"""Orbax checkpoints: train state + grain iterator state, async, restorable onto any mesh."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from sora_jax.train.state import TrainState

class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was required."""


def _arrays(state: TrainState) -> dict[str, Any]:
    # Orbax stores pytrees of arrays; the optimiser object itself is rebuilt from config. A train
    # state nested in a subclass's field (a GAN's discriminator) becomes a nested dict of its own.
    out = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if f.metadata.get("pytree_node", True) and value is not None:
            out[f.name] = _arrays(value) if isinstance(value, TrainState) else value
    return out


def _replace(target: TrainState, arrays: dict[str, Any]) -> TrainState:
    """Inverse of `_arrays`: put restored arrays into the (possibly nested) target state."""
    return target.replace(**{
        k: _replace(getattr(target, k), v) if isinstance(getattr(target, k), TrainState) else v
        for k, v in arrays.items()
    })


def make_manager(directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the newest `keep` steps, saving asynchronously."""
    path = Path(directory).absolute()
    return ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        ),
    )


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter=None, *, force: bool = False) -> bool:
    """Save the state (and the data iterator position) at state.step."""
    items = {"state": ocp.args.StandardSave(_arrays(state))}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(int(state.step), args=ocp.args.Composite(**items), force=force)


def restore(
    manager: ocp.CheckpointManager,
    target: TrainState,
    data_iter=None,
    step: int | None = None,
) -> TrainState:
    """Restore into the shardings of `target` (an initialised or abstract state) at `step`/latest."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint found in {manager.directory}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _arrays(target)
    )
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return _replace(target, restored["state"])


def saved_state_keys(manager: ocp.CheckpointManager, step: int | None = None) -> frozenset[str]:
    """Top-level entries of the train state saved at `step`/latest (e.g. to spot a "disc")."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint found in {manager.directory}")
    # manager.item_metadata knows an item only once this manager has saved/restored it; reading the
    # item's own metadata works for any checkpoint written by `save`.
    meta = ocp.StandardCheckpointer().metadata(Path(manager.directory) / str(step) / "state")
    return frozenset(meta.item_metadata.tree.keys())


def restore_params(directory: str | os.PathLike, abstract_params: Any, *, use_ema: bool = True) -> Any:
    """Load only the (EMA if present) parameters of the latest checkpoint, for inference."""
    path = Path(directory).absolute()
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint directory {path} does not exist; train first or pass the right --workdir"
        )
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint found in {path}; train first or pass the right --workdir")
    key = "ema_params" if use_ema and "ema_params" in saved_state_keys(manager, step) else "params"
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={key: abstract_params},
                restore_args=jax.tree.map(
                    lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), {key: abstract_params}
                ),
                partial_restore=True,
            )
        ),
    )
    manager.close()
    return restored["state"][key]


def save_params(directory: str | os.PathLike, params: Any, step: int = 0) -> None:
    """Write inference-only params as a checkpoint that `restore_params` reads (synchronously)."""
    manager = make_manager(directory, keep=1, async_save=False)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": step, "params": params})))
    manager.wait_until_finished()
    manager.close()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so a crash never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by write_json_atomic."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; train first or pass the right --workdir")
    return json.loads(path.read_text())
