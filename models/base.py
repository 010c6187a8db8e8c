"""The one call contract every backend returns: an :class:`Upscaler`.

An upscaler takes float32 RGB in [0, 1], shape (H, W, 3), and returns float32 RGB in [0, 1] of shape
(round(H * scale), round(W * scale), 3). The descriptor pads the input to the backend's size requirements, runs it
in overlapping tiles where the backend allows it, and crops the result, so callers never branch on the backend.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from models.errors import ImageTooSmallError, UnsupportedImageError
from models.progress import report

RunFn = Callable[[np.ndarray], np.ndarray]


class Tiling(enum.Enum):
    """How a backend feels about being run on tiles (spandrel's hint, same meaning)."""

    SUPPORTED = "supported"  # tiles with enough context give the same pixels as one pass
    DISCOURAGED = "discouraged"  # works, but the model uses global context; tile only when memory forces it
    INTERNAL = "internal"  # the backend tiles by itself; never tile from outside


@dataclass(frozen=True)
class SizeRequirements:
    minimum: int = 1  # smallest side the model accepts, in input pixels
    multiple_of: int = 1  # input sides are padded up to a multiple of this, and the output cropped back


@dataclass
class Upscaler:
    """A loaded model. Build it in a backend's ``load``; call it with an image."""

    model_id: str
    backend: str
    scale: float  # native scale: output side = round(input side * scale)
    run: RunFn  # the raw network: padded float32 RGB in, float32 RGB out, no tiling
    device: str = "cpu"
    precision: str = "fp32"
    tiling: Tiling = Tiling.SUPPORTED
    size: SizeRequirements = field(default_factory=SizeRequirements)
    tile: int | None = None  # input tile side; None runs the whole image at once
    tile_pad: int = 16  # context carried around each tile, in input pixels

    def check_input(self, rgb: np.ndarray) -> tuple[int, int]:
        """The contract every backend's call starts with. Returns (H, W).

        Raises:
            UnsupportedImageError: the array is not float32 RGB.
            ImageTooSmallError: a side is below the model's minimum.
        """
        if rgb.dtype != np.float32 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise UnsupportedImageError(f"expected float32 RGB of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        if min(h, w) < self.size.minimum:
            raise ImageTooSmallError(f"{self.model_id} needs at least {self.size.minimum} px per side, "
                                     f"the image is {w}x{h}")
        return h, w

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Upscale ``rgb`` (float32, (H, W, 3), [0, 1]).

        Raises:
            UnsupportedImageError: the array is not float32 RGB.
            ImageTooSmallError: a side is below the model's minimum.
        """
        h, w = self.check_input(rgb)
        out_h, out_w = round(h * self.scale), round(w * self.scale)
        padded = pad_to_multiple(rgb, self.size.multiple_of)
        if self.tile and self.tiling is Tiling.SUPPORTED and max(padded.shape[:2]) > self.tile:
            out = run_tiled(self.run, padded, self.scale, self.tile, self.tile_pad)
        else:
            out = self.run(padded)
        return np.clip(out[:out_h, :out_w], 0.0, 1.0).astype(np.float32, copy=False)


def pad_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the bottom and right edges so both sides are multiples of ``multiple``."""
    if multiple <= 1:
        return img
    h, w = img.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return img
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode)


def plan_tiles(length: int, tile: int, pad: int) -> list[tuple[int, int, int, int]]:
    """Split ``[0, length)`` into tiles of at most ``tile``, each read with up to ``pad`` pixels of context.

    Returns (core_start, core_end, read_start, read_end) for each tile. The cores cover the range exactly once.
    """
    spans = []
    for start in range(0, length, tile):
        end = min(start + tile, length)
        spans.append((start, end, max(0, start - pad), min(length, end + pad)))
    return spans


def run_tiled(run: RunFn, img: np.ndarray, scale: float, tile: int, pad: int) -> np.ndarray:
    """Run ``run`` over overlapping tiles and keep only each tile's core.

    With ``pad`` at least the network's receptive-field radius, the stitched result equals a single pass, so no
    seam can show. Only one tile is in flight at a time, which bounds memory.
    """
    h, w = img.shape[:2]
    out = np.empty((round(h * scale), round(w * scale), 3), np.float32)
    rows, cols = plan_tiles(h, tile, pad), plan_tiles(w, tile, pad)
    total, done = len(rows) * len(cols), 0
    for y0, y1, ry0, ry1 in rows:
        for x0, x1, rx0, rx1 in cols:
            piece = run(np.ascontiguousarray(img[ry0:ry1, rx0:rx1]))
            oy0, oy1 = round((y0 - ry0) * scale), round((y1 - ry0) * scale)
            ox0, ox1 = round((x0 - rx0) * scale), round((x1 - rx0) * scale)
            out[round(y0 * scale) : round(y1 * scale), round(x0 * scale) : round(x1 * scale)] = piece[
                oy0:oy1, ox0:ox1
            ]
            done += 1
            report(done, total)
    return out
