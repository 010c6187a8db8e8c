"""Seamless tiling as small pure functions: plan the windows, weight them, run them one at a time.

A network run on a window of the image gets its borders wrong (zero padding sees a black frame that is not in the
picture), so neighbouring windows overlap, and in each overlap the output is cross-faded from one window to the next:

    window i    ████████████████████▓▓▒▒░░  ←  weight 1, then a linear ramp to 0 in the middle of the overlap
    window i+1              ░░▒▒▓▓██████████████████

The ramp sits in the *middle* of the overlap, ``margin`` input pixels away from either window's edge, so neither
window's unreliable border pixels get any weight, and the cross-fade hides whatever difference remains. The two
ramps of an overlap are complementary, so the weights sum to exactly one everywhere and no weight map is needed:
each window's output is multiplied by a separable (row profile x column profile) weight and added into the result.
At the image's own edges a window keeps weight one, as a single pass would see the same border there.

Only one window is in flight at a time, so memory is bounded by the output array plus one window's activations.
:func:`split_on_oom` wraps a window runner so that a window that runs out of memory is itself tiled with windows half
the size, recursively, down to a floor below which :class:`~models.errors.OutOfMemoryError` is raised for the worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from models.errors import OutOfMemoryError
from models.progress import report

RunFn = Callable[[np.ndarray], np.ndarray]
Span = tuple[int, int]  # [start, end) along one axis, in input pixels


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
        raise ValueError(f"a tile of {tile} px is too small for an overlap of {overlap} px on a {m} px grid; use at "
                         f"least {smallest_tile(overlap, m)}")
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


def blend_profile(spans: list[Span], index: int, scale: float, margin: int) -> np.ndarray:
    """The weight of window ``index`` along its axis, one value per *output* pixel of the window.

    Weight is 1 except towards a neighbour: there it ramps linearly to 0 across the middle of the overlap, leaving
    ``margin`` input pixels (fewer if the overlap is too small for that) unweighted next to the window's edge. A
    window's falling ramp and its neighbour's rising ramp cover the same pixels and sum to 1, provided no three windows
    overlap, which :func:`plan_axis` guarantees by keeping tiles at least three overlaps long.
    """
    start, end = spans[index]
    n_out = round((end - start) * scale)
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) / scale + start  # output pixel centres, in input coordinates
    weight = np.ones(n_out, np.float64)
    if index > 0:
        ov0, ov1 = start, spans[index - 1][1]  # overlap with the left neighbour
        weight = np.minimum(weight, _ramp(pos, ov0, ov1, margin))
    if index < len(spans) - 1:
        ov0, ov1 = spans[index + 1][0], end  # overlap with the right neighbour
        weight = np.minimum(weight, 1.0 - _ramp(pos, ov0, ov1, margin))
    return weight.astype(np.float32)


def _ramp(pos: np.ndarray, ov0: int, ov1: int, margin: int) -> np.ndarray:
    """0 before the band, linear 0 -> 1 across it, 1 after; the band is the overlap less ``margin`` at each end."""
    m = min(margin, max(0, (ov1 - ov0 - 1) // 2))
    b0, b1 = ov0 + m, ov1 - m
    if b1 <= b0:  # no band to fade across (a one-pixel overlap): a step at b0
        return (pos >= b0).astype(np.float64)
    return np.clip((pos - b0) / (b1 - b0), 0.0, 1.0)


def run_blended(run: RunFn, img: np.ndarray, scale: float, tile: int, overlap: int, margin: int,
                multiple_of: int = 1) -> np.ndarray:
    """Run ``run`` over overlapping windows of ``img`` (H, W, C) and cross-fade the results into one array.

    ``run`` maps a window (h, w, C) to its upscaled output (round(h * scale), round(w * scale), C'). Windows go to
    ``run`` one at a time, in raster order. With ``margin`` at least the distance over which the network's border
    effects reach, the result matches a single pass to within rounding, and no seam can show.

    Raises:
        ValueError: the tile cannot hold the overlap (see :func:`plan_axis`), or ``run`` returned the wrong shape.
        Whatever ``run`` raises.
    """
    h, w = img.shape[:2]
    rows = plan_axis(h, tile, overlap, multiple_of)
    cols = plan_axis(w, tile, overlap, multiple_of)
    if len(rows) == 1 and len(cols) == 1:
        return run(img)
    out: np.ndarray | None = None
    col_weights = [blend_profile(cols, j, scale, margin) for j in range(len(cols))]
    total = len(rows) * len(cols)
    for i, (y0, y1) in enumerate(rows):
        row_weight = blend_profile(rows, i, scale, margin)[:, None, None]
        for j, (x0, x1) in enumerate(cols):
            piece = run(np.ascontiguousarray(img[y0:y1, x0:x1]))
            oy0, ox0 = round(y0 * scale), round(x0 * scale)
            want = (round(y1 * scale) - oy0, round(x1 * scale) - ox0)
            if piece.shape[:2] != want:
                raise ValueError(f"the model returned {piece.shape[:2]} for a {y1 - y0}x{x1 - x0} window at "
                                 f"x{scale:g}; expected {want}")
            if out is None:  # allocated on the first window, once the output's channel count is known
                out = np.zeros((round(h * scale), round(w * scale), piece.shape[2]), np.float32)
            piece *= row_weight
            piece *= col_weights[j][None, :, None]
            out[oy0 : oy0 + want[0], ox0 : ox0 + want[1]] += piece
            report(i * len(cols) + j + 1, total)
    assert out is not None
    return out


def is_torch_oom(exc: BaseException, torch: Any) -> bool:
    """True when ``exc`` is an out-of-memory error from torch, on CUDA or the CPU."""
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    # CUDA says "out of memory"; the CPU allocator says "can't allocate memory".
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class OomSplitting:
    """For a torch upscaler that runs :func:`split_on_oom`: recognise out-of-memory errors, and on a split count it,
    remember the smaller window for later calls, and free CUDA's cache before the halves allocate.

    The class using it provides ``splits``, ``_tile_cap``, ``_torch`` and ``device``.
    """

    splits: int
    _tile_cap: int | None
    _torch: Any
    device: str

    def _is_oom(self, exc: BaseException) -> bool:
        return is_torch_oom(exc, self._torch)

    def _on_split(self, _old: int, new: int) -> None:
        self.splits += 1
        self._tile_cap = new if self._tile_cap is None else min(self._tile_cap, new)
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def split_on_oom(run: RunFn, scale: float, overlap: int, margin: int, min_tile: int,
                 is_oom: Callable[[BaseException], bool], multiple_of: int = 1,
                 on_split: Callable[[int, int], None] | None = None) -> RunFn:
    """Wrap ``run`` so that a window that runs out of memory is redone as smaller blended windows.

    On an error for which ``is_oom`` is true, the window is split with :func:`run_blended` at half its longer side
    (each half-window guarded the same way, so the split recurses). ``on_split(old_side, new_side)`` is called
    first, which is where a backend frees its allocator cache and remembers the smaller size.

    Raises:
        OutOfMemoryError: a window no larger than ``min_tile`` still ran out of memory.
        Whatever else ``run`` raises.
    """

    def guarded(window: np.ndarray) -> np.ndarray:
        try:
            return run(window)
        except Exception as exc:  # noqa: BLE001 - filtered by is_oom just below
            if not is_oom(exc):
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Outside the except block, so the failed attempt's frames (and the device memory they hold) are released
        # before the retry allocates.
        side = max(window.shape[:2])
        half = -(-side // 2)
        if side <= min_tile or half >= side or half < smallest_tile(overlap, multiple_of):
            raise OutOfMemoryError(f"out of memory on a {window.shape[1]}x{window.shape[0]} tile, the smallest allowed "
                              f"(min {min_tile} px): {message}")
        if on_split is not None:
            on_split(side, half)
        return run_blended(guarded, window, scale, half, overlap, margin, multiple_of)

    return guarded
