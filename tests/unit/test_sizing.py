"""Target sizes, passes and the final resize, as pure functions (daemon/sizing.py)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from daemon.sizing import TargetSize, apply_final, check_rule, final_filter, passes_for, plan, target_size


class FakeRule(TargetSize):
    """TargetSize mixed into a model that has outscale, as the lead's Rule will be."""

    outscale: float | None = None


@pytest.mark.parametrize(
    ("source", "keys", "want"),
    [
        ((1000, 500), dict(width=200), (200, 100)),  # the example: 200 wide, aspect kept
        ((1000, 500), dict(height=200), (400, 200)),
        ((1000, 500), dict(width=300, height=100), (200, 100)),  # inside both: the height binds
        ((500, 1000), dict(max_side=3840), (1920, 3840)),
        ((1000, 500), dict(max_side=3840), (3840, 1920)),
        ((640, 480), dict(width=3840), (3840, 2880)),
        ((333, 111), dict(width=100), (100, 33)),  # rounded, never above the bound
        ((3, 1000), dict(width=1), (1, 333)),
        ((1000, 3), dict(width=10), (10, 1)),  # never below one pixel
        ((1000, 500), dict(width=200, max_side=150), (150, 75)),
    ],
)
def test_inside_fits_every_bound_and_keeps_the_aspect(source, keys, want):
    got, crop = target_size(source, TargetSize(**keys))
    assert got == want and crop is None
    assert abs(got[0] / got[1] - source[0] / source[1]) <= max(1 / got[1], 1 / got[0]) * source[0] / source[1] + 1e-9


def test_cover_covers_the_box_then_crops_the_middle():
    t = TargetSize(width=1920, height=1080, fit="cover")
    scaled, crop = target_size((1000, 1000), t)
    assert scaled == (1920, 1920) and crop == (1920, 1080)
    p = plan((1000, 1000), 4, target=t)
    assert p.output == (1920, 1080) and p.crop == (0, 420, 1920, 1080)


def test_exact_stretches():
    p = plan((100, 100), 2, target=TargetSize(width=300, height=150, fit="exact"))
    assert p.output == p.scaled == (300, 150) and p.crop is None and p.passes == 2


@pytest.mark.parametrize(
    ("factor", "native", "cap", "want"),
    [
        (16, 4, 2, 2),
        (4, 4, 2, 1),
        (3.3, 2, 2, 2),
        (2, 2, 2, 1),
        (0.5, 4, 2, 1),
        (64, 4, 2, 2),
        (64, 4, 3, 3),
        (17, 4, 4, 3),
        (8, 1, 2, 1),
    ],
)
def test_passes(factor, native, cap, want):
    assert passes_for(factor, native, cap) == want


def test_plan_of_x16_with_a_x4_model_is_two_passes_and_no_resize():
    p = plan((120, 80), 4, outscale=16)
    assert (p.passes, p.model_size, p.scaled, p.filter, p.notes) == (2, (1920, 1280), (1920, 1280), "none", [])


def test_plan_beyond_max_passes_finishes_with_lanczos_and_says_so():
    p = plan((100, 80), 4, target=TargetSize(width=3840))
    assert p.passes == 2 and p.model_size == (1600, 1280) and p.scaled == (3840, 3072) and p.filter == "lanczos"
    assert p.notes == ["x38.4 needs 3 passes of the x4 model; max_passes is 2, so the last x2.4 is a Lanczos resize"]
    p = plan((1000, 800), 4, target=TargetSize(width=200))  # a reduction: one pass, then area
    assert p.passes == 1 and p.filter == "area" and p.output == (200, 160)
    assert plan((10, 10), 2).output == (20, 20)


def test_final_filter_matches_outscale():
    assert final_filter((100, 100), (150, 150)) == "lanczos"
    assert final_filter((100, 100), (50, 50)) == "area"
    assert final_filter((100, 100), (100, 100)) == "none"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_apply_final_resizes_and_crops_every_dtype(dtype):
    p = plan((10, 10), 2, target=TargetSize(width=30, height=20, fit="cover"))
    assert p.model_size == (40, 40) and p.scaled == (30, 30) and p.crop == (0, 5, 30, 20)
    peak = 1.0 if dtype == np.float32 else np.iinfo(dtype).max
    img = np.zeros((40, 40, 1), dtype)
    img[:, 20:] = peak  # a sharp edge: Lanczos overshoots, which must be clipped/saturated
    out = apply_final(img, p)
    assert out.shape == (20, 30, 1) and out.dtype == dtype
    assert out.max() <= peak and out.min() >= 0 and out[:, -1, 0].min() == peak and out[:, 0, 0].max() == 0
    with pytest.raises(ValueError, match="expected the model's output at 40x40, got 30x30"):
        apply_final(np.zeros((30, 30), dtype), p)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        (dict(width=100, outscale=2), "exclusive"),
        (dict(width=100, fit="cover"), "needs both width and height"),
        (dict(height=100, fit="exact"), "needs both width and height"),
        (dict(width=10, height=10, max_side=5, fit="cover"), "max_side only works"),
        (dict(width=0), "greater than or equal to 1"),
        (dict(max_side=10**9), "less than or equal to"),
        (dict(width=10, max_passes=9), "less than or equal to 4"),
    ],
)
def test_bad_keys_are_refused_with_the_reason(keys, match):
    # (fit = "inside" alone is the default, as a rule written back to JSON holds it, and is accepted)
    with pytest.raises(ValidationError, match=match):
        FakeRule(**keys)


def test_a_rule_without_a_target_is_valid():
    r = FakeRule(outscale=3)
    assert not r.has_target and r.fit == "inside"
    assert isinstance(r, BaseModel)


def test_check_rule_at_start():
    assert check_rule(4, outscale=16) == check_rule(4, outscale=16.0)
    ok = check_rule(4, outscale=16)
    assert ok.ok and ok.passes == 2
    capped = check_rule(4, outscale=64, target=TargetSize(max_passes=2))
    assert capped.ok and capped.passes == 2 and "3 needed" in capped.message
    refused = check_rule(4, outscale=16, chainable=False, model="sd-x4-upscaler")
    assert not refused.ok and "cannot take its own output" in refused.message
    assert check_rule(4, outscale=3, chainable=False).ok
    per_image = check_rule(4, target=TargetSize(width=3840))
    assert per_image.ok and per_image.passes is None
