"""Two JAX processes on localhost (CPU, gloo collectives), 4 devices each: real sharded DiT train steps
through the library's loader, step and loop, an Orbax checkpoint written by both, and a resume.

The test starts this file as a script twice per run (process 0 and 1), the way `sora-jax train
--coordinator/--num-processes/--process-id` joins a run; each child prints one JSON line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

NUM_RECORDS = 32
GLOBAL_BATCH = 8
TIMEOUT_S = 420


class IndexedClips:
    """Deterministic uint8 clips; pixel (0, 0, 0, 0) holds the record index so a batch names its records."""

    def __len__(self) -> int:
        return NUM_RECORDS

    def __getitem__(self, index: int) -> dict:
        video = np.random.default_rng(index).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
        video[0, 0, 0, 0] = index
        return {"video": video, "caption": f"clip {index}"}

    def __repr__(self) -> str:
        return f"IndexedClips({NUM_RECORDS})"


def _child(workdir: str, coordinator: str, process_id: int) -> None:
    """One process of the run: join, train 2 steps, restore from the checkpoint, train 2 more, print JSON."""
    from sora_jax.parallel.distributed import cluster_spec, initialize

    initialize(cluster_spec(coordinator, 2, process_id))  # before any device use, as the CLI does

    import jax
    import jax.numpy as jnp

    from configs.dit import get_config
    from sora_jax.config_overrides import apply_overrides
    from sora_jax.data.pipeline import make_loader
    from sora_jax.models.dit import DiT, dit_config
    from sora_jax.parallel.mesh import batch_sharding, global_batch
    from sora_jax.train import checkpoint
    from sora_jax.train.dit_trainer import make_dit_step
    from sora_jax.train.loop import train_sharded
    from sora_jax.train.setup import mesh_and_rules, per_process_batch
    from sora_jax.train.state import create_sharded_state, make_optimizer

    config = apply_overrides(get_config("variant=tiny"), [
        f"--config.workdir={workdir}", "--config.train.log_every=1", "--config.train.ckpt_every=2",
        "--config.train.progress=false", f"--config.data.batch_size={GLOBAL_BATCH}",
        "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=-1", "--config.optim.warmup_steps=1",
    ])
    mesh, rules = mesh_and_rules(config)
    local_batch = per_process_batch(config.data.batch_size, mesh)
    # The DiT denoises the clips themselves (3 channels, 1x8x8): the trainer's path minus the VAE.
    model = DiT(dit_config("tiny", num_layers=1, ffn_dim=64, in_channels=3, out_channels=3, text_dim=8))
    text_len = 4
    dummy = (jnp.zeros((8, 1, 8, 8, 3)), jnp.zeros((8,)), jnp.zeros((8, text_len, 8)), jnp.ones((8, text_len), bool))
    state, shardings = create_sharded_state(
        lambda k: model.init({"params": k}, *dummy), make_optimizer(config.optim, 4),
        float(config.optim.ema_decay), mesh, rules, jax.random.key(0),
    )
    seen: list[int] = []

    def to_device(batch):
        seen.extend(int(i) for i in np.rint((batch["video"][:, 0, 0, 0, 0] + 1.0) * 127.5))
        b = batch["video"].shape[0]
        text = np.ones((b, text_len, 8), np.float32)
        return global_batch(mesh, {"latents": batch["video"], "text": text, "text_mask": np.ones((b, text_len), bool)})

    step_fn = make_dit_step(model, config.diffusion)
    manager = checkpoint.make_manager(Path(workdir) / "ckpt", keep=2)

    def train(state, data_iter, steps):
        train_cfg = config.train.copy_and_resolve_references()
        train_cfg.steps = steps
        state, logger = train_sharded(
            step=step_fn, state=state, state_shardings=shardings,
            batch_shardings={k: batch_sharding(mesh, n) for k, n in (("latents", 5), ("text", 3), ("text_mask", 2))},
            mesh=mesh, rules=rules, data_iter=data_iter, to_device=to_device, train_cfg=train_cfg,
            manager=manager, logdir=Path(workdir) / "tb", rng=jax.random.key(1), desc="multihost",
        )
        return state, [row["loss"] for row in logger.history]

    # A jitted reduction over the sharded params: every process gets the same replicated scalar.
    digest = jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32) * (i + 1)) for i, x in enumerate(jax.tree.leaves(p))))
    trained, losses1 = train(state, iter(make_loader(IndexedClips(), batch_size=local_batch, seed=0)), 2)
    seen1, seen[:] = list(seen), []
    digests = [float(digest(trained.params))]
    # As after a restart: an abstract target (shapes + shardings only) and a fresh loader iterator;
    # the values and the data position come from the checkpoint both processes wrote.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trained)
    data_iter = iter(make_loader(IndexedClips(), batch_size=local_batch, seed=0))
    restored = checkpoint.restore(manager, abstract, data_iter)
    digests.append(float(digest(restored.params)))
    restored_step = int(restored.step)  # read now: the step donates the state
    resumed, losses2 = train(restored, data_iter, 4)
    digests.append(float(digest(resumed.params)))
    manager.close()
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
        "local_devices": jax.local_device_count(), "restored_step": restored_step, "step": int(resumed.step),
        "losses": [losses1, losses2], "seen": [seen1, list(seen)], "digests": digests,
        "ckpt_steps": sorted(manager.all_steps()),
        "tb": sorted(os.listdir(Path(workdir) / "tb")) if (Path(workdir) / "tb").exists() else [],
    }), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir: Path) -> list[dict]:
    """Run both processes to completion; fail with each one's output tail on error or timeout."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    coordinator = f"localhost:{_free_port()}"
    logs = [workdir.parent / f"{workdir.name}-p{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, __file__, str(workdir), coordinator, str(i)],
                         stdout=open(logs[i], "w"), stderr=subprocess.STDOUT, env=env)
        for i in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n" + logs[i].read_text()[-3000:]
                      for i, p in enumerate(procs))
    assert all(p.returncode == 0 for p in procs), f"a process failed or timed out after {TIMEOUT_S} s:\n{tails}"
    results = []
    for log in logs:
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
        assert lines, f"no RESULT line:\n{tails}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def test_two_processes_train_save_and_resume(tmp_path):
    results = _launch(tmp_path / "run")
    for i, r in enumerate(results):
        assert (r["process"], r["processes"], r["devices"], r["local_devices"]) == (i, 2, 8, 4)
        assert r["restored_step"] == 2 and r["step"] == 4 and r["ckpt_steps"] == [2, 4]
        assert [len(x) for x in r["losses"]] == [2, 2] and all(np.isfinite(r["losses"][0] + r["losses"][1]))
    p0, p1 = results
    # One program on one global batch: both processes see the same losses and parameters.
    assert p0["losses"] == p1["losses"] and p0["digests"] == p1["digests"]
    # The restore brought back exactly the saved parameters; training then moved them.
    assert p0["digests"][0] == p0["digests"][1] != p0["digests"][2]
    # Each process read only its own shard (4 of the 8 clips per step), no record twice, and the
    # restored iterator went on where the first two steps stopped.
    for r in results:
        flat = r["seen"][0] + r["seen"][1]
        assert len(r["seen"][0]) == len(r["seen"][1]) == 2 * GLOBAL_BATCH // 2 and len(set(flat)) == len(flat)
    assert not set(p0["seen"][0] + p0["seen"][1]) & set(p1["seen"][0] + p1["seen"][1])
    assert len(p0["tb"]) == 2, p0["tb"]  # one event file per train_sharded call, all from process 0


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
