#!/usr/bin/env bash
# Device: install the carried wheels this python lacks (and the av stub), then run the arguments.
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=2 SITE=/tmp/site
if [ ! -f $SITE/.done ]; then
  mkdir -p $SITE
  python3 - <<'PY'
import glob, importlib.util, os, shutil, subprocess, sys
site = os.environ["SITE"]
mods = {"grain": "grain", "array_record": "array_record", "ml_collections": "ml_collections",
        "tensorflow_datasets": "tensorflow_datasets", "tensorboardx": "tensorboardX",
        "tensorflow_metadata": "tensorflow_metadata", "immutabledict": "immutabledict", "toml": "toml",
        "dm_tree": "tree", "simple_parsing": "simple_parsing", "termcolor": "termcolor",
        "portpicker": "portpicker", "promise": "promise", "docstring_parser": "docstring_parser",
        "googleapis_common_protos": "google.api"}
todo = []
for whl in sorted(glob.glob(".whl/*.whl")):
    dist = os.path.basename(whl).split("-")[0].lower()
    mod = mods.get(dist, dist)
    try:
        have = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        have = False
    (print("present:", mod) if have else todo.append(whl))
print("installing:", [os.path.basename(w) for w in todo], flush=True)
if todo:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *todo], check=True)
if importlib.util.find_spec("av") is None:
    shutil.copytree(".devcarry/stubs/av", os.path.join(site, "av"), dirs_exist_ok=True); print("av: stub")
PY
  [ $? = 0 ] || { echo "wheel install failed"; exit 3; }
  touch $SITE/.done
fi
export PYTHONPATH=$SITE:$PWD
if ! python3 -c "import tensorflow_datasets, grain, sora_jax.train.dit_trainer" 2>/tmp/imp.err; then
  tail -3 /tmp/imp.err
  grep -qiE "protobuf|gencode" /tmp/imp.err && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target $SITE .whl/fallback/*.whl && echo "installed carried protobuf"
fi
"$@"
