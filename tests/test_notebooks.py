"""The Colab notebooks run top to bottom in a fresh kernel (papermill) with their SMOKE parameters.

quickstart, train_physics and sharding_layouts execute end to end; wan2_1_inference executes every cell
but its download against a tiny random diffusers WanPipeline. Kernels share one JAX compilation cache
(a fresh temporary folder per session), so a program compiled by one notebook is loaded by the next.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import nbformat
import papermill
import pytest

COLAB = Path(__file__).resolve().parents[1] / "colab"
DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")
# Notebooks that train run on one CPU device, as a fresh Colab CPU runtime has; the sharding and Wan
# notebooks keep the 8 simulated devices of conftest, so their meshes split weights for real.
ONE_DEVICE = {"quickstart.ipynb", "train_physics.ipynb"}


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_compile_cache")


def execute(name: str, tmp_path: Path, monkeypatch, compile_cache: Path, parameters: dict, *,
            source: Path | None = None) -> nbformat.NotebookNode:
    """Run a notebook in a new kernel (cwd tmp_path) and return the executed notebook; any cell error fails."""
    # The kernel inherits this process's environment when it starts.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compile_cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if name in ONE_DEVICE:
        monkeypatch.setenv("XLA_FLAGS", DEVICE_FLAG.sub("", os.environ.get("XLA_FLAGS", "")).strip())
    out = tmp_path / f"executed_{name}"
    papermill.execute_notebook(str(source or COLAB / name), str(out), parameters=parameters, cwd=str(tmp_path),
                               kernel_name="python3", progress_bar=False, log_output=False)
    return nbformat.read(out, as_version=4)


def outputs(nb: nbformat.NotebookNode, kind: str) -> list[str]:
    """Every output of `kind` ("text/html", "image/png", "stream", ...) in cell order, as text."""
    found = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if kind == "stream" and o.output_type == "stream":
                found.append(o.text)
            elif kind in o.get("data", {}):
                found.append(str(o.data[kind]))
    return found


def test_notebooks_start_with_requirements_and_a_parameters_cell():
    for path in sorted(COLAB.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and "Needs" in first.source, f"{path.name}: first cell says what it needs"
        assert "CPU" in first.source and "TPU" in first.source, f"{path.name}: first cell gives the time per runtime"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "SMOKE = False" in tagged[0].source, path.name
        for cell in nb.cells:
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name}: clear outputs"


def test_quickstart(tmp_path, monkeypatch, compile_cache):
    nb = execute("quickstart.ipynb", tmp_path, monkeypatch, compile_cache,
                 {"SMOKE": True, "WORKDIR": str(tmp_path / "run")})
    html = "\n".join(outputs(nb, "text/html"))
    # 4 data clips, 3 text-to-video samples, the input clip and the five modes.
    assert html.count("<video") == 4 + 3 + 6
    for mode in ("i2v", "extend", "interpolate", "inpaint", "sdedit"):
        assert f">{mode}</figcaption>" in html
    assert (tmp_path / "run" / "dit" / "ckpt").is_dir()


def test_train_physics(tmp_path, monkeypatch, compile_cache):
    logdir = tmp_path / "run"
    try:
        nb = execute("train_physics.ipynb", tmp_path, monkeypatch, compile_cache,
                     {"SMOKE": True, "WORKDIR": str(logdir)})
    finally:
        stop_tensorboards(logdir)
    text = "\n".join(outputs(nb, "stream"))
    assert "1 cpu device(s) -> mesh {'data': 1" in text
    assert re.search(r"part 2 resumed after step 1 \(first logged step 2\) and ended at step 2", text), text
    # The VAE plot and the DiT plot, each redrawn in place as rows arrived.
    assert len(outputs(nb, "image/png")) >= 2
    board = "\n".join(outputs(nb, "text/html") + outputs(nb, "stream"))
    assert "<iframe" in board or "localhost:" in board, "the %tensorboard cell showed no TensorBoard"
    assert "ERROR" not in board and "Timed out" not in board
    assert list((logdir / "dit" / "tb").glob("events.*")) and list((logdir / "vae" / "tb").glob("events.*"))


def stop_tensorboards(logdir: Path) -> None:
    """Stop the TensorBoard servers that %tensorboard started for `logdir` (they outlive the kernel)."""
    from tensorboard import manager

    for info in manager.get_all():
        if str(logdir) in info.logdir:
            try:
                os.kill(info.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_sharding_layouts(tmp_path, monkeypatch, compile_cache):
    if not (COLAB / "sharding_layouts.ipynb").exists():
        pytest.fail("colab/sharding_layouts.ipynb is missing")
    nb = execute("sharding_layouts.ipynb", tmp_path, monkeypatch, compile_cache, {"SMOKE": True})
    assert outputs(nb, "image/png"), "the layout plot was not drawn"


def test_wan2_1_inference_every_cell_but_the_download(tmp_path, monkeypatch, compile_cache):
    from sora_jax.bench.wan_tiny import save_wan_pipeline

    nb = nbformat.read(COLAB / "wan2_1_inference.ipynb", as_version=4)
    download = [c for c in nb.cells if "skip-ci" in c.metadata.get("tags", [])]
    assert len(download) == 1 and "huggingface-cli download" in download[0].source
    nb.cells = [c for c in nb.cells if c is not download[0]]
    source = tmp_path / "wan2_1_inference_no_download.ipynb"
    nbformat.write(nb, source)
    _, wan_dir = save_wan_pipeline("tiny", tmp_path / "tiny_wan")
    out_dir = tmp_path / "converted"
    nb = execute("wan2_1_inference.ipynb", tmp_path, monkeypatch, compile_cache,
                 {"SMOKE": True, "WAN_DIR": str(wan_dir), "OUT_DIR": str(out_dir)}, source=source)
    text = "\n".join(outputs(nb, "stream"))
    assert "converted" in text and (out_dir / "pipeline.json").is_file()
    # 8 simulated devices: the DiT's weights are split over them, the VAE's are not.
    assert "8 cpu device(s), mesh {'data': 1, 'fsdp': 8" in text
    dit = re.search(r"DiT\s+weights\s+([\d.]+) MiB,\s+([\d.]+) MiB on each device", text)
    vae = re.search(r"VAE\s+weights\s+([\d.]+) MiB,\s+([\d.]+) MiB on each device", text)
    assert dit and vae, text
    assert float(dit[2]) < float(dit[1]) and float(vae[2]) == float(vae[1])
    assert "5 frames of 16x32" in text
    assert "\n".join(outputs(nb, "text/html")).count("<video") == 1
    assert (tmp_path / "wan_sample.mp4").is_file()
