"""What the Colab notebooks (colab/) need beyond the training and inference API.

A training config laid over whatever devices the runtime has, a loss plot redrawn in place while a
trainer runs (fed by `sora_jax.train.metrics.observe`), and videos as inline HTML5 `<video>` tags.
IPython and matplotlib are imported only when a plot is made.
"""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from sora_jax.data.video import write_mp4


def fit_to_devices(config: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """A copy of a training config that is data parallel over all devices, its batch rounded up to a multiple of them.

    `num_devices` defaults to `jax.device_count()`: 1 on a CPU or single-GPU runtime, 8 on a TPU v2-8.
    Pure data parallelism suits the small models a notebook trains; large ones want `mesh.rules=fsdp`.
    """
    n = int(num_devices or jax.device_count())
    if n < 1:
        raise ValueError(f"num_devices={n}; pass a positive device count")
    out = ml_collections.ConfigDict(config.to_dict())
    out.mesh.shape.update(data=n, fsdp=1, tensor=1, sequence=1)
    out.mesh.rules = "data"
    out.data.batch_size = -(-int(out.data.batch_size) // n) * n
    return out


class LossPlot:
    """Training curves (one line per run and metric) redrawn in one notebook output as rows arrive.

    Use as `with metrics.observe(plot.observer("vae")): train_vae(cfg)`; `show()` creates the output.
    """

    def __init__(self, metric: str = "loss", *, title: str = "", logy: bool = True):
        import matplotlib.pyplot as plt

        self.metric = metric
        self.runs: dict[str, list[tuple[int, float]]] = {}
        self.figure, self.axes = plt.subplots(figsize=(6, 3))
        plt.close(self.figure)  # shown through the display handle only, not again at cell end
        self.axes.set_xlabel("step")
        self.axes.set_ylabel(metric)
        if logy:
            self.axes.set_yscale("log")
        if title:
            self.axes.set_title(title)
        self._lines: dict[str, Any] = {}
        self._handle = None

    def show(self) -> "LossPlot":
        """Display the (possibly empty) figure; later rows update this output in place."""
        from IPython.display import display

        self._handle = display(self.figure, display_id=True)
        return self

    def add(self, run: str, row: dict[str, float]) -> None:
        """Append one logged row of `run` (rows without the metric are ignored) and redraw."""
        if self.metric not in row:
            return
        points = self.runs.setdefault(run, [])
        points.append((int(row["step"]), float(row[self.metric])))
        if run not in self._lines:
            (self._lines[run],) = self.axes.plot([], [], marker=".", label=run)
            self.axes.legend(loc="upper right")
        steps, values = zip(*points)
        self._lines[run].set_data(steps, values)
        self.axes.relim()
        self.axes.autoscale_view()
        if self._handle is not None:
            self._handle.update(self.figure)

    def observer(self, run: str):
        """A callback for `sora_jax.train.metrics.observe` that adds each row to `run`."""
        return lambda row: self.add(run, row)


def video_html(
    videos: np.ndarray | Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    *,
    fps: int = 8,
    width: int = 192,
) -> str:
    """HTML5 `<video>` tags (H.264 MP4, base64-inlined, looping) for videos [B, T, H, W, 3] in [-1, 1] or uint8.

    Small videos are upscaled by the browser with nearest-neighbour sampling to `width` pixels.
    """
    videos = list(videos)
    captions = list(captions) if captions is not None else [""] * len(videos)
    if len(captions) != len(videos):
        raise ValueError(f"{len(captions)} captions for {len(videos)} videos; give one caption per video")
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (video, caption) in enumerate(zip(videos, captions)):
            data = base64.b64encode(write_mp4(Path(tmp) / f"{i}.mp4", np.asarray(video), fps=fps).read_bytes())
            cells.append(
                f'<figure style="margin:4px;width:{width}px">'
                f'<video autoplay loop muted playsinline controls width="{width}" style="image-rendering:pixelated">'
                f'<source src="data:video/mp4;base64,{data.decode()}" type="video/mp4"></video>'
                f'<figcaption style="font-size:11px">{html.escape(caption)}</figcaption></figure>'
            )
    return '<div style="display:flex;flex-wrap:wrap">' + "".join(cells) + "</div>"
