"""Aspect/duration buckets for training on real videos of mixed sizes and lengths.

A `BucketSpec` is a set of (height, width, frames) shapes, each with its own batch size, so
that every batch has one shape and large buckets can use smaller batches. `assign_bucket`
maps a clip to the largest bucket it can fill without upscaling; `BucketBatchDataset` is the
grain `IterDataset` that routes decoded elements to per-bucket buffers and emits a batch when
one is full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One batch shape: `batch_size` clips of `frames` x `height` x `width`."""

    height: int
    width: int
    frames: int
    batch_size: int

    @property
    def name(self) -> str:
        """`HxWxT`, e.g. `48x64x17`; unique within a spec."""
        return f"{self.height}x{self.width}x{self.frames}"

    @property
    def volume(self) -> int:
        """Pixels x frames, the size `assign_bucket` maximizes."""
        return self.height * self.width * self.frames


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """Validated buckets: frames `temporal`k+1, sizes multiples of `multiple`, batch >= 1."""

    buckets: tuple[Bucket, ...]
    multiple: int = 16
    temporal: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", tuple(self.buckets))
        if not self.buckets:
            raise ValueError("BucketSpec needs at least one bucket; pass e.g. [Bucket(256, 256, 17, 8)]")
        seen = set()
        for b in self.buckets:
            if b.frames < 1 or (b.frames - 1) % self.temporal:
                fix = 1 + self.temporal * max(0, round((b.frames - 1) / self.temporal))
                raise ValueError(f"bucket {b.name}: frames must be {self.temporal}k+1 for the causal VAE; use {fix}")
            if b.height < self.multiple or b.width < self.multiple or b.height % self.multiple or b.width % self.multiple:
                m = self.multiple
                raise ValueError(
                    f"bucket {b.name}: height/width must be positive multiples of {m}; "
                    f"use {max(m, b.height // m * m)}x{max(m, b.width // m * m)}"
                )
            if b.batch_size < 1:
                raise ValueError(f"bucket {b.name}: batch_size must be >= 1, got {b.batch_size}")
            if b.name in seen:
                raise ValueError(f"bucket {b.name} appears twice; give each (height, width, frames) once")
            seen.add(b.name)

    @classmethod
    def parse(cls, text: str, multiple: int = 16, temporal: int = 4) -> BucketSpec:
        """Buckets from `HxWxT:B,...` (e.g. `256x256x17:8,256x448x17:4,512x512x1:32`)."""
        buckets = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            try:
                shape, batch = item.split(":")
                h, w, t = (int(v) for v in shape.lower().split("x"))
                buckets.append(Bucket(h, w, t, int(batch)))
            except ValueError:
                raise ValueError(f"bucket {item!r}: expected HxWxT:BATCH, e.g. 256x256x17:8") from None
        return cls(tuple(buckets), multiple=multiple, temporal=temporal)

    def __getitem__(self, name: str) -> Bucket:
        for b in self.buckets:
            if b.name == name:
                return b
        raise KeyError(f"no bucket named {name!r}; have {[b.name for b in self.buckets]}")


def fits(bucket: Bucket, src_h: int, src_w: int, src_frames: int) -> bool:
    """Whether a clip fills `bucket` without upscaling (see `assign_bucket`)."""
    return bucket.height <= src_h and bucket.width <= src_w and bucket.frames <= src_frames


def assign_bucket(src_h: int, src_w: int, src_frames: int, spec: BucketSpec) -> Bucket | None:
    """The largest bucket (pixels x frames) a clip fits without upscaling, else None.

    "Fits" means: a crop with the bucket's aspect ratio exists in the source at a resolution
    >= the bucket's, i.e. the source is downscaled (scale = max(bh/h, bw/w) <= 1, aspect kept)
    until it just covers the bucket and then cropped -- which holds exactly when
    `bucket.height <= src_h and bucket.width <= src_w`; and the clip has
    `src_frames >= bucket.frames`, where `src_frames` counts frames *after* frame sampling
    (stride/fps). Ties in size go to the bucket whose aspect is closest to the source's
    (less is cropped away), then to the earlier one in the spec.
    """
    src_aspect = np.log(src_w / src_h) if src_h > 0 and src_w > 0 else 0.0
    best, best_key = None, None
    for i, b in enumerate(spec.buckets):
        if not fits(b, src_h, src_w, src_frames):
            continue
        key = (-b.volume, abs(np.log(b.width / b.height) - src_aspect), i)
        if best_key is None or key < best_key:
            best, best_key = b, key
    return best


def skip_reason(src_h: int, src_w: int, src_frames: int, spec: BucketSpec) -> str:
    """Why no bucket fits: `too_short` if one fits by size alone, else `too_small`."""
    if any(fits(b, src_h, src_w, b.frames) for b in spec.buckets):  # by size alone
        return "too_short"
    return "too_small"


def _stack(elements: Sequence[dict], bucket: Bucket, finalize: Callable[[dict], dict] | None) -> dict:
    batch = {k: np.stack([e[k] for e in elements]) for k in elements[0] if k not in ("bucket", "caption")}
    batch["caption"] = np.array([e["caption"] for e in elements])
    batch["bucket"] = bucket.name
    return finalize(batch) if finalize is not None else batch


class _BucketBatchIterator(grain.DatasetIterator):
    """Per-bucket buffers; emits a bucket's batch as soon as it holds `batch_size` elements.

    Checkpointable exactly: the state holds the parent's state from just before the oldest
    still-buffered element was read plus the sequence numbers of the buffered elements, and
    `set_state` replays the parent from there, keeping only those (the others were emitted).
    """

    def __init__(self, parent: grain.DatasetIterator, spec: BucketSpec, drop_remainder: bool,
                 finalize: Callable[[dict], dict] | None):
        super().__init__(parent)
        self._spec = spec
        self._drop_remainder = drop_remainder
        self._finalize = finalize
        self._reset()

    def _reset(self) -> None:
        self._buffers: dict[str, list[tuple[int, dict]]] = {b.name: [] for b in self._spec.buckets}
        self._seq = 0  # elements read from the parent so far
        self._state_before: dict[int, dict] = {}  # seq -> parent state before reading it
        self._exhausted = False

    def _read(self) -> tuple[int, dict]:
        state = self._parent.get_state()
        element = next(self._parent)
        seq = self._seq
        self._seq += 1
        self._state_before[seq] = state
        return seq, element

    def _emit(self, name: str, items: list[tuple[int, dict]]) -> dict:
        for seq, _ in items:
            self._state_before.pop(seq, None)
        return _stack([e for _, e in items], self._spec[name], self._finalize)

    def __next__(self) -> dict:
        while not self._exhausted:
            try:
                seq, element = self._read()
            except StopIteration:
                self._exhausted = True
                break
            name = element["bucket"]
            if name not in self._buffers:
                raise ValueError(f"element bucket {name!r} is not in the spec {[b.name for b in self._spec.buckets]}")
            buf = self._buffers[name]
            buf.append((seq, element))
            if len(buf) == self._spec[name].batch_size:
                self._buffers[name] = []
                return self._emit(name, buf)
        if not self._drop_remainder:
            for name, buf in self._buffers.items():
                if buf:
                    self._buffers[name] = []
                    return self._emit(name, buf)
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        buffered = sorted(seq for buf in self._buffers.values() for seq, _ in buf)
        if buffered:
            parent_state, start = self._state_before[buffered[0]], buffered[0]
        else:
            parent_state, start = self._parent.get_state(), self._seq
        return {"parent": parent_state, "start": start, "buffered": buffered, "seq": self._seq,
                "exhausted": self._exhausted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._reset()
        self._parent.set_state(state["parent"])
        self._seq = int(state["start"])
        keep = set(int(s) for s in state["buffered"])
        # Replay up to where the saved iterator was; emitted elements are re-read and dropped.
        while self._seq < int(state["seq"]):
            seq, element = self._read()
            if seq in keep:
                self._buffers[element["bucket"]].append((seq, element))
            else:
                self._state_before.pop(seq, None)
        self._exhausted = bool(state["exhausted"])


class BucketBatchDataset(grain.IterDataset):
    """Batches elements carrying a `bucket` name into single-shape per-bucket batches.

    Elements are dicts with `bucket` (a name from `spec`), `caption` (str) and arrays of the
    bucket's shape; batches stack the arrays, make `caption` a numpy str array [B] and keep
    `bucket` as the name. `finalize` (e.g. uint8 -> float) runs once per batch. The order is
    deterministic given the parent's. Put it after `mp_prefetch` so it runs in the main
    process: it is cheap, and it sees every worker's elements.
    """

    def __init__(self, parent: grain.IterDataset, spec: BucketSpec, *, drop_remainder: bool = True,
                 finalize: Callable[[dict], dict] | None = None):
        super().__init__(parent)
        self._spec = spec
        self._drop_remainder = drop_remainder
        self._finalize = finalize

    def __iter__(self) -> _BucketBatchIterator:
        return _BucketBatchIterator(self._parent.__iter__(), self._spec, self._drop_remainder, self._finalize)

    def __str__(self) -> str:
        return f"BucketBatchDataset(buckets={[b.name for b in self._spec.buckets]})"

