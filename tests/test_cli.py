"""Bad input gets one clear line on stderr and a non-zero exit; good input produces videos."""

import numpy as np
import pytest

from sora_jax.cli import main


def _run_error(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit code {code}, stderr {err!r}"
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    return err


def test_unknown_config_key(capsys):
    _run_error(capsys, ["train", "--config.train.stepz=5"], "unknown config key 'train.stepz'")


def test_unknown_config_argument(capsys):
    _run_error(capsys, ["train", "--config", "dit:variant=XXL"], "unknown DiT variant")


def test_bad_override_value(capsys):
    _run_error(capsys, ["train-vae", "--config.train.steps=many"], "bad value 'many'")


def test_mesh_shape_not_matching_devices(capsys):
    _run_error(capsys, ["train-vae", "--config.mesh.shape.data=3", "--config.mesh.shape.fsdp=1"],
               "needs 3 devices but 8 are available")


def test_frame_count_not_4k_plus_1(capsys, tmp_path):
    _run_error(capsys, ["train-vae", "--config.data.frames=16", f"--config.data.dir={tmp_path}"],
               "needs 4k+1 frames")


def test_missing_checkpoint_directory(capsys, tmp_path):
    _run_error(capsys, ["sample", "--workdir", str(tmp_path / "missing"), "--prompt", "one ball: red"],
               "not found; train first")


def test_empty_prompt(capsys, tiny_runs):
    _run_error(capsys, ["sample", "--workdir", str(tiny_runs["dit_cfg"].workdir), "--prompt", "  "],
               "empty prompt")


def test_patch_size_not_dividing_latent_grid_at_sampling(capsys, tiny_runs):
    # 40 px -> 5x5 latents, which a 1x2x2 patch cannot tile.
    _run_error(capsys, ["sample", "--workdir", str(tiny_runs["dit_cfg"].workdir), "--prompt", "one ball: red",
                        "--size", "40"], "not divisible by patch_size")


def test_patch_size_not_dividing_latent_grid_at_training(capsys, tiny_runs):
    from tests.conftest import tiny_overrides

    root = tiny_runs["root"]
    _run_error(capsys, ["train", *tiny_overrides(root), f"--config.workdir={root}/dit_bad",
                        f"--config.vae_workdir={root}/vae", "--config.model.patch_size=(1,3,3)"],
               "not divisible by patch_size")


def test_sample_frames_not_4k_plus_1(capsys, tiny_runs):
    _run_error(capsys, ["sample", "--workdir", str(tiny_runs["dit_cfg"].workdir), "--prompt", "one ball: red",
                        "--frames", "8"], "needs 4k+1 frames")


def test_export_bad_input_is_one_line(capsys, tiny_runs, tmp_path):
    run = tiny_runs["dit_cfg"].workdir
    _run_error(capsys, ["export", str(tmp_path / "nothing"), str(tmp_path / "out")], "is not a DiT run folder")
    _run_error(capsys, ["export", str(tiny_runs["vae_cfg"].workdir), str(tmp_path / "out")], "no run.json")
    _run_error(capsys, ["export", str(run), f"{run}/export"], "inside the run folder")
    _run_error(capsys, ["export", str(run), str(tmp_path / "out"), "--step", "999"], "has no checkpoint step 999")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    _run_error(capsys, ["export", str(run), str(tmp_path / "full")], "already exists and is not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_sample_writes_mp4_and_gif(capsys, tiny_runs, tmp_path):
    from sora_jax.data.video import read_video

    code = main(["sample", "--workdir", str(tiny_runs["dit_cfg"].workdir), "--prompt",
                 "two balls: red and blue; the red ball falls", "--out", str(tmp_path), "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    video = read_video(tmp_path / "sample_0.mp4")
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    assert (tmp_path / "sample_0.gif").stat().st_size > 0


def test_sample_with_unipc(capsys, tiny_runs, tmp_path):
    from sora_jax.data.video import read_video

    code = main(["sample", "--workdir", str(tiny_runs["dit_cfg"].workdir), "--prompt", "one ball: red",
                 "--out", str(tmp_path), "--steps", "3", "--sampler", "unipc"])
    assert code == 0, capsys.readouterr().err
    assert read_video(tmp_path / "sample_0.mp4").shape == (5, 32, 32, 3)


@pytest.mark.parametrize("argv", [["demo", "--bogus"], ["sample", "--prompt", "x", "--config.a=1"]])
def test_unknown_flags(capsys, argv):
    code = main(argv)
    assert code == 2


def test_tile_videos_and_gif_round_trip(tmp_path):
    from PIL import Image

    from sora_jax.data.video import tile_videos, write_gif

    a = np.zeros((3, 8, 8, 3), np.uint8) + np.arange(3, dtype=np.uint8)[:, None, None, None] * 40
    b = np.full((3, 8, 8, 3), 200, np.uint8)
    tiled = tile_videos([a, b], gap=2)
    assert tiled.shape == (3, 8, 18, 3)
    assert tiled[:, :, 10:].min() == 200 and tiled[:, :, 8:10].max() == 0
    np.testing.assert_array_equal(tiled[:, :, :8], a)
    path = write_gif(tmp_path / "t.gif", tiled, scale=2)
    with Image.open(path) as im:
        assert im.n_frames == 3 and im.size == (36, 16)
    with pytest.raises(ValueError, match="share one shape"):
        tile_videos([a, b[:2]])
