"""Can a model tell from the conditioning frames whether a scene has gravity?

The benchmark's in-distribution families differ in their world: uniform motion and collisions have no
gravity, parabolas and multi-ball scenes fall. A frame-conditioned model must read the world off the
K given frames, and it sees them only through its VAE. This estimates gravity from those frames alone
(ĝ: the median of the balls' second differences of height over the frames, `gravity_estimate`, as
the clip metrics compute it, but leaving out frames where a ball may touch the floor, the ceiling or
another ball, judged from the parsed frames alone) on the true frames and on their VAE roundtrip,
and counts how often thresholding ĝ at half the training gravity names the right world.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sora_jax.eval.physics_metrics import (WORLD_THRESHOLD, contact_free, gravity_estimate, parse_video,
                                           right_world)
from sora_jax.eval.physics_scenes import SceneSpec, make_scenes

def conditioning_gravity(video: np.ndarray, colors: np.ndarray, dt: float) -> float:
    """ĝ in px/s² (down is positive) from uint8 frames [K, H, W, 3], K >= 3, as clip metrics estimate it but
    over contact-free triples only (all of them if none is); NaN if no ball is seen in three frames in a row."""
    video = np.asarray(video)
    got = parse_video(video, np.asarray(colors))
    g = gravity_estimate(got["xy"], dt, contact_free(got["xy"], got["area"], video.shape[2]))
    return g if np.isfinite(g) else gravity_estimate(got["xy"], dt)


def world_cue_rows(spec: SceneSpec, cond_frames: int, roundtrip: Callable[[np.ndarray], np.ndarray] | None = None
                   ) -> list[dict[str, Any]]:
    """Per scene: its true gravity and ĝ from its first `cond_frames` frames, true and (if given) VAE-roundtripped."""
    if cond_frames < 3:
        raise ValueError(f"gravity needs at least 3 conditioning frames (a second difference), got {cond_frames}")
    rows = []
    for scene in make_scenes(spec):
        given = np.asarray(scene["video"][:cond_frames])
        row = {"scene": f"{scene['family']}/{scene['split']}/{scene['seed']}", "family": scene["family"],
               "gravity_px": float(scene["gravity_px"]),
               "g_truth": conditioning_gravity(given, scene["colors"], scene["dt"])}
        if roundtrip is not None:
            row["g_vae"] = conditioning_gravity(roundtrip(given), scene["colors"], scene["dt"])
        rows.append(row)
    return rows


def world_accuracy(rows: list[dict[str, Any]], key: str, train_gravity_px: float) -> dict[str, float]:
    """Share of scenes whose ĝ (`key`) lands on the right side of half the training gravity, overall and per family."""
    def right(r):  # a scene where no ball is seen (no estimate) reads as gravity-free
        return right_world(np.nan_to_num(r[key]), r["gravity_px"], train_gravity_px)

    out = {"all": float(np.mean([right(r) for r in rows]))}
    for family in dict.fromkeys(r["family"] for r in rows):
        out[family] = float(np.mean([right(r) for r in rows if r["family"] == family]))
    return out


def world_cue_report(rows: list[dict[str, Any]], train_gravity_px: float) -> tuple[dict[str, Any], str]:
    """(JSON-ready result, markdown table) of `world_cue_rows`: median |ĝ| per family, and world accuracy."""
    keys = [k for k in ("g_truth", "g_vae") if k in rows[0]]
    result = {"train_gravity_px": train_gravity_px, "threshold_px": WORLD_THRESHOLD * train_gravity_px,
              "accuracy": {k: world_accuracy(rows, k, train_gravity_px) for k in keys}, "scenes": rows}
    families = list(dict.fromkeys(r["family"] for r in rows))
    lines = ["| frames | " + " | ".join(f"{f}: ĝ median (range)" for f in families) + " | right world |",
             "|---" * (len(families) + 2) + "|"]
    for k in keys:
        cells = []
        for f in families:
            g = np.array([r[k] for r in rows if r["family"] == f])
            g = g[np.isfinite(g)]
            cells.append(f"{np.median(g):.1f} ({g.min():.0f} to {g.max():.0f})" if g.size else "no ball seen")
        acc = result["accuracy"][k]
        lines.append(f"| {'true' if k == 'g_truth' else 'VAE roundtrip'} | " + " | ".join(cells)
                     + f" | {acc['all']:.2f} ({round(acc['all'] * len(rows))}/{len(rows)}) |")
    return result, "\n".join(lines)
