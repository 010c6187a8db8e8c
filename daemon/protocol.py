"""The measurement protocol, in one place for the service's benchmark mode and for ``upscaled bench``.

- :func:`modcrop` crops the ground truth to a multiple of the scale, as the papers' code does;
- :func:`make_lr` makes the low-resolution input from it with a named kernel, rounded to the file's sample grid
  between passes as MATLAB does for integer images (``matlab-bicubic`` on an 8-bit Set5 picture gives the published
  ``LR_bicubic`` image);
- :func:`check_size` says whether an image is large enough to be measured at a scale (the border shave, then SSIM's
  11 px window, and a few LR pixels);
- :data:`METRICS` names every metric: which mode records it, which way is better, and the protocol it follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import ImageTooSmallError

SSIM_WINDOW = 11  # Wang et al.'s Gaussian window
DOWNSCALES = ("matlab-bicubic", "cv2-cubic", "area")


@dataclass(frozen=True)
class MetricInfo:
    name: str
    mode: str  # "benchmark": against the HR ground truth; "upscale": no ground truth
    higher_is_better: bool
    protocol: str


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("psnr_y", "benchmark", True, "PSNR peak 255 on BT.601 Y (16-235), border scale px shaved, vs HR"),
        MetricInfo("ssim_y", "benchmark", True, "SSIM Wang 11x11 s1.5 on BT.601 Y, border scale px shaved, vs HR"),
        MetricInfo("psnr_rgb", "benchmark", True, "PSNR peak 255 on RGB 0-255, border scale px shaved, vs HR"),
        MetricInfo("ssim_rgb", "benchmark", True, "SSIM Wang per channel, mean, RGB, border shaved, vs HR"),
        MetricInfo("mse_rgb", "benchmark", False, "MSE on RGB 0-255, border scale px shaved, vs HR"),
        MetricInfo("brisque", "upscale", False, "BRISQUE (LIVE model, cv2.quality), no reference"),
        MetricInfo(
            "lr_psnr_y", "upscale", True, "output downscaled to the input (MATLAB bicubic), PSNR on Y, no shave"
        ),
        MetricInfo(
            "lr_ssim_y", "upscale", True, "output downscaled to the input (MATLAB bicubic), SSIM on Y, no shave"
        ),
    )
}
BENCHMARK_METRICS = tuple(n for n, m in METRICS.items() if m.mode == "benchmark")
UPSCALE_METRICS = tuple(n for n, m in METRICS.items() if m.mode == "upscale")


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """``img`` cropped at the bottom and right to a multiple of ``scale``."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def min_side(scale: int) -> int:
    """The smallest side an image needs to be measured at ``scale``: ``scale`` px shaved from each border leaves
    SSIM's window, and the LR image keeps at least 3 px."""
    return max(SSIM_WINDOW + 2 * scale, 3 * scale)


def check_size(width: int, height: int, scale: int, name: str = "the image") -> None:
    """Raises:
    ImageTooSmallError: a side is below :func:`min_side`.
    """
    need = min_side(scale)
    if min(width, height) < need:
        raise ImageTooSmallError(
            f"{name} is {width}x{height}: measuring at x{scale} needs at least {need} px per "
            f"side ({scale} px shaved from each border, then SSIM's {SSIM_WINDOW} px window)"
        )


def quantise(img: np.ndarray, bits: int) -> np.ndarray:
    """Round float pixels to the sample grid of a ``bits``-deep file, as saving and reloading would."""
    peak = 65535.0 if bits == 16 else 255.0
    return (np.rint(np.clip(img, 0.0, 1.0) * peak) / peak).astype(np.float32)


def make_lr(hr: np.ndarray, scale: int, kernel: str, bits: int) -> np.ndarray:
    """The LR image of float ``hr`` (already :func:`modcrop`-ed) with ``kernel``, on the ``bits``-deep grid.

    Raises:
        ValueError: an unknown kernel.
    """
    if kernel not in DOWNSCALES:
        raise ValueError(f"downscale kernel must be one of {', '.join(DOWNSCALES)}, got {kernel!r}")
    from models.resize import resize  # here: scipy is heavy, and the configuration imports this module for its names

    size = (hr.shape[1] // scale, hr.shape[0] // scale)
    levels = 65535 if bits == 16 else 255
    return quantise(resize(hr, size, kernel, levels=levels), bits)
