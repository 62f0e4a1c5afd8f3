#!/usr/bin/env bash
# Device: DiT S throughput, optim.schedule_clock steps vs budget (same recipe otherwise), 512 clips.
S=${1:-3000}
for clock in steps budget; do
  d=runs/ab_$clock; rm -rf $d; mkdir -p $d "$OUT"; cp -r runs/carry/vae $d/vae
  echo "== $(date -u +%T) $clock"
  timeout -s TERM 210 python3 .devcarry/ref.py train-ref --outdir $d --minutes 60 --vae-steps 3000 \
    --vae-override model.z_dim=16 --vae-override loss.fg_weight=20 --vae-override optim.schedule_clock=steps \
    --num-train 512 --dit-variant S --dit-lr 2e-4 --dit-steps $S --dit-override model.attention=cudnn \
    --dit-override train.ckpt_every=5000 --dit-override train.log_every=200 \
    --dit-override optim.schedule_clock=$clock > "$OUT/ab_$clock.log" 2>&1
  echo "rc=$?"; grep -E '^\{"minutes' "$OUT/ab_$clock.log" | cut -c1-60,700-
done
python3 .devcarry/tbrate.py runs/ab_steps runs/ab_budget 2>&1 | tee "$OUT/ab_rates.txt"
