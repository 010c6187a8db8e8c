"""Quality metrics, each with its protocol written down.

Full-reference metrics follow the super-resolution papers: Y is ITU-R BT.601 luma on the 16..235 scale
(Y = 16 + 65.481 R + 128.553 G + 24.966 B for RGB in [0, 1]), ``scale`` pixels are shaved from every border, PSNR
uses a peak of 255, and SSIM is Wang et al.'s (11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03), which is
what their MATLAB code computes. RGB metrics use all three channels on the 0..255 scale with the same shave.

Where there is no ground truth (upscale mode) we record BRISQUE, a no-reference score (lower is better), and an
LR-consistency check: the output is downscaled back to the input size with MATLAB bicubic and compared with the
input on Y, with no shave.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# cv2, scikit-image and scipy (models.resize) are imported where a metric is computed: the job rows import this module
# for Metric, and `upscaled history` must not pay a second for libraries it never calls.
_Y = np.array([65.481, 128.553, 24.966], np.float64)


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    space: str  # "y-bt601", "rgb", or "-" for no-reference scores
    shave: int  # border pixels removed before comparing
    reference: str  # "hr" (ground truth), "lr-input" (consistency), or "none"
    protocol: str  # one line a person can read


def y_bt601(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma on the 16..235 scale, float64, from float RGB in [0, 1]."""
    return 16.0 + rgb.astype(np.float64) @ _Y


def _shave(a: np.ndarray, s: int) -> np.ndarray:
    return a[s:-s, s:-s] if s > 0 else a


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def ssim(a: np.ndarray, b: np.ndarray, channel_axis: int | None = None) -> float:
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            a,
            b,
            data_range=255.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=channel_axis,
        )
    )


def full_reference(sr: np.ndarray, hr: np.ndarray, shave: int, names: tuple[str, ...]) -> list[Metric]:
    """PSNR/SSIM/MSE of ``sr`` against ``hr`` (float RGB in [0, 1], same shape), as the papers compute them."""
    if sr.shape != hr.shape:
        raise ValueError(f"shapes differ: output {sr.shape}, reference {hr.shape}")
    out = []
    proto_y = f"BT.601 Y (16-235), border {shave} px shaved, against the HR ground truth"
    proto_rgb = f"RGB 0-255, border {shave} px shaved, against the HR ground truth"
    if {"psnr_y", "ssim_y"} & set(names):
        ys, yh = _shave(y_bt601(sr), shave), _shave(y_bt601(hr), shave)
        if "psnr_y" in names:
            out.append(Metric("psnr_y", psnr(ys, yh), "y-bt601", shave, "hr", "PSNR peak 255, " + proto_y))
        if "ssim_y" in names:
            out.append(Metric("ssim_y", ssim(ys, yh), "y-bt601", shave, "hr", "SSIM Wang 11x11 s1.5, " + proto_y))
    if {"psnr_rgb", "ssim_rgb", "mse_rgb"} & set(names):
        rs, rh = _shave(sr.astype(np.float64) * 255, shave), _shave(hr.astype(np.float64) * 255, shave)
        if "mse_rgb" in names:
            out.append(Metric("mse_rgb", float(np.mean((rs - rh) ** 2)), "rgb", shave, "hr", "MSE, " + proto_rgb))
        if "psnr_rgb" in names:
            out.append(Metric("psnr_rgb", psnr(rs, rh), "rgb", shave, "hr", "PSNR peak 255, " + proto_rgb))
        if "ssim_rgb" in names:
            out.append(
                Metric(
                    "ssim_rgb",
                    ssim(rs, rh, channel_axis=2),
                    "rgb",
                    shave,
                    "hr",
                    "SSIM Wang 11x11 s1.5 per channel, mean, " + proto_rgb,
                )
            )
    return out


def lr_consistency(sr: np.ndarray, lr: np.ndarray, names: tuple[str, ...]) -> list[Metric]:
    """Downscale ``sr`` to ``lr``'s size (MATLAB bicubic) and compare on Y: how faithful the output is to its input."""
    from models.resize import imresize

    back = np.clip(imresize(sr, (lr.shape[1], lr.shape[0])), 0.0, 1.0)
    yb, yl = y_bt601(back), y_bt601(lr)
    proto = "BT.601 Y (16-235), output downscaled to the input with MATLAB bicubic, against the LR input, no shave"
    out = []
    if "lr_psnr_y" in names:
        out.append(Metric("lr_psnr_y", psnr(yb, yl), "y-bt601", 0, "lr-input", "PSNR peak 255, " + proto))
    if "lr_ssim_y" in names and min(lr.shape[:2]) >= 11:  # SSIM's 11 px Gaussian window must fit
        out.append(Metric("lr_ssim_y", ssim(yb, yl), "y-bt601", 0, "lr-input", "SSIM Wang 11x11 s1.5, " + proto))
    return out


class Brisque:
    """BRISQUE through ``cv2.quality`` with the LIVE model files from the weights folder.

    The model is read once (not on every call, as ``QualityBRISQUE_compute`` does). Safe for several threads.
    """

    def __init__(self, model_file: Path, range_file: Path) -> None:
        self._model, self._range = str(model_file), str(range_file)
        self._local = threading.local()  # one scorer per thread: a cv2 algorithm object is not shared safely

    def __call__(self, rgb: np.ndarray) -> Metric:
        """The score of RGB pixels: uint8, or float in [0, 1] (rounded to 8 bits, as BRISQUE's model expects)."""
        if rgb.dtype != np.uint8:
            rgb = np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        scorer = getattr(self._local, "scorer", None)
        if scorer is None:
            import cv2

            # cv2.quality is in opencv-contrib, which its type stubs leave out.
            scorer = self._local.scorer = cv2.quality.QualityBRISQUE_create(self._model, self._range)  # type: ignore[attr-defined]
        score = scorer.compute(bgr)[0]
        return Metric("brisque", float(score), "-", 0, "none", "BRISQUE (LIVE model, cv2.quality), lower is better")
