"""Test setup: 8 simulated CPU devices so meshes in tests are real meshes."""

import os

# Once: pytest-xdist workers inherit the flag from the controlling process, which imported this too.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Tests are compile-bound (tiny shapes, many programs), and LLVM at -O0 compiles faster: the suite on
# 2 cores took 819 s against 1300 s at XLA's default level 3. Results move at rounding level (max
# |diff| / max |x| against level 3: 2e-7 on a tiny DiT forward, 1e-5 on a random-init VAE decode). A
# level already in XLA_FLAGS is kept: `--xla_backend_optimization_level=3` tests the optimised code.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


def tiny_overrides(root) -> list[str]:
    """Config overrides for a seconds-long run on 8 simulated devices (mesh data=2 x fsdp=4)."""
    return [
        f"--config.data.dir={root}/data",
        "--config.data.size=32",
        "--config.data.frames=5",
        "--config.data.num_train=16",
        "--config.data.num_test=4",
        "--config.data.batch_size=8",
        "--config.data.worker_count=0",
        "--config.mesh.shape.data=2",
        "--config.mesh.shape.fsdp=4",
        "--config.train.steps=2",
        "--config.train.log_every=1",
        "--config.train.progress=false",
    ]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A VAE run and a DiT run trained for a couple of steps; shared by CLI/pipeline tests.

    Under pytest-xdist the first worker to ask trains them in the run's shared temporary folder and
    the others wait for it and load the result, instead of each spending minutes on the same runs.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _train_tiny_runs(tmp_path_factory.mktemp("runs"))
    import pickle

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this run
    result = shared / "tiny_runs.pkl"
    with FileLock(f"{result}.lock"):
        if not result.is_file():
            root = shared / "tiny_runs"
            root.mkdir(exist_ok=True)
            out = _train_tiny_runs(root)
            tmp = result.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(out))
            tmp.replace(result)
    return pickle.loads(result.read_bytes())


def _train_tiny_runs(root):
    from sora_jax.config_overrides import apply_overrides, load_config
    from sora_jax.train.dit_trainer import train_dit
    from sora_jax.train.vae_trainer import train_vae

    vae_cfg = apply_overrides(
        load_config("vae"),
        # Pure data parallel here: the sharded (fsdp) step is covered in test_train, and the VAE's
        # fsdp compile on 8 simulated devices costs ~30 s more.
        tiny_overrides(root) + [f"--config.workdir={root}/vae", "--config.data.crop_frames=5",
                                "--config.mesh.shape.data=8", "--config.mesh.shape.fsdp=1",
                                "--config.mesh.rules=data",
                                "--config.data.crop_size=16", "--config.eval.num_clips=4",
                                # The periodic held-out hooks, at the last step only.
                                "--config.train.eval_every=2", "--config.train.sample_every=2"],
    )
    vae_out = train_vae(vae_cfg)
    dit_cfg = apply_overrides(
        load_config("dit"),
        tiny_overrides(root) + [f"--config.workdir={root}/dit", f"--config.vae_workdir={root}/vae",
                                "--config.sample.steps=2",
                                # Held-out losses after both steps, sample videos after the last.
                                "--config.train.eval_every=1", "--config.train.sample_every=2",
                                "--config.eval.num_clips=8", "--config.eval.videos=2",
                                "--config.eval.train_clips=8"],
    )
    dit_out = train_dit(dit_cfg)
    # Runs that tests derive from this config (other objectives, other data) skip the periodic
    # hooks: those are tested on this run, and each derived run would compile them again.
    derive = dit_cfg.copy_and_resolve_references()
    derive.train.eval_every = derive.train.sample_every = 0
    return {"root": root, "vae": vae_out, "dit": dit_out, "vae_cfg": vae_cfg, "dit_cfg": derive,
            "dit_run_cfg": dit_cfg}
