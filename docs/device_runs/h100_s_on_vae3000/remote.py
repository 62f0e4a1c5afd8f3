"""One-shot remote driver: train a bigger reference DiT on the carried VAE + latent cache, then eval-physics.

Not part of the package (lives in the git-ignored .devcarry/). Subcommands:

  python3 .devcarry/remote.py check                      # imports, versions, devices, caption table
  python3 .devcarry/remote.py train --outdir R --steps N [--variant S] [--dit-shape ...] [--train-minutes M]
  python3 .devcarry/remote.py eval  --outdir R [eval-physics flags...]
  python3 .devcarry/remote.py build-text-cache           # LOCAL only: needs the MiniLM package

Why not scripts/train_reference.py: with --variant S it would also build an S VAE config and try to
restore the carried (tiny) VAE checkpoint into it; and the carried VAE checkpoint has its params only.
Here the VAE stage is skipped: the DiT config comes from the same `reference_configs`, the VAE is the
carried one (ref7's, step 3000, parameters only). The held-out latent cache (32 clips) is carried and
copied in as it is: cache keys name the VAE's step and weights, not its folder, so it matches here
unchanged. The training cache (--num-train clips, default 512) is generated and encoded here, its
captions embedded from text_cache.npz, which holds every caption the physics template can write. The frozen MiniLM text encoder is
not carried (90 MB): training reads text embeddings from the cache, and eval-physics gets a table of
precomputed embeddings of its scene captions (text_cache.npz), patched in for `load_text_encoder`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT_CACHE = HERE / "text_cache.npz"
VAE_SRC = HERE / "ref" / "vae"
CACHES_SRC = sorted((HERE / "ref").glob("latents-*"))
EVAL_DEFAULTS = dict(per_split=3, text_prompts=6, phyworld_scenes=0)
# Captions the table covers: up to these eval sizes (a superset of the defaults above).
TABLE_PER_SPLIT, TABLE_TEXT_PROMPTS = 8, 8


def log(msg: str) -> None:
    print(f"[remote {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- captions
def eval_captions(per_split: int, text_prompts: int, *, seed: int = 0, size: int = 64, frames: int = 17,
                  families: tuple[str, ...] | None = None, splits: tuple[str, ...] | None = None) -> list[str]:
    """Every caption eval-physics encodes (frames protocol, text protocol, conditioning_use), in order."""
    from sora_jax.eval.physics_scenes import FAMILIES, SPLITS, SceneSpec, make_scenes

    spec = SceneSpec(families=families or FAMILIES, splits=splits or SPLITS, per_split=per_split, seed=seed,
                     size=size, frames=frames)
    specs = [spec,
             dataclasses.replace(spec, families=("multi",), splits=("id",), per_split=text_prompts),
             dataclasses.replace(spec, splits=("id",), per_split=max(2, per_split))]
    return list(dict.fromkeys(s["caption"] for sp in specs for s in make_scenes(sp)))


class CachedTextEncoder:
    """Stands in for the MiniLM `TextEncoder`: encode(prompts) from a table of precomputed embeddings."""

    def __init__(self, path: Path = TEXT_CACHE):
        import numpy as np

        z = np.load(path, allow_pickle=False)
        self.captions = [str(c) for c in z["captions"]]
        self.mask = z["mask"].astype(bool)  # [N, L]
        rows = z["rows"].astype(np.float32)  # [sum(mask), D]: the unmasked positions, caption by caption
        self.max_length, self.hidden_size = self.mask.shape[1], rows.shape[1]
        self.emb = np.zeros((len(self.captions), self.max_length, self.hidden_size), np.float32)
        self.emb[self.mask] = rows
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.source = str(z["source"])

    def missing(self, prompts) -> list[str]:
        return [p for p in prompts if p not in self.index]

    def encode(self, prompts):
        import jax.numpy as jnp

        miss = self.missing(prompts)
        if miss:
            raise KeyError(f"{len(miss)} prompt(s) not in {TEXT_CACHE.name} (MiniLM is not on this machine): {miss[:3]}")
        idx = [self.index[p] for p in prompts]
        return jnp.asarray(self.emb[idx]), jnp.asarray(self.mask[idx])


def patch_text_encoder() -> CachedTextEncoder:
    """Route sora_jax's default-text-encoder loads to the cached table."""
    import sora_jax.convert.bert as bert
    import sora_jax.pipeline as pipeline
    import sora_jax.train.dit_data as dit_data

    enc = CachedTextEncoder()

    def load_text_encoder(folder=None, max_length: int = 32):
        if folder not in (None, ""):
            raise ValueError(f"cached text table stands in for the default MiniLM only, not {folder!r}")
        if max_length != enc.max_length:
            raise ValueError(f"text_max_length {max_length} != cached table's {enc.max_length}")
        return enc

    for mod in (bert, pipeline, dit_data):
        mod.load_text_encoder = load_text_encoder
    return enc


def template_captions(max_balls: int = 3) -> list[str]:
    """Every caption `physics.make_caption` can write for 1..max_balls balls (colours, mover, verb, direction, world)."""
    import itertools

    from sora_jax.data import physics as ph

    out = []
    for n in range(1, max_balls + 1):
        for combo in itertools.combinations(range(len(ph.COLOR_NAMES)), n):
            names = ph._join([ph.COLOR_NAMES[c] for c in combo])
            noun = "ball" if n == 1 else "balls"
            for k in combo:
                for verb in ("bounces", "falls", "rises"):
                    for way in ("", " to the right", " to the left"):
                        # Since dataset 1.1.0 a clip simulated without gravity says so (session 27).
                        for world in ("", f" {ph.ZERO_GRAVITY_WORDS}"):
                            out.append(f"{ph.NUMBER_WORDS[n]} {noun}: {names}; the {ph.COLOR_NAMES[k]} ball "
                                       f"{verb}{way}{world}")
    return out


def build_text_cache(out: Path = TEXT_CACHE, max_length: int = 24) -> None:
    """LOCAL: encode every template caption and the eval captions with the real MiniLM into the table.

    With all template captions the lent machine can also encode training clips it generates itself
    (more clips than the carried cache), not only run eval-physics.
    """
    import numpy as np

    from sora_jax.convert.bert import default_minilm_folder, load_text_encoder

    caps = list(dict.fromkeys(eval_captions(TABLE_PER_SPLIT, TABLE_TEXT_PROMPTS) + template_captions()))
    enc = load_text_encoder(None, max_length=max_length)
    parts = [enc.encode(caps[i:i + 128]) for i in range(0, len(caps), 128)]
    emb = np.concatenate([np.asarray(e) for e, _ in parts])
    mask = np.concatenate([np.asarray(m) for _, m in parts])
    assert np.all(emb[~mask] == 0), "padded positions should be zero"
    # float16: with both worlds' captions (session 30) a float32 table (47 MB) would not fit the 64 MiB
    # carry beside the VAE and the wheels. The rounding (relative 5e-4 at most) is below that of the run's
    # bfloat16 compute (4e-3), which the embeddings meet first.
    rows = emb[mask].astype(np.float32)
    half = rows.astype(np.float16)
    err = float(np.max(np.abs(half.astype(np.float32) - rows) / np.maximum(np.abs(rows), 1e-3)))
    np.savez_compressed(out, captions=np.array(caps), mask=mask, rows=half,
                        source=np.array(f"{default_minilm_folder()} max_length={max_length}"))
    log(f"wrote {out} ({out.stat().st_size} bytes): {len(caps)} captions, {int(mask.sum())} token rows, "
        f"float16 rows (max relative rounding {err:.1e})")


# ------------------------------------------------------------------------------------------- checks
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
              "numpy", "grain", "array_record", "tensorflow-datasets", "ml_collections", "tensorboardX",
              "protobuf", "tensorstore", "etils"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            pass
    return out


def check(per_split: int, text_prompts: int) -> dict:
    """Import everything both stages import, list devices, and make sure the caption table covers the eval."""
    t0 = time.perf_counter()
    import jax

    import configs.physics_reference  # noqa: F401  (ml_collections)
    import sora_jax.cli  # noqa: F401
    import sora_jax.eval.conditioning_use  # noqa: F401
    import sora_jax.eval.physics_bench  # noqa: F401
    import sora_jax.eval.physics_report  # noqa: F401
    import sora_jax.pipeline  # noqa: F401
    import sora_jax.train.dit_trainer  # noqa: F401  (grain, array_record, tfds, av)
    import tensorboardX  # noqa: F401  (MetricLogger, at train time)

    smoke_checkpoint()
    enc = CachedTextEncoder()
    caps = eval_captions(per_split, text_prompts)
    miss = enc.missing(caps)
    info = {"versions": versions(), "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
            "eval_captions": len(caps), "table_captions": len(enc.captions), "import_s": time.perf_counter() - t0}
    log(json.dumps(info))
    if miss:
        raise SystemExit(f"caption table lacks {len(miss)} eval caption(s), e.g. {miss[:2]}; rebuild it locally")
    return info


def smoke_checkpoint() -> None:
    """Save + restore a tiny train state with a grain iterator, and read params back as eval does: the
    orbax/grain paths training ends with, tried before minutes of training depend on them."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sora_jax.train import checkpoint
    from sora_jax.train.latent_records import make_cache_loader
    from sora_jax.train.setup import on_one_device
    from sora_jax.train.state import TrainState

    p = {"w": jnp.arange(4.0)}
    tx = optax.adam(1e-3)
    st = TrainState(step=jnp.asarray(3), params=p, opt_state=tx.init(p), ema_params=p, tx=tx, ema_decay=0.9)
    src = CACHES_SRC[0]
    info = json.loads((src / "cache_info.json").read_text())
    it = make_cache_loader(src, {b: 2 for b in info["buckets"]}, seed=0)
    next(it)
    with tempfile.TemporaryDirectory() as tmp:
        m = checkpoint.make_manager(Path(tmp) / "ckpt", keep=1)
        checkpoint.save(m, st, it, rng=jax.random.key(0), force=True)
        m.wait_until_finished()
        back = checkpoint.restore(m, st, it)
        m.close()
        ema = checkpoint.restore_params(Path(tmp) / "ckpt", on_one_device(jax.eval_shape(lambda: p)))
    assert int(back.step) == 3 and np.allclose(ema["w"], np.arange(4.0)), "checkpoint round trip changed values"


# -------------------------------------------------------------------------------------------- train
def place_latent_cache(dit_cfg, workdir: Path) -> Path:
    """The run's train + held-out caches: a carried one whose key this config asks for is copied in as it
    is; any other is built here (the simulator's clips, the carried VAE, captions from the text table)."""
    from sora_jax.train.dit_data import _run_folder_cache, cache_inputs, vae_identity
    from sora_jax.train.latent_records import cache_key

    patch_text_encoder()
    vid = vae_identity(dit_cfg)
    have = {c.name: c for c in CACHES_SRC}
    workdir.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        name = f"latents-{cache_key(cache_inputs(dit_cfg, split, vid))}"
        if name in have and not (workdir / name).is_dir():
            tmp = workdir / (name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(have[name], tmp)
            tmp.rename(workdir / name)
        t0 = time.perf_counter()
        out[split] = _run_folder_cache(dit_cfg, workdir, split, vid)  # builds only what is not there
        log(f"{split} cache {out[split].name}: {'carried' if name in have else 'built here'} "
            f"({time.perf_counter() - t0:.1f}s)")
    return out["train"]


def train(a) -> None:
    info = check(a.per_split, a.text_prompts)
    from configs.physics_reference import reference_configs
    from sora_jax.config_overrides import apply_overrides
    from sora_jax.train.dit_trainer import train_dit
    from sora_jax.train.metrics import observe

    outdir = Path(a.outdir).absolute()
    # minutes only sizes the (unused) VAE steps and DiT max_minutes, both set explicitly below.
    _, dit = reference_configs(outdir, 60.0, variant=a.variant, dit_steps=a.steps, dit_shape=a.dit_shape,
                               num_train=a.num_train)
    dit.train.max_minutes = a.train_minutes
    dit.train.ckpt_every = a.ckpt_every
    dit.train.log_every = a.log_every
    dit.train.keep = 1
    if a.override:
        apply_overrides(dit, [o if o.startswith("--config.") else f"--config.{o}" for o in a.override])
    if not (outdir / "vae" / "vae_config.json").is_file():
        shutil.copytree(VAE_SRC, outdir / "vae", dirs_exist_ok=True)
    workdir = Path(dit.workdir)
    cache = place_latent_cache(dit, workdir)
    log(f"latent cache {cache}; DiT config: variant={dit.variant} model={dict(dit.model)} batch={dit.data.batch_size} "
        f"lr={dit.optim.lr} steps={dit.train.steps} max_minutes={dit.train.max_minutes}")

    rows: list[dict] = []

    def show(row: dict) -> None:
        rows.append(row)
        log("step {step} loss {loss:.4f} grad_norm {grad_norm:.3f} steps/s {steps_per_sec:.2f}".format(**row))

    probe = None
    if a.fit_minutes > 0:
        # Measure this machine's steps/s on a short throwaway run, then size the real run (and so its
        # cosine schedule) to fit --fit-minutes: the schedule decays fully instead of being cut by the cap.
        pcfg = dit.copy_and_resolve_references()
        pcfg.workdir = str(outdir / "probe")
        pcfg.train.steps, pcfg.train.log_every, pcfg.train.max_minutes = a.probe_steps, 20, 2.0
        pcfg.train.eval_every = 0  # a rate probe: nothing else
        pcfg.data.latents = str(cache)  # the run's own cache, not a second build
        t0 = time.perf_counter()
        with observe(show):
            train_dit(pcfg)
        rates = sorted(r["steps_per_sec"] for r in rows[1:]) or [rows[-1]["steps_per_sec"]]
        rate = rates[len(rates) // 2]
        fit = max(100, int(rate * a.fit_minutes * 60))
        probe = {"steps": rows[-1]["step"], "s": time.perf_counter() - t0, "steps_per_sec": rate, "fit_steps": fit}
        dit.train.steps = min(a.steps, fit)
        log(f"probe: {rate:.2f} steps/s after compile ({probe['s']:.0f}s in all) -> {fit} steps fit "
            f"{a.fit_minutes} min; training {dit.train.steps} steps")
        shutil.rmtree(pcfg.workdir, ignore_errors=True)
        rows.clear()

    t0 = time.perf_counter()
    with observe(show):
        res = train_dit(dit)
    dt = time.perf_counter() - t0
    import jax

    from sora_jax.train.checkpoint import read_json

    rates = [r["steps_per_sec"] for r in rows[2:]] or [r["steps_per_sec"] for r in rows]
    dit_json = read_json(workdir / "dit_config.json")
    n_params = None
    try:  # parameter count from shapes only (nothing is materialised)
        import math

        import jax.numpy as jnp

        from sora_jax.models.dit import DiT, DiTConfig
        from sora_jax.train.setup import dataclass_from_json

        sh = next(iter(json.loads((cache / "cache_info.json").read_text())["buckets"].values()))["shapes"]
        args = (jnp.zeros((1, *sh["latents"])), jnp.zeros((1,)), jnp.zeros((1, *sh["text"])),
                jnp.ones((1, sh["text"][0]), bool))
        model = DiT(dataclass_from_json(DiTConfig, dit_json))
        shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, *args))
        n_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))
    except Exception as e:  # noqa: BLE001 - the count is a nicety
        log(f"param count failed: {type(e).__name__}: {e}")
    summary = {"steps": res["step"], "final": res["final"], "train_dit_s": dt,
               "steps_per_sec_median": sorted(rates)[len(rates) // 2] if rates else None,
               "history": [{k: r[k] for k in ("step", "loss", "grad_norm", "steps_per_sec")} for r in rows],
               "dit_config": dit_json, "dit_params": n_params, "variant": a.variant, "dit_shape": a.dit_shape,
               "overrides": a.override, "probe": probe, "batch_size": int(dit.data.batch_size), "lr": float(dit.optim.lr),
               "eval_history": res["eval_history"],
               **info}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    log(f"trained {res['step']} steps in {dt:.1f}s, final loss {res['final'].get('loss')}, "
        f"median {summary['steps_per_sec_median']} steps/s, {n_params} params")


# --------------------------------------------------------------------------------------------- eval
def evaluate(a, rest: list[str]) -> int:
    patch_text_encoder()
    from sora_jax.cli import main

    outdir = Path(a.outdir).absolute()
    argv = ["eval-physics", "--checkpoint", str(outdir / "dit"), "--out", str(outdir / "bench"),
            "--per-split", str(a.per_split), "--text-prompts", str(a.text_prompts),
            "--phyworld-scenes", str(a.phyworld_scenes), *rest]
    log("sora-jax " + " ".join(argv))
    t0 = time.perf_counter()
    rc = main(argv)
    log(f"eval-physics rc={rc} in {time.perf_counter() - t0:.1f}s")
    return int(rc or 0)


def main() -> None:
    sys.path.insert(0, os.getcwd())  # the repo root (PYTHONPATH=$PWD does the same)
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("check", "train", "eval"):
        s = sub.add_parser(name)
        s.add_argument("--per-split", type=int, default=EVAL_DEFAULTS["per_split"])
        s.add_argument("--text-prompts", type=int, default=EVAL_DEFAULTS["text_prompts"])
        if name != "check":
            s.add_argument("--outdir", required=True)
    t = sub.choices["train"]
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--variant", default="S")
    t.add_argument("--num-train", type=int, default=512,
                   help="training clips; a cache of other than the carried 512 is generated and encoded here")
    t.add_argument("--dit-shape", default="")
    t.add_argument("--train-minutes", type=float, default=5.0, help="wall-clock cap of the step loop")
    t.add_argument("--fit-minutes", type=float, default=0.0,
                   help="> 0: probe steps/s first and train min(steps, what fits this many minutes)")
    t.add_argument("--probe-steps", type=int, default=120)
    t.add_argument("--ckpt-every", type=int, default=0, help="0: only the final checkpoint")
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--override", action="append", default=[], help="DiT config override, e.g. optim.lr=3e-4")
    sub.choices["eval"].add_argument("--phyworld-scenes", type=int, default=EVAL_DEFAULTS["phyworld_scenes"])
    sub.add_parser("build-text-cache")
    a, rest = p.parse_known_args()
    if rest and a.cmd != "eval":
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    if a.cmd == "check":
        check(a.per_split, a.text_prompts)
    elif a.cmd == "train":
        train(a)
    elif a.cmd == "eval":
        sys.exit(evaluate(a, rest))
    else:
        build_text_cache()


if __name__ == "__main__":
    main()
