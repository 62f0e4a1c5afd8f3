"""Procedural "bouncing balls" videos: simulator, renderer, captions and caption parser.

The built-in dataset of sora-jax. Each clip shows 1-3 balls of distinct palette colours on a
plain dark background, moving under gravity (or, for a share of clips, without it: their captions
end "in zero gravity") with elastic walls and elastic ball-ball collisions. Captions are derived
from the simulated state with a small, regular vocabulary so that a small model can learn to
follow them, and so that `parse_caption` can invert them for the physics evaluation
(`sora_jax.eval.physics`).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

# Named colours far apart in RGB (min pairwise distance ~170) so that nearest-colour
# segmentation of blurry generated frames is unambiguous. Order is the palette index.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (235, 50, 50)),
    ("green", (50, 205, 50)),
    ("blue", (60, 100, 245)),
    ("yellow", (245, 215, 50)),
    ("cyan", (50, 215, 225)),
    ("magenta", (215, 60, 215)),
)
COLOR_NAMES: tuple[str, ...] = tuple(name for name, _ in PALETTE)
PALETTE_RGB: np.ndarray = np.array([rgb for _, rgb in PALETTE], dtype=np.float32)
PALETTE_RGB.setflags(write=False)
BACKGROUND: tuple[int, int, int] = (16, 16, 24)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")

# Net horizontal displacement (fraction of the frame) below which no direction is named.
DX_THRESHOLD = 0.05
ZERO_GRAVITY_WORDS = "in zero gravity"  # ends the caption of a clip simulated without gravity


@dataclasses.dataclass(frozen=True)
class PhysicsConfig:
    """Simulation and rendering settings; lengths are fractions of the frame side."""

    size: int = 64
    frames: int = 17
    min_balls: int = 1
    max_balls: int = 3
    radius_range: tuple[float, float] = (0.08, 0.14)
    gravity: float = 1.0  # frame sides / s^2, pointing down (+y in image coordinates)
    dt: float = 1.0 / 16.0  # seconds per frame
    substeps: int = 4
    max_speed: float = 0.8  # frame sides / s, per axis, at t=0
    walls: bool = True  # False: balls fly out of the frame (PhyWorld's uniform-motion scenes)
    # (colour, ball count) pairs `simulate` never draws: a clip with n balls of which one has an
    # excluded (colour, n) is redrawn. Keeps the world-model benchmark's combinatorial split unseen.
    exclude: tuple[tuple[str, int], ...] = ()
    # The share of clips `simulate` runs without gravity (drawn per clip, after its initial state, so
    # a clip keeps its balls and start whichever world it gets). The world-model benchmark scores
    # gravity-free families (uniform motion, collisions) in distribution: a model trained on gravity
    # alone, even a perfect one, must mispredict them.
    zero_gravity: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_balls <= self.max_balls <= len(PALETTE):
            raise ValueError(
                f"need 1 <= min_balls <= max_balls <= {len(PALETTE)}, got "
                f"{self.min_balls}, {self.max_balls}"
            )
        if self.frames < 1 or self.size < 8 or self.substeps < 1:
            raise ValueError("frames >= 1, size >= 8 and substeps >= 1 are required")
        lo, hi = self.radius_range
        if not 0 < lo <= hi < 0.25:
            raise ValueError(
                f"radius_range must satisfy 0 < lo <= hi < 0.25, got {self.radius_range}"
            )
        for colour, count in self.exclude:
            if colour not in COLOR_NAMES or not self.min_balls <= count <= self.max_balls:
                raise ValueError(f"cannot exclude ({colour!r}, {count}): colours are {', '.join(COLOR_NAMES)} "
                                 f"and counts {self.min_balls}..{self.max_balls}")
        if not 0.0 <= self.zero_gravity <= 1.0:
            raise ValueError(f"zero_gravity is the share of clips without gravity, in [0, 1]; got {self.zero_gravity}")
        if not any(len(PALETTE) - sum(c == n for _, c in set(self.exclude)) >= n
                   for n in range(self.min_balls, self.max_balls + 1)):
            raise ValueError(f"exclude={self.exclude} leaves no clip to draw; exclude fewer (colour, count) pairs")


def _place_balls(
    rng: np.random.Generator, radii: np.ndarray
) -> np.ndarray:
    """Rejection-samples non-overlapping centres inside the unit square."""
    n = len(radii)
    pos = np.zeros((n, 2))
    for _ in range(1000):
        pos = rng.uniform(radii[:, None], 1.0 - radii[:, None], size=(n, 2))
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        gap = d - (radii[:, None] + radii[None]) - 0.02
        if np.all(gap[np.triu_indices(n, 1)] > 0):
            return pos
    # Unreachable for sane radii (3 balls of radius <0.25 always fit); keep a valid fallback.
    xs = (np.arange(n) + 0.5) / n
    return np.stack([xs, np.full(n, 0.5)], axis=-1)


def _collide_pairs(
    pos: list[list[float]], vel: list[list[float]], radii: list[float], mass: list[float]
) -> None:
    """Elastic collisions of approaching, overlapping pairs; updates pos/vel in place."""
    n = len(radii)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = pos[j][0] - pos[i][0], pos[j][1] - pos[i][1]
            dist = math.hypot(dx, dy)
            overlap = radii[i] + radii[j] - dist
            if overlap <= 0 or dist == 0.0:
                continue
            nx, ny = dx / dist, dy / dist
            approach = (vel[i][0] - vel[j][0]) * nx + (vel[i][1] - vel[j][1]) * ny
            if approach > 0:
                # 1-D elastic exchange along the normal; conserves momentum and energy.
                impulse = 2.0 * approach / (1.0 / mass[i] + 1.0 / mass[j])
                vel[i][0] -= impulse / mass[i] * nx
                vel[i][1] -= impulse / mass[i] * ny
                vel[j][0] += impulse / mass[j] * nx
                vel[j][1] += impulse / mass[j] * ny
            # Separate by inverse mass so the pair doesn't stay stuck together.
            wi, wj = mass[j] / (mass[i] + mass[j]), mass[i] / (mass[i] + mass[j])
            pos[i][0] -= nx * overlap * wi
            pos[i][1] -= ny * overlap * wi
            pos[j][0] += nx * overlap * wj
            pos[j][1] += ny * overlap * wj


def _walls(
    pos: list[list[float]], vel: list[list[float]], radii: list[float], floor_hits: list[bool]
) -> None:
    """Reflects balls off the four walls in place and records floor hits."""
    for k, r in enumerate(radii):
        p, v = pos[k], vel[k]
        for a in (0, 1):
            if p[a] < r:
                p[a], v[a] = 2 * r - p[a], abs(v[a])
            elif p[a] > 1.0 - r:
                p[a], v[a] = 2 * (1.0 - r) - p[a], -abs(v[a])
                if a == 1:
                    floor_hits[k] = True


def run_physics(
    pos: np.ndarray, vel: np.ndarray, radii: np.ndarray, cfg: PhysicsConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrates; returns positions/velocities [T,n,2] (unit square) and floor hits [n]."""
    # Plain Python floats: with <= 6 balls, numpy's per-call overhead dominates the arithmetic.
    p = np.asarray(pos, np.float64).tolist()
    v = np.asarray(vel, np.float64).tolist()
    r = np.asarray(radii, np.float64).tolist()
    mass = [x * x for x in r]  # equal density discs
    h = cfg.dt / cfg.substeps
    gh = cfg.gravity * h
    n = len(r)
    positions = np.zeros((cfg.frames, n, 2))
    velocities = np.zeros((cfg.frames, n, 2))
    floor_hits = [False] * n
    for t in range(cfg.frames):
        positions[t], velocities[t] = p, v
        if t == cfg.frames - 1:
            break
        for _ in range(cfg.substeps):
            # Semi-implicit Euler: stable and cheap enough for a few substeps per frame.
            for k in range(n):
                v[k][1] += gh
                p[k][0] += v[k][0] * h
                p[k][1] += v[k][1] * h
            _collide_pairs(p, v, r, mass)
            if cfg.walls:
                _walls(p, v, r, floor_hits)
    return positions, velocities, np.array(floor_hits)


def render(
    positions: np.ndarray,
    radii: np.ndarray,
    colors: np.ndarray,
    size: int,
    background: tuple[int, int, int] = BACKGROUND,
) -> np.ndarray:
    """Draws anti-aliased discs; positions [T,n,2] and radii [n] in pixels -> uint8 [T,H,W,3]."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    pos = np.asarray(positions, np.float32)
    # Channel-planar layout: numpy broadcasting over a trailing axis of 3 is ~20x slower.
    img = np.empty((3, pos.shape[0], size, size), np.float32)
    for c in range(3):
        img[c] = background[c]
    for k in range(len(radii)):
        dx2 = np.square(centres[None, None, :] - pos[:, k, 0, None, None])
        dy2 = np.square(centres[None, :, None] - pos[:, k, 1, None, None])
        # One-pixel linear ramp at the rim: cheap anti-aliasing, coverage in [0, 1].
        alpha = np.sqrt(dx2 + dy2)
        np.subtract(np.float32(radii[k] + 0.5), alpha, out=alpha)
        np.clip(alpha, 0.0, 1.0, out=alpha)
        for c in range(3):
            img[c] += alpha * (PALETTE_RGB[colors[k], c] - img[c])  # "over" compositing
    img += 0.5  # round half up; values are already within [0, 255]
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 3, 0))


def _join(words: list[str]) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def make_caption(
    colors: list[int], positions: np.ndarray, floor_hits: np.ndarray, *, gravity: bool = True
) -> str:
    """Caption from state: count, colours (palette order), motion of the most-moving ball, world."""
    n = len(colors)
    names = [COLOR_NAMES[c] for c in sorted(colors)]
    path = np.linalg.norm(np.diff(positions, axis=0), axis=-1).sum(axis=0)  # zeros if T == 1
    k = int(np.argmax(path))
    dx, dy = positions[-1, k] - positions[0, k]
    if floor_hits[k]:
        verb = "bounces"
    else:
        verb = "falls" if dy >= 0 else "rises"
    if dx > DX_THRESHOLD:
        verb += " to the right"
    elif dx < -DX_THRESHOLD:
        verb += " to the left"
    noun = "ball" if n == 1 else "balls"
    # Only the gravity-free world is named, so captions of clips under gravity read as they always did.
    world = "" if gravity else f" {ZERO_GRAVITY_WORDS}"
    return f"{NUMBER_WORDS[n]} {noun}: {_join(names)}; the {COLOR_NAMES[colors[k]]} ball {verb}{world}"


_CAPTION_RE = re.compile(r"^\s*([a-z]+) balls?: ([a-z ,]+?); the ([a-z]+) ball (.+?)\s*$")


def parse_caption(caption: str | bytes) -> tuple[int, list[str]]:
    """Inverse of the caption template: (num_balls, colour names); ValueError if unparsable."""
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    m = _CAPTION_RE.match(caption.lower())
    if m is None:
        raise ValueError(f"caption does not follow the physics template: {caption!r}")
    count_word, colour_list = m.group(1), m.group(2)
    if count_word not in NUMBER_WORDS:
        raise ValueError(f"unknown count word {count_word!r} in caption {caption!r}")
    names = [w for w in re.split(r",\s*|\s+and\s+", colour_list.strip()) if w]
    unknown = [w for w in names if w not in COLOR_NAMES]
    if unknown:
        raise ValueError(f"unknown colour(s) {unknown} in caption {caption!r}")
    if m.group(3) not in names:
        raise ValueError(f"the described ball {m.group(3)!r} is not among {names} in {caption!r}")
    return NUMBER_WORDS.index(count_word), names


def parse_combos(text: str) -> tuple[tuple[str, int], ...]:
    """'red3,cyan1' -> (('red', 3), ('cyan', 1)): the `exclude` pairs as written in configs."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([a-z]+)(\d+)", item)
        if m is None or m.group(1) not in COLOR_NAMES:
            raise ValueError(f"bad (colour, count) pair {item!r}; write e.g. 'red3,cyan1' with colours from "
                             f"{', '.join(COLOR_NAMES)}")
        pairs.append((m.group(1), int(m.group(2))))
    return tuple(pairs)


def format_combos(pairs) -> str:
    """Inverse of `parse_combos`."""
    return ",".join(f"{c}{n}" for c, n in pairs)


def simulate(seed: int, cfg: PhysicsConfig = PhysicsConfig()) -> dict:
    """Simulates and renders one clip; deterministic in (seed, cfg)."""
    rng = np.random.default_rng(seed)
    excluded = set(cfg.exclude)
    while True:  # no extra draws when nothing is excluded, so those datasets are unchanged
        n = int(rng.integers(cfg.min_balls, cfg.max_balls + 1))
        colors = rng.choice(len(PALETTE), size=n, replace=False).astype(np.int32)
        if not any((COLOR_NAMES[c], n) in excluded for c in colors):
            break
    radii = rng.uniform(*cfg.radius_range, size=n)
    pos0 = _place_balls(rng, radii)
    vel0 = rng.uniform(-cfg.max_speed, cfg.max_speed, size=(n, 2))
    # Drawn last, and only when asked for, so datasets without gravity-free clips are unchanged.
    if cfg.zero_gravity > 0 and rng.random() < cfg.zero_gravity:
        cfg = dataclasses.replace(cfg, gravity=0.0)
    return simulate_state(pos0, vel0, radii, colors, cfg)


def simulate_state(
    pos0: np.ndarray,
    vel0: np.ndarray,
    radii: np.ndarray,
    colors: np.ndarray,
    cfg: PhysicsConfig = PhysicsConfig(),
    *,
    background: tuple[int, int, int] = BACKGROUND,
) -> dict:
    """Simulates and renders a clip from an initial state (unit-square units, [n,2] / [n])."""
    radii = np.asarray(radii, np.float64)
    colors = np.asarray(colors, np.int32)
    n = len(radii)
    positions, velocities, floor_hits = run_physics(pos0, vel0, radii, cfg)
    m = max(cfg.max_balls, n)
    pos_px = np.zeros((cfg.frames, m, 2), np.float32)
    vel_px = np.zeros((cfg.frames, m, 2), np.float32)
    radii_px = np.zeros((m,), np.float32)
    colors_pad = np.full((m,), -1, np.int32)
    pos_px[:, :n] = positions * cfg.size
    vel_px[:, :n] = velocities * cfg.size
    radii_px[:n] = radii * cfg.size
    colors_pad[:n] = colors
    video = render(pos_px[:, :n], radii_px[:n], colors, cfg.size, background)
    return {
        "video": video,
        "caption": make_caption(colors.tolist(), positions, floor_hits, gravity=cfg.gravity != 0),
        "num_balls": n,
        "positions": pos_px,
        "velocities": vel_px,
        "radii": radii_px,
        "colors": colors_pad,
    }
