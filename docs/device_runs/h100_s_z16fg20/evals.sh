#!/usr/bin/env bash
# Device: score runs/gz/dit while time is left (DEADLINE = seconds since the call began): id-32 frames,
# the same scenes with other sampling noise, then the default set (all splits, text protocol).
DEADLINE=$1; E="python3 .devcarry/ref.py cli eval-physics --checkpoint runs/gz/dit --phyworld-scenes 0"
run() { local name=$1; shift; local left=$((DEADLINE - SECONDS)); [ $left -gt 40 ] || { echo "skip $name"; return; }
  echo "== $(date -u +%T) eval $name (${left}s left)"
  timeout -s INT $left $E --out runs/gz/bench_$name "$@" > runs/gz/eval_$name.log 2>&1; echo "rc=$?"
  tail -3 runs/gz/eval_$name.log; cp runs/gz/bench_$name/report.md "$OUT/report_$name.md" 2>/dev/null; }
run id32 --splits id --per-split 8 --protocols frames
run id32s1 --splits id --per-split 8 --protocols frames --sample-seed 1
run default --per-split 3 --text-prompts 6
tar czf "$OUT/gz_results.tgz" runs/gz/bench_* runs/gz/eval_*.log runs/gz/summary.json runs/gz/dit/run.json 2>/dev/null
ls -la "$OUT"
