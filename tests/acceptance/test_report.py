"""The HTML reports, opened in a real headless Chromium: no console errors, no network, every image decoded.

Chromium is driven over the DevTools protocol (tests/chromium.py): the test attaches to a blank page first, so it sees
every console message, exception and request of the report from the very start. A screenshot of each report is
saved under test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.report import best_rows, history_report
from bench.run import BenchSettings, Progress, detail_box, read_dataset, run_bench
from daemon.config import Rule, load_settings
from daemon.oneshot import process as process_once
from daemon.store import SqlStore
from tests.chromium import Browser, require_chromium
from tests.conftest import ROOT, SET5, image, write_config

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless Chromium with remote debugging (tests/chromium.py)."""
    with Browser(require_chromium()) as b:
        yield b


def open_report(browser: Browser, path: Path, screenshot: Path) -> dict[str, Any]:
    """Load ``path`` in a fresh tab; return images, console errors, exceptions and non-local requests."""
    page = browser.new_page()  # attached to before the report loads
    try:
        page.navigate(path.resolve().as_uri())
        images = page.images_decoded()
        page.screenshot(screenshot, max_height=12000)
        return dict(
            images=images,
            errors=page.console_errors(),
            exceptions=page.exceptions(),
            requests=page.requests(),
            title=page.evaluate("document.title"),
        )
    finally:
        page.close()


def assert_clean(opened: dict[str, Any], min_images: int) -> None:
    assert not opened["errors"], opened["errors"]
    assert not opened["exceptions"], opened["exceptions"]
    outside = [u for u in opened["requests"] if not u.startswith(("file:", "data:"))]
    assert not outside, f"the report fetched from the network: {outside}"
    imgs = opened["images"]
    assert len(imgs) >= min_images, imgs
    bad = [i for i in imgs if not (i["decoded"] and i["complete"] and i["naturalWidth"] > 0)]
    assert not bad, bad
    assert all(i["src"].startswith("data:image/png") for i in imgs), imgs


# --- the bench report -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_html(tmp_path_factory, weights_dir) -> tuple[Path, dict]:
    """`upscaled bench --report` on two Set5 images (an HR-only folder), three models, one unknown."""
    if not (SET5 / "HR").is_dir():
        pytest.skip(f"Set5 is not at {SET5}")
    tmp = tmp_path_factory.mktemp("bench-report")
    data = tmp / "two"
    data.mkdir()
    for name in ("baby.png", "butterfly.png"):
        shutil.copy(SET5 / "HR" / name, data / name)
    cfg = write_config(tmp, weights=weights_dir)
    out = tmp / "report.html"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "--config",
            str(cfg),
            "bench",
            "--dataset",
            str(data),
            "--models",
            "bicubic,fsrcnn,espcn,no-such-model",
            "--scales",
            "2,4",
            "--report",
            str(out),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return out, json.loads(res.stdout)


def test_bench_report_is_self_contained(bench_html):
    path, doc = bench_html
    page = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "an external reference"
    assert "<script" not in page
    # one scatter, and per image and scale: HR, LR and the three models that ran
    assert page.count('alt="PSNR-Y against seconds per megapixel"') == 1
    ran = [r for r in doc["results"] if r["status"] == "ok"]
    assert {(r["model"], r["scale"]) for r in ran} == {(m, s) for m in ("bicubic", "fsrcnn", "espcn") for s in (2, 4)}
    assert page.count("<figure><img") == 2 * 2 * (2 + 3)
    assert "no-such-model" in page and "unknown-model" in page  # the skipped rows say why


def test_bench_report_marks_the_best_value_of_each_column(bench_html):
    path, doc = bench_html
    page = path.read_text()
    for scale in (2, 4):
        rows = [r for r in doc["results"] if r["scale"] == scale and r["status"] == "ok"]
        best = max(rows, key=lambda r: r["psnr_y"])
        section = page.split(f"<h3>x{scale}</h3>", 1)[1].split("</table>", 1)[0]
        marked = re.findall(r'<td class="[^"]*best[^"]*">([^<]+)</td>', section)
        assert f"{best['psnr_y']:.2f}" in marked
        cheapest = min(rows, key=lambda r: r["mse_rgb"])
        assert f"{cheapest['mse_rgb']:.1f}" in marked


def test_best_rows_follows_the_direction_of_each_column():
    rows = [
        dict(psnr_y=30.0, mse_rgb=10.0, s_per_image=0.5, brisque=None),
        dict(psnr_y=31.0, mse_rgb=12.0, s_per_image=0.5, brisque=20.0),
        dict(psnr_y=None, mse_rgb=9.0, s_per_image=0.7, brisque=25.0),
    ]
    best = best_rows(rows, ["psnr_y", "mse_rgb", "s_per_image", "brisque", "model"])
    assert best == {"psnr_y": {1}, "mse_rgb": {2}, "s_per_image": {0, 1}, "brisque": {1}}


def test_bench_report_opens_in_chromium(browser, bench_html):
    path, _ = bench_html
    opened = open_report(browser, path, ARTIFACTS / "bench-report.png")
    assert opened["title"].startswith("upscaled bench")
    assert_clean(opened, min_images=1 + 2 * 2 * 5)
    assert (ARTIFACTS / "bench-report.png").stat().st_size > 10_000


def test_crops_pick_the_most_detailed_region(tmp_path):
    """A flat image with one textured patch: the crop lands on the patch."""
    rng = np.random.default_rng(1)
    img = np.full((200, 240, 3), 0.5, np.float32)
    img[120:168, 144:192] = rng.random((48, 48, 3), dtype=np.float32)
    x, y, w, h = detail_box(img, 48, 24)
    assert (x, y, w, h) == (144, 120, 48, 48)


# --- the history report ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def history_db(tmp_path_factory, weights_dir) -> Path:
    """A history made by the real pipeline: two rules (folders), a benchmark-mode job and a failed job."""
    tmp = tmp_path_factory.mktemp("history")
    cfg = write_config(tmp, weights=weights_dir)
    settings = load_settings(cfg)
    files = [image(tmp / "in" / f"p{i}.png", (48, 40), seed=i) for i in range(3)]
    (tmp / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    store = SqlStore(settings.database)
    try:
        process_once(settings, files, Rule(model="fsrcnn", scale=2), tmp / "out", store=store)
        process_once(settings, files[:2], Rule(model="bicubic", scale=3), tmp / "out", store=store)
        process_once(settings, files[:1], Rule(model="bicubic", scale=2, mode="benchmark"), tmp / "out", store=store)
        process_once(settings, [tmp / "in" / "broken.png"], Rule(model="bicubic", scale=2), tmp / "out", store=store)
    finally:
        store.close()
    return cfg


def test_history_report_has_every_chart_and_opens_in_chromium(browser, history_db):
    out = history_db.parent / "history.html"
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(history_db), "report", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=history_db.parent,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "7 jobs (6 done, 1 failed), 4 figures" in res.stdout
    page = out.read_text()
    for heading in ("Throughput over time", "Job time per model", "Failures by reason", "Metrics per folder and rule"):
        assert f'alt="{heading}"' in page, heading
    opened = open_report(browser, out, ARTIFACTS / "history-report.png")
    assert_clean(opened, min_images=4)


def test_history_report_on_an_empty_database_says_so(tmp_path):
    store = SqlStore(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        summary = history_report(store.engine, tmp_path / "r.html")
    finally:
        store.close()
    page = (tmp_path / "r.html").read_text()
    assert summary["jobs"] == 0 and summary["figures"] == 0
    assert "No finished jobs yet." in page and "No failures." in page and "<img" not in page


def test_history_report_leaves_bench_runs_out_unless_asked(tmp_path, weights_dir):
    if not (SET5 / "HR").is_dir():
        pytest.skip(f"Set5 is not at {SET5}")
    data = tmp_path / "one"
    data.mkdir()
    shutil.copy(SET5 / "HR" / "head.png", data / "head.png")
    store = SqlStore(f"sqlite:///{tmp_path / 'h.db'}")
    try:
        run_bench(
            BenchSettings(dataset=data, models=("bicubic",), scales=(2,), weights_dir=weights_dir, brisque=False),
            store,
            Progress(1, stream=io.StringIO()),
        )
        without = history_report(store.engine, tmp_path / "a.html")
        with_bench = history_report(store.engine, tmp_path / "b.html", include_bench=True)
    finally:
        store.close()
    assert without["jobs"] == 0 and with_bench["jobs"] == 1 and with_bench["figures"] == 3
    assert len(read_dataset(data).images) == 1
