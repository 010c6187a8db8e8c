"""Several daemons on one inbox and one real PostgreSQL database; Alembic migrations on SQLite and PostgreSQL.

Everything here runs the real thing: a PostgreSQL 15 server started by the ``pg_server`` fixture, real
``upscaled run`` subprocesses, real files. Without the server binaries the PostgreSQL tests skip and say why.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, inspect, text

from daemon import migrations
from daemon.config import Rule
from daemon.jobs import Finished, JobSpec, NodeInfo, utcnow
from daemon.store import SqlStore
from tests.conftest import Daemon, wait_for, write_config
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)

FROZEN_V2 = Path(__file__).parents[1] / "data" / "schema_v2_sqlite.sql"


def _spec(i: int, name: str = "a.png", folder: str = "") -> JobSpec:
    return JobSpec(
        sha=f"{i:064x}",
        rule=Rule(model="bicubic", folder=folder),
        rel=PurePosixPath(folder, name),
        input_path=f"/in/{name}",
        fingerprint="f",
    )


def _old_rows(c) -> None:  # noqa: ANN001
    """Rows as the schema-2 code wrote them: a bench run, a done job with metrics, a failed job."""
    now = "2024-05-01 10:00:00.000000"
    c.execute(
        text('INSERT INTO bench_runs (id, started_at, settings) VALUES (7, :t, \'{"models": ["fsrcnn"]}\')'), {"t": now}
    )
    for jid, state, run in ((1, "done", None), (2, "failed", None), (3, "done", 7)):
        c.execute(
            text(
                "INSERT INTO jobs (id, content_sha256, rule_fingerprint, state, attempts, source, folder, rel_path, "
                "input_path, model_id, scale, outscale, mode, created_at, updated_at, t_total, bench_run_id, "
                "output_path) VALUES (:id, :sha, 'f', :state, 1, 'watch', 'photos', :rel, :inp, 'fsrcnn', 2, 2, "
                "'upscale', :t, :t, 1.25, :run, :out)"
            ),
            dict(
                id=jid,
                sha=str(jid) * 64,
                state=state,
                rel=f"p{jid}.png",
                inp=f"/in/p{jid}.png",
                t=now,
                run=run,
                out=f"/out/p{jid}.png" if state == "done" else None,
            ),
        )
    c.execute(
        text(
            "INSERT INTO metrics (job_id, name, value, space, shave, reference, protocol) "
            "VALUES (1, 'psnr_y', 31.5, 'y', 2, 'hr', 'p'), (1, 'brisque', 20.0, 'y', 0, 'none', 'p')"
        )
    )


def _check_old_rows(url: str) -> None:
    eng = create_engine(url)
    try:
        with eng.connect() as c:
            jobs = [dict(r._mapping) for r in c.execute(text("SELECT * FROM jobs ORDER BY id"))]
            assert [(j["id"], j["state"], j["rel_path"], j["bench_run_id"], j["t_total"]) for j in jobs] == [
                (1, "done", "p1.png", None, 1.25),
                (2, "failed", "p2.png", None, 1.25),
                (3, "done", "p3.png", 7, 1.25),
            ]
            assert all(j["node"] is None and j["heartbeat_at"] is None for j in jobs)
            pivot = c.execute(text("SELECT psnr_y, brisque FROM job_metrics WHERE id = 1")).one()
            assert tuple(pivot) == (31.5, 20.0)
            summary = c.execute(text("SELECT jobs, done, failed FROM model_summary")).one()
            assert tuple(summary) == (3, 2, 1)
            assert c.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == str(
                int(migrations.head())
            )
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == migrations.head()
            assert "nodes" in inspect(c).get_table_names()
    finally:
        eng.dispose()


def _no_drift(url: str) -> None:
    """The migrated schema is what daemon.store's tables say: a column added without a revision fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from daemon.store import metadata

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            # SQLite's columns take any value whatever their declared type, so types are compared on PostgreSQL only.
            opts = {"compare_type": c.dialect.name != "sqlite"}
            diff = compare_metadata(MigrationContext.configure(c, opts=opts), metadata)
    finally:
        eng.dispose()
    assert diff == [], f"daemon/store.py and the Alembic revisions disagree; add a revision: {diff}"


# --- migrations -----------------------------------------------------------------------------------------------------
def test_a_schema_2_sqlite_database_is_upgraded_with_its_rows(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(FROZEN_V2.read_text())  # exactly what the code before Alembic created
    con.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    con.commit()
    con.close()
    url = f"sqlite:///{db}"
    eng = create_engine(url)
    with eng.begin() as c:
        _old_rows(c)
    eng.dispose()
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "db", "upgrade"],
        capture_output=True,
        text=True,
        env=dict(os.environ, UPSCALED_CONFIG=str(write_config(tmp_path, database=url))),
    )
    assert res.returncode == 0, res.stderr
    assert f"upgraded from legacy to {migrations.head()}" in res.stdout
    _check_old_rows(url)
    _no_drift(url)
    again = subprocess.run(
        [sys.executable, "-m", "daemon", "db", "upgrade"],
        capture_output=True,
        text=True,
        env=dict(os.environ, UPSCALED_CONFIG=str(tmp_path / "settings.toml")),
    )
    assert again.returncode == 0 and f"at {migrations.head()} already" in again.stdout


def test_a_revision_0001_postgres_database_is_upgraded_with_its_rows(pg_url):  # noqa: F811
    eng = create_engine(pg_url)
    assert migrations.upgrade(eng, "0001") == (None, "0001")  # the schema before nodes, made on PostgreSQL
    with eng.begin() as c:
        _old_rows(c)
        c.execute(text("SELECT setval('jobs_id_seq', 3)"))
    eng.dispose()
    store = SqlStore(pg_url)  # what `upscaled run` does at start
    try:
        _check_old_rows(pg_url)
        assert store.register([_spec(9, "new.png")])[0].job.id == 4  # the old rows' ids stay taken
        assert store.get(3).rule.model == "fsrcnn"  # an old row without a rule of today's shape still reads
    finally:
        store.close()
    _no_drift(pg_url)


def test_concurrent_upgrades_of_one_postgres_database_wait_for_each_other(pg_url):  # noqa: F811
    results: list[object] = []

    def one() -> None:
        eng = create_engine(pg_url)
        try:
            results.append(migrations.upgrade(eng))
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            results.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    head = migrations.head()
    assert sorted(results, key=str) == sorted([(None, head), (head, head), (head, head)], key=str), results


# --- the store on PostgreSQL ----------------------------------------------------------------------------------------
def test_postgres_claims_are_exclusive_under_concurrency(pg_url):  # noqa: F811
    store = SqlStore(pg_url)
    ids = [r.job.id for r in store.register([_spec(i, f"{i}.png") for i in range(120)])]
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        s = SqlStore(pg_url, upgrade=False)
        try:
            while jobs := s.claim(f"w{n}", node=f"n{n}", limit=n % 3 + 1):
                with lock:
                    claimed.extend(j.id for j in jobs)
                assert s.finish([Finished(j.id, f"w{n}", {}) for j in jobs]) == [True] * len(jobs)
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert sorted(claimed) == sorted(ids)  # each job exactly once
        assert store.counts()["done"] == 120
    finally:
        store.close()


def test_a_stale_lease_returns_the_job_and_the_old_owner_cannot_finish_it(pg_url):  # noqa: F811
    now = [utcnow()]
    store = SqlStore(pg_url, clock=lambda: now[0], lease_clock=lambda: now[0])  # leases aged without waiting
    try:
        j, other = (r.job.id for r in store.register([_spec(10, "a.png"), _spec(11, "b.png", folder="gpu")]))
        assert [x.id for x in store.claim("dead:1", node="cpu-node", folders=[""])] == [j]  # "gpu" is not served
        assert store.claim("w", node="cpu-node", folders=[""]) == []
        store.join("dead-node", NodeInfo("h", 1), lambda row: False)
        store.heartbeat("dead-node")  # an unrelated node's heartbeat renews nothing of cpu-node's
        assert store.recover(stale_after=30) == []  # fresh lease
        now[0] += dt.timedelta(seconds=31)
        (found,) = store.recover(stale_after=30)
        assert (found.id, found.node, found.worker) == (j, "cpu-node", "dead:1")
        (taken,) = store.claim("alive:2", node="n2")
        assert taken.id == j and taken.attempts == 2
        assert store.finish([Finished(j, "dead:1", {})]) == [False]  # the old owner lost its lease
        assert store.finish([Finished(j, "alive:2", {})]) == [True]
        assert store.get(other).state == "pending"
    finally:
        store.close()


# --- three daemons, one inbox, one killed -----------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
        buf, "PNG", compress_level=1
    )
    return buf.getvalue()


def _drop(root: Path, seeds: range) -> None:
    """Files appear whole: written beside the inbox, then renamed in (what a careful uploader does)."""
    for i in seeds:
        tmp = root / "staging" / f"f{i:03d}.png"
        tmp.write_bytes(_png(i))
        os.rename(tmp, root / "inbox" / ("sub" if i % 2 else "") / tmp.name)


def _query(url: str, sql: str, **params) -> list[dict]:
    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return [dict(r._mapping) for r in c.execute(text(sql), params)]
    finally:
        eng.dispose()


def test_three_daemons_share_an_inbox_and_finish_a_killed_ones_jobs(tmp_path, pg_url):  # noqa: F811
    heartbeat, stale, total = 0.3, 2.0, 300
    root = tmp_path
    for d in ("inbox/sub", "outbox", "archive", "failed", "staging"):
        (root / d).mkdir(parents=True)
    daemons: list[Daemon] = []
    try:
        for n in ("n1", "n2", "n3"):
            (root / n).mkdir()
            cfg = write_config(
                root / n,
                database=pg_url,
                node_name=n,
                heartbeat_seconds=heartbeat,
                workers=2 if n == "n3" else 1,  # n3's two threads claim against the others too
                stale_seconds=stale,
                settle_seconds=0.2,
                rescan_seconds=1.0,
                inbox=str(root / "inbox"),
                outbox=str(root / "outbox"),
                archive=str(root / "archive"),
                failed=str(root / "failed"),
                rules=[{"folder": "", "model": "bicubic", "scale": 2, "metrics": [], "compression": 1}],
            )
            daemons.append(Daemon(cfg))  # all three start (and migrate) at once
        for d in daemons:
            d.wait_started(60)
        n1 = daemons[0]
        _drop(root, range(0, 150))
        wait_for(
            lambda: _query(pg_url, "SELECT COUNT(*) AS n FROM jobs WHERE state = 'done' AND node = 'n1'")[0]["n"] >= 10,
            90,
            what="n1 to have done some jobs",
        )
        # Freeze n1 until it is caught holding a job, then kill it: its lease must run out for the others to act.
        held: list[dict] = []
        for _ in range(200):
            n1.proc.send_signal(signal.SIGSTOP)
            # n1 is frozen: the leases read now are the last it committed (an uncommitted renewal dies with it).
            held = _query(pg_url, "SELECT id, rel_path, heartbeat_at FROM jobs WHERE state = 'running' AND node = 'n1'")
            if held:
                break
            n1.proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        assert held, "n1 was never caught running a job"
        n1.proc.send_signal(signal.SIGKILL)
        n1.proc.wait(10)
        _drop(root, range(150, total))

        def all_done() -> bool:
            return _query(pg_url, "SELECT COUNT(*) AS n FROM jobs WHERE state = 'done'")[0]["n"] >= total

        wait_for(all_done, 150, interval=0.5, what=f"{total} done jobs")
        wait_for(lambda: not any((root / "inbox").rglob("*.png")), 30, what="the inbox to empty")

        jobs = _query(pg_url, "SELECT * FROM jobs")
        assert len(jobs) == total and {j["state"] for j in jobs} == {"done"}
        assert sorted(j["rel_path"] for j in jobs) == sorted(
            ("sub/" if i % 2 else "") + f"f{i:03d}.png" for i in range(total)
        )
        outbox = [p for p in (root / "outbox").rglob("*") if p.is_file()]
        assert not [p for p in outbox if p.name.endswith(".upscaled-tmp")], "partial files in the outbox"
        assert sorted(map(str, outbox)) == sorted(j["output_path"] for j in jobs), "one output per done row"
        archived = [p for p in (root / "archive").rglob("*") if p.is_file()]
        assert sorted(map(str, archived)) == sorted(j["input_moved_to"] for j in jobs), "one archive move per job"
        assert not list((root / "failed").rglob("*"))
        for p in outbox[:20]:
            assert Image.open(p).size == (24, 24)

        by_id = {j["id"]: j for j in jobs}
        events = [e for d in daemons[1:] for e in d.events()]
        recovered = {e["job"]: e for e in events if e.get("event") == "job.recovered"}
        for h in held:
            j = by_id[h["id"]]
            assert j["node"] in ("n2", "n3") and j["attempts"] >= 2, j
            assert recovered[h["id"]]["from_node"] == "n1"
            # Taken over only once the lease ran out: the new claim is more than stale_seconds after the job's last
            # lease renewal, both stamped by this host's clock (no guess at when n1 last beat, so no slack needed).
            assert (j["started_at"] - h["heartbeat_at"]).total_seconds() > stale, (j, h)
        assert {j["node"] for j in jobs} == {"n1", "n2", "n3"}
        n3 = [j for j in jobs if j["node"] == "n3"]
        assert n3 and {j["worker"] for j in n3} == {f"{socket.gethostname()}:{daemons[2].proc.pid}"}

        res = subprocess.run(
            [sys.executable, "-m", "daemon", "nodes", "--all", "--format", "json"],
            capture_output=True,
            text=True,
            cwd=root / "n2",
            env=dict(os.environ, UPSCALED_CONFIG=str(root / "n2" / "settings.toml")),
        )
        assert res.returncode == 0, res.stderr
        listed = {n["node"]: n for n in json.loads(res.stdout)}
        assert listed["n1"]["state"] == "stale" and listed["n2"]["state"] == "live" == listed["n3"]["state"]
        assert sum(n["done"] for n in listed.values()) == total and listed["n1"]["running"] == 0
        assert (listed["n2"]["workers"], listed["n3"]["workers"]) == (1, 2)
        for d in daemons[1:]:
            assert d.stop() == 0
        stopped = _query(pg_url, "SELECT name FROM nodes WHERE stopped_at IS NOT NULL ORDER BY name")
        assert [r["name"] for r in stopped] == ["n2", "n3"]
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)
            d.kill()


def test_a_second_daemon_under_a_live_nodes_name_refuses_to_start(tmp_path, pg_url, daemon):  # noqa: F811
    cfg = write_config(tmp_path, database=pg_url, node_name="same", heartbeat_seconds=0.5, stale_seconds=5.0)
    daemon(cfg)
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "run"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, UPSCALED_CONFIG=str(cfg)),
    )
    assert res.returncode != 0
    assert re.search(r"node name 'same' is in use by pid \d+", res.stdout + res.stderr)
