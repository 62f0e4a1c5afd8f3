"""grain input pipeline for video/caption records (e.g. the TFDS physics dataset).

`make_loader` returns a `grain.DataLoader` (subclass `VideoLoader`) yielding dict batches:

- `video`:   float32 [B, T, H, W, 3] in [-1, 1]
- `caption`: numpy unicode array [B] (dtype `<U..`), one python-`str`-convertible entry per clip
- any of `num_balls`, `positions`, `velocities`, `radii`, `colors`, `seed` present in the
  source, stacked (positions/velocities follow the temporal and spatial crop).

Corrupt records (undecodable, wrong shape/dtype, bad caption) are dropped and counted in
`loader.stats` (a `LoaderStats`); see its docstring for the multi-worker caveat. Iterating the loader
assembles batches `batches_ahead` ahead in a thread; its iterator's state is that of the last batch
handed out, in the DataLoader's own format.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

from sora_jax.data.buckets import Bucket, BucketBatchDataset, BucketSpec

log = logging.getLogger(__name__)

_READ_THREADS = 4
# State arrays carried through from the physics dataset when present.
_PASSTHROUGH = ("num_balls", "positions", "velocities", "radii", "colors", "seed")


@dataclasses.dataclass
class LoaderStats:
    """Per-loader counters. Exact with worker_count=0; with workers each worker process counts
    its own copy and the parent's stays 0 (grain pickles the transforms into the workers).
    `corrupt` counts undecodable records; `skipped` counts every dropped record by reason
    (`corrupt`, and for real videos `too_small` / `too_short`)."""

    corrupt: int = 0
    last_error: str = ""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


class _TolerantSource:
    """Wraps a data source so that a record that fails to read/decode becomes `None`."""

    def __init__(self, source: Any):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        try:
            return self._source[index]
        except Exception as e:  # noqa: BLE001 - any read/decode failure is a corrupt record
            return _Corrupt(f"record {index}: {type(e).__name__}: {e}")

    def __repr__(self) -> str:
        # grain validates restored iterator state against repr(source): keep the inner one.
        return repr(self._source)


@dataclasses.dataclass(frozen=True)
class _Corrupt:
    reason: str
    kind: str = "corrupt"  # the `LoaderStats.skipped` key


def uint8_to_float(video: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], the loaders' video format."""
    return video.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def _decode(record: Any, video_shape: tuple[int, ...] | None) -> dict | _Corrupt:
    """Validates one record and converts it to the loader's element format."""
    if isinstance(record, _Corrupt):
        return record
    try:
        video = np.asarray(record["video"])
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            return _Corrupt(f"video dtype/shape {video.dtype}{video.shape}, want uint8 [T,H,W,3]")
        if video_shape is not None and video.shape != tuple(video_shape):
            return _Corrupt(f"video shape {video.shape}, want {tuple(video_shape)}")
        caption = record["caption"]
        if isinstance(caption, np.ndarray):
            caption = caption.item()
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        if not isinstance(caption, str):
            return _Corrupt(f"caption of type {type(caption).__name__}")
        out = {
            "video": uint8_to_float(video),
            "caption": caption,
        }
        for key in _PASSTHROUGH:
            if key in record:
                out[key] = np.asarray(record[key], np.int32 if key == "num_balls" else None)
        return out
    except Exception as e:  # noqa: BLE001 - anything unexpected in a record is corruption
        return _Corrupt(f"{type(e).__name__}: {e}")


class _Decode(grain.transforms.Map):
    def __init__(self, video_shape: tuple[int, ...] | None):
        self._video_shape = video_shape

    def map(self, element: Any) -> dict | _Corrupt:
        return _decode(element, self._video_shape)


class _DropCorrupt(grain.transforms.Filter):
    def __init__(self, stats: LoaderStats):
        self._stats = stats

    def filter(self, element: Any) -> bool:
        if isinstance(element, _Corrupt):
            if element.kind == "corrupt":
                self._stats.corrupt += 1
            self._stats.skipped[element.kind] = self._stats.skipped.get(element.kind, 0) + 1
            self._stats.last_error = element.reason
            log.warning("skipped a record (%s): %s", element.kind, element.reason)
            return False
        return True


def _crop(element: dict, t0: int, frames: int | None, y0: int, x0: int, crop: int | None) -> dict:
    out = dict(element)
    video = element["video"]
    t1 = video.shape[0] if frames is None else t0 + frames
    if crop is None:
        out["video"] = video[t0:t1]
    else:
        out["video"] = video[t0:t1, y0 : y0 + crop, x0 : x0 + crop]
    for key in ("positions", "velocities"):
        if key in element:
            out[key] = element[key][t0:t1]
    if crop is not None and "positions" in element:
        # Shift only real balls; padded slots stay 0.
        real = (element["colors"] >= 0)[None, :, None] if "colors" in element else True
        shifted = out["positions"] - np.array([x0, y0], np.float32)
        out["positions"] = np.where(real, shifted, out["positions"]).astype(np.float32)
    return out


class _RandomCrop(grain.transforms.RandomMap):
    """Random temporal window of `frames` (any start) and/or random `crop`x`crop` window."""

    def __init__(self, frames: int | None, crop: int | None):
        self._frames = frames
        self._crop = crop

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        t, h, w = element["video"].shape[:3]
        t0 = y0 = x0 = 0
        if self._frames is not None:
            if self._frames > t:
                raise ValueError(f"frames={self._frames} exceeds the clip length {t}")
            t0 = int(rng.integers(0, t - self._frames + 1))
        if self._crop is not None:
            if self._crop > min(h, w):
                raise ValueError(f"crop={self._crop} exceeds the frame size {h}x{w}")
            y0 = int(rng.integers(0, h - self._crop + 1))
            x0 = int(rng.integers(0, w - self._crop + 1))
        return _crop(element, t0, self._frames, y0, x0, self._crop)


class VideoLoader(grain.DataLoader):
    """A `grain.DataLoader` that also exposes its corrupt-record counter as `.stats`, and prefetches batches."""

    def __init__(self, *, stats: LoaderStats, batches_ahead: int = 2, **kwargs: Any):
        super().__init__(**kwargs)
        self.stats = stats
        self.batches_ahead = batches_ahead

    def __iter__(self):
        if self.batches_ahead < 1:
            return super().__iter__()
        return BatchPrefetch(super().__iter__, self.batches_ahead)


class BatchPrefetch:
    """A DataLoader iterator run `ahead` batches ahead in a thread; state is that of the last batch taken.

    Without workers a grain DataLoader decodes, crops and batches inside `next()`, in the thread that
    dispatches the train step: about 2 ms per batch of 4 beside a 20 ms step, 0.1 ms this way
    (docs/benchmarks.md, "Input readers"). Here a thread does it, and keeps the loader state after
    each batch with the batch, so `get_state` gives the DataLoader's own bytes for the position of the
    last batch handed out and a checkpoint resumes to the same batches as without prefetching.
    """

    def __init__(self, make_iterator: Callable[[], Any], ahead: int):
        self._inner = make_iterator()
        self._ahead = ahead
        self._state = self._inner.get_state()
        # Set when this object is collected or at exit: the thread holds no reference to it.
        self._closed = threading.Event()
        weakref.finalize(self, self._closed.set)
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(self._ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_fill_batches, args=(self._inner, self._queue, self._stop, self._closed),
                                        name="batch-prefetch", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        """Stop the thread and drop what it prefetched, including a batch it put while being stopped."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.01)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __iter__(self) -> BatchPrefetch:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch, state, error = self._queue.get()
        if error is not None:
            self._queue.put((None, None, error))  # the thread has stopped: later calls end the same way
            raise error
        self._state = state
        return batch

    def get_state(self) -> bytes:
        """The DataLoader's state after the last batch handed out (not the prefetched ones)."""
        return self._state

    def set_state(self, state: bytes) -> None:
        """Continue from a state of `get_state`'s, dropping whatever was prefetched."""
        self._halt()
        self._inner.set_state(state)
        self._state = self._inner.get_state()
        self._start()

    def start_prefetch(self) -> None:
        """Nothing to start: the thread runs from creation (grain's checkpoint restore calls this)."""

    def close(self) -> None:
        """Stop the prefetch thread and the DataLoader's read threads."""
        self._halt()
        self._closed.set()
        self._queue.put((None, None, StopIteration()))
        close_read_threads(self._inner)


def close_read_threads(it: Any) -> None:
    """Stop a grain iterator's read threads: its own close(), or that of the iterator a DataLoader's wraps."""
    # grain's DataLoaderIterator has no close() (grain 0.2.x); the dataset iterator it keeps as
    # `_iterator` has.
    target = it if hasattr(it, "close") else getattr(it, "_iterator", None)
    if target is not None and hasattr(target, "close"):
        target.close()


def _fill_batches(it: Any, out: queue.Queue, stop: threading.Event, closed: threading.Event) -> None:
    """Put (batch, state after it, None) into `out` until told to stop; the error that ends the data last."""
    while not (stop.is_set() or closed.is_set()):
        try:
            item = (next(it), it.get_state(), None)
        except BaseException as e:  # noqa: BLE001 - StopIteration ends an epoch; anything else is raised by next()
            item = (None, None, e)
        while not (stop.is_set() or closed.is_set()):
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if item[2] is not None:
            return


def _expected_video_shape(source: Any) -> tuple[int, ...] | None:
    """The video shape declared by a TFDS source, else that of the first readable record."""
    info = getattr(source, "dataset_info", None)
    try:
        return tuple(int(d) for d in info.features["video"].shape)
    except Exception:  # noqa: BLE001 - not a TFDS source: fall back to sniffing records
        pass
    for i in range(min(len(source), 16)):
        try:
            video = np.asarray(source[i]["video"])
        except Exception:  # noqa: BLE001
            continue
        if video.ndim == 4 and video.shape[-1] == 3 and video.dtype == np.uint8:
            return tuple(video.shape)
    return None


def _check_frames(frames: int | None, crop: int | None) -> None:
    if frames is not None and (frames < 1 or frames % 4 != 1):
        raise ValueError(f"frames must be 4k+1 (1, 5, 9, 17, ...) for the causal VAE, got {frames}")
    if crop is not None and crop < 1:
        raise ValueError(f"crop must be positive, got {crop}")


def make_loader(
    source: Any,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    frames: int | None = None,
    crop: int | None = None,
    drop_remainder: bool = True,
    read_options: grain.ReadOptions | None = None,
    batches_ahead: int = 2,
) -> VideoLoader:
    """A grain DataLoader of per-process batches (batch_size is per process), sharded by process.

    `read_options` overrides the record prefetching and `batches_ahead` the batches its iterators
    assemble ahead in a thread (0: none, in `next()` as grain does), for benchmarks.
    """
    _check_frames(frames, crop)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if (shard_index is None) != (shard_count is None):
        raise ValueError("pass both shard_index and shard_count, or neither")
    if shard_index is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    # drop_remainder: every process sees the same number of records, so no host runs short.
    shard_options = grain.sharding.ShardOptions(
        shard_index=shard_index, shard_count=shard_count, drop_remainder=True
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    video_shape = _expected_video_shape(source)
    if video_shape is not None:
        t, h, w = video_shape[:3]
        if frames is not None and frames > t:
            raise ValueError(f"frames={frames} exceeds the clip length {t}; use frames <= {t}")
        if crop is not None and crop > min(h, w):
            raise ValueError(f"crop={crop} exceeds the frame size {h}x{w}")
    stats = LoaderStats()
    operations: list[Any] = [_Decode(video_shape), _DropCorrupt(stats)]
    if frames is not None or crop is not None:
        operations.append(_RandomCrop(frames, crop))
    operations.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder))
    return VideoLoader(
        stats=stats,
        batches_ahead=batches_ahead,
        data_source=_TolerantSource(source),
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        shard_options=shard_options,
        # As for the latent cache: grain's default (16 threads, 500 records) walks its whole ready buffer
        # on every record handed out, in the train loop's thread. Two batches of 4 threads keep ahead
        # of the step without that (docs/benchmarks.md, "Input readers").
        read_options=read_options or grain.ReadOptions(num_threads=_READ_THREADS,
                                                       prefetch_buffer_size=max(16, 2 * batch_size)),
    )


def numpy_batch(
    source: Any,
    indices: Sequence[int],
    *,
    frames: int | None = None,
    stats: LoaderStats | None = None,
) -> dict[str, np.ndarray]:
    """Decodes fixed examples (e.g. held-out eval clips) into one batch, skipping corrupt ones."""
    _check_frames(frames, None)
    stats = stats if stats is not None else LoaderStats()
    tolerant = _TolerantSource(source)
    shape = _expected_video_shape(source)
    keep = _DropCorrupt(stats)
    elements = []
    for i in indices:
        el = _decode(tolerant[int(i)], shape)
        if keep.filter(el):
            # Deterministic: the first `frames` frames.
            elements.append(_crop(el, 0, frames, 0, 0, None))
    if not elements:
        raise ValueError(f"no readable records among indices {list(indices)}")
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


class _TagBucket(grain.transforms.Map):
    def __init__(self, name: str):
        self._name = name

    def map(self, element: dict) -> dict:
        return dict(element, bucket=self._name)


def one_pass_batches(source: Any, bucket: Bucket, *, shard_index: int = 0, shard_count: int = 1,
                     stats: LoaderStats | None = None) -> grain.DatasetIterator:
    """One in-order pass over a fixed-shape source (this process's share) as batches of `bucket`.

    For encoding a dataset once (latent caches): checkpointable, so an interrupted pass resumes;
    the last batch may be short; corrupt records are skipped and counted in `stats`.
    """
    stats = stats if stats is not None else LoaderStats()
    ds = grain.MapDataset.source(_TolerantSource(source))[shard_index::shard_count]
    ds = ds.map(_Decode(_expected_video_shape(source)))
    it = ds.to_iter_dataset().filter(_DropCorrupt(stats)).map(_TagBucket(bucket.name))
    return iter(BucketBatchDataset(it, BucketSpec((bucket,)), drop_remainder=False))
