"""World-model benchmark: parse floor, metric edge cases, baseline ranking, PhyWorld floor, CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from sora_jax.data.physics import BACKGROUND, COLOR_NAMES, PALETTE_RGB, render
from sora_jax.eval import physics_baselines as baselines
from sora_jax.eval.physics_bench import latent_aligned
from sora_jax.eval.physics_metrics import clip_metrics, gravity_estimate, gravity_fit, parse_video, text_metrics
from sora_jax.eval.physics_scenes import HELD_OUT_COMBOS, SceneSpec, make_scene, make_scenes
from sora_jax.eval.phyworld import PAPER_FLOOR, PhyWorldSpec, initial_state, kang_floor, parse_floor, parse_kang

K = 5


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(SceneSpec(splits=("id",), per_split=2))


def test_scenes_are_seeded_and_follow_their_family():
    spec = SceneSpec(per_split=3)
    a, b = make_scene(spec, "parabola", "ood_speed", 1), make_scene(spec, "parabola", "ood_speed", 1)
    np.testing.assert_array_equal(a["video"], b["video"])
    assert a["seed"] != make_scene(spec, "parabola", "ood_speed", 2)["seed"]
    uni = make_scene(spec, "uniform", "id", 0)
    assert uni["num_balls"] == 1 and uni["gravity_px"] == 0
    fast = make_scene(spec, "uniform", "ood_speed", 0)
    speed = np.linalg.norm(fast["velocities"][0, 0]) / spec.size
    assert speed > 1.13  # above every training speed (0.8 per axis)
    big = make_scene(spec, "multi", "ood_radius", 1)
    assert big["radii"][0] / spec.size > 0.14
    for i in range(3):
        combo = make_scene(spec, "multi", "combo", i)
        colour, n = HELD_OUT_COMBOS[i]
        assert combo["num_balls"] == n and COLOR_NAMES[combo["colors"][0]] == colour
    with pytest.raises(ValueError, match="combo"):
        make_scene(spec, "uniform", "combo", 0)
    with pytest.raises(ValueError, match="unknown"):
        SceneSpec(families=("tennis",))


def test_parse_floor_on_rendered_ground_truth(scenes):
    """The true clip scored against itself: only parsing error is left, and it is small."""
    for scene in scenes:
        m = clip_metrics(scene["video"], scene, K)
        assert m["count_acc"] == 1.0 and m["color_jaccard"] == 1.0 and m["miss_rate"] == 0.0
        assert m["count_over"] == m["count_under"] == m["phantom_colour"] == 0.0
        assert m["colour_err"] < 0.5  # RGB units: the cores are the palette colour itself
        assert 0 < m["pos_err_px"] < 0.03, (scene["family"], m["pos_err_px"])
        assert m["vel_err_px"] < 0.05 and m["area_drift"] < 0.01 and m["flicker"] < 1e-6
        if scene["gravity_px"] > 0:
            assert m["g_rel_err"] < 0.05, m["g_hat"]
        else:
            assert abs(m["g_hat"]) < 5.0  # px/s^2, against 64 px/s^2 of gravity
        if scene["family"] == "collision" and np.isfinite(m["momentum_change"]):
            assert m["momentum_change"] < 0.1 and m["energy_change"] < 0.1


def _two_ball(scenes):
    return next(s for s in scenes if s["num_balls"] >= 2)


def test_empty_frames(scenes):
    scene = _two_ball(scenes)
    pred = scene["video"].copy()
    pred[K:] = np.array(BACKGROUND, np.uint8)
    m = clip_metrics(pred, scene, K)
    assert m["count_acc"] == 0.0 and m["miss_rate"] == 1.0 and m["color_jaccard"] == 0.0
    assert m["count_under"] == 1.0 and m["count_over"] == 0.0
    assert np.isnan(m["pos_err_px"]) and np.isnan(m["g_hat"]) and np.isnan(m["colour_err"])
    # A black frame scores well on full-frame PSNR of a sparse scene, not on foreground PSNR.
    assert m["fg_psnr"] < m["psnr"] - 5


def test_missing_and_extra_ball(scenes):
    scene = _two_ball(scenes)
    n, pos, radii, colors = scene["num_balls"], scene["positions"], scene["radii"], scene["colors"]
    size = scene["video"].shape[1]
    missing = render(pos[:, 1:n], radii[1:n], colors[1:n], size)
    m = clip_metrics(missing, scene, K)
    assert m["count_acc"] == 0.0 and m["miss_rate"] == pytest.approx(1 / n)
    assert m["count_under"] == 1.0 and m["count_over"] == 0.0
    assert m["pos_err_px"] < 0.05  # the balls that are there are where they should be
    assert m["phantom_colour"] == 0.0
    assert m["color_jaccard"] == pytest.approx((n - 1) / n)
    extra_colour = next(c for c in range(6) if c not in colors[:n])
    extra_pos = np.concatenate([pos[:, :n], np.full((len(pos), 1, 2), size * 0.5)], axis=1)
    extra_pos[:, n] = [size * 0.1 + 3, size * 0.1 + 3]
    extra = render(extra_pos, np.append(radii[:n], 3.0), np.append(colors[:n], extra_colour), size)
    m = clip_metrics(extra, scene, K)
    assert m["count_acc"] == 0.0 and m["miss_rate"] <= 0.2
    assert m["count_over"] + m["count_under"] == 1.0 and m["count_over"] >= 0.8  # the ball may hide behind another
    assert m["color_jaccard"] < 1.0
    # A colour no ball of the scene has: a phantom in every frame where it shows.
    assert m["phantom_colour"] >= m["count_over"]
    # The same extra ball in a colour the scene has (a ball torn in two): extra, but no phantom.
    torn = render(extra_pos, np.append(radii[:n], 3.0), np.append(colors[:n], colors[0]), size)
    m = clip_metrics(torn, scene, K)
    assert m["count_over"] >= 0.8 and m["phantom_colour"] == 0.0


def test_colour_error_measures_a_shifted_ball(scenes):
    """A ball decoded in the wrong shade: still counted and placed, and colour_err says by how much."""
    scene = _two_ball(scenes)
    video, n = scene["video"].astype(np.int64), scene["num_balls"]
    ball = np.all(video == PALETTE_RGB[int(scene["colors"][0])].astype(np.int64), axis=-1)
    shift = np.array([30, -30, 0])
    shifted = video.copy()
    shifted[ball] = np.clip(shifted[ball] + shift, 0, 255)
    m = clip_metrics(shifted.astype(np.uint8), scene, K)
    assert m["count_acc"] == 1.0 and m["phantom_colour"] == 0.0 and m["pos_err_px"] < 0.05
    # The mean over a frame's blobs: one of n balls off by |shift|, the others exact.
    assert m["colour_err"] == pytest.approx(np.linalg.norm(shift) / n, rel=0.02)
    t = text_metrics(shifted.astype(np.uint8), scene["caption"], dt=scene["dt"], gravity_px=scene["gravity_px"])
    assert t["colour_err"] == pytest.approx(np.linalg.norm(shift) / n, rel=0.02)


def test_bad_prediction_shape(scenes):
    with pytest.raises(ValueError, match="uint8"):
        clip_metrics(scenes[0]["video"][:3], scenes[0], K)
    with pytest.raises(ValueError, match="cond_frames"):
        clip_metrics(scenes[0]["video"], scenes[0], len(scenes[0]["video"]))


def test_baselines_rank_as_expected(scenes):
    errs = {b: [] for b in ("ground_truth", "resim_no_gravity", "copy_last")}
    for scene in scenes:
        if scene["family"] not in ("parabola", "multi"):
            continue
        truth = parse_video(scene["video"], scene["colors"])
        preds = {"ground_truth": baselines.ground_truth(scene, K), "copy_last": baselines.copy_last(scene, K),
                 "resim_no_gravity": baselines.resim_no_gravity(scene, K, truth=truth)}
        for name, pred in preds.items():
            np.testing.assert_array_equal(pred[:K], scene["video"][:K])
            errs[name].append(clip_metrics(pred, scene, K, truth=truth)["pos_err_px"])
    mean = {k: float(np.mean(v)) for k, v in errs.items()}
    assert mean["ground_truth"] < mean["resim_no_gravity"] < mean["copy_last"], mean
    # Without gravity the re-simulation is the true world: on uniform scenes it is near exact, and
    # re-simulation under the training clips' gravity is not; on parabolas the reverse.
    uni = next(s for s in scenes if s["family"] == "uniform")
    assert clip_metrics(baselines.resim_no_gravity(uni, K), uni, K)["pos_err_px"] < 0.5
    assert clip_metrics(baselines.resim_gravity(uni, K), uni, K)["pos_err_px"] > 2.0
    para = [s for s in scenes if s["family"] == "parabola"]
    with_g = np.mean([clip_metrics(baselines.resim_gravity(s, K), s, K)["pos_err_px"] for s in para])
    without = np.mean([clip_metrics(baselines.resim_no_gravity(s, K), s, K)["pos_err_px"] for s in para])
    assert with_g < 0.5 * without, (with_g, without)
    # Re-simulation in the scene's own world (the one its caption names) takes the better of the two.
    assert np.array_equal(baselines.resim_world(uni, K), baselines.resim_no_gravity(uni, K))
    assert all(np.array_equal(baselines.resim_world(s, K), baselines.resim_gravity(s, K)) for s in para)
    # `world_acc`: whether the prediction's ĝ puts it in the scene's world.
    assert clip_metrics(baselines.ground_truth(uni, K), uni, K)["world_acc"] == 1.0
    assert clip_metrics(baselines.resim_gravity(uni, K), uni, K)["world_acc"] == 0.0
    assert [clip_metrics(baselines.resim_no_gravity(s, K), s, K)["world_acc"] for s in para] == [0.0] * len(para)
    assert [clip_metrics(baselines.ground_truth(s, K), s, K)["world_acc"] for s in para] == [1.0] * len(para)
    assert uni["caption"].endswith(" in zero gravity") and not any(s["caption"].endswith("gravity") for s in para)
    other = baselines.other_clip(uni, K, scenes[-1])
    np.testing.assert_array_equal(other[K:], scenes[-1]["video"][K:])


def test_text_metrics_score_caption_against_clip(scenes):
    scene = next(s for s in scenes if s["family"] == "multi")
    m = text_metrics(scene["video"], scene["caption"], dt=scene["dt"], gravity_px=scene["gravity_px"])
    assert m["count_acc"] == 1.0 and m["color_jaccard"] == 1.0 and m["g_rel_err"] < 0.05
    assert m["count_over"] == m["count_under"] == m["phantom_colour"] == 0.0
    blank = np.broadcast_to(np.array(BACKGROUND, np.uint8), scene["video"].shape)
    empty = text_metrics(blank, scene["caption"], dt=scene["dt"], gravity_px=scene["gravity_px"])
    assert empty["count_under"] == 1.0 and empty["count_over"] == 0.0 and empty["count_acc"] == 0.0
    mirrored = scene["video"][:, :, ::-1]
    flipped = text_metrics(mirrored, scene["caption"], dt=scene["dt"], gravity_px=scene["gravity_px"])
    if " to the " in scene["caption"]:
        assert m["direction_acc"] == 1.0 and flipped["direction_acc"] == 0.0
    # A drift scene is multi without gravity, and its caption says so: the true clip scores ĝ near 0
    # against that world, the falling clip far from it.
    spec = SceneSpec(families=("drift",), splits=("id",), per_split=4)
    drifts = make_scenes(spec)
    assert all(d["gravity_px"] == 0 and d["caption"].endswith(" in zero gravity") for d in drifts)
    assert {d["num_balls"] for d in drifts} <= {1, 2, 3} and "drift" not in SceneSpec().families
    drift = drifts[0]
    true = text_metrics(drift["video"], drift["caption"], dt=drift["dt"], gravity_px=0.0)
    assert true["count_acc"] == 1.0 and abs(true["g_hat"]) < 2.0 and true["g_abs_err"] == abs(true["g_hat"])
    assert np.isnan(true["g_rel_err"])
    falling = text_metrics(scene["video"], scene["caption"] + " in zero gravity", dt=scene["dt"], gravity_px=0.0)
    assert falling["g_abs_err"] > 0.5 * scene["gravity_px"], falling
    assert true["world_acc"] == 1.0 and falling["world_acc"] == 0.0 and m["world_acc"] == 1.0
    assert np.isnan(empty["world_acc"])  # no ball, no ĝ: neither world


def test_latent_alignment():
    assert [latent_aligned(k) for k in (1, 2, 4, 5, 6, 9)] == [1, 5, 5, 5, 9, 9]


def test_phyworld_floor_is_below_theirs_and_coverage_beats_hard_mask():
    spec = PhyWorldSpec(scenes=2, size=96, frames=12)
    cov, hard = parse_floor(spec, weighted=True), parse_floor(spec, weighted=False)
    assert cov["mean_frames_used"] > 6
    assert cov["velocity_error"] < hard["velocity_error"] < 5 * PAPER_FLOOR


def test_kang_replay_reproduces_their_floor_and_the_grid_mismatch_explains_it():
    spec = PhyWorldSpec(scenes=8, size=256)
    theirs, matched = kang_floor(spec, "paper"), kang_floor(spec, "matched")
    # Their 10/W parse of a grid drawn at i/(W-1) reads every speed (W-1)/W too slow ...
    assert abs(theirs["mean_speed_ratio"] - 255 / 256) < 2e-4
    mean_v0 = np.mean([initial_state(spec, i)[0] for i in range(spec.scenes)])
    assert abs(theirs["velocity_error"] - mean_v0 / 256) < 0.1 * mean_v0 / 256
    # ... which lands on their published ground-truth figure; matching the scale removes >90% of it.
    assert 0.75 * PAPER_FLOOR < theirs["velocity_error"] < 1.25 * PAPER_FLOOR
    assert matched["velocity_error"] < 0.1 * theirs["velocity_error"]
    assert abs(matched["mean_speed_ratio"] - 1.0) < 2e-4
    assert theirs["mean_frames_used"] > 10
    with pytest.raises(ValueError, match="pixel_grid"):
        parse_kang(np.zeros((1, 8, 8, 3), np.uint8), "centre")


def test_cli_eval_physics_on_tiny_checkpoint(tiny_runs, tmp_path, capsys):
    from sora_jax.cli import main

    out = tmp_path / "bench"
    rc = main(["eval-physics", "--checkpoint", str(tiny_runs["dit_cfg"].workdir), "--out", str(out),
               "--per-split", "1", "--families", "parabola", "--splits", "id", "--cond-frames", "1",
               "--text-prompts", "1", "--phyworld-scenes", "1", "--phyworld-size", "48", "--steps", "2"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["cond_pixel_frames"] == 1
    by_split = report["frames"]["by_split"]
    assert {"model/id", "vae_roundtrip/id", "ground_truth/id", "copy_last/id", "resim_no_gravity/id",
            "resim_gravity/id", "resim_world/id"} <= set(by_split)
    assert by_split["model/id"]["clips"] == 1 and report["text"]["model"]["clips"] == 1
    assert report["text"]["model/drift"]["clips"] == 1 and report["text"]["ground_truth/drift"]["g_abs_err"] < 2.0
    assert len(report["frames"]["curves"]["copy_last"]) == 4  # 5 frames, 1 given
    assert (out / "position_error.png").stat().st_size > 1000
    assert "| model/id |" in (out / "report.md").read_text()
    use = report["conditioning_use"]  # 2 parabola scenes (at least two, to swap frames between)
    assert use["scenes"] == 2 and use["k_latent"] == 1 and len(use["own"]) == len(use["sigmas"]) == 5
    assert "Does the model use its conditioning frames?" in (out / "report.md").read_text()
    assert report["samples"] == {"file": "samples.png", "scenes": ["parabola/id"],
                                 "rows": ["truth", "vae_roundtrip", "model"]}
    from PIL import Image

    sheet = np.asarray(Image.open(out / "samples.png"))
    video = json.loads((tiny_runs["root"] / "dit" / "run.json").read_text())["video"]
    h, w = (video["size"],) * 2 if isinstance(video["size"], int) else video["size"]
    assert sheet.shape == (3 * h, video["frames"] * w + 2, 3)  # truth, roundtrip, model; the bar after 1 given frame
    assert (sheet[:, w:w + 2] == 255).all() and "samples.png" in (out / "report.md").read_text()
    # --sample-seed re-scores the same scenes with other sampler noise; the two reports pair up scene by scene.
    again = tmp_path / "bench_noise1"
    assert main(["eval-physics", "--checkpoint", str(tiny_runs["dit_cfg"].workdir), "--out", str(again),
                 "--per-split", "1", "--families", "parabola", "--splits", "id", "--cond-frames", "1",
                 "--protocols", "frames", "--phyworld-scenes", "0", "--steps", "2", "--sample-seed", "1"]) == 0
    rows0, rows1 = report["frames"]["scenes"], json.loads((again / "report.json").read_text())["frames"]["scenes"]
    truth0, truth1 = ([r for r in rows if r["method"] == "ground_truth"] for rows in (rows0, rows1))
    assert [r["scene"] for r in truth0] == [r["scene"] for r in truth1] and truth0 == truth1
    model0, model1 = ([r for r in rows if r["method"] == "model"] for rows in (rows0, rows1))
    assert len(model0) == len(model1) == 1 and model0[0]["psnr"] != model1[0]["psnr"]
    capsys.readouterr()
    assert main(["eval-physics-compare", str(out), str(again), "--json", str(tmp_path / "cmp.json")]) == 0
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["shared_scenes"] == 1 and "| id | 1 |" in capsys.readouterr().out
    np.testing.assert_allclose(cmp["groups"]["id"]["pos_err_px"]["diff"],
                               model0[0]["pos_err_px"] - model1[0]["pos_err_px"])
    capsys.readouterr()
    assert main(["eval-physics", "--out", str(out), "--families", "tennis"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tennis" in err[0]
    assert main(["eval-physics", "--out", str(out), "--cond-frames", "17", "--phyworld-scenes", "0"]) != 0
    assert "none left to predict" in capsys.readouterr().err


def test_vae_roundtrip_is_the_whole_clip_through_the_vae(tiny_runs):
    """The VAE-ceiling predictor decodes the training latents of the true clip, as one unchunked pass does."""
    from sora_jax.data.pipeline import uint8_to_float
    from sora_jax.data.video import to_uint8
    from sora_jax.eval.physics_bench import vae_roundtrip_predictor
    from sora_jax.pipeline import TextToVideo
    from sora_jax.train.vae_trainer import _reconstruct

    t2v = TextToVideo.load(tiny_runs["dit_cfg"].workdir)
    video = t2v.defaults["video"]
    scene = make_scenes(SceneSpec(families=("parabola",), splits=("id",), per_split=1, size=video["size"],
                                  frames=video["frames"]))[0]
    got = vae_roundtrip_predictor(t2v.vae, t2v.vae_params)(scene, 1)
    assert got.dtype == np.uint8 and got.shape == scene["video"].shape
    # The VAE trainer's held-out reconstruction: the whole clip in one unchunked encode(mean) -> decode.
    want = to_uint8(np.asarray(_reconstruct(t2v.vae, t2v.vae_params, uint8_to_float(scene["video"])[None]))[0])
    # Chunked against whole-clip convolutions: float32 reassociation moves a value by at most one level.
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
    assert np.mean(got != scene["video"]) > 0.01  # a real (lossy) codec, not the clip passed through


def test_cli_eval_physics_scores_a_vae_alone(tiny_runs, tmp_path, capsys):
    """--vae without a DiT: baselines plus the VAE-ceiling row, its sample sheet; a bad folder is one line."""
    from sora_jax.cli import main

    out = tmp_path / "vae_only"
    rc = main(["eval-physics", "--vae", str(tiny_runs["root"] / "vae"), "--out", str(out), "--per-split", "1",
               "--families", "uniform", "--splits", "id", "--cond-frames", "1", "--protocols", "frames",
               "--phyworld-scenes", "0", "--size", "32", "--frames", "5"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rt, truth = report["frames"]["by_split"]["vae_roundtrip/id"], report["frames"]["by_split"]["ground_truth/id"]
    assert rt["clips"] == 1 and rt["psnr"] < truth["psnr"]  # lossy: below the true clip's own score
    assert report["vae"].endswith("vae") and report["checkpoint"] is None and "model/id" not in report["frames"]["by_split"]
    assert report["samples"]["rows"] == ["truth", "vae_roundtrip"]
    capsys.readouterr()
    assert main(["eval-physics", "--vae", str(tmp_path), "--out", str(out), "--phyworld-scenes", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vae_config.json" in err[0]


def test_conditioning_use_on_tiny_checkpoint(tiny_runs):
    """The latent diagnostic: reference MSEs from the true latents, own vs swapped frames, t0 holding."""
    from sora_jax.eval.conditioning_use import conditioning_use
    from sora_jax.models.dit import DiT
    from sora_jax.pipeline import TextToVideo

    t2v = TextToVideo.load(tiny_runs["dit_cfg"].workdir)
    video = t2v.defaults["video"]
    spec = SceneSpec(families=("uniform", "parabola"), splits=("id",), per_split=1, size=video["size"],
                     frames=video["frames"])
    scenes = make_scenes(spec)
    use = conditioning_use(t2v, scenes, 1, sigmas=(0.5, 0.95))
    z = np.concatenate([np.asarray(t2v.encode_video(s["video"])) for s in scenes])
    np.testing.assert_allclose(use["zeros"], np.mean(z[:, 1:] ** 2), rtol=1e-5)
    np.testing.assert_allclose(use["copy_last"], np.mean((z[:, :1] - z[:, 1:]) ** 2), rtol=1e-5)
    assert all(np.isfinite(use["own"] + use["other"]))
    assert not use["given_t0"]
    # Swapping a scene for itself changes nothing: the gap is exactly 0.
    same = conditioning_use(t2v, [scenes[0], scenes[0]], 1, sigmas=(0.5,))
    assert same["gap"] == [0.0]
    # A given_t0 run holds the given frames clean at timestep 0, which changes the network's estimate.
    # The 2-step tiny DiT barely responds to anything (zero-init head), so its weights are perturbed.
    leaves, tree = jax.tree_util.tree_flatten(t2v.dit_params)
    rng = np.random.default_rng(0)
    noisy = jax.tree_util.tree_unflatten(tree, [x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves])
    loud = dataclasses.replace(t2v, dit_params=noisy)
    plain = conditioning_use(loud, scenes, 1, sigmas=(0.95,))
    # Own frames without t0 are noised with the same eps as the rest, so the network input is just x_t
    # at one sigma: the MSE recomputed here straight from the DiT, without the conditioning code.
    eps = np.asarray(jax.random.normal(jax.random.key(0), z.shape))
    x = 0.05 * z + 0.95 * eps
    text, mask = t2v.encode_prompts([s["caption"] for s in scenes])
    v = np.asarray(DiT(t2v.dit_cfg).apply(noisy, x, np.full((len(scenes),), 950.0, np.float32), text, mask))
    np.testing.assert_allclose(plain["own"][0], np.mean((x - 0.95 * v - z)[:, 1:] ** 2), rtol=1e-4)
    t0 = conditioning_use(dataclasses.replace(loud, defaults={**t2v.defaults, "given_t0": True}), scenes, 1,
                          sigmas=(0.95,))
    assert t0["given_t0"] and abs(t0["own"][0] - plain["own"][0]) > 1e-4
    assert abs(plain["gap"][0]) > 1e-4  # the perturbed network depends on which frames it is given
    with pytest.raises(ValueError, match="at least 2 scenes"):
        conditioning_use(t2v, scenes[:1], 1)
    with pytest.raises(ValueError, match="no free latent frame"):
        conditioning_use(t2v, scenes, 2)


def test_sample_sheet_places_every_frame(tmp_path):
    """Scenes stack top to bottom, their rows touch, frames run left to right, a white bar after the given ones."""
    from PIL import Image

    from sora_jax.eval.physics_report import sample_sheet

    rng = np.random.default_rng(0)
    # Values below 255 everywhere, so the bar and the black scene gap cannot be mistaken for a frame.
    vids = {f"s{i}": {"truth": rng.integers(1, 250, (5, 8, 6, 3), np.uint8),
                      "model": rng.integers(1, 250, (5, 8, 6, 3), np.uint8)} for i in range(2)}
    sheet = np.asarray(Image.open(sample_sheet(vids, 2, tmp_path / "s.png")))
    assert sheet.shape == (2 * 2 * 8 + 2, 5 * 6 + 2, 3)
    for i, rows in enumerate(vids.values()):
        for j, video in enumerate(rows.values()):
            top = i * (2 * 8 + 2) + j * 8
            band = sheet[top:top + 8]
            np.testing.assert_array_equal(band[:, :12], np.concatenate(list(video[:2]), axis=1))
            assert (band[:, 12:14] == 255).all()
            np.testing.assert_array_equal(band[:, 14:], np.concatenate(list(video[2:]), axis=1))
    assert (sheet[16:18] == 0).all()


@pytest.fixture(scope="module")
def baseline_reports():
    """Baselines-only reports of 2 and 1 scenes per family and split (the second's scenes are the first's)."""
    from sora_jax.eval.physics_bench import BenchConfig, run_benchmark

    spec = SceneSpec(families=("uniform", "collision"), splits=("id", "ood_speed"), per_split=2)
    return [run_benchmark(BenchConfig(scenes=dataclasses.replace(spec, per_split=n), protocols=("frames",),
                                      phyworld_scenes=0)) for n in (2, 1)]


def test_per_scene_rows_match_the_summaries(baseline_reports):
    rows, by_split = baseline_reports[0]["frames"]["scenes"], baseline_reports[0]["frames"]["by_split"]
    for key, stats in by_split.items():
        method, split = key.split("/")
        group = [r for r in rows if r["method"] == method and r["split"] == split]
        assert len(group) == stats["clips"] == len({r["scene"] for r in group})
        for k in ("count_acc", "pos_err_px", "vel_err_px", "psnr"):
            np.testing.assert_allclose(np.nanmean([r[k] for r in group]), stats[k], rtol=1e-12)
    assert not any(isinstance(v, (list, np.ndarray)) for r in rows for v in r.values())  # curves dropped
    json.dumps(rows)  # plain JSON


def test_paired_comparison_of_reports(baseline_reports, tmp_path, capsys):
    from sora_jax.cli import main
    from sora_jax.eval.physics_bench import write_report
    from sora_jax.eval.physics_compare import compare_reports, render_markdown

    big, small = baseline_reports
    res = compare_reports(big, big, "copy_last", "resim_no_gravity")
    rows = big["frames"]["scenes"]
    for split in ("id", "ood_speed"):
        got = res["groups"][split]["pos_err_px"]
        a, b = ({r["scene"]: r["pos_err_px"] for r in rows if r["method"] == m and r["split"] == split}
                for m in ("copy_last", "resim_no_gravity"))
        d = np.array([a[s] - b[s] for s in a])
        assert got["pairs"] == len(d) == 4
        np.testing.assert_allclose([got["diff"], got["se"], got["a"] - got["b"]],
                                   [d.mean(), d.std(ddof=1) / np.sqrt(len(d)), d.mean()], rtol=1e-12)
    assert res["groups"]["id"]["pos_err_px"]["diff"] > 0  # re-simulation is near exact in distribution
    assert res["groups"]["collision/id"]["scenes"] == 2
    same = compare_reports(big, big, "copy_last", "copy_last")["groups"]["id"]["pos_err_px"]
    assert same["diff"] == 0 and same["se"] == 0
    # Pairing is by scene: the 1-per-split report's scenes are the first of the 2-per-split report's.
    sub = compare_reports(big, small, "copy_last", "copy_last")
    assert (sub["shared_scenes"], sub["only_a"], sub["only_b"]) == (4, 4, 0)
    assert sub["groups"]["id"]["pos_err_px"]["diff"] == 0
    # A report from before a metric existed still pairs on the others; the missing one shows as "–".
    legacy = json.loads(json.dumps(big))
    for r in legacy["frames"]["scenes"]:
        del r["phantom_colour"]
    res = compare_reports(big, legacy, "copy_last", "copy_last")
    assert res["groups"]["id"]["phantom_colour"]["pairs"] == 0 and res["groups"]["id"]["pos_err_px"]["pairs"] == 4
    assert "| id | 4 | 1.000 / 1.000 / +0.000 ± 0.000 | – |" in render_markdown(res)
    other = json.loads(json.dumps(small))
    other["config"]["scenes"]["frames"] = 9
    with pytest.raises(ValueError, match="frames 17 vs 9"):
        compare_reports(big, other)
    with pytest.raises(ValueError, match="no 'model' rows"):
        compare_reports(big, small)
    # The CLI: two --out folders; a report without per-scene rows is one line.
    write_report(json.loads(json.dumps(big)), tmp_path / "a")
    old = json.loads(json.dumps(small))
    del old["frames"]["scenes"]
    write_report(old, tmp_path / "old")
    assert main(["eval-physics-compare", str(tmp_path / "a"), str(tmp_path / "a"), "--method-a", "copy_last",
                 "--method-b", "resim_no_gravity"]) == 0
    assert "| collision/ood_speed | 2 |" in capsys.readouterr().out
    assert main(["eval-physics-compare", str(tmp_path / "a"), str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no per-scene rows" in err[0]
    assert main(["eval-physics-compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    assert "has no report.json" in capsys.readouterr().err


def _shifted(report: dict, method: str, deltas: dict[str, float]) -> dict:
    """A copy of `report` whose `method` rows have `deltas` added: a stand-in for another seed's run."""
    out = json.loads(json.dumps(report))
    for r in out["frames"]["scenes"]:
        if r["method"] == method:
            for k, d in deltas.items():
                r[k] += d
    return out


def test_recipe_comparison_over_seed_runs(baseline_reports, tmp_path, capsys):
    from sora_jax.cli import main
    from sora_jax.eval.physics_bench import write_report
    from sora_jax.eval.physics_compare import compare_reports, compare_runs, render_runs_markdown

    big = baseline_reports[0]
    base = {r["scene"]: r["pos_err_px"] for r in big["frames"]["scenes"] if r["method"] == "copy_last"}
    a = [_shifted(big, "copy_last", {"pos_err_px": d}) for d in (0.1, 0.3)]
    b = [_shifted(big, "copy_last", {"pos_err_px": d}) for d in (0.0, 0.0, 0.2)]
    res = compare_runs(a, b, "copy_last", "copy_last")
    assert (res["runs_a"], res["runs_b"], res["shared_scenes"]) == (2, 3, len(base))
    got = res["groups"]["id"]["pos_err_px"]
    m = np.mean([v for s, v in base.items() if s.split("/")[1] == "id"])
    np.testing.assert_allclose(got["a_runs"], [m + 0.1, m + 0.3], rtol=1e-12)
    np.testing.assert_allclose(got["b_runs"], [m, m, m + 0.2], rtol=1e-12)
    # Pooled run-to-run variance: (0.02 + 0.0267) / 3 degrees of freedom; t(0.975, 3) = 3.1824.
    sp2 = (2 * 0.1 ** 2 + 2 * (0.2 / 3) ** 2 + (0.4 / 3) ** 2) / 3
    se = np.sqrt(sp2 * (1 / 2 + 1 / 3))
    np.testing.assert_allclose([got["diff"], got["se"]], [0.2 - 0.2 / 3, se], rtol=1e-9)
    np.testing.assert_allclose(got["ci95"], [got["diff"] - 3.18245 * se, got["diff"] + 3.18245 * se], rtol=1e-5)
    assert got["df"] == 3 and got["ci95"][0] < 0 < got["ci95"][1]  # five runs' spread does not rank a 0.13 gap
    # The scene-paired error of one run against one run would call that same gap certain: it sees no seed noise.
    paired = compare_reports(a[1], b[0], "copy_last", "copy_last")["groups"]["id"]["pos_err_px"]
    assert paired["diff"] == pytest.approx(0.3) and paired["se"] < 1e-9
    # Untouched metrics agree exactly across runs.
    assert res["groups"]["id"]["count_acc"]["diff"] == 0 and res["groups"]["id"]["count_acc"]["se"] == 0
    # A scene one run could not score leaves that metric, for every run, and no other.
    holed = json.loads(json.dumps(b[2]))
    hole = next(r for r in holed["frames"]["scenes"] if r["method"] == "copy_last" and r["split"] == "id")
    hole["vel_err_px"] = float("nan")
    res2 = compare_runs(a, b[:2] + [holed], "copy_last", "copy_last")["groups"]["id"]
    assert res2["vel_err_px"]["scenes"] == res2["pos_err_px"]["scenes"] - 1 == res2["scenes"] - 1
    # One run a side has no spread to judge by: the difference, no error.
    one = compare_runs(a[:1], b[:1], "copy_last", "copy_last")["groups"]["id"]["pos_err_px"]
    assert one["df"] == 0 and np.isnan(one["se"]) and one["diff"] == pytest.approx(0.1)
    md = render_runs_markdown(res, ["s0", "s1"], ["s0", "s1", "s2"])
    assert "A (2 runs, copy_last) vs B (3 runs, copy_last)" in md and "| B3 s2 | id | 1.000 |" in md
    assert "3 degrees of freedom" in md and res["df"] == 3
    bad = json.loads(json.dumps(b[1]))
    bad["config"]["scenes"]["size"] = 32
    with pytest.raises(ValueError, match="report B2 scored a different setup"):
        compare_runs(a, [b[0], bad], "copy_last", "copy_last")
    # The CLI: comma-separated folders on a side compare recipes; an empty side is one line.
    for name, r in zip(("a1", "a2", "b1", "b2", "b3"), a + b):
        write_report(r, tmp_path / name)
    runs_a, runs_b = (",".join(str(tmp_path / n) for n in names) for names in (("a1", "a2"), ("b1", "b2", "b3")))
    assert main(["eval-physics-compare", runs_a, runs_b, "--method-a", "copy_last", "--method-b", "copy_last",
                 "--json", str(tmp_path / "runs.json")]) == 0
    assert "# Recipe comparison: A (2 runs" in capsys.readouterr().out
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert saved["groups"]["id"]["pos_err_px"]["df"] == 3 and len(saved["b"]) == 3
    assert main(["eval-physics-compare", ",", runs_b]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least one report on each side" in err[0]


def test_world_cue_reads_gravity_off_the_conditioning_frames():
    from sora_jax.data.physics import PhysicsConfig, simulate_state
    from sora_jax.eval.physics_metrics import contact_free
    from sora_jax.eval.world_cue import conditioning_gravity, world_cue_report, world_cue_rows

    spec = SceneSpec(splits=("id",), per_split=2)
    # A fake "VAE" that blanks the frames: no ball is seen, so no world can be read (NaN, never "falls").
    rows = world_cue_rows(spec, 5, roundtrip=np.zeros_like)
    free = [r for r in rows if r["gravity_px"] == 0]
    falling = [r for r in rows if r["gravity_px"] > 0 and r["family"] == "multi"]
    assert free and falling
    assert all(abs(r["g_truth"]) < 5 for r in free), free
    assert all(abs(r["g_truth"] - r["gravity_px"]) < 5 for r in falling), falling
    assert all(np.isnan(r["g_vae"]) for r in rows)
    result, table = world_cue_report(rows, 64.0)
    assert result["accuracy"]["g_truth"]["uniform"] == result["accuracy"]["g_truth"]["collision"] == 1.0
    assert result["accuracy"]["g_vae"]["uniform"] == 1.0 and result["accuracy"]["g_vae"]["multi"] == 0.0
    assert "VAE roundtrip" in table
    scene = make_scenes(SceneSpec(families=("parabola",), splits=("id",), per_split=1))[0]
    flipped = scene["video"][:5, ::-1]  # upside down: the ball now rises against gravity
    assert conditioning_gravity(flipped, scene["colors"], scene["dt"]) < -30
    with pytest.raises(ValueError, match="at least 3 conditioning frames"):
        world_cue_rows(spec, 2)
    # A ball that hits the floor between given frames 2 and 3 spoils two of the three second
    # differences, so their median reads it as rising; frames where it may touch the floor are left out.
    cfg = PhysicsConfig(size=64, frames=5)
    for y0 in (0.76, 0.77):
        clip = simulate_state(np.array([[0.4, y0]]), np.array([[0.3, 0.8]]), np.array([0.1]), np.array([0]), cfg)
        got = parse_video(clip["video"], np.array([0]))
        assert gravity_estimate(got["xy"], cfg.dt) < -300  # every triple kept: the bounce decides
        assert contact_free(got["xy"], got["area"], 64)[:, 0].tolist() == [True, True, False, False, True]
        assert abs(conditioning_gravity(clip["video"], np.array([0]), cfg.dt) - 64.0) < 5


def test_cli_text_protocol_baselines_cover_both_worlds(tmp_path, capsys):
    from sora_jax.cli import main

    rc = main(["eval-physics", "--out", str(tmp_path), "--protocols", "text", "--text-prompts", "2",
               "--phyworld-scenes", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "matplotlib" not in out, out  # a text-only report has no plot to miss
    text = json.loads((tmp_path / "report.json").read_text())["text"]
    assert text["ground_truth"]["g_rel_err"] < 0.05 and text["ground_truth/drift"]["g_abs_err"] < 2.0
    assert text["ground_truth/drift"]["clips"] == 2 and "| ground_truth/drift |" in out


def test_gravity_fit_reads_a_noisy_track_far_better_than_second_differences():
    dt, g = 1 / 16, 64.0
    t = np.arange(12) * dt
    rng = np.random.default_rng(0)
    fit_err, dd_err = [], []
    for _ in range(40):
        y = 20 + 30 * t + 0.5 * g * t**2 + rng.normal(0, 0.3, t.size)  # 0.3 px of parse noise
        xy = np.stack([np.full_like(y, 30.0), y], -1)[:, None]  # [T, 1, 2]
        fit_err.append(abs(gravity_fit(xy, dt) - g))
        dd_err.append(abs(gravity_estimate(xy, dt) - g))
    assert np.median(fit_err) < 10 and np.median(fit_err) < 0.25 * np.median(dd_err), (fit_err, dd_err)
    # A bounce (an invalid centre) splits the track: each side is fitted alone, neither across it.
    y = np.concatenate([50 + 0.5 * g * t[:6] ** 2, 50 - 20 * t[:6] + 0.5 * g * t[:6] ** 2])
    xy = np.stack([np.zeros_like(y), y], -1)[:, None]
    valid = np.ones((12, 1), bool)
    valid[5:7] = False
    assert abs(gravity_fit(xy, dt, valid) - g) < 1e-6
    assert abs(gravity_fit(xy, dt) - g) > 20  # fitted across the jump
    assert np.isnan(gravity_fit(np.full((5, 1, 2), np.nan), dt))
