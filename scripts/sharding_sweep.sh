#!/usr/bin/env bash
# Fills docs/sharding_results/ (the tables of docs/sharding.md): one JSON per model x video x target x layout,
# most informative first; files already there are skipped, so rerunning resumes and fills missing cells.
# Usage: scripts/sharding_sweep.sh [JOBS_FILTER]   (CPU host with the tpu extra; every line is one compile)
set -uo pipefail
cd "$(dirname "$0")/.."
out=docs/sharding_results
mkdir -p "$out"
export JAX_PLATFORMS=cpu
# Blockwise is the default O(tokens)-memory backend; splash (the TPU Pallas kernel, run under a shard_map
# over every mesh axis since GSPMD cannot partition a Mosaic call) is compared on the 1.3B cells.
declare -A LAYOUT=(
  [fsdp]="fsdp=-1,remat=full,attention=blockwise,batch=1"
  [fsdp-dots]="fsdp=-1,remat=dots,attention=blockwise,batch=1"
  [fsdp-seq2]="fsdp=-1,sequence=2,rules=fsdp_sequence,remat=full,attention=ulysses,batch=1"
  [fsdp-seq4]="fsdp=-1,sequence=4,rules=fsdp_sequence,remat=full,attention=ulysses,batch=1"
  [fsdp-tp2]="fsdp=-1,tensor=2,rules=fsdp_tensor,remat=full,attention=blockwise,batch=1"
  [fsdp-tp4]="fsdp=-1,tensor=4,rules=fsdp_tensor,remat=full,attention=blockwise,batch=1"
  # Hybrid: weights sharded 16 ways (enough for 1.3B's state), replicas over the rest of the slice.
  [dp-fsdp16]="data=-1,fsdp=16,remat=full,attention=blockwise,batch=1"
  [fsdp-splash]="fsdp=-1,remat=full,attention=splash,batch=1"
)
run() {  # variant video target layout-name
  local name="$out/${1}_${2}_${3}_${4}"
  [ -s "$name.json" ] && return
  [ -e "$out/${1}_${2}_${3}.log" ] && return  # an all-layouts run of this cell (see docs/sharding.md)
  echo "$(date +%T) start $name"
  /usr/bin/time -f "%e s wall" sora-jax bench-sharding --config "dit:variant=$1" --video "$2" --text-len 512 \
    --target "$3" --layouts "${LAYOUT[$4]}" --json "$name.json" > /dev/null 2> "$name.log"
  echo "$(date +%T) done $name: $(tail -1 "$name.log")"
}
jobs() {
  for v in wan2.1-14b wan2.1-1.3b; do
    for t in v5p-8 v5e-16 v5p-64 v5p-256 v5e-256; do echo "$v 81x480x832 $t fsdp"; done
  done
  for t in v5p-8 v5e-16 v5p-64 v5p-256 v5e-256; do echo "wan2.1-14b 81x720x1280 $t fsdp"; done
  for t in v5p-8 v5e-16; do echo "wan2.1-14b 81x480x832 $t fsdp-seq2"; echo "wan2.1-14b 81x480x832 $t fsdp-tp2"; done
  for t in v5p-64 v5p-256 v5e-256; do echo "wan2.1-14b 81x480x832 $t fsdp-seq4"; echo "wan2.1-14b 81x480x832 $t fsdp-tp4"; done
  for t in v5p-8 v5p-64 v5p-256; do echo "wan2.1-14b 81x480x832 $t fsdp-dots"; done
  for t in v5p-8 v5e-16 v5p-64 v5p-256 v5e-256; do echo "wan2.1-1.3b 81x720x1280 $t fsdp"; done
  for t in v5p-64 v5p-256 v5e-256; do echo "wan2.1-14b 81x720x1280 $t fsdp-seq4"; done
  for t in v5p-8 v5e-16; do echo "wan2.1-1.3b 81x480x832 $t fsdp-dots"; echo "wan2.1-1.3b 81x480x832 $t fsdp-seq2"; done
  for t in v5p-256 v5e-256; do echo "wan2.1-1.3b 81x480x832 $t dp-fsdp16"; done
  echo "wan2.1-1.3b 81x720x1280 v5e-16 fsdp-seq2"
  for t in v5p-8 v5e-16 v5p-64; do echo "wan2.1-1.3b 81x480x832 $t fsdp-splash"; done
}
jobs | grep -- "${1:-}" | while read -r v video t l; do run "$v" "$video" "$t" "$l"; done
