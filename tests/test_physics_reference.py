"""configs/physics_reference: the reference world model's VAE/DiT configs and their step sizing."""

from __future__ import annotations

import pytest

from configs.physics_reference import (DIT_SHARE, DIT_STEPS_PER_MIN, VAE_SHARE, VAE_STEPS_PER_MIN,
                                       reference_configs)
from sora_jax.train.dit_data import cache_inputs
from sora_jax.train.dit_trainer import mask_rates
from sora_jax.train.vae_trainer import vae_config_from


def test_reference_vae_is_4x4x4_and_steps_follow_the_budget(tmp_path):
    vae, dit = reference_configs(tmp_path, 90)
    cfg = vae_config_from(vae)
    assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 4)
    assert dit.vae_workdir == vae.workdir and dit.vae_workdir.startswith(str(tmp_path))
    # The benchmark's combinatorial split stays out of both stages' data.
    assert vae.data.exclude == dit.data.exclude and "red3" in vae.data.exclude
    # Half the clips without gravity, as half the benchmark's in-distribution families; the DiT's
    # latent cache is keyed by it, and a run before the option (0) keeps its key.
    assert vae.data.zero_gravity == dit.data.zero_gravity == 0.5
    old, old_dit = reference_configs(tmp_path, 90, zero_gravity=0.0)
    assert old.data.zero_gravity == old_dit.data.zero_gravity == 0.0
    vae_id = {"vae_step": 1, "vae_params": "x"}
    (tmp_path / "vae_config.json").write_text("{}")

    def key_of(cfg):  # on a copy, so the configs under test stay as built
        cfg = cfg.copy_and_resolve_references()
        cfg.vae_workdir = str(tmp_path)
        return cache_inputs(cfg, vae=vae_id)["data"]

    key = key_of(dit)
    # Mixed data since dataset 1.1.0 names the gravity-free world in captions: older caches are refused.
    assert key["zero_gravity"] == 0.5 and key["captions"] == "world"
    old_key = key_of(old_dit)
    assert "zero_gravity" not in old_key and "captions" not in old_key
    assert vae.train.steps == int(VAE_STEPS_PER_MIN * VAE_SHARE * 90)
    assert dit.train.steps == int(DIT_STEPS_PER_MIN * DIT_SHARE * 90)
    longer, _ = reference_configs(tmp_path, 180)
    assert longer.train.steps > vae.train.steps
    assert vae.train.max_minutes == pytest.approx(VAE_SHARE * 90)
    # Both stages end annealed whether their steps or their time runs out first; runs trained under
    # the steps clock resume with an override.
    assert vae.optim.schedule_clock == dit.optim.schedule_clock == "budget"
    old_vae, old_dit = reference_configs(tmp_path, 90, vae_overrides=["optim.schedule_clock=steps"],
                                         dit_overrides=["optim.schedule_clock=steps"])
    assert old_vae.optim.schedule_clock == old_dit.optim.schedule_clock == "steps"
    # The DiT learns frame conditioning with given frames at timestep 0, at sampling's noise shift.
    assert mask_rates(dit.diffusion).enabled and dit.diffusion.given_t0
    assert dit.diffusion.shift == dit.sample.shift == 3.0
    # Memorising the 512 clips shows: held-out and training clips scored alike during training.
    assert dit.train.eval_every > 0 and dit.eval.num_clips == dit.eval.train_clips > 0


def test_reference_explicit_steps_and_bad_input(tmp_path):
    vae, dit = reference_configs(tmp_path, 10, vae_steps=20_000, dit_steps=40_000)
    assert (vae.train.steps, dit.train.steps) == (20_000, 40_000)
    with pytest.raises(ValueError, match="minutes must be > 0"):
        reference_configs(tmp_path, 0)
    with pytest.raises(ValueError, match="dit_steps must be >= 1"):
        reference_configs(tmp_path, 10, dit_steps=0)


def test_reference_dit_shape_overrides_reach_the_model(tmp_path):
    from sora_jax.train.dit_trainer import dit_config_from

    _, dit = reference_configs(tmp_path, 10, dit_shape="num_layers=6,num_attention_heads=4,ffn_dim=512")
    cfg = dit_config_from(dit, channels=8, text_dim=384)
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.ffn_dim) == (6, 4, 512)
    assert cfg.attention_head_dim == dit_config_from(reference_configs(tmp_path, 10)[1], channels=8,
                                                     text_dim=384).attention_head_dim  # untouched field
    for bad, msg in (("depth=6", "must be FIELD=INT"), ("num_layers", "must be FIELD=INT"),
                     ("num_layers=0", "positive integer"), ("ffn_dim=big", "positive integer"),
                     ("attention_head_dim=5", "head")):
        with pytest.raises(ValueError, match=msg):
            reference_configs(tmp_path, 10, dit_shape=bad)


def test_reference_dit_variant_and_lr_size_the_dit_alone(tmp_path):
    from sora_jax.train.dit_trainer import dit_config_from

    vae, dit = reference_configs(tmp_path, 10, dit_variant="S", dit_lr=2e-4)
    tiny_vae, _ = reference_configs(tmp_path, 10)
    assert vae.to_dict() == tiny_vae.to_dict()  # the VAE (and so its latent cache) is the tiny run's
    cfg = dit_config_from(dit, channels=8, text_dim=384)
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (12, 6, 64)
    assert dit.optim.lr == 2e-4 and dit.vae_workdir == vae.workdir
    with pytest.raises(ValueError, match="unknown DiT variant 'XL'"):
        reference_configs(tmp_path, 10, dit_variant="XL")
    with pytest.raises(ValueError, match="dit_lr must be > 0"):
        reference_configs(tmp_path, 10, dit_lr=0.0)
    for override in ("optim.lr=1e-3", "--config.optim.lr=1e-3"):
        with pytest.raises(ValueError, match="learning rate is set twice"):
            reference_configs(tmp_path, 10, dit_lr=2e-4, dit_overrides=[override])
    assert reference_configs(tmp_path, 10, dit_overrides=["optim.lr=1e-3"])[1].optim.lr == 1e-3


def test_reference_dit_overrides_reach_the_dit_config_alone(tmp_path):
    vae, dit = reference_configs(tmp_path, 10, dit_variant="S",
                                 dit_overrides=["model.attention=cudnn", "--config.train.eval_every=0"])
    base_vae, base_dit = reference_configs(tmp_path, 10, dit_variant="S")
    assert (dit.model.attention, dit.train.eval_every) == ("cudnn", 0)
    assert base_dit.model.attention != "cudnn" and base_dit.train.eval_every == 500
    assert vae.to_dict() == base_vae.to_dict()
    with pytest.raises(ValueError, match=r"DiT override: unknown config key 'model\.atention'"):
        reference_configs(tmp_path, 10, dit_overrides=["model.atention=cudnn"])
    with pytest.raises(ValueError, match="DiT override: .* has no value"):
        reference_configs(tmp_path, 10, dit_overrides=["model.attention"])


def test_reference_vae_overrides_reach_the_vae_config_alone(tmp_path):
    vae, dit = reference_configs(tmp_path, 10, vae_overrides=["model.z_dim=16", "--config.data.batch_size=8"])
    base_vae, base_dit = reference_configs(tmp_path, 10)
    # Applied after the reference recipe: its 4x4x4 compression stays, the latent widens.
    cfg = vae_config_from(vae)
    assert (cfg.z_dim, cfg.spatial_factor, vae.data.batch_size) == (16, 4, 8)
    assert (vae_config_from(base_vae).z_dim, base_vae.data.batch_size) == (8, 4)
    assert dit.to_dict() == base_dit.to_dict()
    with pytest.raises(ValueError, match=r"VAE override: unknown config key 'model\.zdim'"):
        reference_configs(tmp_path, 10, vae_overrides=["model.zdim=16"])
    with pytest.raises(ValueError, match="VAE override: bad value 'wide'"):
        reference_configs(tmp_path, 10, vae_overrides=["model.z_dim=wide"])


def _run_script(argv: list[str], monkeypatch) -> SystemExit:
    """Run scripts/train_reference.py as a user would, and return the SystemExit it ends with."""
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["train_reference.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "train_reference.py"), run_name="__main__")
    return e.value


def test_train_reference_script_reports_bad_overrides_and_stage_errors_in_one_line(tmp_path, monkeypatch):
    import sora_jax.train.vae_trainer as vae_trainer
    from sora_jax.train.checkpoint import CheckpointError

    bad = _run_script(["--outdir", str(tmp_path), "--vae-override", "model.zdim=16"], monkeypatch)
    assert str(bad.code).startswith("error: VAE override: unknown config key 'model.zdim'")

    # A VAE of another shape already in --outdir: train_vae cannot restore it and raises this.
    def cannot_restore(config):
        assert config.model.z_dim == 16  # the override reached the VAE stage
        raise CheckpointError("no checkpoint in /x/vae/ckpt could be restored (step 3000: shapes differ)")

    monkeypatch.setattr(vae_trainer, "train_vae", cannot_restore)
    err = _run_script(["--outdir", str(tmp_path), "--vae-override", "model.z_dim=16"], monkeypatch)
    assert str(err.code) == "error: VAE stage: no checkpoint in /x/vae/ckpt could be restored (step 3000: shapes differ)"


def test_reference_vae_seeds_share_the_vae_budget_and_get_their_own_folders(tmp_path):
    from configs.physics_reference import vae_candidates

    vae, dit = reference_configs(tmp_path, 90, vae_seeds=3, vae_overrides=["seed=5"])
    one, _ = reference_configs(tmp_path, 90)
    assert vae.train.steps == int(VAE_STEPS_PER_MIN * VAE_SHARE * 90 / 3)
    assert vae.train.max_minutes == pytest.approx(one.train.max_minutes / 3)
    assert dit.to_dict() == reference_configs(tmp_path, 90)[1].to_dict()  # the DiT's budget is its own
    assert vae_candidates(one, 1) == [one]  # one seed: the run folder as before, so old runs resume
    runs = vae_candidates(vae, 3)
    assert [c.seed for c in runs] == [5, 6, 7]
    assert [c.workdir for c in runs] == [str(tmp_path / "vae_seeds" / f"seed{s}") for s in (5, 6, 7)]
    for c in runs:  # nothing but the seed and the folder differs
        other = c.to_dict()
        other.update(seed=vae.seed, workdir=vae.workdir)
        assert other == vae.to_dict()
    with pytest.raises(ValueError, match="vae_seeds must be >= 1"):
        reference_configs(tmp_path, 10, vae_seeds=0)


def test_train_reference_script_trains_the_dit_on_the_chosen_seed(tmp_path, monkeypatch, capsys):
    import json

    import sora_jax.train.dit_trainer as dit_trainer
    import sora_jax.train.vae_trainer as vae_trainer

    # Seed 1 decodes the balls closest to their colours; seed 2 parsed no ball at all.
    colour = {0: 9.0, 1: 4.5, 2: float("nan")}
    seen = []

    def fake_vae(config):
        seen.append(config.workdir)
        return {"step": int(config.train.steps), "psnr": 28.0, "ssim": 0.9, "psnr_by_latent_frame": [28.0],
                "parse_error_px": 0.3, "parse_colour_err": colour[int(config.seed)], "eval_history": []}

    def fake_dit(config):
        seen.append(("dit", config.vae_workdir))
        return {"step": 1, "final": {"loss": 0.5}, "eval_history": []}

    monkeypatch.setattr(vae_trainer, "train_vae", fake_vae)
    monkeypatch.setattr(dit_trainer, "train_dit", fake_dit)
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["train_reference.py", "--outdir", str(tmp_path), "--vae-seeds", "3"])
    runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "train_reference.py"), run_name="__main__")
    chosen = str(tmp_path / "vae_seeds" / "seed1")
    assert seen == [str(tmp_path / "vae_seeds" / f"seed{s}") for s in range(3)] + [("dit", chosen)]
    out = capsys.readouterr().out
    assert f"kept seed 1 ({chosen}) of 3" in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert (summary["vae_seed"], summary["vae_workdir"], summary["vae_parse_colour_err"]) == (1, chosen, 4.5)
    record = json.loads((tmp_path / "vae_selection.json").read_text())
    assert record["workdir"] == chosen and [c["parse_colour_err"] for c in record["candidates"]] == [9.0, 4.5, None]


def test_the_device_runs_caption_table_covers_every_training_caption(tmp_path):
    # A lent GPU has no MiniLM: its training captions are looked up in a table that
    # docs/device_runs/h100_s_on_vae3000/remote.py builds from `template_captions`. A caption missing there
    # stops the run at latent caching (the zero-gravity captions were, until session 30).
    import importlib.util
    from pathlib import Path

    from sora_jax.data.physics import PhysicsConfig, simulate

    path = Path(__file__).parents[1] / "docs" / "device_runs" / "h100_s_on_vae3000" / "remote.py"
    spec = importlib.util.spec_from_file_location("device_remote", path)
    remote = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remote)
    table = set(remote.template_captions())
    _, dit = reference_configs(tmp_path, 90)
    cfg = PhysicsConfig(size=dit.data.size, frames=dit.data.frames, zero_gravity=dit.data.zero_gravity)
    captions = [simulate(seed, cfg)["caption"] for seed in range(300)]
    assert sum("zero gravity" in c for c in captions) > 100  # both worlds are drawn
    assert [c for c in captions if c not in table] == []
