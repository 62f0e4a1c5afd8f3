"""Is gravity visible in the conditioning frames, before and after the VAE? (sora_jax/eval/world_cue.py)

    python scripts/world_cue.py --vae runs/carry/vae            # the 32 in-distribution scenes, K=5 frames
"""

import argparse

from sora_jax.bench.harness import write_report
from sora_jax.eval.physics_bench import latent_aligned, vae_roundtrip_predictor
from sora_jax.eval.physics_metrics import train_gravity_px
from sora_jax.eval.physics_scenes import SceneSpec
from sora_jax.eval.world_cue import world_cue_report, world_cue_rows
from sora_jax.parallel.backends import skip_absent_tpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", help="VAE run folder; without it only the true frames are read")
    p.add_argument("--per-split", type=int, default=8, help="scenes per family (in distribution)")
    p.add_argument("--cond-frames", type=int, default=4, help="K, rounded up to whole latent frames as eval-physics does")
    p.add_argument("--out", default="world_cue.json")
    a = p.parse_args()
    skip_absent_tpu()
    roundtrip = None
    if a.vae:
        from sora_jax.train.vae_trainer import load_vae

        predict = vae_roundtrip_predictor(*load_vae(a.vae))
        roundtrip = lambda frames: predict({"video": frames}, len(frames))  # noqa: E731
    spec = SceneSpec(splits=("id",), per_split=a.per_split)
    rows = world_cue_rows(spec, latent_aligned(a.cond_frames), roundtrip)
    result, table = world_cue_report(rows, train_gravity_px(spec.size))
    write_report(result, table, a.out)


if __name__ == "__main__":
    main()
