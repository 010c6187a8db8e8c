"""The one tiler: plan the windows, weight them, run them one at a time, and split a window that runs out of memory.

A network run on a window of the image gets the window's borders wrong (zero padding sees a black frame that is not
in the picture), so neighbouring windows overlap. A :class:`Geometry` says how:

- ``margin``: the context, in input pixels, that a window carries beyond what is kept of it. Output next to a
  window's inner edge, ``margin`` input pixels deep, is never used. This is Real-ESRGAN's ``tile_pad``, and it is the
  only meaning the word has here: with a margin at least the network's receptive-field radius, every output pixel
  that is used is computed from exactly the input a single pass would see.
- ``feather``: the width of the cross-fade between two neighbours, beyond the two margins. 0 is a hard cut in the
  middle of the overlap: every output pixel then comes from exactly one window, with weight exactly 1, and a network
  with a finite receptive field gives the same bytes tiled as in one pass (uint8 windows are copied, never blended).
  Models whose windows cannot agree exactly (attention over a whole window, diffusion) cross-fade instead, and the
  fade hides what difference remains::

    window i    ████████████████████▓▓▒▒░░··   ← weight 1, a linear ramp to 0 across the feather, 0 in the margin
    window i+1              ··░░▒▒▓▓████████████████████

- ``tile``: the window side, context included; ``multiple_of``: the grid the windows start on (a model that pads to
  multiples of 8 must see the same patch grid in every window as in one pass).

The two ramps of an overlap are complementary, so the weights sum to exactly one everywhere and no weight map is
needed. At the image's own edges a window keeps weight one, as a single pass would see the same border there.

Only one window is in flight at a time, so memory is bounded by the output array plus one window's activations.
:class:`OomSplitter` redoes a window that runs out of memory as smaller windows, each half with its own geometry,
recursively, down to the geometry's smallest window, and remembers the smaller size for later calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.errors import OutOfMemoryError
from models.progress import report

Origin = tuple[int, int]  # (row, column) of a window's first pixel in the whole image, in input pixels
# One window: its pixels (h, w, C) and its origin in the whole image -> its output (round(h*s), round(w*s), C').
WindowFn = Callable[[np.ndarray, Origin], np.ndarray]
Span = tuple[int, int]  # [start, end) along one axis, in input pixels


@dataclass(frozen=True)
class Geometry:
    """How an image is cut into windows (see the module docstring). All lengths in input pixels."""

    tile: int
    margin: int = 0
    feather: int = 0
    multiple_of: int = 1

    @property
    def overlap(self) -> int:
        """Input pixels two neighbouring windows share, at least."""
        return 2 * self.margin + self.feather

    @property
    def smallest(self) -> int:
        """The smallest window side this geometry can plan (three overlaps, on the grid)."""
        return smallest_tile(self.overlap, self.multiple_of)

    def with_tile(self, tile: int) -> Geometry:
        return Geometry(tile, self.margin, self.feather, self.multiple_of)


def plan_axis(length: int, tile: int, overlap: int, multiple_of: int = 1) -> list[Span]:
    """Windows along one axis: equal sizes of at most about ``tile``, neighbours sharing at least ``overlap`` pixels.

    The window count is the smallest that covers ``length`` with that overlap, and the window size is then shrunk to
    just fit, so no work is wasted on a needlessly large overlap. Windows start and (but for a ragged last one) end on
    the grid of ``multiple_of``: a model with that size requirement (DITN's 8 px patches, a Swin window) then sees the
    same patch grid in every window as in a single pass, which it needs to give the same pixels. Pad ``length`` to a
    multiple first to avoid the ragged window. Sizes are rounded up to the grid, which may take them a little past
    ``tile``. Windows are spread evenly and the last one ends at ``length``.

    Raises:
        ValueError: ``tile`` is smaller than ``3 * overlap`` (windows would overlap three deep, and the cross-fade
            weights would no longer sum to one), or ``length`` < 1.
    """
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}")
    # Plan in grid units: every start, size and overlap is then a whole number of grid cells.
    m = max(1, multiple_of)
    units, tile_u, overlap_u = -(-length // m), tile // m, -(-overlap // m)
    if tile_u < 3 * overlap_u or tile_u < 1:
        raise ValueError(
            f"a tile of {tile} px is too small for an overlap of {overlap} px on a {m} px grid; use at "
            f"least {smallest_tile(overlap, m)}"
        )
    if units <= tile_u:
        return [(0, length)]
    n = math.ceil((units - overlap_u) / (tile_u - overlap_u))
    size = math.ceil((units + (n - 1) * overlap_u) / n)
    # n windows of `size` spread evenly overlap by size - ceil(stride) >= overlap_u, since size - overlap_u >= stride.
    starts = [i * (units - size) // (n - 1) for i in range(n)] if n > 1 else [0]
    return [(s * m, min(length, (s + size) * m)) for s in starts]


def smallest_tile(overlap: int, multiple_of: int = 1) -> int:
    """The smallest tile :func:`plan_axis` accepts for this overlap and grid."""
    m = max(1, multiple_of)
    return max(1, 3 * -(-overlap // m)) * m


def blend_profile(spans: list[Span], index: int, scale: float, margin: int, feather: int = 1) -> np.ndarray:
    """The weight of window ``index`` along its axis, one value per *output* pixel of the window.

    Weight is 1 except towards a neighbour. With ``feather`` > 0 it ramps linearly to 0 across the middle of the
    overlap, leaving ``margin`` input pixels (fewer if the overlap is too small for that) unweighted next to the
    window's edge. With ``feather`` == 0 it steps from 1 to 0 in the middle of the overlap. A window's falling edge and
    its neighbour's rising edge cover the same pixels and sum to exactly 1, provided no three windows overlap, which
    :func:`plan_axis` guarantees by keeping tiles at least three overlaps long.
    """
    start, end = spans[index]
    n_out = round((end - start) * scale)
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) / scale + start  # output pixel centres, in input coordinates
    weight = np.ones(n_out, np.float64)
    if index > 0:
        ov0, ov1 = start, spans[index - 1][1]  # overlap with the left neighbour
        weight = np.minimum(weight, _ramp(pos, ov0, ov1, margin, feather))
    if index < len(spans) - 1:
        ov0, ov1 = spans[index + 1][0], end  # overlap with the right neighbour
        weight = np.minimum(weight, 1.0 - _ramp(pos, ov0, ov1, margin, feather))
    return weight.astype(np.float32)


def _ramp(pos: np.ndarray, ov0: int, ov1: int, margin: int, feather: int) -> np.ndarray:
    """0 before the band, linear 0 -> 1 across it, 1 after; the band is the overlap less ``margin`` at each end.
    Without a feather (or without room for a band) it is a step in the middle of the overlap."""
    if feather <= 0:
        return (pos >= (ov0 + ov1) / 2).astype(np.float64)
    m = min(margin, max(0, (ov1 - ov0 - 1) // 2))
    b0, b1 = ov0 + m, ov1 - m
    if b1 <= b0:  # no band to fade across (a one-pixel overlap): a step at b0
        return (pos >= b0).astype(np.float64)
    return np.clip((pos - b0) / (b1 - b0), 0.0, 1.0)


def _cores(spans: list[Span], scale: float) -> list[tuple[int, int]]:
    """For a hard cut: the output range [lo, hi) that each window owns, in whole-image output pixels.

    A window owns the output pixels whose centres lie between the middles of its overlaps with its neighbours, the
    same test :func:`blend_profile` makes with ``feather`` 0, so that both agree.
    """
    n_out = round(spans[-1][1] * scale)
    bounds = [0]
    for (_s0, e0), (s1, _e1) in zip(spans, spans[1:], strict=False):
        cut = (s1 + e0) / 2  # the middle of the overlap, in input coordinates
        bounds.append(max(bounds[-1], min(n_out, math.ceil(cut * scale - 0.5))))  # first centre at or after it
    bounds.append(n_out)
    return list(zip(bounds, bounds[1:], strict=False))


def run_tiled(run: WindowFn, img: np.ndarray, scale: float, geometry: Geometry, origin: Origin = (0, 0)) -> np.ndarray:
    """Run ``run`` over the windows of ``img`` (H, W, C) that ``geometry`` plans, and put the results together.

    ``run(window, origin)`` maps a window to its upscaled output (round(h * scale), round(w * scale), C'), and is told
    where the window sits in the whole image (``origin`` plus its place in ``img``), which position-keyed noise needs.
    Windows go to ``run`` one at a time, in raster order, and progress is reported per window (unit ``tile``).

    Without a feather each output pixel is copied from the one window that owns it: the result has the windows'
    dtype (uint8 stays uint8) and is bit-exact where the margin covers the network's reach. With a feather the
    windows are cross-faded in float32; uint8 windows are blended as their values and rounded back to uint8 one row
    of windows at a time (so no float copy of the whole output is ever held), which in the cross-fade bands may
    differ by one level from blending them before they were quantised.

    Raises:
        ValueError: the tile cannot hold the overlap (see :func:`plan_axis`), or ``run`` returned the wrong shape.
        Whatever ``run`` raises.
    """
    h, w = img.shape[:2]
    g = geometry
    rows = plan_axis(h, g.tile, g.overlap, g.multiple_of)
    cols = plan_axis(w, g.tile, g.overlap, g.multiple_of)
    if len(rows) == 1 and len(cols) == 1:
        return run(img, origin)
    out_h, out_w = round(h * scale), round(w * scale)
    hard = g.feather <= 0
    if hard:
        row_cores, col_cores = _cores(rows, scale), _cores(cols, scale)
    else:
        col_weights = [blend_profile(cols, j, scale, g.margin, g.feather) for j in range(len(cols))]
    out: np.ndarray | None = None
    band: np.ndarray | None = None  # uint8 blending: the float32 rows not yet final, from output row band_at
    band_at = 0
    total = len(rows) * len(cols)
    for i, (y0, y1) in enumerate(rows):
        oy0, oy1 = round(y0 * scale), round(y1 * scale)
        if band is not None:  # rows above this window row are final: round them into the output, keep the rest
            final = oy0 - band_at
            assert out is not None  # made by the first window, before any band
            out[band_at:oy0] = np.rint(band[:final])
            band = np.concatenate(
                [band[final:], np.zeros((oy1 - oy0 - (band.shape[0] - final),) + band.shape[1:], np.float32)]
            )
            band_at = oy0
        if not hard:
            row_weight = blend_profile(rows, i, scale, g.margin, g.feather)[:, None, None]
        for j, (x0, x1) in enumerate(cols):
            piece = run(np.ascontiguousarray(img[y0:y1, x0:x1]), (origin[0] + y0, origin[1] + x0))
            ox0 = round(x0 * scale)
            want = (oy1 - oy0, round(x1 * scale) - ox0)
            if piece.shape[:2] != want:
                raise ValueError(
                    f"the model returned {piece.shape[:2]} for a {y1 - y0}x{x1 - x0} window at "
                    f"x{scale:g}; expected {want}"
                )
            if out is None:  # allocated on the first window, once the output's channels and dtype are known
                shape = (out_h, out_w, piece.shape[2])
                if hard or piece.dtype == np.uint8:
                    out = np.empty(shape, piece.dtype)
                    if not hard:
                        band, band_at = np.zeros((want[0], out_w, piece.shape[2]), np.float32), oy0
                else:
                    out = np.zeros(shape, np.float32)
            if hard:
                (ra, rb), (ca, cb) = row_cores[i], col_cores[j]
                out[ra:rb, ca:cb] = piece[ra - oy0 : rb - oy0, ca - ox0 : cb - ox0]
            else:
                weighted = piece.astype(np.float32, copy=False) * row_weight
                weighted *= col_weights[j][None, :, None]
                target = out if band is None else band
                at = 0 if band is None else band_at
                target[oy0 - at : oy0 - at + want[0], ox0 : ox0 + want[1]] += weighted
            report(i * len(cols) + j + 1, total)
    assert out is not None
    if band is not None:
        out[band_at:] = np.rint(band[: out_h - band_at])
    return out


class OomSplitter:
    """Redo a window that runs out of memory as smaller windows, and remember the smaller size.

    A backend owns one per loaded model and runs every window through :meth:`run`. On an error that ``is_oom``
    recognises, the window is cut into windows half its longer side (or the smallest its geometry allows, if that is
    larger), planned with ``geometry_for(new_side)``: each smaller window gets the overlap that *its* size needs, not
    the failed window's, so that a geometry that scales with the window (diffusion's quarter overlap) can still split.
    Each smaller window is guarded the same way, so the split recurses. Before the retry, ``on_split`` runs (a backend
    frees its allocator cache there), and :attr:`cap` remembers the smaller side, which later calls read to start
    small. :attr:`splits` counts the splits over the model's life.
    """

    def __init__(
        self,
        geometry_for: Callable[[int], Geometry],
        is_oom: Callable[[BaseException], bool],
        on_split: Callable[[], None] | None = None,
    ) -> None:
        self.geometry_for = geometry_for
        self.is_oom = is_oom
        self.on_split = on_split
        self.cap: int | None = None
        self.splits = 0

    def run(self, run: WindowFn, window: np.ndarray, origin: Origin, scale: float) -> np.ndarray:
        """``run(window, origin)``, split on out-of-memory.

        Raises:
            OutOfMemoryError: a window too small to split further still ran out of memory (retryable).
            Whatever else ``run`` raises.
        """
        try:
            return run(window, origin)
        except Exception as exc:  # noqa: BLE001 - filtered by is_oom just below
            if not self.is_oom(exc):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Outside the except block, so that the failed attempt's frames (and the device memory they hold) are
        # released before the retry allocates.
        h, w = window.shape[:2]
        side = max(h, w)
        half = -(-side // 2)
        geometry = self.geometry_for(half)
        new_side = max(half, geometry.smallest)
        geometry = self.geometry_for(new_side) if new_side != half else geometry
        if new_side >= side:
            raise OutOfMemoryError(
                f"out of memory on a {w}x{h} window, which cannot be split further: windows of this "
                f"model need at least {geometry.smallest} px per side: {message}"
            )
        self.splits += 1
        self.cap = new_side if self.cap is None else min(self.cap, new_side)
        if self.on_split is not None:
            self.on_split()
        return run_tiled(
            lambda win, org: self.run(run, win, org, scale), window, scale, geometry.with_tile(new_side), origin
        )
