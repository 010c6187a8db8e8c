"""Classical resampling kernels, each fixed and documented.

``imresize`` reproduces MATLAB's ``imresize(..., 'bicubic')``: a Keys cubic with a = -0.5, symmetric edge padding,
and antialiasing on a downscale (the kernel is widened by 1/scale). The super-resolution papers made their LR
images and their bicubic baselines with it, so the benchmark protocol depends on this exact kernel.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
from scipy import sparse


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


def _contributions(in_len: int, out_len: int, scale: float, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weights (out_len, taps) and source indices (out_len, taps) along one axis, as MATLAB computes them."""
    width = 4.0
    if scale < 1 and antialias:

        def kernel(x: np.ndarray) -> np.ndarray:
            return scale * _cubic(scale * x)

        width /= scale
    else:
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in input coordinates (1-based)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    weights = kernel(u[:, None] - idx)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])  # symmetric padding
    idx = mirror[np.mod(idx.astype(np.int64) - 1, mirror.size)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], idx[:, keep]


@functools.lru_cache(maxsize=64)
def _matrix(in_len: int, out_len: int, antialias: bool) -> sparse.csr_matrix:
    """The resize along one axis as a sparse (out_len, in_len) matrix of the kernel's weights (cached: a service
    resizes to the same sizes again and again)."""
    weights, idx = _contributions(in_len, out_len, out_len / in_len, antialias)
    rows = np.repeat(np.arange(out_len), weights.shape[1])
    m = sparse.csr_matrix((weights.ravel().astype(np.float32), (rows, idx.ravel())), shape=(out_len, in_len))
    m.sum_duplicates()  # symmetric padding can point two taps at one pixel
    return m


def _resize_axis(img: np.ndarray, axis: int, out_len: int, antialias: bool) -> np.ndarray:
    """One separable pass: a sparse matrix product over the axis (five times faster than a gather per tap)."""
    in_len = img.shape[axis]
    if in_len == out_len:
        return img
    m = _matrix(in_len, out_len, antialias)
    moved = np.moveaxis(img, axis, 0)
    rest = moved.shape[1:]
    flat = np.ascontiguousarray(moved).reshape(in_len, -1)
    out = np.asarray(m @ flat, dtype=np.float32).reshape((out_len, *rest))
    return np.moveaxis(out, 0, axis)


def imresize(img: np.ndarray, size: tuple[int, int], antialias: bool = True, levels: int | None = None) -> np.ndarray:
    """MATLAB-compatible bicubic resize of a float image (H, W) or (H, W, C) to ``size`` = (width, height).

    The axis that shrinks most is resized first, as MATLAB does. With ``levels`` (255 for 8-bit data) the
    result of each pass is rounded and clipped to that grid, which is what MATLAB does to integer images between
    its two passes; without it nothing is clipped.
    """
    out_w, out_h = size
    img = img.astype(np.float32, copy=False)
    sy, sx = out_h / img.shape[0], out_w / img.shape[1]
    order = [(0, out_h), (1, out_w)] if sy <= sx else [(1, out_w), (0, out_h)]
    for axis, length in order:
        img = _resize_axis(img, axis, length, antialias)
        if levels:
            img = np.rint(np.clip(img, 0.0, 1.0) * levels) / levels
    return img.astype(np.float32, copy=False)


CV2_FILTERS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "lanczos": cv2.INTER_LANCZOS4,
    "area": cv2.INTER_AREA,
    "cv2-cubic": cv2.INTER_CUBIC,
}


def resize(img: np.ndarray, size: tuple[int, int], method: str, levels: int | None = None) -> np.ndarray:
    """Resize float32 ``img`` to ``size`` = (width, height) with a named kernel.

    ``bicubic`` (and its alias ``matlab-bicubic``) is :func:`imresize` (``levels`` as there); the others are
    OpenCV's filters. The result is clipped to [0, 1] because cubic and Lanczos kernels overshoot.
    """
    if (img.shape[1], img.shape[0]) == tuple(size):
        return img
    if method in ("bicubic", "matlab-bicubic"):
        out = imresize(img, size, levels=levels)
    else:
        out = cv2.resize(img, size, interpolation=CV2_FILTERS[method])
        if img.ndim == 3 and out.ndim == 2:  # OpenCV drops a trailing channel axis of length 1
            out = out[:, :, None]
    return np.clip(out, 0.0, 1.0, out=out)


def finish_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The resize that takes a model's native scale to the rule's ``outscale``: Lanczos up, area down."""
    h, w = img.shape[:2]
    if (w, h) == tuple(size):
        return img
    return resize(img, size, "lanczos" if size[0] * size[1] > w * h else "area")
