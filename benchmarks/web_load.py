"""Scrape time of /metrics and load time of the web view's list page, with 10,000 jobs in the database.

    python benchmarks/web_load.py [--jobs 10000] [--repeat 50] [--no-browser]

The history is a real SQLite database made by :class:`daemon.store.SqlStore` (schema, indexes and views by its
migrations), filled with the store's own tables in bulk (10,000 one-row transactions with full fsync would only
time the disk): 8 rule folders x 3 models, 90 % done, 6 % failed, 2 % pending, 2 % running, 2 to 5 metric rows per
done job, over 30 days. Every job has its own input and output path; the files are hard links to 24 real images
(320x240 in, 1280x960 out), so a thumbnail is made once per job, as it would be.

Measured, each against a baseline in the same run:

- ``/metrics`` of a :class:`daemon.telemetry.HttpServer` whose Telemetry saw the 10,000 outcomes, with the queue
  gauge computed from the database at every scrape (a GROUP BY on jobs.state). Baseline: prometheus_client's own
  ``start_http_server`` serving the same series kept in stock Counter/Histogram objects (no database query).
- The list page of a real ``upscaled web`` subprocess: the HTML of page 1, of a deep page (offset 7,500), filtered
  (failed jobs, a name search); then the 50 thumbnails of page 1 cold (made and cached) and warm. Baselines: a
  static file from the same server (the floor of the HTTP stack) and ``daemon.history.history(limit=50)``, the
  query behind ``upscaled history``, in process.
- With Chromium: the whole page in a real browser, navigation to the load event and to every visible thumbnail
  decoded, cold cache and warm.

Times are medians (and p95) over ``--repeat`` runs; the results also go to benchmarks/results/web_load.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("UPSCALED_SHARED", ROOT.parent / "shared"))
FOLDERS = ["", "photos", "scans", "fast", "archive/2024", "clients/acme", "benchmark", "web"]
MODELS = [("fsrcnn", 4.0), ("bicubic", 2.0), ("espcn", 3.0)]


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    fn()  # warm: connections, caches, imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    return dict(median_ms=statistics.median(times) * 1e3, p95_ms=p95 * 1e3)


def make_sources(folder: Path, n: int = 24) -> list[tuple[Path, Path]]:
    """``n`` (input 320x240, output 1280x960) PNG pairs from crops of Set5 (random texture without it)."""
    rng = np.random.default_rng(0)
    sets = sorted((SHARED / "datasets/Set5/HR").glob("*.png"))
    pics = [np.asarray(Image.open(p).convert("RGB")) for p in sets] or [
        rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = pics[i % len(pics)]
        if min(src.shape[:2]) < 480:
            src = np.asarray(Image.fromarray(src).resize((640, 480), Image.Resampling.BICUBIC))
        y, x = rng.integers(0, src.shape[0] - 240 + 1), rng.integers(0, src.shape[1] - 320 + 1)
        small = Image.fromarray(np.ascontiguousarray(src[y : y + 240, x : x + 320]))
        a, b = folder / f"in{i}.png", folder / f"out{i}.png"
        small.save(a)
        small.resize((1280, 960), Image.Resampling.BICUBIC).save(b, compress_level=6)
        out.append((a, b))
    return out


def fill(url: str, root: Path, n: int) -> dict[str, int]:
    """``n`` jobs through the store's tables (see the module docstring); returns the count per state."""
    from daemon.store import SqlStore, jobs, metrics

    store = SqlStore(url)
    sources = make_sources(root / "sources")
    rnd = random.Random(1)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    job_rows, metric_rows, counts = [], [], {}
    for i in range(1, n + 1):
        folder = FOLDERS[i % len(FOLDERS)]
        model, scale = MODELS[i % len(MODELS)]
        r = rnd.random()
        state = "done" if r < 0.90 else "failed" if r < 0.96 else "pending" if r < 0.98 else "running"
        counts[state] = counts.get(state, 0) + 1
        src, dst = sources[i % len(sources)]
        rel = f"{folder}/img{i:05d}.png" if folder else f"img{i:05d}.png"
        inp = root / "archive" / rel
        out = root / "outbox" / rel.replace(".png", f".{model}.x{scale:g}.png")
        for link, target in ((inp, src), (out, dst)):
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(target, link)
        created = now - dt.timedelta(seconds=(n - i) * 30 * 86400 / n)
        total = rnd.uniform(0.05, 3.0)
        row = dict(
            id=i,
            content_sha256=f"{i:064x}",
            rule_fingerprint=f"{i % 8:032x}",
            state=state,
            attempts=1 if state != "pending" else 0,
            source="watch",
            folder=folder,
            rel_path=rel,
            input_path=str(root / "inbox" / rel),
            input_size=src.stat().st_size,
            input_width=320,
            input_height=240,
            input_format="png",
            input_mode="RGB",
            bits=8,
            model_id=model,
            backend="opencv",
            scale=scale,
            outscale=scale,
            mode="benchmark" if folder == "benchmark" else "upscale",
            device="cpu",
            created_at=created,
            updated_at=created,
            rule_json=json.dumps({"model": model}),
        )
        if state in ("done", "failed", "running"):
            row.update(started_at=created, worker="bench:1", node="bench")
        if state == "done":
            row.update(
                finished_at=created + dt.timedelta(seconds=total),
                output_path=str(out),
                output_size=dst.stat().st_size,
                output_width=1280,
                output_height=960,
                output_format="png",
                input_moved_to=str(inp),
                t_queue=rnd.uniform(0, 5),
                t_decode=0.01,
                t_load=0.0,
                t_infer=total * 0.6,
                t_encode=total * 0.3,
                t_write=0.005,
                t_metrics=total * 0.1,
                t_total=total,
            )
            names = (
                ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "mse_rgb")
                if row["mode"] == "benchmark"
                else ("lr_psnr_y", "lr_ssim_y", "brisque")
            )
            for name in names:
                metric_rows.append(
                    dict(
                        job_id=i,
                        name=name,
                        value=rnd.uniform(20, 40),
                        space="y-bt601",
                        shave=4,
                        reference="hr",
                        protocol="synthetic",
                    )
                )
        elif state == "failed":
            row.update(
                finished_at=created,
                error_kind="decode",
                error=f"img{i}.png is damaged or truncated",
                input_moved_to=str(inp),
            )
        job_rows.append(row)
    keys = sorted({k for r in job_rows for k in r})
    job_rows = [dict.fromkeys(keys) | r for r in job_rows]  # one INSERT for all: every row names every column
    with store.engine.begin() as c:
        for k in range(0, len(job_rows), 1000):
            c.execute(jobs.insert(), job_rows[k : k + 1000])
        for k in range(0, len(metric_rows), 5000):
            c.execute(metrics.insert(), metric_rows[k : k + 5000])
    store.close()
    return counts


# --- /metrics ---------------------------------------------------------------------------------------------------------
class DbHealth:
    """The queue as a node would count it: one GROUP BY over jobs.state, through the read-only engine."""

    def __init__(self, url: str) -> None:
        from daemon.store import make_engine

        self.engine = make_engine(url, readonly=True)

    def liveness(self) -> dict[str, str | None]:
        return {"main_loop": None}

    def readiness(self) -> dict[str, str | None]:
        return {"database": None}

    def queue(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from daemon.store import jobs

        with self.engine.connect() as c:
            rows = c.execute(
                select(jobs.c.state, func.count())
                .where(jobs.c.state.in_(("pending", "running")))
                .group_by(jobs.c.state)
            ).all()
        return {"pending": 0, "running": 0} | {s: n for s, n in rows}


def outcomes(url: str) -> list[dict]:
    import sqlite3

    from daemon.telemetry import STAGES

    con = sqlite3.connect(url[len("sqlite:///") :])
    con.row_factory = sqlite3.Row
    rows = con.execute("SELECT * FROM jobs WHERE state IN ('done', 'failed')").fetchall()
    con.close()
    return [
        dict(
            rule=r["folder"],
            model=r["model_id"],
            status=r["state"],
            stages={s: r[f"t_{s}"] for s in STAGES if r[f"t_{s}"] is not None},
            pixels_in=320 * 240,
            pixels_out=(r["output_width"] or 0) * (r["output_height"] or 0),
        )
        for r in rows
    ]


def scrape(port: int, conn_box: dict) -> bytes:
    conn = conn_box.get("c") or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn_box["c"] = conn
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, resp.status
    return body


def bench_metrics(url: str, repeat: int) -> dict:
    from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

    from daemon.telemetry import BUCKETS, HttpServer, Telemetry

    done = outcomes(url)
    health = DbHealth(url)
    tele = Telemetry("bench", "0.1.0", {"torch": "-", "cuda": "-", "opencv": "4"}, health=health)
    stock = CollectorRegistry()
    c = Counter("upscaled_jobs", "jobs", ["rule", "model", "status"], registry=stock)
    h = Histogram("upscaled_job_duration_seconds", "d", ["rule", "model", "stage"], buckets=BUCKETS, registry=stock)
    for o in done:
        tele.job_outcome(**o)
        c.labels(o["rule"] or "(default)", o["model"], o["status"]).inc()
        for stage, v in o["stages"].items():
            h.labels(o["rule"] or "(default)", o["model"], stage).observe(v)
    server = HttpServer("127.0.0.1:0", tele, health)
    server.start()
    bare = HttpServer("127.0.0.1:0", Telemetry("bench", "0.1.0", {}, health=None), health)
    bare.start()
    stock_server, _ = start_http_server(0, addr="127.0.0.1", registry=stock)
    try:
        ours: dict = {}
        bare_box: dict = {}
        body = scrape(server.address[1], ours)
        result = dict(
            outcomes=len(done),
            exposition_bytes=len(body),
            series=body.count(b"\nupscaled_"),
            ours=timed(lambda: scrape(server.address[1], ours), repeat),
            ours_queue_query=timed(health.queue, repeat),
            empty_telemetry=timed(lambda: scrape(bare.address[1], bare_box), repeat),
        )
        stock_conn = http.client.HTTPConnection("127.0.0.1", stock_server.server_address[1], timeout=30)

        def stock_scrape() -> None:
            stock_conn.request("GET", "/metrics")
            r = stock_conn.getresponse()
            r.read()

        result["stock_prometheus_client"] = timed(stock_scrape, repeat)
        result["ratio_ours_to_stock"] = result["ours"]["median_ms"] / result["stock_prometheus_client"]["median_ms"]
        return result
    finally:
        server.close()
        bare.close()
        stock_server.shutdown()
        stock_server.server_close()


# --- the list page ----------------------------------------------------------------------------------------------------
class Web:
    def __init__(self, cfg: Path, cache: Path) -> None:
        self.log = open(cfg.parent / "web.log", "w")
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
                str(cache),
            ],
            cwd=cfg.parent,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        deadline = time.monotonic() + 60
        while True:
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", (cfg.parent / "web.log").read_text())
            if m:
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((cfg.parent / "web.log").read_text())
            time.sleep(0.05)
        self.local = threading.local()

    def get(self, path: str) -> bytes:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (path, resp.status, body[:300])
        return body

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def bench_list(cfg: Path, url: str, root: Path, repeat: int, browser: bool) -> dict:
    from daemon.history import history
    from daemon.store import make_engine

    cache = root / "web-cache"
    web = Web(cfg, cache)
    try:
        page1 = web.get("/").decode()
        thumbs = re.findall(r'src="(/jobs/\d+/thumb)"', page1)
        assert len(thumbs) == 50, len(thumbs)
        engine = make_engine(url, readonly=True)
        res = dict(
            html_bytes=len(page1),
            page_1=timed(lambda: web.get("/"), repeat),
            page_150=timed(lambda: web.get("/?page=150"), repeat),
            failed_only=timed(lambda: web.get("/?state=failed"), repeat),
            name_search=timed(lambda: web.get("/?q=img0999"), repeat),
            static_file_baseline=timed(lambda: web.get("/static/style.css"), repeat),
            history_query_baseline=timed(lambda: history(engine, limit=50), repeat),
        )
        engine.dispose()
        # Thumbnails: cold (each made from its 1280x960 PNG and cached), then warm; 6 at once, as a browser asks.
        t0 = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(web.get, thumbs))
        res["thumbs_50_cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(web.get, thumbs))
        res["thumbs_50_warm_s"] = time.perf_counter() - t0
        res["ratio_page_1_to_static"] = res["page_1"]["median_ms"] / res["static_file_baseline"]["median_ms"]
        if browser:
            res["chromium"] = bench_browser(web.port, cache)
        return res
    finally:
        web.stop()


def bench_browser(port: int, cache: Path) -> dict | str:
    from tests.chromium import Browser, chromium_binary

    binary = chromium_binary()
    if binary is None:
        return "no chromium"
    base = f"http://127.0.0.1:{port}"
    out = {}
    with Browser(binary) as b:
        for label, path in (("warm", "/"), ("cold_page_3", "/?page=3")):
            # page 3's thumbnails were never asked for: they are made while the browser waits.
            page = b.new_page()
            t0 = time.perf_counter()
            page.navigate(base + path)
            loaded = time.perf_counter() - t0
            page.wait(
                "Array.from(document.images).filter(i => i.loading !== 'lazy' || "
                "i.getBoundingClientRect().top < innerHeight).every(i => i.complete && i.naturalWidth > 0)",
                timeout=120,
            )
            visible = time.perf_counter() - t0
            nav = page.evaluate(
                "(() => { const n = performance.getEntriesByType('navigation')[0];"
                " return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd}; })()"
            )
            shown = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
            out[label] = dict(
                load_event_ms=nav["load"],
                dom_content_loaded_ms=nav["dcl"],
                wall_to_load_ms=loaded * 1e3,
                wall_to_visible_thumbs_ms=visible * 1e3,
                thumbs_shown=shown,
                errors=len(page.console_errors()),
            )
            page.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    from daemon import logs
    from tests.conftest import write_config

    logs.configure("warning")  # as the service runs: no debug line per scrape

    root = Path(tempfile.mkdtemp(prefix="upscaled-web-bench-"))
    try:
        cfg = write_config(root)
        url = f"sqlite:///{root / 'var' / 'upscaled.db'}"
        t0 = time.perf_counter()
        counts = fill(url, root, args.jobs)
        print(f"history: {args.jobs} jobs {counts} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        result = dict(
            jobs=args.jobs,
            states=counts,
            cpu=os.cpu_count(),
            metrics=bench_metrics(url, args.repeat),
            list=bench_list(cfg, url, root, args.repeat, not args.no_browser),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / "web_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    m, w = result["metrics"], result["list"]
    print(
        f"/metrics with {args.jobs} jobs ({m['series']} upscaled_ series, {m['exposition_bytes']} bytes): "
        f"median {m['ours']['median_ms']:.2f} ms, p95 {m['ours']['p95_ms']:.2f} ms (of which the queue query "
        f"{m['ours_queue_query']['median_ms']:.2f} ms); stock prometheus_client with the same series "
        f"{m['stock_prometheus_client']['median_ms']:.2f} ms: ratio {m['ratio_ours_to_stock']:.2f}; "
        f"an empty Telemetry {m['empty_telemetry']['median_ms']:.2f} ms"
    )
    print(
        f"list page 1 HTML: median {w['page_1']['median_ms']:.1f} ms (p95 {w['page_1']['p95_ms']:.1f}); "
        f"page 150 {w['page_150']['median_ms']:.1f} ms; failed only {w['failed_only']['median_ms']:.1f} ms; "
        f"name search {w['name_search']['median_ms']:.1f} ms; static file "
        f"{w['static_file_baseline']['median_ms']:.2f} ms (ratio {w['ratio_page_1_to_static']:.1f}); "
        f"`upscaled history` query in process {w['history_query_baseline']['median_ms']:.1f} ms"
    )
    print(f"50 thumbnails of page 1: cold {w['thumbs_50_cold_s']:.2f} s, warm {w['thumbs_50_warm_s'] * 1e3:.0f} ms")
    if isinstance(w.get("chromium"), dict):
        for label, c in w["chromium"].items():
            print(
                f"chromium {label}: load event {c['load_event_ms']:.0f} ms, visible thumbnails "
                f"{c['wall_to_visible_thumbs_ms']:.0f} ms, {c['thumbs_shown']} shown, {c['errors']} console errors"
            )
    print(f"(results in {out})")


if __name__ == "__main__":
    main()
