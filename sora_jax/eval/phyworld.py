"""The uniform-motion protocol of PhyWorld (Kang et al. 2024, "How Far is Video Generation from World Model").

Their scene: a 10 x 10 world, 0.1 s per frame, one red ball on a white background moving horizontally
at v0 with no gravity and no walls; in distribution v0 in [1, 4] and r in [0.7, 1.5] world units,
out of distribution v0 in [0, 0.8] U [4.5, 6] and r in [0.3, 0.6] U [1.5, 2]. The metric is the
velocity error |mean v̂x - v0| in world units per second, v̂x from parsed ball centroids of
consecutive frames. Their ground-truth videos score about 0.0099 (the parse floor); their DiT-XL
about 1.2x that in distribution and about 40x out of distribution.

Here the scene comes from our simulator (`simulate_state` with walls off, red on white) and the parse
is ours (`detect_balls`, coverage-weighted centroids); frames where the ball touches the border are
left out, since a clipped disc's centroid is biased. `velocity_error` is the same function the
benchmark applies to a model's predictions (`physics_bench`), so floor and model share one definition.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sora_jax.data.physics import COLOR_NAMES, PhysicsConfig, simulate_state
from sora_jax.eval.physics import detect_balls

WHITE = (255, 255, 255)
WORLD = 10.0  # world units per frame side
DT = 0.1  # seconds per frame
PAPER_FLOOR = 0.0099  # their ground-truth velocity error, world units / s
PAPER_DIT_XL = {"id": 1.2, "ood": 40.0}  # their DiT-XL error as a multiple of the floor (approximate)
RANGES = {
    "id": {"v0": ((1.0, 4.0),), "r": ((0.7, 1.5),)},
    "ood": {"v0": ((0.0, 0.8), (4.5, 6.0)), "r": ((0.3, 0.6), (1.5, 2.0))},
}


@dataclasses.dataclass(frozen=True)
class PhyWorldSpec:
    """Scene count, resolution and length of a uniform-motion evaluation."""

    scenes: int = 32
    size: int = 256
    frames: int = 32
    split: str = "id"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in RANGES:
            raise ValueError(f"unknown PhyWorld split {self.split!r}; use one of {sorted(RANGES)}")
        if self.scenes < 1 or self.size < 16 or self.frames < 2:
            raise ValueError("need scenes >= 1, size >= 16 and frames >= 2")


def _uniform_in(rng: np.random.Generator, ranges: tuple[tuple[float, float], ...]) -> float:
    lo, hi = ranges[int(rng.integers(len(ranges)))]
    return float(rng.uniform(lo, hi))


def uniform_scene(spec: PhyWorldSpec, index: int) -> dict:
    """One red-on-white uniform-motion clip (pixels) plus v0 and r in world units."""
    rng = np.random.default_rng([spec.seed, index, 7])
    v0 = _uniform_in(rng, RANGES[spec.split]["v0"])
    r = _uniform_in(rng, RANGES[spec.split]["r"])
    x0 = rng.uniform(r, 3.0 + r)  # start on the left, moving right, as in their clips
    y0 = rng.uniform(r, WORLD - r)
    cfg = PhysicsConfig(size=spec.size, frames=spec.frames, gravity=0.0, dt=DT, walls=False,
                        min_balls=1, max_balls=1, radius_range=(0.01, 0.24))
    red = np.array([COLOR_NAMES.index("red")], np.int32)
    scene = simulate_state(np.array([[x0, y0]]) / WORLD, np.array([[v0, 0.0]]) / WORLD,
                           np.array([r]) / WORLD, red, cfg, background=WHITE)
    return scene | {"v0": v0, "r": r}


def track_x(
    video: np.ndarray, color: str = "red", background=WHITE, weighted: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """x centroid (px) of the largest `color` blob per frame, and whether it is usable (found, not clipped)."""
    xs = np.full(len(video), np.nan)
    ok = np.zeros(len(video), bool)
    for t, frame in enumerate(video):
        blobs = [b for b in detect_balls(frame, background=background, weighted=weighted) if b["color"] == color]
        if blobs:
            xs[t], ok[t] = blobs[0]["x"], not blobs[0]["edge"]
    return xs, ok


def velocity_error(
    x_pred: np.ndarray, x_true: np.ndarray, usable: np.ndarray, *, px_per_unit: float, dt: float
) -> float:
    """|mean v̂x - mean vx| (world units / s) over consecutive usable frame pairs; nan if none.

    x_pred, x_true [T] in pixels; usable [T] marks frames that may be used (parsed, unclipped, and for
    scenes with walls, free flight). With uniform motion mean vx is v0.
    """
    pair = usable[1:] & usable[:-1] & np.isfinite(x_pred[1:]) & np.isfinite(x_pred[:-1])
    if not pair.any():
        return float("nan")
    v_hat = np.diff(x_pred)[pair].mean() / px_per_unit / dt
    v_true = np.diff(x_true)[pair].mean() / px_per_unit / dt
    return float(abs(v_hat - v_true))


def parse_floor(spec: PhyWorldSpec, first_frame: int = 0, weighted: bool = True) -> dict:
    """PhyWorld's metric on our true clips: mean/median velocity error (units/s) and the frames used."""
    errors, used = [], []
    for i in range(spec.scenes):
        scene = uniform_scene(spec, i)
        xs, ok = track_x(scene["video"], weighted=weighted)
        ok[:first_frame] = False
        errors.append(velocity_error(xs, scene["positions"][:, 0, 0], ok,
                                     px_per_unit=spec.size / WORLD, dt=DT))
        used.append(int(ok.sum()))
    errors = np.asarray(errors)
    return {"velocity_error": float(np.nanmean(errors)), "median": float(np.nanmedian(errors)),
            "scenes": spec.scenes, "mean_frames_used": float(np.mean(used)), "size": spec.size,
            "frames": spec.frames, "split": spec.split, "weighted": weighted, "paper_floor": PAPER_FLOOR,
            "ratio_to_paper": float(np.nanmean(errors) / PAPER_FLOOR)}
