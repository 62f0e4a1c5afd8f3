"""Training telemetry: TensorBoard scalars and a progress bar with loss and steps/s."""

from __future__ import annotations

import contextlib
import contextvars
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
        self.eval_history: list[dict[str, float]] = []

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

    def log_eval(self, step: int, scalars: dict[str, Any]) -> dict[str, float]:
        """Record periodic-evaluation scalars (tags as given, e.g. eval/loss_t0.5) apart from the train rows."""
        row = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self.eval_history.append({**row, "step": step})
        if self._writer is not None:
            for k, v in row.items():
                self._writer.add_scalar(k, v, step)
        return row

    def log_videos(self, step: int, videos: dict[str, np.ndarray], fps: int = 8) -> None:
        """Write uint8 clips [T, H, W, 3] as animated GIF image summaries (TensorBoard's Images tab plays them).

        tensorboardX's add_video needs moviepy; a GIF encoded here with Pillow is the same summary.
        """
        if self._writer is None:
            return
        from PIL import Image
        from tensorboardX.proto.summary_pb2 import Summary

        for tag, clip in videos.items():
            clip = np.asarray(clip)
            if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
                raise ValueError(f"video {tag!r} must be uint8 [T, H, W, 3], got {clip.dtype}{clip.shape}")
            frames = [Image.fromarray(f) for f in clip]
            buf = io.BytesIO()
            frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
            image = Summary.Image(height=clip.shape[1], width=clip.shape[2], colorspace=3, encoded_image_string=buf.getvalue())
            self._writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def advance(self, n: int = 1) -> None:
        """Move the bar forward n steps."""
        self._bar.update(n)

    def close(self) -> None:
        """Flush TensorBoard and close the bar."""
        self._bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
