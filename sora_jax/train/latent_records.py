"""Latent cache on disk: VAE latents and text embeddings per clip in ArrayRecord files, read by grain.

The VAE and the text encoder run once over a dataset; training then reads small records instead of
decoding and encoding video every step, as large-scale video trainers do. A cache folder holds
  - `part-PPPPP-NNNNN.array_record`: records of process P's N-th chunk, each a msgpack dict
    {latents [t, h, w, z] float32, text [L, D] float32, text_mask [L] bool, caption, bucket};
    written under a temporary name and renamed, so a part file is always whole;
  - `progress-PPPPP.json`: per process, the parts written, the per-bucket record counts and the data
    iterator's state after them; an interrupted build resumes from there;
  - `cache_info.json` (TFDS-style metadata): features with their shapes per bucket and dtypes, the
    buckets, record counts, the inputs the cache was built from, `complete`.
Records of different buckets have different latent shapes; the reader groups them back into
single-shape batches with `BucketBatchDataset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module
from flax import serialization

from sora_jax.data.buckets import Bucket, BucketBatchDataset, BucketSpec
from sora_jax.models.vae import CausalVAE, normalize_latents
from sora_jax.parallel.mesh import batch_sharding, make_mesh, replicated
from sora_jax.train.checkpoint import write_json_atomic

log = logging.getLogger(__name__)

INFO_FILE = "cache_info.json"
FORMAT = "sora_jax.latent_records/1"
FEATURES = ("latents", "text", "text_mask")


class CacheError(ValueError):
    """A cache folder that cannot be written to or read as asked."""


def cache_key(*parts: object) -> str:
    """A short stable hash naming a cache built from these inputs."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def null_text(batch: int, length: int, dim: int) -> tuple[jax.Array, jax.Array]:
    """The unconditional text: one zero token (a learned bias key/value), the rest padding."""
    emb = jnp.zeros((batch, length, dim), jnp.float32)
    mask = jnp.zeros((batch, length), bool).at[:, 0].set(True)
    return emb, mask


def encode_record(latents: np.ndarray, text: np.ndarray, text_mask: np.ndarray, caption: str, bucket: str) -> bytes:
    """One clip's record as msgpack bytes (no pickle)."""
    return serialization.msgpack_serialize({
        "latents": np.asarray(latents, np.float32), "text": np.asarray(text, np.float32),
        "text_mask": np.asarray(text_mask, bool), "caption": str(caption), "bucket": str(bucket)})


def decode_record(data: bytes) -> dict[str, Any]:
    """The dict of `encode_record`."""
    return serialization.msgpack_restore(data)


def make_encoder(vae: CausalVAE, vae_params: Any, text_encoder: Any, devices: list | None = None
                 ) -> Callable[[dict], list[dict]]:
    """A batch {video [B, T, H, W, 3] in [-1, 1], caption [B]} -> per-clip latents and text embeddings.

    The VAE runs jitted over this process's devices (batch split over them when it divides).
    """
    mesh = make_mesh({"data": -1}, devices or jax.local_devices())
    n = mesh.devices.size
    vae_params = jax.device_put(vae_params, replicated(mesh))  # restored onto one device

    @jax.jit
    def encode(params, video):
        mean = vae.apply(params, video, method=CausalVAE.encode)[0]  # the posterior mean
        return normalize_latents(mean, vae.cfg)

    def run(batch: dict) -> list[dict]:
        video = np.asarray(batch["video"], np.float32)
        if len(video) % n == 0:
            video = jax.device_put(video, batch_sharding(mesh, video.ndim))
        z = np.asarray(encode(vae_params, video), np.float32)
        captions = [str(c) for c in batch["caption"]]
        text, mask = _encode_text(text_encoder, captions)
        return [{"latents": z[i], "text": np.asarray(text[i], np.float32), "text_mask": np.asarray(mask[i], bool),
                 "caption": captions[i], "bucket": str(batch["bucket"])} for i in range(len(captions))]

    return run


def _encode_text(text_encoder: Any, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Text embeddings [B, L, D] and masks; an uncaptioned clip ("") gets the unconditional null text."""
    given = [i for i, c in enumerate(captions) if c.strip()]
    n_e, n_m = null_text(len(captions), text_encoder.max_length, text_encoder.hidden_size)
    emb, mask = np.array(n_e), np.array(n_m)
    if given:
        e, m = text_encoder.encode([captions[i] for i in given])
        emb[given], mask[given] = np.asarray(e, np.float32), np.asarray(m, bool)
    return emb, mask


def _progress_path(out: Path, process: int) -> Path:
    return out / f"progress-{process:05d}.json"


def _part_path(out: Path, process: int, part: int) -> Path:
    return out / f"part-{process:05d}-{part:05d}.array_record"


def _write_part(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
    for r in records:
        writer.write(encode_record(r["latents"], r["text"], r["text_mask"], r["caption"], r["bucket"]))
    writer.close()
    tmp.replace(path)


def build_cache(
    out_dir: str | Path,
    batches: grain.DatasetIterator,
    encode: Callable[[dict], list[dict]],
    *,
    source: dict,
    part_batches: int = 16,
    process_index: int = 0,
    process_count: int = 1,
    max_parts: int | None = None,
) -> dict:
    """Encode every batch of a (checkpointable, one-epoch) iterator into part files; resumes a partial build.

    `source` names the inputs (data, VAE, text encoder); resuming with other inputs is refused.
    `max_parts` stops after that many new parts (a partial build, as if interrupted). Returns the
    cache info (`complete` once every process has finished).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress_file = _progress_path(out, process_index)
    progress = {"source": source, "parts": 0, "counts": {}, "shapes": {}, "iterator": None, "done": False}
    if progress_file.exists():
        saved = json.loads(progress_file.read_text())
        if saved["source"] != source:
            raise CacheError(f"{out} holds a cache built from other inputs ({saved['source']}); "
                             "use a new folder or delete this one")
        progress = saved
        if progress["iterator"] is not None:
            batches.set_state(progress["iterator"])
        log.info("latent cache %s: resuming after %d parts", out, progress["parts"])
    written = 0
    while not progress["done"] and (max_parts is None or written < max_parts):
        records = []
        for _ in range(part_batches):
            try:
                batch = next(batches)
            except StopIteration:
                progress["done"] = True
                break
            records += encode(batch)
        if records:
            _write_part(_part_path(out, process_index, progress["parts"]), records)
            progress["parts"] += 1
            written += 1
            for r in records:
                b = r["bucket"]
                progress["counts"][b] = progress["counts"].get(b, 0) + 1
                progress["shapes"][b] = {k: list(np.shape(r[k])) for k in FEATURES}
        progress["iterator"] = batches.get_state()
        write_json_atomic(progress_file, progress)
    if process_count > 1 and progress["done"]:
        from jax.experimental import multihost_utils

        # Process 0 merges every process's progress: wait until all have written their last part.
        multihost_utils.sync_global_devices("latent_cache_built")
    return _write_info(out, source, process_count)


def _write_info(out: Path, source: dict, process_count: int) -> dict:
    """Merge every process's progress into cache_info.json (process 0 writes it)."""
    counts: dict[str, int] = {}
    shapes: dict[str, dict] = {}
    complete = True
    for p in range(process_count):
        f = _progress_path(out, p)
        if not f.exists():
            complete = False
            continue
        prog = json.loads(f.read_text())
        complete &= bool(prog["done"])
        for b, n in prog["counts"].items():
            counts[b] = counts.get(b, 0) + n
        shapes.update(prog["shapes"])
    info = {
        "format": FORMAT,
        "complete": complete,
        "source": source,
        "num_records": sum(counts.values()),
        "buckets": {b: {"num_records": counts[b], "shapes": shapes[b]} for b in sorted(counts)},
        "features": {"latents": "float32", "text": "float32", "text_mask": "bool", "caption": "string",
                     "bucket": "string"},
    }
    if jax.process_index() == 0:
        write_json_atomic(out / INFO_FILE, info)
    return info


def read_info(cache_dir: str | Path) -> dict:
    """The metadata of a finished cache; a missing or unfinished cache is one clear error."""
    f = Path(cache_dir) / INFO_FILE
    if not f.is_file():
        raise CacheError(f"{f} not found; build the cache with `sora-jax cache-latents` first")
    info = json.loads(f.read_text())
    if info.get("format") != FORMAT:
        raise CacheError(f"{f} has format {info.get('format')!r}, expected {FORMAT!r}; rebuild the cache")
    if not info["complete"]:
        raise CacheError(f"the cache in {cache_dir} is unfinished; re-run the same `sora-jax cache-latents` to complete it")
    return info


def part_files(cache_dir: str | Path) -> list[str]:
    """The cache's record files in a fixed order."""
    return sorted(str(p) for p in Path(cache_dir).glob("part-*.array_record"))


_READ_THREADS, _BATCHES_AHEAD = 4, 2


class _Decode(grain.transforms.Map):
    def map(self, element: bytes) -> dict:
        return decode_record(element)


def make_cache_loader(
    cache_dir: str | Path,
    batch_sizes: dict[str, int],
    *,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    read_options: grain.ReadOptions | None = None,
    batches_ahead: int = _BATCHES_AHEAD,
) -> Iterator[dict]:
    """Shuffled single-shape batches per bucket (`batch_sizes`: per-process batch per bucket name).

    Yields {latents [B, t, h, w, z], text [B, L, D], text_mask [B, L], caption [B], bucket}; the
    iterator is checkpointable (grain state). `read_options` / `batches_ahead` (0: none) override the
    prefetching, for benchmarks.
    """
    info = read_info(cache_dir)
    missing = sorted(set(info["buckets"]) - set(batch_sizes))
    if missing:
        raise CacheError(f"no batch size for cache buckets {missing}; set them in the training config's buckets")
    n = info["num_records"] // shard_count * shard_count
    if n == 0:
        raise CacheError(f"{info['num_records']} cached clips cannot be split over {shard_count} processes")
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(part_files(cache_dir)))
    ds = ds[:n][shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_Decode())
    spec = BucketSpec(tuple(_bucket(name, batch_sizes[name]) for name in sorted(info["buckets"])), multiple=1)
    # grain's default read options (16 threads, 500 elements) scan the whole ready buffer for a metric on
    # every element handed out: ~11 ms per batch of 16 records, in the train loop's thread. A buffer of
    # two batches keeps the reads ahead without that. Batches are then assembled ahead in a thread, so
    # the train loop's thread only dispatches; grain keeps each prefetched batch's state, so a checkpoint
    # still holds the position of the last batch taken (docs/benchmarks.md, "Input readers").
    read = read_options or grain.ReadOptions(num_threads=_READ_THREADS,
                                             prefetch_buffer_size=max(32, 2 * sum(batch_sizes.values())))
    batches = BucketBatchDataset(ds.to_iter_dataset(read), spec)
    if batches_ahead > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=batches_ahead)
    return _ExitSafeIterator(iter(batches))


class _ExitSafeIterator(grain.DatasetIterator):
    """The loader as its parent iterator is (batches, state, close), but let go of at interpreter exit.

    grain's thread-prefetch iterator closes itself from `__del__`. For a loader still alive at exit (a
    notebook's, or one held at module level), that runs after grain's modules are torn down and prints
    "Exception ignored in DatasetIterator.__del__", even when the loader was closed. So at exit, while
    grain is whole, the loader is closed and its parents dropped, and nothing is left for teardown.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        weakref.finalize(self, _release_at_exit, weakref.ref(self))

    def __next__(self) -> dict:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def _release_at_exit(ref: weakref.ref) -> None:
    # A finalizer runs on collection too, when the loader is already gone and has nothing to release.
    it = ref()
    if it is not None:
        it.close()
        it._parents = ()


def _bucket(name: str, batch_size: int) -> Bucket:
    h, w, t = (int(v) for v in name.split("x"))
    return Bucket(h, w, t, batch_size)


def read_records(cache_dir: str | Path, limit: int, bucket: str | None = None) -> dict[str, Any]:
    """The first `limit` records of one bucket (default: the one with most records), stacked as one batch.

    For small fixed held-out sets (periodic evaluation): read in file order, no shuffling, no grain.
    """
    info = read_info(cache_dir)
    counts = info["buckets"]
    name = bucket or max(sorted(counts), key=lambda b: counts[b]["num_records"])
    if name not in counts:
        raise CacheError(f"the cache {cache_dir} has no bucket {name!r}; it has {sorted(counts)}")
    source = grain.sources.ArrayRecordDataSource(part_files(cache_dir))
    rows = []
    for i in range(len(source)):
        record = decode_record(source[i])
        if record["bucket"] == name:
            rows.append(record)
            if len(rows) == limit:
                break
    if not rows:
        raise CacheError(f"the cache {cache_dir} holds no records of bucket {name!r}")
    out: dict[str, Any] = {k: np.stack([r[k] for r in rows]) for k in FEATURES}
    out["caption"] = [str(r["caption"]) for r in rows]
    return out
