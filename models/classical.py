"""Classical interpolation as an upscaler: nearest, bilinear, bicubic (MATLAB's), lanczos and area.

These give any scale, including fractions, and run on the CPU whatever device a rule asks for.
"""

from __future__ import annotations

import numpy as np

from models.base import Tiling, Upscaler
from models.catalog import ModelEntry
from models.registry import LoadContext
from models.resize import resize


def load(entry: ModelEntry, scale: float, ctx: LoadContext) -> Upscaler:
    method = entry.arch

    def run(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        return resize(rgb, (round(w * scale), round(h * scale)), method)

    # Resampling is exact per pixel and needs no tiling; its memory is only the output array.
    return Upscaler(model_id=entry.id, backend="classical", scale=scale, run=run, device="cpu",
                    precision="fp32", tiling=Tiling.INTERNAL)
