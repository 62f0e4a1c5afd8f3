#!/usr/bin/env bash
# Regenerates docs/sharding_results/*.json (the tables of docs/sharding.md); skips files already there.
# Usage: scripts/sharding_sweep.sh [variant ...]   (CPU host with the tpu extra; hours on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
out=docs/sharding_results
mkdir -p "$out"
export JAX_PLATFORMS=cpu
LAYOUTS="fsdp=-1,remat=full,attention=splash,batch=1;fsdp=-1,remat=dots,attention=splash,batch=1;fsdp=-1,tensor=4,rules=fsdp_tensor,remat=full,attention=splash,batch=1;fsdp=-1,sequence=4,rules=fsdp_sequence,remat=full,attention=ulysses,batch=1"
run() {  # variant video target
  local name="$out/${1}_${2}_${3}"
  [ -s "$name.json" ] && grep -q '"rows"' "$name.json" && [ "$(grep -c '"status"' "$name.json")" -ge 4 ] && return
  echo "$(date +%T) start $name"
  /usr/bin/time -f "%e s wall" sora-jax bench-sharding --config "dit:variant=$1" --video "$2" --text-len 512 \
    --target "$3" --layouts "$LAYOUTS" --json "$name.json" --csv "$name.csv" > "$name.md" 2> "$name.log"
  echo "$(date +%T) done $name: $(tail -1 "$name.log")"
}
for variant in ${@:-wan2.1-14b wan2.1-1.3b}; do
  for video in 81x480x832 81x720x1280; do
    for target in v5p-8 v5e-16 v5p-64 v5p-256 v5e-256; do
      run $variant $video $target
    done
  done
done
