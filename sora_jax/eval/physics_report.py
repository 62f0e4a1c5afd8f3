"""Markdown tables, the position-error plot and the sample sheet of a `physics_bench` report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

_FRAME_COLS = (
    ("count_acc", "count acc", "{:.2f}"), ("count_over", "count >n", "{:.2f}"),
    ("count_under", "count <n", "{:.2f}"), ("phantom_colour", "phantom colour", "{:.2f}"),
    ("color_jaccard", "colour J", "{:.2f}"), ("colour_err", "colour err", "{:.1f}"),
    ("area_drift", "area drift", "{:.3f}"), ("pos_err_px", "pos err px", "{:.2f}"),
    ("miss_rate", "miss", "{:.2f}"), ("vel_err_px", "vel err px/frame", "{:.2f}"),
    ("g_rel_err", "ĝ rel err", "{:.3f}"), ("world_acc", "world", "{:.2f}"), ("momentum_change", "Δp", "{:.3f}"),
    ("energy_change", "ΔE", "{:.3f}"), ("flicker", "flicker", "{:.2f}"), ("psnr", "PSNR", "{:.1f}"),
    ("ssim", "SSIM", "{:.3f}"), ("fg_psnr", "fg PSNR", "{:.1f}"),
)
_TEXT_COLS = (("count_acc", "count acc", "{:.2f}"), ("count_over", "count >n", "{:.2f}"),
              ("count_under", "count <n", "{:.2f}"), ("phantom_colour", "phantom colour", "{:.2f}"),
              ("color_jaccard", "colour J", "{:.2f}"), ("colour_err", "colour err", "{:.1f}"),
              ("direction_acc", "direction acc", "{:.2f}"),
              ("g_hat", "ĝ px/s²", "{:.1f}"),
              ("g_rel_err", "ĝ rel err", "{:.2f}"), ("world_acc", "world", "{:.2f}"),
              ("area_drift", "area drift", "{:.3f}"),
              ("flicker", "flicker", "{:.2f}"))
_MULTIPLE_OF_FLOOR = ("pos_err_px", "vel_err_px", "g_rel_err", "area_drift", "momentum_change", "energy_change")


def _fmt(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–" if v is None or math.isnan(v) else "∞"
    return fmt.format(v)


def _cell(stats: dict, key: str, fmt: str, ground_truth: bool) -> str:
    s = _fmt(stats.get(key), fmt)
    mult = stats.get("x_floor", {}).get(key)
    if key in _MULTIPLE_OF_FLOOR and not ground_truth and mult is not None and math.isfinite(mult):
        s += f" ({mult:.0f}×)" if mult >= 10 else f" ({mult:.1f}×)"
    return s


def _table(entries: dict, label: str, cols) -> list[str]:
    lines = [f"| {label} | clips | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, stats in entries.items():
        gt = name.split("/")[0] == "ground_truth"
        lines.append(f"| {name} | {stats.get('clips', 0)} | "
                     + " | ".join(_cell(stats, k, f, gt) for k, _, f in cols) + " |")
    return lines


def render_markdown(report: dict) -> str:
    """The report as Markdown: per-split, per-family and per-count tables, text protocol, PhyWorld."""
    k = report["cond_pixel_frames"]
    lines = ["# World-model benchmark (`sora-jax eval-physics`)", ""]
    frames = report.get("frames")
    if frames:
        lines += [f"## (a) Frame-conditioned prediction: {k} conditioning pixel frames "
                  f"({report['cond_latent_frames']} latent), later frames scored", "",
                  "Errors in parentheses are multiples of the ground-truth parse floor (the same metric on "
                  "the true clip). Position/velocity errors over parsed balls; misses counted apart. `world`: "
                  "the share of clips whose fitted gravity (a parabola per free-flight run, `gravity_fit`) puts them "
                  "in their scene's world (falling above half the training gravity).", ""]
        lines += _table(frames["by_split"], "method / split", _FRAME_COLS) + [""]
        lines += ["### Position error by family", ""]
        lines += _table(frames["by_family"], "method / family / split",
                        [c for c in _FRAME_COLS if c[0] in ("count_acc", "count_over", "count_under", "pos_err_px",
                                                            "miss_rate", "vel_err_px",
                                                            "g_rel_err", "world_acc", "momentum_change",
                                                            "energy_change")])
        lines += ["", "### By object count (in distribution)", ""]
        lines += _table(frames["by_count"], "method / balls",
                        [c for c in _FRAME_COLS if c[0] in ("count_acc", "count_over", "count_under",
                                                            "phantom_colour", "color_jaccard", "colour_err",
                                                            "pos_err_px",
                                                            "miss_rate", "vel_err_px")])
        if frames.get("phyworld"):
            lines += ["", "### PhyWorld velocity error on the uniform family (10-unit world)", "",
                      "| method / split | abs(mean v̂x − v0) (units/s) | × ground truth |", "|---|---|---|"]
            for name, v in frames["phyworld"].items():
                lines.append(f"| {name} | {_fmt(v['v_err'], '{:.4f}')} | {_fmt(v['x_floor'], '{:.1f}')} |")
        lines.append("")
    use = report.get("conditioning_use")
    if use:
        lines += ["### Does the model use its conditioning frames? (latent space, model diagnostic)", "",
                  f"MSE of the DiT's one-step clean estimate on the free latent frames of {use['scenes']} "
                  f"in-distribution scenes, with each scene's own first {use['k_latent']} latent frame(s) given "
                  "and with another scene's (`sora_jax/eval/conditioning_use.py`). The gap (other − own) is "
                  "what the conditioning is worth to the prediction. Given cells "
                  + ("clean at timestep 0 (a given_t0 run)." if use["given_t0"] else "noised to sigma (replacement).")
                  + f" Reference predictors: zeros {use['zeros']:.3f}, last conditioning latent frame "
                  f"repeated {use['copy_last']:.3f}.", "",
                  "| sigma | own frames | another scene's | gap |", "|---|---|---|---|"]
        for sig, own, other, gap in zip(use["sigmas"], use["own"], use["other"], use["gap"]):
            lines.append(f"| {sig:g} | {own:.4f} | {other:.4f} | {gap:.4f} |")
        lines.append("")
    sheet = report.get("samples")
    if sheet:
        lines += [f"`{sheet['file']}`: one in-distribution scene per family ({', '.join(sheet['scenes'])}), "
                  f"rows {' / '.join(sheet['rows'])} per scene, frames left to right; the white bar follows "
                  f"the {k} conditioning frames.", ""]
    text = report.get("text")
    if text:
        lines += ["## (b) Text-conditioned generation (captions of in-distribution multi scenes; `/drift`: the "
                  "same without gravity, captions ending 'in zero gravity', where ĝ should be 0)", ""]
        lines += _table(text, "method", _TEXT_COLS) + [""]
    floor = report.get("phyworld_floor")
    if floor:
        lines += ["## PhyWorld uniform-motion parse floor (true clips, red ball on white, 10-unit world, 0.1 s/frame)",
                  "", "`kang`: their renderer, parser and frames replayed; `kang_matched_grid`: the same with the "
                  "parser's scale matched to the renderer's pixel grid; `coverage`, `hard_mask`: our simulator "
                  "and parse on the same scenes.", "",
                  "| floor | render | parse | size | scenes | frames used | abs(mean v̂x − v0) (units/s) "
                  "| paper (Kang et al.) | ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for name, f in floor.items():
            lines.append(f"| {name} | {f['render']} | {f['parse']} | {f['size']} | {f['scenes']} | "
                         f"{f['mean_frames_used']:.1f} | {f['velocity_error']:.5f} | {f['paper_floor']} | "
                         f"{f['ratio_to_paper']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot_position_error(
    curves: dict[str, list[float]], cond_frames: int, path: str | Path, missed: tuple[str, ...] = ()
) -> Path:
    """Per-frame mean position error (px, in distribution) of each method vs frame index, as PNG.

    `missed` names methods in which no ball was ever parsed (no curve); the plot says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, curve in curves.items():
        ax.plot(range(cond_frames, cond_frames + len(curve)), curve, marker="o", ms=3, label=name)
    ax.set_yscale("log")  # the floor (~0.01 px) and the baselines (~10 px) differ by three decades
    ax.set_xlabel("frame")
    ax.set_ylabel("position error (px)")
    ax.set_title("Frame-conditioned prediction, in distribution")
    if missed:
        ax.text(0.01, 0.02, "no ball parsed (miss rate 1): " + ", ".join(missed), transform=ax.transAxes, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_sheet(samples: dict[str, dict[str, np.ndarray]], cond_frames: int, path: str | Path,
                 gap: int = 2) -> Path:
    """One PNG of every scene's rows (truth, then each method) with frames left to right.

    Rows of a scene touch; scenes are `gap` px apart; a white bar `gap` px wide follows frame
    `cond_frames - 1`, so what was given and what was predicted read apart at a glance.
    """
    from PIL import Image

    blocks = []
    for rows in samples.values():
        for video in rows.values():
            v = np.asarray(video, np.uint8)  # [frames, height, width, 3]
            bar = np.full((v.shape[1], gap, 3), 255, np.uint8)
            blocks.append(np.concatenate([*v[:cond_frames], bar, *v[cond_frames:]], axis=1))
        blocks.append(np.zeros((gap, blocks[-1].shape[1], 3), np.uint8))
    path = Path(path)
    Image.fromarray(np.concatenate(blocks[:-1], axis=0)).save(path)
    return path
