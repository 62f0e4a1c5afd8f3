"""A loaded `TextToVideo` laid over a device mesh, so a model too large for one chip samples across several.

The DiT and text-encoder weights are sharded by their logical axis names under a rules preset
(`sora_jax.parallel.rules`; "fsdp" splits their width over every device), the VAE is replicated.
`TextToVideo.generate` then runs unchanged: its jitted sampler and decoder take their layout from the
weights, and the small inputs (noise, text tokens) follow them onto the mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sora_jax.models.dit import DiT
from sora_jax.models.text.t5 import T5Encoder
from sora_jax.parallel.mesh import logical_shardings, make_mesh, replicated
from sora_jax.parallel.rules import get_rules
from sora_jax.pipeline import TextToVideo


def default_mesh() -> Mesh:
    """Every device of the runtime on the fsdp axis (1 CPU, 1 GPU or the cores of a TPU host)."""
    return make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})


def shard_pipeline(t2v: TextToVideo, mesh: Mesh | None = None, rules: str = "fsdp") -> TextToVideo:
    """A copy of `t2v` whose DiT (and umT5) weights are sharded over `mesh` by `rules`, the VAE's replicated."""
    mesh = mesh or default_mesh()
    preset = get_rules(rules)
    cfg, text_len = t2v.dit_cfg, t2v.defaults["text_max_length"]
    dummy = (jnp.zeros((1, *cfg.patch_size, cfg.in_channels)), jnp.zeros((1,)),
             jnp.zeros((1, text_len, cfg.text_dim)), jnp.ones((1, text_len), bool))
    dit_boxed = jax.eval_shape(lambda: DiT(cfg).init({"params": jax.random.key(0)}, *dummy))
    dit_params = jax.device_put(t2v.dit_params, logical_shardings(dit_boxed, mesh, preset))
    text_encoder = t2v.text_encoder
    if hasattr(text_encoder, "config") and hasattr(text_encoder, "params"):  # umT5 of a converted Wan pipeline
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        t5_boxed = jax.eval_shape(T5Encoder(text_encoder.config).init, jax.random.key(0), ids, ids)
        text_encoder = dataclasses.replace(
            text_encoder, params=jax.device_put(text_encoder.params, logical_shardings(t5_boxed, mesh, preset)))
    vae_params = jax.device_put(t2v.vae_params, replicated(mesh))
    return dataclasses.replace(t2v, vae_params=vae_params, dit_params=dit_params, text_encoder=text_encoder)
