"""Real videos/images from a folder or a manifest, decoded with PyAV in grain, batched by bucket.

Pipeline (`make_bucketed_loader`): `VideoSource` (file list + cached cheap probes) ->
shard/shuffle/repeat -> `DecodeToBucket` (grain random map, runs in the workers: assign the
largest fitting bucket, sample frames by stride or fps from a random start, random
crop-resize, caption dropout) -> `mp_prefetch` -> drop-and-count skipped records (main
process, so `stats` is exact even with workers) -> `BucketBatchDataset` (one shape per batch).

Batches: `video` float32 [B, T, H, W, 3] in [-1, 1] (as `pipeline.make_loader`), `caption`
numpy str array [B], `bucket` the bucket's name. Clips travel uint8 between processes and are
converted once per batch.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import av
import grain
import numpy as np
from PIL import Image

from sora_jax.data.buckets import Bucket, BucketBatchDataset, BucketSpec, assign_bucket, skip_reason
from sora_jax.data.pipeline import LoaderStats, _Corrupt, _DropCorrupt, _TolerantSource, uint8_to_float
from sora_jax.data.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, cover_size


@dataclasses.dataclass(frozen=True)
class Probe:
    """Cheap stream metadata: frame size, frame count and frame rate (0 when unknown/image)."""

    height: int
    width: int
    frames: int
    fps: float


@dataclasses.dataclass(frozen=True)
class Entry:
    """One source file: path, caption and any metadata the manifest declared."""

    path: str
    caption: str = ""
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None

    @property
    def is_image(self) -> bool:
        """Whether the file is read as a 1-frame video through Pillow."""
        return Path(self.path).suffix.lower() in IMAGE_SUFFIXES


def probe_file(path: str | Path) -> Probe:
    """Reads size/frames/fps from the container header (no full decode); images are 1 frame."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        with Image.open(path) as im:  # lazy: reads the header only
            w, h = im.size
        return Probe(h, w, 1, 0.0)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        s = container.streams.video[0]
        h, w = int(s.codec_context.height), int(s.codec_context.width)
        rate = s.average_rate or s.guessed_rate or s.base_rate
        fps = float(rate) if rate else 0.0
        frames = int(s.frames or 0)
        if frames <= 0 and fps > 0:
            # Containers without a frame count (webm, some mkv): estimate from the duration.
            if s.duration is not None and s.time_base is not None:
                seconds = float(s.duration * s.time_base)
            else:
                seconds = (container.duration or 0) / av.time_base
            frames = int(round(seconds * fps))
    if h <= 0 or w <= 0 or frames <= 0:
        raise ValueError(f"{path}: stream reports {h}x{w}, {frames} frames")
    return Probe(h, w, frames, fps)


def _opt(row: dict, key: str, cast: type, where: str) -> Any:
    value = row.get(key)
    if value is None or value == "":
        return None
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key}={value!r} is not a number; fix or remove it") from None


def _entry(row: dict, base: Path, where: str) -> Entry:
    path = row.get("path")
    if not path:
        raise ValueError(f"{where}: row has no 'path'; add the clip's path (relative to {base})")
    p = Path(str(path)).expanduser()
    return Entry(
        path=str(p if p.is_absolute() else base / p),
        caption=str(row.get("caption") or ""),
        fps=_opt(row, "fps", float, where),
        width=_opt(row, "width", int, where),
        height=_opt(row, "height", int, where),
        frames=_opt(row, "frames", int, where),
    )


def read_manifest(path: str | Path) -> list[Entry]:
    """Entries of a `.jsonl` ({"path", "caption", ...} per line) or `.csv` (header path,caption,...)."""
    path = Path(path)
    base = path.parent
    entries = []
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg}); write one object per line") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object like {{\"path\": ..., \"caption\": ...}}")
                entries.append(_entry(row, base, where))
    elif path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ValueError(f"{path}: no 'path' column in the header; start the file with path,caption")
            for lineno, row in enumerate(reader, 2):
                entries.append(_entry(row, base, f"{path}:{lineno}"))
    else:
        raise ValueError(f"manifest {path}: unknown type {path.suffix!r}; use .jsonl or .csv")
    return entries


def scan_folder(root: str | Path) -> list[Entry]:
    """Every video/image under `root` (recursive, sorted); caption from a same-stem .txt, else ""."""
    root = Path(root)
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
            txt = p.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
            entries.append(Entry(str(p), caption))
    return entries


class VideoSource:
    """grain random-access source over a folder or manifest; each record carries its probe.

    Probes are cached per file (per process: grain workers each fill their own copy);
    `probe_all()` fills the cache up front, so workers inherit it. A manifest row with
    width, height, frames (and fps, for videos) is not probed at all.
    """

    def __init__(self, data: str | Path, *, probe_all: bool = False):
        data = Path(data).expanduser()
        if not data.exists():
            raise FileNotFoundError(
                f"video data {data} not found; pass a folder of videos/images or a .jsonl/.csv manifest")
        if data.is_dir():
            self.entries = scan_folder(data)
        else:
            self.entries = read_manifest(data)
        if not self.entries:
            raise ValueError(f"{data} lists no videos or images; add {'/'.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)} files")
        self._data = str(data)
        self._probes: dict[int, Probe] = {}
        if probe_all:
            self.probe_all()

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        # grain validates restored iterator state against repr(source): keep it stable.
        return f"VideoSource({self._data!r}, n={len(self.entries)})"

    def probe(self, index: int) -> Probe:
        """The (cached) probe of entry `index`; raises on an unreadable file."""
        if index not in self._probes:
            e = self.entries[index]
            if e.is_image and e.width and e.height:
                self._probes[index] = Probe(e.height, e.width, 1, 0.0)
            elif e.width and e.height and e.frames and e.fps:
                self._probes[index] = Probe(e.height, e.width, e.frames, e.fps)
            else:
                p = probe_file(e.path)
                # A manifest fps overrides the container's (e.g. a wrongly tagged file).
                self._probes[index] = dataclasses.replace(p, fps=e.fps) if e.fps else p
        return self._probes[index]

    def probe_all(self) -> dict[str, int]:
        """Probes every file now; returns counts {"ok", "unreadable"} (unreadable files are kept
        and skipped when read, so indices stay stable)."""
        bad = 0
        for i in range(len(self.entries)):
            try:
                self.probe(i)
            except Exception:  # noqa: BLE001 - counted; skipped again (and logged) when read
                bad += 1
        return {"ok": len(self.entries) - bad, "unreadable": bad}

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        e = self.entries[index]
        try:
            probe = self.probe(index)
        except Exception as err:  # noqa: BLE001 - any probe failure: unreadable file
            raise ValueError(f"{e.path}: unreadable ({type(err).__name__}: {err})") from None
        return {"index": index, "path": e.path, "caption": e.caption, "image": e.is_image, "probe": probe}


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """Take every `stride`-th frame, or resample to `fps` from the container's rate (one of them)."""

    stride: int | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.stride is not None and self.fps is not None:
            raise ValueError("pass frame sampling by stride or by fps, not both")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")

    def step(self, src_fps: float) -> float:
        """Source frames per sampled frame (may be < 1: then frames repeat)."""
        if self.fps is None:
            return float(self.stride or 1)
        if not src_fps > 0:
            raise ValueError("the video has no frame rate; add fps to its manifest row or sample by stride")
        return src_fps / self.fps

    def available(self, src_frames: int, src_fps: float) -> int:
        """How many sampled frames a clip of `src_frames` frames yields from start 0."""
        if src_frames < 1:
            return 0
        return int(math.floor((src_frames - 1) / self.step(src_fps) + 1e-9)) + 1

    def indices(self, start: int, count: int, src_fps: float) -> np.ndarray:
        """Source frame indices of `count` sampled frames beginning at frame `start`."""
        step = self.step(src_fps)
        return start + np.floor(np.arange(count) * step + 1e-9).astype(np.int64)


def _crop_box(h: int, w: int, bucket: Bucket, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Resize target (rh, rw) covering the bucket with the aspect kept, and a random crop origin."""
    rh, rw = cover_size(h, w, bucket.height, bucket.width)
    y0 = int(rng.integers(0, rh - bucket.height + 1))
    x0 = int(rng.integers(0, rw - bucket.width + 1))
    return rh, rw, y0, x0


def decode_clip(path: str, indices: np.ndarray, resize: tuple[int, int], crop: tuple[int, int, int, int],
                image: bool = False) -> np.ndarray:
    """Decodes the frames at `indices` (sorted, may repeat), resized to `resize` and cropped to
    `crop` = (y0, x0, h, w): uint8 [len(indices), h, w, 3]; fewer rows if the file ends early."""
    rh, rw = resize
    y0, x0, ch, cw = crop
    if image:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (rw, rh):
                im = im.resize((rw, rh), Image.BICUBIC)
            frame = np.asarray(im)[y0:y0 + ch, x0:x0 + cw]
        return np.repeat(frame[None], len(indices), axis=0)
    wanted: dict[int, int] = {}
    for i in indices.tolist():
        wanted[i] = wanted.get(i, 0) + 1
    last = int(indices[-1])
    out = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        # Decode from the start: seeking is keyframe-granular and unreliable across containers,
        # and training clips are short.
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                arr = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="AREA").to_ndarray()
                arr = np.ascontiguousarray(arr[y0:y0 + ch, x0:x0 + cw])
                out.extend([arr] * wanted[i])
            if i >= last:
                break
    if not out:
        return np.zeros((0, ch, cw, 3), np.uint8)
    return np.stack(out)


class DecodeToBucket(grain.transforms.RandomMap):
    """Record -> {"video" uint8 [T,H,W,3], "caption", "bucket"} or a `_Corrupt` with the reason.

    Per record (deterministic given the grain seed and position): caption dropout, the largest
    bucket that fits without upscaling, a random start, a random crop.
    """

    def __init__(self, spec: BucketSpec, sampling: FrameSampling = FrameSampling(), caption_dropout: float = 0.0):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.spec = spec
        self.sampling = sampling
        self.caption_dropout = caption_dropout

    def random_map(self, record: Any, rng: np.random.Generator) -> dict | _Corrupt:
        """Decodes one record into its bucket's shape (never raises: failures become `_Corrupt`)."""
        if isinstance(record, _Corrupt):
            return record
        path = record["path"]
        try:
            # Drawn first so the dropout decision does not depend on the clip's geometry.
            drop = bool(rng.random() < self.caption_dropout)
            p: Probe = record["probe"]
            if record["image"]:
                step, avail = 1.0, 1
            else:
                step, avail = self.sampling.step(p.fps), self.sampling.available(p.frames, p.fps)
            bucket = assign_bucket(p.height, p.width, avail, self.spec)
            if bucket is None:
                kind = skip_reason(p.height, p.width, avail, self.spec)
                return _Corrupt(f"{path}: {p.height}x{p.width}, {avail} frames after sampling fits no bucket", kind)
            # Last start that still leaves room for the bucket's frames.
            max_start = 0 if record["image"] else int(math.floor(p.frames - 1 - step * (bucket.frames - 1) + 1e-9))
            start = int(rng.integers(0, max_start + 1))
            indices = (np.zeros(bucket.frames, np.int64) if record["image"]
                       else self.sampling.indices(start, bucket.frames, p.fps))
            rh, rw, y0, x0 = _crop_box(p.height, p.width, bucket, rng)
            video = decode_clip(path, indices, (rh, rw), (y0, x0, bucket.height, bucket.width), record["image"])
        except Exception as e:  # noqa: BLE001 - any decode failure skips the file, never the run
            return _Corrupt(f"{path}: {type(e).__name__}: {e}")
        if video.shape[0] < bucket.frames:
            return _Corrupt(f"{path}: decoded {video.shape[0]} of {bucket.frames} frames "
                            f"(the header promised {p.frames})", "too_short")
        if video.shape[1:3] != (bucket.height, bucket.width):
            return _Corrupt(f"{path}: decoded frames {video.shape[1:3]}, header said {p.height}x{p.width}")
        return {"video": video, "caption": "" if drop else record["caption"], "bucket": bucket.name}


def to_float_batch(batch: dict) -> dict:
    """uint8 video -> float32 in [-1, 1], the format `pipeline.make_loader` yields."""
    out = dict(batch)
    out["video"] = uint8_to_float(batch["video"])
    return out


@dataclasses.dataclass
class BucketedLoader:
    """An iterable of single-shape per-bucket batches; `stats` counts skipped files by reason."""

    dataset: grain.IterDataset
    stats: LoaderStats

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def make_bucketed_loader(
    source: VideoSource | str | Path,
    spec: BucketSpec,
    *,
    seed: int,
    sampling: FrameSampling = FrameSampling(),
    caption_dropout: float = 0.0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    read_threads: int = 2,
    float_video: bool = True,
) -> BucketedLoader:
    """Per-process bucketed batches of real videos (batch sizes per bucket), sharded by process."""
    if not isinstance(source, VideoSource):
        source = VideoSource(source)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    n = len(source) // shard_count * shard_count  # equal shards: no host runs short
    if n == 0:
        raise ValueError(f"{len(source)} files cannot be split over {shard_count} processes; add files")
    ds = grain.MapDataset.source(_TolerantSource(source))[:n][shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.random_map(DecodeToBucket(spec, sampling, caption_dropout), seed=seed)
    # Small buffers: elements are decoded clips, not records.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * max(1, read_threads)))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2))
    stats = LoaderStats()
    it = it.filter(_DropCorrupt(stats))  # after mp_prefetch: counted in this process
    it = BucketBatchDataset(it, spec, drop_remainder=drop_remainder, finalize=to_float_batch if float_video else None)
    return BucketedLoader(it, stats)


def loader_from_config(cfg: Any, *, seed: int, shard_index: int = 0, shard_count: int = 1,
                       num_epochs: int | None = None) -> BucketedLoader:
    """`make_bucketed_loader` from a `configs.video_data.video_data_config()` ConfigDict."""
    if not cfg.path:
        raise ValueError("data.path is empty; set --config.data.path to a video folder or a .jsonl/.csv manifest")
    sampling = FrameSampling(fps=float(cfg.fps)) if cfg.fps > 0 else FrameSampling(stride=int(cfg.stride))
    return make_bucketed_loader(
        VideoSource(cfg.path, probe_all=bool(cfg.probe_all)),
        BucketSpec.parse(cfg.buckets),
        seed=seed,
        sampling=sampling,
        caption_dropout=float(cfg.caption_dropout),
        num_epochs=num_epochs,
        worker_count=int(cfg.worker_count),
        shard_index=shard_index,
        shard_count=shard_count,
    )
