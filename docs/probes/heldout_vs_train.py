"""As run (issue #9): does a reference DiT memorise its 512 training clips? A record, not a tool.

    python docs/probes/heldout_vs_train.py runs/ref4     # tiny DiT, 9200 steps x 16 = 287 epochs
    python docs/probes/heldout_vs_train.py runs/ref5     # wide DiT, 2800 steps x 16 = 87 epochs

Encodes 64 clips of the physics test split with the run's VAE (into <run>/dit/latents-<key>/, the
folder training's periodic evaluation would use), then scores every training clip and every held-out
clip alone with the fixed-noise denoising loss of `make_dit_eval` (5 noise levels, the same noise for
every clip), grouped by ball count: the split's ball-count mix moves the pooled mean, a per-count
gap does not come from it. Prints {split: {count word: [clips, mean loss, standard error]}}.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from configs.physics_reference import reference_configs
from sora_jax.diffusion import flow
from sora_jax.models.dit import DiT
from sora_jax.pipeline import TextToVideo
from sora_jax.train.dit_data import _run_folder_cache
from sora_jax.train.evaluation import make_dit_eval
from sora_jax.train.latent_records import read_records

out_dir = Path(sys.argv[1])
_, cfg = reference_configs(out_dir, 90.0)
cfg.data.num_test = 64
heldout = _run_folder_cache(cfg, Path(cfg.workdir), "test")
t2v = TextToVideo.load(cfg.workdir)
o = t2v.defaults["objective"]
evaluate = make_dit_eval(DiT(t2v.dit_cfg), flow.FlowObjective(timestep_sampling=o["timestep_sampling"], shift=o["shift"]))
result = {}
for split, cache, n in (("train", t2v.defaults["latent_cache"], 512), ("test", heldout, 64)):
    rec = read_records(cache, n)
    groups = defaultdict(list)
    for i in range(len(rec["latents"])):
        one = {k: rec[k][i:i + 1] for k in ("latents", "text", "text_mask")}
        groups[rec["caption"][i].split()[0]].append(float(evaluate(t2v.dit_params, one)["eval/loss"]))
    result[split] = {k: [len(v), round(float(np.mean(v)), 4), round(float(np.std(v) / np.sqrt(len(v))), 4)]
                     for k, v in sorted(groups.items())}
print(json.dumps(result))
