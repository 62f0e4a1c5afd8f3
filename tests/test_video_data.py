"""Real-video data: folder/manifest sources, PyAV decode in grain, buckets, skip counting."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest
from PIL import Image

from sora_jax.data.buckets import Bucket, BucketSpec, assign_bucket, skip_reason
from sora_jax.data.real_video import (DecodeToBucket, FrameSampling, VideoSource, make_bucketed_loader,
                                      read_manifest)
from sora_jax.data.video import write_mp4

SPEC = BucketSpec((Bucket(48, 64, 17, 2), Bucket(64, 48, 9, 1), Bucket(32, 32, 5, 2), Bucket(48, 48, 1, 1)))


def _clip(t: int, h: int, w: int) -> np.ndarray:
    """Gray frames whose brightness encodes the frame index (index * 10)."""
    return np.broadcast_to((np.arange(t) * 10).astype(np.uint8)[:, None, None, None], (t, h, w, 3)).copy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_mp4(root / "a.mp4", _clip(17, 48, 64))
    (root / "a.txt").write_text("a wide clip\n")
    write_mp4(root / "b.mp4", _clip(9, 64, 48))
    (root / "b.txt").write_text("a tall clip")
    write_mp4(root / "c.mp4", _clip(5, 32, 32))
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(root / "img.png")
    (root / "img.txt").write_text("a still")
    write_mp4(root / "short.mp4", _clip(3, 32, 32))  # fits 32x32 by size but not 5 frames
    full = write_mp4(tmp_path_factory.mktemp("whole") / "full.mp4", _clip(17, 48, 64)).read_bytes()
    (root / "trunc.mp4").write_bytes(full[: len(full) // 2])
    (root / "text.mp4").write_text("this is not a video\n")
    return root


def _drain(loader, limit=100):
    it = iter(loader)
    return [b for _, b in zip(range(limit), it)]


def _check_batches(batches, spec=SPEC):
    for b in batches:
        bucket = spec[b["bucket"]]
        assert b["video"].shape == (bucket.batch_size, bucket.frames, bucket.height, bucket.width, 3)
        assert b["video"].dtype == np.float32 and -1.0 <= b["video"].min() <= b["video"].max() <= 1.0
        assert b["caption"].shape == (bucket.batch_size,)


def test_assign_bucket_largest_fit_never_upscales():
    spec = BucketSpec((Bucket(256, 256, 17, 8), Bucket(256, 448, 17, 4), Bucket(448, 256, 17, 4),
                       Bucket(512, 512, 1, 16), Bucket(256, 256, 33, 4)))
    # 480x854, 40 frames: all video buckets fit except the tall one; 256x448x17 and 256x256x33 both
    # exceed 256x256x17; 256x256x33 = 2162688 > 256x448x17 = 1949696.
    assert assign_bucket(480, 854, 40, spec).name == "256x256x33"
    assert assign_bucket(480, 854, 20, spec).name == "256x448x17"
    assert assign_bucket(854, 480, 20, spec).name == "448x256x17"
    assert assign_bucket(720, 720, 1, spec).name == "512x512x1"  # an image
    assert assign_bucket(255, 1000, 100, spec) is None  # would need upscaling in height
    assert skip_reason(255, 1000, 100, spec) == "too_small"
    assert assign_bucket(300, 300, 16, spec) is None and skip_reason(300, 300, 16, spec) == "too_short"
    # Never upscales: the pick always fits inside the source.
    for h, w, t in [(256, 256, 17), (300, 500, 18), (1000, 300, 33), (512, 512, 2)]:
        b = assign_bucket(h, w, t, spec)
        assert b.height <= h and b.width <= w and b.frames <= t
    # Equal sizes: the one whose aspect is closer to the source's wins.
    tie = BucketSpec((Bucket(32, 64, 5, 1), Bucket(64, 32, 5, 1)))
    assert assign_bucket(64, 64, 5, tie).name == "32x64x5" and assign_bucket(80, 64, 5, tie).name == "64x32x5"


def test_bucket_spec_validation():
    with pytest.raises(ValueError, match="4k\\+1"):
        BucketSpec((Bucket(32, 32, 4, 1),))
    with pytest.raises(ValueError, match="multiples of 16"):
        BucketSpec((Bucket(40, 32, 5, 1),))
    with pytest.raises(ValueError, match="batch_size"):
        BucketSpec((Bucket(32, 32, 5, 0),))
    with pytest.raises(ValueError, match="twice"):
        BucketSpec((Bucket(32, 32, 5, 1), Bucket(32, 32, 5, 2)))
    assert BucketSpec((Bucket(40, 24, 5, 1),), multiple=8).buckets[0].name == "40x24x5"
    assert BucketSpec.parse("256x256x17:8, 512x512x1:32") == BucketSpec(
        (Bucket(256, 256, 17, 8), Bucket(512, 512, 1, 32)))


def test_folder_batches_buckets_and_skips(data):
    source = VideoSource(data)
    assert len(source) == 7
    loader = make_bucketed_loader(source, SPEC, seed=0, num_epochs=2, read_threads=1)
    batches = _drain(loader)
    _check_batches(batches)
    names = sorted(b["bucket"] for b in batches)
    # a x2 -> one batch of 2; b x2 -> two of 1; c x2 -> one of 2; img x2 -> two of 1.
    assert names == ["32x32x5", "48x48x1", "48x48x1", "48x64x17", "64x48x9", "64x48x9"]
    assert loader.stats.skipped == {"corrupt": 4, "too_short": 2}
    assert loader.stats.corrupt == 4
    captions = {str(c) for b in batches for c in b["caption"]}
    assert captions == {"a wide clip", "a tall clip", "", "a still"}
    img = next(b for b in batches if b["bucket"] == "48x48x1")["video"]
    assert np.allclose(img, 200 / 127.5 - 1, atol=0.02)  # images are 1-frame videos
    again = _drain(make_bucketed_loader(source, SPEC, seed=0, num_epochs=2, read_threads=1))
    assert [b["bucket"] for b in again] == [b["bucket"] for b in batches]
    assert all(np.array_equal(x["video"], y["video"]) for x, y in zip(again, batches))


def test_manifests(data, tmp_path):
    rows = [{"path": str(data / "a.mp4"), "caption": "A"}, {"path": "b.mp4", "caption": "B", "fps": 8},
            {"path": "img.png", "caption": "I", "width": 48, "height": 48}, {"path": "text.mp4", "caption": "T"}]
    (data / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "m.csv").write_text("path,caption,fps\n" + "".join(f"{r['path']},\"{r['caption']}, ok\",\n" for r in rows))
    for name in ("m.jsonl", "m.csv"):
        source = VideoSource(data / name)
        assert source.entries[1].path == str(data / "b.mp4")
        loader = make_bucketed_loader(source, SPEC, seed=1, num_epochs=2, read_threads=1)
        batches = _drain(loader)
        _check_batches(batches)
        assert sorted(b["bucket"] for b in batches) == ["48x48x1", "48x48x1", "48x64x17", "64x48x9", "64x48x9"]
        assert loader.stats.skipped == {"corrupt": 2}
        suffix = "" if name.endswith("jsonl") else ", ok"
        assert {str(c) for b in batches for c in b["caption"]} == {f"A{suffix}", f"B{suffix}", f"I{suffix}"}
    (tmp_path / "bad.jsonl").write_text('{"path": "x.mp4"}\n{"caption": "no path"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: row has no 'path'"):
        read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("file,caption\nx.mp4,hi\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        read_manifest(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="not found; pass a folder"):
        VideoSource(tmp_path / "missing")


def _record(path, t, h, w, fps=8.0):
    from sora_jax.data.real_video import Probe

    return {"index": 0, "path": str(path), "caption": "c", "image": False, "probe": Probe(h, w, t, fps)}


@pytest.mark.parametrize("sampling,steps", [
    (FrameSampling(stride=3), [3, 3, 3, 3]),
    (FrameSampling(fps=4), [2, 2, 2, 2]),  # 8 fps -> 4 fps
    (FrameSampling(fps=3), [2, 3, 3, 2]),  # floor(i * 8/3) = 0, 2, 5, 8, 10
])
def test_frame_sampling_indices(tmp_path, sampling, steps):
    path = write_mp4(tmp_path / "idx.mp4", _clip(25, 32, 32), fps=8)
    spec = BucketSpec((Bucket(32, 32, 5, 1),))
    transform = DecodeToBucket(spec, sampling)
    starts = set()
    for seed in range(4):
        out = transform.random_map(_record(path, 25, 32, 32), np.random.default_rng(seed))
        idx = out["video"].reshape(5, -1).mean(axis=1) / 10.0
        assert np.allclose(np.diff(idx), steps, atol=0.4), idx
        start = round(idx[0])
        assert abs(idx[0] - start) < 0.4 and 0 <= start <= 24 - sum(steps)
        starts.add(start)
    assert len(starts) > 1  # random start


def test_caption_dropout_rate_and_determinism(data):
    record = VideoSource(data)[3]  # img.png
    assert record["image"]

    def captions(seed):
        ds = grain.MapDataset.source([record] * 300).random_map(DecodeToBucket(SPEC, caption_dropout=0.3), seed=seed)
        return [ds[i]["caption"] for i in range(len(ds))]

    first = captions(0)
    assert 0.22 < first.count("") / len(first) < 0.38
    assert captions(0) == first and captions(1) != first
    assert set(first) == {"", "a still"}


def test_state_restore_resumes_exactly(data):
    loader = make_bucketed_loader(VideoSource(data), SPEC, seed=3, num_epochs=None, read_threads=1)
    it = iter(loader)
    for _ in range(10):  # stop where a bucket holds a partial batch, so resume must replay it
        next(it)
        state = it.get_state()
        if state["buffered"]:
            break
    assert state["buffered"]
    json.dumps(state)  # checkpointable as JSON, like grain's own iterators
    expect = [next(it) for _ in range(4)]
    resumed = iter(make_bucketed_loader(VideoSource(data), SPEC, seed=3, num_epochs=None, read_threads=1))
    resumed.set_state(state)
    got = [next(resumed) for _ in range(4)]
    assert [b["bucket"] for b in got] == [b["bucket"] for b in expect]
    assert all(np.array_equal(x["video"], y["video"]) for x, y in zip(got, expect))


def test_multiprocess_workers_count_in_parent(data):
    loader = make_bucketed_loader(data, SPEC, seed=0, num_epochs=2, worker_count=2, read_threads=1)
    batches = _drain(loader)
    _check_batches(batches)
    assert sorted(b["bucket"] for b in batches) == ["32x32x5", "48x48x1", "48x48x1", "48x64x17", "64x48x9", "64x48x9"]
    assert loader.stats.skipped == {"corrupt": 4, "too_short": 2}  # filtered after mp_prefetch


def test_loader_from_config(data):
    from configs.video_data import video_data_config
    from sora_jax.data.real_video import loader_from_config

    cfg = video_data_config()
    with pytest.raises(ValueError, match="data.path is empty"):
        loader_from_config(cfg, seed=0)
    cfg.path, cfg.buckets, cfg.caption_dropout, cfg.probe_all = str(data), "32x32x5:1,48x48x1:1", 0.0, True
    batches = _drain(loader_from_config(cfg, seed=0, num_epochs=1))
    # a, b, c are cropped into 32x32x5 (largest fit without upscaling); the image into 48x48x1.
    assert sorted(b["bucket"] for b in batches) == ["32x32x5"] * 3 + ["48x48x1"]
