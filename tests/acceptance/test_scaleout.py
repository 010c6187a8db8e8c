"""Several daemons on one inbox and one real PostgreSQL database; Alembic migrations on SQLite and PostgreSQL.

Everything here runs the real thing: a PostgreSQL 15 server started by the ``pg_server`` fixture, real
``upscaled run`` subprocesses, real files. Without the server binaries the PostgreSQL tests skip and say why.
"""

from __future__ import annotations

import datetime as dt
import glob
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
import pytest
from PIL import Image
from sqlalchemy import create_engine, inspect, text

from daemon import migrations
from daemon.config import Rule
from daemon.jobs import Finished, JobSpec, NodeInfo, utcnow
from daemon.store import SqlStore
from tests.conftest import Daemon, wait_for, write_config
from tests.postgres import pg_roles, pg_server, pg_url  # noqa: F401  (fixtures)

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
        (taken,) = store.claim("alive:2", node="n2", alone=True)  # a recovered job runs alone
        assert taken.id == j and taken.attempts == 2
        assert store.finish([Finished(j, "dead:1", {})]) == [False]  # the old owner lost its lease
        assert store.finish([Finished(j, "alive:2", {})]) == [True]
        assert store.get(other).state == "pending"
    finally:
        store.close()


def _plan(job, taken) -> str:  # noqa: ANN001 - an OutputPlanner: <stem>.x2.png, then -1, -2 ...
    path, n = f"/out/{job.rel.stem}.x2.png", 0
    while taken(path):
        n += 1
        path = f"/out/{job.rel.stem}.x2-{n}.png"
    return path


def test_a_reader_holding_an_output_names_lock_stalls_no_claim(pg_url):  # noqa: F811
    """A session holding the advisory lock of the next output's name once kept that job and an unrelated one pending
    for 25 s: the claim waited on pg_advisory_xact_lock. A claim only tries the lock and takes the next name."""
    store = SqlStore(pg_url)
    eng = create_engine(pg_url)
    try:
        store.register([_spec(1, "a.png"), _spec(2, "b.png")])
        with eng.connect() as reader:
            held = reader.execute(text("SELECT pg_advisory_lock(hashtextextended('/out/a.x2.png', 0))")).all()
            assert held, "the reader took the lock"
            t0 = time.monotonic()
            claimed = store.claim("w", node="n", limit=2, plan=_plan)
            took = time.monotonic() - t0
            reader.execute(text("SELECT pg_advisory_unlock_all()"))
        assert [(j.rel.name, j.output_path) for j in claimed] == [
            ("a.png", "/out/a.x2-1.png"),
            ("b.png", "/out/b.x2.png"),
        ]
        assert took < 3.0, f"the claim waited {took:.1f} s on another session's lock"
    finally:
        eng.dispose()
        store.close()


def test_a_heartbeat_never_waits_for_a_job_row_a_finish_holds(pg_url):  # noqa: F811
    """A finish (a group commit) locks its jobs' rows one by one; a heartbeat that waited for one of them while
    holding another was a deadlock, and PostgreSQL failed the finish. The renewal skips a row someone holds."""
    store = SqlStore(pg_url, statement_timeout_s=5.0)
    eng = create_engine(pg_url)
    try:
        store.join("n", NodeInfo("h", 1), lambda row: False)
        store.register([_spec(1, "a.png"), _spec(2, "b.png")])
        a, b = store.claim("w", node="n", limit=2)
        with eng.connect() as finishing:
            finishing.execute(text("SELECT id FROM jobs WHERE id = :i FOR UPDATE"), {"i": a.id})
            t0 = time.monotonic()
            beat = store.heartbeat("n")
            assert time.monotonic() - t0 < 2.0, "the heartbeat waited for the finish's row"
            finishing.rollback()
        leases = {r["id"]: r["heartbeat_at"] for r in _query(pg_url, "SELECT id, heartbeat_at FROM jobs")}
        assert leases[b.id] == beat.at and leases[a.id] < beat.at  # the held row is renewed at the next beat
    finally:
        eng.dispose()
        store.close()


def test_query_runs_only_as_a_reader_role_that_can_neither_lock_nor_signal(pg_url, pg_roles):  # noqa: F811
    """The roles of docs/security.md: the service still claims (its output locks) and migrates; `query` as the reader
    can read but cannot take an advisory lock or terminate the service's sessions; `query` as any role that could is
    refused before the statement is sent."""
    from daemon.errors import QueryError
    from daemon.history import query

    service_url, reader_url = pg_roles
    store = SqlStore(service_url)  # migrates as the service role: pg_advisory_xact_lock is granted to it
    try:
        store.register([_spec(1, "a.png")])
        (job,) = store.claim("w", node="n", plan=_plan)  # pg_try_advisory_xact_lock, granted to it
        assert job.output_path == "/out/a.x2.png"
        assert query(reader_url, "SELECT rel_path FROM jobs") == [{"rel_path": "a.png"}]
        with pytest.raises(QueryError, match="permission denied for function pg_advisory_lock"):
            query(reader_url, "SELECT pg_advisory_lock(hashtextextended('/out/b.x2.png', 0))")
        with store.engine.connect() as c:  # a session of the service's to aim at
            pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
            with pytest.raises(QueryError, match="must be a member of the role whose process is being terminated"):
                query(reader_url, "SELECT pg_terminate_backend(:pid)", {"pid": pid})
            assert c.execute(text("SELECT 1")).scalar() == 1  # still alive
        with pytest.raises(QueryError, match=r"role 'svc_\w+' can signal the daemon's sessions .* advisory locks"):
            query(service_url, "SELECT 1")
        with pytest.raises(QueryError, match=r"role '\w+' is a superuser"):
            query(pg_url, "SELECT 1")
    finally:
        store.close()


def test_every_daemon_statement_has_a_timeout_and_a_migration_may_wait(pg_url):  # noqa: F811
    """A lock held elsewhere (or a stuck server) fails the daemon's statement after statement_timeout instead of
    hanging its thread; a migration queued behind another daemon's is not held to it."""
    from sqlalchemy.exc import OperationalError

    store = SqlStore(pg_url)
    with store.engine.connect() as c:
        assert c.execute(text("SHOW statement_timeout")).scalar() == "20s"  # every session of the daemon's
    store.close()
    short = SqlStore(pg_url, upgrade=False, statement_timeout_s=0.5)
    eng = create_engine(pg_url)
    try:
        short.register([_spec(1, "a.png")])
        short.join("n", NodeInfo("h", 1), lambda row: False)
        with eng.connect() as other:
            other.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))  # held until rollback
            for step in (lambda: short.claim("w", node="n"), lambda: short.heartbeat("n")):
                t0 = time.monotonic()
                with pytest.raises(OperationalError, match="statement timeout"):
                    step()
                assert time.monotonic() - t0 < 5.0
            other.rollback()
        assert [j.id for j in short.claim("w", node="n")] == [1]  # the next try goes through
        with eng.connect() as other:  # another daemon is migrating: its upgrade lock is held for 1.5 s
            other.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": migrations._PG_LOCK})
            release = threading.Timer(1.5, other.rollback)
            release.start()
            t0 = time.monotonic()
            assert short.upgrade() == (migrations.head(), migrations.head())
            assert time.monotonic() - t0 > 1.0  # it waited, past its 0.5 s statement_timeout
            release.join()
    finally:
        eng.dispose()
        short.close()


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

        def count(where: str) -> int:
            return _query(pg_url, f"SELECT COUNT(*) AS n FROM jobs WHERE {where}")[0]["n"]

        # Files in batches until n1 has done some jobs: which daemon claims a batch is a race, and on a loaded machine
        # one daemon once took 140 of 150 files dropped at once (n1 had 4). At least 50 are kept for after the kill.
        fed, deadline, by_n1 = 0, time.monotonic() + 120, "state = 'done' AND node = 'n1'"
        while count(by_n1) < 10:
            assert time.monotonic() < deadline and fed < total - 50, f"n1 did {count(by_n1)} of {fed} jobs in 120 s"
            if count("state = 'done'") >= fed - 5:  # the last batch is (nearly) done: the next one
                _drop(root, range(fed, fed + 25))
                fed += 25
            time.sleep(0.05)
        _drop(root, range(fed, fed + 25))  # work in hand for n1 to be caught with
        fed += 25
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
        _drop(root, range(fed, total))

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


# --- two daemons whose clocks disagree by a minute ------------------------------------------------------------------
# libfaketime (0.9.10, Debian 12) breaks Python's time.sleep: with the monotonic clock left true it fails with EINVAL,
# and with it faked too, timed waits hang. A condition variable's timed wait works either way, so the faked process
# sleeps on one (this file becomes its sitecustomize).
_SLEEP_SHIM = """import threading
import time

_never = threading.Event()


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    _never.wait(seconds)


time.sleep = _sleep
"""


def _faketime(offset: int, site: Path) -> dict[str, str]:
    """The environment that runs a process (and its children) with its wall clock ``offset`` seconds off
    (libfaketime); its monotonic clock stays true. ``site``: a folder for the sleep shim above."""
    libs = glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1")
    if not libs:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLEEP_SHIM)
    # No shared memory: it is for keeping children in step, and a killed daemon would leave its segment in /dev/shm.
    return {
        "LD_PRELOAD": libs[0],
        "FAKETIME": f"{offset:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DISABLE_SHM": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p),
    }


def _nodes_json(cfg: Path) -> dict[str, dict]:
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "nodes", "--all", "--format", "json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, UPSCALED_CONFIG=str(cfg)),
    )
    assert res.returncode == 0, res.stderr
    return {n["node"]: n for n in json.loads(res.stdout)}


@pytest.mark.parametrize("offset", [60, -60], ids=["ahead", "behind"])
def test_daemons_a_minute_apart_take_over_only_a_dead_ones_jobs_on_time(tmp_path, pg_url, offset):  # noqa: F811
    """On host clocks, a node 60 s ahead sees every live lease of its peers as stale and takes their jobs over; a
    node 60 s behind waits a minute too long to take over a dead one's. Leases on the database's clock: while both
    live, neither takes anything over (each job runs once); when the true one is killed, the skewed one takes its
    jobs over more than stale_seconds, and at most stale_seconds plus one heartbeat, after their last renewal."""
    env = _faketime(offset, tmp_path / "faketime-site")
    heartbeat, stale = 0.3, 2.0
    root = tmp_path
    for d in ("inbox/sub", "outbox", "archive", "failed", "staging"):
        (root / d).mkdir(parents=True)
    cfgs = {}
    for n in ("skewed", "true"):
        (root / n).mkdir()
        cfgs[n] = write_config(
            root / n,
            database=pg_url,
            node_name=n,
            heartbeat_seconds=heartbeat,
            stale_seconds=stale,
            max_clock_skew_seconds=5.0,
            settle_seconds=0.2,
            rescan_seconds=1.0,
            inbox=str(root / "inbox"),
            outbox=str(root / "outbox"),
            archive=str(root / "archive"),
            failed=str(root / "failed"),
            rules=[{"folder": "", "model": "bicubic", "scale": 2, "metrics": [], "compression": 1}],
        )
    skewed = Daemon(cfgs["skewed"], env=env)
    true = Daemon(cfgs["true"])
    try:
        skewed.wait_started(60)
        true.wait_started(60)
        total = 0
        for _ in range(8):  # files in rounds until both nodes have done some (a loaded box can favour one)
            _drop(root, range(total, total + 20))
            total += 20
            wait_for(
                lambda total=total: (
                    _query(pg_url, "SELECT COUNT(*) AS n FROM jobs WHERE state = 'done'")[0]["n"] >= total
                ),
                90,
                interval=0.2,
                what=f"{total} done jobs",
            )
            done_by = _query(pg_url, "SELECT DISTINCT node FROM jobs WHERE state = 'done'")
            if {r["node"] for r in done_by} == {"skewed", "true"}:
                break
        else:
            pytest.fail("one node did every job: the test could not see the two side by side")
        listed = _nodes_json(cfgs["true"])
        assert abs(listed["skewed"]["clock_skew_s"] - offset) < 1.0 and abs(listed["true"]["clock_skew_s"]) < 1.0
        assert listed["skewed"]["lease_age_s"] < stale and listed["true"]["lease_age_s"] < stale
        warned = [e for e in skewed.events() if e.get("event") == "node.clock_skew"]
        assert warned and abs(warned[0]["skew_s"] - offset) < 1.0, "the skewed node did not warn"
        assert not [e for e in true.events() if e.get("event") == "node.clock_skew"]

        _drop(root, range(total, total + 40))
        total += 40
        held: list[dict] = []  # catch the true node holding a job, then kill it (see the three-daemon test)
        for _ in range(300):
            true.proc.send_signal(signal.SIGSTOP)
            held = _query(pg_url, "SELECT id, heartbeat_at FROM jobs WHERE state = 'running' AND node = 'true'")
            if held:
                break
            true.proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        assert held, "the true node was never caught running a job"
        true.proc.send_signal(signal.SIGKILL)
        true.proc.wait(10)
        wait_for(
            lambda: _query(pg_url, "SELECT COUNT(*) AS n FROM jobs WHERE state = 'done'")[0]["n"] >= total,
            120,
            interval=0.3,
            what=f"{total} done jobs",
        )
        jobs = {j["id"]: j for j in _query(pg_url, "SELECT id, node, attempts FROM jobs")}
        retaken = {h["id"] for h in held}
        twice = {i for i, j in jobs.items() if j["attempts"] != 1}
        assert twice == retaken, f"jobs run twice while both nodes lived: {sorted(twice - retaken)}"
        assert all(jobs[i]["node"] == "skewed" for i in retaken)
        recovered = {e["job"]: e for e in skewed.events() if e.get("event") == "job.recovered"}
        assert set(recovered) == retaken, recovered
        skew = dt.timedelta(seconds=_nodes_json(cfgs["skewed"])["skewed"]["clock_skew_s"])
        for h in held:
            # When it was taken over, on the database's clock: the skewed node's log time less its measured skew.
            at = dt.datetime.fromisoformat(recovered[h["id"]]["timestamp"]).replace(tzinfo=None) - skew
            late = (at - h["heartbeat_at"]).total_seconds()
            # The slack is a loaded 2-core box's: one beat's two transactions and the log line. On host clocks the
            # ahead node takes over at once (a live lease looks a minute old), the behind one a minute late.
            assert stale < late <= stale + heartbeat + 2.0, f"taken over {late:.2f} s after its last lease renewal"
        assert skewed.stop() == 0
    finally:
        for d in (skewed, true):
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
