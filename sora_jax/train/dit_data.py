"""Where a DiT run's inputs come from: a latent cache of the physics dataset or of real videos.

`sora-jax cache-latents` (and `train` on first use, for the built-in dataset) encodes the data named
by config.data once into ArrayRecord files (`latent_records`); training reads them through grain in
single-shape per-bucket batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections

from sora_jax.convert.bert import load_text_encoder
from sora_jax.data.buckets import Bucket, BucketSpec
from sora_jax.data.pipeline import one_pass_batches
from sora_jax.data.real_video import FrameSampling, VideoSource, make_bucketed_loader
from sora_jax.train import checkpoint
from sora_jax.train.latent_records import (CacheError, build_cache, cache_key, make_cache_loader, make_encoder,
                                          read_info)
from sora_jax.train.vae_trainer import load_vae_at, physics_sources

SOURCES = ("physics", "video")


def _source(config: ml_collections.ConfigDict) -> str:
    src = str(config.data.get("source", "physics"))
    if src not in SOURCES:
        raise ValueError(f"unknown config.data.source {src!r}; use one of {SOURCES}")
    return src


def bucket_spec(config: ml_collections.ConfigDict) -> BucketSpec:
    """Global batch size per bucket: config.data.video.buckets, or one physics bucket of data.batch_size."""
    d = config.data
    if _source(config) == "video":
        return BucketSpec.parse(d.video.buckets)
    return BucketSpec((Bucket(d.size, d.size, d.frames, int(d.batch_size)),), multiple=1)


def vae_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"vae_step", "vae_params"} of the VAE checkpoint config.vae_workdir loads (its newest readable step)."""
    vae_config = Path(config.vae_workdir).absolute() / "vae_config.json"
    if not vae_config.is_file():
        raise checkpoint.CheckpointError(
            f"{vae_config} not found; train the VAE first or pass the right --config.vae_workdir")
    return load_vae_at(config.vae_workdir)[2]


def cache_inputs(config: ml_collections.ConfigDict, split: str = "train", vae: dict[str, Any] | None = None) -> dict:
    """What a cache is built from; a cache (or a resumed build) with other inputs is refused.

    `split` "test" is the physics dataset's held-out split (periodic evaluation); "train" adds no key,
    so caches built before splits existed keep their names. `vae` is `vae_identity(config)`, passed
    in to restore the VAE once: the cache names the VAE's weights, not its folder, so it survives a
    moved run folder and is rebuilt when the VAE trains on in the same folder.
    """
    vae = vae or vae_identity(config)
    vae_config = Path(config.vae_workdir).absolute() / "vae_config.json"
    d = config.data
    if _source(config) == "video":
        v = d.video
        data = {"source": "video", "path": str(Path(v.path).absolute()) if v.path else "", "buckets": v.buckets,
                "stride": int(v.stride), "fps": float(v.fps), "seed": int(d.seed)}
        if not v.path:
            raise ValueError("config.data.video.path is empty; set it to a video folder or a .jsonl/.csv manifest")
    else:
        data = {"source": "physics", "size": d.size, "frames": d.frames, "num_train": d.num_train, "seed": d.seed}
        if split != "train":
            # Its clips are seeded by (seed, split, index), so a run on more training clips shares them.
            del data["num_train"]
            data.update(split=split, num_test=d.num_test)
        if d.get("exclude", ""):  # only when set, so caches built before the option keep their keys
            data.update(exclude=str(d.exclude))
        if float(d.get("zero_gravity", 0.0)):  # likewise
            # Since dataset version 1.1.0 gravity-free captions name their world: older caches are refused.
            data.update(zero_gravity=float(d.zero_gravity), captions="world")
    return {"data": data, "vae_step": int(vae["vae_step"]), "vae_params": str(vae["vae_params"]),
            "vae_config": cache_key(vae_config.read_text()),
            "text_encoder": config.text.encoder_dir, "text_max_length": int(config.text.max_length)}


def _batches(config: ml_collections.ConfigDict, process: int, count: int, split: str = "train"):
    """One in-order pass over this process's share of the data, as per-bucket batches."""
    if _source(config) == "physics":
        d = config.data
        source = physics_sources(config)[split]
        return one_pass_batches(source, Bucket(d.size, d.size, d.frames, max(1, int(d.batch_size) // count)),
                                shard_index=process, shard_count=count)
    v = config.data.video
    spec = BucketSpec.parse(v.buckets)
    sampling = FrameSampling(fps=float(v.fps)) if v.fps > 0 else FrameSampling(stride=int(v.stride))
    # Caption dropout for guidance happens in the train step (text_dropout), not in the cache.
    loader = make_bucketed_loader(VideoSource(v.path, probe_all=bool(v.probe_all)), spec, seed=int(config.data.seed),
                                  sampling=sampling, shuffle=False, num_epochs=1, worker_count=int(v.worker_count),
                                  shard_index=process, shard_count=count, drop_remainder=False)
    return iter(loader)


def build_from_config(config: ml_collections.ConfigDict, out_dir: str | Path, *, max_parts: int | None = None,
                      part_batches: int = 16, split: str = "train") -> dict:
    """Encode config.data with the run's VAE and text encoder into a latent cache (resumable)."""
    vae, vae_params, identity = load_vae_at(config.vae_workdir)
    inputs = cache_inputs(config, split, identity)
    text_encoder = load_text_encoder(config.text.encoder_dir or None, max_length=config.text.max_length)
    process, count = jax.process_index(), jax.process_count()
    return build_cache(out_dir, _batches(config, process, count, split), make_encoder(vae, vae_params, text_encoder),
                       source=inputs, part_batches=part_batches, process_index=process, process_count=count,
                       max_parts=max_parts)


def cache_dir_for(config: ml_collections.ConfigDict, workdir: Path, vae: dict[str, Any] | None = None) -> Path:
    """config.data.latents if set (built by `sora-jax cache-latents`), else a physics cache in the run folder.

    The run-folder cache is built on first use (and finished if an earlier build was cut short).
    `vae`: `vae_identity(config)` if the caller has it.
    """
    latents = str(config.data.get("latents", "") or "")
    if latents:
        info = read_info(latents)
        want = cache_inputs(config, vae=vae)
        if info["source"] != want:
            raise CacheError(f"the latent cache {latents} was built from other inputs than this config "
                             f"({info['source']} vs {want}); rebuild it or fix the config")
        return Path(latents)
    if _source(config) == "video":
        raise ValueError("config.data.source=video needs a latent cache: run `sora-jax cache-latents` and "
                         "pass it with --config.data.latents=DIR")
    return _run_folder_cache(config, workdir, "train", vae)


def _run_folder_cache(config: ml_collections.ConfigDict, workdir: Path, split: str,
                      vae: dict[str, Any] | None = None) -> Path:
    """The physics `split`'s cache in the run folder, named by its inputs; built (or finished) on first use."""
    path = workdir / f"latents-{cache_key(cache_inputs(config, split, vae))}"
    try:
        read_info(path)
    except CacheError:  # absent or unfinished: build, or finish an interrupted build
        build_from_config(config, path, split=split)
    return path


def heldout_cache_dir(config: ml_collections.ConfigDict, workdir: Path, vae: dict[str, Any] | None = None) -> Path:
    """The held-out latents of periodic evaluation: config.eval.latents, or the physics test split's cache.

    Real videos have no built-in split: encode a held-out manifest with `sora-jax cache-latents` and
    pass it as --config.eval.latents (it must come from the same VAE and text encoder).
    """
    latents = str(config.get("eval", {}).get("latents", "") or "")
    if latents:
        source, run = read_info(latents)["source"], cache_inputs(config, vae=vae)
        got = {k: source.get(k) for k in ("vae_config", "vae_params", "text_encoder", "text_max_length")}
        want = {k: run[k] for k in got}
        if got != want:
            raise CacheError(f"the held-out cache {latents} was encoded with another VAE or text encoder than this "
                             f"run ({got} vs {want}); rebuild it with `sora-jax cache-latents` and this run's config")
        return Path(latents)
    if _source(config) == "video":
        raise ValueError("train.eval_every/sample_every with config.data.source=video need held-out latents: "
                         "encode a held-out manifest with `sora-jax cache-latents` and pass --config.eval.latents=DIR")
    return _run_folder_cache(config, workdir, "test", vae)


def train_loader(config: ml_collections.ConfigDict, cache_dir: Path, per_process: dict[str, int]) -> Any:
    """The shuffled, repeating, checkpointable per-bucket batches of this process."""
    return make_cache_loader(cache_dir, per_process, seed=int(config.seed), shard_index=jax.process_index(),
                             shard_count=jax.process_count())


def default_video(config: ml_collections.ConfigDict, spec: BucketSpec) -> dict:
    """The sample size a run defaults to: the physics clip, or the largest bucket of real videos."""
    if _source(config) == "physics":
        return {"frames": int(config.data.frames), "size": int(config.data.size)}
    b = max(spec.buckets, key=lambda b: b.volume)
    return {"frames": b.frames, "size": [b.height, b.width]}
