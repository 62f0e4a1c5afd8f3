"""Reference world model for `sora-jax eval-physics`: VAE + DiT on physics_balls with frame conditioning.

`reference_configs(outdir, minutes)` returns the (vae, dit) ConfigDicts that
`scripts/train_reference.py` trains. The DiT learns with conditioning masks (mostly "first k latent
frames given") so that the same model serves protocol (a) of the benchmark, frame-conditioned
prediction, and (with the remaining "none" share) protocol (b), text-conditioned generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ml_collections

from configs import dit as dit_configs
from configs import vae as vae_configs
from sora_jax.config_overrides import apply_overrides
from sora_jax.data.physics import format_combos
from sora_jax.eval.physics_scenes import HELD_OUT_COMBOS
from sora_jax.models.dit import dit_config
from sora_jax.train.vae_select import seed_candidates

# Shares of the wall-time budget; the rest is data, latent caching and compiles. On CPU the VAE's
# convs dominate and its reconstructions bound every pixel metric, so it gets the larger share.
VAE_SHARE, DIT_SHARE = 0.5, 0.38
# Steps per minute of each stage on the 2-core CPU VM this was sized on (tiny variants, no other
# load). The default step counts fill each stage's share of `minutes` at these rates; the learning
# rate decays over the steps or the time, whichever ends first (optim.schedule_clock="budget"), so
# a slower machine still ends annealed, and a rate set too high costs nothing but a step cap that
# does not bind. The VAE's: 3000 steps of the z_dim=16 recipe in 38.5 min, of which about 9 min were
# 12 held-out evaluations (docs/benchmarks.md, seed replicates, fg20 s4); it was 39 before the
# faster conv lowering. The DiT's: 4600 tiny-DiT steps in 52 min (runs/ref8).
VAE_STEPS_PER_MIN, DIT_STEPS_PER_MIN = 100.0, 90.0
# Share of training clips without gravity. Half the benchmark's in-distribution families (uniform
# motion, collisions) have none; on gravity-only data even a perfect model of that world re-simulated
# from the parsed state (`resim_gravity`) scores 3.93 px on the 32 id scenes, worse than the 3.25 px of
# re-simulation without gravity, the goal to beat (docs/benchmarks.md, session 26). Runs before then
# trained with 0.
ZERO_GRAVITY = 0.5
# DiT shape fields `dit_shape` may override: a width/depth sweep without a new named variant.
DIT_SHAPE_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim")


def parse_dit_shape(text: str) -> dict[str, int]:
    """Parse "num_layers=6,num_attention_heads=4" into DiT shape overrides (positive ints, known fields)."""
    out: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in DIT_SHAPE_FIELDS:
            raise ValueError(f"DiT shape item {item!r} must be FIELD=INT with FIELD one of {list(DIT_SHAPE_FIELDS)}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"DiT shape {key}={value!r} must be a positive integer")
        out[key] = int(value)
    return out


def reference_configs(
    outdir: str | Path,
    minutes: float,
    *,
    num_train: int = 512,
    variant: str = "tiny",
    vae_steps: int | None = None,
    dit_steps: int | None = None,
    dit_shape: str = "",
    dit_variant: str | None = None,
    dit_lr: float | None = None,
    dit_overrides: Sequence[str] = (),
    vae_overrides: Sequence[str] = (),
    vae_seeds: int = 1,
    zero_gravity: float = ZERO_GRAVITY,
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The VAE and DiT configs of a reference run with a total wall-time budget of `minutes`.

    `dit_variant` (default `variant`) sizes the DiT alone, so a bigger DiT can train on an existing
    run's VAE and latent cache; `dit_shape` ("num_layers=6,num_attention_heads=4,ffn_dim=512")
    overrides its shape; `dit_lr` its peak learning rate. `dit_overrides` ("model.attention=cudnn",
    also "--config.model.attention=cudnn") are applied last, to the DiT config alone; `vae_overrides`
    ("model.z_dim=16") likewise to the VAE config alone, after the reference recipe. `vae_seeds` > 1
    splits the VAE's share of the budget (time and default steps) among that many seed runs, of which
    `vae_candidates` makes the configs and `select_vae` keeps one. `zero_gravity` is the share of
    clips simulated without gravity (both stages read the same clips).
    """
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}; e.g. --minutes 90 on a 2-core CPU")
    for name, n in (("vae_steps", vae_steps), ("dit_steps", dit_steps)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}; leave it out to size it from --minutes")
    if vae_seeds < 1:
        raise ValueError(f"vae_seeds must be >= 1, got {vae_seeds}; e.g. --vae-seeds 3")
    if dit_lr is not None and not dit_lr > 0:
        raise ValueError(f"dit_lr must be > 0, got {dit_lr}; e.g. --dit-lr 2e-4")
    if dit_lr is not None and any(o.removeprefix("--config.").split("=")[0] == "optim.lr" for o in dit_overrides):
        # The override would win silently; two values for one setting is more likely a mistake.
        raise ValueError("the DiT learning rate is set twice, by dit_lr and by a DiT override optim.lr; "
                         "pass one (--dit-lr or --dit-override optim.lr=...)")
    dit_variant = dit_variant or variant
    shape = parse_dit_shape(dit_shape)
    dit_config(dit_variant, **shape)  # fail here, before any training, on a variant/shape the DiT rejects
    outdir = Path(outdir).absolute()
    vae = vae_configs.get_config(f"variant={variant},runlocal=True")
    dit = dit_configs.get_config(f"variant={dit_variant},runlocal=True")
    for c in (vae, dit):
        c.data.dir = str(outdir / "data")
        c.data.num_train = num_train
        # The benchmark's combinatorial split must stay unseen for its numbers to mean generalisation.
        c.data.exclude = format_combos(HELD_OUT_COMBOS)
        c.data.zero_gravity = float(zero_gravity)
        c.train.ckpt_every = 500
        c.train.progress = False
        c.train.log_every = 50
    vae.workdir, dit.workdir = str(outdir / "vae"), str(outdir / "dit")
    dit.model.update(shape)
    if dit_lr is not None:
        dit.optim.lr = dit_lr
    dit.vae_workdir = vae.workdir
    vae.data.batch_size, vae.data.crop_size = 4, 32
    # 4x spatial compression instead of the variant's 8x: balls of radius 3-9 px survive a 16x16
    # latent far better than an 8x8 one. In a 2-core A/B (512 clips, batch 4, whole clips, 22 min
    # each: 460 and 420 steps) 4x4x4 reached 18.9 dB held-out with balls parsed (2.1 px) while
    # 4x8x8 sat on the background plateau (16.2 dB, no ball parsed). The DiT then sees 4x the
    # tokens (320 at 1x2x2); docs/benchmarks.md has the A/B and the reference run.
    vae.model.dim_mult = (1, 2, 4)
    vae.model.temporal_downsample = (True, True)
    vae.train.steps = vae_steps or max(50, int(VAE_STEPS_PER_MIN * VAE_SHARE * minutes / vae_seeds))
    dit.train.steps = dit_steps or max(50, int(DIT_STEPS_PER_MIN * DIT_SHARE * minutes))
    vae.train.max_minutes = VAE_SHARE * minutes / vae_seeds
    dit.train.max_minutes = DIT_SHARE * minutes
    for c in (vae, dit):
        # The step counts are sized from one machine's rates (or passed for an accelerator, where the
        # rate drifts within a run): the learning rate decays over whichever ends first, so a slower
        # machine or a cut budget still ends annealed. Runs trained before this need
        # --vae-override/--dit-override optim.schedule_clock=steps to resume.
        c.optim.schedule_clock = "budget"
    # Frame-conditioned prediction is the benchmark's main protocol: most examples see their first
    # k latent frames clean (k uniform in [1, T'-1]); a few see only frame 0; 30% stay text-only.
    dit.diffusion.mask_rates.first_k = 0.6
    dit.diffusion.mask_rates.first_frame = 0.1
    # Given frames at timestep 0, and training noise levels shifted as sampling's (shift 3): without
    # these the tiny DiT learned to ignore its conditioning frames (docs/benchmarks.md, "Reference
    # model": its x0 prediction at sigma 0.98 barely changed when they were swapped for another clip's).
    dit.diffusion.given_t0 = True
    dit.diffusion.shift = 3.0
    # diffusion.fg_weight stays 0: on the tiny DiT, weighting object cells traded lost balls for
    # invented ones without lifting count accuracy (docs/benchmarks.md, "Weighting object cells").
    # Deterministic, near-exact continuation matters more here than diversity.
    dit.sample.guidance = 2.0
    # Held-out and training clips scored alike (fixed noise levels and noise) show memorisation in
    # TensorBoard and the script's summary; every 500 steps costs well under 1% of training. S on
    # 512 clips memorises them: its training clips' loss falls below the held-out loss after about
    # 170 epochs, and the held-out loss stops falling at about 340 (docs/benchmarks.md, "DiT S on the
    # step-3000 VAE"); --num-train 4096 kept the two together.
    dit.train.eval_every = 500
    dit.eval.num_clips = dit.eval.train_clips = 32
    for name, cfg, overrides in (("VAE", vae, vae_overrides), ("DiT", dit, dit_overrides)):
        try:
            apply_overrides(cfg, [o if o.startswith("--config.") else f"--config.{o}" for o in overrides])
        except ValueError as e:
            raise ValueError(f"{name} override: {e}") from None
    return vae, dit


def vae_candidates(vae: ml_collections.ConfigDict, vae_seeds: int) -> list[ml_collections.ConfigDict]:
    """The VAE runs a reference run trains: `vae` itself, or one per seed in <outdir>/vae_seeds/seed<N>."""
    if vae_seeds == 1:
        return [vae]
    return seed_candidates(vae, vae_seeds, Path(vae.workdir).parent / "vae_seeds")
