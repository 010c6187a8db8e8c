"""The durable store on a real SQLite file: uniqueness, claims, recovery, metrics, views."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from daemon.metrics import Metric
from daemon.store import VIEWS, Store


def _fields(name: str = "a.png") -> dict:
    return dict(rel_path=name, input_path=f"/in/{name}", model_id="bicubic", scale=2.0, outscale=2.0, mode="upscale")


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db' / 'u.db'}")
    yield s
    s.close()


def test_sqlite_is_wal_with_busy_timeout(store):
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_register_is_idempotent_on_content_and_rule(store):
    a = store.register("1" * 64, "f1", _fields())
    b = store.register("1" * 64, "f1", _fields("renamed.png"))
    c = store.register("1" * 64, "f2", _fields())
    assert a.created and not b.created and c.created
    assert a.job_id == b.job_id != c.job_id
    assert store.counts()["pending"] == 2


def test_claim_is_exclusive_and_recover_requeues(store):
    j = store.register("2" * 64, "f", _fields()).job_id
    first = store.claim()
    assert first["id"] == j and first["state"] == "running" and first["attempts"] == 1 and first["worker"]
    assert store.claim() is None and store.claim(job_id=j) is None
    assert store.recover() == 1
    assert store.get(j)["state"] == "pending"
    assert store.claim()["attempts"] == 2


def test_finish_stores_metrics_atomically_and_views_pivot_them(store, tmp_path):
    j = store.register("3" * 64, "f", _fields()).job_id
    store.claim()
    store.finish(j, {"t_total": 1.5, "t_infer": 1.0, "device": "cpu"},
                 [Metric("psnr_y", 31.5, "y-bt601", 2, "hr", "p"), Metric("ssim_y", 0.9, "y-bt601", 2, "hr", "p")])
    assert store.metrics_of(j) == {"psnr_y": 31.5, "ssim_y": 0.9}
    con = sqlite3.connect(tmp_path / "db" / "u.db")
    assert set(VIEWS) <= {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'view'")}
    row = con.execute("SELECT psnr_y, ssim_y, brisque, state FROM job_metrics WHERE id = ?", (j,)).fetchone()
    assert row == (31.5, 0.9, None, "done")
    summary = con.execute("SELECT jobs, done, failed, mean_total_s, mean_psnr_y FROM model_summary").fetchone()
    assert summary == (1, 1, 0, 1.5, 31.5)
    with pytest.raises(sqlite3.IntegrityError):  # one value per metric and job
        con.execute("INSERT INTO metrics (job_id, name, value, space, shave, reference, protocol) "
                    "VALUES (?, 'psnr_y', 1, 'y', 0, 'hr', 'p')", (j,))


def test_release_does_not_count_the_attempt(store):
    j = store.register("4" * 64, "f", _fields()).job_id
    store.claim()
    store.release(j)
    assert store.get(j)["state"] == "pending" and store.get(j)["attempts"] == 0


def _register_many(url: str, n: int, q: mp.Queue) -> None:
    s = Store(url)
    created = sum(s.register(f"{i:064d}", "f", _fields(f"{i}.png")).created for i in range(n))
    claimed = []
    while (job := s.claim()) is not None:
        claimed.append(job["id"])
    q.put((created, claimed))


def test_two_processes_never_duplicate_or_double_claim(tmp_path):
    url = f"sqlite:///{tmp_path / 'u.db'}"
    Store(url).close()
    q: mp.Queue = mp.get_context("spawn").Queue()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(url, 40, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(r[0] for r in results) == 40  # each key created exactly once
    claimed = results[0][1] + results[1][1]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 40  # each job claimed exactly once


def test_a_worker_that_lost_its_lease_cannot_fail_retry_or_finish_the_job(store):
    j = store.register("5" * 64, "f", _fields()).job_id
    mine = store.claim()["worker"]
    store.update(j, worker="other-host:99")  # the job was taken over after our heartbeat went stale
    assert not store.fail(j, "decode", "x", owner=mine)
    assert not store.retry_later(j, "disk-full", "x", store.get(j)["updated_at"], owner=mine)
    assert not store.finish(j, {"t_total": 1.0}, [], owner=mine)
    assert store.get(j)["state"] == "running" and store.get(j)["worker"] == "other-host:99"
    assert store.fail(j, "decode", "bad", owner="other-host:99")  # the owner can
    assert store.get(j)["state"] == "failed" and store.get(j)["heartbeat_at"] is None
