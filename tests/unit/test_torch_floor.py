"""The torch floor (2.6: CVE-2025-32434) is checked when a torch backend loads, not only by the pip extras."""

from __future__ import annotations

import pytest

from models.runtime import TORCH_FLOOR, torch_too_old, version_tuple


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("2.5.1+cu121", (2, 5, 1)),
        ("2.6.0a0+git1234", (2, 6, 0)),
        ("2.6.0.dev20241001", (2, 6, 0)),
        ("2.14.1+cu130", (2, 14, 1)),
        ("2.10", (2, 10)),
        ("nightly", ()),
    ],
)
def test_version_strings_are_read_by_their_release_numbers(text, parsed):
    assert version_tuple(text) == parsed


@pytest.mark.parametrize("text", ["2.5.1", "2.5.1+cu121", "1.13.0", "2.4.0a0", "garbage"])
def test_torch_before_2_6_is_refused_with_the_reason(text):
    why = torch_too_old(text)
    assert why is not None and text in why and "2.6" in why and "CVE-2025-32434" in why


@pytest.mark.parametrize("text", ["2.6.0", "2.6.0a0+git", "2.10.1", "2.14.1+cu130", "3.0"])
def test_torch_2_6_and_later_pass(text):
    assert torch_too_old(text) is None and version_tuple(text) >= TORCH_FLOOR


def test_a_real_load_under_an_older_torch_is_refused_before_any_file_is_read(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("spandrel")
    from models.errors import BackendUnavailableError
    from models.registry import LoadContext, ModelCache
    from models.testing import compact_state

    path = tmp_path / "2x-Tiny.pth"
    torch.save(compact_state(scale=2), path)
    assert ModelCache().get(f"file:{path}", 2, LoadContext(tmp_path, "cpu"))[0].scale == 2  # loads as it is
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(BackendUnavailableError, match=r"torch 2\.5\.1\+cu121 .* 2\.6 or later.*upscaled\[gan\]"):
        ModelCache().get(f"file:{path}", 2, LoadContext(tmp_path, "cpu"))
