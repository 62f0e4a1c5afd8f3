"""Sharding-layout benchmark: memory and collectives of the compiled train step on 8 simulated devices,
impossible layouts as rows (not crashes), and a compile for a TPU topology through libtpu."""

import json
import math

import jax
import pytest

from sora_jax.bench.sharding import bench_layout, build_step, parse_layout, workload_from
from sora_jax.cli import main
from sora_jax.parallel.topology import get_target

VIDEO = "5x32x32"  # latent 2x4x4 -> 8 tokens with the (1, 2, 2) patch


@pytest.fixture(scope="module")
def cpu8():
    target = get_target("cpu:8")
    return target, workload_from("dit:variant=tiny", [], VIDEO, 8, None, "train", target)


@pytest.fixture(scope="module")
def fsdp_row(cpu8):
    target, workload = cpu8
    layout = parse_layout("fsdp=8,remat=full")
    return bench_layout(workload, layout, target), build_step(workload, layout, target)


def _bytes(tree, sharded_only=False):
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves
               if not sharded_only or x.sharding.shard_shape(x.shape) != x.shape)


def test_fsdp_shards_parameters_and_optimizer(fsdp_row):
    row, built = fsdp_row
    assert row["status"] == "ok" and row["mesh"]["fsdp"] == 8
    replicated = row["param_bytes_replicated"] + row["opt_bytes_replicated"]
    assert row["param_bytes_replicated"] == _bytes(built["state"].params)
    assert row["param_bytes"] + row["opt_bytes"] <= 1.15 / 8 * replicated
    # The compiler's own view: the step's arguments (params, moments, EMA, batch) on one device.
    state_replicated = _bytes(built["state"])
    assert row["argument_bytes"] <= 1.15 / 8 * state_replicated + _bytes(built["args"][1:])


def test_fsdp_collective_bytes_match_the_formula(fsdp_row):
    """Pure FSDP over n devices, per device per step (ring algorithms). With P = all parameter bytes,
    B = bytes of the FSDP-sharded parameters of the scanned blocks, O = those outside the blocks:

        wire = (n-1)/n * (2 B + O + 2 P)

    2 B: block weights are all-gathered in the forward and again in the (scanned) backward, which
    re-gathers rather than keep L gathered layers; O: embeddings and the head are gathered once and
    kept for the backward; 2 P: gradients of all parameters are summed over the batch shards with an
    all-reduce, 2(n-1)/n x size (XLA:CPU has no reduce-scatter: sharded gradients are all-reduced, then
    sliced; on TPU that term is a reduce-scatter, (n-1)/n x P). XLA may instead compute a small layer
    on sharded weights (the text embedding) and move activations: the formula is an upper estimate.
    """
    row, built = fsdp_row
    n = 8
    params = built["state"].params["params"]
    blocks = _bytes(params["blocks"], sharded_only=True)
    outside = _bytes({k: v for k, v in params.items() if k != "blocks"}, sharded_only=True)
    expected = (n - 1) / n * (2 * blocks + outside + 2 * _bytes(params))
    coll = row["collectives"]
    measured = coll["ici_wire_bytes"]
    assert coll["unknown_trip_counts"] == 0
    assert coll["count"]["all-gather"] > 0 and coll["count"]["all-reduce"] > 0
    assert abs(measured - expected) <= 0.10 * expected, (measured, expected, coll)


def test_impossible_layouts_are_rows_not_crashes(cpu8):
    target, workload = cpu8
    rows = {spec: bench_layout(workload, parse_layout(spec), target) for spec in ("data=3,fsdp=1", "fsdp=8,batch=0.5")}
    assert rows["data=3,fsdp=1"]["status"] == "invalid" and "8" in rows["data=3,fsdp=1"]["message"]
    assert rows["fsdp=8,batch=0.5"]["status"] == "invalid" and "batch" in rows["fsdp=8,batch=0.5"]["message"]
    # 9x32x48 pixels -> 3x4x6 latent -> 18 tokens: not splittable over sequence=8.
    odd = workload_from("dit:variant=tiny", [], "9x32x48", 8, None, "train", target)
    seq = bench_layout(odd, parse_layout("sequence=8,rules=fsdp_sequence,batch=8"), target)
    assert seq["status"] == "invalid" and "18 video tokens are not divisible by sequence=8" in seq["message"]


def test_cli_writes_table_json_csv_plot_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["bench-sharding", "--target", "cpu:8", "--video", VIDEO, "--text-len", "8",
                 "--layouts", "data=3,fsdp=1;fsdp=8,batch=0.5", "--json", str(out),
                 "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png")])
    printed = capsys.readouterr().out
    assert code == 0 and "| target | layout |" in printed and "invalid" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["invalid", "invalid"]
    assert (tmp_path / "r.csv").read_text().count("\n") == 3 and (tmp_path / "r.png").stat().st_size > 0
    for bad, needle in ((["--layouts", "fsdp=8,colour=red"], "unknown layout key"),
                        (["--layouts", "fsdp=8", "--target", "v9z-8"], "unknown TPU target"),
                        (["--layouts", "fsdp=8", "--video", "80x32x32"], "4k+1"),
                        (["--layouts", "rules=zero"], "unknown sharding preset")):
        assert main(["bench-sharding", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_tpu_topology_compile_fits_and_ooms():
    pytest.importorskip("libtpu", reason="TPU-target compiles need the tpu extra: pip install -e '.[tpu]'")
    target = get_target("v5p-8")
    assert target.num_devices == 4 and target.chip.name == "v5p"
    workload = workload_from("dit:variant=tiny", [], VIDEO, 8, None, "train", target)
    row = bench_layout(workload, parse_layout("fsdp=4,remat=full"), target)
    assert row["status"] == "ok" and row["fits"], row
    assert 0 < row["peak_bytes"] <= row["hbm_bytes"] == 95 * 2**30
    coll = row["collectives"]
    # TPU's reduce-scatter lives in a fusion calling %all-reduce-scatter.N; it must still be counted.
    assert coll["count"]["reduce-scatter"] > 0 and coll["count"]["all-gather"] > 0, coll
    assert coll["unknown_trip_counts"] == 0
    roof = row["roofline"]
    assert roof["step_s"] >= roof["compute_s"] > 0 and 0 < roof["mfu"] <= 1
    assert row["mosaic_calls"] == 0
    # Splash (a Mosaic kernel, which GSPMD cannot partition) compiles sharded over batch and heads.
    splash = bench_layout(workload, parse_layout("fsdp=2,tensor=2,rules=fsdp_tensor,remat=full,attention=splash"),
                          target)
    assert splash["status"] == "ok" and splash["fits"], splash
    assert splash["mosaic_calls"] > 0
    # 16 GiB of v5e HBM cannot hold 64 clips of 81x480x832 latents' activations: an OOM row, with sizes.
    small = get_target("v5e-1")
    big = workload_from("dit:variant=tiny", [], "81x480x832", 8, None, "sample", small)
    oom = bench_layout(big, parse_layout("fsdp=1,remat=none,batch=64"), small)
    assert oom["status"] == "oom", oom
    assert oom["required_bytes"] > oom["available_bytes"] > 10 * 2**30
