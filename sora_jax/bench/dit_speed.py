"""Train-step and forward wall time of our JAX `DiT` vs diffusers' `WanTransformer3DModel` on the same CPU.

Both models get the same config, the same weights (the torch state dict converted with
`convert_wan_dit_state_dict`) and the same inputs (ours channels-last, diffusers channels-first).
Their forward outputs and their gradients are compared, so the timings are known to be of equal
work. A train step is forward + MSE loss to a fixed target + backward + AdamW update (optax.adamw,
jitted with donated params and optimiser state; torch.optim.AdamW with the same hyper-parameters).
JAX and torch alternate call by call (A B A B ...) because the machine is shared.

Model FLOPs utilisation: analytic matmul FLOPs of the config (`dit_flops`) per step time, against
the best float32 matmul rate measured in the same run (JAX and torch both tried, the faster counts).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.bench.harness import (
    default_threads,
    interleaved,
    machine_info,
    perturb_weights,
    run_in_fresh_process,
    summarize,
)
from sora_jax.models.dit import DiT, DiTConfig


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """Model size, input shape and repeats; the defaults are config "S" of issue #4 (256 tokens, batch 4)."""

    num_layers: int = 12
    num_attention_heads: int = 6
    attention_head_dim: int = 64
    ffn_dim: int = 1536
    text_dim: int = 384
    channels: int = 16
    grid: tuple[int, int, int] = (4, 16, 16)  # latent T, H, W; patch 1x2x2 -> 4*8*8 = 256 tokens
    batch: int = 4
    text_len: int = 32
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    threads: int | None = None  # torch threads; None: every core this process may run on
    peak_size: int = 2048  # n of the n x n x n float32 matmul that measures the machine's peak
    lr: float = 1e-4
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))  # JSON round trips give a list
        if len(self.grid) != 3 or any(n <= 0 for n in self.grid) or self.grid[1] % 2 or self.grid[2] % 2:
            raise ValueError(f"grid must be a latent (T, H, W) with even H and W (patch 1x2x2); got {self.grid}")
        if min(self.repeats, self.batch, self.text_len, self.num_layers) < 1:
            raise ValueError("repeats, batch, text_len and num_layers must be >= 1")

    def diffusers_kwargs(self) -> dict[str, Any]:
        """WanTransformer3DModel constructor kwargs of this benchmark config."""
        return dict(
            patch_size=(1, 2, 2), num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim, in_channels=self.channels,
            out_channels=self.channels, text_dim=self.text_dim, ffn_dim=self.ffn_dim, num_layers=self.num_layers,
        )

    @property
    def tokens(self) -> int:
        """Video tokens per example."""
        t, h, w = self.grid
        return t * (h // 2) * (w // 2)


def dit_flops(cfg: DiTConfig, batch: int, tokens: int, text_len: int) -> dict[str, float]:
    """Analytic model FLOPs (2 x multiply-adds of every matmul) of one forward and one train step.

    Counts projections, attention scores and values, FFN, patch/text/time embeddings and the
    head; not norms, softmax, RoPE or modulation (elementwise, a few % at these sizes). A train
    step is 3 forwards (backward = 2x), whatever is recomputed under remat.
    """
    n, length, d, f = tokens, text_len, cfg.hidden_size, cfg.ffn_dim
    patch = math.prod(cfg.patch_size)
    per_block = (
        4 * n * d * d + 2 * n * n * d  # self-attention: q, k, v, out; scores and values over all heads
        + 2 * n * d * d + 2 * length * d * d + 2 * n * length * d  # cross: q, out; k, v of text; scores, values
        + 2 * n * d * f  # FFN in and out
    )
    outside = (
        n * patch * cfg.in_channels * d  # patch embedding
        + length * (cfg.text_dim * d + d * d)  # text embedding MLP
        + cfg.freq_dim * d + d * d + d * 6 * d  # time MLP and the 6-way modulation projection
        + n * d * patch * cfg.out_channels  # output head
    )
    forward = 2.0 * batch * (cfg.num_layers * per_block + outside)
    return {"forward": forward, "train_step": 3.0 * forward}


# --------------------------------------------------------------------------- building


def build_pair(opts: BenchOptions) -> tuple[Any, DiTConfig, dict[str, Any]]:
    """(random diffusers WanTransformer3DModel, our DiTConfig from its config.json, converted params)."""
    import torch
    from diffusers import WanTransformer3DModel

    from sora_jax.convert.wan_dit import convert_wan_dit_state_dict, dit_config_from_diffusers

    torch.manual_seed(opts.seed)
    ref = perturb_weights(WanTransformer3DModel(**opts.diffusers_kwargs()).float(), 0.02, seed=None)
    cfg = dit_config_from_diffusers(dict(ref.config))
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return ref, cfg, jax.tree_util.tree_map(jnp.asarray, convert_wan_dit_state_dict(state, cfg))


def make_inputs(opts: BenchOptions, cfg: DiTConfig) -> dict[str, np.ndarray]:
    """latents [B,T,H,W,C], timesteps [B], text [B,L,text_dim] and an MSE target like the output."""
    rng = np.random.default_rng(opts.seed + 1)
    shape = (opts.batch, *opts.grid, cfg.in_channels)
    return {
        "latents": rng.standard_normal(shape, dtype=np.float32),
        "timesteps": rng.uniform(0, 1000, (opts.batch,)).astype(np.float32),
        "text": rng.standard_normal((opts.batch, opts.text_len, cfg.text_dim), dtype=np.float32),
        "target": rng.standard_normal((opts.batch, *opts.grid, cfg.out_channels), dtype=np.float32),
    }


def jax_fns(cfg: DiTConfig, lr: float, weight_decay: float) -> dict[str, Callable]:
    """forward(params, latents, t, text), grads(params, batch) and a donated AdamW step(state, batch)."""
    import optax

    model = DiT(cfg)
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)  # torch.optim.AdamW's

    def forward(params: Any, latents: jax.Array, t: jax.Array, text: jax.Array) -> jax.Array:
        return model.apply({"params": params}, latents, t, text)

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        out = forward(params, batch["latents"], batch["timesteps"], batch["text"])
        return jnp.mean(jnp.square(out - batch["target"]))

    def step(state: tuple[Any, Any], batch: dict[str, jax.Array]) -> tuple[tuple[Any, Any], jax.Array]:
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return {
        "forward": forward, "loss": loss_fn, "grads": jax.grad(loss_fn), "step": step, "init_opt": opt.init,
    }


# --------------------------------------------------------------------------- measuring


def _rel_diff(ours: Any, theirs: Any) -> dict[str, float]:
    """Max abs difference of two same-structure trees, and the reference's max abs (its scale)."""
    a, b = jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))
    scale = max(float(np.abs(np.asarray(y)).max()) for y in b)
    return {"max_abs_diff": diff, "ref_max_abs": scale, "rel": diff / max(scale, 1e-30)}


def matmul_fns(n: int) -> dict[str, Callable[[], Any]]:
    """One float32 n x n x n matmul of jitted JAX and of torch, each a no-argument callable."""
    import torch

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    mm = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    a_t = torch.from_numpy(np.array(a))
    return {"jax_matmul": lambda: jax.block_until_ready(mm(a, a)), "torch_matmul": lambda: torch.mm(a_t, a_t)}


def _paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i: each ratio from calls seconds apart, under nearly the same load."""
    return statistics.median(x / y for x, y in zip(a, b))


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Build both models, check they agree, time train step and forward alternately; a JSON-able dict."""
    import torch

    torch.set_num_threads(opts.threads or default_threads())
    machine = machine_info()  # before the work, so its load average says what the run started in
    ref, cfg, params = build_pair(opts)
    data = make_inputs(opts, cfg)
    batch_j = {k: jnp.asarray(v) for k, v in data.items()}
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))  # noqa: E731
    lat_t, tgt_t = to_torch(data["latents"]), to_torch(data["target"])
    t_t, text_t = torch.from_numpy(data["timesteps"]), torch.from_numpy(data["text"])
    fns = jax_fns(cfg, opts.lr, opts.weight_decay)
    compile_s: dict[str, float] = {}

    # ---- agreement: forward outputs and gradients from the same weights
    t0 = time.perf_counter()
    fwd = jax.jit(fns["forward"]).lower(params, *(batch_j[k] for k in ("latents", "timesteps", "text"))).compile()
    compile_s["forward"] = time.perf_counter() - t0
    run_fwd = lambda: jax.block_until_ready(fwd(params, batch_j["latents"], batch_j["timesteps"], batch_j["text"]))  # noqa: E731

    def torch_forward() -> Any:
        with torch.inference_mode():
            return ref(lat_t, t_t, text_t, return_dict=False)[0]

    out_ref = np.moveaxis(torch_forward().numpy(), 1, -1)
    agreement = {"forward": _rel_diff(run_fwd(), out_ref)}

    from sora_jax.convert.wan_dit import convert_wan_dit_state_dict

    ref.zero_grad(set_to_none=True)
    loss_t = torch.mean(torch.square(ref(lat_t, t_t, text_t, return_dict=False)[0] - tgt_t))
    loss_t.backward()
    grads_ref = convert_wan_dit_state_dict({n: p.grad.numpy() for n, p in ref.named_parameters()}, cfg)
    grads = jax.jit(fns["grads"])(params, batch_j)
    agreement["grads"] = _rel_diff(grads, grads_ref)
    agreement["loss"] = {"jax": float(jax.jit(fns["loss"])(params, batch_j)), "torch": float(loss_t.detach())}
    del grads, grads_ref

    # ---- train steps: JAX params/opt state donated, so each call consumes the previous state
    t0 = time.perf_counter()
    train_params = jax.tree_util.tree_map(jnp.copy, params)  # donated below; params stay for the forward
    state = (train_params, fns["init_opt"](train_params))
    step = jax.jit(fns["step"], donate_argnums=0).lower(state, batch_j).compile()
    compile_s["train_step"] = time.perf_counter() - t0
    holder = {"state": state}

    def jax_step() -> None:
        holder["state"], loss = step(holder["state"], batch_j)
        jax.block_until_ready(loss)

    ref.train()
    opt_t = torch.optim.AdamW(ref.parameters(), lr=opts.lr, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=opts.weight_decay)

    def torch_step() -> None:
        opt_t.zero_grad(set_to_none=True)
        out = ref(lat_t, t_t, text_t, return_dict=False)[0]
        torch.mean(torch.square(out - tgt_t)).backward()
        opt_t.step()

    # The matmul peak is sampled in every round too: under load the peak moves with the steps, so
    # MFU compares a step with the peak measured seconds from it (medians), or best with best.
    mm = matmul_fns(opts.peak_size)
    timings_raw = interleaved({"jax_train_step": jax_step, "torch_train_step": torch_step, **mm},
                               opts.repeats, opts.warmup)
    # torch's weights have moved by a few AdamW steps by now; the work per forward is the same
    forward_raw = interleaved({"jax_forward": run_fwd, "torch_forward": torch_forward, **mm}, opts.repeats, opts.warmup)
    for k, v in forward_raw.items():
        timings_raw[k] = timings_raw.get(k, []) + v
    timings = {k: summarize(v) for k, v in timings_raw.items()}
    mm_flops = 2.0 * opts.peak_size**3
    peak = {
        "median": max(mm_flops / timings[k]["median_s"] / 1e9 for k in mm),
        "best": max(mm_flops / timings[k]["min_s"] / 1e9 for k in mm),
        **{k: mm_flops / timings[k]["min_s"] / 1e9 for k in mm},
    }
    flops = dit_flops(cfg, opts.batch, opts.tokens, opts.text_len)

    ratio, ratio_min, ratio_paired, mfu = {}, {}, {}, {}
    for op in ("train_step", "forward"):
        j, t = timings[f"jax_{op}"], timings[f"torch_{op}"]
        ratio[op] = j["median_s"] / t["median_s"]  # < 1: JAX faster (the target is <= 0.8)
        ratio_min[op] = j["min_s"] / t["min_s"]
        ratio_paired[op] = _paired_ratio(j["times_s"], t["times_s"])
        for side, d in (("jax", j), ("torch", t)):
            rate, best = flops[op] / d["median_s"] / 1e9, flops[op] / d["min_s"] / 1e9
            mfu[f"{side}_{op}"] = {"gflops": rate, "pct_of_peak": 100.0 * rate / peak["median"],
                                   "gflops_best": best, "pct_of_best_peak": 100.0 * best / peak["best"]}
    machine["loadavg_end"] = list(os.getloadavg())
    return {
        "options": dataclasses.asdict(opts),
        "machine": machine,
        "model": {"params": sum(p.numel() for p in ref.parameters()), "tokens": opts.tokens,
                  "diffusers": opts.diffusers_kwargs()},
        "agreement": agreement,
        "compile_s": compile_s,
        "timings": timings,
        "jax_over_torch": ratio,
        "jax_over_torch_min": ratio_min,
        "jax_over_torch_paired": ratio_paired,
        "flops": flops,
        "matmul_peak_gflops": peak,
        "mfu": mfu,
    }


def format_report(r: dict[str, Any]) -> str:
    """Header line (config, machine, load), a markdown table of the timings, the agreement line."""
    m, o, t = r["machine"], r["options"], r["timings"]
    fmt = lambda d: f"{d['median_s']:.3f} s ({d['min_s']:.3f})"  # noqa: E731
    mfu_cell = lambda m: (f"{m['gflops']:.1f}, {m['pct_of_peak']:.0f}% "  # noqa: E731
                          f"({m['gflops_best']:.1f}, {m['pct_of_best_peak']:.0f}%)")
    lines = [
        f"DiT {o['num_layers']}L x {o['num_attention_heads']}h x {o['attention_head_dim']}, ffn {o['ffn_dim']}, "
        f"{r['model']['params'] / 1e6:.1f}M params; batch {o['batch']} x {r['model']['tokens']} tokens, "
        f"text {o['text_len']}; {m['cpu_model']}, usable cores {m['affinity_cpus']}; jax {m['jax']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads); XLA_FLAGS={m['xla_flags']!r}; "
        f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}",
        "| op | JAX median (min) | torch median (min) | JAX/torch: medians, mins, per-round median "
        "| JAX GFLOP/s, MFU: median (best) | torch GFLOP/s, MFU: median (best) | JAX compile |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in ("train_step", "forward"):
        mj, mt = r["mfu"][f"jax_{op}"], r["mfu"][f"torch_{op}"]
        lines.append(
            f"| {op} | {fmt(t[f'jax_{op}'])} | {fmt(t[f'torch_{op}'])} | {r['jax_over_torch'][op]:.2f}, "
            f"{r['jax_over_torch_min'][op]:.2f}, {r['jax_over_torch_paired'][op]:.2f} | {mfu_cell(mj)} "
            f"| {mfu_cell(mt)} | {r['compile_s'][op]:.1f} s |"
        )
    a, p = r["agreement"], r["matmul_peak_gflops"]
    lines.append(
        f"matmul peak ({o['peak_size']}^3 f32, sampled every round): median {p['median']:.1f}, best "
        f"{p['best']:.1f} (jax {p['jax_matmul']:.1f}, torch {p['torch_matmul']:.1f}) GFLOP/s; "
        f"model GFLOP per train step {r['flops']['train_step'] / 1e9:.1f}; agreement: forward rel "
        f"{a['forward']['rel']:.1e}, grads rel {a['grads']['rel']:.1e}, loss jax {a['loss']['jax']:.6f} "
        f"torch {a['loss']['torch']:.6f}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- where XLA:CPU spends a step

# Thunk names -> what they do; first match wins. Containers (loops, the executor) hold other
# thunks' time, so they are left out of the sums.
_CONTAINERS = ("while", "conditional", "call", "ThunkExecutor", "SlinkyThreadPool", "$")
_CATEGORIES = (
    ("matmul (YNNPACK fusion)", ("ynn_fusion",)),
    ("matmul (XLA dot)", ("dot", "convolution")),
    ("scan slicing (dynamic-slice/update)", ("dynamic-slice", "dynamic-update-slice", "dynamic_slice",
                                             "dynamic_update_slice")),
    ("copy / transpose", ("copy", "transpose")),
    ("broadcast", ("broadcast",)),
    ("reduce", ("reduce",)),
)


def _category(name: str) -> str | None:
    """Cost category of one profiler event name; None for containers."""
    if name.startswith(_CONTAINERS):
        return None
    for label, keys in _CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other fusions (elementwise)"


def jax_step_profile(opts: BenchOptions, trace_dir: str) -> dict[str, Any]:
    """JAX train step alone: median time over opts.repeats, and one profiled step's thunk time by category."""
    import flax.linen as nn

    from sora_jax.models.dit import dit_config

    cfg = dit_config("S", num_layers=opts.num_layers, num_attention_heads=opts.num_attention_heads,
                     attention_head_dim=opts.attention_head_dim, ffn_dim=opts.ffn_dim, text_dim=opts.text_dim,
                     in_channels=opts.channels, out_channels=opts.channels)
    fns = jax_fns(cfg, opts.lr, opts.weight_decay)
    batch = {k: jnp.asarray(v) for k, v in make_inputs(opts, cfg).items()}
    small = (batch["latents"][:1, :1, :2, :2], batch["timesteps"][:1], batch["text"][:1, :1])
    params = nn.unbox(DiT(cfg).init(jax.random.key(opts.seed), *small)["params"])
    holder = {"state": (params, fns["init_opt"](params))}
    step = jax.jit(fns["step"], donate_argnums=0).lower(holder["state"], batch).compile()

    def run() -> None:
        holder["state"], loss = step(holder["state"], batch)
        jax.block_until_ready(loss)

    times = interleaved({"step": run}, opts.repeats, opts.warmup)["step"]
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    by_cat: dict[str, float] = {}
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads run the thunks
                continue
            for ev in line.events:
                cat = _category(ev.name)
                if cat is not None:
                    by_cat[cat] = by_cat.get(cat, 0.0) + ev.duration_ns * 1e-9
    busy = sum(by_cat.values())
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "step": summarize(times),
        "profiled_step_s": wall,
        # thread-seconds per category (summed over XLA's worker threads) and their share of the sum
        "thunk_s": by_cat,
        "thunk_share": {k: v / busy for k, v in by_cat.items()} if busy else {},
        "gflops": dit_flops(cfg, opts.batch, opts.tokens, opts.text_len)["train_step"] / statistics.median(times) / 1e9,
        "loadavg_end": list(os.getloadavg()),
    }


def profile_from_json(opts_json: str, trace_dir: str) -> dict[str, Any]:
    """`jax_step_profile` of JSON-encoded options (the entry point `run_isolated_profile` starts)."""
    return jax_step_profile(BenchOptions(**json.loads(opts_json)), trace_dir)


def run_isolated_profile(opts: BenchOptions, xla_flags: str, trace_dir: str, timeout: float | None = 900) -> dict[str, Any]:
    """`jax_step_profile` in a fresh interpreter whose XLA starts with these extra flags."""
    load = list(os.getloadavg())
    r = run_in_fresh_process(
        "sora_jax.bench.dit_speed:profile_from_json", [json.dumps(dataclasses.asdict(opts)), trace_dir],
        xla_flags, timeout,
    )
    return r if "error" in r else {**r, "loadavg_start": load}


def format_profiles(results: list[dict[str, Any]]) -> str:
    """One line per flag set: step median (min), GFLOP/s, load, and the thunk-time shares."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"XLA_FLAGS={r['xla_flags']!r}: failed: {r['error']}")
            continue
        shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r["thunk_share"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"XLA_FLAGS={r['xla_flags']!r}: JAX step {r['step']['median_s']:.2f} s ({r['step']['min_s']:.2f}), "
            f"{r['gflops']:.1f} GFLOP/s, load {r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}; "
            f"thunk time: {shares}"
        )
    return "\n".join(lines)
