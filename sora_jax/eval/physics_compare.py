"""Comparisons of `eval-physics` reports: two runs paired by scene, or two recipes over several runs each.

Scenes differ widely (a collision costs DiT S about four times the position error a parabola does),
so two runs' means over a dozen scenes each can disagree by more than the models do. Differencing per
scene removes the scene-to-scene part of that spread; the standard error of the mean difference then
says whether a gap between the two trained models stands out from what remains.

That error says nothing about training noise: the same recipe with another seed gives another model,
and for the physics VAEs that moves the roundtrip as much as any recipe change tried. `compare_runs`
ranks recipes instead: each recipe is several runs (seeds) scored on the same scenes, each run is
reduced to its mean, and the difference of the recipes' means is judged against the run-to-run spread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

PAIRED_KEYS = ("count_acc", "phantom_colour", "colour_err", "pos_err_px", "miss_rate", "vel_err_px",
               "color_jaccard")
_LABELS = {"count_acc": "count acc", "phantom_colour": "phantom", "colour_err": "colour err",
           "pos_err_px": "pos err px", "miss_rate": "miss", "vel_err_px": "vel err", "color_jaccard": "colour J"}


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


def _groups(scenes: list[str]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {}
    families: dict[str, list[str]] = {}
    for scene in scenes:
        family, split, _ = scene.split("/")
        splits.setdefault(split, []).append(scene)
        families.setdefault(f"{family}/{split}", []).append(scene)
    return splits | families


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
    groups = {}
    for name, scenes in _groups(shared).items():
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


def compare_runs(a: list[dict], b: list[dict], method_a: str = "model", method_b: str = "model",
                 keys: tuple[str, ...] = PAIRED_KEYS) -> dict:
    """Recipe A (several runs' reports) against recipe B: per group and metric, each run's mean over the
    scenes every run scored, the recipes' means and their difference with a pooled run-to-run standard
    error, its degrees of freedom and a 95% t interval (needs three runs in all)."""
    if not a or not b:
        raise ValueError("each side needs at least one report")
    reports = [("A", i, r) for i, r in enumerate(a)] + [("B", i, r) for i, r in enumerate(b)]
    ref = _setup(a[0])
    for side, i, r in reports:
        s = _setup(r)
        if s != ref:
            diff = ", ".join(f"{k} {ref[k]} vs {s[k]}" for k in ref if ref[k] != s[k])
            raise ValueError(f"report {side}{i + 1} scored a different setup from A1 ({diff}); compare reports "
                             "made with the same --size, --frames and --cond-frames")
    rows = [(side, _by_scene(r, method_a if side == "A" else method_b, side)) for side, _, r in reports]
    shared = [s for s in rows[0][1] if all(s in rr for _, rr in rows)]
    if not shared:
        raise ValueError("the reports share no scene; score every run with the same --seed, --per-split, "
                         "--families and --splits (scene seeds follow them)")
    na, nb = len(a), len(b)
    df = na + nb - 2
    groups = {}
    for name, scenes in _groups(shared).items():
        row: dict = {"scenes": len(scenes)}
        for k in keys:
            vals = np.array([[rr[s].get(k, math.nan) for s in scenes] for _, rr in rows], np.float64)
            ok = np.isfinite(vals).all(axis=0)  # the same scenes for every run, so run means differ by model
            if not ok.any():
                row[k] = {"scenes": 0}
                continue
            means = vals[:, ok].mean(axis=1)
            ma, mb = means[:na], means[na:]
            ss = ((ma - ma.mean()) ** 2).sum() + ((mb - mb.mean()) ** 2).sum()
            se = math.sqrt(ss / df * (1 / na + 1 / nb)) if df > 0 else math.nan
            half = float(stats.t.ppf(0.975, df) * se) if df > 0 else math.nan
            diff = float(ma.mean() - mb.mean())
            row[k] = {"scenes": int(ok.sum()), "a_runs": ma.tolist(), "b_runs": mb.tolist(),
                      "a": float(ma.mean()), "b": float(mb.mean()), "diff": diff, "se": se, "df": df,
                      "ci95": [diff - half, diff + half]}
        groups[name] = row
    return {"method_a": method_a, "method_b": method_b, "keys": list(keys), "runs_a": na, "runs_b": nb,
            "df": df, "shared_scenes": len(shared), "setup": ref, "groups": groups}


def render_runs_markdown(result: dict, labels_a: list[str], labels_b: list[str]) -> str:
    """`compare_runs` as markdown: each run's means over all shared scenes, then recipe A / B / A - B
    ± run-to-run standard error [95% interval] per group and metric."""
    keys = result["keys"]

    def runs(n: int) -> str:
        return f"{n} run" + ("s" if n != 1 else "")

    lines = [f"# Recipe comparison: A ({runs(result['runs_a'])}, {result['method_a']}) vs B "
             f"({runs(result['runs_b'])}, {result['method_b']})", "",
             f"{result['shared_scenes']} scenes scored by every run. Runs differ by training noise (seed, data "
             "order), so the error of A - B comes from the spread of the runs' means (pooled over both recipes, "
             f"{result['df']} degrees of freedom), not from the scenes.", "",
             "## Each run, over its split's scenes", "",
             "| run | split | " + " | ".join(_LABELS.get(k, k) for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    splits = [n for n in result["groups"] if "/" not in n]
    for j, label in enumerate([f"A{i + 1} {x}" for i, x in enumerate(labels_a)] +
                              [f"B{i + 1} {x}" for i, x in enumerate(labels_b)]):
        side, i = ("a_runs", j) if j < result["runs_a"] else ("b_runs", j - result["runs_a"])
        for split in splits:
            cells = [f"{result['groups'][split][k][side][i]:.3f}" if result["groups"][split][k]["scenes"] else "–"
                     for k in keys]
            lines.append(f"| {label} | {split} | " + " | ".join(cells) + " |")

    def cell(c: dict) -> str:
        if not c["scenes"]:
            return "–"
        if math.isnan(c["se"]):
            return f"{c['a']:.3f} / {c['b']:.3f} / {c['diff']:+.3f}"
        lo, hi = c["ci95"]
        return f"{c['a']:.3f} / {c['b']:.3f} / {c['diff']:+.3f} ± {c['se']:.3f} [{lo:+.3f}, {hi:+.3f}]"

    lines += ["", "## Recipes", "", "Each cell: A / B / A - B ± standard error [95% interval]. An interval that "
              "spans 0 does not rank the recipes.", "",
              "| group | scenes | " + " | ".join(_LABELS.get(k, k) for k in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for name, row in result["groups"].items():
        lines.append(f"| {name} | {row['scenes']} | " + " | ".join(cell(row[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["PAIRED_KEYS", "compare_reports", "compare_runs", "load_report", "render_markdown",
           "render_runs_markdown"]
