"""The web view after issue 22, over real HTTP to a real `upscaled web`: bench jobs out of the way by default, the
summary strip, a job page's headline figures and next step, the LR size of a benchmark job, ISO date fields, odd
parameters answered 400 or 404 (never 500), and names that are not UTF-8 served as exactly their own files.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from PIL import Image

from daemon.config import Rule, load_settings
from daemon.fsops import text_form
from daemon.jobs import Finished, JobSpec, worker_id
from daemon.oneshot import process as process_once
from daemon.store import SqlStore
from tests.conftest import image, write_config
from tests.integration.test_web import WebServer, add_job


def _raw_job(store: SqlStore, folder: Path, raw_name: bytes, size: tuple[int, int], seed: int) -> int:
    """A done job of the watch folders whose input (archived) and output have the exact byte name ``raw_name``."""
    name = os.fsdecode(raw_name)
    arch = image(folder / "archive" / "alias" / name, size, seed=seed)
    out = image(
        folder / "outbox" / "alias" / name.replace(".png", ".bicubic.x2.png"), (size[0] * 2, size[1] * 2), seed=seed
    )
    rule = Rule(folder="alias", model="bicubic", scale=2)
    (reg,) = store.register(
        [
            JobSpec(
                sha=hashlib.sha256(arch.read_bytes()).hexdigest(),
                rule=rule,
                rel=PurePosixPath("alias", name),
                input_path=str(folder / "inbox" / "alias" / name),
                folder="alias",
            )
        ]
    )
    (job,) = store.claim(worker_id(), job_id=reg.job.id)
    fields = dict(output_path=text_form(str(out)), output_width=size[0] * 2, output_height=size[1] * 2, t_total=0.1)
    store.finish([Finished(job.id, None, fields, [], archive_path=str(arch))])
    return job.id


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("web-first-hour")
    cfg = write_config(tmp)
    settings = load_settings(cfg)
    store = SqlStore(settings.database)
    ids: dict[str, Any] = {}
    try:
        photos = [image(tmp / "in" / f"p{i}.png", (64, 48), seed=i) for i in range(2)]
        ids["cli"] = [
            r["job"] for r in process_once(settings, photos, Rule(model="bicubic", scale=2), tmp / "o", store=store)
        ]
        bench = process_once(
            settings, photos[:1], Rule(model="bicubic", scale=4, mode="benchmark"), tmp / "o", store=store
        )
        ids["benchmark"] = bench[0]["job"]
        ids["bench"] = [
            add_job(store, name=f"set5-{i}.png", folder="(bench)", input_path=photos[0], source="bench")
            for i in range(3)
        ]
        bad = tmp / "failed" / "photos" / "cat.png"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"x")
        ids["weights"] = add_job(
            store,
            name="cat.png",
            folder="photos",
            model="espcn",
            input_path=tmp / "inbox/photos/cat.png",
            state="failed",
            moved_to=bad,
            error=("weights-missing", "weights for espcn are missing"),
        )
        # Two uploads whose names read the same in text: the byte 0xff, and a backslash, x, f, f.
        ids["byte"] = _raw_job(store, tmp, b"ph\xff.png", (40, 30), seed=5)
        ids["literal"] = _raw_job(store, tmp, b"ph\\xff.png", (50, 20), seed=6)
    finally:
        store.close()
    server = WebServer(cfg)
    try:
        yield dict(server=server, ids=ids, tmp=tmp, cfg=cfg)
    finally:
        server.stop()


def ids_on(page: str) -> set[int]:
    return {int(i) for i in re.findall(r'<td><a href="/jobs/(\d+)">', page)}


def test_bench_jobs_are_hidden_until_asked_for(site):
    ids, server = site["ids"], site["server"]
    page = server.page("/")
    shown = ids_on(page)
    assert set(ids["cli"]) <= shown and ids["benchmark"] in shown and not set(ids["bench"]) & shown
    assert set(ids["bench"]) == ids_on(server.page("/?source=bench"))
    assert set(ids["bench"]) <= ids_on(server.page("/?source=all"))
    assert '<option value="bench">upscaled bench</option>' in page
    assert server.get("/?source=everything")[0] == 400


def test_the_summary_strip_counts_the_queue_and_the_last_hour(site):
    page = site["server"].page("/")
    strip = page.split('<section class="summary"', 1)[1].split("</section>", 1)[0]
    figures = dict(
        (label, value)
        for value, label in re.findall(r'<span class="value">([^<]*)</span><span class="label">([^<]*)</span>', strip)
    )
    # The list's own sources (bench left out): 2 + 1 cli jobs and 2 aliases done, 1 failed, in the last hour.
    assert figures["done in the last hour"] == "5" and figures["failed in the last hour"] == "1"
    assert figures["queued"] == "0" and figures["failure rate, last hour"] == "17 %"


def test_a_failed_job_says_the_next_step_and_no_output(site):
    ids, server, cfg = site["ids"], site["server"], site["cfg"]
    page = server.page(f"/jobs/{ids['weights']}")
    step = page.split('<div class="next-step">', 1)[1].split("</div>", 1)[0]
    assert f"upscaled --config {cfg} weights fetch espcn" in step
    assert f"upscaled --config {cfg} retry {ids['weights']}" in step
    assert "none written" in page and ".espcn.x" not in page  # no planned output path that never existed


def test_a_job_page_puts_the_headline_figures_first(site):
    ids, server = site["ids"], site["server"]
    page = server.page(f"/jobs/{ids['cli'][0]}")
    head = page.split('<section class="headline"', 1)[1].split("</section>", 1)[0]
    assert "brisque" in head or "lr_psnr_y" in head
    assert page.index('class="headline"') < page.index('class="images"')
    if "brisque" in head:
        assert "lower is better" in head
    bench = server.page(f"/jobs/{ids['benchmark']}")
    assert "psnr_y" in bench.split('<section class="headline"', 1)[1].split("</section>", 1)[0]
    assert "higher is better" in bench


def test_a_benchmark_row_shows_the_lr_size_the_model_got(site):
    ids, server = site["ids"], site["server"]
    page = server.page("/")
    row = page.split(f'<a href="/jobs/{ids["benchmark"]}">', 1)[1].split("</tr>", 1)[0]
    assert "LR 16×12 → 64×48" in row  # a 64x48 ground truth at x4: the model got 16x12


def test_date_fields_are_iso_text_not_the_browsers_locale(site):
    page = site["server"].page("/?from=2026-01-02")
    assert 'type="date"' not in page
    assert re.search(r'<input type="text" name="from"[^>]*placeholder="YYYY-MM-DD"[^>]*value="2026-01-02"', page)


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/jobs/" + "9" * 30, 404, "there is no job"),
        ("/jobs/9223372036854775808", 404, "there is no job"),
        ("/jobs/12abc", 404, "there is no job"),
        ("/jobs/" + "9" * 30 + "/thumb", 404, "there is no job"),
        ("/?page=" + "9" * 5000, 400, "page expects a whole number"),
        ("/?page=%C2%B2", 400, "page expects a whole number"),
        ("/stats?since=999999999999d", 400, "before 1970"),
        ("/?to=9999-12-31", 400, "to expects a date from 1970-01-01 to 9999-12-30"),
        ("/?from=0001-01-01", 400, "from expects a date from 1970-01-01"),
        ("/?run=" + "9" * 40, 400, "run expects a bench run id"),
        ("/bench/" + "9" * 30 + "/report", 404, "has no report"),
    ],
)
def test_odd_parameters_get_a_clear_4xx_never_a_500(site, path, status, says):
    got, _, body = site["server"].get(path)
    assert got == status and says in body.decode(), (path, got, body[:300])


def test_names_that_read_alike_are_served_as_their_own_files(site):
    ids, server = site["ids"], site["server"]
    for key, size in (("byte", (40, 30)), ("literal", (50, 20))):
        for which, factor in (("input", 1), ("output", 2)):
            status, _, body = server.get(f"/jobs/{ids[key]}/{which}")
            assert status == 200, (key, which)
            with Image.open(io.BytesIO(body)) as im:
                assert im.size == (size[0] * factor, size[1] * factor), (key, which, im.size)
        page = server.page(f"/jobs/{ids[key]}")
        assert "ph\\xff" in page  # the name, shown in its text form


def test_listen_with_a_port_alone_serves_that_port_on_loopback(site):
    """`--listen 8081` means the port, on 127.0.0.1 (here port 0: the system picks a free one)."""
    server = WebServer(site["cfg"], "--listen", "0")  # the last --listen wins over WebServer's own
    try:
        assert "upscaled web: http://127.0.0.1:" in server.log_path.read_text()
        assert server.get("/")[0] == 200
    finally:
        server.stop()
