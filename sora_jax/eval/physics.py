"""Physics metrics for generated bouncing-ball videos: find the balls, compare with the prompt.

Segmentation is nearest-colour against the dataset's palette plus background, gated by a
colour-distance threshold (blurry generated frames have washed-out rims), followed by
connected components so that stray specks below `min_area` pixels are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sora_jax.data.physics import BACKGROUND, COLOR_NAMES, PALETTE_RGB, parse_caption

def _to_rgb255(frame: np.ndarray) -> np.ndarray:
    """uint8 [0,255] or float [-1,1] -> float32 [0,255]."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected a frame [H,W,3], got shape {frame.shape}")
    if np.issubdtype(frame.dtype, np.floating):
        return (np.clip(frame.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
    return frame.astype(np.float32)


def _components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels -> component id per pixel (-1: none)."""
    h, w = cls.shape
    big = h * w
    ids = np.where(cls >= 0, np.arange(h * w).reshape(h, w), big)
    # Min-label propagation: iterations ~ component diameter, each a few vectorised ops.
    while True:
        new = ids.copy()
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            nb_ids = np.roll(ids, shift, axis=axis)
            nb_cls = np.roll(cls, shift, axis=axis)
            # np.roll wraps around: blank the wrapped row/column.
            edge = [slice(None), slice(None)]
            edge[axis] = 0 if shift == 1 else -1
            nb_cls = nb_cls.copy()
            nb_cls[tuple(edge)] = -1
            same = (nb_cls == cls) & (cls >= 0)
            np.minimum(new, np.where(same, nb_ids, big), out=new)
        # Pointer jumping (a pixel adopts its label's label): log-depth instead of diameter.
        flat = np.append(new.ravel(), big)
        for _ in range(2):
            flat = flat[flat]
        new = flat[:-1].reshape(h, w)
        if np.array_equal(new, ids):
            return np.where(cls >= 0, ids, -1)
        ids = new


def _refs(background: tuple[int, int, int]) -> np.ndarray:
    """Reference colours for nearest-colour labelling: background first, so label k > 0 is palette k - 1."""
    return np.concatenate([np.asarray([background], np.float32), PALETTE_RGB], axis=0)


def dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbour binary dilation by one pixel (no wrap-around)."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def detect_balls(
    frame: np.ndarray,
    *,
    max_dist: float = 100.0,
    min_area: int | None = None,
    background: tuple[int, int, int] = BACKGROUND,
    weighted: bool = True,
) -> list[dict]:
    """Finds palette-coloured blobs in one frame: [{color, x, y, area, pixels, edge, rgb_err}] by decreasing area.

    Pixels are labelled by nearest colour (gated by `max_dist`) and grouped into 4-connected
    components; `pixels` counts a component's labelled pixels and gates it against `min_area`.
    Centroid and `area` are coverage-weighted over the component grown by one pixel: a pixel's
    coverage is its position on the background -> colour line, so the anti-aliased rim (mostly
    labelled background) counts with its fraction. At finite resolution that is what makes the
    centroid sub-pixel accurate. `edge` is True when the blob touches the frame border (its
    centroid is then biased inwards). `weighted=False` gives the plain centroid and pixel count of
    the labelled pixels instead (a hard-mask parse, as simpler pipelines use). `rgb_err` is the RGB
    distance (0-255 units) from the blob's palette colour to the mean of its core: its labelled
    pixels less a one-pixel border, so the anti-aliased rim does not count (all of them if nothing
    is left).
    """
    rgb = _to_rgb255(frame)
    h, w = rgb.shape[:2]
    if min_area is None:
        # ~10% of the smallest simulated ball (radius 0.08 of the side => ~2% of the frame).
        min_area = max(3, int(0.002 * h * w))
    refs = _refs(background)
    d2 = np.square(rgb[:, :, None, :] - refs[None, None]).sum(-1)
    label = np.argmin(d2, axis=-1)
    dist = np.sqrt(np.take_along_axis(d2, label[..., None], axis=-1)[..., 0])
    cls = np.where((label > 0) & (dist <= max_dist), label - 1, -1)
    comp = _components(cls)
    on = comp >= 0
    if not on.any():
        return []
    ids, inverse, pixels = np.unique(comp[on], return_inverse=True, return_counts=True)
    colour = np.zeros(len(ids), np.int64)
    colour[inverse] = cls[on]
    bg = refs[0]
    direction = PALETTE_RGB - bg  # [P, 3]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    balls = []
    for i in np.nonzero(pixels >= min_area)[0]:
        c = int(colour[i])
        own = comp == ids[i]
        if weighted:
            grown = dilate(own) & (own | ~on)  # the rim, but never another blob's pixels
            cover = np.clip((rgb - bg) @ direction[c] / float(direction[c] @ direction[c]), 0.0, 1.0)
            wgt = np.where(grown, cover, 0.0)
        else:
            wgt = own.astype(np.float64)
        area = float(wgt.sum())
        if area <= 0.0:
            continue
        core = own & ~dilate(~own)
        core = core if core.any() else own
        balls.append({
            "color": COLOR_NAMES[c],
            "x": float((wgt * xs).sum() / area),
            "y": float((wgt * ys).sum() / area),
            "area": area,
            "pixels": int(pixels[i]),
            "edge": bool(own[0].any() or own[-1].any() or own[:, 0].any() or own[:, -1].any()),
            "rgb_err": float(np.linalg.norm(rgb[core].mean(axis=0) - PALETTE_RGB[c])),
        })
    return sorted(balls, key=lambda b: -b["area"])


def physics_check(
    video: np.ndarray, caption: str | bytes, *, max_dist: float = 100.0, min_area: int | None = None
) -> dict:
    """Per-frame ball count and colours of `video` [T,H,W,3] vs what `caption` asks for."""
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"expected a video [T,H,W,3], got shape {video.shape}")
    want_n, want_colours = parse_caption(caption)
    counts, colours = [], []
    for frame in video:
        balls = detect_balls(frame, max_dist=max_dist, min_area=min_area)
        counts.append(len(balls))
        colours.append(sorted({b["color"] for b in balls}))
    counts_arr = np.array(counts)
    want_set = sorted(set(want_colours))
    return {
        "count_match": float(np.mean(counts_arr == want_n)),
        "color_match": float(np.mean([c == want_set for c in colours])),
        "mean_count": float(counts_arr.mean()),
        "expected_count": want_n,
        "expected_colors": want_set,
        "per_frame_count": counts,
        "per_frame_colors": colours,
    }


def physics_scores(
    videos: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str | bytes], **kwargs
) -> dict[str, float]:
    """Means of count_match / color_match / |mean_count - expected| over a batch of clips."""
    checks = [physics_check(v, c, **kwargs) for v, c in zip(videos, captions, strict=True)]
    return {
        "count_match": float(np.mean([c["count_match"] for c in checks])),
        "color_match": float(np.mean([c["color_match"] for c in checks])),
        "count_error": float(np.mean([abs(c["mean_count"] - c["expected_count"]) for c in checks])),
    }


def centroid_errors(
    video: np.ndarray,
    positions: np.ndarray,
    colors: np.ndarray,
    *,
    max_dist: float = 100.0,
    min_area: int | None = None,
) -> dict:
    """Parses one clip [T,H,W,3] and measures each true ball's centre error (px) per frame.

    `positions` [T, M, 2] are the simulator's (x, y) pixel centres and `colors` [M] the palette
    indices (-1: padding), as stored by the dataset. Palette colours are distinct within a clip, so
    a ball is matched to the largest blob of its colour (what a parser would report); a ball
    without such a blob is a miss, and blobs of colours not in the clip are spurious.
    `colour_errs` holds each matched blob's `rgb_err` (its core's RGB distance from the palette).
    """
    video, positions, colors = np.asarray(video), np.asarray(positions), np.asarray(colors)
    if video.ndim != 4 or positions.shape != (video.shape[0], colors.shape[0], 2):
        raise ValueError(
            f"expected video [T,H,W,3], positions [T,M,2], colors [M]; got {video.shape}, "
            f"{positions.shape}, {colors.shape}"
        )
    real = [k for k in range(colors.shape[0]) if colors[k] >= 0]
    names = {COLOR_NAMES[int(colors[k])] for k in real}
    errors, colour_errs, misses, spurious = [], [], 0, 0
    for t, frame in enumerate(video):
        largest: dict[str, dict] = {}
        for b in detect_balls(frame, max_dist=max_dist, min_area=min_area):  # by decreasing area
            largest.setdefault(b["color"], b)
            spurious += b["color"] not in names
        for k in real:
            b = largest.get(COLOR_NAMES[int(colors[k])])
            if b is None:
                misses += 1
            else:
                errors.append(float(np.hypot(b["x"] - positions[t, k, 0], b["y"] - positions[t, k, 1])))
                colour_errs.append(float(b["rgb_err"]))
    return {"errors": np.array(errors), "colour_errs": np.array(colour_errs), "misses": misses, "spurious": spurious,
            "balls": len(real) * video.shape[0], "frames": video.shape[0]}


def parse_error(
    videos: np.ndarray, positions: np.ndarray, colors: np.ndarray, **kwargs
) -> dict[str, float]:
    """Ball-centroid parse error of clips [B,T,H,W,3] vs simulator truth, pooled over the batch.

    Returns error_px and colour_err (means over matched ball-frames of the centroid error and of
    the blob core's RGB distance from its palette colour, 0-255 units; nan if none matched),
    miss_rate (fraction of true ball-frames with no blob of the ball's colour) and spurious_per_frame.
    """
    per_clip = [centroid_errors(v, p, c, **kwargs) for v, p, c in zip(videos, positions, colors, strict=True)]
    errors = np.concatenate([c["errors"] for c in per_clip]) if per_clip else np.zeros(0)
    colour = np.concatenate([c["colour_errs"] for c in per_clip]) if per_clip else np.zeros(0)
    balls = sum(c["balls"] for c in per_clip)
    frames = sum(c["frames"] for c in per_clip)
    return {
        "error_px": float(errors.mean()) if errors.size else float("nan"),
        "colour_err": float(colour.mean()) if colour.size else float("nan"),
        "miss_rate": sum(c["misses"] for c in per_clip) / max(balls, 1),
        "spurious_per_frame": sum(c["spurious"] for c in per_clip) / max(frames, 1),
    }
