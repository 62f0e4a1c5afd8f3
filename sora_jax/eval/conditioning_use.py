"""Does a frame-conditioned DiT use its conditioning frames? A latent-space model diagnostic.

The pixel metrics of `eval-physics` say how far a prediction is from the truth, not why. A DiT that
ignores its conditioning frames and one that uses them but cannot extrapolate motion can score alike
there. This check tells them apart in latent space. For each scene:
- encode the true clip, hold its first k latent frames as the sampler holds given cells (clean at
  timestep 0 for a `given_t0` run, noised to sigma otherwise);
- noise the rest to sigma with fixed noise;
- score the network's one-step clean estimate x_t - sigma v on the free frames against the truth.

Then it does the same with the first k latent frames of another scene. The gap between the two MSEs
(`other - own`) measures how much the prediction depends on the scene's own conditioning, and it
matters most at high sigma, where the noisy target itself carries little. Reference predictors on
the same frames: zeros (the latents are normalized) and the last conditioning latent frame repeated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion import conditioning as lc
from sora_jax.diffusion import flow
from sora_jax.diffusion.samplers import Conditioning, guided_prediction
from sora_jax.models.dit import DiTDenoiser

SIGMAS = (0.5, 0.8, 0.9, 0.95, 0.98)


def conditioning_use(t2v: Any, scenes: Sequence[dict], k_latent: int, *, sigmas: Sequence[float] = SIGMAS,
                     seed: int = 0) -> dict:
    """Per sigma, the x0-estimate MSE on the free latent frames with each scene's own and another scene's
    first `k_latent` latent frames given; plus the zeros and copy-last-latent MSEs (see module doc)."""
    if len(scenes) < 2:
        raise ValueError(f"conditioning_use needs at least 2 scenes to swap conditioning between, got {len(scenes)}")
    z = jnp.concatenate([t2v.encode_video(np.asarray(s["video"])) for s in scenes])  # [N, T', H', W', C]
    if not 1 <= k_latent < z.shape[1]:
        raise ValueError(f"k_latent {k_latent} leaves no free latent frame of {z.shape[1]}; use 1..{z.shape[1] - 1}")
    text, text_mask = t2v.encode_prompts([s["caption"] for s in scenes])
    # Guidance 1 evaluates the conditional branch only; the null text slots are never used.
    texts = Conditioning(text, text_mask, text, text_mask)
    eps = jax.random.normal(jax.random.key(seed), z.shape)
    t0 = bool(t2v.defaults.get("given_t0", False))
    denoiser = DiTDenoiser(t2v.dit_cfg)

    def mse(given: jax.Array, sigma: float) -> float:
        return float(_x0_error(t2v.dit_params, z, given, eps, texts, jnp.float32(sigma),
                               denoiser=denoiser, k_latent=k_latent, t0=t0))

    other = jnp.roll(z, 1, axis=0)  # scene i conditioned on scene i-1's frames
    own_mse = [mse(z, s) for s in sigmas]
    other_mse = [mse(other, s) for s in sigmas]
    free = z[:, k_latent:]
    return {
        "sigmas": [float(s) for s in sigmas], "own": own_mse, "other": other_mse,
        "gap": [o - w for o, w in zip(other_mse, own_mse)],
        "zeros": float(jnp.mean(free ** 2)),
        "copy_last": float(jnp.mean((z[:, k_latent - 1:k_latent] - free) ** 2)),
        "scenes": len(scenes), "k_latent": k_latent, "given_t0": t0,
    }


# Module level with the model and k static: every call of the same shapes (own and swapped frames,
# each sigma, later checkpoints of the same run) reuses one compiled program, and the latents,
# noise and text are arguments rather than constants baked into it.
@functools.partial(jax.jit, static_argnames=("denoiser", "k_latent", "t0"))
def _x0_error(params: Any, z: jax.Array, given: jax.Array, eps: jax.Array, texts: Conditioning, sigma: jax.Array,
              *, denoiser: DiTDenoiser, k_latent: int, t0: bool) -> jax.Array:
    """MSE of the one-step clean estimate on z's free latent frames, with `given`'s first k frames held."""
    cond = dataclasses.replace(lc.first_frames(z.shape, given[:, :k_latent]), t0=t0)
    x = lc.hold(flow.add_noise(z, eps, sigma), cond, eps, sigma)  # [scenes, T', H', W', C]
    t = lc.network_timesteps(cond, sigma * flow.TIME_SCALE)
    v = guided_prediction(denoiser, params, x, t, texts, 1.0)
    x0 = x - sigma * v
    return jnp.mean((x0[:, k_latent:] - z[:, k_latent:]) ** 2)
