"""Reference predictors for frame-conditioned prediction, scored by the same code as a model.

Each takes a scene (`physics_scenes.make_scene`) and the number of conditioning frames K and returns a
uint8 video of the scene's shape whose first K frames are the scene's own:
  ground_truth      the simulator's continuation (scores = the parse floor)
  copy_last         frame K-1 repeated: no motion at all
  resim_no_gravity  balls parsed from the conditioning frames (centre, velocity from the last two,
                    radius from area) and re-simulated with walls and collisions but no gravity
  resim_gravity     the same under the training clips' gravity (`PhysicsConfig().gravity`): what a
                    model that learned only a world with gravity would predict, even perfectly
  resim_world       the same under the scene's own gravity (none, or the training one), which its
                    caption names: the best a model that parses state as well as the parser can do
  other_clip        the continuation of a different real clip: realistic frames, wrong world
A model that learned physics must beat copy_last and resim_no_gravity on position error. Where a scene
has no gravity (the uniform and collision families) resim_no_gravity is near exact and resim_gravity
is not, and the reverse under gravity: so beating both needs a model that tells the worlds apart from
the conditioning frames or from the caption (which ends "in zero gravity" for a gravity-free clip),
which it can only learn from training clips of both (`zero_gravity`).
"""

from __future__ import annotations

import numpy as np

from sora_jax.data.physics import PhysicsConfig, simulate_state
from sora_jax.eval.physics_metrics import parse_video

BASELINES = ("ground_truth", "copy_last", "resim_no_gravity", "resim_gravity", "resim_world", "other_clip")
TRAIN_GRAVITY = PhysicsConfig().gravity  # frame sides / s^2


def _check(scene: dict, cond_frames: int) -> np.ndarray:
    video = np.asarray(scene["video"])
    if not 1 <= cond_frames < len(video):
        raise ValueError(f"cond_frames must be in [1, {len(video) - 1}], got {cond_frames}")
    return video


def ground_truth(scene: dict, cond_frames: int) -> np.ndarray:
    """The true clip."""
    return _check(scene, cond_frames).copy()


def copy_last(scene: dict, cond_frames: int) -> np.ndarray:
    """The last conditioning frame held for the rest of the clip."""
    video = _check(scene, cond_frames).copy()
    video[cond_frames:] = video[cond_frames - 1]
    return video


def other_clip(scene: dict, cond_frames: int, other: dict) -> np.ndarray:
    """The conditioning frames followed by another clip's continuation."""
    video = _check(scene, cond_frames).copy()
    if np.shape(other["video"]) != video.shape:
        raise ValueError(f"the other clip has shape {np.shape(other['video'])}, expected {video.shape}")
    video[cond_frames:] = other["video"][cond_frames:]
    return video


def resim_no_gravity(scene: dict, cond_frames: int, *, truth: dict | None = None) -> np.ndarray:
    """Re-simulation without gravity from the state parsed off the conditioning frames."""
    return _resim(scene, cond_frames, 0.0, truth)


def resim_gravity(scene: dict, cond_frames: int, *, truth: dict | None = None) -> np.ndarray:
    """Re-simulation under the training clips' gravity from the state parsed off the conditioning frames."""
    return _resim(scene, cond_frames, TRAIN_GRAVITY, truth)


def resim_world(scene: dict, cond_frames: int, *, truth: dict | None = None) -> np.ndarray:
    """Re-simulation under the scene's own gravity from the state parsed off the conditioning frames."""
    size = np.shape(scene["video"])[1]
    return _resim(scene, cond_frames, float(scene["gravity_px"]) / size, truth)


def _resim(scene: dict, cond_frames: int, gravity: float, truth: dict | None) -> np.ndarray:
    """Re-simulation under `gravity` (frame sides / s^2) from the parsed state of the last conditioning frame."""
    video = _check(scene, cond_frames).copy()
    size, t_len, k = video.shape[1], len(video), cond_frames
    colors = np.asarray(scene["colors"])
    truth = truth if truth is not None else parse_video(video, colors)
    xy, area = truth["xy"], truth["area"]
    seen = [m for m in range(len(colors)) if colors[m] >= 0 and np.isfinite(xy[k - 1, m]).all()]
    if not seen:
        video[k:] = video[k - 1]
        return video
    pos = xy[k - 1, seen]
    # One frame of history gives no velocity: then the balls stand still, as copy_last.
    vel = (pos - xy[k - 2, seen]) / scene["dt"] if k >= 2 else np.zeros_like(pos)
    # A backward difference lags the velocity at frame k-1 by half a frame of acceleration.
    vel = np.nan_to_num(vel) + (np.array([0.0, 0.5 * gravity * size * scene["dt"]]) if k >= 2 else 0.0)
    radii = np.sqrt(area[k - 1, seen] / np.pi)
    cfg = PhysicsConfig(size=size, frames=t_len - k + 1, gravity=gravity, dt=scene["dt"], min_balls=1,
                        max_balls=max(len(seen), 1), radius_range=(0.01, 0.24))
    # The simulator wants unit-square states with radii inside (0, 0.25).
    r = np.clip(radii / size, 0.011, 0.239)
    p = np.clip(pos / size, r[:, None], 1 - r[:, None])
    sim = simulate_state(p, vel / size, r, colors[seen], cfg)
    video[k:] = sim["video"][1:]
    return video
