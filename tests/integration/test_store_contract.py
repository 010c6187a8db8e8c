"""One contract for every store (JobStore and NodeStore): the in-memory store, SQLite and PostgreSQL pass the same
tests.

The clock is injected (a fake one here, which is also the lease clock), so leases, retries and recovery are tested
without sleeping. How PostgreSQL's own clock stamps leases is tested at the end, on the real server clock.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import re
import sqlite3
from decimal import Decimal
from pathlib import PurePosixPath

import pytest
from sqlalchemy import text

from daemon.config import Rule
from daemon.errors import NodeInUseError
from daemon.fsops import FileId
from daemon.jobs import Finished, JobSpec, MemoryStore, NodeInfo, utcnow, worker_id
from daemon.metrics import Metric
from daemon.store import VIEWS, Pruned, SqlStore
from tests.conftest import FakeClock
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)

RULE = Rule(model="bicubic", scale=2)
T0 = FakeClock().start


def spec(i: int, name: str | None = None, folder: str = "", source: str = "watch", **kw) -> JobSpec:
    rel = PurePosixPath(folder, name or f"f{i}.png")
    rule = RULE if not folder else RULE.model_copy(update={"folder": folder})
    return JobSpec(
        sha=f"{i:064x}",
        rule=rule,
        rel=rel,
        input_path=f"/in/{rel}",
        source=source,
        input_size=10,
        input_id=FileId(1, 1000 + i),
        input_format="png",
        **kw,
    )


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request, tmp_path):
    clock = FakeClock()
    if request.param == "memory":
        s = MemoryStore(clock)
    elif request.param == "sqlite":
        s = SqlStore(f"sqlite:///{tmp_path / 'db' / 'u.db'}", clock=clock)
    else:  # the fake clock stands in for the server's, which no test can move
        s = SqlStore(request.getfixturevalue("pg_url"), clock=clock, lease_clock=clock)
    s.fake = clock
    yield s
    s.close()


def _plan(prefix: str = "/out"):
    def plan(job, taken):
        path = f"{prefix}/{job.rel.stem}.x2.png"
        n = 0
        while taken(path):
            n += 1
            path = f"{prefix}/{job.rel.stem}.x2-{n}.png"
        return path

    return plan


def test_register_is_idempotent_on_content_and_rule(store):
    (a,) = store.register([spec(1)])
    (b,) = store.register([spec(1, "renamed.png")])
    (c,) = store.register([JobSpec(**{**spec(1).__dict__, "fingerprint": "other"})])
    assert a.created and not b.created and c.created
    assert a.job.id == b.job.id != c.job.id
    assert b.job.rel == PurePosixPath("f1.png")  # the row as registered first
    assert store.counts()["pending"] == 2
    many = store.register([spec(i) for i in range(2, 7)] + [spec(2)])
    assert [r.created for r in many] == [True] * 5 + [False] and many[0].job.id == many[-1].job.id


def test_a_spec_that_fails_at_the_door_is_created_running_and_owned(store):
    (reg,) = store.register([spec(1, failure=ValueError("a link"))], node="n1")
    assert reg.created and reg.job.state == "running" and reg.job.worker == worker_id() and reg.job.attempts == 1
    assert store.claim("w") == []  # no worker ever sees it
    assert store.fail(reg.job.id, "unsafe-path", "a link", owner=reg.job.worker)


def test_claim_is_exclusive_reserves_the_output_and_takes_many_at_once(store):
    store.register([spec(i) for i in range(1, 5)])
    first = store.claim("w1", plan=_plan())
    assert [j.id for j in first] == [1] and first[0].state == "running" and first[0].attempts == 1
    assert first[0].worker == "w1" and first[0].output_path == "/out/f1.x2.png"
    assert store.get(1).output_path == "/out/f1.x2.png" and store.get(1).started_at == T0
    more = store.claim("w2", limit=10, plan=_plan())
    assert [j.id for j in more] == [2, 3, 4] and {j.worker for j in more} == {"w2"}
    assert store.claim("w3") == [] and store.claim("w3", job_id=1) == []


def test_an_output_another_job_owns_is_never_reserved_again(store):
    # Two inputs with the same stem map to one output name: the second gets -1, even though nothing is written yet.
    store.register([spec(1, "a.png"), spec(2, "a.jpg")])
    a, b = store.claim("w", limit=2, plan=_plan())
    assert a.output_path == "/out/a.x2.png" and b.output_path == "/out/a.x2-1.png"
    assert store.owner_of_output("/out/a.x2-1.png") == b.id


def test_claim_respects_folders_source_and_due_time(store):
    store.register([spec(1, folder="photos"), spec(2, folder="scans"), spec(3, source="cli")])
    assert [j.id for j in store.claim("w", folders=["scans"], source="watch")] == [2]
    assert store.claim("w", source="watch", folders=["photos", "scans"])[0].id == 1
    assert store.claim("w", source="watch") == []
    job = store.claim("w", job_id=3)[0]
    later = T0 + dt.timedelta(seconds=60)
    assert store.retry_later(job.id, "out-of-memory", "oom", later, owner="w")
    assert store.claim("w") == []  # not due yet
    store.fake.advance(61)
    assert store.claim("w")[0].attempts == 2


def test_finish_is_one_commit_for_many_and_checks_the_owner(store):
    store.register([spec(i) for i in range(1, 4)])
    a, b, c = store.claim("w", limit=3)
    m = [Metric("psnr_y", 31.5, "y-bt601", 2, "hr", "p"), Metric("ssim_y", 0.9, "y-bt601", 2, "hr", "p")]
    done = store.finish(
        [
            Finished(a.id, "w", {"t_total": 1.5}, m, archive_path="/archive/f1.png"),
            Finished(b.id, "someone-else", {"t_total": 1.0}),
            Finished(c.id, "w", {"t_total": 2.0}, metrics_pending=True),
        ]
    )
    assert done == [True, False, True]
    assert store.get(a.id).state == "done" and store.get(a.id).input_moved_to == "/archive/f1.png"
    assert store.metrics_of(a.id) == {"psnr_y": 31.5, "ssim_y": 0.9}
    assert store.get(b.id).state == "running"  # not ours to finish
    assert store.get(c.id).metrics_state == "pending"
    assert [j.id for j in store.metrics_pending(None, 30)] == [c.id]
    store.record_metrics(c.id, [Metric("brisque", 40.0, "-", 0, "none", "b")])
    assert store.get(c.id).metrics_state == "done" and store.metrics_of(c.id) == {"brisque": 40.0}
    assert store.metrics_pending(None, 30) == []


def test_pending_metrics_are_read_oldest_first_a_page_at_a_time(store):
    """The measurer reads the metrics it left to the store back in pages (daemon/worker.py, Runner): the oldest
    first, never more than asked for, and a recorded one is never read again."""
    store.register([spec(i) for i in range(1, 6)])
    claimed = store.claim("w", limit=5)
    store.finish([Finished(j.id, "w", {"t_total": 1.0}, metrics_pending=True) for j in reversed(claimed)])
    ids = sorted(j.id for j in claimed)
    assert [j.id for j in store.metrics_pending(None, 30, limit=2)] == ids[:2]
    store.record_metrics(ids[0], [])
    assert [j.id for j in store.metrics_pending(None, 30, limit=2)] == ids[1:3]
    assert [j.id for j in store.metrics_pending(None, 30, limit=10)] == ids[1:]


def test_a_worker_that_lost_its_lease_can_commit_nothing(store):
    store.register([spec(1)], node="n")
    job = store.claim("mine", node="n")[0]
    assert store.release(job.id, owner="mine")  # given back (shutdown deadline): the attempt does not count
    assert store.get(job.id).state == "pending" and store.get(job.id).attempts == 0
    store.claim("theirs", node="m")
    assert not store.fail(job.id, "decode", "x", owner="mine")
    assert not store.retry_later(job.id, "disk-full", "x", T0, owner="mine")
    assert store.finish([Finished(job.id, "mine", {})]) == [False]
    assert not store.release(job.id, owner="mine")
    assert store.get(job.id).state == "running" and store.get(job.id).worker == "theirs"
    assert store.fail(job.id, "decode", "bad", owner="theirs")
    assert store.get(job.id).state == "failed" and store.get(job.id).error_kind == "decode"


def test_recover_takes_back_stale_own_and_unowned_jobs_and_spares_what_it_is_told(store):
    store.register([spec(i) for i in range(1, 5)])
    for node in ("dead", "me", "alive"):
        store.join(node, NodeInfo("h", 1), NO_ONE)
    store.claim("w", node="dead")
    store.claim("w", node="me")
    store.claim("cli-worker")  # no node: a one-off run
    store.claim("w", node="alive")
    store.fake.advance(10)
    assert store.recover(stale_after=30) == []  # every lease is fresh
    store.fake.advance(25)
    store.heartbeat("alive")
    found = store.recover(stale_after=30, spare=lambda j: j.node == "me")
    assert [j.id for j in found] == [1]  # dead's lease is 35 s old; me is spared; alive renewed its lease
    assert store.get(1).state == "pending" and store.get(1).node is None
    assert [j.id for j in store.recover(own_node="me")] == [2]
    assert [j.id for j in store.recover(unowned=True, spare=lambda j: False)] == [3]
    assert store.get(4).state == "running"


def NO_ONE(row) -> bool:  # noqa: N802 - a join's in_use predicate: no daemon holds the name
    return False


# --- nodes -----------------------------------------------------------------------------------------------------------
INFO = NodeInfo("host-a", 41, device="cpu", workers=2, folders='["photos"]', rules_fingerprint="r1")


def test_join_enters_a_node_and_takes_over_a_name_only_when_its_holder_is_gone(store):
    assert store.join("a", INFO, NO_ONE) is None  # a new name
    assert [(n.row.name, n.state, n.row.info) for n in store.nodes(30)] == [("a", "live", INFO)]
    store.fake.advance(12)
    seen = []

    def alive(row) -> bool:
        seen.append(row)
        return True

    with pytest.raises(NodeInUseError, match="node name 'a' is in use by pid 41 on host-a; give every daemon its own"):
        store.join("a", NodeInfo("host-b", 7), alive)
    (row,) = seen
    assert (row.name, row.info, row.lease_age_s, row.stopped_at) == ("a", INFO, 12.0, None)
    (a,) = store.nodes(30)
    assert a.row.info == INFO and a.row.started_at == T0  # refused: the row is as it was
    before = store.join("a", NodeInfo("host-b", 7), NO_ONE)  # its holder is gone: the name is taken over
    assert before.info == INFO and before.lease_age_s == 12.0
    (a,) = store.nodes(30)
    assert a.row.info == NodeInfo("host-b", 7) and a.row.started_at == a.row.heartbeat_at == T0 + dt.timedelta(
        seconds=12
    )
    assert a.row.lease_age_s == 0.0 and a.row.stopped_at is None


def test_heartbeat_renews_the_node_and_its_running_jobs_leases_only(store):
    with pytest.raises(KeyError, match="'ghost' has not joined"):
        store.heartbeat("ghost")
    store.join("a", INFO, NO_ONE)
    store.join("b", INFO, NO_ONE)
    store.register([spec(1), spec(2), spec(3)])
    (mine,) = store.claim("w", node="a")
    (theirs,) = store.claim("w", node="b")
    (done,) = store.claim("w", node="a")
    assert store.finish([Finished(done.id, "w", {})]) == [True]
    store.fake.advance(25)
    beat = store.heartbeat("a")
    assert (beat.at, beat.skew_s, beat.uncertainty_s) == (T0 + dt.timedelta(seconds=25), 0.0, 0.0)  # one clock
    store.fake.advance(10)
    assert {n.row.name: n.row.lease_age_s for n in store.nodes(30, include_gone=True)} == {"a": 10.0, "b": 35.0}
    assert [j.id for j in store.recover(stale_after=30)] == [theirs.id]  # a's lease renewed, b's lapsed
    assert store.get(mine.id).state == "running" and store.get(done.id).state == "done"


def test_nodes_lists_state_running_files_and_throughput(store):
    store.join("a", INFO, NO_ONE)
    store.join("b", NodeInfo("host-b", 2), NO_ONE)
    store.join("c", NodeInfo("host-c", 3), NO_ONE)
    store.register([spec(i) for i in range(1, 6)] + [spec(9, os.fsdecode(b"odd\xff.png"))])
    first = store.claim("w", node="a", limit=2)
    assert store.finish([Finished(j.id, "w", {}) for j in first]) == [True, True]
    store.fake.advance(120)
    (late,) = store.claim("w", node="a")
    assert store.finish([Finished(late.id, "w", {})]) == [True]
    store.claim("w", node="a", limit=2)
    store.claim("w", node="b", job_id=6)
    store.leave("c")
    store.heartbeat("a")
    store.heartbeat("b")
    live = store.nodes(30, window_s=60)
    assert [(n.row.name, n.state) for n in live] == [("a", "live"), ("b", "live")]
    a, b = live
    assert a.running == ("f4.png", "f5.png") and b.running == ("odd\\xff.png",)  # printable, oldest claim first
    assert (a.done, a.jobs_per_min, b.done, b.jobs_per_min) == (3, 1.0, 0, 0.0)  # 1 of 3 within the last 60 s
    assert a.flat()["current"] == "f4.png, f5.png" and a.flat()["running"] == 2 and a.flat()["folders"] == '["photos"]'
    assert b.flat()["folders"] == "(all)"
    store.fake.advance(31)
    store.heartbeat("a")
    assert [n.row.name for n in store.nodes(30)] == ["a"]
    every = {n.row.name: n.state for n in store.nodes(30, include_gone=True)}
    assert every == {"a": "live", "b": "stale", "c": "stopped"}
    (c,) = [n for n in store.nodes(30, include_gone=True) if n.row.name == "c"]
    assert c.row.stopped_at == T0 + dt.timedelta(seconds=120)


def test_requeue_rename_and_moves(store):
    store.register([spec(1), spec(2)])
    job = store.claim("w", plan=_plan())[0]
    assert store.fail(job.id, "decode", "bad", owner="w")
    store.record_move(job.id, "/failed/f1.png")
    assert store.get(job.id).input_moved_to == "/failed/f1.png"
    store.requeue(job.id, PurePosixPath("again.png"), "/in/again.png", FileId(1, 5))
    again = store.get(job.id)
    assert again.state == "pending" and again.attempts == 0 and again.output_path is None
    assert again.input_moved_to is None and again.rel == PurePosixPath("again.png") and again.input_id == FileId(1, 5)
    store.rename(2, PurePosixPath("sub/moved.png"), "/in/sub/moved.png", FileId(1, 6))
    assert store.get(2).rel == PurePosixPath("sub/moved.png") and store.get(2).state == "pending"


def test_a_name_that_is_not_utf8_is_stored_losslessly(store):
    odd = os.fsdecode(b"bad\xff\xfe\nname.png")
    (reg,) = store.register([spec(1, odd)])
    back = store.get(reg.job.id)
    assert os.fsencode(str(back.rel)) == b"bad\xff\xfe\nname.png"
    assert back.name == "bad\\xff\\xfe\\nname.png"  # printable, for logs and STATUS=
    store.record_move(reg.job.id, "/archive/" + odd)
    assert store.get(reg.job.id).input_moved_to == "/archive/bad\\xff\\xfe\nname.png"  # UTF-8 text for the DB


def test_counts_per_node(store):
    store.register([spec(i) for i in range(1, 5)])
    store.claim("w", node="a")
    store.claim("w", node="b")
    assert store.counts() == {"pending": 2, "running": 2, "done": 0, "failed": 0}
    assert store.counts(node="a")["running"] == 1 and store.counts(node="a")["pending"] == 2


# --- pruning the history, on SQLite and PostgreSQL --------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def sql_store(request, tmp_path):
    clock = FakeClock()
    url = f"sqlite:///{tmp_path / 'db' / 'u.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = SqlStore(url, clock=clock, lease_clock=clock)
    s.fake = clock
    yield s
    s.close()


def _summary(store) -> list[tuple]:
    cols = "model_id, scale, mode, jobs, done, failed, mean_total_s, mean_infer_s, mean_psnr_y, mean_brisque"
    with store.engine.connect() as c:
        rows = c.execute(text(f"SELECT {cols} FROM model_summary ORDER BY model_id, scale, mode")).all()
    return [tuple(round(float(v), 9) if isinstance(v, float | Decimal) else v for v in r) for r in rows]


def _psnr(value: float) -> list[Metric]:
    return [Metric("psnr_y", value, "y-bt601", 2, "hr", "p")]


def test_prune_deletes_what_ended_before_the_date_and_model_summary_keeps_its_figures(sql_store):
    s = sql_store
    run = s.add_bench_run("{}")
    s.register([spec(i) for i in range(1, 5)])
    s.register([spec(8, source="bench", bench_run_id=run)])
    s.register([spec(7)])  # stays pending
    s.join("old-node", NodeInfo("h", 1), NO_ONE)
    a, b, c = s.claim("w", limit=3, source="watch")
    (hung,) = s.claim("w", node="old-node", source="watch")  # running since T0: never pruned
    (bench,) = s.claim("w", source="bench")
    assert s.finish(
        [
            Finished(a.id, "w", {"t_total": 1.0, "t_infer": 0.5}, _psnr(30.0)),
            Finished(b.id, "w", {"t_total": 3.0, "t_infer": 1.5}, _psnr(32.0)),
            Finished(bench.id, "w", {"t_total": 9.0}, [Metric("brisque", 20.0, "-", 0, "none", "b")]),
        ]
    ) == [True, True, True]
    assert s.fail(c.id, "decode", "bad", owner="w")
    s.record_hook(a.id, "on_done", True, "ok")
    s.fake.advance(100 * 86400)
    s.join("new-node", NodeInfo("h", 2), NO_ONE)
    (recent,) = s.register([spec(5)])
    s.claim("w", job_id=recent.job.id)
    assert s.finish([Finished(recent.job.id, "w", {"t_total": 5.0, "t_infer": 2.5}, _psnr(34.0))]) == [True]
    before = _summary(s)
    assert before == [("bicubic", 2.0, "upscale", 7, 4, 1, 4.5, 1.5, 32.0, 20.0)]

    pruned = s.prune(T0 + dt.timedelta(days=90), batch=2)  # two batches and a half
    assert pruned == Pruned(jobs=4, metrics=3, hook_runs=1, bench_runs=1, nodes=1)
    assert _summary(s) == before  # the figures outlive the rows
    assert [s.get(j) for j in (a.id, b.id, c.id, bench.id)] == [None] * 4
    assert s.states([hung.id, 6, recent.job.id]) == {hung.id: "running", 6: "pending", recent.job.id: "done"}
    assert s.metrics_of(recent.job.id) == {"psnr_y": 34.0}
    assert [n.row.name for n in s.nodes(30, include_gone=True)] == ["new-node"]
    assert s.prune(T0 + dt.timedelta(days=90)) == Pruned(0, 0, 0, 0, 0)  # again: nothing, and no double count
    assert _summary(s) == before

    assert s.prune(T0 + dt.timedelta(days=200), keep_summary=False).jobs == 1
    # The recent job leaves the summary with its row; what the first prune kept stays.
    assert _summary(s) == [("bicubic", 2.0, "upscale", 6, 3, 1, round(13 / 3, 9), 1.0, 31.0, 20.0)]
    assert (s.get(recent.job.id), s.get(hung.id).state) == (None, "running")


def test_db_prune_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from daemon.cli import main

    url = f"sqlite:///{tmp_path / 'u.db'}"
    cfg = tmp_path / "settings.toml"
    cfg.write_text(f'database = "{url}"\n')
    old = SqlStore(url, clock=lambda: utcnow() - dt.timedelta(days=91))
    (job,) = old.claim("w") if old.register([spec(1)]) else []
    assert old.finish([Finished(job.id, "w", {"t_total": 1.0})]) == [True]
    old.close()
    new = SqlStore(url)
    new.register([spec(2)])
    res = CliRunner().invoke(main, ["--config", str(cfg), "db", "prune", "--older-than", "90d"])
    assert res.exit_code == 0, res.output
    assert re.fullmatch(
        r"deleted 1 jobs that ended before \S+ \S+ UTC \(0 metrics, 0 hook runs\), 0 bench runs and 0 nodes; "
        r"model_summary keeps their counts and means\n",
        res.output,
    ), res.output
    assert new.get(job.id) is None and new.get(2).state == "pending"
    new.close()
    bad = CliRunner().invoke(main, ["--config", str(cfg), "db", "prune", "--older-than", "soon"])
    assert bad.exit_code != 0 and "--since expects 90s, 30m, 2h, 7d, 1w or an ISO date, got 'soon'" in bad.output


# --- SQLite itself ---------------------------------------------------------------------------------------------------
@pytest.fixture
def sqlite_store(tmp_path):
    s = SqlStore(f"sqlite:///{tmp_path / 'db' / 'u.db'}")
    yield s
    s.close()


def test_sqlite_is_wal_with_busy_timeout_and_full_sync(sqlite_store):
    with sqlite_store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_the_schema_itself_refuses_a_second_job_for_one_content_and_rule(tmp_path):
    """The unique key is in the schema (the first migration), not only in the code: a raw duplicate INSERT on a fresh
    SQLite file is refused by the database."""
    SqlStore(f"sqlite:///{tmp_path / 'u.db'}").close()
    con = sqlite3.connect(tmp_path / "u.db")
    row = (
        "a" * 64,
        "fp",
        "pending",
        0,
        "watch",
        "",
        "x.png",
        "/in/x.png",
        "bicubic",
        2.0,
        2.0,
        "upscale",
        "2026-01-01",
        "2026-01-01",
    )
    sql = (
        "INSERT INTO jobs (content_sha256, rule_fingerprint, state, attempts, source, folder, rel_path, "
        "input_path, model_id, scale, outscale, mode, created_at, updated_at) VALUES "
        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    con.execute(sql, row)
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        con.execute(sql, row)
    con.close()


def test_finish_stores_metrics_and_the_views_pivot_them(sqlite_store, tmp_path):
    sqlite_store.register([spec(1)])
    j = sqlite_store.claim("w")[0].id
    sqlite_store.finish(
        [
            Finished(
                j,
                "w",
                {"t_total": 1.5, "t_infer": 1.0, "device": "cpu"},
                [Metric("psnr_y", 31.5, "y-bt601", 2, "hr", "p"), Metric("ssim_y", 0.9, "y-bt601", 2, "hr", "p")],
            )
        ]
    )
    con = sqlite3.connect(tmp_path / "db" / "u.db")
    assert set(VIEWS) <= {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'view'")}
    row = con.execute("SELECT psnr_y, ssim_y, brisque, state FROM job_metrics WHERE id = ?", (j,)).fetchone()
    assert row == (31.5, 0.9, None, "done")
    summary = con.execute("SELECT jobs, done, failed, mean_total_s, mean_psnr_y FROM model_summary").fetchone()
    assert summary == (1, 1, 0, 1.5, 31.5)
    with pytest.raises(sqlite3.IntegrityError):  # one value per metric and job
        con.execute(
            "INSERT INTO metrics (job_id, name, value, space, shave, reference, protocol) "
            "VALUES (?, 'psnr_y', 1, 'y', 0, 'hr', 'p')",
            (j,),
        )


def test_a_readonly_store_reads_and_cannot_write(sqlite_store, tmp_path):
    sqlite_store.register([spec(1)])
    ro = SqlStore(f"sqlite:///{tmp_path / 'db' / 'u.db'}", readonly=True)
    try:
        assert ro.get(1).rel == PurePosixPath("f1.png") and ro.counts()["pending"] == 1
        with pytest.raises(Exception, match="readonly|read-only|attempt to write"):
            ro.register([spec(2)])
    finally:
        ro.close()
    with pytest.raises(FileNotFoundError):
        SqlStore(f"sqlite:///{tmp_path / 'nowhere.db'}", readonly=True)
    assert not (tmp_path / "nowhere.db").exists()  # a reader never creates the database


def _register_many(url: str, n: int, q: mp.Queue) -> None:
    s = SqlStore(url)
    created = sum(r.created for r in s.register([spec(i) for i in range(n)]))
    claimed = []
    while jobs := s.claim(worker_id(), limit=3):
        claimed += [j.id for j in jobs]
    q.put((created, claimed))


def test_two_processes_never_duplicate_or_double_claim(tmp_path):
    url = f"sqlite:///{tmp_path / 'u.db'}"
    SqlStore(url).close()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_register_many, args=(url, 40, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(r[0] for r in results) == 40  # each key created exactly once
    claimed = results[0][1] + results[1][1]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 40  # each job claimed exactly once


# --- bench runs (BenchStore) ---------------------------------------------------------------------------------------
def test_a_bench_run_is_recorded_and_its_jobs_name_it(store):
    run = store.add_bench_run('{"models": ["bicubic"]}')
    (reg,) = store.register([spec(1, source="bench", bench_run_id=run)])
    (watch,) = store.register([spec(2)])
    assert reg.job.bench_run_id == run and store.get(reg.job.id).bench_run_id == run
    assert watch.job.bench_run_id is None and store.get(watch.job.id).bench_run_id is None
    store.set_bench_report(run, "/reports/bench.html")
    assert store.add_bench_run("{}") not in (run, None)


# --- PostgreSQL's clock ---------------------------------------------------------------------------------------------
def test_postgres_leases_are_stamped_and_aged_on_the_servers_clock_whatever_the_hosts_say(pg_url):  # noqa: F811
    """Two hosts whose clocks are 60 s ahead and 60 s behind: neither sees the other's fresh lease as stale, both
    read the same lease age, each heartbeat measures and records its host's skew, and a lease that really is old is
    taken."""
    off = {"ahead": 0.0, "behind": 0.0}  # the hosts' clocks are right when they join, then drift a minute apart
    ahead = SqlStore(pg_url, clock=lambda: utcnow() + dt.timedelta(seconds=off["ahead"]))
    behind = SqlStore(pg_url, upgrade=False, clock=lambda: utcnow() + dt.timedelta(seconds=off["behind"]))
    try:
        ahead.register([spec(1), spec(2)])
        ahead.join("ahead", NodeInfo("h1", 1), NO_ONE)
        behind.join("behind", NodeInfo("h2", 2), NO_ONE)
        assert {n.row.name: round(n.row.clock_skew_s) for n in behind.nodes(30)} == {"ahead": 0, "behind": 0}
        off.update(ahead=60.0, behind=-60.0)
        (a,) = ahead.claim("wa", node="ahead")
        (b,) = behind.claim("wb", node="behind")
        assert ahead.recover(stale_after=30) == [] and behind.recover(stale_after=30) == []
        up, down = ahead.heartbeat("ahead"), behind.heartbeat("behind")
        assert abs(up.skew_s - 60) <= up.uncertainty_s + 0.5 and abs(down.skew_s + 60) <= down.uncertainty_s + 0.5
        with ahead.engine.connect() as c:
            server = c.execute(text("SELECT timezone('UTC', now())")).scalar_one()
            stamped = dict(c.execute(text("SELECT node, heartbeat_at FROM jobs WHERE state = 'running'")).all())
        assert all(abs((t - server).total_seconds()) < 5 for t in stamped.values()), (server, stamped)
        ages = [{n.row.name: round(n.row.lease_age_s) for n in s.nodes(30)} for s in (ahead, behind)]
        assert ages[0] == ages[1] == {"ahead": 0, "behind": 0}
        assert {n.row.name: round(n.row.clock_skew_s) for n in behind.nodes(30)} == {"ahead": 60, "behind": -60}
        with ahead.engine.begin() as c:  # behind's host froze 31 s ago, on the server's clock
            c.execute(text("UPDATE jobs SET heartbeat_at = heartbeat_at - interval '31 seconds' WHERE node = 'behind'"))
            c.execute(
                text("UPDATE nodes SET heartbeat_at = heartbeat_at - interval '31 seconds' WHERE name = 'behind'")
            )
        assert [n.row.name for n in behind.nodes(30)] == ["ahead"]
        assert [j.id for j in ahead.recover(stale_after=30)] == [b.id]
        assert ahead.get(a.id).state == "running"
    finally:
        ahead.close()
        behind.close()
