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


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-0.5 * np.square(x / sigma))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 2D correlation of [..., H, W] with window w, 'valid' (no padding) on both axes."""
    k = len(w)
    h, wd = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    y = sum(w[i] * x[..., i : i + h, :] for i in range(k))  # [..., h, W]
    return sum(w[i] * y[..., :, i : i + wd] for i in range(k))  # [..., h, w]


def ssim(
    pred: np.ndarray,
    target: np.ndarray,
    data_range: float = 2.0,
    *,
    min_value: float = -1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean SSIM (Wang et al. 2004) of videos [..., H, W, C] per frame and channel.

    Pixels lie in [min_value, min_value + data_range]: the defaults fit [-1, 1] videos (as psnr's);
    use (1.0, min_value=0.0) for [0, 1] and (255.0, min_value=0.0) for uint8. Gaussian window
    (11 taps, sigma 1.5), K1=0.01, K2=0.03, population (not sample) covariances, statistics only
    where the window fits ('valid', as Wang's MATLAB code), mean over all maps.
    """
    pred = np.asarray(pred, np.float64)
    target = np.asarray(target, np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"ssim needs equal shapes, got {pred.shape} and {target.shape}")
    if pred.ndim < 3 or min(pred.shape[-3:-1]) < win_size:
        raise ValueError(f"ssim needs frames [..., H, W, C] with H, W >= {win_size}, got shape {pred.shape}")
    # SSIM's luminance term is not offset-invariant: shift to the [0, data_range] intensities that
    # the constants (and published numbers) assume. Channels move to the front so the window
    # slides over the last two axes.
    x = np.moveaxis(pred - min_value, -1, 0)  # [C, ..., H, W]
    y = np.moveaxis(target - min_value, -1, 0)
    w = _gaussian_window(win_size, sigma)
    mu_x, mu_y = _filter_valid(x, w), _filter_valid(y, w)
    var_x = _filter_valid(x * x, w) - mu_x**2
    var_y = _filter_valid(y * y, w) - mu_y**2
    cov = _filter_valid(x * y, w) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())
