"""Pixel arrays: their channels and their sample types, one definition each for the models and the service.

An image's pixels are (H, W, C) with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA), in their integer type
(uint8 or uint16) as decoded, or float32 in [0, 1] on the float path. The models take RGB (C = 3) as uint8 or
float32 (:mod:`models.base`). Here because both sides need them and ``models/`` never imports ``daemon/``.
"""

from __future__ import annotations

import numpy as np

from models.errors import UnsupportedImageError


def colour_of(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB of ``pixels`` (C = 1..4) in their dtype: grey repeated to three channels, alpha left out."""
    if pixels.shape[2] in (1, 2):
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    return pixels[:, :, :3] if pixels.shape[2] == 4 else pixels


def alpha_of(pixels: np.ndarray) -> np.ndarray | None:
    """(H, W) alpha of ``pixels`` in their dtype, or None when C is 1 or 3."""
    return pixels[:, :, -1] if pixels.shape[2] in (2, 4) else None


def to_unit_float(samples: np.ndarray) -> np.ndarray:
    """Samples as float32 in [0, 1]: uint8 as ``x / 255`` and uint16 as ``x / 65535`` in float32 (the division
    every plain loop writes), float32 as it is (no copy).

    Raises:
        UnsupportedImageError: another dtype (float64, int32, ...): the caller has a bug, and no guess is made.
    """
    if samples.dtype == np.uint8:
        return samples.astype(np.float32) / np.float32(255.0)
    if samples.dtype == np.uint16:
        return samples.astype(np.float32) / np.float32(65535.0)
    if samples.dtype == np.float32:
        return samples
    raise UnsupportedImageError(f"expected uint8, uint16 or float32 samples, got {samples.dtype}")


def to_uint8(values: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8: ``rint(clip(y, 0, 1) * 255)``, round half to even (as ``torch.round``)."""
    out: np.ndarray = np.clip(values, 0.0, 1.0) * np.float32(255.0)
    np.rint(out, out=out)
    return out.astype(np.uint8)
