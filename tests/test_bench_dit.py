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
