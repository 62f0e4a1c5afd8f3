"""sora_jax.train.vae_select: train a VAE under several seeds and keep the best-coloured one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sora_jax.train.vae_select import rank_key, seed_candidates, select_vae


def test_rank_prefers_low_colour_error_then_psnr_and_puts_unparsed_last():
    rows = {"a": {"parse_colour_err": 7.0, "psnr": 30.0}, "b": {"parse_colour_err": 5.0, "psnr": 20.0},
            "c": {"parse_colour_err": math.nan, "psnr": 40.0}, "d": {"parse_colour_err": 5.0, "psnr": 25.0},
            "e": {"psnr": 35.0}}
    assert sorted(rows, key=lambda k: rank_key(rows[k])) == ["d", "b", "a", "c", "e"]


def test_select_refuses_no_candidates_and_bad_seed_counts(tmp_path):
    import ml_collections

    with pytest.raises(ValueError, match="at least one candidate"):
        select_vae([], tmp_path / "sel.json")
    with pytest.raises(ValueError, match="number of VAE seeds must be >= 1"):
        seed_candidates(ml_collections.ConfigDict({"seed": 0, "workdir": "x"}), 0, tmp_path)


def test_select_trains_each_seed_for_real_and_keeps_the_lowest_colour_error(tiny_runs, tmp_path):
    """Two real seed runs of the tiny VAE (one step each); the choice and its record."""
    from sora_jax.train.vae_trainer import load_vae

    base = tiny_runs["vae_cfg"].copy_and_resolve_references()
    base.train.steps, base.train.eval_every, base.train.sample_every = 1, 0, 0
    runs = seed_candidates(base, 2, tmp_path / "seeds")
    got = []
    first = select_vae(runs, tmp_path / "sel.json", on_candidate=lambda c, m: got.append((c.seed, m)))
    assert [s for s, _ in got] == [base.seed, base.seed + 1]
    errs = [m["parse_colour_err"] for _, m in got]
    psnrs = [m["psnr"] for _, m in got]
    assert all(np.isfinite(psnrs)) and psnrs[0] != psnrs[1]  # other seeds, other weights
    best = min(range(2), key=lambda i: rank_key(got[i][1]))
    assert first["seed"] == got[best][0] and first["workdir"] == runs[best].workdir
    assert first["metrics"]["psnr"] == psnrs[best]
    record = json.loads((tmp_path / "sel.json").read_text())
    assert record["seed"] == first["seed"] and record["key"] == "parse_colour_err"
    assert [c["seed"] for c in record["candidates"]] == [base.seed, base.seed + 1]
    for c, e in zip(record["candidates"], errs, strict=True):
        assert c["step"] == 1 and (c["parse_colour_err"] is None if math.isnan(e) else c["parse_colour_err"] == e)
    # The chosen folder is a loadable VAE run (what the DiT stage is pointed at). Resuming a finished
    # run is train_vae's (test_train); a rerun here would cost two more compiles for nothing new.
    load_vae(first["workdir"])
