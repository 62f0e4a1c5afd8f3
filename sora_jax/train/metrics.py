"""Training telemetry: TensorBoard scalars and a progress bar with loss and steps/s."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

# Callbacks that see every logged row (a notebook's live loss plot); a ContextVar scoped by
# `observe`, so trainers need no callback argument and nothing outlives the `with` block.
_OBSERVERS: contextvars.ContextVar[tuple[Callable[[dict[str, float]], None], ...]] = contextvars.ContextVar(
    "metric_observers", default=())


@contextlib.contextmanager
def observe(callback: Callable[[dict[str, float]], None]) -> Iterator[None]:
    """Within the block, call `callback(row)` with each row a MetricLogger logs (step, loss, ..., steps_per_sec)."""
    token = _OBSERVERS.set(_OBSERVERS.get() + (callback,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


class MetricLogger:
    """Writes scalars to TensorBoard (process 0 only) and drives a tqdm bar."""

    def __init__(self, logdir: str | Path, total_steps: int, start_step: int = 0, *, desc: str = "train", progress: bool = True):
        self._is_main = jax.process_index() == 0
        self._writer = None
        if self._is_main:
            from tensorboardX import SummaryWriter  # deferred: heavy import, process 0 only

            self._writer = SummaryWriter(str(logdir))
        self._bar = tqdm(
            total=total_steps, initial=start_step, desc=desc, disable=not (progress and self._is_main),
            dynamic_ncols=True, leave=True,
        )
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self.history: list[dict[str, float]] = []

    def log(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
        """Record scalars for `step`; adds steps_per_sec over the interval since the last call."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        row = {k: float(np.asarray(v)) for k, v in scalars.items()}
        row["steps_per_sec"] = rate
        row["step"] = step
        self.history.append(row)
        if self._writer is not None:
            for k, v in row.items():
                if k != "step":
                    self._writer.add_scalar(k, v, step)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("step",)}, refresh=False)
        if self._is_main:
            for callback in _OBSERVERS.get():
                callback(dict(row))
        return row

    def advance(self, n: int = 1) -> None:
        """Move the bar forward n steps."""
        self._bar.update(n)

    def close(self) -> None:
        """Flush TensorBoard and close the bar."""
        self._bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
