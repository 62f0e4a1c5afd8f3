"""Whole text-to-video sample time: our `TextToVideo.generate` vs diffusers' `WanPipeline.__call__` on one CPU.

One random WanPipeline (`wan_tiny.SIZES`) is saved, converted with `convert_wan_pipeline` and loaded
with `TextToVideo.from_pretrained`, so both sides hold the same weights. Both get the same prompt,
negative prompt, size, frames, UniPC steps, guidance, max_sequence_length and the same initial noise
(diffusers layout, transposed for ours). End to end = text encode + the CFG denoising loop + VAE
decode + postprocess to float [0, 1]. Their videos are compared, so the timings are of equal work.

JAX is compiled by its first call (timed on its own, with the compile time inside it summed from
jax.monitoring events); then JAX and torch alternate call by call (A B A B ...) because the machine
is shared. Per-stage times: torch's from timers wrapped around `encode_prompt`, `vae.decode` and
`postprocess_video` during the timed calls (the loop is the rest); ours from a staged copy of
`generate` (text encoder, sampler, the same chunked decode, postprocess) run in the same rounds and
checked to give generate's video.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# the VAE/DiT benchmarks' helpers: the same rounds, summaries and machine fields in every JSON
from sora_jax.bench.dit_speed import dit_flops
from sora_jax.bench.harness import default_threads, interleaved, machine_info, summarize
from sora_jax.bench.wan_tiny import SIZES, save_wan_pipeline

STAGES = ("text", "loop", "decode", "postprocess")
# default video per size: a few minutes for the whole benchmark on 2 cores
DEFAULT_VIDEO = {"tiny": (17, 64, 64), "S": (17, 64, 64)}
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration")


@dataclasses.dataclass(frozen=True)
class SampleBenchOptions:
    """Pipeline size, video, sampling settings and repeats; frames/height/width None: DEFAULT_VIDEO[size]."""

    size: str = "tiny"
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 50
    guidance: float = 5.0
    shift: float = 3.0
    max_sequence_length: int = 32
    prompt: str = "two balls, red and blue; the red ball falls"
    negative_prompt: str = "blurry, dark, static"
    repeats: int = 5
    stages: bool = True  # also time our staged copy in every round (per-stage split)
    seed: int = 0
    threads: int | None = None  # torch threads; None: every core this process may run on

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; use one of {sorted(SIZES)}")
        if min(self.repeats, self.steps, self.max_sequence_length) < 1:
            raise ValueError("repeats, steps and max_sequence_length must be >= 1")

    def video(self) -> tuple[int, int, int]:
        """(frames, height, width) of the sample."""
        f, h, w = DEFAULT_VIDEO[self.size]
        return self.frames or f, self.height or h, self.width or w


class _CompileClock:
    """Sums JAX tracing, lowering and XLA compile durations reported while active."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {e.rsplit("/", 1)[1]: 0.0 for e in _COMPILE_EVENTS}

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds[event.rsplit("/", 1)[1]] += duration

    def __enter__(self) -> "_CompileClock":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _timed(fn: Callable) -> tuple[Callable, list[float]]:
    """fn wrapped to append its wall time to the returned list on every call."""
    spent: list[float] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    return wrapper, spent


def _jax_staged(t2v: Any, sampler: Any, opts: SampleBenchOptions,
                noise: jax.Array) -> Callable[[], tuple[np.ndarray, dict]]:
    """`generate` split into its stages, each blocked on and timed: () -> (video in [0, 1], stage seconds)."""
    from sora_jax.diffusion.samplers import Conditioning
    from sora_jax.pipeline import DiTDenoiser, decode_latents, to_unit_range

    denoiser = DiTDenoiser(t2v.dit_cfg)

    def run() -> tuple[np.ndarray, dict[str, float]]:
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        text, mask = t2v.text_encoder.encode([opts.prompt], opts.max_sequence_length)
        n_text, n_mask = t2v.text_encoder.encode([opts.negative_prompt], opts.max_sequence_length)
        cond = Conditioning(*jax.block_until_ready((jnp.asarray(text), jnp.asarray(mask), jnp.asarray(n_text),
                                                    jnp.asarray(n_mask))))
        t1 = time.perf_counter()
        z = jax.block_until_ready(sampler(denoiser, t2v.dit_params, noise, cond))
        t2 = time.perf_counter()
        video = jax.block_until_ready(decode_latents(t2v.vae, t2v.vae_params, z))  # the decode generate runs
        t3 = time.perf_counter()
        out = to_unit_range(video)[0]
        t4 = time.perf_counter()
        t.update(text=t1 - t0, loop=t2 - t1, decode=t3 - t2, postprocess=t4 - t3)
        return out, t

    return run


def _stage_summary(per_call: list[dict[str, float]]) -> dict[str, Any]:
    return {s: summarize([c[s] for c in per_call]) for s in STAGES}


def _agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    return {"max_abs_diff": float(np.abs(ours - ref).max()), "mean_abs_diff": float(np.abs(ours - ref).mean()),
            "ref_std": float(ref.std()), "shape_ours": list(ours.shape), "shape_torch": list(ref.shape)}


def run_benchmark(opts: SampleBenchOptions, workdir: str | Path | None = None) -> dict[str, Any]:
    """Build, convert and load one pipeline, check both samples agree, time them; returns a JSON-able dict."""
    # the converted folder must outlive loading: the tokenizer is read at the first encode
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        return _run(opts, Path(tmp))


def _run(opts: SampleBenchOptions, tmp: Path) -> dict[str, Any]:
    import torch

    from sora_jax.convert.wan_pipeline import convert_wan_pipeline
    from sora_jax.pipeline import TextToVideo, noise_from_diffusers, to_unit_range

    torch.set_num_threads(opts.threads or default_threads())
    machine = machine_info()  # before the work, so its load average says what the run started in
    frames, height, width = opts.video()
    t0 = time.perf_counter()
    pipe, src = save_wan_pipeline(opts.size, tmp, shift=opts.shift)
    convert_wan_pipeline(src, tmp / "converted")
    t2v = TextToVideo.from_pretrained(tmp / "converted")
    setup_s = time.perf_counter() - t0
    shape = t2v.latent_shape(1, frames, (height, width))
    b, lt, lh, lw, c = shape
    noise_t = np.random.default_rng(opts.seed).standard_normal((b, c, lt, lh, lw)).astype(np.float32)
    noise_j = jnp.asarray(noise_from_diffusers(noise_t, shape))
    sampler = t2v.make_sampler("unipc", opts.steps, opts.guidance)

    def jax_sample() -> np.ndarray:
        videos = t2v.generate([opts.prompt], frames=frames, size=(height, width), sampler=sampler,
                              negative_prompt=opts.negative_prompt, noise=noise_j,
                              max_sequence_length=opts.max_sequence_length)
        return to_unit_range(videos)[0]

    # diffusers' own stage boundaries, timed from inside its __call__
    torch_stage_calls: list[dict[str, float]] = []
    pipe.encode_prompt, t_text = _timed(pipe.encode_prompt)
    pipe.vae.decode, t_decode = _timed(pipe.vae.decode)
    pipe.video_processor.postprocess_video, t_post = _timed(pipe.video_processor.postprocess_video)

    def torch_sample() -> np.ndarray:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = pipe(opts.prompt, negative_prompt=opts.negative_prompt, height=height, width=width,
                       num_frames=frames, num_inference_steps=opts.steps, guidance_scale=opts.guidance,
                       latents=torch.from_numpy(noise_t.copy()), max_sequence_length=opts.max_sequence_length,
                       output_type="np").frames
        total = time.perf_counter() - t0
        stages = {"text": t_text[-1], "decode": t_decode[-1], "postprocess": t_post[-1]}
        torch_stage_calls.append({**stages, "loop": total - sum(stages.values())})
        return np.asarray(out[0], np.float32)

    with _CompileClock() as clock:
        t0 = time.perf_counter()
        ours = jax_sample()
        jax_first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = torch_sample()
    torch_first_s = time.perf_counter() - t0
    torch_stage_calls.clear()
    agreement = {"generate_vs_diffusers": _agreement(ours, ref)}

    fns: dict[str, Callable[[], Any]] = {"jax": jax_sample, "torch": torch_sample}
    jax_stage_calls: list[dict[str, float]] = []
    compile_staged = None
    if opts.stages:
        staged = _jax_staged(t2v, sampler, opts, noise_j)
        with _CompileClock() as staged_clock:  # its own decode jit, and the sampler called with fewer arguments
            staged_out, _ = staged()
        compile_staged = staged_clock.seconds
        agreement["staged_vs_generate"] = _agreement(staged_out, ours)

        def jax_staged() -> None:
            jax_stage_calls.append(staged()[1])

        fns["jax_staged"] = jax_staged
    timings = {k: summarize(v) for k, v in interleaved(fns, opts.repeats, warmup=0).items()}
    med = lambda k: timings[k]["median_s"]  # noqa: E731

    dit = t2v.dit_cfg
    tokens = lt * (lh // dit.patch_size[1]) * (lw // dit.patch_size[2]) // dit.patch_size[0]
    # cond + uncond forwards per step (diffusers runs them as two batch-1 calls, we as one batch of 2)
    loop_flops = opts.steps * dit_flops(dit, 2, tokens, opts.max_sequence_length)["forward"]
    result: dict[str, Any] = {
        "options": dataclasses.asdict(opts),
        "machine": machine,
        "video": {"frames": frames, "height": height, "width": width, "latent_ours": list(shape),
                  "dit_tokens": tokens},
        "model": {
            "sizes": dataclasses.asdict(SIZES[opts.size]),
            "params": {"vae": sum(p.numel() for p in pipe.vae.parameters()),
                       "transformer": sum(p.numel() for p in pipe.transformer.parameters()),
                       "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters())},
        },
        "setup_s": setup_s,
        "agreement": agreement,
        "first_call": {"jax_s": jax_first_s, "jax_compile_s": sum(clock.seconds.values()),
                       "jax_compile_parts_s": clock.seconds, "torch_s": torch_first_s,
                       "jax_staged_compile_parts_s": compile_staged},
        "timings": timings,
        "stages": {"torch": _stage_summary(torch_stage_calls)},
        "loop_gflop": loop_flops / 1e9,
        # > 1 means JAX is faster; medians over the same interleaved rounds
        "speedup_vs_torch": med("torch") / med("jax"),
        # best round of each: under load the least-disturbed call, a second opinion on the medians
        "speedup_vs_torch_min": timings["torch"]["min_s"] / timings["jax"]["min_s"],
        "speedup_per_round": [t / j for t, j in zip(timings["torch"]["times_s"], timings["jax"]["times_s"])],
        "target_speedup": 1.5,
    }
    if jax_stage_calls:
        result["stages"]["jax"] = _stage_summary(jax_stage_calls)
        result["stage_speedup_vs_torch"] = {
            s: result["stages"]["torch"][s]["median_s"] / result["stages"]["jax"][s]["median_s"] for s in STAGES}
    machine["loadavg_end"] = list(os.getloadavg())
    return result


def format_report(r: dict[str, Any]) -> str:
    """Markdown summary: agreement, first call, end-to-end table and per-stage split."""
    o, v, m = r["options"], r["video"], r["machine"]
    a = r["agreement"]["generate_vs_diffusers"]
    fc = r["first_call"]
    lines = [
        f"size {o['size']}: {v['frames']}x{v['height']}x{v['width']} video, latent {v['latent_ours']}, "
        f"{v['dit_tokens']} DiT tokens, {o['steps']} UniPC steps, CFG {o['guidance']}, text len "
        f"{o['max_sequence_length']}; params {r['model']['params']}",
        f"machine: {m['cpu_model']}, {m['affinity_cpus']} cores, torch threads {m['torch_threads']}, "
        f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}",
        f"outputs: max abs diff {a['max_abs_diff']:.3g} (ref std {a['ref_std']:.3g})",
        f"first call: JAX {fc['jax_s']:.2f} s (of which compile {fc['jax_compile_s']:.2f} s), "
        f"torch {fc['torch_s']:.2f} s",
        "",
        "| end to end | median s | min s |",
        "|---|---|---|",
    ]
    for k in ("jax", "torch", "jax_staged"):
        if k in r["timings"]:
            lines.append(f"| {k} | {r['timings'][k]['median_s']:.3f} | {r['timings'][k]['min_s']:.3f} |")
    lines += ["", f"torch/JAX: {r['speedup_vs_torch']:.2f}x median, {r['speedup_vs_torch_min']:.2f}x min "
              f"(target {r['target_speedup']}); per round " + ", ".join(f"{x:.2f}" for x in r["speedup_per_round"])]
    if "jax" in r["stages"]:
        lines += ["", "| stage | JAX median s | torch median s | torch/JAX |", "|---|---|---|---|"]
        for s in STAGES:
            j, t = r["stages"]["jax"][s]["median_s"], r["stages"]["torch"][s]["median_s"]
            lines.append(f"| {s} | {j:.3f} | {t:.3f} | {t / j:.2f} |")
        rate = {k: r["loop_gflop"] / r["stages"][k]["loop"]["median_s"] for k in ("jax", "torch")}
        lines.append(f"loop: {r['loop_gflop']:.1f} GFLOP -> JAX {rate['jax']:.1f}, torch {rate['torch']:.1f} GFLOP/s")
    return "\n".join(lines)
