"""Reference world model for `sora-jax eval-physics`: VAE + DiT on physics_balls with frame conditioning.

`reference_configs(outdir, minutes)` returns the (vae, dit) ConfigDicts that
`scripts/train_reference.py` trains. The DiT learns with conditioning masks (mostly "first k latent
frames given") so that the same model serves protocol (a) of the benchmark, frame-conditioned
prediction, and (with the remaining "none" share) protocol (b), text-conditioned generation.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from configs import dit as dit_configs
from configs import vae as vae_configs
from sora_jax.data.physics import format_combos
from sora_jax.eval.physics_scenes import HELD_OUT_COMBOS

# Shares of the wall-time budget; the rest is data, latent caching and compiles. On CPU the VAE's
# convs dominate and its reconstructions bound every pixel metric, so it gets the larger share.
VAE_SHARE, DIT_SHARE = 0.5, 0.38
# Step caps for an accelerator run (`--minutes` large); on 2 CPU cores the time budget stops first.
VAE_STEPS, DIT_STEPS = 20_000, 40_000


def reference_configs(
    outdir: str | Path, minutes: float, *, num_train: int = 512, variant: str = "tiny"
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The VAE and DiT configs of a reference run with a total wall-time budget of `minutes`."""
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}; e.g. --minutes 50 on a 2-core CPU")
    outdir = Path(outdir).absolute()
    vae = vae_configs.get_config(f"variant={variant},runlocal=True")
    dit = dit_configs.get_config(f"variant={variant},runlocal=True")
    for c in (vae, dit):
        c.data.dir = str(outdir / "data")
        c.data.num_train = num_train
        # The benchmark's combinatorial split must stay unseen for its numbers to mean generalisation.
        c.data.exclude = format_combos(HELD_OUT_COMBOS)
        c.train.ckpt_every = 500
        c.train.progress = False
        c.train.log_every = 50
    vae.workdir, dit.workdir = str(outdir / "vae"), str(outdir / "dit")
    dit.vae_workdir = vae.workdir
    vae.data.batch_size, vae.data.crop_size = 4, 32
    vae.train.steps, dit.train.steps = VAE_STEPS, DIT_STEPS
    vae.train.max_minutes = VAE_SHARE * minutes
    dit.train.max_minutes = DIT_SHARE * minutes
    # Frame-conditioned prediction is the benchmark's main protocol: most examples see their first
    # k latent frames clean (k uniform in [1, T'-1]); a few see only frame 0; 30% stay text-only.
    dit.diffusion.mask_rates.first_k = 0.6
    dit.diffusion.mask_rates.first_frame = 0.1
    # Deterministic, near-exact continuation matters more here than diversity.
    dit.sample.guidance = 2.0
    return vae, dit
