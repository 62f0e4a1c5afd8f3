"""Seeded evaluation scenes for the world-model benchmark, drawn from the physics_balls simulator.

Families (what physics a scene exercises):
  uniform    one ball, no gravity (law of inertia)
  parabola   one ball under gravity (ĝ from second differences)
  collision  two balls aimed at each other, no gravity (momentum and energy across the collision)
  multi      1-3 balls of distinct colours under gravity: the training distribution itself
  drift      as multi without gravity: the gravity-free share of mixed training data (`zero_gravity`),
             whose captions end "in zero gravity"; not in the default set (the text protocol uses it)

Splits (how far a scene is from the training data, `PhysicsConfig()` defaults):
  id          speeds and radii inside the training ranges
  ood_speed   speeds above anything in training (training: <= 0.8 per axis, i.e. |v| <= 1.13)
  ood_radius  radii outside the training range [0.08, 0.14] (alternately smaller and larger)
  combo       multi only: held-out (colour, count) pairs, `HELD_OUT_COMBOS`

Lengths are fractions of the frame side and speeds frame sides per second, as in `PhysicsConfig`;
returned scenes are in pixels (the `simulate` dict plus family, split, seed, gravity_px, dt).
Seeds start at 10^9, disjoint from the dataset's (`physics_tfds.example_seed` stays below 10^9 for
base seeds < 500), so evaluation scenes are not training clips.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sora_jax.data.physics import COLOR_NAMES, PALETTE, PhysicsConfig, simulate_state

FAMILIES = ("uniform", "parabola", "collision", "multi", "drift")
DEFAULT_FAMILIES = FAMILIES[:4]
SPLITS = ("id", "ood_speed", "ood_radius", "combo")
# (colour, ball count) pairs a compositional model should meet only at test time: training data built
# with `config.data.exclude` set to these (configs/physics_reference does) never shows them.
HELD_OUT_COMBOS: tuple[tuple[str, int], ...] = (("red", 3), ("cyan", 1), ("magenta", 2))
_EVAL_SEED_BASE = 10**9
_TRAIN = PhysicsConfig()
_SPEED = {"id": (0.3, 0.8), "ood_speed": (1.4, 2.0)}
_RADIUS_OOD = ((0.05, 0.065), (0.16, 0.19))


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Which scenes to generate: families x splits, `per_split` each, at the model's size and length."""

    families: tuple[str, ...] = DEFAULT_FAMILIES
    splits: tuple[str, ...] = SPLITS
    per_split: int = 8
    size: int = 64
    frames: int = 17
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES] + [s for s in self.splits if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown families/splits {bad}; families: {', '.join(FAMILIES)}, "
                             f"splits: {', '.join(SPLITS)}")
        if self.per_split < 1 or self.frames < 2 or self.size < 16:
            raise ValueError(f"need per_split >= 1, frames >= 2 and size >= 16; got {self.per_split}, "
                             f"{self.frames}, {self.size}")


def scene_seed(spec: SceneSpec, family: str, split: str, index: int) -> int:
    """The rng seed of one scene; fixed by (spec.seed, family, split, index)."""
    return _EVAL_SEED_BASE + ((spec.seed * 8 + FAMILIES.index(family)) * 8 + SPLITS.index(split)) * 100_000 + index


def _radii(rng: np.random.Generator, split: str, n: int, index: int) -> np.ndarray:
    if split == "ood_radius":
        return rng.uniform(*_RADIUS_OOD[index % 2], size=n)
    return rng.uniform(*_TRAIN.radius_range, size=n)


def _velocity(rng: np.random.Generator, split: str, n: int) -> np.ndarray:
    speed = rng.uniform(*_SPEED.get(split, _SPEED["id"]), size=n)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    return np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=-1)


def _positions(rng: np.random.Generator, radii: np.ndarray) -> np.ndarray:
    for _ in range(1000):
        pos = rng.uniform(radii[:, None], 1.0 - radii[:, None], size=(len(radii), 2))
        gap = np.linalg.norm(pos[:, None] - pos[None], axis=-1) - (radii[:, None] + radii[None])
        if np.all(gap[np.triu_indices(len(radii), 1)] > 0.02):
            return pos
    raise ValueError(f"cannot place balls of radii {radii.round(3).tolist()} without overlap")


def _collision_state(rng: np.random.Generator, split: str, radii: np.ndarray, duration: float):
    """Two balls on a near-diagonal line through the centre, meeting ~55% into the clip if there is room."""
    speed = rng.uniform(*_SPEED.get(split, _SPEED["id"]), size=2)
    # Near-diagonal lines leave the most room, so that fast (OOD) pairs still meet after the
    # conditioning frames.
    angle = np.pi / 4 + np.pi / 2 * rng.integers(4) + rng.uniform(-0.25, 0.25)
    axis = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-axis[1], axis[0]])
    room = 2 * (0.5 / max(abs(axis[0]), abs(axis[1])) - 0.02) - 2 * radii.sum()
    gap = min(speed.sum() * 0.55 * duration, room)
    half = (gap + radii.sum()) / 2
    # A small sideways offset makes the collision oblique, as most real ones are.
    offset = rng.uniform(-0.3, 0.3) * min(radii) * normal
    centre = np.array([0.5, 0.5])
    pos = np.stack([centre - half * axis + offset, centre + half * axis - offset])
    vel = np.stack([speed[0] * axis, -speed[1] * axis])
    return pos, vel


def make_scene(spec: SceneSpec, family: str, split: str, index: int) -> dict:
    """One evaluation scene (pixels): the `simulate` dict plus family, split, seed, gravity_px, dt."""
    if split == "combo" and family != "multi":
        raise ValueError(f"the combo split exists for family 'multi' only, not {family!r}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    seed = scene_seed(spec, family, split, index)
    rng = np.random.default_rng(seed)
    gravity = _TRAIN.gravity if family in ("parabola", "multi") else 0.0
    cfg = PhysicsConfig(size=spec.size, frames=spec.frames, gravity=gravity, dt=_TRAIN.dt,
                        min_balls=1, max_balls=3, radius_range=(0.01, 0.24))
    if split == "combo":
        colour, n = HELD_OUT_COMBOS[index % len(HELD_OUT_COMBOS)]
        others = [c for c in range(len(PALETTE)) if COLOR_NAMES[c] != colour]
        colors = np.array([COLOR_NAMES.index(colour), *rng.choice(others, n - 1, replace=False)], np.int32)
    else:
        n = {"uniform": 1, "parabola": 1, "collision": 2}.get(family) or int(rng.integers(1, 4))
        colors = rng.choice(len(PALETTE), size=n, replace=False).astype(np.int32)
    radii = _radii(rng, split, n, index)
    if family == "collision":
        pos, vel = _collision_state(rng, split, radii, (spec.frames - 1) * cfg.dt)
    else:
        pos, vel = _positions(rng, radii), _velocity(rng, split, n)
    scene = simulate_state(pos, vel, radii, colors, cfg)
    scene.update(family=family, split=split, seed=seed, gravity_px=gravity * spec.size, dt=cfg.dt,
                 num_balls=n)
    return scene


def make_scenes(spec: SceneSpec) -> list[dict]:
    """Every scene of the spec, in (family, split, index) order; combo only for multi."""
    return [make_scene(spec, f, s, i) for f in spec.families for s in spec.splits
            if s != "combo" or f == "multi" for i in range(spec.per_split)]
