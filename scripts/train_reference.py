"""Train the reference world model of `sora-jax eval-physics` (VAE + frame-conditioned DiT on physics_balls).

    python scripts/train_reference.py --outdir runs_ref --minutes 90      # documented 2-core CPU budget
    sora-jax eval-physics --checkpoint runs_ref/dit --out runs_ref/bench  # its benchmark table

Rerunning the same command resumes both stages from their checkpoints; a stage whose share of
--minutes is spent trains no further (a larger --minutes extends it). Step counts default to what
fits --minutes on 2 CPU cores (rates in configs/physics_reference.py); each stage's learning rate
decays over its steps or its time, whichever ends first. On an accelerator pass --vae-steps /
--dit-steps. --vae-seeds N trains the VAE
under N seeds (in <outdir>/vae_seeds/seed<N>, sharing the VAE's budget) and trains the DiT on the one
whose held-out balls decode closest to their palette colours (<outdir>/vae_selection.json).
"""

import argparse
import json
import time
from pathlib import Path

from configs.physics_reference import ZERO_GRAVITY, reference_configs, vae_candidates
from sora_jax.parallel.backends import skip_absent_tpu
from sora_jax.train.dit_trainer import train_dit
from sora_jax.train.vae_select import SELECTION_FILE, select_vae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", default="runs_ref")
    p.add_argument("--minutes", type=float, default=90.0, help="total wall-time budget (VAE + DiT)")
    p.add_argument("--num-train", type=int, default=512, help="training clips")
    p.add_argument("--variant", default="tiny", help="VAE/DiT variant (tiny on CPU; S/B on an accelerator)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: sized from --minutes)")
    p.add_argument("--dit-steps", type=int, default=None, help="DiT steps (default: sized from --minutes)")
    p.add_argument("--dit-shape", default="", help="DiT shape overrides, e.g. num_layers=6,num_attention_heads=4,ffn_dim=512 "
                   "(--minutes sizes steps at the tiny DiT's rate: pass --dit-steps with it)")
    p.add_argument("--dit-variant", default=None,
                   help="DiT variant if not --variant's, e.g. S on a GPU over a tiny run's VAE (pass --dit-steps)")
    p.add_argument("--dit-lr", type=float, default=None, help="DiT peak learning rate (default: the variant's; or --dit-override optim.lr=..., not both)")
    p.add_argument("--dit-override", action="append", default=[], metavar="KEY=VALUE",
                   help="DiT config override, repeatable, e.g. model.attention=cudnn")
    p.add_argument("--vae-override", action="append", default=[], metavar="KEY=VALUE",
                   help="VAE config override, repeatable, e.g. model.z_dim=16 (a changed VAE shape needs a new --outdir)")
    p.add_argument("--vae-seeds", type=int, default=1,
                   help="train the VAE under this many seeds and keep the lowest held-out ball colour error")
    p.add_argument("--zero-gravity", type=float, default=ZERO_GRAVITY,
                   help=f"share of clips simulated without gravity (default {ZERO_GRAVITY}; runs before session 26: 0)")
    a = p.parse_args()
    skip_absent_tpu()
    try:
        vae_cfg, dit_cfg = reference_configs(a.outdir, a.minutes, num_train=a.num_train, variant=a.variant,
                                             vae_steps=a.vae_steps, dit_steps=a.dit_steps,
                                             dit_shape=a.dit_shape, dit_variant=a.dit_variant,
                                             dit_lr=a.dit_lr, dit_overrides=a.dit_override,
                                             vae_overrides=a.vae_override, vae_seeds=a.vae_seeds,
                                             zero_gravity=a.zero_gravity)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    def report(cfg, vae):
        print(f"VAE {cfg.workdir}: {vae['step']} steps, held-out PSNR {vae['psnr']:.2f} dB, "
              f"parse error {vae.get('parse_error_px', float('nan')):.2f} px, "
              f"ball colour error {vae.get('parse_colour_err', float('nan')):.1f} RGB", flush=True)

    t0 = time.perf_counter()
    try:
        chosen = select_vae(vae_candidates(vae_cfg, a.vae_seeds), Path(a.outdir) / SELECTION_FILE, on_candidate=report)
    except (ValueError, FileNotFoundError) as e:  # e.g. an --outdir whose VAE has another shape
        raise SystemExit(f"error: VAE stage: {e}") from None
    vae, dit_cfg.vae_workdir = chosen["metrics"], chosen["workdir"]
    if a.vae_seeds > 1:
        print(f"VAE: kept seed {chosen['seed']} ({chosen['workdir']}) of {a.vae_seeds}", flush=True)
    t1 = time.perf_counter()
    try:
        dit = train_dit(dit_cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: DiT stage: {e}") from None
    t2 = time.perf_counter()
    summary = {"minutes_budget": a.minutes, "vae_workdir": chosen["workdir"], "vae_seed": chosen["seed"],
               "vae_steps": vae["step"], "vae_psnr_db": vae["psnr"],
               "vae_ssim": vae["ssim"], "vae_psnr_by_latent_frame": vae["psnr_by_latent_frame"],
               "vae_parse_error_px": vae.get("parse_error_px"),
               "vae_parse_miss_rate": vae.get("parse_miss_rate"),
               "vae_parse_spurious_per_frame": vae.get("parse_spurious_per_frame"),
               "vae_parse_colour_err": vae.get("parse_colour_err"), "dit_steps": dit["step"],
               "dit_final_loss": dit["final"].get("loss"), "vae_s": t1 - t0, "dit_s": t2 - t1,
               # Fixed-noise losses on held-out vs training clips at the last evaluation.
               "dit_eval": {k: v for k, v in (dit["eval_history"] or [{}])[-1].items()
                            if k in ("step", "eval/loss", "eval_train/loss")}}
    print(json.dumps(summary, default=float), flush=True)
    print(f"next: sora-jax eval-physics --checkpoint {dit_cfg.workdir} --out {a.outdir}/bench")


if __name__ == "__main__":
    main()
