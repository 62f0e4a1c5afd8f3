"""Size of a DiT S export (bf16 and f32), from a randomly initialised S saved as a run (session 26, CPU).

    python docs/device_runs/h100_s_z16fg20/export_size.py /tmp/sexp     # 43.9 MiB bf16, 104.4 MiB f32
"""
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models.dit import DiT, dit_config
from sora_jax.train import checkpoint
from sora_jax.train.export import export_dit_run
from sora_jax.train.setup import dataclass_to_json

root = Path(sys.argv[1]) / "run"
cfg = dit_config("S", in_channels=16, out_channels=16, text_dim=384, dtype=jnp.bfloat16)  # as the z16 reference run
dummy = (jnp.zeros((1, 1, 2, 2, 16)), jnp.ones((1,)), jnp.zeros((1, 32, 384)), jnp.ones((1, 32), bool))
params = jax.jit(lambda k: nn.meta.unbox(DiT(cfg).init({"params": k}, *dummy)))(jax.random.key(0))
checkpoint.save_params(root / "ckpt", params, step=1)
checkpoint.write_json_atomic(root / "dit_config.json", dataclass_to_json(cfg))
checkpoint.write_json_atomic(root / "run.json", {"vae_workdir": "/absent", "text_max_length": 32})
for dtype in ("bfloat16", "float32"):
    out = export_dit_run(root, root.parent / dtype, dtype=dtype, include_vae=False)
    print(dtype, f"{out['params']:,} parameters, {out['bytes'] / 2**20:.1f} MiB in {out['files']} files")
