"""The failpoints of daemon/failpoints.py: armed only under the explicit test switch, refused when misspelt.

A deployment whose environment happens to hold ``UPSCALED_FAILPOINTS`` (a copied unit file, a leftover export) must
not crash at a commit: without ``UPSCALED_FAILPOINTS_TEST=1`` nothing is armed and every point is a no-op. The
crashes themselves are tested on the real daemon in tests/acceptance/test_crash_windows.py.
"""

from __future__ import annotations

import pytest

from daemon import failpoints


@pytest.fixture(autouse=True)
def disarmed():
    yield
    failpoints.arm({})


def test_nothing_is_armed_without_the_test_switch():
    env = {"UPSCALED_FAILPOINTS": "after-commit=exit,in-infer=pause"}
    assert failpoints.arm(env) == {}, "failpoints armed without UPSCALED_FAILPOINTS_TEST=1"
    for name in failpoints.POINTS:
        failpoints.hit(name)  # a no-op: were after-commit armed, the test process would exit here with code 86
    assert failpoints.arm({**env, "UPSCALED_FAILPOINTS_TEST": "0"}) == {}


def test_the_test_switch_arms_what_is_named():
    env = {"UPSCALED_FAILPOINTS_TEST": "1", "UPSCALED_FAILPOINTS": " after-commit=exit , in-infer=pause "}
    assert failpoints.arm(env) == {"after-commit": "exit", "in-infer": "pause"}


@pytest.mark.parametrize("item", ["after-comit=exit", "after-commit=crash", "after-commit"])
def test_a_misspelt_point_or_action_is_refused_not_ignored(item):
    with pytest.raises(ValueError, match="expected one of"):
        failpoints.arm({"UPSCALED_FAILPOINTS_TEST": "1", "UPSCALED_FAILPOINTS": item})
