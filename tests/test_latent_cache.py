"""Latent caches in ArrayRecord: build, interrupted-build resume, exact contents, buckets, training on one."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sora_jax.config_overrides import apply_overrides
from sora_jax.data.video import write_mp4
from sora_jax.train import latent_records as lr
from sora_jax.train.dit_data import build_from_config


def _records(cache_dir) -> list[dict]:
    from array_record.python import array_record_module

    out = []
    for path in lr.part_files(cache_dir):
        reader = array_record_module.ArrayRecordReader(path)
        out += [lr.decode_record(r) for r in reader.read_all()]
        reader.close()
    return out


@pytest.fixture(scope="module")
def physics_cache(tiny_runs, tmp_path_factory):
    """A physics cache built in two sittings: one part file, 'interrupted', then finished."""
    out = tmp_path_factory.mktemp("cache") / "physics"
    cfg = tiny_runs["dit_cfg"].copy_and_resolve_references()
    partial = build_from_config(cfg, out, max_parts=1, part_batches=1)
    first_part = (out / "part-00000-00000.array_record").read_bytes()
    with pytest.raises(lr.CacheError, match="unfinished; re-run the same `sora-jax cache-latents`"):
        lr.read_info(out)
    full = build_from_config(cfg, out, part_batches=1)
    return {"out": out, "cfg": cfg, "partial": partial, "full": full, "first_part": first_part}


def test_interrupted_build_resumes_to_the_exact_encoding(physics_cache, tiny_runs):
    """Resume keeps the written part and finishes; every record equals encoding its clip directly."""
    from sora_jax.convert.bert import load_text_encoder
    from sora_jax.data.pipeline import numpy_batch
    from sora_jax.models.vae import CausalVAE, normalize_latents
    from sora_jax.train.vae_trainer import load_vae, physics_sources

    c, cfg = physics_cache, physics_cache["cfg"]
    assert not c["partial"]["complete"] and c["partial"]["num_records"] == cfg.data.batch_size
    assert c["full"]["complete"] and c["full"]["num_records"] == cfg.data.num_train
    assert (c["out"] / "part-00000-00000.array_record").read_bytes() == c["first_part"]
    records = _records(c["out"])
    assert len(records) == cfg.data.num_train

    source = physics_sources(cfg)["train"]
    clips = numpy_batch(source, range(len(source)))
    vae, params = load_vae(cfg.vae_workdir)
    mean = vae.apply(params, clips["video"], method=CausalVAE.encode)[0]
    want = np.asarray(normalize_latents(mean, vae.cfg))
    got = np.stack([r["latents"] for r in records])
    np.testing.assert_allclose(got, want, atol=1e-5)
    text, mask = load_text_encoder(None, max_length=cfg.text.max_length).encode([r["caption"] for r in records])
    np.testing.assert_allclose(np.stack([r["text"] for r in records]), np.asarray(text), atol=1e-5)
    np.testing.assert_array_equal(np.stack([r["text_mask"] for r in records]), np.asarray(mask))
    assert [r["caption"] for r in records] == [str(x) for x in clips["caption"]]


def test_cache_built_from_other_inputs_is_refused(physics_cache):
    cfg = apply_overrides(physics_cache["cfg"].copy_and_resolve_references(), ["--config.text.max_length=12"])
    with pytest.raises(lr.CacheError, match="holds a cache built from other inputs"):
        build_from_config(cfg, physics_cache["out"])


def test_cache_loader_batches_resume_exactly(physics_cache):
    """Per-process shuffled batches from the cache; a restored iterator continues identically."""
    sizes = {b: 4 for b in lr.read_info(physics_cache["out"])["buckets"]}
    it = lr.make_cache_loader(physics_cache["out"], sizes, seed=3)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    after = [next(it)["latents"] for _ in range(3)]
    it2 = lr.make_cache_loader(physics_cache["out"], sizes, seed=3)
    it2.set_state(state)
    for a, b in zip(after, [next(it2)["latents"] for _ in range(3)]):
        np.testing.assert_array_equal(a, b)
    assert first[0]["latents"].shape[0] == 4 and first[0]["text"].shape[0] == 4
    with pytest.raises(lr.CacheError, match="no batch size for cache buckets"):
        lr.make_cache_loader(physics_cache["out"], {}, seed=0)


def test_a_loader_alive_at_interpreter_exit_leaves_no_traceback(physics_cache):
    """A notebook or script that still holds a loader at exit (closed or not) ends without grain's teardown traceback."""
    script = """
import sys
from sora_jax.train import latent_records as lr
sizes = {b: 2 for b in lr.read_info(sys.argv[1])["buckets"]}
held = lr.make_cache_loader(sys.argv[1], sizes, seed=0)
closed = lr.make_cache_loader(sys.argv[1], sizes, seed=0)
unprefetched = lr.make_cache_loader(sys.argv[1], sizes, seed=0, batches_ahead=0)
print(next(held)["latents"].shape[0], next(closed)["latents"].shape[0], next(unprefetched)["latents"].shape[0])
closed.close()
"""
    run = subprocess.run([sys.executable, "-c", script, str(physics_cache["out"])], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["2", "2", "2"], run.stderr[-3000:]
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]


def _clip(t: int, h: int, w: int, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    return r.integers(0, 255, (t, h, w, 3), dtype=np.uint8)


def test_real_video_cache_trains_on_two_buckets(tiny_runs, tmp_path, capsys):
    """`sora-jax cache-latents` on a folder of two sizes, then `train` steps on single-shape batches of both."""
    from sora_jax.cli import main
    from sora_jax.train.dit_trainer import train_dit

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(8):
        write_mp4(videos / f"wide{i}.mp4", _clip(5, 32, 48, i))
        (videos / f"wide{i}.txt").write_text(f"a wide clip {i}")
        write_mp4(videos / f"square{i}.mp4", _clip(5, 32, 32, 10 + i))
    (videos / "broken.mp4").write_text("not a video")
    root = tiny_runs["root"]
    overrides = [f"--config.vae_workdir={root}/vae", "--config.data.source=video",
                 f"--config.data.video.path={videos}", "--config.data.video.buckets=32x48x5:8,32x32x5:8",
                 "--config.mesh.shape.data=8", "--config.mesh.shape.fsdp=1", "--config.mesh.rules=dp"]
    out = tmp_path / "cache"
    code, printed = main(["cache-latents", str(out), *overrides]), capsys.readouterr()
    assert code == 0, printed.err
    assert "16 clips (32x32x5: 8, 32x48x5: 8); complete" in printed.out
    info = lr.read_info(out)
    assert info["buckets"]["32x48x5"]["shapes"]["latents"][:3] == [2, 4, 6]

    cfg = apply_overrides(tiny_runs["dit_cfg"].copy_and_resolve_references(), overrides + [
        f"--config.workdir={tmp_path}/dit", f"--config.data.latents={out}", "--config.train.steps=4"])
    it = lr.make_cache_loader(out, {"32x48x5": 8, "32x32x5": 8}, seed=0)
    seen = set()
    for _ in range(6):
        b = next(it)
        assert b["latents"].shape[0] == 8
        seen.add(b["bucket"])
        # Uncaptioned clips carry the null text (first token on, zero embedding), as dropout does.
        empty = b["caption"] == ""
        assert (b["text_mask"][empty].sum(axis=1) == 1).all() and not b["text"][empty].any()
        assert (b["text_mask"][~empty].sum(axis=1) > 1).all()
    assert seen == {"32x48x5", "32x32x5"}
    result = train_dit(cfg)
    assert result["step"] == 4 and np.isfinite(result["final"]["loss"])


def test_cache_key_and_dit_runs_follow_the_vae_weights_not_its_folder(tiny_runs, tmp_path, capsys):
    """A latent cache names the VAE's weights: a moved or params-only re-saved VAE keeps the key, a VAE
    trained on in place gets a new one. A DiT run loads the VAE step it trained on, and refuses other
    weights under that step or a VAE folder without it (one line from the CLI)."""
    import json
    import shutil
    from pathlib import Path

    import jax

    from sora_jax.cli import main
    from sora_jax.pipeline import TextToVideo
    from sora_jax.train import checkpoint
    from sora_jax.train.dit_data import cache_inputs
    from sora_jax.train.vae_trainer import load_vae_at

    cfg, root = tiny_runs["dit_cfg"], Path(tiny_runs["root"])
    base = cache_inputs(cfg)
    _, params, ident = load_vae_at(cfg.vae_workdir)
    step = ident["vae_step"]
    assert step == tiny_runs["vae"]["step"] and "vae_workdir" not in base
    assert {k: base[k] for k in ident} == ident

    def vae_folder(name: str, saves: list[tuple[int, object]]) -> Path:
        out = tmp_path / name
        out.mkdir()
        shutil.copy(root / "vae" / "vae_config.json", out / "vae_config.json")
        for s, p in saves:
            checkpoint.save_params(out / "ckpt", p, step=s, keep=len(saves))
        return out

    def with_vae(folder: Path):
        c = cfg.copy_and_resolve_references()
        c.vae_workdir = str(folder)
        return c

    # Another folder, parameters only (no EMA entry, no optimiser state): the same weights, the same key.
    moved = vae_folder("moved", [(step, params)])
    assert cache_inputs(with_vae(moved)) == base
    # Trained on in place: a newer step with other weights is what a new cache is built from.
    bumped = jax.tree.map(lambda a: a + 1e-3, params)
    went_on = vae_folder("went_on", [(step, params), (step + 5, bumped)])
    later = cache_inputs(with_vae(went_on))
    assert later["vae_step"] == step + 5 and later["vae_params"] != base["vae_params"]
    assert lr.cache_key(later) != lr.cache_key(base)

    def dit_on(vae: Path, name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(cfg.workdir, run, ignore=shutil.ignore_patterns("latents-*", "tb"))
        meta = json.loads((run / "run.json").read_text())
        assert (meta["vae_step"], meta["vae_params"]) == (step, base["vae_params"])
        meta["vae_workdir"] = str(vae)
        (run / "run.json").write_text(json.dumps(meta))
        return run

    # The VAE went on after the DiT: the DiT still decodes with the step it learned, not the newest.
    t2v = TextToVideo.load(dit_on(went_on, "dit_went_on"))
    assert checkpoint.params_fingerprint(t2v.vae_params) == base["vae_params"]
    # Other weights saved under the recorded step, or the step pruned away: refused.
    swapped = vae_folder("swapped", [(step, bumped)])
    with pytest.raises(checkpoint.CheckpointError, match="is not the one this DiT was trained on"):
        TextToVideo.load(dit_on(swapped, "dit_swapped"))
    pruned = vae_folder("pruned", [(step + 5, bumped)])
    code = main(["sample", "--workdir", str(dit_on(pruned, "dit_pruned")), "--prompt", "one ball: red"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"has no checkpoint step {step} (it has {step + 5})" in err


def test_the_heldout_cache_is_shared_by_runs_on_more_training_clips(tiny_runs):
    """The physics test split's clips do not depend on num_train, so neither does its cache's name: a
    run on other training clips reuses the held-out latents (the training cache is its own)."""
    from pathlib import Path

    from sora_jax.train.dit_data import cache_inputs, heldout_cache_dir
    from sora_jax.train.vae_trainer import physics_sources

    cfg = tiny_runs["dit_run_cfg"]
    fewer = apply_overrides(cfg.copy_and_resolve_references(), [f"--config.data.num_train={cfg.data.num_train // 2}"])
    a, b = physics_sources(cfg)["test"], physics_sources(fewer)["test"]
    assert len(a) == len(b) == cfg.data.num_test
    for i in range(len(a)):
        np.testing.assert_array_equal(np.asarray(a[i]["video"]), np.asarray(b[i]["video"]))
    assert cache_inputs(fewer, "test") == cache_inputs(cfg, "test")
    assert cache_inputs(fewer, "train") != cache_inputs(cfg, "train")
    workdir = Path(cfg.workdir)
    held = heldout_cache_dir(cfg, workdir)
    built = sorted(workdir.glob("latents-*"))
    assert heldout_cache_dir(fewer, workdir) == held and sorted(workdir.glob("latents-*")) == built  # nothing re-encoded
