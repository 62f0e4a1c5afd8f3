#!/usr/bin/env bash
# Remote: train a reference DiT on the carried VAE + latent cache, run eval-physics, copy results to $OUT.
#   bash .devcarry/remote_cmd.sh N [train flags: --variant S | --dit-shape num_layers=8,... | --train-minutes 5
#                                   | --override optim.lr=3e-4 | --ckpt-every 0 | --log-every 100]
# Env: OUT (results, default /tmp/out), RUNDIR (run folder, default /tmp/refrun), DEADLINE_S (whole-script
# wall budget, default 570: eval gets what training left), EVAL_ARGS (extra eval flags, tests only). Needs only python3 + the carried .whl/ .devcarry/.
set -o pipefail
N=${1:?usage: remote_cmd.sh STEPS [train flags]}; shift
cd "$(dirname "$0")/.." || exit 2            # the repo root
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; R=${RUNDIR:-/tmp/refrun}; SITE=/tmp/site; DEADLINE_S=${DEADLINE_S:-570}
mkdir -p "$OUT" "$SITE"; rm -rf "$R"
LOG=$OUT/train.log
{
  echo "== $(date -u) host=$(hostname) N=$N args=$* repo=$PWD"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  # Install only the carried wheels whose module this python lacks (no shadowing of what is there).
  python3 - "$SITE" <<'EOF'
import glob, importlib.util, os, shutil, subprocess, sys
site = sys.argv[1]
mods = {"grain": "grain", "array_record": "array_record", "ml_collections": "ml_collections",
        "tensorflow_datasets": "tensorflow_datasets", "tensorboardx": "tensorboardX",
        "tensorflow_metadata": "tensorflow_metadata", "wrapt": "wrapt", "immutabledict": "immutabledict",
        "toml": "toml", "dm_tree": "tree", "simple_parsing": "simple_parsing", "termcolor": "termcolor",
        "portpicker": "portpicker", "attrs": "attr", "promise": "promise", "six": "six",
        "docstring_parser": "docstring_parser"}
todo = []
for whl in sorted(glob.glob(".whl/*.whl")):
    dist = os.path.basename(whl).split("-")[0].lower()
    mod = mods.get(dist, dist)
    (todo.append(whl) if importlib.util.find_spec(mod) is None else print("present:", mod))
print("installing:", [os.path.basename(w) for w in todo], flush=True)
if todo:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *todo], check=True)
if importlib.util.find_spec("av") is None:
    shutil.copytree(".devcarry/stubs/av", os.path.join(site, "av"), dirs_exist_ok=True); print("av: stub")
EOF
} 2>&1 | tee "$LOG" || { echo "wheel install failed" | tee -a "$LOG"; exit 3; }
export PYTHONPATH=$SITE:$PWD
if ! python3 .devcarry/remote.py check >>"$LOG" 2>&1; then
  tail -5 "$LOG"; grep -qiE "protobuf|gencode" "$LOG" && echo "retry with carried protobuf" | tee -a "$LOG" \
    && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/fallback/*.whl
fi
python3 .devcarry/remote.py train --outdir "$R" --steps "$N" "$@" 2>&1 | tee -a "$LOG"
TRC=$?
ERC=skipped
LEFT=$(( DEADLINE_S - SECONDS ))
if ls -d "$R"/dit/ckpt/[0-9]* >/dev/null 2>&1 && [ "$LEFT" -gt 30 ]; then
  echo "== eval with ${LEFT}s left" | tee "$OUT/eval.log"
  timeout -s INT "$LEFT" python3 .devcarry/remote.py eval --outdir "$R" $EVAL_ARGS 2>&1 | tee -a "$OUT/eval.log"
  ERC=$?
fi
cp "$R"/bench/report.json "$R"/bench/report.md "$R"/bench/samples.png "$R"/bench/position_error.png \
   "$R"/dit/run.json "$R"/summary.json "$OUT"/ 2>/dev/null
echo "== done in ${SECONDS}s: train rc=$TRC eval rc=$ERC; $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
[ "$TRC" = 0 ] && [ "$ERC" = 0 ]
