"""Paired comparison of two `eval-physics` reports on the scenes both scored.

Scenes differ widely (a collision costs DiT S about four times the position error a parabola does),
so two runs' means over a dozen scenes each can disagree by more than the models do. Differencing per
scene removes the scene-to-scene part of that spread; the standard error of the mean difference then
says whether a gap between runs stands out from what remains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

PAIRED_KEYS = ("count_acc", "phantom_colour", "pos_err_px", "miss_rate", "vel_err_px", "color_jaccard")
_LABELS = {"count_acc": "count acc", "phantom_colour": "phantom", "pos_err_px": "pos err px", "miss_rate": "miss",
           "vel_err_px": "vel err", "color_jaccard": "colour J"}


def load_report(path: str | Path) -> dict:
    """An `eval-physics` report.json (or its --out folder) that has per-scene rows."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path} has no report.json; pass an eval-physics --out folder or its report.json")
    try:
        report = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e.msg}, line {e.lineno}); re-run sora-jax eval-physics") from None
    if not report.get("frames", {}).get("scenes"):
        raise ValueError(f"{p} has no per-scene rows (frames.scenes): it predates them or skipped the frames "
                         "protocol; re-run sora-jax eval-physics with --protocols frames")
    return report


def _setup(report: dict) -> dict:
    scenes = report["config"]["scenes"]
    return {"size": scenes["size"], "frames": scenes["frames"], "cond_pixel_frames": report["cond_pixel_frames"]}


def _by_scene(report: dict, method: str, which: str) -> dict[str, dict]:
    rows = {r["scene"]: r for r in report["frames"]["scenes"] if r["method"] == method}
    if not rows:
        have = sorted({r["method"] for r in report["frames"]["scenes"]})
        raise ValueError(f"report {which} has no {method!r} rows (it has {', '.join(have)}); "
                         f"pick one with --method-{which.lower()}")
    return rows


def compare_reports(a: dict, b: dict, method_a: str = "model", method_b: str = "model",
                    keys: tuple[str, ...] = PAIRED_KEYS) -> dict:
    """Per split and per family/split: A's and B's means over the scenes both scored, and the mean
    paired difference A - B with its standard error (metrics a clip could not score, NaN, drop that pair)."""
    sa, sb = _setup(a), _setup(b)
    if sa != sb:
        diff = ", ".join(f"{k} {sa[k]} vs {sb[k]}" for k in sa if sa[k] != sb[k])
        raise ValueError(f"the reports scored different setups ({diff}); compare reports made with the same "
                         "--size, --frames and --cond-frames")
    ra, rb = _by_scene(a, method_a, "A"), _by_scene(b, method_b, "B")
    shared = [s for s in ra if s in rb]
    if not shared:
        raise ValueError("the reports share no scene; score both with the same --seed, --per-split, --families "
                         "and --splits (scene seeds follow them)")
    splits: dict[str, list[str]] = {}
    families: dict[str, list[str]] = {}
    for scene in shared:
        family, split, _ = scene.split("/")
        splits.setdefault(split, []).append(scene)
        families.setdefault(f"{family}/{split}", []).append(scene)
    groups = {}
    for name, scenes in (splits | families).items():
        row: dict = {"scenes": len(scenes)}
        for k in keys:
            x = np.array([ra[s].get(k, math.nan) for s in scenes], np.float64)
            y = np.array([rb[s].get(k, math.nan) for s in scenes], np.float64)
            ok = np.isfinite(x) & np.isfinite(y)
            d, n = x[ok] - y[ok], int(ok.sum())
            row[k] = {"pairs": n, "a": float(x[ok].mean()) if n else math.nan,
                      "b": float(y[ok].mean()) if n else math.nan, "diff": float(d.mean()) if n else math.nan,
                      "se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan}
        groups[name] = row
    return {"method_a": method_a, "method_b": method_b, "keys": list(keys), "shared_scenes": len(shared),
            "only_a": len(ra) - len(shared), "only_b": len(rb) - len(shared), "setup": sa, "groups": groups}


def render_markdown(result: dict, label_a: str = "A", label_b: str = "B") -> str:
    """The comparison as a markdown table: per group and metric, A / B / (A - B) +- standard error."""
    keys = result["keys"]
    lines = [f"# Paired comparison: {label_a} ({result['method_a']}) vs {label_b} ({result['method_b']})", "",
             f"{result['shared_scenes']} scenes scored by both (only in A: {result['only_a']}, only in B: "
             f"{result['only_b']}). Each cell: A / B / mean of (A - B) per scene ± its standard error, over the "
             "scenes where both scored the metric.", "",
             "| group | scenes | " + " | ".join(_LABELS.get(k, k) for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]

    def cell(c: dict) -> str:
        if not c["pairs"]:
            return "–"
        se = "" if math.isnan(c["se"]) else f" ± {c['se']:.3f}"
        return f"{c['a']:.3f} / {c['b']:.3f} / {c['diff']:+.3f}{se}"

    for name, row in result["groups"].items():
        lines.append(f"| {name} | {row['scenes']} | " + " | ".join(cell(row[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["PAIRED_KEYS", "compare_reports", "load_report", "render_markdown"]
