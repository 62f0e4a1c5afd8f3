"""Data config for training on real videos/images (`sora_jax.data.real_video`)."""

from __future__ import annotations

import ml_collections


def video_data_config() -> ml_collections.ConfigDict:
    """Defaults for `real_video.loader_from_config`; set `path` to a folder or .jsonl/.csv manifest."""
    return ml_collections.ConfigDict(
        {
            "name": "videos",
            "path": "",
            # HxWxFRAMES:BATCH per bucket (frames 4k+1, sizes multiples of 16); images need a
            # 1-frame bucket.
            "buckets": "256x256x17:4,256x448x17:2,448x256x17:2,256x256x1:32",
            "stride": 1,  # every k-th frame; ignored when fps > 0
            "fps": 0.0,  # > 0: resample to this frame rate from the container's
            "caption_dropout": 0.1,  # for classifier-free guidance
            "worker_count": 0,
            "probe_all": False,  # probe every file up front (workers then share the cache)
        }
    )
