"""`sora-jax export`: a trained DiT run -> a self-contained inference folder.

A training run's checkpoints hold the raw and EMA parameters, the optimiser moments, the data
position and the RNG: four times the weights, and a run folder points at its VAE by absolute path.
An export keeps what sampling reads: the EMA parameters of one step (optionally as bfloat16), the
DiT's config, the run's sampling defaults, and the exact VAE weights the DiT was trained on, in a
`vae/` subfolder that `run.json` names relatively. So the folder can be copied to another machine
and loaded as a run (`TextToVideo.load`, `sora-jax sample --workdir`, `eval-physics --checkpoint`).

    DST/dit_config.json   the DiT's config (param_dtype = the exported dtype)
    DST/run.json          the run's record, with vae_workdir "vae"
    DST/ckpt/<step>/      parameters only
    DST/vae/              vae_config.json + ckpt/<vae_step>/ (float32, parameters only), unless --no-vae
    DST/exported_from.json

With `--no-vae` the VAE is left out (the DiT of a small model is most of the bytes that move); put a
copy of the VAE's run folder at DST/vae before loading. Its weights are checked against the
fingerprint run.json recorded, so a wrong VAE is refused rather than decoding other latents.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


from sora_jax.convert.folders import check_destination, count_params, write_folder_atomically
from sora_jax.train import checkpoint
from sora_jax.train.dit_trainer import DIT_CONFIG_FILE, RUN_FILE
from sora_jax.train.setup import dataclass_to_json
from sora_jax.train.vae_trainer import VAE_CONFIG_FILE

EXPORT_FILE = "exported_from.json"
DTYPES = ("float32", "bfloat16")
VAE_SUBDIR = "vae"


def _check_run(run_dir: Path) -> dict[str, Any]:
    for name in (RUN_FILE, DIT_CONFIG_FILE):
        if not (run_dir / name).is_file():
            raise checkpoint.CheckpointError(
                f"{run_dir} is not a DiT run folder (no {name}); pass the folder `sora-jax train` wrote "
                "(its --config.workdir; runs/<outdir>/dit for scripts/train_reference.py)")
    return checkpoint.read_json(run_dir / RUN_FILE)


def _nbytes(folder: Path) -> tuple[int, int]:
    files = [f for f in folder.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def export_dit_run(run_dir: str | Path, dst: str | Path, *, dtype: str = "float32", step: int | None = None,
                   include_vae: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write DiT run `run_dir` (checkpoint `step`, or the newest) as an inference folder at `dst`; returns a summary."""
    from sora_jax.pipeline import load_run_vae, restore_dit  # deferred: the pipeline imports text encoders

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    run_dir, dst = Path(run_dir).absolute(), Path(dst).absolute()
    if dst == run_dir or run_dir in dst.parents:
        raise ValueError(f"{dst} is inside the run folder {run_dir}; export to a folder outside it")
    run = _check_run(run_dir)
    check_destination(dst, overwrite)
    # Cast on restore: what loaders restore the export into is what it holds.
    cfg, at, params = restore_dit(run_dir, run["text_max_length"], step, param_dtype=dtype)

    vae_dir = run_dir / run["vae_workdir"]
    vae_params = vae_step = None
    if include_vae:
        _, vae_params, vae_id = load_run_vae(run_dir, run, f"point vae_workdir in {run_dir / RUN_FILE} at that VAE's "
                                             "run folder, or export with --no-vae")
        vae_step = vae_id["vae_step"]
        run = {**run, "vae_params": vae_id["vae_params"], "vae_step": vae_step}  # runs that predate the record

    record = {
        "source": str(run_dir), "step": int(at), "dtype": dtype,
        "vae": (f"included from {vae_dir}, step {vae_step}" if include_vae
                else f"left out: copy the VAE run folder (step {run.get('vae_step')}, weights "
                     f"{run.get('vae_params')}; trained at {vae_dir}) to {VAE_SUBDIR}/"),
    }

    def fill(out: Path) -> None:
        checkpoint.save_params(out / "ckpt", params, step=int(at))
        checkpoint.write_json_atomic(out / DIT_CONFIG_FILE, dataclass_to_json(cfg))
        # The latent cache is the training run's and does not travel.
        checkpoint.write_json_atomic(out / RUN_FILE, {**{k: v for k, v in run.items() if k != "latent_cache"},
                                                      "vae_workdir": VAE_SUBDIR})
        checkpoint.write_json_atomic(out / EXPORT_FILE, record)
        if include_vae:
            (out / VAE_SUBDIR).mkdir()
            shutil.copyfile(vae_dir / VAE_CONFIG_FILE, out / VAE_SUBDIR / VAE_CONFIG_FILE)
            checkpoint.save_params(out / VAE_SUBDIR / "ckpt", vae_params, step=int(vae_step))

    write_folder_atomically(dst, overwrite, fill)
    size, files = _nbytes(dst)
    return {"dst": str(dst), "step": int(at), "params": count_params(params), "dtype": dtype, "bytes": size,
            "files": files, "vae_included": include_vae}
