"""The poison-job contract, on every store (memory, SQLite, PostgreSQL): recoveries counted, jobs taken back claimed
only alone, and a job that died alone ``max_recoveries`` times failed as poison with its history."""

from __future__ import annotations

from dataclasses import replace

from daemon.jobs import recovery
from tests.integration.test_store_contract import spec, store  # noqa: F401  (the fixture over the three stores)
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)


def _die(store, worker: str = "w1") -> list:  # noqa: F811
    """The worker holding the running jobs dies: its node's jobs are taken back at its next start."""
    return store.recover(own_node="n", max_recoveries=2)


def test_a_job_taken_back_is_counted_and_claimed_only_alone_first(store):  # noqa: F811
    store.register([spec(1), spec(2), spec(3)], node="n")
    claimed = store.claim("w1", node="n", limit=2)
    assert [j.id for j in claimed] == [1, 2] and not any(j.alone for j in claimed)
    back = _die(store)
    assert sorted(j.id for j in back) == [1, 2]
    assert all(j.state == "pending" and j.recoveries == 1 and j.alone_deaths == 0 for j in back), back
    assert store.suspects() == 2
    # A claim that is not alone never takes a job taken back: the pipeline overlaps only innocent work.
    assert [j.id for j in store.claim("w2", node="n", limit=5)] == [3]
    (alone,) = store.claim("w2", node="n", limit=5, alone=True)
    assert alone.id == 1 and alone.alone and alone.recoveries == 1
    assert store.suspects() == 1


def test_a_job_that_dies_alone_max_recoveries_times_is_poison_with_its_history(store):  # noqa: F811
    store.register([spec(1), spec(2)], node="n")
    store.claim("w1", node="n", limit=2)
    (a, b) = sorted(_die(store), key=lambda j: j.id)  # died in a crowd: counted, never blamed
    assert a.alone_deaths == b.alone_deaths == 0
    (first,) = store.claim("w2", node="n", alone=True)
    (again,) = [j for j in _die(store) if j.id == first.id]
    assert again.state == "pending" and again.alone_deaths == 1 and again.recoveries == 2
    store.claim("w3", node="n", alone=True)
    (poison,) = [j for j in _die(store) if j.id == first.id]
    assert poison.state == "failed" and poison.error_kind == "poison" and poison.alone_deaths == 2
    assert "max_recoveries = 2" in poison.error and poison.error.count("died 2026") == 3, poison.error
    row = store.get(first.id)
    assert row.state == "failed" and row.error_kind == "poison"
    assert store.suspects() == 1  # the other one still waits for its turn alone


def test_a_clean_release_counts_nothing(store):  # noqa: F811
    store.register([spec(1)], node="n")
    (job,) = store.claim("w1", node="n", alone=True)
    assert store.release(job.id, owner="w1")
    again = store.get(job.id)
    assert again.state == "pending" and again.recoveries == 0 and again.alone_deaths == 0
    assert store.suspects() == 0


def test_the_history_keeps_the_last_five_deaths():
    from daemon.jobs import Job
    from tests.integration.test_store_contract import RULE, T0

    job = Job(id=1, sha="0" * 64, fingerprint="f", state="running", rule=RULE, rel=spec(1).rel, input_path="/x")
    for i in range(7):
        job = replace(job, state="running", alone=i % 2 == 0, worker=f"w{i}")
        job = replace(job, **recovery(job, T0, max_recoveries=None))
    assert job.state == "pending" and job.recoveries == 7 and job.alone_deaths == 4
    assert job.error.count("died 2026") == 5 and job.error.endswith("on w6 (alone)") and "on w1 " not in job.error
