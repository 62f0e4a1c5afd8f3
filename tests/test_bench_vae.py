"""VAE speed benchmark: runs end to end on the tiny config (no timing is asserted) and its conv rewrites are exact."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax import lax

from sora_jax.bench.harness import run_in_fresh_process
from sora_jax.bench.vae_speed import BenchOptions, format_report, markdown_table, rewrite_convs
from tests.test_vae import CONV3D_CASES


def test_benchmark_smoke():
    pytest.importorskip("diffusers")
    from sora_jax.bench.vae_speed import run_benchmark

    r = run_benchmark(BenchOptions(config="tiny", frames=5, size=16, repeats=1, warmup=0))
    json.dumps(r)  # the script writes it as JSON
    for key in ("jax_encode@whole", "torch_encode", "jax_decode@whole", "torch_decode"):
        assert len(r["timings"][key]["times_s"]) == 1 and r["timings"][key]["min_s"] > 0
    assert set(r["speedup_vs_torch"]) == {"jax_encode@whole", "jax_decode@whole"}
    for key in ("os_cpu_count", "jax_threads", "torch_threads", "jax", "torch", "diffusers", "loadavg_start"):
        assert r["machine"][key] is not None, key
    assert r["machine"]["torch_threads"] == r["machine"]["jax_threads"]
    assert r["compile"]["jax_encode@whole"]["compile_s"] > 0
    assert r["shapes"] == {"video_ours": [1, 5, 16, 16, 3], "latent_ours": [1, 2, 2, 2, 8]}
    for name, diff in r["agreement"]["whole"].items():
        assert diff["max_abs_diff"] < 1e-4 and diff["ref_max_abs"] > 1e-3, name  # same work on both sides
    assert "| encode | whole |" in markdown_table(r) and "jax 0." in format_report(r)


@pytest.mark.parametrize("impl", ["fold_time"])
@pytest.mark.parametrize("kernel, strides, padding", CONV3D_CASES[:4])  # the VAE's own conv kinds
def test_conv_rewrites_match_xla(impl, kernel, strides, padding):
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (2, 7, 6, 5, 4))
    w = jax.random.normal(kw, (*kernel, 4, 3))

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        dn = ("NDHWC", "DHWIO", "NDHWC")
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn) + 1.0

    want = conv(x, w)
    got = jax.jit(rewrite_convs(conv, impl))(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert jax.jit(rewrite_convs(conv, "no_conv"))(x, w).shape == want.shape  # the ablation keeps shapes only


def test_bad_options_raise():
    with pytest.raises(ValueError, match="unknown VAE bench config"):
        BenchOptions(config="huge")
    with pytest.raises(ValueError, match="unknown JAX variant 'whole\\+cudnn'"):
        BenchOptions(variants=("whole+cudnn",))
    with pytest.raises(ValueError, match="include 'whole\\+xla' or 'chunked\\+xla'"):
        BenchOptions(variants=("whole", "whole+fold_time"), conv_breakdown=True)


def test_fresh_process_runner_returns_result_or_error():
    assert run_in_fresh_process("os.path:join", ["a", "b"]) == "a/b"
    r = run_in_fresh_process("os.path:no_such_function", [], xla_flags="--xla_dump_to=/dev/null")
    assert r["xla_flags"] == "--xla_dump_to=/dev/null" and "no_such_function" in r["error"]


def test_conv_layer_bench_smoke():
    pytest.importorskip("torch")
    from sora_jax.bench.conv_layer import ConvLayer, format_row, run_layer

    r = run_layer(ConvLayer(batch=1, frames=2, size=8, channels_in=4, channels_out=4, repeats=1))
    json.dumps(r)  # the script writes it as JSON
    assert set(r["gflops"]) == {"jax_xla_3d", "jax_sum_time", "jax_winograd", "torch_conv3d"}
    assert min(r["gflops"].values()) > 0
    a = r["agreement_max_abs_diff"]
    assert a["sum_time"] < 1e-4 and a["torch"] < 1e-4 and a["ref_max_abs"] > 1e-2  # the same conv, not zeros
    assert a["winograd"] < 1e-4
    assert r["torch_backend"] and format_row(r).startswith("| 1x2x8x8, 4->4 |")
