"""`sora-jax` command line: parses arguments and calls into the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Errors a user can fix from the command line; anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sora-jax", description="Sora-style text-to-video in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build data, train VAE + DiT, sample prompts, write videos and a report")
    d.add_argument("--outdir", default="demo_out")
    d.add_argument("--minutes", type=float, default=12.0, help="wall-time budget; more buys quality")
    d.add_argument("--prompt", action="append", help="prompt to sample (repeatable); default: held-out captions")
    d.add_argument("--seed", type=int, default=0)

    for name, default, helptext in (("train-vae", "vae", "train the causal 3D VAE"),
                                    ("train", "dit", "train the text-to-video DiT on VAE latents")):
        t = sub.add_parser(name, help=helptext, description=helptext + "; override any field with --config.a.b=value")
        t.add_argument("--config", default=default, help=f"config name or file, with optional :arg (default {default})")
        t.add_argument("--coordinator", help="multi-process run: host:port of process 0 ('auto': let JAX detect "
                                             "SLURM/MPI/TPU; TPU pod slices are detected without it); "
                                             "env JAX_COORDINATOR_ADDRESS")
        t.add_argument("--num-processes", type=int, help="multi-process run: process count (env JAX_NUM_PROCESSES)")
        t.add_argument("--process-id", type=int, help="multi-process run: this process, 0..n-1 (env JAX_PROCESS_ID)")

    cl = sub.add_parser(
        "cache-latents", help="encode a dataset once (VAE latents + text embeddings) into ArrayRecord files",
        description="Encode config.data (the physics dataset, or real videos with --config.data.source=video "
                    "--config.data.video.path=DIR_OR_MANIFEST and its buckets) with the VAE in config.vae_workdir "
                    "and the run's text encoder into OUT. Re-running the same command finishes an interrupted "
                    "build. Train on it with `sora-jax train --config.data.latents=OUT`.")
    cl.add_argument("out", help="cache folder (cache_info.json + part-*.array_record)")
    cl.add_argument("--config", default="dit", help="DiT config name or file, with optional :arg (default dit)")
    cl.add_argument("--part-batches", type=int, default=16, help="batches per ArrayRecord part file (resume unit)")

    from sora_jax.diffusion.conditioning import MODE_HELP, MODES

    s = sub.add_parser("sample", help="generate videos for prompts from a trained DiT run or a converted Wan pipeline",
                       description="Generate one video per --prompt. --checkpoint is a folder written by "
                                   "`sora-jax convert wan` (diffusers WanPipeline parity: umT5 prompts, negative "
                                   "prompt, UniPC/Euler grids) or a DiT training run. Unset options take the "
                                   "checkpoint's defaults.",
                       epilog="modes (--mode); inputs are PNG/JPEG (one frame) or MP4 files, resized and "
                              "center-cropped to the output, frames taken from the start:\n"
                              + "\n".join(f"  {m:<12} {MODE_HELP[m]}" for m in MODES),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--checkpoint", help="converted Wan folder (pipeline.json) or DiT run directory; overrides --workdir")
    s.add_argument("--workdir", default="runs/dit", help="DiT run directory (has ckpt/ and dit_config.json)")
    s.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable)")
    s.add_argument("--negative-prompt", help='prompt for the unguided branch (default: "" for Wan, null text for runs)')
    s.add_argument("--out", default="outputs", help="folder for sample_<i>.mp4/.gif when --output is not given")
    s.add_argument("--output", help="write here instead: .npy = float32 [0,1] (frames, H, W, 3), "
                                    "(prompts, frames, H, W, 3) for several prompts; .mp4/.gif = a video (one prompt)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (ignored with --latents)")
    s.add_argument("--latents", help="initial noise .npy in diffusers layout (B, C, T', H', W'), e.g. to match diffusers")
    s.add_argument("--steps", type=int)
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (Wan: <= 1 disables it)")
    s.add_argument("--sampler", "--solver", dest="solver", choices=("euler", "heun", "unipc", "ddim"),
                   help="solver: euler/heun/unipc for flow models, ddim for DDPM-trained runs "
                        "(default: the checkpoint's scheduler / the run's config)")
    s.add_argument("--max-sequence-length", type=int, help="text tokens per prompt (Wan only; default 512)")
    s.add_argument("--frames", type=int, help="video frames, 4k+1")
    s.add_argument("--size", type=int, help="height and width in pixels")
    s.add_argument("--height", type=int, help="height in pixels (overrides --size)")
    s.add_argument("--width", type=int, help="width in pixels (overrides --size)")
    s.add_argument("--mode", default="t2v", choices=MODES, help="prompting mode (see below; default t2v)")
    s.add_argument("--input", action="append", default=[],
                   help="image/video the mode conditions on (interpolate: give it twice, start then end)")
    s.add_argument("--mask-box", help="inpaint: pixel box y0,x0,y1,x1 (end-exclusive) to regenerate")
    s.add_argument("--mask-frames", help="inpaint: frames a:b (a..b-1) to regenerate (with --mask-box: the box there)")
    s.add_argument("--strength", type=float, default=0.6,
                   help="sdedit: noise level in [0, 1] to start from (default 0.6; 0 keeps the input)")
    s.add_argument("--direction", choices=("forward", "backward"), default="forward",
                   help="extend: generate after the input (forward) or before it (backward)")
    s.add_argument("--cond-frames", type=int,
                   help="extend/interpolate: input frames (4k+1) to condition on (default ~half / 1)")

    c = sub.add_parser("convert", help="convert diffusers Wan2.1 weights (safetensors) to our checkpoint folders")
    csub = c.add_subparsers(dest="kind", required=True)
    for kind, what in (("wan-vae", "AutoencoderKLWan"), ("wan-dit", "WanTransformer3DModel"), ("wan", "WanPipeline")):
        k = csub.add_parser(kind, help=f"diffusers {what} folder -> Orbax checkpoint + config"
                            + (" for each part, tokenizer and pipeline.json (load with sample --checkpoint)"
                               if kind == "wan" else ""))
        k.add_argument("src", help=f"diffusers {what} folder" + (
            " (model_index.json, vae/, transformer/, text_encoder/, tokenizer/, scheduler/)" if kind == "wan"
            else " (config.json + *.safetensors or a sharded index)"))
        k.add_argument("dst", help="output folder (must be new or empty unless --overwrite)")
        k.add_argument("--overwrite", action="store_true", help="replace an existing DST (swapped in atomically)")
        if kind != "wan-vae":
            k.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                           help="stored parameter dtype" + (" of the DiT and text encoder (the VAE stays float32)"
                                                            if kind == "wan" else ""))

    x = sub.add_parser("export", help="write a trained DiT run as a self-contained inference folder (EMA weights "
                       "of one step, its VAE), loadable like a run")
    x.add_argument("src", help="DiT run folder (run.json, dit_config.json, ckpt/)")
    x.add_argument("dst", help="output folder (must be new or empty unless --overwrite)")
    x.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="stored DiT parameter dtype (bfloat16 halves the bytes; the VAE stays float32)")
    x.add_argument("--step", type=int, help="checkpoint step to export (default: the newest readable)")
    x.add_argument("--no-vae", action="store_true",
                   help="leave the VAE out; copy its run folder to DST/vae before loading")
    x.add_argument("--overwrite", action="store_true", help="replace an existing DST (swapped in atomically)")

    v = sub.add_parser("vae-stats", help="per-channel latent mean/std of a VAE over a dataset, stored in its config")
    v.add_argument("--workdir", default="runs/vae", help="VAE run or converted folder (vae_config.json + ckpt/)")
    v.add_argument("--data-dir", default="data", help="physics_balls dataset folder (built if missing)")
    v.add_argument("--size", type=int, default=64)
    v.add_argument("--frames", type=int, default=17)
    v.add_argument("--num-train", type=int, default=512, help="dataset size (names the dataset config)")
    v.add_argument("--num-clips", type=int, default=64, help="clips to average over")
    v.add_argument("--batch-size", type=int, default=4)
    v.add_argument("--seed", type=int, default=0)

    bs = sub.add_parser(
        "bench-sharding", help="compile the DiT train/sampler step per mesh layout for a target (CPU, TPU pod, local)",
        description="Ahead-of-time compile of the real DiT step per layout: fits/OOM, memory, FLOPs, collectives "
                    "and a roofline step time per device. TPU targets need the tpu extra (libtpu), not a TPU. "
                    "Override config fields with --config.a.b=value.")
    bs.add_argument("--config", default="dit:variant=tiny", help="DiT config with optional :arg (dit:variant=wan2.1-14b)")
    bs.add_argument("--target", default="cpu:8",
                    help="cpu:N (simulated devices), a TPU slice (v5p-8, v5p-256, v5e-16, v6e-8, v4-8, v7x-8, "
                         "v5p:2x2x1; 2xv5e-256 = two slices) or local (also runs the step)")
    bs.add_argument("--layouts", action="append", required=True,
                    help="';'-separated layouts, each key=value items: data/fsdp/tensor/sequence sizes (-1 = rest), "
                         "rules (data, fsdp, fsdp_tensor, fsdp_sequence), remat (none, full, dots, offload), attention "
                         "(xla, blockwise, splash, ulysses, ring, ...), batch (per device). Repeatable.")
    bs.add_argument("--video", help="FRAMESxHEIGHTxWIDTH in pixels, e.g. 81x480x832 (default: config.data)")
    bs.add_argument("--text-len", type=int, help="text tokens (Wan: 512; default config.text.max_length)")
    bs.add_argument("--dtype", choices=("bfloat16", "float32"), help="compute dtype (default bf16 on TPU, f32 on CPU)")
    bs.add_argument("--step", choices=("train", "sample"), default="train",
                    help="train step (loss, grads, AdamW, EMA) or one CFG sampler step")
    bs.add_argument("--run-steps", type=int, default=3, help="local target: steps to time after one warm-up")
    bs.add_argument("--json", help="write {meta, rows} here (rewritten after each layout)")
    bs.add_argument("--csv", help="write one CSV line per layout here")
    bs.add_argument("--plot", help="write a PNG of memory and predicted step time per layout here")

    b = sub.add_parser("data", help="build the physics_balls dataset (TFDS array_record)")
    b.add_argument("--dir", default="data")
    b.add_argument("--size", type=int, default=64)
    b.add_argument("--frames", type=int, default=17)
    b.add_argument("--num-train", type=int, default=512)
    b.add_argument("--num-test", type=int, default=32)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--exclude", default="", help="(colour, count) pairs no clip may have, e.g. red3,cyan1")
    b.add_argument("--zero-gravity", type=float, default=0.0,
                   help="share of clips simulated without gravity, in [0, 1] (default 0: all under gravity)")

    from sora_jax.eval.physics_scenes import DEFAULT_FAMILIES, FAMILIES, SPLITS

    e = sub.add_parser("eval-physics", help="world-model benchmark: physics metrics from pixels vs baselines",
                       description="Scores frame-conditioned prediction and text-conditioned generation on seeded "
                                   "physics_balls scenes (families x splits) with pixel-only metrics, next to "
                                   "ground truth, copy-last, no-gravity re-simulation and another clip; errors also "
                                   "as multiples of the parse floor. Writes report.json/.md, position_error.png and samples.png.")
    e.add_argument("--checkpoint", help="DiT run directory to evaluate (default: baselines only)")
    e.add_argument("--vae", help="VAE run directory: score the true clips through it (encode, decode) as the "
                                  "vae_roundtrip row, the ceiling it puts on a DiT (default: the checkpoint's VAE)")
    e.add_argument("--out", default="outputs/eval_physics", help="folder for report.json, report.md, position_error.png, samples.png")
    e.add_argument("--per-split", type=int, default=8, help="scenes per family and split")
    e.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                   help=f"comma-separated subset of {','.join(FAMILIES)} (drift: multi without gravity)")
    e.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated subset of {','.join(SPLITS)}")
    e.add_argument("--cond-frames", type=int, default=4,
                   help="pixel frames to condition on, rounded up to whole latent frames (4 -> 5 = 2 latent frames)")
    e.add_argument("--protocols", default="frames,text", help="frames (conditioned prediction), text (t2v), or both")
    e.add_argument("--text-prompts", type=int, default=8, help="captions per world for the text protocol "
                   "(multi scenes under gravity, and drift scenes whose captions say 'in zero gravity')")
    e.add_argument("--phyworld-scenes", type=int, default=16, help="PhyWorld parse-floor clips (0 skips)")
    e.add_argument("--phyworld-size", type=int, default=256, help="PhyWorld parse-floor resolution")
    e.add_argument("--size", type=int, help="scene size in pixels (default: the checkpoint's, else 64)")
    e.add_argument("--frames", type=int, help="scene length (default: the checkpoint's, else 17)")
    e.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's)")
    e.add_argument("--guidance", type=float, help="classifier-free guidance (default: the checkpoint's)")
    e.add_argument("--seed", type=int, default=0, help="scene seed, and the sampler's unless --sample-seed is given")
    e.add_argument("--sample-seed", type=int,
                   help="the sampler's noise alone: re-score the same scenes with other noise (default: --seed)")
    pc = sub.add_parser("eval-physics-compare",
                        help="compare eval-physics reports: two runs paired by scene, or two recipes over seeds",
                        description="One report per side: per split and family, each report's mean over the "
                                    "scenes both scored, and the mean per-scene difference A - B with its "
                                    "standard error (scene noise only). Several comma-separated reports on a side "
                                    "(runs of one recipe with other seeds): each run's mean, and the recipes' "
                                    "difference judged against the run-to-run spread, with a 95%% interval.")
    pc.add_argument("a", help="eval-physics --out folder (or report.json) A; several runs: A1,A2,...")
    pc.add_argument("b", help="eval-physics --out folder (or report.json) B; several runs: B1,B2,...")
    pc.add_argument("--method-a", default="model", help="row of A to compare (model, vae_roundtrip, copy_last, ...)")
    pc.add_argument("--method-b", default="model", help="row of B to compare")
    pc.add_argument("--json", help="also write the comparison here")
    return p


def _eval_physics(a) -> None:
    from sora_jax.eval.physics_bench import evaluate
    from sora_jax.eval.physics_scenes import SceneSpec

    def names(arg: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in arg.split(",") if x.strip())

    scenes = SceneSpec(families=names(a.families), splits=names(a.splits), per_split=a.per_split, seed=a.seed)
    report, paths = evaluate(a.checkpoint, a.out, vae=a.vae, scenes=scenes, size=a.size, frames=a.frames, steps=a.steps,
                             guidance=a.guidance, cond_frames=a.cond_frames, protocols=names(a.protocols),
                             text_prompts=a.text_prompts, phyworld_scenes=a.phyworld_scenes,
                             phyworld_size=a.phyworld_size, seed=a.seed if a.sample_seed is None else a.sample_seed,
                             progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if "png" not in paths and "frames" in report:  # only the frames protocol has a plot
        print("no position_error.png: matplotlib is not installed (pip install matplotlib)")


def _eval_physics_compare(a) -> None:
    from sora_jax.eval import physics_compare as pc

    paths_a, paths_b = ([x.strip() for x in arg.split(",") if x.strip()] for arg in (a.a, a.b))
    if not paths_a or not paths_b:
        raise ValueError("give at least one report on each side: eval-physics-compare A[,A2,...] B[,B2,...]")
    ra, rb = [pc.load_report(p) for p in paths_a], [pc.load_report(p) for p in paths_b]
    if len(ra) == len(rb) == 1:
        result = pc.compare_reports(ra[0], rb[0], a.method_a, a.method_b)
        print(pc.render_markdown(result, paths_a[0], paths_b[0]))
    else:
        result = pc.compare_runs(ra, rb, a.method_a, a.method_b)
        print(pc.render_runs_markdown(result, paths_a, paths_b))
    if a.json:
        Path(a.json).write_text(json.dumps(result | {"a": paths_a, "b": paths_b}, indent=1))
        print(f"wrote {a.json}")


def _demo(a) -> None:
    from sora_jax.demo import run_demo

    report = run_demo(a.outdir, minutes=a.minutes, prompts=a.prompt, seed=a.seed)
    print(Path(a.outdir, "report.md").read_text())
    for s in report["samples"]:
        print(s["mp4"])


def _train(a, extra) -> None:
    from sora_jax.config_overrides import apply_overrides, load_config
    from sora_jax.parallel.distributed import cluster_spec, initialize

    config = apply_overrides(load_config(a.config), extra)
    initialize(cluster_spec(a.coordinator, a.num_processes, a.process_id))  # before any device use
    if a.command == "train-vae":
        from sora_jax.train.vae_trainer import train_vae

        out = train_vae(config)
        print(f"VAE step {out['step']}: loss {out['final'].get('loss', float('nan')):.4f}, "
              f"held-out PSNR {out['psnr']:.2f} dB, SSIM {out['ssim']:.3f}, ball parse error "
              f"{out.get('parse_error_px', float('nan')):.2f} px (true clips "
              f"{out.get('parse_error_true_px', float('nan')):.2f} px), ball colour error "
              f"{out.get('parse_colour_err', float('nan')):.1f} RGB; checkpoints in {config.workdir}")
        print("held-out PSNR per latent frame (dB): " + ", ".join(f"{v:.2f}" for v in out["psnr_by_latent_frame"]))
    else:
        from sora_jax.train.dit_trainer import train_dit

        out = train_dit(config)
        print(f"DiT step {out['step']}: loss {out['final'].get('loss', float('nan')):.4f}; "
              f"checkpoints in {config.workdir}")


def _cache_latents(a, extra) -> None:
    from sora_jax.config_overrides import apply_overrides, load_config
    from sora_jax.train.dit_data import build_from_config

    info = build_from_config(apply_overrides(load_config(a.config), extra), a.out, part_batches=a.part_batches)
    counts = ", ".join(f"{b}: {v['num_records']}" for b, v in info["buckets"].items())
    state = "complete" if info["complete"] else "this process done; waiting for the others"
    print(f"latent cache {a.out}: {info['num_records']} clips ({counts}); {state}")


def _ints(text: str | None, sep: str, n: int, flag: str, form: str) -> tuple[int, ...] | None:
    """Parse "1,2,3,4"-style flag values into n integers, or fail with one line naming the form."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(sep))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"{flag} {text!r} is not {form}")
    return values


def _sample(a) -> None:
    import numpy as np

    from sora_jax.data.video import write_gif, write_mp4
    from sora_jax.models.text.encoder import check_prompts
    from sora_jax.pipeline import TextToVideo, noise_from_diffusers, to_unit_range

    check_prompts(a.prompt)  # fail before the (slow) model load
    if a.output and Path(a.output).suffix not in (".npy", ".mp4", ".gif"):
        raise ValueError(f"--output {a.output}: unknown extension; use .npy, .mp4 or .gif")
    if a.latents and not Path(a.latents).is_file():
        raise FileNotFoundError(f"--latents {a.latents} not found; pass an .npy of noise in (B, C, T', H', W')")
    mask_box = _ints(a.mask_box, ",", 4, "--mask-box", "y0,x0,y1,x1, e.g. 8,8,24,24")
    mask_frames = _ints(a.mask_frames, ":", 2, "--mask-frames", "a:b, e.g. 2:5")
    for path in a.input:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--input {path} not found; pass an existing PNG, JPEG or MP4 file")
    if a.mode == "t2i" and a.frames is None:
        a.frames = 1  # so --latents is checked against a 1-frame latent shape
    t2v = TextToVideo.from_pretrained(a.checkpoint or a.workdir)
    size = None
    if a.height or a.width:
        default = t2v.defaults["video"]["size"]
        default = (default, default) if isinstance(default, int) else default
        size = (a.height or a.size or default[0], a.width or a.size or default[1])
    size = size or a.size
    noise = None
    if a.latents:
        noise = noise_from_diffusers(np.load(a.latents, allow_pickle=False),
                                     t2v.latent_shape(len(a.prompt), a.frames, size))
    videos = t2v.generate(a.prompt, seed=a.seed, frames=a.frames, size=size, noise=noise,
                          sampler=t2v.make_sampler(a.solver, a.steps, a.guidance,
                                                   t2v.num_tokens(1 if a.mode == "t2i" else a.frames, size)),
                          negative_prompt=a.negative_prompt, max_sequence_length=a.max_sequence_length,
                          mode=a.mode, inputs=a.input, mask_box=mask_box, mask_frames=mask_frames,
                          strength=a.strength, direction=a.direction, cond_frames=a.cond_frames)
    fps = t2v.defaults["sample"]["fps"]
    if a.output and a.output.endswith(".npy"):
        Path(a.output).absolute().parent.mkdir(parents=True, exist_ok=True)
        frames = to_unit_range(videos)
        np.save(a.output, frames[0] if len(frames) == 1 else frames)
        print(a.output)
        return
    if a.output:
        if len(videos) > 1:
            raise ValueError(f"--output {a.output} holds one video; use --out DIR or .npy for several prompts")
        write = write_mp4 if a.output.endswith(".mp4") else write_gif
        print(write(Path(a.output), videos[0], fps=fps))
        return
    for i, video in enumerate(videos):
        print(write_mp4(Path(a.out) / f"sample_{i}.mp4", video, fps=fps))
        print(write_gif(Path(a.out) / f"sample_{i}.gif", video, fps=fps, scale=2))


def _convert(a) -> None:
    from sora_jax.convert.folders import convert_wan_dit, convert_wan_vae
    from sora_jax.convert.wan_pipeline import convert_wan_pipeline

    if a.kind == "wan-vae":
        out = convert_wan_vae(a.src, a.dst, overwrite=a.overwrite)
    elif a.kind == "wan-dit":
        out = convert_wan_dit(a.src, a.dst, dtype=a.dtype, overwrite=a.overwrite)
    else:
        out = convert_wan_pipeline(a.src, a.dst, dtype=a.dtype, overwrite=a.overwrite)
    print(f"converted {out['params']:,} parameters from {a.src} into {out['dst']}")


def _export(a) -> None:
    from sora_jax.train.export import export_dit_run

    out = export_dit_run(a.src, a.dst, dtype=a.dtype, step=a.step, include_vae=not a.no_vae, overwrite=a.overwrite)
    vae = "with its VAE" if out["vae_included"] else "without its VAE (copy it to DST/vae)"
    print(f"exported {out['params']:,} DiT parameters of step {out['step']} as {out['dtype']} {vae} into "
          f"{out['dst']}: {out['bytes'] / 2**20:.1f} MiB in {out['files']} files")


def _vae_stats(a) -> None:
    from sora_jax.data.physics_tfds import build_physics_dataset
    from sora_jax.train.vae_stats import physics_clips, update_vae_stats

    if a.num_clips < 1 or a.batch_size < 1:
        raise ValueError("--num-clips and --batch-size must be at least 1")
    sources = build_physics_dataset(str(Path(a.data_dir).absolute()), size=a.size, frames=a.frames,
                                    num_train=a.num_train, num_test=32, seed=a.seed)
    cfg, stats = update_vae_stats(a.workdir, physics_clips(sources["train"], a.num_clips, a.batch_size))
    print(f"latent statistics over {stats['positions']:,} latent positions written to {a.workdir}/vae_config.json")
    print("mean", " ".join(f"{v:.4f}" for v in cfg.latents_mean))
    print("std ", " ".join(f"{v:.4f}" for v in cfg.latents_std))


def _data(a) -> None:
    from sora_jax.data.physics_tfds import build_physics_dataset

    sources = build_physics_dataset(str(Path(a.dir).absolute()), size=a.size, frames=a.frames,
                                    num_train=a.num_train, num_test=a.num_test, seed=a.seed, exclude=a.exclude,
                                    zero_gravity=a.zero_gravity)
    print({k: len(v) for k, v in sources.items()}, "examples in", a.dir)


def _bench_sharding(a, extra) -> None:
    from sora_jax.bench.sharding import bench_sharding, parse_layouts, run_meta, workload_from
    from sora_jax.bench.sharding_report import to_markdown, write_outputs
    from sora_jax.parallel.topology import get_target

    layouts = parse_layouts(";".join(a.layouts))
    target = get_target(a.target)
    workload = workload_from(a.config, extra, a.video, a.text_len, a.dtype, a.step, target)
    meta = run_meta(workload, target)
    save = lambda rows: write_outputs(rows, meta, a.json, a.csv, None)  # noqa: E731
    rows = bench_sharding(workload, layouts, target, on_row=save, run_steps=a.run_steps)
    print(to_markdown(rows))
    for path in write_outputs(rows, meta, a.json, a.csv, a.plot):
        print(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sora-jax` console script."""
    args, extra = _parser().parse_known_args(argv)
    if extra and args.command not in ("train", "train-vae", "cache-latents", "bench-sharding"):
        print(f"sora-jax {args.command}: error: unrecognised arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    from sora_jax.parallel.backends import skip_absent_tpu

    skip_absent_tpu()  # no libtpu error block on machines without an accelerator
    try:
        if args.command == "demo":
            _demo(args)
        elif args.command in ("train", "train-vae"):
            _train(args, extra)
        elif args.command == "cache-latents":
            _cache_latents(args, extra)
        elif args.command == "sample":
            _sample(args)
        elif args.command == "convert":
            _convert(args)
        elif args.command == "eval-physics":
            _eval_physics(args)
        elif args.command == "eval-physics-compare":
            _eval_physics_compare(args)
        elif args.command == "export":
            _export(args)
        elif args.command == "vae-stats":
            _vae_stats(args)
        elif args.command == "bench-sharding":
            _bench_sharding(args, extra)
        else:
            _data(args)
    except _USER_ERRORS as e:
        if os.environ.get("SORA_JAX_DEBUG"):
            raise
        print(f"sora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
