"""`upscaled bench --frontier`: which models no other beats on both PSNR-Y and seconds per megapixel."""

from __future__ import annotations

from bench.run import frontier


def _row(model: str, scale: int, psnr: float | None, s_per_mp: float | None, status: str = "ok") -> dict:
    return dict(model=model, scale=scale, psnr_y=psnr, ssim_y=0.5, brisque=None, s_per_mp=s_per_mp, status=status)


def test_the_frontier_keeps_only_models_no_other_beats_on_both_axes():
    rows = [
        _row("bicubic", 4, 28.43, 0.06),
        _row("fsrcnn", 4, 28.41, 0.09),  # slower and worse than bicubic: beaten
        _row("lapsrn", 4, 28.75, 2.9),
        _row("ditn", 4, 32.10, 14.8),
        _row("slow-and-worse", 4, 30.00, 20.0),  # beaten by ditn
        _row("same-as-lapsrn-but-slower", 4, 28.75, 3.5),  # a tie on quality, slower: beaten
        _row("skipped", 4, None, None, status="skipped"),
        _row("bicubic", 2, 33.68, 0.08),
        _row("fsrcnn", 2, 34.88, 0.35),
    ]
    got = {(r["model"], r["scale"]): r for r in frontier(rows)}
    assert ("skipped", 4) not in got
    on = sorted(k for k, r in got.items() if r["frontier"])
    assert on == [("bicubic", 2), ("bicubic", 4), ("ditn", 4), ("fsrcnn", 2), ("lapsrn", 4)]
    assert got[("fsrcnn", 4)]["beaten_by"] == "bicubic"
    assert got[("slow-and-worse", 4)]["beaten_by"] == "ditn"
    assert got[("same-as-lapsrn-but-slower", 4)]["beaten_by"] == "lapsrn"
    assert round(got[("ditn", 4)]["gain_db"], 2) == 3.67 and round(got[("fsrcnn", 2)]["gain_db"], 2) == 1.2
    # Per scale, fastest first.
    assert [r["model"] for r in frontier(rows) if r["scale"] == 4][:2] == ["bicubic", "fsrcnn"]


def test_without_bicubic_there_is_no_gain_and_one_model_is_its_own_frontier():
    (only,) = frontier([_row("ditn", 4, 32.1, 14.8)])
    assert only["frontier"] and only["gain_db"] is None and only["beaten_by"] == ""
