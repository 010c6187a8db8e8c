"""models/pixels.py: the channels of a pixel array and its sample types, shared by the models and the service."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import UnsupportedImageError
from models.pixels import alpha_of, colour_of, to_unit_float


def test_colour_and_alpha_of_every_layout():
    grey = np.arange(6, dtype=np.uint16).reshape(2, 3, 1)
    assert colour_of(grey).shape == (2, 3, 3) and (colour_of(grey) == grey).all() and alpha_of(grey) is None
    grey_alpha = np.dstack([grey, grey + 100]).astype(np.uint16)
    assert (colour_of(grey_alpha)[:, :, 2] == grey[:, :, 0]).all()
    assert (alpha_of(grey_alpha) == grey[:, :, 0] + 100).all()
    rgba = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert (colour_of(rgba) == rgba[:, :, :3]).all() and (alpha_of(rgba) == rgba[:, :, 3]).all()
    rgb = rgba[:, :, :3].copy()
    assert colour_of(rgb) is rgb and alpha_of(rgb) is None


def test_to_unit_float_scales_each_integer_type_by_its_own_peak():
    assert to_unit_float(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    deep = to_unit_float(np.array([0, 257, 65535], np.uint16))
    assert deep.dtype == np.float32 and deep.tolist() == [0.0, np.float32(257) / np.float32(65535), 1.0]
    already = np.array([0.25], np.float32)
    assert to_unit_float(already) is already  # the float path passes through, uncopied
    with pytest.raises(UnsupportedImageError, match="expected uint8, uint16 or float32 samples, got float64"):
        to_unit_float(np.array([0.25]))
