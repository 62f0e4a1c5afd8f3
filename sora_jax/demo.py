"""`sora-jax demo`: build data, train the VAE, train the DiT, sample prompts, write videos + report."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np

from configs import dit as dit_configs
from configs import vae as vae_configs
from sora_jax.data.physics import parse_caption
from sora_jax.data.video import to_uint8, write_gif, write_mp4
from sora_jax.eval.physics import physics_check
from sora_jax.models.text.encoder import check_prompts
from sora_jax.pipeline import TextToVideo
from sora_jax.train.dit_trainer import train_dit
from sora_jax.train.vae_trainer import physics_sources, train_vae

# Share of the wall-time budget given to each training stage; the rest is data, compiles,
# latent caching and sampling. The VAE gets the most: on CPU its convs dominate the cost.
VAE_SHARE, DIT_SHARE = 0.42, 0.25
# Clips the DiT learns from; encoding each 17x64x64 clip costs ~0.3 s on 2 CPU cores.
DEMO_TRAIN_CLIPS = 256


def demo_configs(outdir: Path, minutes: float, *, progress: bool = True) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The VAE and DiT configs of a demo run with a total wall-time budget of `minutes`."""
    scale = max(minutes / 12.0, 0.05)
    vae = vae_configs.get_config("variant=tiny,runlocal=True")
    dit = dit_configs.get_config("variant=tiny,runlocal=True")
    for c in (vae, dit):
        c.data.dir = str(outdir / "data")
        c.train.progress = progress
        c.train.ckpt_every = 0
        c.data.num_train = DEMO_TRAIN_CLIPS
    vae.workdir, dit.workdir = str(outdir / "vae"), str(outdir / "dit")
    dit.vae_workdir = vae.workdir
    vae.data.batch_size, vae.data.crop_size = 4, 32
    # 5-frame crops, not the whole clips configs/vae.py trains on: a step costs ~1/4 (the 64-px
    # quality runs did ~1 vs ~0.25 steps/s), so the budget's few hundred steps stay a few hundred.
    # The price is weaker late latent frames (docs/benchmarks.md, VAE quality).
    vae.data.crop_frames = 5
    # Step caps for ~12 minutes: on 2 CPU cores the VAE reaches its cap and the time budget stops
    # the DiT first (1000 and 2012 of 3000 steps, docs/demo_report.md); slower machines stop earlier.
    vae.train.steps = max(20, int(1000 * scale))
    dit.train.steps = max(20, int(3000 * scale))
    vae.train.max_minutes = VAE_SHARE * minutes
    dit.train.max_minutes = DIT_SHARE * minutes
    for c in (vae, dit):
        # Whichever stops a stage, its step cap or its time, finds the learning rate decayed.
        c.optim.schedule_clock = "budget"
    return vae, dit


def default_prompts(source, n: int = 3) -> list[str]:
    """Held-out captions with 1, 2 and 3 balls, so the physics check has varied targets."""
    by_count: dict[int, str] = {}
    for i in range(len(source)):
        cap = source[i]["caption"]
        cap = cap.decode() if isinstance(cap, bytes) else str(cap)
        by_count.setdefault(parse_caption(cap)[0], cap)
        if len(by_count) >= n:
            break
    return [by_count[k] for k in sorted(by_count)][:n]


def run_demo(
    outdir: str | Path = "demo_out",
    *,
    minutes: float = 12.0,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the whole vertical slice and return the report it writes to outdir/report.json."""
    outdir = Path(outdir).absolute()
    t0 = time.perf_counter()
    vae_cfg, dit_cfg = demo_configs(outdir, minutes, progress=progress)
    timings = {}

    t = time.perf_counter()
    sources = physics_sources(vae_cfg)
    timings["data_s"] = time.perf_counter() - t
    prompts = check_prompts(prompts) if prompts is not None else default_prompts(sources["test"])

    t = time.perf_counter()
    vae_out = train_vae(vae_cfg)
    timings["vae_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    dit_out = train_dit(dit_cfg)
    timings["dit_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    t2v = TextToVideo.load(dit_cfg.workdir)
    videos = t2v.generate(prompts, seed=seed)
    timings["sample_s"] = time.perf_counter() - t

    samples = []
    fps = int(dit_cfg.sample.fps)
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        frames = to_uint8(video)
        mp4 = write_mp4(outdir / "samples" / f"sample_{i}.mp4", frames, fps=fps)
        gif = write_gif(outdir / "samples" / f"sample_{i}.gif", frames, fps=fps, scale=2)
        samples.append({"prompt": prompt, "mp4": str(mp4), "gif": str(gif), "physics": physics_check(frames, prompt)})
    timings["total_s"] = time.perf_counter() - t0

    report = {
        "machine": {"backend": jax.default_backend(), "devices": jax.device_count(), "jax": jax.__version__,
                    "python": platform.python_version(), "cpu_count": _cpu_count()},
        "minutes_budget": minutes,
        "timings": timings,
        "vae": {"steps": vae_out["step"], "final": vae_out["final"], "psnr_db": vae_out["psnr"],
                **{k: vae_out.get(k, float("nan")) for k in ("ssim", "parse_error_px", "parse_error_true_px")},
                "corrupt_records_skipped": vae_out["corrupt_records_skipped"],
                "first": vae_out["history"][0] if vae_out["history"] else {}},
        "dit": {"steps": dit_out["step"], "final": dit_out["final"], "num_clips": dit_out["num_clips"],
                "first": dit_out["history"][0] if dit_out["history"] else {}},
        "samples": samples,
    }
    (outdir / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    (outdir / "report.md").write_text(render_report(report))
    return report


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def render_report(r: dict) -> str:
    """A short Markdown summary of a demo run."""
    t = r["timings"]
    lines = [
        "# sora-jax demo report", "",
        f"Machine: {r['machine']['backend']} x{r['machine']['devices']}, {r['machine']['cpu_count']} cores, jax {r['machine']['jax']}.",
        f"Wall time: {t['total_s'] / 60:.1f} min (data {t['data_s']:.0f} s, VAE {t['vae_train_s']:.0f} s, "
        f"DiT {t['dit_train_s']:.0f} s, sampling {t['sample_s']:.0f} s).", "",
        "| stage | steps | first loss | final loss | other |", "|---|---|---|---|---|",
        f"| VAE | {r['vae']['steps']} | {r['vae']['first'].get('loss', float('nan')):.4f} | "
        f"{r['vae']['final'].get('loss', float('nan')):.4f} | held-out PSNR {r['vae']['psnr_db']:.2f} dB, "
        f"SSIM {r['vae']['ssim']:.3f}, ball parse error {r['vae']['parse_error_px']:.2f} px "
        f"(true clips {r['vae']['parse_error_true_px']:.2f} px) |",
        f"| DiT | {r['dit']['steps']} | {r['dit']['first'].get('loss', float('nan')):.4f} | "
        f"{r['dit']['final'].get('loss', float('nan')):.4f} | {r['dit']['num_clips']} cached clips |",
        "", "| prompt | balls (count match) | colours (match) | mean detected | video |", "|---|---|---|---|---|",
    ]
    for s in r["samples"]:
        p = s["physics"]
        lines.append(
            f"| {s['prompt']} | {p['count_match']:.2f} | {p['color_match']:.2f} | {p['mean_count']:.2f} | "
            f"{Path(s['gif']).name} |"
        )
    return "\n".join(lines) + "\n"
