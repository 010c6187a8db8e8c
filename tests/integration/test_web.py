"""`upscaled web` as a real subprocess over a real SQLite history: the pages, the images, and the attacks.

The history is made by the real pipeline (`process_once`: bicubic, upscale and benchmark mode, a broken file) and,
for what only the watching service makes (archived and deleted inputs, rule folders, 16-bit TIFF outputs, hostile
names), through :class:`daemon.store.Store`'s own register/claim/finish/fail with real files on disk. Every request
is real HTTP over a socket.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, quote

import numpy as np
import pytest
from PIL import Image

from daemon import imageio
from daemon.config import Rule, load_settings
from daemon.history import stats as history_stats
from daemon.jobs import Finished, JobSpec, worker_id
from daemon.metrics import Metric
from daemon.oneshot import process as process_once
from daemon.store import SqlStore, make_engine
from tests.conftest import ROOT, image, shared_sandbox, wait_for, write_config
from tests.postgres import pg_server, pg_url  # noqa: F401 - fixtures

HOSTILE_FOLDER = '"><img src=x onerror=alert(1)>'
SCRIPT_DIR = "<script>alert(1)<"  # with the file name below, rel_path reads <script>alert(1)</script>.png
SCRIPT_FILE = "script>.png"


class WebServer:
    """`python -m daemon web` on a free port; the address comes from its first stderr line."""

    def __init__(self, cfg: Path, *extra: str) -> None:
        # stderr to a file, not a pipe: a pipe nobody reads would block the server once its buffer is full.
        self.log_path = cfg.parent / f"web-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon",
                "--config",
                str(cfg),
                "web",
                "--listen",
                "127.0.0.1:0",
                "--cache-dir",
                str(cfg.parent / "web-cache"),
                *extra,
            ],
            cwd=cfg.parent,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )

        def address() -> re.Match | bool:
            found = re.search(r"upscaled web: http://127\.0\.0\.1:(\d+)/", self.log_path.read_text())
            return found or self.proc.poll() is not None

        found = wait_for(address, timeout=60, what="upscaled web to listen")
        if not isinstance(found, re.Match):
            self.stop()
            pytest.fail(f"upscaled web did not start: {self.log_path.read_text()}")
        self.port = int(found.group(1))

    def request(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """A raw request: ``path`` goes out exactly as given (no client-side normalisation of ``..``)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request(path, **kw)

    def page(self, path: str) -> str:
        status, _, body = self.get(path)
        assert status == 200, (path, status, body[:500])
        return body.decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def add_job(
    store: SqlStore,
    *,
    name: str,
    folder: str,
    input_path: Path | str,
    output: Path | None = None,
    state: str = "done",
    moved_to: Path | None = None,
    mode: str = "upscale",
    model: str = "bicubic",
    metrics: tuple[Metric, ...] = (),
    error: tuple[str, str] | None = None,
    source: str = "watch",
) -> int:
    """A job the way the service records one, through the store's own transitions."""
    sha = hashlib.sha256(f"{folder}/{name}/{input_path}".encode()).hexdigest()
    rule = Rule(folder=folder, model=model, scale=2, mode=mode)
    (reg,) = store.register(
        [
            JobSpec(
                sha=sha,
                rule=rule,
                rel=PurePosixPath(folder, name) if folder else PurePosixPath(name),
                input_path=str(input_path),
                source=source,
                folder=folder,
                input_size=Path(input_path).stat().st_size if Path(input_path).exists() else 1234,
            )
        ]
    )
    if state == "pending":
        return reg.job.id
    (job,) = store.claim(worker_id(), job_id=reg.job.id)
    if state == "failed":
        kind, message = error or ("decode", "not an image")
        store.fail(job.id, kind, message, fields=dict(input_moved_to=str(moved_to) if moved_to else None))
    elif state == "done":
        fields: dict[str, Any] = dict(
            output_path=str(output) if output else None,
            t_queue=0.5,
            t_decode=0.01,
            t_infer=0.2,
            t_encode=0.03,
            t_write=0.004,
            t_metrics=0.05,
            t_total=0.3,
            device="cpu",
        )
        if output is not None and output.is_file() and output.suffix in (".png", ".tiff"):
            with Image.open(output) as im:
                fields.update(output_width=im.size[0], output_height=im.size[1], output_format=im.format.lower())
        store.finish([Finished(job.id, None, fields, list(metrics), archive_path=str(moved_to) if moved_to else None)])
    return job.id


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A history with every kind of job, its database hash, and `upscaled web` serving it."""
    tmp = tmp_path_factory.mktemp("web")
    cfg = write_config(tmp)
    settings = load_settings(cfg)
    ids: dict[str, Any] = {}
    store = SqlStore(settings.database)
    try:
        inputs = [image(tmp / "in" / f"p{i}.png", (48, 40), seed=i) for i in range(3)]
        reports = process_once(settings, inputs, Rule(model="bicubic", scale=2), tmp / "out", store=store)
        ids["done"] = [r["job"] for r in reports]
        bench = process_once(
            settings, inputs[:1], Rule(model="bicubic", scale=2, mode="benchmark"), tmp / "out", store=store
        )
        ids["benchmark"] = bench[0]["job"]
        ids["benchmark_output"] = bench[0]["output"]
        (tmp / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        ids["failed"] = process_once(
            settings, [tmp / "in" / "broken.png"], Rule(model="bicubic", scale=2), tmp / "out", store=store
        )[0]["job"]
        # What the watching service leaves: an archived input, a deleted one (delete_inputs), a failed one in failed/.
        arch = image(tmp / "archive" / "photos" / "kept.png", (40, 32), seed=7)
        out = image(tmp / "outbox" / "photos" / "kept.bicubic.x2.png", (80, 64), seed=7)
        ids["archived"] = add_job(
            store,
            name="kept.png",
            folder="photos",
            input_path=tmp / "inbox/photos/kept.png",
            output=out,
            moved_to=arch,
            metrics=(Metric("lr_psnr_y", 41.5, "y-bt601", 0, "lr-input", "LR consistency"),),
        )
        out = image(tmp / "outbox" / "photos" / "gone.bicubic.x2.png", (80, 64), seed=8)
        ids["deleted"] = add_job(
            store, name="gone.png", folder="photos", input_path=tmp / "inbox/photos/gone.png", output=out
        )
        bad = tmp / "failed" / "photos" / "empty.png"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b"")
        ids["watch_failed"] = add_job(
            store,
            name="empty.png",
            folder="photos",
            input_path=tmp / "inbox/x",
            state="failed",
            moved_to=bad,
            error=("empty-file", "empty.png is empty"),
        )
        # A 16-bit TIFF output: a browser cannot show it, so it is converted.
        deep = (np.linspace(0, 65535, 96 * 64 * 3).reshape(64, 96, 3)).astype(np.uint16)
        tif = tmp / "outbox" / "deep" / "deep.bicubic.x2.tiff"
        tif.parent.mkdir(parents=True)
        tif.write_bytes(imageio.encode(deep, "tiff")[0])
        ids["tiff"] = add_job(
            store, name="deep.tiff", folder="deep", input_path=tmp / "inbox/deep/deep.tiff", output=tif
        )
        ids["tiff_array"] = deep
        # Hostile names: a rule folder that closes an attribute, and a folder + file that spell a script tag.
        hostile_in = image(tmp / "archive" / HOSTILE_FOLDER / "a.png", (40, 32), seed=3)
        hostile_out = image(tmp / "outbox" / HOSTILE_FOLDER / "a.bicubic.x2.png", (80, 64), seed=3)
        ids["hostile"] = add_job(
            store, name="a.png", folder=HOSTILE_FOLDER, input_path=hostile_in, output=hostile_out, moved_to=hostile_in
        )
        script_out = image(tmp / "outbox" / SCRIPT_DIR / SCRIPT_FILE, (80, 64), seed=4)
        ids["script"] = add_job(
            store,
            name=SCRIPT_FILE,
            folder=SCRIPT_DIR,
            input_path=tmp / "x.png",
            output=script_out,
            state="failed",
            error=("decode", '<script>alert("e")</script>'),
        )
        # Rows that name files nobody should be able to read through the web view.
        ids["passwd"] = add_job(
            store, name="passwd.png", folder="evil", input_path="/etc/passwd", output=Path("/etc/passwd")
        )
        link = tmp / "outbox" / "evil" / "link.png"
        link.parent.mkdir(parents=True)
        secret = image(tmp / "private" / "secret.png", (40, 32), seed=9)
        link.symlink_to(secret)
        ids["symlink"] = add_job(store, name="link.png", folder="evil", input_path=tmp / "nothing.png", output=link)
        fifo = tmp / "outbox" / "evil" / "fifo.png"
        os.mkfifo(fifo)
        ids["fifo"] = add_job(store, name="fifo.png", folder="evil", input_path=tmp / "nothing.png", output=fifo)
        ids["relative"] = add_job(
            store, name="rel.png", folder="evil", input_path="../../../../../../etc/passwd", state="failed"
        )
        # Enough rows for two pages in a folder of their own (and two pages of everything).
        for i in range(61):
            add_job(store, name=f"bulk-{i:03d}.png", folder="bulk", input_path=tmp / f"bulk/{i}.png", state="pending")
        ids["run"] = store.add_bench_run(
            json.dumps(
                dict(
                    dataset_name="Set5",
                    models=["bicubic", "fsrcnn"],
                    scales=[2, 4],
                    downscale="matlab-bicubic",
                    device="cpu",
                )
            )
        )
    finally:
        store.close()
    db = Path(settings.sqlite_path())
    with sqlite3.connect(db) as con:
        ids["total"] = con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    server = WebServer(cfg)
    try:
        yield dict(server=server, ids=ids, tmp=tmp, cfg=cfg, db=db, db_sha=before, url=settings.database)
    finally:
        server.stop()


def job_ids(page: str) -> list[int]:
    return [int(x) for x in re.findall(r'<td><a href="/jobs/(\d+)">', page)]


# --- the list ------------------------------------------------------------------------------------------------------
def test_list_shows_the_newest_first_with_lazy_thumbnails_times_metrics_and_reasons(site):
    web = site["server"]
    page = web.page("/")
    ids = job_ids(page)
    assert len(ids) == 50 and ids == sorted(ids, reverse=True)
    assert f"Jobs 1–50 of {site['ids']['total']}, newest first." in page
    assert page.count('loading="lazy"') == 50
    page = web.page("/?folder=photos")
    assert set(job_ids(page)) == {site["ids"]["archived"], site["ids"]["deleted"], site["ids"]["watch_failed"]}
    assert "<b>empty-file</b>: empty.png is empty" in page  # the reason of the failed job
    assert "lr_psnr_y</span> 41.50 dB" in page  # the main metric of an upscale job
    assert re.search(r'<td class="num">300 ms</td>\s*<td class="num">200 ms</td>', page)  # total and infer


def test_filters_by_folder_model_state_date_and_name(site):
    web, ids = site["server"], site["ids"]
    assert set(job_ids(web.page("/?state=failed&folder=photos"))) == {ids["watch_failed"]}
    assert job_ids(web.page("/?folder=%2F")) == []  # the default rule's folder: no job was run under it
    assert set(job_ids(web.page("/?folder=(cli)&state=done"))) == set(ids["done"]) | {ids["benchmark"]}
    assert set(job_ids(web.page("/?q=GONE"))) == {ids["deleted"]}  # any case
    assert job_ids(web.page("/?q=%25")) == []  # a % is a character, not a wildcard
    assert job_ids(web.page("/?model=fsrcnn")) == []
    assert len(job_ids(web.page("/?from=2000-01-01&to=2999-12-31&folder=bulk"))) == 50
    assert job_ids(web.page("/?to=2000-01-01")) == []
    status, _, body = web.get("/?state=finished")
    assert status == 400 and b"state expects one of pending, running, done, failed, got &#39;finished&#39;" in body
    status, _, body = web.get("/?from=yesterday")
    assert status == 400 and b"from expects a date as YYYY-MM-DD, got &#39;yesterday&#39;" in body
    assert web.get("/?page=two")[0] == 400


def test_pages_through_the_history_keeping_the_filters(site):
    web = site["server"]
    first = web.page("/?folder=bulk")
    assert "page 1 of 2" in first and 'href="/?folder=bulk&amp;page=2"' in first
    second = web.page("/?folder=bulk&page=2")
    assert len(job_ids(second)) == 11 and "Jobs 51–61 of 61" in second
    assert not set(job_ids(first)) & set(job_ids(second))
    assert job_ids(web.page("/?folder=bulk&page=99")) == job_ids(second)  # past the end: the last page


# --- a job ---------------------------------------------------------------------------------------------------------
def test_job_page_has_the_slider_stage_times_every_metric_and_the_rule(site):
    web, job = site["server"], site["ids"]["done"][0]
    page = web.page(f"/jobs/{job}")
    for part in (
        f'<img class="before" src="/jobs/{job}/input"',
        f'<img class="after" src="/jobs/{job}/output"',
        '<input class="split" type="range"',
        'data-zoom="1"',
        "/static/compare.js",
    ):
        assert part in page, part
    store = SqlStore(site["url"], upgrade=False)
    try:
        metrics = store.metrics_of(job)
    finally:
        store.close()
    assert set(metrics) == {"lr_psnr_y", "lr_ssim_y"}
    for name, value in metrics.items():
        shown = f"{value:.2f} dB" if "psnr" in name else f"{value:.4f}"
        assert re.search(rf"<th[^>]*>{name}</th><td class=\"num\">{re.escape(shown)}</td>", page), name
    assert 'aria-label="Stage times"' in page and ">infer<" in page
    assert "&#34;model&#34;: &#34;bicubic&#34;" in page  # the recorded rule, escaped JSON


def test_images_are_the_files_of_the_job_row(site):
    web, job = site["server"], site["ids"]["done"][0]
    store = SqlStore(site["url"], upgrade=False)
    try:
        row = store.row(job)
    finally:
        store.close()
    status, headers, body = web.get(f"/jobs/{job}/output")
    assert status == 200 and headers["content-type"] == "image/png"
    assert body == Path(row["output_path"]).read_bytes()
    status, _, body = web.get(f"/jobs/{job}/input")
    assert status == 200 and body == Path(row["input_path"]).read_bytes()
    status, headers, body = web.get(f"/jobs/{job}/thumb")
    assert status == 200 and headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(body)) as im:
        assert im.format == "WEBP" and max(im.size) <= 160 and im.size == (96, 80)
    status, _, again = web.get(f"/jobs/{job}/thumb", headers={"If-None-Match": headers["etag"]})
    assert status == 304 and again == b""


def test_a_16_bit_tiff_is_converted_for_the_browser(site):
    web, job = site["server"], site["ids"]["tiff"]
    assert "(a TIFF file, shown as PNG)" in web.page(f"/jobs/{job}")
    status, headers, body = web.get(f"/jobs/{job}/output")
    assert status == 200 and headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(body)) as im:
        assert im.mode == "RGB" and im.size == (96, 64)
        shown = np.asarray(im).astype(int)
    expected = np.rint(site["ids"]["tiff_array"] / 257.0).astype(int)
    assert np.abs(shown - expected).max() <= 1  # the 16 bits were kept until the last step, not clipped


def test_benchmark_job_shows_hr_lr_and_output_and_the_lr_is_the_models_input(site):
    web, job = site["server"], site["ids"]["benchmark"]
    page = web.page(f"/jobs/{job}")
    assert "HR | LR | output" in page and f'<option value="/jobs/{job}/lr">LR' in page
    status, _, body = web.get(f"/jobs/{job}/lr")
    assert status == 200
    with Image.open(io.BytesIO(body)) as im:
        lr = np.asarray(im.convert("RGB"))
    # The pipeline wrote HR | LR (enlarged by nearest neighbour) | SR beside the output: its middle panel, sampled
    # once per LR pixel, is the very LR image the model got.
    compare = np.asarray(
        Image.open(
            Path(site["ids"]["benchmark_output"]).with_name(Path(site["ids"]["benchmark_output"]).stem + ".compare.png")
        ).convert("RGB")
    )
    w = (compare.shape[1] - 8) // 3
    middle = compare[:, w + 4 : 2 * w + 4][::2, ::2]
    assert lr.shape == (20, 24, 3) and np.array_equal(lr, middle)
    assert web.get(f"/jobs/{site['ids']['done'][0]}/lr")[0] == 404  # not a benchmark job


def test_a_deleted_input_says_input_not_kept(site):
    web, job = site["server"], site["ids"]["deleted"]
    page = web.page(f"/jobs/{job}")
    assert '<p class="missing input-missing">input not kept</p>' in page
    assert "not kept (deleted after processing: delete_inputs)" in page
    assert 'class="before"' not in page and f'src="/jobs/{job}/output"' in page  # the output alone, no slider
    status, _, body = web.get(f"/jobs/{job}/input")
    assert status == 404 and body == b"input not kept\n"
    assert web.get(f"/jobs/{job}/thumb")[1]["content-type"] == "image/webp"  # from the output


def test_failed_jobs_show_their_reason_and_a_placeholder_thumbnail(site):
    web, ids = site["server"], site["ids"]
    page = web.page(f"/jobs/{ids['failed']}")
    assert re.search(r'<div class="failure" role="alert"><b>decode</b>: .*broken\.png is not an image', page)
    assert "The input cannot be shown:" in page
    status, headers, body = web.get(f"/jobs/{ids['failed']}/thumb")
    assert status == 200 and headers["content-type"] == "image/svg+xml" and b"no preview" in body
    page = web.page(f"/jobs/{ids['watch_failed']}")
    assert "<b>empty-file</b>: empty.png is empty" in page


def test_missing_jobs_are_404(site):
    web = site["server"]
    for path in ("/jobs/999999", "/jobs/999999/input", "/jobs/999999/thumb", "/bench/999/report", "/nothing"):
        assert web.get(path)[0] == 404, path


# --- attacks -------------------------------------------------------------------------------------------------------
TRAVERSALS = [
    "/jobs/../../../../etc/passwd",
    "/jobs/1/../../../../etc/passwd",
    "/jobs/%2e%2e/%2e%2e/etc/passwd",
    "/jobs/..%2f..%2f..%2fetc%2fpasswd",
    "/jobs/1%2f..%2f..%2f..%2fetc%2fpasswd/input",
    "/jobs/-1/input",
    "/jobs/1/input/../../../../etc/passwd",
    "/jobs/1/input?path=/etc/passwd",
    "/jobs//etc/passwd/input",
    "/static/../../../../etc/passwd",
    "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e/app.py",
    "/static/..%2fapp.py",
    "/static/%2e%2e%2f%2e%2e%2fstore.py",
    "/static//etc/passwd",
    "/..%2f..%2fetc/passwd",
    "/jobs/1.0/input",
    "/jobs/0x1/input",
    "/bench/../etc/passwd/report",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_reads_nothing(site, path):
    status, _, body = site["server"].get(path)
    assert b"root:" not in body and b"def create_app" not in body and b"import " not in body
    if path.startswith("/jobs/1/input?"):
        assert status == 200 and body == Path(site["tmp"] / "in" / "p0.png").read_bytes()  # the row's file only
    else:
        assert status in (400, 404), (path, status)


def test_rows_that_name_other_files_are_not_served(site):
    web, ids = site["server"], site["ids"]
    status, _, body = web.get(f"/jobs/{ids['passwd']}/output")  # a row naming /etc/passwd: not an image
    assert status == 415 and b"root:" not in body and b"is not an image" in body
    status, _, body = web.get(f"/jobs/{ids['passwd']}/input")
    assert status == 415 and b"root:" not in body
    status, _, body = web.get(f"/jobs/{ids['symlink']}/output")  # a link put where an output was
    assert status == 415 and b"symbolic link" in body
    assert b"PNG" not in body
    status, _, body = web.get(f"/jobs/{ids['fifo']}/output")  # a FIFO must not hang the request
    assert status == 415 and b"not a regular file" in body
    status, _, body = web.get(f"/jobs/{ids['relative']}/input")
    assert status in (404, 415) and b"root:" not in body
    for job in ("passwd", "symlink", "fifo"):
        page = web.page(f"/jobs/{ids[job]}")
        assert "The output cannot be shown" in page and f'src="/jobs/{ids[job]}/output"' not in page


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, as a browser's parser sees them."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_script_injection_through_names_folders_and_errors_is_escaped(site):
    web, ids = site["server"], site["ids"]
    pages = [
        web.page("/?folder=" + quote(SCRIPT_DIR, safe="")),
        web.page("/?folder=" + quote(HOSTILE_FOLDER, safe="")),
        web.page(f"/jobs/{ids['hostile']}"),
        web.page(f"/jobs/{ids['script']}"),
        web.page("/stats"),
        web.page("/?q=" + quote("<script>alert(2)</script>", safe="")),
    ]
    for page in pages:
        tags = Tags(page).tags
        handlers = [(t, a) for t, a in tags if any(name.startswith("on") for name in a)]
        assert not handlers, handlers
        scripts = [a.get("src") for t, a in tags if t == "script"]
        assert all(src is not None and re.fullmatch(r"/static/[a-z]+\.js", src) for src in scripts), scripts
        images = [a.get("src") for t, a in tags if t == "img"]
        assert all(re.fullmatch(r"/jobs/\d+/(input|output|lr|thumb)", src or "") for src in images), images
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in pages[0]  # shown, as text
    assert len(job_ids(pages[1])) == 1  # the filter by that folder works, and shows the one job
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in pages[2]
    assert "&lt;script&gt;alert(&#34;e&#34;)&lt;/script&gt;" in pages[3]  # the error message too
    assert 'value="&lt;script&gt;alert(2)&lt;/script&gt;"' in pages[5]  # the search box echoes it escaped
    assert web.get(f"/jobs/{ids['hostile']}/input")[0] == 200  # and the hostile rows' images are served by id


def test_every_answer_carries_a_strict_csp_and_nosniff(site):
    web = site["server"]
    for path in (
        "/",
        f"/jobs/{site['ids']['done'][0]}",
        f"/jobs/{site['ids']['done'][0]}/output",
        "/stats",
        "/bench",
        "/static/style.css",
        "/nothing",
    ):
        _, headers, _ = web.get(path)
        assert headers["content-security-policy"].startswith("default-src 'self'"), path
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"


def test_a_foreign_host_header_is_refused(site):
    web = site["server"]
    assert web.get("/", headers={"Host": "attacker.example"})[0] == 400  # DNS rebinding from a web page
    assert web.get("/", headers={"Host": f"localhost:{web.port}"})[0] == 200


def test_it_writes_nothing(site):
    web = site["server"]
    status, headers, _ = web.get("/", method="POST")
    assert status == 405
    assert web.get(f"/jobs/{site['ids']['done'][0]}", method="DELETE")[0] == 405
    web.page("/stats")
    web.page("/bench")
    assert hashlib.sha256(site["db"].read_bytes()).hexdigest() == site["db_sha"]
    # The connection itself refuses writes: the same read-only engine the web view opens.
    engine = make_engine(site["url"], readonly=True)
    try:
        with pytest.raises(Exception, match="readonly|read-only"), engine.begin() as c:
            c.exec_driver_sql("UPDATE jobs SET state = 'done'")
    finally:
        engine.dispose()


def test_behind_a_proxy_under_a_path_prefix_every_link_carries_it(site):
    web = WebServer(site["cfg"], "--root-path", "/upscaled")
    try:
        page = web.page(f"/jobs/{site['ids']['done'][0]}")  # the proxy strips the prefix before passing it on
        links = re.findall(r'(?:href|src)="([^"]+)"', page)
        assert links and all(link.startswith("/upscaled/") for link in links), links
        assert web.get(f"/jobs/{site['ids']['done'][0]}/thumb")[0] == 200
    finally:
        web.stop()


# --- stats and bench -----------------------------------------------------------------------------------------------
def test_stats_page_shows_the_figures_of_upscaled_stats_and_a_chart(site):
    page = site["server"].page("/stats")
    engine = make_engine(site["url"], readonly=True)
    try:
        rows = history_stats(engine)
    finally:
        engine.dispose()
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    shown = re.findall(r'<td class="num">(\d+)</td><td class="num">(\d+)</td><td class="num[^"]*">(\d+)</td>', body)
    assert [tuple(map(int, s)) for s in shown] == [(r["jobs"], r["done"], r["failed"]) for r in rows]
    assert len(rows) >= 4
    assert '<svg class="chart"' in page and 'aria-label="Jobs finished per day"' in page
    assert '<rect class="bar done"' in page and '<rect class="bar failed"' in page
    status, _, body = site["server"].get("/stats?since=soon")
    assert status == 400 and b"--since expects" in body


def test_bench_page_lists_the_runs(site):
    page = site["server"].page("/bench")
    assert "Set5" in page and "bicubic, fsrcnn" in page and f'href="/?run={site["ids"]["run"]}"' in page
    assert "does not record report paths yet" not in page  # the schema records them; this run wrote none


def test_bench_report_is_linked_where_the_schema_records_it(tmp_path):
    """A database with bench_runs.report_path (revision 0005): the link, and the report served."""
    cfg = write_config(tmp_path)
    settings = load_settings(cfg)
    SqlStore(settings.database).close()
    report = tmp_path / "bench.html"
    report.write_text("<!doctype html><title>upscaled bench</title><style>p{color:red}</style><p>figures</p>")
    con = sqlite3.connect(settings.sqlite_path())
    with con:
        con.execute(
            "INSERT INTO bench_runs (started_at, settings, report_path) VALUES "
            "('2026-01-01 00:00:00', '{\"dataset_name\": \"Set5\"}', ?)",
            (str(report),),
        )
        con.execute(
            "INSERT INTO bench_runs (started_at, settings, report_path) VALUES ('2026-01-02 00:00:00', '{}', ?)",
            (str(tmp_path / "gone.html"),),
        )
        con.execute(
            "INSERT INTO bench_runs (started_at, settings, report_path) VALUES "
            "('2026-01-03 00:00:00', '{}', '/etc/passwd')",
            (),
        )
    con.close()
    web = WebServer(cfg)
    try:
        page = web.page("/bench")
        assert 'href="/bench/1/report">report</a>' in page and "report file missing" in page
        status, headers, body = web.get("/bench/1/report")
        assert status == 200 and body == report.read_bytes()
        assert "sandbox" in headers["content-security-policy"] and "script" not in headers["content-security-policy"]
        assert web.get("/bench/2/report")[0] == 404
        status, _, body = web.get("/bench/3/report")  # a row naming another file: not an HTML report, not sent
        assert status == 404 and b"root:" not in body and b"is not an HTML file" in body
    finally:
        web.stop()


# --- the command ---------------------------------------------------------------------------------------------------
def run_web(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "web", *args],
        cwd=cfg.parent,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def test_a_missing_database_or_a_bad_listen_address_is_a_clear_error(tmp_path):
    cfg = write_config(tmp_path)
    res = run_web(cfg, "--listen", "127.0.0.1:0")
    assert res.returncode == 1 and "upscaled.db does not exist yet" in res.stderr
    assert "start the service once" in res.stderr
    res = run_web(cfg, "--listen", "8080")
    assert res.returncode == 1 and "--listen expects host:port such as 127.0.0.1:8080" in res.stderr
    assert "Traceback" not in res.stderr


def test_on_postgresql_it_serves_the_history_and_its_sessions_cannot_write(tmp_path, pg_url):  # noqa: F811
    from sqlalchemy import text

    from daemon.web.app import create_app

    cfg = write_config(tmp_path, database=pg_url)
    settings = load_settings(cfg)
    store = SqlStore(pg_url)
    try:
        files = [image(tmp_path / "in" / f"p{i}.png", (48, 40), seed=i) for i in range(2)]
        reports = process_once(settings, files, Rule(model="bicubic", scale=2), tmp_path / "out", store=store)
    finally:
        store.close()
    web = WebServer(cfg)
    try:
        page = web.page("/")
        assert job_ids(page) == sorted((r["job"] for r in reports), reverse=True)
        status, _, body = web.get(f"/jobs/{reports[0]['job']}/output")
        assert status == 200 and body == Path(reports[0]["output"]).read_bytes()
        assert "bicubic" in web.page("/stats")
    finally:
        web.stop()
    engine = create_app(pg_url, cache_dir=tmp_path / "cache").state.view.engine
    try:
        with pytest.raises(Exception, match="read-only transaction"), engine.begin() as c:
            c.execute(text("UPDATE jobs SET state = 'failed'"))
    finally:
        engine.dispose()


# --- the parts, in process -----------------------------------------------------------------------------------------
def test_the_cache_stays_under_its_bound_and_drops_the_least_recently_used(tmp_path):
    from daemon.web.images import DiskCache

    cache = DiskCache(tmp_path / "c", max_bytes=10_000)
    for i in range(30):
        cache.put(f"{i:064x}", bytes([i]) * 1000)
        if i == 5:
            assert cache.get(f"{0:064x}") is not None  # used again: now among the most recent
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").glob("*/*"))
    assert on_disk <= 10_000
    assert cache.get(f"{29:064x}") == bytes([29]) * 1000 and cache.get(f"{1:064x}") is None
    assert DiskCache(tmp_path / "c", max_bytes=10_000)._size == on_disk  # a restart finds what is there


def test_a_replaced_file_gets_a_new_thumbnail_and_a_deleted_one_none(tmp_path):
    from daemon.web.images import DiskCache, Images

    images = Images(DiskCache(tmp_path / "cache"), shared_sandbox())
    path = image(tmp_path / "out.png", (200, 100), seed=1)
    first = images.thumbnail(str(path))
    assert images.thumbnail(str(path)) == first  # from the cache
    image(tmp_path / "new.png", (100, 200), seed=2).replace(path)
    second = images.thumbnail(str(path))
    assert second.etag != first.etag
    with Image.open(io.BytesIO(second.data)) as im:
        assert im.size == (80, 160)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        images.thumbnail(str(path))


def test_filters_round_trip_through_the_query_string():
    from daemon.web.data import Filters

    f = Filters.parse(
        {"folder": "/", "model": "fsrcnn", "state": "done", "from": "2026-01-02", "to": "", "q": "a&b", "run": "3"}
    )
    assert f.folder == "" and f.since is not None and f.until is None and f.run == 3
    assert Filters.parse(dict(parse_qsl(f.query(page=2)[1:]))) == f
    assert f.query(page=2).endswith("&page=2") and "q=a%26b" in f.query()
    assert Filters.parse({}).query() == "" and not Filters.parse({"folder": " "}).active


# pytest resets the warning filters per test; daemon.web.images filters this one in the web view's process.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_a_tiff_whose_directory_is_at_its_end_is_shown(tmp_path):
    """libtiff writes a compressed TIFF's directory after the pixels: past the 64 KiB read to probe a file."""
    from daemon.web.images import DiskCache, Images

    arr = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF", compression="tiff_deflate")  # Pillow's libtiff path
    data = buf.getvalue()
    assert int.from_bytes(data[4:8], "little") > 1 << 16  # the first directory's offset: past a 64 KiB head
    path = tmp_path / "late.tiff"
    path.write_bytes(data)
    images = Images(DiskCache(tmp_path / "cache"), shared_sandbox())
    probe = images.probe(str(path))
    assert probe.ok and (probe.width, probe.height, probe.format, probe.converted) == (300, 300, "TIFF", True)
    shown = images.display(str(path))
    with Image.open(io.BytesIO(shown.data)) as im:
        assert shown.media_type == "image/png" and np.array_equal(np.asarray(im), arr)
