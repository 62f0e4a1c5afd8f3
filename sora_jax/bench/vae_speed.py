"""Encode/decode wall time of our JAX `CausalVAE` vs diffusers' `AutoencoderKLWan` on the same CPU.

Both models get the same weights (the torch state dict converted with `convert_wan_vae_state_dict`)
and the same input (each in its native layout: ours [B, T, H, W, C], diffusers [B, C, T, H, W]);
their outputs are compared so that the timings are known to be of equal work. Timings alternate
JAX and torch call by call (A B A B ...) because the machine is shared: load drifts hit both.

JAX variants are `path[+conv]`: path `whole` (CausalVAE.encode/decode, the clip in one pass) or
`chunked` (models/vae_codec: diffusers' chunk schedule in a lax.scan). A bare path is the model as
shipped (`VAEConfig.conv_impl="auto"`: `sum_time` on CPU). `+xla` and `+sum_time` pick the model's
3D-conv lowering explicitly (`VAEConfig.conv_impl`); `+fold_time` is a prototype lowering (time taps
concatenated into channels) and `+no_conv` an ablation, both applied by rewriting the traced
program of the `+xla` model.

XLA flags are read once, when the JAX backend starts, so `run_isolated` measures a flag set in a
fresh interpreter (with torch timed again there, so each ratio comes from one process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from sora_jax.bench.harness import (
    default_threads,
    interleaved,
    machine_info,
    perturb_weights,
    run_in_fresh_process,
    summarize,
)
from sora_jax.models.vae import CausalVAE, VAEConfig

# diffusers AutoencoderKLWan kwargs per benchmark config. attn_scales stays empty everywhere:
# Wan2.1 has none and diffusers' chunked encoder cannot run attention in its down blocks.
_COMMON = dict(dim_mult=[1, 2, 4, 4], attn_scales=[], temperal_downsample=[False, True, True])
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(base_dim=16, z_dim=8, num_res_blocks=1, **_COMMON),  # = VAEConfig.tiny()
    "small": dict(base_dim=32, z_dim=16, num_res_blocks=2, **_COMMON),  # Wan2.1 at a third of the width
    "wan2.1": {},  # diffusers defaults = VAEConfig.wan21(), 127M parameters
}
PATHS = ("whole", "chunked")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What to measure: model config, input shape, repeats, JAX variants and optional extras."""

    config: str = "small"
    frames: int = 17
    size: int = 96
    batch: int = 1
    repeats: int = 5
    warmup: int = 0  # the agreement pass already ran every function once
    seed: int = 0
    threads: int | None = None  # None: every core this process may run on
    variants: tuple[str, ...] = ("whole",)  # "path[+conv]", see the module docstring
    fused: bool = False  # also time encode->decode as one jitted program
    conv_breakdown: bool = False  # share of time in convs, by ablating them (JAX) / profiling (torch)

    def __post_init__(self) -> None:
        # JSON round trips (run_isolated) turn the tuple into a list
        object.__setattr__(self, "variants", tuple(self.variants))
        if self.config not in CONFIGS:
            raise ValueError(f"unknown VAE bench config {self.config!r}; choose one of {sorted(CONFIGS)}")
        if not self.variants:
            raise ValueError("give at least one JAX variant, e.g. 'whole'")
        for v in self.variants:
            parse_variant(v)
        if self.conv_breakdown and not any(v.endswith("+xla") for v in self.variants):
            raise ValueError(
                "conv_breakdown ablates the model with 3D convs: include 'whole+xla' or 'chunked+xla' in variants"
            )


def parse_variant(variant: str) -> tuple[str, str]:
    """'chunked+fold_time' -> ('chunked', 'fold_time'); a bare path is the model as shipped ('auto')."""
    path, _, conv = variant.partition("+")
    conv = conv or "auto"
    if path not in PATHS or conv not in CONV_IMPLS:
        raise ValueError(
            f"unknown JAX variant {variant!r}: use PATH or PATH+CONV with PATH in {list(PATHS)} "
            f"and CONV in {sorted(set(CONV_IMPLS) - {'auto'})}"
        )
    return path, conv


def model_conv_impl(conv: str) -> str:
    """The `VAEConfig.conv_impl` a variant's model is built with (rewrites start from the 3D convs)."""
    return conv if conv in MODEL_CONV_IMPLS else "xla"


def diffusers_kwargs(name: str) -> dict[str, Any]:
    """AutoencoderKLWan constructor kwargs of a benchmark config name."""
    if name not in CONFIGS:
        raise ValueError(f"unknown VAE bench config {name!r}; choose one of {sorted(CONFIGS)}")
    kw = dict(CONFIGS[name])
    z = kw.get("z_dim", 16)
    if z != 16:  # diffusers' default statistics have 16 entries; encode/decode never use them
        kw.update(latents_mean=[0.0] * z, latents_std=[1.0] * z)
    return kw


def build_pair(name: str, seed: int = 0) -> tuple[Any, VAEConfig, dict[str, Any]]:
    """(random diffusers AutoencoderKLWan in eval mode, our VAEConfig, our converted params)."""
    import torch
    from diffusers import AutoencoderKLWan

    from sora_jax.convert.wan_vae import convert_wan_vae_state_dict

    torch.manual_seed(seed)
    ref = perturb_weights(AutoencoderKLWan(**diffusers_kwargs(name)), 0.02, seed=None)
    cfg = VAEConfig.from_diffusers(dict(ref.config))
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return ref, cfg, convert_wan_vae_state_dict(state, cfg)


# --------------------------------------------------------------------------- conv lowering prototypes
# A small jaxpr interpreter replaces each channels-last 3D conv (inside scans and nested jits too).
# Same arithmetic, only the summation order differs (checked by the agreement numbers).

_NDHWC = ((0, 4, 1, 2, 3), (4, 3, 0, 1, 2), (0, 4, 1, 2, 3))


def _is_plain_conv3d(params: dict[str, Any]) -> bool:
    dn = params["dimension_numbers"]
    return (
        (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NDHWC
        and set(params["lhs_dilation"]) == {1}
        and set(params["rhs_dilation"]) == {1}
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
    )


def _time_taps(x: jax.Array, kt: int, stride: int, pad: tuple[int, int]) -> list[jax.Array]:
    """The kt time-shifted views [B, T_out, H, W, C] that time tap k multiplies."""
    if pad != (0, 0):
        x = jnp.pad(x, ((0, 0), pad, (0, 0), (0, 0), (0, 0)))
    t_out = (x.shape[1] - kt) // stride + 1
    return [lax.slice_in_dim(x, k, k + stride * (t_out - 1) + 1, stride, axis=1) for k in range(kt)]


def _conv2d(x: jax.Array, w: jax.Array, params: dict[str, Any]) -> jax.Array:
    """Per-frame 2D conv of [B, T, H, W, C] with the 3D conv's spatial strides/padding; 1x1 as a matmul."""
    _, sh, sw = params["window_strides"]
    _, ph, pw = params["padding"]
    kw_ = dict(precision=params["precision"], preferred_element_type=params["preferred_element_type"])
    b, t = x.shape[:2]
    if w.shape[:2] == (1, 1) and (sh, sw) == (1, 1) and tuple(ph) == tuple(pw) == (0, 0):
        return lax.dot_general(x, w[0, 0], (((4,), (0,)), ((), ())), **kw_)
    y = lax.conv_general_dilated(
        x.reshape(b * t, *x.shape[2:]), w, (sh, sw), (tuple(ph), tuple(pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw_,
    )
    return y.reshape(b, t, *y.shape[1:])


def _conv3d_fold_time(x: jax.Array, w: jax.Array, params: dict[str, Any]) -> jax.Array:
    """Time taps concatenated into channels: one 2D conv with kt*C inputs (im2col along time only)."""
    kt, kh, kw, cin, cout = w.shape
    taps = _time_taps(x, kt, params["window_strides"][0], tuple(params["padding"][0]))
    x2 = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)
    w2 = w.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout)  # tap-major, like the concat
    return _conv2d(x2, w2, params)


def _no_conv(x: jax.Array, w: jax.Array, params: dict[str, Any], out_aval: Any) -> jax.Array:
    """Ablation stand-in for any conv: the output's shape made of x's own elements, no arithmetic.

    Each output element is one input element (the window's first tap, first channels), so the data
    stays genuinely per-element: a constant stand-in would let XLA fold the norms and activations
    that follow into scalar ops, and the ablation would then drop more than the convs.
    """
    dn = params["dimension_numbers"]
    if tuple(dn.lhs_spec) != tuple(dn.out_spec):
        return jnp.broadcast_to((jnp.sum(x) * 1e-30).astype(out_aval.dtype), out_aval.shape)
    batch_ax, feat_ax, *spatial = dn.lhs_spec
    pads = [(0, 0)] * x.ndim
    for ax, pad in zip(spatial, params["padding"]):
        pads[ax] = tuple(pad)
    y = jnp.pad(x, pads)
    for ax, stride in zip(spatial, params["window_strides"]):
        y = lax.slice_in_dim(y, 0, stride * (out_aval.shape[ax] - 1) + 1, stride, axis=ax)
    c, o = y.shape[feat_ax], out_aval.shape[feat_ax]
    if o > c:
        y = jnp.concatenate([y] * -(-o // c), axis=feat_ax)
    y = lax.slice_in_dim(y, 0, o, axis=feat_ax)
    return (y + jnp.sum(w) * 1e-30).astype(out_aval.dtype)


MODEL_CONV_IMPLS = ("auto", "xla", "sum_time")  # VAEConfig.conv_impl values: no rewrite needed
CONV_IMPLS: dict[str, Callable[..., jax.Array] | None] = {
    **dict.fromkeys(MODEL_CONV_IMPLS),
    "fold_time": _conv3d_fold_time,
    "no_conv": _no_conv,  # ablation, not a model: gives the time spent outside convolutions
}


def _has_conv(closed: Any) -> bool:
    jaxpr = closed.jaxpr if hasattr(closed, "jaxpr") else closed
    return any(
        e.primitive is lax.conv_general_dilated_p for e in jaxpr.eqns
    ) or any(_has_conv(sub) for sub in jcore.subjaxprs(jaxpr))


def _rewrite_closed(closed: Any, impl: str) -> Any:
    """A ClosedJaxpr with the same signature whose convs go through `impl`."""
    if not _has_conv(closed):
        return closed
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: _eval_rewritten(closed.jaxpr, closed.consts, list(a), impl))(*avals)


def _rewrite_param(value: Any, impl: str) -> Any:
    if isinstance(value, jcore.ClosedJaxpr):
        return _rewrite_closed(value, impl)
    if isinstance(value, tuple) and value and all(isinstance(v, jcore.ClosedJaxpr) for v in value):
        return tuple(_rewrite_closed(v, impl) for v in value)  # cond branches
    return value


def _eval_rewritten(jaxpr: Any, consts: list[Any], args: list[Any], impl: str) -> list[Any]:
    env: dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]  # noqa: E731
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        out_aval = eqn.outvars[0].aval
        if eqn.primitive is lax.conv_general_dilated_p and impl == "no_conv":
            outs = [_no_conv(*ins, eqn.params, out_aval)]
        elif eqn.primitive is lax.conv_general_dilated_p and _is_plain_conv3d(eqn.params):
            outs = [CONV_IMPLS[impl](*ins, eqn.params).astype(out_aval.dtype)]
        else:
            params = {k: _rewrite_param(v, impl) for k, v in eqn.params.items()}
            ans = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(params))
            outs = ans if eqn.primitive.multiple_results else [ans]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def rewrite_convs(fn: Callable, impl: str) -> Callable:
    """fn with every channels-last 3D conv lowered by CONV_IMPLS[impl]; fn itself for the model's own lowerings.

    impl 'no_conv' is an ablation, not a model: every conv (2D too) becomes a cheap stand-in of
    the same shape, so timing it gives the time spent outside convolutions.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {sorted(CONV_IMPLS)}")
    if CONV_IMPLS[impl] is None:
        return fn

    def wrapped(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval_rewritten(closed.jaxpr, closed.consts, jax.tree.leaves(args), impl)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped


# --------------------------------------------------------------------------- measuring


def _max_diff(ours: Any, theirs: np.ndarray) -> dict[str, float]:
    ours = np.asarray(ours)
    return {"max_abs_diff": float(np.abs(ours - theirs).max()), "ref_max_abs": float(np.abs(theirs).max())}


def _compile(fn: Callable, *args: Any) -> tuple[Any, dict[str, Any]]:
    """AOT-compile a jitted fn; returns (compiled, {lower_s, compile_s, temp_bytes})."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    info: dict[str, Any] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "temp_bytes": None}
    try:
        info["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # memory_analysis is best-effort on some backends
        pass
    return compiled, info


def _torch_conv_share(call: Callable[[], Any]) -> float:
    """Fraction of one torch call's wall time under aten::convolution (inclusive), via the profiler."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    wall = time.perf_counter() - t0
    conv_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "aten::convolution")
    # profiler overhead inflates wall a little, so this slightly underestimates the share
    return conv_us * 1e-6 / wall


def _jax_ops(model: CausalVAE, path: str, dtype: Any) -> dict[str, Callable]:
    """encode (-> mean, logvar), decode (-> clamped video) and encode_decode functions of (params, x)."""
    if path == "whole":
        enc = lambda p, v: model.apply(p, v, method=CausalVAE.encode)  # noqa: E731
        dec = lambda p, v: model.apply(p, v, method=CausalVAE.decode)  # noqa: E731
    else:
        from sora_jax.models.vae import split_moments
        from sora_jax.models.vae_codec import decode_unclamped_chunked, encode_moments_chunked

        enc = lambda p, v: split_moments(encode_moments_chunked(model, p, v))  # noqa: E731
        dec = lambda p, v: jnp.clip(decode_unclamped_chunked(model, p, v), -1.0, 1.0)  # noqa: E731
    return {
        "encode": enc,
        "decode": dec,
        "encode_decode": lambda p, v: dec(p, (enc(p, v)[0] * 0.3).astype(dtype)),
    }


def _key(op: str, variant: str) -> str:
    return f"jax_{op}@{variant}"


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Build both models, check they agree, time encode and decode; returns a JSON-able dict."""
    import torch

    torch.set_num_threads(opts.threads or default_threads())
    machine = machine_info()  # before the work, so its load average says what the run started in
    ref, cfg, params = build_pair(opts.config, opts.seed)

    gen = torch.Generator().manual_seed(opts.seed + 1)
    x_t = torch.rand(opts.batch, 3, opts.frames, opts.size, opts.size, generator=gen) * 2 - 1
    with torch.inference_mode():
        dist = ref.encode(x_t).latent_dist
        mean_t, logvar_t = dist.mean, dist.logvar
        # decode a scaled mean so little of the output sits at the clamp, where diffs hide
        z_t = mean_t * 0.3
        out_t = ref.decode(z_t).sample
    to_ours = lambda a: np.ascontiguousarray(a.numpy().transpose(0, 2, 3, 4, 1))  # noqa: E731
    x_j, z_j = jnp.asarray(to_ours(x_t)), jnp.asarray(to_ours(z_t))

    def torch_encode() -> Any:
        with torch.inference_mode():
            d = ref.encode(x_t).latent_dist
            return d.mean, d.logvar

    def torch_decode() -> Any:
        with torch.inference_mode():
            return ref.decode(z_t).sample

    ops = ["encode", "decode"] + (["encode_decode"] if opts.fused else [])
    ablations = [f"{p}+no_conv" for p in PATHS if f"{p}+xla" in opts.variants] if opts.conv_breakdown else []
    compiled: dict[str, Any] = {}
    compile_info: dict[str, Any] = {}
    agreement: dict[str, Any] = {}
    for variant in (*opts.variants, *ablations):
        path, conv = parse_variant(variant)
        fns = _jax_ops(CausalVAE(dataclasses.replace(cfg, conv_impl=model_conv_impl(conv))), path, cfg.dtype)
        for op in ops if conv != "no_conv" else ["encode", "decode"]:
            arg = z_j if op == "decode" else x_j
            c, compile_info[_key(op, variant)] = _compile(rewrite_convs(fns[op], conv), params, arg)
            compiled[_key(op, variant)] = lambda c=c, a=arg: jax.block_until_ready(c(params, a))
        if conv != "no_conv":
            mean_j, logvar_j = compiled[_key("encode", variant)]()
            agreement[variant] = {
                "encode_mean": _max_diff(mean_j, to_ours(mean_t)),
                "encode_logvar": _max_diff(logvar_j, to_ours(logvar_t)),
                "decode": _max_diff(compiled[_key("decode", variant)](), to_ours(out_t)),
            }

    # a round runs every JAX variant of an op next to torch's, so load drifts hit all of them
    round_fns: dict[str, Callable[[], Any]] = {}
    for op, torch_fn in (("encode", torch_encode), ("decode", torch_decode), ("encode_decode", None)):
        round_fns.update({k: f for k, f in compiled.items() if k.startswith(f"jax_{op}@")})
        if torch_fn is not None:
            round_fns[f"torch_{op}"] = torch_fn
    timings = {k: summarize(v) for k, v in interleaved(round_fns, opts.repeats, opts.warmup).items()}
    med = lambda k: timings[k]["median_s"]  # noqa: E731

    result: dict[str, Any] = {
        "options": dataclasses.asdict(opts),
        "machine": machine,
        "model": {"params": sum(p.numel() for p in ref.parameters()), "diffusers": diffusers_kwargs(opts.config)},
        "shapes": {"video_ours": list(x_j.shape), "latent_ours": list(z_j.shape)},
        "agreement": agreement,
        "compile": compile_info,
        "timings": timings,
        # > 1 means JAX is faster; medians over the same interleaved rounds
        "speedup_vs_torch": {
            _key(op, v): med(f"torch_{op}") / med(_key(op, v)) for v in opts.variants for op in ("encode", "decode")
        },
        # best round of each: under load the least-disturbed call, a second opinion on the medians
        "speedup_vs_torch_min": {
            _key(op, v): timings[f"torch_{op}"]["min_s"] / timings[_key(op, v)]["min_s"]
            for v in opts.variants for op in ("encode", "decode")
        },
    }
    if opts.fused:
        result["fused_vs_separate"] = {
            v: (med(_key("encode", v)) + med(_key("decode", v))) / med(_key("encode_decode", v)) for v in opts.variants
        }
    if opts.conv_breakdown:
        share = {
            _key(op, f"{path}+xla"): 1.0 - med(_key(op, f"{path}+no_conv")) / med(_key(op, f"{path}+xla"))
            for path in PATHS if f"{path}+xla" in opts.variants for op in ("encode", "decode")
        }
        share["torch_encode"] = _torch_conv_share(torch_encode)
        share["torch_decode"] = _torch_conv_share(torch_decode)
        result["conv_share"] = share
    machine["loadavg_end"] = list(os.getloadavg())
    return result


def run_from_json(opts_json: str) -> dict[str, Any]:
    """`run_benchmark` of JSON-encoded options (the entry point `run_isolated` starts)."""
    return run_benchmark(BenchOptions(**json.loads(opts_json)))


def run_isolated(opts: BenchOptions, xla_flags: str = "", timeout: float | None = None) -> dict[str, Any]:
    """`run_benchmark` in a fresh Python whose JAX backend starts with these extra XLA flags."""
    return run_in_fresh_process(
        "sora_jax.bench.vae_speed:run_from_json", [json.dumps(dataclasses.asdict(opts))], xla_flags, timeout
    )


def markdown_table(result: dict[str, Any]) -> str:
    """One `run_benchmark` result as a markdown table: a row per op and JAX variant."""
    t, s, a, comp = result["timings"], result["speedup_vs_torch"], result["agreement"], result["compile"]
    s_min = result["speedup_vs_torch_min"]
    fmt = lambda d: f"{d['median_s']:.3f} s ({d['min_s']:.3f})"  # noqa: E731
    rows = [
        "| op | JAX variant | JAX median (min) | torch median (min) | JAX speedup, medians (mins) "
        "| max abs diff | JAX compile |",
        "|---|---|---|---|---|---|---|",
    ]
    variants = result["options"]["variants"]
    for op, diff_key in (("encode", "encode_mean"), ("decode", "decode")):
        for v in variants:
            k = _key(op, v)
            rows.append(
                f"| {op} | {v} | {fmt(t[k])} | {fmt(t[f'torch_{op}'])} | {s[k]:.2f}x ({s_min[k]:.2f}x) "
                f"| {a[v][diff_key]['max_abs_diff']:.1e} | {comp[k]['compile_s']:.1f} s |"
            )
    for v in variants if "fused_vs_separate" in result else ():
        k = _key("encode_decode", v)
        rows.append(
            f"| encode+decode, one jit | {v} | {fmt(t[k])} | | "
            f"{result['fused_vs_separate'][v]:.2f}x vs separate jits | | {comp[k]['compile_s']:.1f} s |"
        )
    return "\n".join(rows)


def format_report(result: dict[str, Any]) -> str:
    """Header line (config, shapes, machine, flags, load), markdown table and conv shares of one result."""
    if "error" in result:
        return f"XLA_FLAGS={result['xla_flags']!r}: failed: {result['error']}"
    m, o = result["machine"], result["options"]
    lines = [
        f"{o['config']}, video {result['shapes']['video_ours']} (B,T,H,W,C), "
        f"{result['model']['params'] / 1e6:.1f}M params; {m['cpu_model']}, usable cores {m['affinity_cpus']}; "
        f"jax {m['jax']}, torch {m['torch']} ({m['torch_threads']} threads); XLA_FLAGS={m['xla_flags']!r}; "
        f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}",
        markdown_table(result),
    ]
    if "conv_share" in result:
        lines.append("share of time in convs: " + ", ".join(f"{k} {v:.0%}" for k, v in result["conv_share"].items()))
    return "\n".join(lines)
