"""Device driver for the documented reference commands: the MiniLM table stands in for the text encoder.

  python3 .devcarry/ref.py train-ref ARGS...   # scripts/train_reference.py ARGS
  python3 .devcarry/ref.py cli ARGS...         # sora-jax ARGS (eval-physics ...)
"""
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.insert(0, str(Path(__file__).resolve().parent))
import remote  # noqa: E402

cmd, args = sys.argv[1], sys.argv[2:]
enc = remote.patch_text_encoder()
remote.log(f"text table: {len(enc.captions)} captions ({enc.source})")
if cmd == "train-ref":
    sys.argv = ["scripts/train_reference.py", *args]
    runpy.run_path("scripts/train_reference.py", run_name="__main__")
elif cmd == "cli":
    from sora_jax.cli import main

    sys.exit(main(args))
else:
    raise SystemExit(f"unknown command {cmd}")
