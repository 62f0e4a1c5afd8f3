"""Tile the sample videos of a `sora-jax demo` run into one GIF (used for README's docs/demo.gif)."""

import argparse
from pathlib import Path

from sora_jax.data.video import read_video, tile_videos, write_gif


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("demo_dir", help="the --outdir of a demo run")
    p.add_argument("out", help="GIF to write")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--scale", type=int, default=2)
    a = p.parse_args()
    videos = [read_video(f) for f in sorted(Path(a.demo_dir, "samples").glob("sample_*.mp4"))]
    if not videos:
        raise SystemExit(f"no samples/sample_*.mp4 under {a.demo_dir}; run `sora-jax demo --outdir {a.demo_dir}`")
    print(write_gif(a.out, tile_videos(videos), fps=a.fps, scale=a.scale))


if __name__ == "__main__":
    main()
