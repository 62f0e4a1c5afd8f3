"""Orbax checkpoints: train state + grain iterator state, async, restorable onto any mesh."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from sora_jax.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was required."""


class DataMismatchError(CheckpointError):
    """The checkpoint's data position belongs to another data pipeline (grain refused it)."""


# grain's DataLoader validates a restored position against the loader: "<what> in checkpoint does not
# match ...\n<what> in checkpoint: A\n<what> in dataloader: B".
_GRAIN_MISMATCH = re.compile(r"(Sampler|Worker count|DataSource) in checkpoint does not match")


def _data_mismatch(error: BaseException, directory: Any) -> DataMismatchError | None:
    """grain's multi-line refusal of another data pipeline as one line naming what differs, or None."""
    text = str(error)
    found = _GRAIN_MISMATCH.search(text)
    if not found:
        return None
    what = found.group(1).lower()
    saved = re.search(rf"{what} in checkpoint: (.*)", text, re.IGNORECASE)
    now = re.search(rf"{what} in dataloader: (.*)", text, re.IGNORECASE)
    saved, now = (saved.group(1).strip() if saved else "?"), (now.group(1).strip() if now else "?")
    if what == "sampler":
        # IndexSampler(num_records=512, ..., seed=0): name the fields that differ, not both reprs.
        fields = [dict(re.findall(r"(\w+)=([^,()]+)", r)) for r in (saved, now)]
        diff = [f"{k} {fields[0].get(k)} there, {fields[1].get(k)} now" for k in fields[0] | fields[1]
                if fields[0].get(k) != fields[1].get(k)] or [f"{saved} there, {now} now"]
        hint = ("num_records counts the clips: data.num_train, --num-train for scripts/train_reference.py"
                if fields[0].get("num_records") != fields[1].get("num_records") else "the data seed or sharding")
        detail = f"its sampler differs ({'; '.join(diff)}; {hint})"
    elif what == "worker count":
        detail = f"it was read with {saved} grain workers, this config uses {now} (data.worker_count)"
    else:
        detail = "its data source differs (another dataset or split)"
    return DataMismatchError(
        f"the checkpoint in {directory} was saved by a run reading other data: {detail}; resume with the data "
        "settings it was trained with, or train into a new directory (--config.workdir; --outdir for "
        "scripts/train_reference.py)"
    )


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


# Orbax writes a replicated array "replica-parallel": one slice per replica, each copied to the
# host on its own. Within one process that is N transfers instead of one, and for small arrays the
# per-transfer cost dominates: a 480-array replicated state on 8 CPU devices saved in 3.8 s with
# it and 1.2 s without. Slices under 1 MiB are written from one replica; large arrays on
# multi-host pods keep the parallel write.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
    """Once per process: Orbax's jax.Array handler with the replica-parallel threshold above."""
    from orbax.checkpoint._src.metadata import array_metadata_store  # as Orbax's default handler

    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(),
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        ),
        override=True,
    )


def make_manager(directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the newest `keep` steps, saving asynchronously."""
    _register_array_handler()
    path = Path(directory).absolute()
    return ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        ),
    )


def save(
    manager: ocp.CheckpointManager, state: TrainState, data_iter=None, *, rng: jax.Array | None = None,
    force: bool = False,
) -> bool:
    """Save the state, the data iterator position and the training RNG key at state.step."""
    items = {"state": ocp.args.StandardSave(_arrays(state))}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if rng is not None:
        # As host numpy: the key is the same on every process, and a single-device jax.Array is
        # "host local" to Orbax, which refuses to save it in a multi-process run.
        items["rng"] = ocp.args.StandardSave({"key": np.asarray(jax.random.key_data(rng))})
    return manager.save(int(state.step), args=ocp.args.Composite(**items), force=force)


def _with_fallback(manager: ocp.CheckpointManager, load: Callable[[int], Any], *, quarantine: bool) -> tuple[int, Any]:
    """Run `load(step)` on the newest step that loads, warning about (and moving aside) newer bad ones."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint found in {manager.directory}")
    bad: list[tuple[int, str]] = []
    for step in steps:
        failed = False
        try:
            # Quiet from the start: reads of a failing step can report in before load(step) returns.
            with _quiet_abandoned_reads():
                out = load(step)
        except DataMismatchError:
            raise  # every step of a run shares its data pipeline: older steps would fail alike, and none is damaged
        except Exception as e:  # noqa: BLE001 - any failure to read a step means "try the previous one"
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            log.warning("checkpoint step %d in %s is unreadable (%s); trying an older step", step, manager.directory, reason)
            bad.append((step, reason))
            failed = True
        if failed:  # out of the except block, whose exception still holds the failed read's frames
            _collect_abandoned_reads()
            _keep_dropping_abandoned_reads()
            continue
        # Only once an older step loaded: if every step fails the cause is more likely the target
        # (a changed model config) than the files, and nothing should move.
        if bad and quarantine:
            _quarantine(manager, [s for s, _ in bad])
        if bad:
            log.warning("resumed from checkpoint step %d instead of the unreadable step(s) %s",
                        step, ", ".join(str(s) for s, _ in bad))
        return step, out
    raise CheckpointError(
        f"no checkpoint in {manager.directory} could be restored ("
        + "; ".join(f"step {s}: {r}" for s, r in bad)
        + "); fix or remove them, or train into a new directory (--config.workdir; --outdir for "
        "scripts/train_reference.py)"
    )


# Orbax reads a step's arrays in one asyncio.gather on a loop it closes as soon as one read fails. The
# sibling reads are still in flight in TensorStore's threads; each later reports "Event loop is closed"
# (sys.unraisablehook, no object) when it completes, and its coroutine then dies as garbage, printing
# "Exception ignored in <coroutine _read_array_index_and_device_put>".
_ABANDONED_READ = "_read_array_index_and_device_put"
_ABANDONED_WAIT_S = 10.0


def _is_abandoned_read_noise(u: Any) -> bool:
    """Whether an unraisable error is one of a failed restore's abandoned array reads reporting in."""
    if getattr(getattr(u.object, "cr_code", None), "co_name", None) == _ABANDONED_READ:
        return True
    return u.object is None and isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"


def _pending_reads() -> int:
    """Array-read coroutines of Orbax's that are alive and suspended (in flight or abandoned)."""
    return sum(
        1 for o in gc.get_objects()
        if type(o).__name__ == "coroutine" and o.cr_code.co_name == _ABANDONED_READ and o.cr_frame is not None
    )


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """Drop the abandoned-read reports of a failed step (it is already logged as unreadable); pass on any other."""
    dropped: list[str] = []
    hook = sys.unraisablehook

    def drop(u: Any) -> None:
        if _is_abandoned_read_noise(u):
            dropped.append(type(u.exc_value).__name__)
        else:
            hook(u)

    sys.unraisablehook = drop
    try:
        yield dropped
    finally:
        sys.unraisablehook = hook
    if dropped:
        log.debug("dropped %d errors of abandoned checkpoint reads (%s)", len(dropped), ", ".join(sorted(set(dropped))))


def _collect_abandoned_reads(wait_s: float = _ABANDONED_WAIT_S) -> None:
    """Wait for the reads a failed restore left in flight to finish, and collect them now, quietly.

    A single gc.collect right after the failure is not enough: a read still in TensorStore's thread is
    referenced from there, and dies (loudly) whenever it completes.
    """
    deadline = time.monotonic() + wait_s
    with _quiet_abandoned_reads():
        while True:
            gc.collect()
            left = _pending_reads()
            if not left:
                return
            if time.monotonic() > deadline:
                log.debug("%d abandoned checkpoint reads still pending after %.0f s", left, wait_s)
                return
            time.sleep(0.01)


def _keep_dropping_abandoned_reads() -> None:
    """From now on, drop the abandoned-read reports that come after the wait; pass any other to the hook before.

    The wait sees the read coroutines, not TensorStore's reads under them: a read whose coroutine is
    already collected can still finish later, in a TensorStore thread, and report "Event loop is closed"
    (CI, under load: once in 8 restores of a truncated step). Such a report only repeats the failure
    already logged, so after a fallback the process's unraisable hook leaves it out. Installed once.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(u: Any) -> None:
        if not _is_abandoned_read_noise(u):
            previous(u)

    hook.drops_abandoned_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _quarantine(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move unreadable steps out of the manager's directory: kept for inspection, never re-read.

    Left in place they would block saving those step numbers again and count as the latest step.
    With several processes on a shared filesystem only process 0 moves; TODO(multi-host): add a
    barrier so the others do not list the directory mid-move.
    """
    if jax.process_index() == 0:
        directory = Path(manager.directory)
        aside = directory.parent / f"{directory.name}.corrupt"
        aside.mkdir(exist_ok=True)
        for step in steps:
            dst = aside / str(step)
            n = 1
            while dst.exists():
                dst, n = aside / f"{step}.{n}", n + 1
            shutil.move(str(directory / str(step)), str(dst))
            log.warning("moved unreadable checkpoint step %d to %s", step, dst)
    manager.reload()


def restore(
    manager: ocp.CheckpointManager,
    target: TrainState,
    data_iter=None,
    step: int | None = None,
    finished_at: int | None = None,
) -> TrainState:
    """Restore into the shardings of `target` at `step`, or the newest step that loads (older on damage).

    A step at or past `finished_at` (the run's train.steps) leaves `data_iter` alone: a finished run
    reads no more data, so it may be reused with other data (a reference run's VAE under a DiT trained
    on more clips), where grain would refuse the other sampler. An older step it falls back to still
    restores the data position, since training goes on from there.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _arrays(target)
    )

    def load(s: int) -> TrainState:
        if data_iter is not None and (finished_at is None or s < finished_at):
            # The data position first: it is small, and a run on other data is refused before the
            # state is read (and with nothing of the state's read left pending).
            try:
                manager.restore(s, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
            except Exception as e:
                mismatch = _data_mismatch(e, manager.directory)
                if mismatch is not None:
                    raise mismatch from None
                raise
        restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        state = _replace(target, restored["state"])
        restore_rng(manager, s, jax.random.key(0))  # read here too: a damaged key also means "older step"
        return state

    try:
        if step is not None:
            return load(step)
        return _with_fallback(manager, load, quarantine=True)[1]
    except DataMismatchError:
        raise
    except Exception:
        _check_schedule_clock(manager, "budget_seconds" in abstract, step)  # a likely cause, said in one line
        raise


def _check_schedule_clock(manager: ocp.CheckpointManager, budget_clock: bool, step: int | None) -> None:
    """Refuse, in one line, to resume a run under the other optim.schedule_clock: the trees differ."""
    saved = "budget_seconds" in saved_state_keys(manager, step)
    if saved != budget_clock:
        clock, other = ("budget", "steps") if saved else ("steps", "budget")
        raise CheckpointError(
            f"the checkpoint in {manager.directory} was trained with optim.schedule_clock={clock}, this config says "
            f"{other}: resume it with --config.optim.schedule_clock={clock} (--vae-override/--dit-override "
            f"optim.schedule_clock={clock} for scripts/train_reference.py), or train into a new directory"
        )


def restore_rng(manager: ocp.CheckpointManager, step: int, default: jax.Array) -> jax.Array:
    """The training RNG key saved at `step`, or `default` for checkpoints saved without one."""
    if step not in manager.all_steps() or not (Path(manager.directory) / str(step) / "rng").is_dir():
        return default
    data = jax.random.key_data(default)
    restored = manager.restore(step, args=ocp.args.Composite(rng=ocp.args.StandardRestore(
        {"key": jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)})))
    # Rewrapped from host memory: uncommitted like a fresh key, so the step compiles (and caches) the same.
    key = np.asarray(restored["rng"]["key"])
    return jax.random.wrap_key_data(key, impl=jax.random.key_impl(default))


def saved_state_keys(manager: ocp.CheckpointManager, step: int | None = None) -> frozenset[str]:
    """Top-level entries of the train state saved at `step`/the newest readable step (e.g. a "disc")."""
    # manager.item_metadata knows an item only once this manager has saved/restored it; reading the
    # item's own metadata works for any checkpoint written by `save`.
    def keys(s: int) -> frozenset[str]:
        meta = ocp.StandardCheckpointer().metadata(Path(manager.directory) / str(s) / "state")
        return frozenset(meta.item_metadata.tree.keys())

    if step is not None:
        return keys(step)
    return _with_fallback(manager, keys, quarantine=False)[1]


def restore_params(directory: str | os.PathLike, abstract_params: Any, *, use_ema: bool = True) -> Any:
    """Load only the (EMA if present) parameters of the latest checkpoint, for inference."""
    return restore_params_at(directory, abstract_params, use_ema=use_ema)[1]


def restore_params_at(
    directory: str | os.PathLike, abstract_params: Any, *, use_ema: bool = True, step: int | None = None
) -> tuple[int, Any]:
    """(step, params) of checkpoint `step`, or of the newest readable one when `step` is None."""
    path = Path(directory).absolute()
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint directory {path} does not exist; train first or pass the right --workdir"
        )
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    if manager.latest_step() is None:
        raise CheckpointError(f"no checkpoint found in {path}; train first or pass the right --workdir")

    def load(step: int) -> Any:
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
        return restored["state"][key]

    if step is not None:
        if step not in manager.all_steps():
            have = ", ".join(str(s) for s in sorted(manager.all_steps()))
            manager.close()
            raise CheckpointError(f"{path} has no checkpoint step {step} (it has {have}); it was pruned or never "
                                  "saved there: point at the run that holds it, or retrain on what is there")
        out = step, load(step)
    else:
        # Inference never moves files: a damaged newest step is skipped with a warning.
        out = _with_fallback(manager, load, quarantine=False)
    manager.close()
    return out


def params_fingerprint(params: Any) -> str:
    """A short hash of a parameter tree's names, shapes, dtypes and values: equal only for equal weights.

    It names the weights, not where they are stored, so a copied or params-only re-saved checkpoint
    keeps its fingerprint and a continued one gets a new one. The leaves must be host-addressable
    (e.g. restored onto one device, as `load_vae` does).
    """
    h = hashlib.sha256()
    for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(key)}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def save_params(directory: str | os.PathLike, params: Any, step: int = 0, *, keep: int = 1) -> None:
    """Write inference-only params as a checkpoint that `restore_params` reads (synchronously).

    The directory keeps its newest `keep` steps, this one included.
    """
    manager = make_manager(directory, keep=keep, async_save=False)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": step, "params": params})))
    manager.wait_until_finished()
    manager.close()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so a crash never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per-process name: on several hosts sharing a filesystem each writes the same file at once.
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by write_json_atomic."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; train first or pass the right --workdir")
    return json.loads(path.read_text())
