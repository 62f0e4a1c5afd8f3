"""Seconds per DiT S forward pass on this CPU at the reference's 320 tokens, batch 2 (a guided pair).

    python docs/device_runs/h100_s_z16fg20/s_forward_cpu.py      # session 26, 2 cores, quiet: 0.25 s f32, 0.26 s bf16
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.dit import DiT, dit_config

for dtype in (jnp.float32, jnp.bfloat16):
    model = DiT(dit_config("S", in_channels=16, out_channels=16, text_dim=384, dtype=dtype))
    args = (jnp.zeros((2, 5, 16, 16, 16)), jnp.ones((2,)), jnp.zeros((2, 32, 384)), jnp.ones((2, 32), bool))
    params = jax.jit(lambda k: nn.meta.unbox(model.init({"params": k}, *args)))(jax.random.key(0))
    forward = jax.jit(model.apply)
    forward(params, *args).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        forward(params, *args).block_until_ready()
    print(jnp.dtype(dtype).name, f"{(time.perf_counter() - start) / 5:.2f} s")
