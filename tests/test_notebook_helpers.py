"""The library pieces the Colab notebooks use: device-fitted configs, metric observers, loss plot, inline video."""

import base64
import re

import jax
import numpy as np
import pytest

from configs import dit as dit_configs
from sora_jax.notebook import LossPlot, fit_to_devices, video_html
from sora_jax.train.metrics import MetricLogger, observe


def test_fit_to_devices_lays_the_batch_over_every_device():
    from sora_jax.train.setup import mesh_and_rules

    config = dit_configs.get_config("variant=tiny,runlocal=True")
    config.data.batch_size = 12
    fitted = fit_to_devices(config, 8)
    assert dict(fitted.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}
    assert fitted.data.batch_size == 16 and fitted.mesh.rules == "data"
    assert config.data.batch_size == 12 and config.mesh.shape.fsdp == -1  # the original is untouched
    assert fit_to_devices(config, 1).data.batch_size == 12
    mesh, _ = mesh_and_rules(fit_to_devices(config))  # jax.device_count(): the 8 devices of conftest
    assert mesh.shape["data"] == jax.device_count()
    with pytest.raises(ValueError, match="positive device count"):
        fit_to_devices(config, -2)


def test_observe_feeds_the_loss_plot_only_inside_the_block(tmp_path):
    plot = LossPlot()
    logger = MetricLogger(tmp_path / "tb", total_steps=3, progress=False)
    with observe(plot.observer("run a")):
        logger.log(1, {"loss": 2.0, "grad_norm": 1.0})
        logger.log(2, {"loss": 0.5})
    logger.log(3, {"loss": 0.25})
    logger.close()
    assert plot.runs == {"run a": [(1, 2.0), (2, 0.5)]}
    line = plot.axes.get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), [1, 2])
    np.testing.assert_array_equal(line.get_ydata(), [2.0, 0.5])
    plot.add("run b", {"step": 1, "grad_norm": 3.0})  # rows without the plotted metric are skipped
    assert "run b" not in plot.runs


def test_video_html_embeds_playable_mp4s(tmp_path):
    from sora_jax.data.video import read_frames, to_uint8

    # Smooth content (H.264 keeps it closely at crf 18; per-pixel noise would lose its chroma to yuv420).
    t, y, x = np.meshgrid(np.arange(5), np.arange(16), np.arange(24), indexing="ij")
    ramp = np.stack([x / 23, y / 15, (t + 1) / 5], -1) * 1.6 - 0.8
    videos = np.stack([ramp, -ramp]).astype(np.float32)
    html = video_html(videos, ["a <b>red</b> ball", "two"], fps=4, width=96)
    assert html.count("<video") == 2 and "a &lt;b&gt;red&lt;/b&gt; ball" in html and 'width="96"' in html
    first = re.search(r"data:video/mp4;base64,([A-Za-z0-9+/=]+)", html)[1]
    (tmp_path / "v.mp4").write_bytes(base64.b64decode(first))
    frames = read_frames(tmp_path / "v.mp4")
    assert frames.shape == (5, 16, 24, 3)
    assert np.abs(frames.astype(np.float32) - to_uint8(videos[0])).mean() < 4
    with pytest.raises(ValueError, match="one caption per video"):
        video_html(videos, ["only one"])
