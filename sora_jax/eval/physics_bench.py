"""`sora-jax eval-physics`: the world-model benchmark (protocols, baselines, parse floor, report files).

Protocol "frames" (a): condition on the first K pixel frames of each scene and score the rest against
the simulator. The causal VAE maps pixel frame 0 to latent frame 0 and frames 4j-3..4j to latent frame
j, so K is rounded up to a whole number of latent frames, 4j+1 pixel frames (K=4 -> 5 = 2 latent
frames); baselines get the same K. Protocol "text" (b): generate from each scene's caption alone and
score count, colours and the described ball's direction, plus ĝ, area drift and flicker; the captions
are of multi scenes (under gravity; rows "method") and of drift scenes (captions ending "in zero
gravity"; rows "method/drift", where ĝ should be 0).

With a checkpoint (or `vae=`, a VAE run alone), "vae_roundtrip" (the true clip encoded and decoded by
the VAE) is scored beside the model: the best any DiT on that VAE can do, which splits the model's
error into the VAE's share and the DiT's.

Every error is also reported as a multiple of the parse floor: the same metric on the true clips.
Outputs: report.json (everything), report.md (tables), position_error.png (error vs time).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sora_jax.eval import physics_baselines as baselines
from sora_jax.eval import phyworld
from sora_jax.eval.physics_metrics import (ERROR_KEYS, clip_metrics, floor_multiples, parse_video, summarize,
                                           text_metrics)
from sora_jax.eval.physics_scenes import SceneSpec, make_scenes

PROTOCOLS = ("frames", "text")
TEMPORAL_FACTOR = 4
Predictor = Callable[[dict, int], np.ndarray]  # (scene, K) -> uint8 video of the scene's shape


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run: scenes, conditioning frames, protocols, and the PhyWorld floor's size."""

    scenes: SceneSpec = SceneSpec()
    cond_frames: int = 4
    protocols: tuple[str, ...] = PROTOCOLS
    text_prompts: int = 8
    phyworld_scenes: int = 16
    phyworld_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"unknown protocol(s) {bad}; use {', '.join(PROTOCOLS)}")
        k = latent_aligned(self.cond_frames)
        if self.cond_frames < 1 or k >= self.scenes.frames:
            raise ValueError(f"--cond-frames {self.cond_frames} means {k} pixel frames (whole latent frames) "
                             f"of {self.scenes.frames}: none left to predict; use fewer or longer scenes")


def latent_aligned(k: int, temporal_factor: int = TEMPORAL_FACTOR) -> int:
    """K pixel frames rounded up to whole latent frames of the causal VAE: 1, 5, 9, ... (4j+1)."""
    return 1 + temporal_factor * math.ceil(max(k - 1, 0) / temporal_factor)


def model_predictors(checkpoint: Any, *, steps: int | None = None, guidance: float | None = None,
                     seed: int = 0) -> tuple[Predictor, Callable[[list[str], int, int], np.ndarray], dict]:
    """(frame-conditioned predictor, text-to-video generator, video defaults) of a checkpoint folder or a
    loaded `TextToVideo`."""
    from sora_jax.data.video import to_uint8
    from sora_jax.pipeline import TextToVideo

    t2v = checkpoint if isinstance(checkpoint, TextToVideo) else TextToVideo.from_pretrained(checkpoint)
    sampler = t2v.make_sampler(steps=steps, guidance=guidance)

    def predict(scene: dict, k: int) -> np.ndarray:
        video = np.asarray(scene["video"])
        out = t2v.generate([scene["caption"]], mode="extend", inputs=[video[:k]], cond_frames=k,
                           frames=len(video), size=video.shape[1], sampler=sampler, seed=seed)
        return to_uint8(out[0])

    def generate(prompts: list[str], frames: int, size: int) -> np.ndarray:
        # One prompt per call: the batch-1 decode compiled for `predict` is reused, and memory stays flat.
        return np.stack([to_uint8(t2v.generate([p], frames=frames, size=size, sampler=sampler, seed=seed + i)[0])
                         for i, p in enumerate(prompts)])

    return predict, generate, dict(t2v.defaults["video"])


def vae_roundtrip_predictor(vae: Any, params: Any) -> Predictor:
    """The true clip through a VAE (`CausalVAE`, params): encoded to its posterior mean and decoded, as
    the DiT's training latents are made and its samples decoded. Its scores are those of a DiT that
    predicted the true latents exactly: the ceiling this VAE puts on any model trained on it."""
    import jax.numpy as jnp

    from sora_jax.data.pipeline import uint8_to_float
    from sora_jax.data.video import to_uint8
    from sora_jax.models.vae_codec import VideoCodec

    codec = VideoCodec(vae, chunked=True)  # what the pipeline encodes and decodes with

    def predict(scene: dict, k: int) -> np.ndarray:
        # The latent normalization cancels between encode and decode, so it is left out.
        mean, _ = codec.encode(params, jnp.asarray(uint8_to_float(np.asarray(scene["video"])))[None])
        return to_uint8(np.asarray(codec.decode(params, mean))[0])

    return predict


def _row(metrics: dict, scene: dict, method: str) -> dict:
    # "scene" is a string so that `summarize`, which averages every numeric field, leaves it alone.
    return metrics | {"method": method, "family": scene["family"], "split": scene["split"],
                      "scene": f"{scene['family']}/{scene['split']}/{scene['seed']}"}


def scene_rows(rows: list[dict]) -> list[dict]:
    """Each clip's scalar scores per method (per-frame curves dropped), for paired comparisons of reports."""
    return [{k: v for k, v in r.items() if not isinstance(v, (list, tuple, np.ndarray))} for r in rows]


def _phyworld_error(pred: np.ndarray, scene: dict, truth_xy: np.ndarray, k: int) -> float:
    """PhyWorld's |mean v̂x - v0| (10-unit world) of a 1-ball gravity-free scene, free-flight frames >= k."""
    got = parse_video(pred[k:], scene["colors"][:1])["xy"][:, 0, 0]
    true_x = np.asarray(scene["positions"], np.float64)[k:, 0, 0]
    dd = np.abs(np.diff(np.asarray(scene["positions"], np.float64)[k:, 0], 2, axis=0)).max(-1)
    usable = np.ones(len(true_x), bool)
    usable[1:-1] &= dd < 0.01  # no wall bounce around the frame
    bounce = np.nonzero(dd >= 0.01)[0]
    if bounce.size:
        usable[bounce[0] + 1:] = False  # after a bounce vx is no longer v0
    return phyworld.velocity_error(got, true_x, usable & np.isfinite(truth_xy[k:, 0, 0]),
                                   px_per_unit=pred.shape[1] / phyworld.WORLD, dt=scene["dt"])


def frame_protocol(scenes: list[dict], k: int, predictors: dict[str, Predictor],
                   progress: Callable[[str], None] | None = None, samples: dict | None = None) -> list[dict]:
    """Per-clip scores of every predictor (and the baselines) on every scene.

    A `samples` dict receives, for the first in-distribution scene of each family, the true video and
    each predictor's prediction (keyed "family/id"), for `physics_report.sample_sheet`.
    """
    rows = []
    for i, scene in enumerate(scenes):
        truth = parse_video(scene["video"], scene["colors"])
        others = [s for s in scenes if s["family"] == scene["family"] and s["seed"] != scene["seed"]]
        preds = {
            "ground_truth": baselines.ground_truth(scene, k),
            "copy_last": baselines.copy_last(scene, k),
            "resim_no_gravity": baselines.resim_no_gravity(scene, k, truth=truth),
            "resim_gravity": baselines.resim_gravity(scene, k, truth=truth),
            "resim_world": baselines.resim_world(scene, k, truth=truth),
        }
        if others:
            preds["other_clip"] = baselines.other_clip(scene, k, others[0])
        preds |= {name: f(scene, k) for name, f in predictors.items()}
        key = f"{scene['family']}/{scene['split']}"
        if samples is not None and predictors and scene["split"] == "id" and key not in samples:
            samples[key] = {"truth": np.asarray(scene["video"])} | {name: preds[name] for name in predictors}
        for name, pred in preds.items():
            m = clip_metrics(pred, scene, k, truth=truth)
            if scene["family"] == "uniform":
                m["phyworld_v_err"] = _phyworld_error(pred, scene, truth["xy"], k)
            rows.append(_row(m, scene, name))
        if progress:
            progress(f"scene {i + 1}/{len(scenes)} ({scene['family']}/{scene['split']}) scored")
    return rows


def text_protocol(scenes: list[dict], generate: Callable | None) -> list[dict]:
    """Caption-only generation scored against its caption; true and other clips as references."""
    rows = []
    videos = generate([s["caption"] for s in scenes], len(scenes[0]["video"]), scenes[0]["video"].shape[1]) \
        if generate else None
    for i, scene in enumerate(scenes):
        preds = {"ground_truth": scene["video"], "other_clip": scenes[(i + 1) % len(scenes)]["video"]}
        if videos is not None:
            preds["model"] = videos[i]
        for name, video in preds.items():
            m = text_metrics(video, scene["caption"], dt=scene["dt"], gravity_px=scene["gravity_px"])
            rows.append(_row(m, scene, name))
    return rows


def _group(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def summarize_frames(rows: list[dict]) -> dict:
    """Means per (method, split), per (method, family, split) and per (method, count) in distribution,
    each error also as a multiple of the ground-truth parse floor; per-frame position error curves."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    splits = list(dict.fromkeys(r["split"] for r in rows))
    families = list(dict.fromkeys(r["family"] for r in rows))
    out: dict = {"by_split": {}, "by_family": {}, "by_count": {}, "curves": {}}
    for s in splits:
        floor = summarize(_group(rows, method="ground_truth", split=s))
        for m in methods:
            stats = summarize(_group(rows, method=m, split=s))
            out["by_split"][f"{m}/{s}"] = stats | {"x_floor": floor_multiples(stats, floor)}
        for f in families:
            floor_f = summarize(_group(rows, method="ground_truth", split=s, family=f))
            for m in methods:
                g = _group(rows, method=m, split=s, family=f)
                if g:
                    stats = summarize(g)
                    out["by_family"][f"{m}/{f}/{s}"] = stats | {"x_floor": floor_multiples(stats, floor_f)}
    for n in sorted({r["n"] for r in rows}):
        floor = summarize(_group(rows, method="ground_truth", split="id", n=n))
        for m in methods:
            g = _group(rows, method=m, split="id", n=n)
            if g:
                stats = summarize(g)
                out["by_count"][f"{m}/{n}"] = stats | {"x_floor": floor_multiples(stats, floor)}
    for m in methods:
        curves = np.stack([r["pos_err_t"] for r in _group(rows, method=m, split="id")] or [[np.nan]])
        seen = np.isfinite(curves).any(axis=0)
        if seen.any():
            mean = np.nansum(curves, axis=0) / np.maximum(np.isfinite(curves).sum(axis=0), 1)
            out["curves"][m] = np.where(seen, mean, np.nan).tolist()
    return out


def run_benchmark(cfg: BenchConfig, predictors: dict[str, Predictor] | None = None,
                  generate: Callable | None = None, progress: Callable[[str], None] | None = None,
                  samples: dict | None = None) -> dict:
    """Runs the configured protocols for the baselines and the given predictors; returns the report dict
    (and fills `samples` as `frame_protocol` does)."""
    k = latent_aligned(cfg.cond_frames)
    report: dict = {"config": dataclasses.asdict(cfg), "cond_pixel_frames": k,
                    "cond_latent_frames": 1 + (k - 1) // TEMPORAL_FACTOR}
    if "frames" in cfg.protocols:
        rows = frame_protocol(make_scenes(cfg.scenes), k, predictors or {}, progress, samples)
        report["frames"] = summarize_frames(rows)
        report["frames"]["phyworld"] = _phyworld_model_summary(rows)
        report["frames"]["scenes"] = scene_rows(rows)
    if "text" in cfg.protocols:
        # Both worlds of mixed training data: a caption under gravity reads as always, and one without
        # says so, so each prompt fixes the world and ĝ can be scored against it.
        spec = dataclasses.replace(cfg.scenes, families=("multi", "drift"), splits=("id",),
                                   per_split=cfg.text_prompts)
        rows = text_protocol(make_scenes(spec), generate)
        methods = dict.fromkeys(r["method"] for r in rows)
        report["text"] = {m: summarize(_group(rows, method=m, family="multi")) for m in methods} | {
            f"{m}/drift": summarize(_group(rows, method=m, family="drift")) for m in methods}
    if cfg.phyworld_scenes > 0:
        spec = phyworld.PhyWorldSpec(cfg.phyworld_scenes, cfg.phyworld_size, seed=cfg.scenes.seed)  # scenes, not noise
        report["phyworld_floor"] = {
            "kang": phyworld.kang_floor(spec, "paper"),
            "kang_matched_grid": phyworld.kang_floor(spec, "matched"),
            "coverage": phyworld.parse_floor(spec, weighted=True),
            "hard_mask": phyworld.parse_floor(spec, weighted=False)}
    return report


def _phyworld_model_summary(rows: list[dict]) -> dict:
    """PhyWorld velocity error of each method on the uniform family, per split, and as a multiple of the floor."""
    out = {}
    uni = [r for r in rows if r["family"] == "uniform"]
    for s in dict.fromkeys(r["split"] for r in uni):
        floor = summarize(_group(uni, method="ground_truth", split=s), ("phyworld_v_err",))["phyworld_v_err"]
        for m in dict.fromkeys(r["method"] for r in uni):
            err = summarize(_group(uni, method=m, split=s), ("phyworld_v_err",))["phyworld_v_err"]
            out[f"{m}/{s}"] = {"v_err": err, "x_floor": err / floor if floor > 0 else float("nan")}
    return out


def write_report(report: dict, out: str | Path, samples: dict | None = None) -> dict[str, Path]:
    """Writes report.json, report.md, position_error.png (if matplotlib is installed) and, given model
    `samples` (see `frame_protocol`), samples.png under `out`, which `report["samples"]` then names;
    returns the paths."""
    from sora_jax.eval.physics_report import plot_position_error, render_markdown, sample_sheet

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    if samples:
        paths["samples"] = sample_sheet(samples, report["cond_pixel_frames"], out / "samples.png")
        report["samples"] = {"file": paths["samples"].name, "scenes": list(samples),
                             "rows": list(next(iter(samples.values())))}
    paths["json"].write_text(json.dumps(report, indent=1, default=float))  # default: numpy scalars
    paths["md"].write_text(render_markdown(report))
    if report.get("frames", {}).get("curves"):
        curves = report["frames"]["curves"]
        missed = tuple(dict.fromkeys(k.split("/")[0] for k in report["frames"]["by_split"]
                                     if k.split("/")[0] not in curves))
        try:
            paths["png"] = plot_position_error(curves, report["cond_pixel_frames"], out / "position_error.png", missed)
        except ImportError:
            pass  # matplotlib is optional (pip install "sora-jax[eval]"); the CLI says the plot was skipped
    return paths


def evaluate(
    checkpoint: str | Path | None,
    out: str | Path,
    *,
    vae: str | Path | None = None,
    scenes: SceneSpec | None = None,
    size: int | None = None,
    frames: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    progress: Callable[[str], None] | None = None,
    **bench: object,
) -> tuple[dict, dict[str, Path]]:
    """The whole `sora-jax eval-physics` run: load the checkpoint (if any), benchmark, write the report.

    Scenes take the checkpoint's video size and length unless `size`/`frames` are given (64 x 17
    without a checkpoint); `bench` holds the other `BenchConfig` fields. The "vae_roundtrip" row scores
    the true clips through `vae` (a VAE run directory), or else through the checkpoint's VAE.
    """
    predictors, generate, video, t2v = {}, None, {"size": 64, "frames": 17}, None
    if vae is not None:
        from sora_jax.train.vae_trainer import VAE_CONFIG_FILE, load_vae

        if not (Path(vae) / VAE_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--vae {vae} has no {VAE_CONFIG_FILE}; pass a VAE run directory "
                                    "(e.g. runs/ref/vae from scripts/train_reference.py)")
        predictors["vae_roundtrip"] = vae_roundtrip_predictor(*load_vae(vae))
    if checkpoint is not None:
        if not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"checkpoint {checkpoint} is not a folder; pass a DiT run directory "
                                    "(e.g. from scripts/train_reference.py) or leave --checkpoint out for baselines only")
        from sora_jax.pipeline import TextToVideo

        t2v = TextToVideo.from_pretrained(checkpoint)
        predict, generate, video = model_predictors(t2v, steps=steps, guidance=guidance,
                                                    seed=int(bench.get("seed", 0)))
        if vae is None:  # before the model, so that the tables read truth -> VAE ceiling -> model
            predictors["vae_roundtrip"] = vae_roundtrip_predictor(t2v.vae, t2v.vae_params)
        predictors["model"] = predict
    default_size = video["size"] if isinstance(video["size"], int) else video["size"][0]
    scenes = dataclasses.replace(scenes or SceneSpec(), size=size or default_size,
                                 frames=frames or video["frames"])
    cfg = BenchConfig(scenes=scenes, **bench)
    samples: dict = {}
    report = run_benchmark(cfg, predictors, generate, progress, samples)
    if t2v is not None and "frames" in cfg.protocols and "id" in scenes.splits:
        from sora_jax.eval.conditioning_use import conditioning_use

        # At least two scenes, so that each can be given another's frames.
        in_dist = make_scenes(dataclasses.replace(scenes, splits=("id",), per_split=max(2, scenes.per_split)))
        report["conditioning_use"] = conditioning_use(t2v, in_dist, report["cond_latent_frames"], seed=cfg.seed)
    report["checkpoint"] = None if checkpoint is None else str(Path(checkpoint).absolute())
    report["vae"] = None if vae is None else str(Path(vae).absolute())
    return report, write_report(report, out, samples)


__all__ = ["BenchConfig", "ERROR_KEYS", "evaluate", "latent_aligned", "model_predictors", "run_benchmark",
           "scene_rows", "vae_roundtrip_predictor", "write_report"]
