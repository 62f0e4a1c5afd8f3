#!/usr/bin/env bash
# Device: train (or resume) the reference DiT S on the carried z16fg20 VAE, 4096 clips, budget clock.
#   bash .devcarry/train.sh MINUTES TIMEOUT_S LOGNAME
M=$1; T=$2; L=$3
mkdir -p runs/gz "$OUT"
[ -d runs/gz/vae ] || cp -r runs/carry/vae runs/gz/vae
echo "== $(date -u +%T) train --minutes $M, timeout $T s; dit ckpts: $(ls runs/gz/dit/ckpt 2>/dev/null | tr '\n' ' ')"
timeout -s TERM "$T" python3 .devcarry/ref.py train-ref --outdir runs/gz --minutes "$M" --vae-steps 3000 \
  --vae-override model.z_dim=16 --vae-override loss.fg_weight=20 --vae-override optim.schedule_clock=steps \
  --num-train 4096 --dit-variant S --dit-lr 2e-4 --dit-steps 60000 --dit-override model.attention=cudnn \
  --dit-override train.ckpt_every=5000 --dit-override train.log_every=200 > "$OUT/$L" 2>&1
echo "== $(date -u +%T) train rc=$? dit ckpts: $(ls runs/gz/dit/ckpt 2>/dev/null | tr '\n' ' ')"
grep -vE "Metadata file does not exist|custom data configuration|overriding jax.Array" "$OUT/$L" | tail -25
