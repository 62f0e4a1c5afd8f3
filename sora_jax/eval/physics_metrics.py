"""Pixel-only world-model metrics: parse frames into ball tracks, score them against the simulator.

No pretrained network is involved: every frame is parsed by nearest-palette segmentation with
coverage-weighted centroids and areas (`sora_jax.eval.physics.detect_balls`), and balls are
identified by colour (distinct within a scene). Scores of a prediction are taken on the frames it
had to predict (index >= cond_frames). Applied to the true video itself the same code gives the
*parse floor*: errors that come from parsing at finite resolution, not from the model.
"""

from __future__ import annotations

import re

import numpy as np

from sora_jax.data.physics import (BACKGROUND, COLOR_NAMES, DX_THRESHOLD, ZERO_GRAVITY_WORDS, PhysicsConfig,
                                   parse_caption)
from sora_jax.eval.physics import dilate, detect_balls
from sora_jax.eval.video import psnr, ssim

# Pixels this far (RGB distance) from the background count as "object" for the foreground mask.
_OBJECT_DIST = 40.0
# Dilation (pixels) of object masks: foreground PSNR sees the rim and a little of the surround.
_FG_DILATE = 2
# A true second difference further than this (px) from g dt^2 marks a bounce or collision.
_EVENT_TOL_PX = 0.01
WORLD_THRESHOLD = 0.5  # of the training gravity: an estimate above it reads as the falling world
ERROR_KEYS = ("pos_err_px", "vel_err_px", "area_drift", "g_abs_err", "g_rel_err", "momentum_change",
              "energy_change")


def _phantom_rate(seen: list[set[str]], scene_colours: set[str]) -> float:
    """Fraction of frames showing a blob of a colour outside `scene_colours`."""
    return float(np.mean([bool(c - scene_colours) for c in seen]))


def parse_video(video: np.ndarray, colors: np.ndarray, *, background=BACKGROUND, **kwargs) -> dict:
    """Tracks of the balls of `colors` [M] (-1: padding) in video [T,H,W,3].

    Returns xy [T,M,2] and area [T,M] of the largest blob of each ball's colour (nan if none),
    count [T] (all blobs), colours [T] (sets of colour names seen) and rgb_err [T] (the mean over a
    frame's blobs of their core's distance from their palette colour; nan if none).
    """
    video, colors = np.asarray(video), np.asarray(colors)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video [T,H,W,3], got shape {video.shape}")
    t_len, m = video.shape[0], colors.shape[0]
    xy = np.full((t_len, m, 2), np.nan)
    area = np.full((t_len, m), np.nan)
    count = np.zeros(t_len, np.int64)
    rgb_err = np.full(t_len, np.nan)
    seen = []
    for t, frame in enumerate(video):
        blobs = detect_balls(frame, background=background, **kwargs)
        count[t] = len(blobs)
        seen.append({b["color"] for b in blobs})
        if blobs:
            rgb_err[t] = np.mean([b["rgb_err"] for b in blobs])
        largest: dict[str, dict] = {}
        for b in blobs:  # by decreasing area
            largest.setdefault(b["color"], b)
        for k in range(m):
            b = largest.get(COLOR_NAMES[int(colors[k])]) if colors[k] >= 0 else None
            if b is not None:
                xy[t, k] = b["x"], b["y"]
                area[t, k] = b["area"]
    return {"xy": xy, "area": area, "count": count, "colors": seen, "rgb_err": rgb_err}


def _object_mask(video: np.ndarray, background) -> np.ndarray:
    """[T,H,W] pixels away from the background colour, dilated by _FG_DILATE."""
    d = np.linalg.norm(np.asarray(video, np.float32) - np.asarray(background, np.float32), axis=-1)
    mask = d > _OBJECT_DIST
    for _ in range(_FG_DILATE):
        mask = np.stack([dilate(f) for f in mask])
    return mask


def _masked_psnr(pred: np.ndarray, true: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, uint8 range) over the pixels of mask [T,H,W]; nan on an empty mask."""
    if not mask.any():
        return float("nan")
    diff = np.asarray(pred, np.float64)[mask] - np.asarray(true, np.float64)[mask]
    return float(10 * np.log10(255.0**2 / max(np.mean(np.square(diff)), 1e-20)))


def flicker(video: np.ndarray, still: np.ndarray) -> float:
    """Mean temporal std (0-255 units) of the luminance over the `still` background pixels [H,W]."""
    if not still.any() or len(video) < 2:
        return float("nan")
    lum = np.asarray(video, np.float64).mean(-1)  # [T, H, W]
    return float(lum.std(axis=0)[still].mean())


def _jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def gravity_estimate(xy: np.ndarray, dt: float, valid: np.ndarray | None = None) -> float:
    """ĝ (px/s^2, +y down): median of second differences of y over frames and balls; nan if none.

    `xy` [T,M,2] may hold nans (misses); `valid` [T,M] marks the triples centred at t that may be used.
    """
    y = xy[..., 1]
    dd = (y[2:] - 2 * y[1:-1] + y[:-2]) / dt**2  # [T-2, M], centred at t = 1..T-2
    if valid is not None:
        dd = np.where(valid[1:-1], dd, np.nan)
    dd = dd[np.isfinite(dd)]
    return float(np.median(dd)) if dd.size else float("nan")


def contact_free(xy: np.ndarray, area: np.ndarray, size: int) -> np.ndarray:
    """[T, M] bool: whether ball m at frame t is farther from floor, ceiling and other balls than it moves in a frame.

    From parsed tracks alone (radius from area): a triple centred on a frame where a ball may touch the
    floor, the ceiling or another ball holds a bounce's velocity jump, not gravity.
    """
    r = np.sqrt(area / np.pi)
    step = np.linalg.norm(np.diff(xy, axis=0), axis=-1)  # [T-1, M]
    reach = np.fmax(np.pad(step, ((1, 0), (0, 0)), constant_values=np.nan),
                    np.pad(step, ((0, 1), (0, 0)), constant_values=np.nan)) + 1.0  # px, +1 for the rim
    # Side walls flip only the horizontal velocity, which ĝ does not use.
    gap = np.minimum(xy[..., 1], size - xy[..., 1]) - r
    for j in range(xy.shape[1]):
        apart = np.linalg.norm(xy - xy[:, j:j + 1], axis=-1) - r - r[:, j:j + 1]  # [T, M]
        apart[:, j] = np.inf
        gap = np.fmin(gap, apart)
    with np.errstate(invalid="ignore"):
        return gap > reach


def gravity_fit(xy: np.ndarray, dt: float, valid: np.ndarray | None = None) -> float:
    """ĝ (px/s², +y down) from a parabola fitted to each run of usable frames of each ball; nan if none.

    Usable as in `gravity_estimate`: triples centred at t that `valid` [T,M] allows, with the ball seen
    in all three. Each run of consecutive usable centres c..d gives one least-squares fit over frames
    c-1..d+1; the estimate is the median over runs weighted by n^5 for n frames, as a fitted
    curvature's variance falls with n^5. Far less noisy than second differences: parse noise of 0.2 px
    is ~50 px/s² in one second difference at 16 frames/s.
    """
    y = xy[..., 1]
    seen = np.isfinite(y)
    usable = np.zeros_like(seen)
    usable[1:-1] = seen[:-2] & seen[1:-1] & seen[2:]
    if valid is not None:
        usable &= valid
    g, w = [], []
    for m in range(y.shape[1]):
        centres = np.flatnonzero(usable[:, m])
        for run in np.split(centres, np.flatnonzero(np.diff(centres) > 1) + 1):
            if run.size:
                frames = np.arange(run[0] - 1, run[-1] + 2)
                g.append(2.0 * np.polyfit(frames.astype(np.float64), y[frames, m], 2)[0] / dt**2)
                w.append(float(frames.size) ** 5)
    if not g:
        return float("nan")
    order = np.argsort(g)
    cum = np.cumsum(np.asarray(w)[order])
    return float(np.asarray(g)[order][np.searchsorted(cum, 0.5 * cum[-1])])


def train_gravity_px(size: int) -> float:
    """The training clips' gravity (`PhysicsConfig().gravity`, frame sides / s²) in px/s² on a `size`-px frame."""
    return PhysicsConfig().gravity * size


def right_world(g_hat: float, gravity_px: float, train_gravity_px: float) -> float:
    """1.0 if a gravity estimate (px/s²) puts a clip in its scene's world, 0.0 if in the other one, nan without one.

    A clip reads as falling when the estimate exceeds `WORLD_THRESHOLD` of the training gravity.
    """
    if not np.isfinite(g_hat):
        return float("nan")
    return float((g_hat > WORLD_THRESHOLD * train_gravity_px) == (gravity_px > 0))


def _free_flight(true_xy: np.ndarray, g_px: float, dt: float) -> np.ndarray:
    """[T,M] True where the simulator's trajectory around frame t is free flight (no bounce, no collision)."""
    dd = true_xy[2:] - 2 * true_xy[1:-1] + true_xy[:-2]  # [T-2, M, 2]
    expect = np.array([0.0, g_px * dt**2])
    ok = np.all(np.abs(dd - expect) < _EVENT_TOL_PX, axis=-1)
    out = np.zeros(true_xy.shape[:2], bool)
    out[1:-1] = ok
    return out


def _collision_change(xy, area, true_xy, n, g_px, dt, first) -> tuple[float, float]:
    """Relative momentum and energy change across the first ball-ball collision of a 2-ball clip.

    Velocities come from the parsed tracks on the last clean interval before the event and the first
    clean one after it; masses are parsed areas (equal-density discs). nan if the event is not in the
    scored frames or a ball is missing there.
    """
    if n != 2:
        return float("nan"), float("nan")
    free = _free_flight(true_xy[:, :n], g_px, dt)
    both = ~free[1:-1, 0] & ~free[1:-1, 1]  # an event changes both balls' velocity
    if not both.any():
        return float("nan"), float("nan")
    c = int(np.argmax(both)) + 1
    end = c
    while end + 1 < len(true_xy) - 1 and not free[end + 1, :n].all():
        end += 1
    pre, post = (c - 1, c), (end, end + 1)
    if pre[0] < first or post[1] >= len(xy):
        return float("nan"), float("nan")
    v_pre = (xy[pre[1], :n] - xy[pre[0], :n]) / dt
    v_post = (xy[post[1], :n] - xy[post[0], :n]) / dt
    with np.errstate(invalid="ignore"):
        mass = np.nanmean(np.where(np.isfinite(area[first:, :n]), area[first:, :n], np.nan), axis=0) \
            if np.isfinite(area[first:, :n]).any(axis=0).all() else np.full(n, np.nan)
    if not (np.isfinite(v_pre).all() and np.isfinite(v_post).all() and np.isfinite(mass).all()):
        return float("nan"), float("nan")
    scale = np.sum(mass * np.linalg.norm(v_pre, axis=-1))
    dp = np.linalg.norm(np.sum(mass[:, None] * (v_post - v_pre), axis=0)) / max(scale, 1e-9)
    e_pre = np.sum(mass * np.sum(v_pre**2, -1)) / 2
    e_post = np.sum(mass * np.sum(v_post**2, -1)) / 2
    return float(dp), float(abs(e_post - e_pre) / max(e_pre, 1e-9))


def clip_metrics(
    pred: np.ndarray, scene: dict, cond_frames: int, *, truth: dict | None = None, background=BACKGROUND
) -> dict:
    """Frame-conditioned scores of pred [T,H,W,3] uint8 against a scene (frames >= cond_frames).

    `truth` is `parse_video` of the scene's video (computed when not given; pass it to parse the
    ground truth once for many predictions).
    """
    true_video = np.asarray(scene["video"])
    pred = np.asarray(pred)
    if pred.shape != true_video.shape or pred.dtype != np.uint8:
        raise ValueError(f"prediction must be uint8 {true_video.shape}, got {pred.dtype} {pred.shape}")
    t_len = len(true_video)
    if not 1 <= cond_frames < t_len:
        raise ValueError(f"cond_frames must be in [1, {t_len - 1}] for {t_len}-frame scenes, got {cond_frames}")
    colors, n, dt, g_px = scene["colors"], int(scene["num_balls"]), float(scene["dt"]), float(scene["gravity_px"])
    truth = truth if truth is not None else parse_video(true_video, colors, background=background)
    got = parse_video(pred, colors, background=background)
    k0 = cond_frames
    true_xy = np.asarray(scene["positions"], np.float64)[:, :n]
    xy, area = got["xy"][:, :n], got["area"][:, :n]

    err = np.linalg.norm(xy[k0:] - true_xy[k0:], axis=-1)  # [T-K, n], nan = miss
    pos_err_t = np.array([_nanmean(row) for row in err])
    v_pred = np.diff(xy[k0:], axis=0)
    v_true = np.diff(true_xy[k0:], axis=0)
    vel_err = np.linalg.norm(v_pred - v_true, axis=-1)
    ref_colours = set().union(*truth["colors"][:k0])
    ref_area = np.nanmean(truth["area"][:k0, :n], axis=0)
    drift = np.abs(area[k0:] / ref_area - 1.0)

    free = _free_flight(true_xy, g_px, dt)
    valid = free.copy()
    valid[: k0 + 1] = False  # the whole triple must be predicted frames
    g_hat = gravity_estimate(xy, dt, valid)
    # Only the collision family is gravity-free with two balls: elsewhere walls and gravity also
    # change momentum, and a simultaneous bounce of both balls would pass for a collision.
    if scene.get("family") == "collision":
        dp, de = _collision_change(xy, area, true_xy, n, g_px, dt, k0)
    else:
        dp, de = float("nan"), float("nan")

    true_obj = _object_mask(true_video, background)
    pred_obj = _object_mask(pred, background)
    still = ~true_obj.any(axis=0)
    fg = (true_obj | pred_obj)[k0:]
    p_f, t_f = pred[k0:].astype(np.float64), true_video[k0:].astype(np.float64)
    return {
        "n": n,
        "count_acc": float(np.mean(got["count"][k0:] == n)),
        # Which way the count is wrong: extra blobs (a ball torn apart, a ghost) or too few (a ball lost
        # or two fused into one blob of a colour).
        "count_over": float(np.mean(got["count"][k0:] > n)),
        "count_under": float(np.mean(got["count"][k0:] < n)),
        # Frames with a blob in a colour no ball of the scene has. On physics_balls the palette holds
        # blends of its own colours (red + blue reads as magenta), so a decoder that smears two
        # touching balls together shows up here, apart from a ball torn in two (count_over only).
        "phantom_colour": _phantom_rate(got["colors"][k0:], {COLOR_NAMES[int(c)] for c in colors[:n]}),
        "color_jaccard": float(np.mean([_jaccard(c, ref_colours) for c in got["colors"][k0:]])),
        # How far the balls' own colour is off (RGB units). A ball decoded in the wrong shade is read
        # as a neighbouring palette colour on its rim, where the shade mixes with the background, so
        # a drifting decoder shows extra blobs (a magenta ball with a red rim) while its cores still
        # parse as the right colour.
        "colour_err": _nanmean(got["rgb_err"][k0:]),
        "area_drift": _nanmean(drift),
        "pos_err_px": _nanmean(err),
        "pos_err_t": pos_err_t,
        "miss_rate": float(np.mean(~np.isfinite(err))),
        "vel_err_px": _nanmean(vel_err),
        "g_hat": g_hat,
        "g_abs_err": abs(g_hat - g_px) if np.isfinite(g_hat) else float("nan"),
        "g_rel_err": abs(g_hat - g_px) / g_px if g_px > 0 and np.isfinite(g_hat) else float("nan"),
        # A fit spans its run, so a bounce of the prediction's own (where the truth flies free) must go too.
        "world_acc": right_world(gravity_fit(xy, dt, valid & contact_free(xy, area, pred.shape[2])), g_px,
                                 train_gravity_px(pred.shape[2])),
        "momentum_change": dp,
        "energy_change": de,
        "flicker": flicker(pred[k0:], still),
        "psnr": psnr(p_f, t_f, data_range=255.0),
        "ssim": ssim(p_f, t_f, 255.0, min_value=0.0) if min(pred.shape[1:3]) >= 11 else float("nan"),
        "fg_psnr": _masked_psnr(p_f, t_f, fg),
    }


_MOTION_RE = re.compile(r";\s*the ([a-z]+) ball ([a-z]+)(?: to the (left|right))?(?: " + ZERO_GRAVITY_WORDS + r")?\s*$")


def caption_motion(caption: str) -> tuple[str, str, str | None]:
    """(described colour, verb: falls/rises/bounces, horizontal direction left/right/None) of a caption."""
    m = _MOTION_RE.search(caption.lower())
    if m is None:
        raise ValueError(f"caption does not name a motion ('; the <colour> ball <verb> ...'): {caption!r}")
    return m.group(1), m.group(2), m.group(3)


def text_metrics(video: np.ndarray, caption: str, *, dt: float, gravity_px: float, background=BACKGROUND) -> dict:
    """Text-conditioned scores of a generated clip [T,H,W,3] uint8: count, colours, direction, physics."""
    video = np.asarray(video)
    want_n, names = parse_caption(caption)
    colour, verb, horizontal = caption_motion(caption)
    want = set(names)
    colors = np.array([COLOR_NAMES.index(c) for c in names], np.int32)
    got = parse_video(video, colors, background=background)
    k = names.index(colour)
    track = got["xy"][:, k]
    seen = np.isfinite(track[:, 0])
    direction_ok = float("nan")
    if seen.sum() >= 2:
        first, last = track[seen][0], track[seen][-1]
        dx = (last[0] - first[0]) / video.shape[2]
        got_h = "right" if dx > DX_THRESHOLD else "left" if dx < -DX_THRESHOLD else None
        direction_ok = float(got_h == horizontal)
    obj = _object_mask(video, background)
    area = got["area"]
    g_hat = gravity_estimate(got["xy"], dt)
    return {
        "n": want_n,
        "count_acc": float(np.mean(got["count"] == want_n)),
        "count_over": float(np.mean(got["count"] > want_n)),
        "count_under": float(np.mean(got["count"] < want_n)),
        "phantom_colour": _phantom_rate(got["colors"], want),
        "color_jaccard": float(np.mean([_jaccard(c, want) for c in got["colors"]])),
        "colour_err": _nanmean(got["rgb_err"]),
        "direction_acc": direction_ok,
        "area_drift": _nanmean(np.abs(area[1:] / area[:1] - 1.0)),
        "g_hat": g_hat,
        "g_abs_err": abs(g_hat - gravity_px),
        "g_rel_err": float("nan") if gravity_px <= 0 else abs(g_hat - gravity_px) / gravity_px,
        # No simulator to say where the balls fly freely: leave out frames where they may touch.
        "world_acc": right_world(gravity_fit(got["xy"], dt, contact_free(got["xy"], got["area"], video.shape[2])),
                                 gravity_px, train_gravity_px(video.shape[2])),
        "flicker": flicker(video, ~obj.any(axis=0)),
        "verb": verb,
    }


def summarize(rows: list[dict], keys: tuple[str, ...] | None = None) -> dict[str, float]:
    """nan-aware means of the scalar metrics over clips (keys: every numeric field of any row)."""
    if not rows:
        return {}
    keys = keys or tuple(dict.fromkeys(k for r in rows for k, v in r.items()
                                       if isinstance(v, (float, int)) and k != "n"))
    return {k: _nanmean([r.get(k, np.nan) for r in rows]) for k in keys} | {"clips": len(rows)}


def floor_multiples(model: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """Each error metric of `model` divided by the same metric on the true video (the parse floor)."""
    return {k: model[k] / floor[k] if floor.get(k, 0) > 0 and np.isfinite(model.get(k, np.nan)) else float("nan")
            for k in ERROR_KEYS if k in model}
