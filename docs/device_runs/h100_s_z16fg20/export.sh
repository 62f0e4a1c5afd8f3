#!/usr/bin/env bash
# Device: export runs/gz/dit (EMA weights, bfloat16, without the VAE, which stays here as runs/carry/vae)
# and return it through $OUT as a tar split into as many pieces as the return limits leave room for
# (8 files, 16 MiB each, 64 MiB together). Run it last: it counts the files already in $OUT.
#   here, afterwards: cat export.tar.* | tar -x -C runs/gz_gpu && cp -r runs/carry/vae runs/gz_gpu/export/vae
python3 .devcarry/ref.py cli export runs/gz/dit runs/gz/export --dtype bfloat16 --no-vae --overwrite || exit 1
tar -cf /tmp/export.tar -C runs/gz export
size=$(stat -c %s /tmp/export.tar); used=$(du -cb "$OUT"/* 2>/dev/null | tail -1 | cut -f1)
k=$((8 - $(ls "$OUT" | wc -l))); per=$(( (size + k - 1) / (k > 0 ? k : 1) ))
if [ $k -lt 1 ] || [ $per -gt $((16 << 20)) ] || [ $((size + ${used:-0})) -gt $((64 << 20)) ]; then
  echo "export: $size bytes do not fit the return ($k files left, ${used:-0} bytes used); not returned"; exit 1
fi
split -b $per -d -a 1 /tmp/export.tar "$OUT/export.tar."
echo "export: $size bytes in $k pieces, sha256 $(sha256sum /tmp/export.tar | cut -c1-16)"
