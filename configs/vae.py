"""Causal 3D VAE training config: get_config("variant=tiny,runlocal=True")."""

from __future__ import annotations

import ml_collections

from configs import common

# Width/depth per variant; wan2.1 is the exact AutoencoderKLWan architecture.
VARIANTS = {
    "tiny": dict(base_dim=16, z_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1),
    "S": dict(base_dim=64, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
    "B": dict(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
    "wan2.1": dict(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """VAE config for a variant; runlocal shrinks data and steps for a laptop/CI."""
    a = common.parse_arg(arg, variant="tiny", runlocal=False)
    if a.variant not in VARIANTS:
        raise ValueError(f"unknown VAE variant {a.variant!r}; choose one of {sorted(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.kind = "vae"
    c.variant = a.variant
    c.seed = 0
    c.workdir = "runs/vae"
    c.model = ml_collections.ConfigDict(
        dict(VARIANTS[a.variant], temporal_downsample=(False, True, True), dropout=0.0)
    )
    c.data = common.data_config(runlocal=a.runlocal)
    # Spatial crops are cheap and lose little: weights trained on 32-px crops reconstruct 64-px
    # frames at the crops' own level. Temporal crops are not: the causal zero padding and the first
    # frame's latent of its own make each latent frame's context depend on its index, and a VAE
    # trained on 5-frame crops (2 latent frames) reconstructed latent frames 2-4 of 17-frame clips
    # ~4.5 dB worse than 0-1 (docs/benchmarks.md). 0 trains on whole clips (data.frames); else 4k+1.
    c.data.crop_frames = 0
    c.data.crop_size = 32
    c.data.batch_size = 8
    c.mesh = common.mesh_config()
    c.optim = common.optim_config(lr=1e-3 if a.variant == "tiny" else 2e-4, warmup=50)
    c.optim.ema_decay = 0.0  # EMA of a VAE is rarely worth its memory; 0 disables
    # sample_posterior decodes z ~ N(mean, exp(logvar)) as the VAE objective says; False would train
    # the mean path only (KL still regularising it). In a 400-step A/B on 2,048 clips, True reached
    # 15.2 dB held-out and False 11.8 dB, so sampling stays on.
    c.loss = ml_collections.ConfigDict({"l1": 1.0, "l2": 1.0, "kl": 1e-6, "sample_posterior": True})
    # Foreground weighting: L1/L2 become weighted means, 1 + fg_weight on pixels more than
    # fg_threshold (in [-1, 1] units) off the frame's median colour, grown by fg_dilate pixels.
    # 0 disables it. On physics_balls the objects are a few percent of the pixels, so the plain mean
    # barely charges for colour bleeding where balls touch (docs/benchmarks.md, VAE A/B).
    c.loss.fg_weight = 0.0
    c.loss.fg_threshold = 0.1
    c.loss.fg_dilate = 1
    # Adversarial loss (hinge, 3D PatchGAN): the generator adds adv * -mean(D(recon)) from step
    # adv_start on. A fixed weight, not VQGAN's adaptive one: that needs the gradient norms of
    # both losses at the decoder's last layer, a second backward pass. 0 disables the
    # discriminator entirely (no state, no checkpoint entry); values > 0 are untuned here. The
    # warm-up (VQGAN's disc_start) lets L1/KL shape the decoder before a discriminator does.
    c.loss.adv = 0.0
    c.loss.adv_start = 300 if a.runlocal else 20_000
    c.disc = ml_collections.ConfigDict(
        dict(channels=32 if a.variant == "tiny" else 64, num_layers=3, max_mult=8, temporal_kernel=3, num_groups=8)
    )
    # GAN-style Adam moments (b1=0.5, b2=0.9 as in VQGAN); its own schedule, counted in its own
    # updates (so its warmup starts at adv_start).
    c.disc_optim = common.optim_config(lr=2e-4 if a.variant == "tiny" else 1e-4, warmup=50)
    c.disc_optim.update(b1=0.5, b2=0.9, weight_decay=0.0, ema_decay=0.0)
    c.train = common.train_config(steps=600 if a.runlocal else 100_000)
    c.eval = ml_collections.ConfigDict({"num_clips": 16})
    return c
