"""With libtpu installed (README's install has the tpu extra) on a machine without an accelerator, commands
start without libtpu's TPU-discovery error block, and a platform the user chose is left alone."""

import importlib.util
import os
import subprocess
import sys

import pytest

_PROBE = """
import jax
from jax._src import hardware_utils
print(hardware_utils.num_available_tpu_chips_and_device_id()[0] + int(hardware_utils.has_visible_nvidia_gpu()))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return {**env, **extra}


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(**env), timeout=300)


@pytest.fixture(scope="module")
def cpu_only_with_libtpu():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (the tpu extra), so there is no error block to avoid")
    if int(_python(_PROBE).stdout.strip().splitlines()[-1]) > 0:
        pytest.skip("this machine has an accelerator; JAX's own choice is kept there")


def test_a_bad_mesh_on_a_cpu_machine_is_one_line(cpu_only_with_libtpu, tmp_path):
    # Building the mesh queries the devices, which starts JAX's backends; the error itself is the usual one line.
    cmd = [sys.executable, "-m", "sora_jax.cli", "train-vae", "--config.mesh.shape.data=3",
           "--config.mesh.shape.fsdp=1", f"--config.data.dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr[:2000]
    assert "needs 3 devices but 1 are available" in r.stderr


def test_a_chosen_platform_and_started_backends_are_left_alone(cpu_only_with_libtpu):
    code = """
import jax
from sora_jax.parallel.backends import skip_absent_tpu
print(skip_absent_tpu(), jax.config.jax_platforms)
"""
    assert _python(code, JAX_PLATFORMS="cpu").stdout.split()[-2:] == ["False", "cpu"]
    started = """
import jax
from sora_jax.parallel.backends import skip_absent_tpu
jax.devices()
print(skip_absent_tpu(), jax.config.jax_platforms)
"""
    assert _python(started).stdout.split()[-2:] == ["False", "None"]
    fresh = "from sora_jax.parallel.backends import skip_absent_tpu; import jax; print(skip_absent_tpu(), jax.devices()[0].platform)"
    r = _python(fresh)
    assert r.stdout.split()[-2:] == ["True", "cpu"], r.stderr[-2000:]
    assert "E0000" not in r.stderr
