"""Pieces shared by the VAE and DiT configs: arg parsing, mesh, data, optimiser."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse "variant=tiny,runlocal=True" into a ConfigDict over the given defaults."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} must look like key=value (e.g. variant=tiny)")
        key, value = item.split("=", 1)
        if key not in out:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(out.keys())}")
        default = out[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} must be true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = type(default)(value)
    return out


def mesh_config() -> ml_collections.ConfigDict:
    """Default mesh: every device of a slice on fsdp, slices (multi-slice TPU) on data.

    shape: each axis's size within a slice (ICI); dcn: its size across slices (data-center network).
    One -1 per dict means "the rest". rules: dp | fsdp | fsdp_tp | fsdp_sp (sora_jax/parallel/rules.py).
    """
    return ml_collections.ConfigDict(
        {
            "shape": {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1},
            "dcn": {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1},
            "rules": "fsdp",
        }
    )


def data_config(*, runlocal: bool) -> ml_collections.ConfigDict:
    """The built-in physics_balls dataset."""
    return ml_collections.ConfigDict(
        {
            "name": "physics_balls",
            "dir": "data",
            "size": 64,
            "frames": 17,
            "num_train": 512 if runlocal else 20000,
            "num_test": 32 if runlocal else 1000,
            "seed": 0,
            # (colour, count) pairs no clip has, e.g. "red3,cyan1": the physics benchmark's `combo` split
            # (`sora_jax.eval.physics_scenes.HELD_OUT_COMBOS`) stays unseen; configs/physics_reference sets it.
            "exclude": "",
            # Share of clips simulated without gravity; the benchmark's uniform and collision families
            # have none (configs/physics_reference sets it).
            "zero_gravity": 0.0,
            "batch_size": 8,  # global, over all processes
            "worker_count": 0 if runlocal else 4,
        }
    )


def optim_config(lr: float, warmup: int) -> ml_collections.ConfigDict:
    """AdamW with linear warmup, cosine decay, clipping and EMA."""
    return ml_collections.ConfigDict(
        {
            "lr": lr,
            "warmup_steps": warmup,
            "decay_steps": 0,  # length of the LR schedule; 0: train.steps
            # "budget": the decay also follows the wall time against train.max_minutes, ending
            # decayed when the budget stops the run first (sora_jax.train.state.make_optimizer);
            # with train.max_minutes 0 it is the steps schedule.
            "schedule_clock": "steps",
            "min_lr_ratio": 0.1,
            "weight_decay": 0.01,
            "b1": 0.9,
            "b2": 0.99,
            "grad_clip": 1.0,
            "ema_decay": 0.999,
        }
    )


def train_config(steps: int) -> ml_collections.ConfigDict:
    """Loop length, logging and checkpoint cadence."""
    return ml_collections.ConfigDict(
        {
            "steps": steps,
            "max_minutes": 0.0,  # > 0: also stop after this much wall time
            "log_every": 10,
            "ckpt_every": 200,
            "keep": 3,
            "progress": True,
            # Microbatches per step: the batch is split and gradients summed before one update,
            # so data.batch_size stays the global batch while activation memory shrinks.
            "grad_accum": 1,
            # Compute dtype of the model ("auto": bfloat16 on TPU/GPU, float32 on CPU); params,
            # optimiser state and EMA stay float32 whatever this says.
            "dtype": "auto",
            "eval_every": 0,  # > 0: held-out loss every this many steps (TensorBoard eval/...)
            "sample_every": 0,  # > 0: sample videos to TensorBoard every this many steps
        }
    )
