"""`upscaled web` in a real headless Chromium: the list, a job with its slider dragged by a real mouse, a benchmark
job's HR | LR | output, a failed job, a deleted input, the stats and the bench runs.

Every page must load with no console error (a broken image, a CSP violation and a script error all are one), no
exception, no request to anything but the web view itself (or a data: URL of Chromium's own widgets), and no
answer of 400 or more. Screenshots go to test-artifacts/web-*.png for a person to look at; with
``UPSCALED_DOCS_IMG=docs/img`` the list, job, benchmark and stats pages are also written there, for the docs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Rule, load_settings
from daemon.oneshot import process as process_once
from daemon.store import SqlStore
from tests.chromium import Browser, Page, require_chromium
from tests.conftest import ROOT, image, write_config
from tests.integration.test_web import WebServer, add_job

ARTIFACTS = ROOT / "test-artifacts"
DOCS_SHOTS = {"list", "job", "benchmark", "stats"}  # the screenshots docs/web.md shows


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser(require_chromium()) as b:
        yield b


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A history made by the real pipeline, plus a job whose input was deleted, served by `upscaled web`."""
    tmp = tmp_path_factory.mktemp("web-chromium")
    cfg = write_config(tmp)
    settings = load_settings(cfg)
    store = SqlStore(settings.database)
    try:
        photos = [image(tmp / "in" / f"photo-{i}.png", (160, 120), seed=i) for i in range(4)]
        done = process_once(settings, photos, Rule(model="bicubic", scale=2), tmp / "out", store=store)
        bench = process_once(
            settings, photos[:1], Rule(model="bicubic", scale=3, mode="benchmark"), tmp / "out", store=store
        )
        (tmp / "in" / "truncated.png").write_bytes(photos[1].read_bytes()[:300])
        failed = process_once(
            settings, [tmp / "in" / "truncated.png"], Rule(model="bicubic", scale=2), tmp / "out", store=store
        )
        out = image(tmp / "outbox" / "photos" / "gone.bicubic.x2.png", (320, 240), seed=9)
        deleted = add_job(store, name="gone.png", folder="photos", input_path=tmp / "inbox/photos/gone.png", output=out)
        stuck = tmp / "failed" / "photos" / "cat.png"
        stuck.parent.mkdir(parents=True)
        stuck.write_bytes(photos[2].read_bytes())
        weights = add_job(
            store,
            name="cat.png",
            folder="photos",
            model="espcn",
            input_path=tmp / "inbox/photos/cat.png",
            state="failed",
            moved_to=stuck,
            error=("weights-missing", f"weights for espcn are missing: {tmp}/weights/ESPCN_x2.pb does not exist"),
        )
        for i in range(3):  # a bench run's jobs: hidden from the list unless asked for
            add_job(store, name=f"set5-{i}.png", folder="(bench)", input_path=photos[0], source="bench")
    finally:
        store.close()
    assert all(r["state"] == "done" for r in done + bench) and failed[0]["state"] == "failed"
    server = WebServer(cfg)
    try:
        yield dict(
            base=f"http://127.0.0.1:{server.port}",
            job=done[0]["job"],
            bench=bench[0]["job"],
            failed=failed[0]["job"],
            deleted=deleted,
            weights=weights,
        )
    finally:
        server.stop()


def shot(page: Page, name: str, full_page: bool = True) -> None:
    """A screenshot kept in test-artifacts/ for a person to look at; it must hold a real picture."""
    path = page.screenshot(ARTIFACTS / f"web-{name}.png", full_page=full_page)
    assert path.stat().st_size > 5_000, path
    docs = os.environ.get("UPSCALED_DOCS_IMG")
    if docs and name in DOCS_SHOTS:
        shutil.copyfile(path, Path(docs) / f"web-{name}.png")


def open_page(browser: Browser, site: dict[str, Any], path: str) -> Page:
    page = browser.new_page()
    page.navigate(site["base"] + path)
    return page


def assert_clean(page: Page, site: dict[str, Any]) -> None:
    """No console error, no exception, nothing asked of another host, no failed answer."""
    assert not page.console_errors(), page.console_errors()
    assert not page.exceptions(), page.exceptions()
    outside = [u for u in page.requests() if not u.startswith((site["base"] + "/", "data:"))]
    assert not outside, f"requests that left the host: {outside}"
    failed = {u: s for u, s in page.responses().items() if s >= 400}
    assert not failed, failed


def viewer_ready(page: Page) -> None:
    page.wait("document.querySelector('.viewer') && document.querySelector('.viewer').dataset.ready === '1'")
    bad = [i for i in page.images_decoded(".viewer .stage img") if not (i["decoded"] and i["naturalWidth"] > 0)]
    assert not bad, bad


def test_list_page(browser, site):
    page = open_page(browser, site, "/")
    try:
        thumbs = page.images_decoded("td.thumb img")
        assert len(thumbs) == 8  # the bench run's 3 jobs are not in the default list
        assert all(t["decoded"] and t["naturalWidth"] > 0 for t in thumbs), thumbs
        # The failed job's thumbnail is the "no preview" picture, not a broken image.
        failed_src = page.evaluate(f"document.querySelector('a[href=\"/jobs/{site['failed']}\"] img').currentSrc")
        assert failed_src.endswith(f"/jobs/{site['failed']}/thumb")
        reasons = page.evaluate(
            "Array.from(document.querySelectorAll('tr.state-failed .reason')).map(e => e.textContent)"
        )
        assert sorted(r.split(":")[0] for r in reasons) == ["decode", "weights-missing"], reasons
        strip = page.evaluate("Array.from(document.querySelectorAll('.summary .figure')).map(e => e.textContent)")
        assert any("done in the last hour" in f and f.startswith("6") for f in strip), strip
        shot(page, "list")
        assert_clean(page, site)
    finally:
        page.close()


def test_job_page_slider_dragged_with_the_mouse(browser, site):
    page = open_page(browser, site, f"/jobs/{site['job']}")
    try:
        viewer_ready(page)
        shot(page, "job")
        rect = page.evaluate(
            "(() => { const r = document.querySelector('.stage').getBoundingClientRect();"
            " return {x: r.left, y: r.top, w: r.width, h: r.height}; })()"
        )
        assert rect["w"] > 300 and rect["h"] > 200
        y = rect["y"] + rect["h"] / 2

        def state() -> dict[str, Any]:
            return page.evaluate("""(() => { const v = document.querySelector('.viewer');
                const after = v.querySelector('img.after');
                return {split: Number(v.dataset.split), range: Number(v.querySelector('input.split').value),
                        clip: getComputedStyle(after).clipPath}; })()""")

        assert state()["split"] == 0.5
        page.drag(rect["x"] + rect["w"] * 0.5, y, rect["x"] + rect["w"] * 0.25, y)
        s = state()
        assert s["split"] == pytest.approx(0.25, abs=0.01) and s["range"] == pytest.approx(250, abs=10)
        assert s["clip"].startswith("inset(0px 0px 0px 25"), s
        # The clip is real: left of the split the page shows the input, right of it the output.
        hit = "document.elementFromPoint({x}, {y}).className"
        assert page.evaluate(hit.format(x=rect["x"] + rect["w"] * 0.1, y=y)) == "before"
        assert page.evaluate(hit.format(x=rect["x"] + rect["w"] * 0.4, y=y)) == "after"
        page.drag(rect["x"] + rect["w"] * 0.25, y, rect["x"] + rect["w"] * 0.8, y)
        assert state()["split"] == pytest.approx(0.8, abs=0.01)
        assert page.evaluate(hit.format(x=rect["x"] + rect["w"] * 0.6, y=y)) == "before"
        shot(page, "job-dragged", full_page=False)
        # 1:1 shows one output pixel per screen pixel.
        page.click("button[data-zoom='1']")
        width = page.evaluate("document.querySelector('.stage').getBoundingClientRect().width")
        natural = page.evaluate("document.querySelector('img.after').naturalWidth")
        assert natural == 320 and width == pytest.approx(natural, abs=0.5)
        page.click("button[data-zoom='4']")
        assert page.evaluate("document.querySelector('.stage').getBoundingClientRect().width") == pytest.approx(
            4 * natural, abs=0.5
        )
        assert page.evaluate("document.querySelector('.viewport').scrollWidth") > page.evaluate(
            "document.querySelector('.viewport').clientWidth"
        )  # it scrolls, the page does not
        shot(page, "job-zoom", full_page=False)
        assert_clean(page, site)
    finally:
        page.close()


def test_benchmark_job_shows_hr_lr_and_output(browser, site):
    page = open_page(browser, site, f"/jobs/{site['bench']}")
    try:
        viewer_ready(page)
        page.click("button[data-view='side']")
        assert page.evaluate("document.querySelector('.side').hidden") is False
        for hidden in ("input.split", ".viewport"):  # the slider's controls go with it; the zoom stays
            assert page.evaluate(f"getComputedStyle(document.querySelector('{hidden}')).display") == "none", hidden
        assert page.evaluate("getComputedStyle(document.querySelector('[aria-label=Zoom]')).display") != "none"
        figures = page.images_decoded(".side img")
        assert [f["alt"] for f in figures] == ["HR", "LR", "output"]
        assert all(f["decoded"] for f in figures), figures
        assert figures[1]["naturalWidth"] * 3 == figures[2]["naturalWidth"]  # the LR is a third of the output
        shot(page, "benchmark")
        page.click("button[data-view='slider']")
        page.evaluate("""(() => { const s = document.querySelector('select[data-role=before]');
            s.value = s.options[1].value; s.dispatchEvent(new Event('change')); })()""")
        before = page.images_decoded("img.before")[0]
        assert before["src"].endswith(f"/jobs/{site['bench']}/lr") and before["decoded"]
        assert page.evaluate("document.querySelector('[data-role=before-tag]').textContent") == "LR"
        assert_clean(page, site)
    finally:
        page.close()


def test_the_divider_has_a_visible_handle_that_follows_the_split(browser, site):
    page = open_page(browser, site, f"/jobs/{site['job']}")
    try:
        viewer_ready(page)

        def handle() -> dict[str, float]:
            return page.evaluate("""(() => { const h = document.querySelector('.divider .handle');
                const r = h.getBoundingClientRect(); const s = document.querySelector('.stage').getBoundingClientRect();
                const cs = getComputedStyle(h);
                return {w: r.width, h: r.height, cx: r.left + r.width / 2, split: s.left + s.width * Number(
                    document.querySelector('.viewer').dataset.split), bg: cs.backgroundColor,
                    border: cs.borderTopWidth}; })()""")

        h = handle()
        assert h["w"] >= 30 and h["h"] >= 30 and h["bg"] == "rgb(255, 255, 255)" and h["border"] == "2px", h
        assert h["cx"] == pytest.approx(h["split"], abs=2)
        rect = page.evaluate(
            "(() => { const r = document.querySelector('.stage').getBoundingClientRect();"
            " return {x: r.left, y: r.top, w: r.width, h: r.height}; })()"
        )
        page.drag(rect["x"] + rect["w"] * 0.5, rect["y"] + 20, rect["x"] + rect["w"] * 0.3, rect["y"] + 20)
        h = handle()
        assert h["cx"] == pytest.approx(rect["x"] + rect["w"] * 0.3, abs=4) and h["cx"] == pytest.approx(
            h["split"], abs=2
        )
        assert_clean(page, site)
    finally:
        page.close()


def test_side_by_side_zoom_and_pan_move_every_pane_together(browser, site):
    page = open_page(browser, site, f"/jobs/{site['bench']}")
    try:
        viewer_ready(page)
        page.click("button[data-view='side']")
        page.click("button[data-zoom='4']")

        def panes() -> list[dict[str, float]]:
            return page.evaluate("""Array.from(document.querySelectorAll('.side .pane')).map((p) => {
                const img = p.querySelector('img'); return {w: img.getBoundingClientRect().width,
                left: p.scrollLeft, top: p.scrollTop, sw: p.scrollWidth, cw: p.clientWidth}; })""")

        natural = page.evaluate("document.querySelector('.viewer').dataset.width")
        shown = panes()
        assert len(shown) == 3  # HR | LR | output, every one at the output's size times 4
        assert all(p["w"] == pytest.approx(4 * int(natural), abs=0.5) for p in shown), shown
        assert all(p["sw"] > p["cw"] for p in shown)  # each pane scrolls
        page.evaluate("(() => { const p = document.querySelectorAll('.side .pane')[2]; p.scrollLeft = 150;"
                      " p.scrollTop = 40; })()")  # fmt: skip
        page.wait("Array.from(document.querySelectorAll('.side .pane')).every((p) => p.scrollLeft === 150)")
        moved = panes()
        assert [p["left"] for p in moved] == [150] * 3 and len({p["top"] for p in moved}) == 1, moved
        page.click("button[data-zoom='fit']")
        assert all(p["sw"] <= p["cw"] + 1 for p in panes())
        assert_clean(page, site)
    finally:
        page.close()


def test_a_job_that_failed_for_missing_weights_says_what_to_run(browser, site):
    page = open_page(browser, site, f"/jobs/{site['weights']}")
    try:
        step = page.evaluate("document.querySelector('.next-step').textContent")
        assert "weights fetch espcn" in step and f"retry {site['weights']}" in step
        assert page.evaluate("document.querySelector('.next-step').getBoundingClientRect().top") < 500  # above the fold
        shot(page, "failed-weights")
        assert_clean(page, site)
    finally:
        page.close()


def test_failed_job_page(browser, site):
    page = open_page(browser, site, f"/jobs/{site['failed']}")
    try:
        reason = page.evaluate("document.querySelector('.failure').textContent")
        assert reason.startswith("decode:") and "truncated.png" in reason
        assert page.evaluate("document.querySelectorAll('.viewer').length") == 0  # nothing to show, no broken image
        shot(page, "failed")
        assert_clean(page, site)
    finally:
        page.close()


def test_a_deleted_input_shows_input_not_kept_and_the_output(browser, site):
    page = open_page(browser, site, f"/jobs/{site['deleted']}")
    try:
        assert page.evaluate("document.querySelector('.input-missing').textContent") == "input not kept"
        viewer_ready(page)
        assert page.evaluate("document.querySelectorAll('.stage img').length") == 1
        assert_clean(page, site)
    finally:
        page.close()


@pytest.mark.parametrize("path", ["/stats", "/bench", "/?state=failed", "/?source=all", "/jobs/999999"])
def test_other_pages_load_cleanly(browser, site, path):
    page = open_page(browser, site, path)
    try:
        if path == "/stats":
            assert page.evaluate("document.querySelectorAll('svg.chart rect.bar').length") > 0
            shot(page, "stats")
        if path == "/jobs/999999":
            assert page.evaluate("document.querySelector('.message').textContent") == "there is no job 999999"
            page.dt.events = [e for e in page.dt.events if e["method"] != "Log.entryAdded"]  # the 404 itself
            assert {s for s in page.responses().values()} == {404, 200}
            return
        assert_clean(page, site)
    finally:
        page.close()


def test_without_chromium_a_test_skips_or_fails_under_require_all(monkeypatch):
    """A stand-in for a host without Chromium (this one has it): chromium_binary() is made to find nothing."""
    import tests.chromium

    monkeypatch.setattr(tests.chromium, "chromium_binary", lambda: None)
    monkeypatch.delenv("UPSCALED_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium binary"):
        tests.chromium.require_chromium()
    monkeypatch.setenv("UPSCALED_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match="UPSCALED_REQUIRE_ALL=1 and no chromium binary"):
        tests.chromium.require_chromium()
