"""Classical interpolation as an upscaler: nearest, bilinear, bicubic (MATLAB's), lanczos and area.

These give any scale, including fractions, and run on the CPU whatever device a rule asks for. They need no tiling
(their memory is the output array). Float32 pixels are resized in float32. uint8 pixels go to ``cv2.resize`` as
they are, as a plain ``cv2.resize`` call would (OpenCV's 8-bit kernels use fixed-point weights, so this differs from
the quantised float result by at most one level); MATLAB's bicubic has no 8-bit kernel and goes through the shared
conversion (:func:`models.pixels.to_unit_float`, :func:`models.pixels.to_uint8`).
"""

from __future__ import annotations

import numpy as np

from models.base import FunctionUpscaler, Tiling
from models.catalog import ModelEntry
from models.registry import LoadContext
from models.resize import CV2_FILTERS, resize


def load(entry: ModelEntry, scale: float, ctx: LoadContext) -> FunctionUpscaler:
    """The filter ``entry.arch`` at ``scale`` (any positive number). Never raises: there is nothing to load."""
    import cv2

    method = entry.arch

    def run(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        return resize(rgb, (round(w * scale), round(h * scale)), method)

    def run_u8(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        return cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=CV2_FILTERS[method])

    return FunctionUpscaler(
        entry.id,
        "classical",
        scale,
        run,
        run_u8=run_u8 if method in CV2_FILTERS else None,
        device="cpu",
        precision="fp32",
        tiling=Tiling.INTERNAL,
    )
