"""Classical interpolation as an upscaler: nearest, bilinear, bicubic (MATLAB's), lanczos and area.

These give any scale, including fractions, and run on the CPU whatever device a rule asks for. They are exact per
pixel and need no tiling (their memory is the output array), and they compute in float32: uint8 pixels go through
the shared conversion (:func:`models.base.to_float`, :func:`models.base.to_uint8`).
"""

from __future__ import annotations

import numpy as np

from models.base import FunctionUpscaler, Tiling
from models.catalog import ModelEntry
from models.registry import LoadContext
from models.resize import resize


def load(entry: ModelEntry, scale: float, ctx: LoadContext) -> FunctionUpscaler:
    """The filter ``entry.arch`` at ``scale`` (any positive number). Never raises: there is nothing to load."""
    method = entry.arch

    def run(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        return resize(rgb, (round(w * scale), round(h * scale)), method)

    return FunctionUpscaler(entry.id, "classical", scale, run, device="cpu", precision="fp32",
                            tiling=Tiling.INTERNAL)
