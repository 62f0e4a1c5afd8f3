"""Video file I/O: MP4 through PyAV, GIF and PNG/JPEG through Pillow; frames are uint8 [T, H, W, 3]."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def to_uint8(video: np.ndarray) -> np.ndarray:
    """Map a float video in [-1, 1] to uint8; uint8 input passes through."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video
    return np.clip(np.round((video.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_mp4(path: str | Path, video: np.ndarray, fps: int = 8) -> Path:
    """Encode frames as H.264 (yuv420p; odd sizes are padded to even by repeating the edge)."""
    frames = to_uint8(video)
    t, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def write_gif(path: str | Path, video: np.ndarray, fps: int = 8, scale: int = 1) -> Path:
    """Write a looping GIF, optionally upscaled by an integer factor with nearest neighbour."""
    frames = to_uint8(video)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video (or an image, as one frame) to uint8 [T, H, W, 3]."""
    return read_frames(path)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")


def read_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """An image (as a 1-frame video) or the first `max_frames` frames of a video: uint8 [T, H, W, 3]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} not found; pass an existing PNG, JPEG or MP4 file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise ValueError(f"input {path}: unknown file type {suffix!r}; pass a PNG, JPEG or MP4 file")
    try:
        if suffix in IMAGE_SUFFIXES:
            with Image.open(path) as im:
                frames = np.asarray(im.convert("RGB"))[None]
        else:
            frames = []
            with av.open(str(path)) as container:
                for f in container.decode(video=0):
                    frames.append(f.to_ndarray(format="rgb24"))
                    if max_frames is not None and len(frames) >= max_frames:
                        break
            frames = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    except (OSError, ValueError, av.FFmpegError) as e:
        # Pillow's UnidentifiedImageError is an OSError; PyAV's errors are FFmpegError/ValueError.
        raise ValueError(f"cannot read {path} as an image or video ({type(e).__name__}); "
                         "pass a valid PNG, JPEG or MP4 file") from None
    if frames.shape[0] == 0 or min(frames.shape[1:3]) == 0:
        raise ValueError(f"input {path} has no frames; pass a non-empty image or video")
    return frames[:max_frames]


def cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The aspect-kept size (rh, rw) of an h x w frame scaled to just cover height x width."""
    scale = max(height / h, width / w)
    return max(height, round(h * scale)), max(width, round(w * scale))


def fit_video(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames [T, h, w, 3] to cover height x width (aspect kept), then center-crop to it."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]  # one image [h, w, 3] -> a 1-frame video
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"input frames have shape {frames.shape}; pass images [H, W, 3] or videos [T, H, W, 3]")
    frames = to_uint8(frames)
    t, h, w, _ = frames.shape
    rh, rw = cover_size(h, w, height, width)
    top, left = (rh - height) // 2, (rw - width) // 2
    out = np.empty((t, height, width, 3), np.uint8)
    for i, f in enumerate(frames):
        im = Image.fromarray(f)
        if (rh, rw) != (h, w):
            im = im.resize((rw, rh), Image.BICUBIC)
        out[i] = np.asarray(im)[top:top + height, left:left + width]
    return out


def tile_videos(videos: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Place equal-length uint8 videos side by side, separated by `gap` black columns."""
    frames = [to_uint8(v) for v in videos]
    if len({v.shape for v in frames}) != 1:
        raise ValueError(f"videos must share one shape to tile, got {sorted({v.shape for v in frames})}")
    t, h, _, c = frames[0].shape
    spacer = np.zeros((t, h, gap, c), np.uint8)
    parts = [p for v in frames for p in (v, spacer)][:-1]
    return np.concatenate(parts, axis=2)
