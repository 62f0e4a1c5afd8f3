"""DiT speed/memory benchmark: runs end to end at a tiny size (no timing is asserted), FLOP counter checked."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from sora_jax.bench.dit_memory import grid_for_tokens
from sora_jax.bench.dit_speed import BenchOptions, dit_flops, format_report
from sora_jax.models.dit import DiT, dit_config

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, text_dim=32, channels=4,
            grid=(1, 4, 4), batch=2, text_len=5, repeats=1, warmup=0, peak_size=128)


def test_benchmark_smoke():
    pytest.importorskip("diffusers")
    from sora_jax.bench.dit_speed import run_benchmark

    r = run_benchmark(BenchOptions(**TINY))
    json.dumps(r)  # the script writes it as JSON
    for key in ("jax_train_step", "torch_train_step", "jax_forward", "torch_forward"):
        assert len(r["timings"][key]["times_s"]) == 1 and r["timings"][key]["min_s"] > 0, key
    assert set(r["jax_over_torch"]) == {"train_step", "forward"}
    for key in ("jax_train_step", "torch_train_step", "jax_forward", "torch_forward"):
        assert r["mfu"][key]["gflops"] > 0 and r["mfu"][key]["pct_of_peak"] > 0, key
        assert r["mfu"][key]["gflops_best"] >= r["mfu"][key]["gflops"], key
    assert min(r["matmul_peak_gflops"].values()) > 0
    assert len(r["timings"]["jax_matmul"]["times_s"]) == 2  # one per round, train and forward rounds
    assert set(r["jax_over_torch_paired"]) == {"train_step", "forward"}
    for key in ("os_cpu_count", "torch_threads", "jax", "torch", "diffusers", "loadavg_start", "loadavg_end"):
        assert r["machine"][key] is not None, key
    assert r["model"]["tokens"] == 4
    # same work on both sides: outputs and gradients of the same weights agree, and are not trivially 0
    for name in ("forward", "grads"):
        a = r["agreement"][name]
        assert a["rel"] < 1e-4 and a["ref_max_abs"] > 1e-3, (name, a)
    assert r["agreement"]["loss"]["jax"] == pytest.approx(r["agreement"]["loss"]["torch"], rel=1e-5)
    assert "| train_step |" in format_report(r)


def test_flops_match_xla_cost_analysis():
    # One unscanned layer (XLA counts a while-loop body once) with matmuls large enough that the
    # elementwise ops the analytic count leaves out stay a few percent of XLA's total.
    cfg = dit_config("tiny", num_layers=1, num_attention_heads=4, attention_head_dim=32, ffn_dim=512,
                     text_dim=64, in_channels=4, out_channels=4, scan_layers=False)
    batch, grid, text_len = 2, (2, 8, 8), 8
    args = (jnp.zeros((batch, *grid, 4)), jnp.zeros((batch,)), jnp.zeros((batch, text_len, 64)))
    params = jax.eval_shape(DiT(cfg).init, jax.random.key(0), *args)["params"]
    cost = jax.jit(lambda p, *a: DiT(cfg).apply({"params": p}, *a)).lower(params, *args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = dit_flops(cfg, batch, tokens=2 * 4 * 4, text_len=text_len)
    assert ours["train_step"] == 3 * ours["forward"]
    assert ours["forward"] == pytest.approx(cost["flops"], rel=0.1), (ours["forward"], cost["flops"])


def test_flops_hand_count():
    # 1 layer, d=8 (1 head x 8), ffn 16, 4 tokens, 2 text tokens, text_dim 4, 1 channel, freq 256, batch 1
    cfg = dit_config("tiny", num_layers=1, num_attention_heads=1, attention_head_dim=8, ffn_dim=16,
                     text_dim=4, in_channels=1, out_channels=1)
    n, length, d = 4, 2, 8
    macs = (4 * n * d * d + 2 * n * n * d) + (2 * n * d * d + 2 * length * d * d + 2 * n * length * d) + 2 * n * d * 16
    macs += n * 4 * d + length * (4 * d + d * d) + 256 * d + d * d + 6 * d * d + n * d * 4
    assert dit_flops(cfg, 1, n, length)["forward"] == 2 * macs


def test_bad_options_raise():
    with pytest.raises(ValueError, match="even H and W"):
        BenchOptions(grid=(4, 15, 16))
    with pytest.raises(ValueError, match="not 16 frames x a square"):
        grid_for_tokens(5000)
    assert grid_for_tokens(65536) == (16, 128, 128)


def test_profile_categories():
    from sora_jax.bench.dit_speed import _category

    assert _category("ynn_fusion.78") == "matmul (YNNPACK fusion)"
    assert _category("dot.220") == "matmul (XLA dot)"
    assert _category("dynamic-slice_bitcast_fusion.15") == "scan slicing (dynamic-slice/update)"
    assert _category("transpose_copy_fusion.8") == "copy / transpose"
    assert _category("while.3") is None and _category("ThunkExecutor::Execute") is None
    assert _category("add_multiply_fusion.2") == "other fusions (elementwise)"


def test_accelerator_benchmark_runs_a_tiny_step_and_refuses_cpu(tmp_path):
    import dataclasses
    import math
    import subprocess
    import sys

    import flax.linen as nn

    from sora_jax.bench.dit_accel import AccelOptions, format_results, train_step_benchmark

    opts = AccelOptions(variant="tiny", frames=5, height=32, width=32, batch=2, text_len=4, dtype="float32",
                        attention="xla", remat="full", steps=2, warmup=1, peak_size=128, allow_cpu=True)
    r = train_step_benchmark(opts)
    json.dumps(r)  # the script writes it as JSON
    assert r["latent_grid"] == [2, 4, 4] and r["tokens"] == 2 * 2 * 2
    cfg = dit_config("tiny")
    abstract = jax.eval_shape(DiT(cfg).init, jax.random.key(0), jnp.zeros((1, 1, 2, 2, 16)), jnp.zeros((1,)),
                              jnp.zeros((1, 1, cfg.text_dim)))
    assert r["params"] == sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(nn.unbox(abstract)))
    assert len(r["step_times_s"]) == 2 and len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    assert r["model_flops_per_step"] == dit_flops(cfg, 2, 8, 4)["train_step"]
    assert r["achieved_flops_per_s"] == pytest.approx(r["model_flops_per_step"] / r["step_median_s"])
    assert r["mfu_vs_measured_matmul"] == pytest.approx(r["achieved_flops_per_s"] / r["matmul_peak"]["flops_per_s"])
    assert r["mfu_vs_datasheet"] is None  # a CPU has no entry in the datasheet table
    table = format_results([r, {"options": dataclasses.asdict(opts), "error": "out of memory"}])
    assert "| tiny | 5x32x32 (2x4x4) | 8 x 2 |" in table and "failed: out of memory" in table
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        train_step_benchmark(dataclasses.replace(opts, allow_cpu=False))
    with pytest.raises(ValueError, match="4k\\+1"):
        AccelOptions(frames=80).latent_grid()
    assert AccelOptions().tokens == 21 * 30 * 52  # Wan2.1's 81x480x832 video: 32760 tokens
    # The script on CPU: every configuration fails in its own process, and it says so in one line.
    out = tmp_path / "accel.json"
    proc = subprocess.run([sys.executable, "scripts/bench_dit_accel.py", "--variant", "tiny", "--video", "5", "32",
                           "32", "--steps", "1", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: every configuration")
    assert "needs a GPU or TPU" in json.loads(out.read_text())["runs"][0]["error"]
    bad = subprocess.run([sys.executable, "scripts/bench_dit_accel.py", "--video", "80", "480", "832"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [bad.stderr.strip().splitlines()[-1]]
    assert "frames must be 4k+1" in bad.stderr
