"""Text-to-video DiT training config: get_config("variant=tiny,runlocal=True")."""

from __future__ import annotations

import ml_collections

from configs import common
from configs.video_data import video_data_config

VARIANTS = ("tiny", "S", "B", "wan2.1-1.3b", "wan2.1-14b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """DiT config for a variant; runlocal shrinks data and steps for a laptop/CI."""
    a = common.parse_arg(arg, variant="tiny", runlocal=False)
    if a.variant not in VARIANTS:
        raise ValueError(f"unknown DiT variant {a.variant!r}; choose one of {list(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.kind = "dit"
    c.variant = a.variant
    c.seed = 0
    c.workdir = "runs/dit"
    c.vae_workdir = "runs/vae"  # trained VAE whose latents the DiT learns
    # Overrides of the DiT variant's dataclass fields (see sora_jax.models.dit.dit_config).
    c.model = ml_collections.ConfigDict(
        {"patch_size": (1, 2, 2), "attention": "xla", "remat": "none", "scan_layers": True}
    )
    c.text = ml_collections.ConfigDict({"encoder_dir": "", "max_length": 24})
    c.data = common.data_config(runlocal=a.runlocal)
    c.data.batch_size = 16
    # "physics": the built-in dataset above, encoded into <workdir>/latents-<hash>/ on first use.
    # "video": real videos (data.video; per-bucket global batch sizes in data.video.buckets), read
    # from a cache written by `sora-jax cache-latents` and passed as data.latents.
    c.data.source = "physics"
    c.data.latents = ""  # a latent cache folder (sora-jax cache-latents); "" = build one for physics
    c.data.video = video_data_config()
    c.mesh = common.mesh_config()
    c.optim = common.optim_config(lr=5e-4 if a.variant == "tiny" else 1e-4, warmup=100)
    c.optim.ema_decay = 0.995 if a.runlocal else 0.9999
    c.diffusion = ml_collections.ConfigDict(
        {
            # "flow": rectified flow, velocity target eps - x0 (timestep_sampling/shift apply);
            # "ddpm": discrete VP diffusion with the `ddpm` fields below, sampled with DDIM.
            "objective": "flow",
            "timestep_sampling": "logit_normal",
            "shift": 1.0,
            # Resolution/duration-dependent shift: shift * sqrt(tokens / shift_base_tokens) per batch
            # shape (SD3's rule; each bucket's step gets its own). The base is Wan2.1's 480x832x81.
            "shift_by_resolution": False,
            "shift_base_tokens": 21 * 30 * 52,
            "ddpm": ml_collections.ConfigDict({
                "prediction": "epsilon",  # or "v_prediction"
                "beta_schedule": "linear",  # or "cosine"
                "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
            }),
            # Per-example loss weighting of either objective: none | min_snr | truncated_snr
            # (sora_jax/diffusion/weighting.py); snr_gamma is min-SNR's gamma.
            "weighting": "none",
            "snr_gamma": 5.0,
            "text_dropout": 0.1,  # classifier-free guidance: train unconditionally this often
            # Conditioning-mask strategies (sora_jax/diffusion/conditioning.py) per example: given
            # latent cells are fed clean and left out of the loss, so one model serves i2v, extend,
            # interpolate and inpaint. All 0 = plain text-to-video training (the default). An
            # Open-Sora-1.x-like mix: first_frame=0.1, first_k=0.05, last_k=0.025, both_ends=0.025,
            # random_frames=0.05, random_box=0.05 ("none" takes the remaining 0.7).
            "mask_rates": ml_collections.ConfigDict({
                "first_frame": 0.0, "first_k": 0.0, "last_k": 0.0, "both_ends": 0.0,
                "random_frames": 0.0, "random_box": 0.0,
            }),
            # With mask_rates on: given cells also get timestep 0 (per-cell timesteps, as Wan2.2
            # TI2V), so the network can tell conditioning from noisy input at every noise level;
            # samplers then hold them clean at timestep 0 too.
            "given_t0": False,
            # Foreground-weighted loss: latent cells more than fg_threshold (unit-scale latent
            # units) from the batch's per-cell median get weight 1 + fg_weight in a weighted mean
            # (diffusion/weighting.py foreground_cells). For small objects on a shared static
            # background, as physics_balls; 0 = the plain mean.
            "fg_weight": 0.0,
            "fg_threshold": 1.0,
        }
    )
    # solver "auto": euler for flow runs, ddim for DDPM runs; or euler | heun | unipc | ddim.
    c.sample = ml_collections.ConfigDict(
        {"solver": "auto", "steps": 30, "guidance": 4.0, "shift": 3.0, "fps": 8,
         # As diffusion.shift_by_resolution, for the sampling grid: shift * sqrt(tokens / base).
         "shift_by_resolution": False, "shift_base_tokens": 21 * 30 * 52}
    )
    c.train = common.train_config(steps=1500 if a.runlocal else 200_000)
    # Periodic evaluation (train.eval_every / train.sample_every > 0): held-out losses at fixed
    # noise levels on num_clips clips, and `videos` samples for held-out captions next to their
    # VAE reconstructions. latents: a held-out cache (`sora-jax cache-latents` on held-out videos);
    # "" = the physics test split, encoded into the run folder on first use. train_clips > 0: the
    # same losses on that many training clips (eval_train/...), the same noise draws: a held-out loss
    # pulling away from it as training goes on is the model memorising its clips (the two sets' mix
    # of content differs, so the gap at one step means little).
    c.eval = ml_collections.ConfigDict({"num_clips": 8, "videos": 4, "latents": "", "train_clips": 0})
    return c
