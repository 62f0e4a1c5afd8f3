"""Ball detection and the prompt-vs-video physics check."""

from __future__ import annotations

import numpy as np
import pytest

from sora_jax.data.physics import BACKGROUND, COLOR_NAMES, PhysicsConfig, simulate
from sora_jax.eval.physics import detect_balls, physics_check, physics_scores


@pytest.mark.parametrize("cfg", [PhysicsConfig(size=32, frames=5), PhysicsConfig(size=64, frames=9)])
def test_ground_truth_clips_match_their_captions(cfg):
    for seed in range(12):
        ex = simulate(seed, cfg)
        check = physics_check(ex["video"], ex["caption"])
        assert check["count_match"] == 1.0 and check["color_match"] == 1.0, ex["caption"]
        assert check["mean_count"] == ex["num_balls"]


def test_detections_locate_the_simulated_balls():
    cfg = PhysicsConfig(size=64, frames=5)
    ex = simulate(3, cfg)
    n = ex["num_balls"]
    for t in range(cfg.frames):
        balls = {b["color"]: b for b in detect_balls(ex["video"][t])}
        assert len(balls) == n
        for k in range(n):
            b = balls[COLOR_NAMES[ex["colors"][k]]]
            assert np.hypot(b["x"] - ex["positions"][t, k, 0], b["y"] - ex["positions"][t, k, 1]) < 1.0
            assert abs(b["area"] - np.pi * ex["radii"][k] ** 2) < 0.15 * np.pi * ex["radii"][k] ** 2


def test_float_input_and_blurry_noisy_frames():
    ex = simulate(5, PhysicsConfig(size=64, frames=5))
    video = ex["video"].astype(np.float32) / 127.5 - 1.0
    assert physics_check(video, ex["caption"])["count_match"] == 1.0
    # Box blur + noise, as a crude stand-in for a generated clip.
    k = np.ones(5, np.float32) / 5
    blurred = video
    for axis in (1, 2):
        blurred = np.apply_along_axis(lambda a: np.convolve(a, k, "same"), axis, blurred)
    noisy = blurred + np.random.default_rng(0).normal(0, 0.1, blurred.shape).astype(np.float32)
    check = physics_check(noisy, ex["caption"])
    assert check["count_match"] == 1.0 and check["color_match"] == 1.0


def test_blank_video_and_wrong_prompt():
    ex = simulate(1, PhysicsConfig(size=32, frames=5))
    blank = np.broadcast_to(np.array(BACKGROUND, np.uint8), ex["video"].shape)
    check = physics_check(blank, ex["caption"])
    assert check["mean_count"] == 0.0 and check["count_match"] == 0.0 and check["color_match"] == 0.0
    assert physics_check(np.zeros_like(ex["video"]), ex["caption"])["per_frame_count"] == [0] * 5
    wrong = "one ball: " + ("blue" if "blue" not in ex["caption"] else "red") + "; the x ball falls"
    with pytest.raises(ValueError):
        physics_check(ex["video"], wrong)  # "x" is not a colour: the caption is malformed
    other = ("blue" if "blue" not in ex["caption"] else "red")
    check = physics_check(ex["video"], f"one ball: {other}; the {other} ball falls")
    assert check["color_match"] == 0.0
    scores = physics_scores([ex["video"], blank], [ex["caption"]] * 2)
    assert scores["count_match"] == 0.5 and scores["color_match"] == 0.5
    assert scores["count_error"] == pytest.approx(ex["num_balls"] / 2)
