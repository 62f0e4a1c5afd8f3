"""Pixel-space video quality metrics."""

from __future__ import annotations

import numpy as np


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels; default range fits videos in [-1, 1]."""
    pred = np.asarray(pred, np.float64)
    target = np.asarray(target, np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"psnr needs equal shapes, got {pred.shape} and {target.shape}")
    mse = np.mean(np.square(pred - target))
    return float(10.0 * np.log10(data_range**2 / max(mse, 1e-20)))
