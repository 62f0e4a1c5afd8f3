"""The uniform-motion protocol of PhyWorld (Kang et al. 2024, "How Far is Video Generation from World Model").

Their scene: a 10 x 10 world, 0.1 s per frame, 32 frames, one red ball on a white background moving
horizontally at v0 with no gravity and no walls; in distribution v0 in [1, 4] and r in [0.7, 1.4] world
units, out of distribution v0 in [0, 0.8] U [4.5, 6] and r in [0.3, 0.6] U [1.5, 2]. The metric is the
velocity error |mean v̂x - v0| in world units per second, v̂x from parsed ball centroids of
consecutive frames. Their ground-truth videos score about 0.0099 (the parse floor); their DiT-XL
about 1.2x that in distribution and about 40x out of distribution.

Two floors are computed on the same scenes:

- `kang_floor` replays their pipeline as published in their repository: a soft-edged disc drawn on
  a pixel grid whose pixel i sits at i / (W - 1) of the world, a red threshold mask (R > 127,
  G < 127, B < 127), its plain centroid scaled by 10 / W, frames from index 3 on while the disc lies
  wholly inside the world. The grid and the scale disagree by (W - 1) / W, so every parsed velocity
  is v0 / W too slow: 2.5 / 256 = 0.0098 units/s on average over v0 in [1, 4] at 256 px, which is
  almost all of their 0.0099. `pixel_grid="matched"` scales by 10 / (W - 1) and shows what is left.
- `parse_floor` is our scene through our simulator and our parse (`detect_balls`, coverage-weighted
  centroids); frames where the ball touches the border are left out, since a clipped disc's centroid
  is biased. `velocity_error` is the function the benchmark applies to a model's predictions
  (`physics_bench`), so our floor and a model's error share one definition.
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
KANG_EDGE = 0.03  # width of their disc's soft rim, as a fraction of r^2
KANG_FIRST_FRAME = 3  # their 4 conditioning frames; velocities start at the last one
KANG_MIN_FRAMES = 24  # their start rule keeps the ball in view this many frames where v0 allows
RANGES = {
    "id": {"v0": ((1.0, 4.0),), "r": ((0.7, 1.4),)},
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


def initial_state(spec: PhyWorldSpec, index: int) -> tuple[float, float, float, float]:
    """v0, r, x0, y0 (world units) of scene `index`, drawn as Kang et al. draw them."""
    rng = np.random.default_rng([spec.seed, index, 7])
    v0 = _uniform_in(rng, RANGES[spec.split]["v0"])
    r = _uniform_in(rng, RANGES[spec.split]["r"])
    # Start far enough left that the ball stays in view KANG_MIN_FRAMES frames; fast balls, for
    # which no such start exists, start within half a unit of the left wall.
    hi = WORLD - (KANG_MIN_FRAMES * v0 * DT + r)
    x0 = rng.uniform(r, hi) if hi >= r else rng.uniform(r, r + rng.uniform(0.0, 0.5))
    y0 = rng.uniform(r + 0.05 * WORLD, 0.95 * WORLD - r)
    return v0, r, x0, y0


def uniform_scene(spec: PhyWorldSpec, index: int) -> dict:
    """One red-on-white uniform-motion clip from our simulator (pixels) plus v0 and r in world units."""
    v0, r, x0, y0 = initial_state(spec, index)
    cfg = PhysicsConfig(size=spec.size, frames=spec.frames, gravity=0.0, dt=DT, walls=False,
                        min_balls=1, max_balls=1, radius_range=(0.01, 0.24))
    red = np.array([COLOR_NAMES.index("red")], np.int32)
    scene = simulate_state(np.array([[x0, y0]]) / WORLD, np.array([[v0, 0.0]]) / WORLD,
                           np.array([r]) / WORLD, red, cfg, background=WHITE)
    return scene | {"v0": v0, "r": r}


def render_kang(xy: np.ndarray, r: float, size: int) -> np.ndarray:
    """Kang et al.'s frames of one red ball at world positions xy [T, 2]: [T, size, size, 3] uint8, y up."""
    grid = np.linspace(0.0, 1.0, size)  # pixel i at i / (size - 1) of the world
    p, rn2 = np.asarray(xy, np.float64) / WORLD, (r / WORLD) ** 2
    d2 = (grid[None, None, :] - p[:, 0, None, None]) ** 2 + (grid[None, :, None] - p[:, 1, None, None]) ** 2
    cover = np.clip((rn2 - d2) / (rn2 * KANG_EDGE), 0.0, 1.0)[..., None]  # [T, rows, cols, 1]
    frames = (1.0 - cover) * 255.0 + cover * np.array([255.0, 0.0, 0.0])
    return frames.astype(np.uint8)[:, ::-1]  # truncation, not rounding, as theirs


def parse_kang(video: np.ndarray, pixel_grid: str = "paper") -> np.ndarray:
    """x (world units) per frame of the red threshold mask's centroid; nan where no pixel is red.

    pixel_grid "paper" scales column indices by 10 / W as their parser does; "matched" by
    10 / (W - 1), the scale their renderer draws with.
    """
    if pixel_grid not in ("paper", "matched"):
        raise ValueError(f"unknown pixel_grid {pixel_grid!r}; use 'paper' or 'matched'")
    v = np.asarray(video).astype(np.int32)
    mask = (v[..., 0] > 127) & (v[..., 1] < 127) & (v[..., 2] < 127)  # [T, rows, cols]
    width = v.shape[2]
    count = mask.sum(axis=(1, 2))
    col_sum = (mask.sum(axis=1) * np.arange(width)).sum(axis=1)
    x_px = np.where(count > 0, col_sum / np.maximum(count, 1), np.nan)
    return x_px * WORLD / (width if pixel_grid == "paper" else width - 1)


def kang_scene(spec: PhyWorldSpec, index: int) -> dict:
    """Scene `index` (same draw as `uniform_scene`) in Kang et al.'s rendering, with world positions.

    Their Box2D run records positions after the first 0.01 s step of each 0.1 s frame; motion is
    uniform, so x(t) is exact.
    """
    v0, r, x0, y0 = initial_state(spec, index)
    t = 0.01 + DT * np.arange(spec.frames)
    xy = np.stack([x0 + v0 * t, np.full_like(t, y0)], axis=-1)  # [T, 2] world units
    return {"video": render_kang(xy, r, spec.size), "xy": xy, "v0": v0, "r": r}


def kang_frames(xy: np.ndarray, r: float) -> np.ndarray:
    """Their usable frames: index >= 3 with the disc wholly inside the 10 x 10 world (from true positions)."""
    inside = np.all((xy - r >= 0.0) & (xy + r <= WORLD), axis=-1)
    inside[:KANG_FIRST_FRAME] = False
    return inside


def kang_floor(spec: PhyWorldSpec, pixel_grid: str = "paper") -> dict:
    """Their ground-truth velocity error, replayed: their renderer, parser, frames and |mean v̂x - v0|."""
    errors, used, bias = [], [], []
    for i in range(spec.scenes):
        scene = kang_scene(spec, i)
        ok = kang_frames(scene["xy"], scene["r"])
        x = parse_kang(scene["video"], pixel_grid)  # world units, so 1 "pixel" per unit below
        used.append(int(ok.sum()))
        errors.append(velocity_error(x, scene["xy"][:, 0], ok, px_per_unit=1.0, dt=DT))
        if ok.sum() >= 2 and scene["v0"] > 0:
            bias.append(np.nanmean(np.diff(x[ok])) / DT / scene["v0"])
    return _summary(spec, errors, used, render="kang", parse=f"kang_{pixel_grid}",
                    mean_speed_ratio=float(np.nanmean(bias)) if bias else float("nan"))


def _summary(spec: PhyWorldSpec, errors: list[float], used: list[int], **extra) -> dict:
    """Per-scene velocity errors and frames used -> the floor's report entry."""
    mean = float(np.nanmean(errors))
    return {"velocity_error": mean, "median": float(np.nanmedian(errors)), "scenes": spec.scenes,
            "mean_frames_used": float(np.mean(used)), "size": spec.size, "frames": spec.frames,
            "split": spec.split, **extra, "paper_floor": PAPER_FLOOR, "ratio_to_paper": mean / PAPER_FLOOR}


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
    return _summary(spec, errors, used, render="ours", parse="coverage" if weighted else "hard_mask")
