"""The one tiler (models/tiling.py) as pure functions, exact against networks whose reach is known.

A per-pixel network (nearest-neighbour enlargement) has no receptive field beyond its own pixel, so any tiling with
any margin must reproduce a single pass exactly: it checks the plan and the assembly, never the margin. A box filter
has a known radius and is wrong at a window's border (its zero padding), so only a margin of at least that radius
reproduces a single pass, cut or cross-faded: it is the network the margin tests use. The out-of-memory tests
inject the failure a GPU would raise (a stand-in: no GPU here) into the window function, succeeding only below a
size.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import OutOfMemoryError, Retry
from models.tiling import Geometry, OomSplitter, blend_profile, plan_axis, run_tiled, smallest_tile


def nearest(scale: int):
    def run(window: np.ndarray, _origin=None) -> np.ndarray:
        return np.repeat(np.repeat(window, scale, axis=0), scale, axis=1)

    return run


def box(radius: int = 1, scale: int = 2):
    """A (2r+1)^2 box blur with zero padding (wrong at a window's border, right ``radius`` pixels in), then x2."""

    def run(window: np.ndarray, _origin=None) -> np.ndarray:
        k = 2 * radius + 1
        p = np.pad(window.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)))
        h, w = window.shape[:2]
        acc = sum(p[dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)) / (k * k)
        out = np.repeat(np.repeat(acc, scale, axis=0), scale, axis=1)
        return out.astype(window.dtype) if window.dtype != np.uint8 else np.rint(out).astype(np.uint8)

    return run


box3 = box(1)


@pytest.mark.parametrize("multiple", [1, 8])
def test_plans_cover_overlap_and_cross_fade_to_one(multiple):
    rng = np.random.default_rng(0)
    for _ in range(200):
        overlap = int(rng.integers(0, 48))
        tile = smallest_tile(overlap, multiple) + int(rng.integers(0, 300))
        length = int(rng.integers(1, 3000))
        spans = plan_axis(length, tile, overlap, multiple)
        assert spans[0][0] == 0 and spans[-1][1] == length
        for (s0, e0), (s1, e1) in zip(spans, spans[1:], strict=False):
            assert s1 % multiple == 0 and e0 - s1 >= overlap and s1 > s0 and e1 > e0
        assert len({e - s for s, e in spans}) == 1 or spans[-1][1] % multiple
        assert all(e - s <= max(tile, length if len(spans) == 1 else 0) + multiple for s, e in spans)
        scale = int(rng.integers(1, 5))
        for feather in (0, 1, 8):
            total = np.zeros(length * scale)
            for i, (s, e) in enumerate(spans):
                total[s * scale : e * scale] += blend_profile(spans, i, scale, 16, feather)
            np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_a_tile_too_small_for_its_overlap_is_refused_with_the_smallest_that_works():
    with pytest.raises(ValueError, match="use at least 48"):
        plan_axis(500, 40, 16)
    # The smallest tile that works: 500 px need ceil((500 - 16) / (48 - 16)) = 16 windows, and their size shrinks to
    # just fit, ceil((500 + 15 * 16) / 16) = 47, spread evenly from 0 to 500.
    spans = plan_axis(500, 48, 16)
    assert len(spans) == 16 and {e - s for s, e in spans} == {47}, spans
    assert spans[0] == (0, 47) and spans[-1] == (453, 500), spans
    assert all(e0 - s1 >= 16 for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False)), spans
    with pytest.raises(ValueError, match="length 0"):
        plan_axis(0, 64, 8)


def test_geometry_names_one_margin():
    g = Geometry(tile=128, margin=16, feather=8, multiple_of=8)
    assert g.overlap == 40 and g.smallest == smallest_tile(40, 8) == 120
    assert g.with_tile(256) == Geometry(256, 16, 8, 8)


@pytest.mark.parametrize("feather", [0, 8])
def test_tiling_a_per_pixel_network_is_exact(feather):
    img = np.random.default_rng(1).random((157, 203, 3), dtype=np.float32)
    calls = []

    def run(window: np.ndarray, origin) -> np.ndarray:
        calls.append((window.copy(), origin))
        return nearest(3)(window)

    out = run_tiled(run, img, 3, Geometry(96, 8, feather))
    assert len(calls) > 4 and all(max(w.shape[:2]) <= 96 for w, _ in calls)
    # Every window is the part of the image at the origin it is told, and together they cover it.
    covered = np.zeros(img.shape[:2], bool)
    for window, (y, x) in calls:
        h, w = window.shape[:2]
        assert 0 <= y and y + h <= 157 and 0 <= x and x + w <= 203, (y, x, window.shape)
        np.testing.assert_array_equal(window, img[y : y + h, x : x + w], err_msg=f"window told origin {(y, x)}")
        covered[y : y + h, x : x + w] = True
    assert covered.all() and calls[0][1] == (0, 0)
    if feather == 0:
        np.testing.assert_array_equal(out, nearest(3)(img))  # copied, not blended: bit-exact
    else:
        np.testing.assert_allclose(out, nearest(3)(img), atol=1e-6)


def test_a_hard_cut_with_a_margin_at_the_receptive_field_gives_the_same_bytes():
    """uint8 windows stay uint8, and a margin of the network's radius gives exactly the single pass."""
    img = np.random.default_rng(2).integers(0, 256, (90, 131, 3), dtype=np.uint8)
    whole = box3(img)
    tiled = run_tiled(box3, img, 2, Geometry(40, margin=1))
    assert tiled.dtype == np.uint8
    np.testing.assert_array_equal(tiled, whole)
    # Without the margin the windows' zero padding shows at every cut.
    no_margin = run_tiled(box3, img, 2, Geometry(40, margin=0))
    assert (no_margin != whole).any()


@pytest.mark.parametrize("radius", [1, 3])
def test_a_cross_fade_with_a_margin_at_the_receptive_field_gives_the_single_pass(radius):
    """With a feather, every output pixel with weight is at least ``margin`` input pixels from its window's inner
    edge: a network that reads its neighbourhood (and pads a window's border with zeros) then gives the single
    pass's values everywhere, cross-faded or not. A margin below its reach lets the padded border show."""
    img = np.random.default_rng(5).random((83, 121, 3), dtype=np.float32)
    net = box(radius)
    whole = net(img)
    for feather in (1, 6):
        tiled = run_tiled(net, img, 2, Geometry(48, margin=radius, feather=feather))
        assert tiled.shape == whole.shape
        err = np.abs(tiled - whole).max()
        assert err < 1e-5, f"margin {radius} = the network's reach, feather {feather}: off the single pass by {err}"
    short = run_tiled(net, img, 2, Geometry(48, margin=radius - 1, feather=6))
    assert np.abs(short - whole).max() > 0.01, "a margin below the reach must show the windows' zero padding"


def test_uint8_windows_that_cross_fade_are_rounded_back_to_uint8():
    """uint8 windows are blended as their values and rounded back one row of windows at a time: with a network that
    reads its neighbourhood and a margin at its reach, within one level of the single pass."""
    img = np.random.default_rng(3).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    out = run_tiled(box3, img, 2, Geometry(36, 1, 4))
    assert out.dtype == np.uint8 and out.shape == (140, 180, 3)
    diff = np.abs(out.astype(int) - box3(img).astype(int))
    assert diff.max() <= 1, f"cross-faded uint8 windows are off the single pass by up to {diff.max()} levels"
    np.testing.assert_array_equal(run_tiled(nearest(2), img, 2, Geometry(36, 4, 4)), nearest(2)(img))


def test_the_origin_of_each_window_is_offset_by_the_origin_of_the_image():
    img = np.zeros((50, 50, 1), np.float32)
    seen = []
    run_tiled(lambda w, o: seen.append(o) or nearest(1)(w), img, 1, Geometry(24, 2), origin=(100, 200))
    starts = [s for s, _ in plan_axis(50, 24, 4)]
    assert seen == [(100 + y, 200 + x) for y in starts for x in starts], seen  # raster order, offset by the origin


def test_a_wrong_output_shape_is_an_error_that_says_what_was_expected():
    with pytest.raises(ValueError, match=r"30x30 window at x2; expected \(60, 60\)"):
        run_tiled(lambda w, o: w, np.zeros((80, 80, 3), np.float32), 2, Geometry(32, 2))


def quarter_overlap(side: int) -> Geometry:
    """The diffusion backend's geometry: a quarter of the window overlaps, so the overlap shrinks with the window."""
    overlap = max(4, -(-(side // 4) // 4) * 4)
    return Geometry(side, overlap // 4, overlap - 2 * (overlap // 4), 4)


def oom_above(limit: int, run):
    """Stands in for a GPU that runs out of memory on windows larger than ``limit`` px per side."""
    seen: list[tuple[int, int]] = []

    def window(w: np.ndarray, origin) -> np.ndarray:
        seen.append(w.shape[:2])
        if max(w.shape[:2]) > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")
        return run(w, origin)

    return window, seen


def test_issue_17_item_1_a_quarter_overlap_window_splits_with_the_halves_own_geometry():
    """Stand-in for a GPU OOM: windows above 40 px fail; a 128 px window must split (twice) and then succeed."""
    img = np.random.default_rng(4).random((128, 128, 3), dtype=np.float32)
    window, seen = oom_above(40, nearest(4))
    splitter = OomSplitter(quarter_overlap, lambda e: "out of memory" in str(e))
    out = run_tiled(lambda w, o: splitter.run(window, w, o, 4), img, 4, quarter_overlap(128))
    np.testing.assert_allclose(out, nearest(4)(img), atol=1e-6)
    assert splitter.splits >= 2 and splitter.cap is not None and splitter.cap <= 40
    assert seen[0] == (128, 128) and max(max(s) for s in seen[1:]) < 128
    # With the failed window's geometry (a 32 px overlap), no half of it could have been planned at all.
    assert quarter_overlap(128).smallest > 64


def test_a_window_that_cannot_shrink_further_is_a_retryable_error_that_says_why():
    window, _ = oom_above(0, nearest(2))  # every window fails
    splitter = OomSplitter(lambda side: Geometry(side, 16, 8), lambda e: "out of memory" in str(e))
    with pytest.raises(OutOfMemoryError) as err:
        splitter.run(window, np.zeros((200, 150, 3), np.float32), (0, 0), 2)
    assert err.value.retry is Retry.BACKOFF
    text = str(err.value)
    assert "cannot be split further" in text and "at least 120 px" in text and "stand-in" in text
    assert splitter.splits == 1  # 200 -> 120 once, then 120 could not shrink


def test_errors_that_are_not_out_of_memory_pass_through_untouched():
    splitter = OomSplitter(lambda side: Geometry(side, 2), lambda e: "out of memory" in str(e))

    def broken(_w, _o):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        splitter.run(broken, np.zeros((64, 64, 3), np.float32), (0, 0), 2)
    assert splitter.splits == 0 and splitter.cap is None


def test_each_window_reports_its_progress_to_whoever_listens():
    """Every window is a sign of life (the watchdog's per-tile beat, ``tile 3/12`` in STATUS=): ``run_tiled``
    reports each window as it is done, to the sink of the calling context, and to nobody outside one."""
    from models.progress import reporting

    img = np.zeros((50, 70, 3), np.float32)
    heard: list[tuple[int, int, str]] = []
    with reporting(lambda done, total, unit="tile": heard.append((done, total, unit))):
        run_tiled(nearest(2), img, 2, Geometry(24, 2))
    n = len(plan_axis(50, 24, 4)) * len(plan_axis(70, 24, 4))
    assert heard == [(i, n, "tile") for i in range(1, n + 1)], heard
    run_tiled(nearest(2), img, 2, Geometry(24, 2))  # no listener: nothing to report to, nothing raised
    assert len(heard) == n
