"""A commit the database refuses (here: a table lock held past the statement timeout, on a real PostgreSQL) does not
drop the finished work: the batch is kept and committed on a later pass, and its input archived."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from sqlalchemy import create_engine, text

from daemon.config import load_settings
from daemon.dispositions import Mover
from daemon.fsops import Root
from daemon.intake import Intake
from daemon.jobs import worker_id
from daemon.store import SqlStore
from daemon.worker import Runner, Stages
from models.registry import ModelCache
from tests.conftest import image, shared_sandbox, write_config
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)


def test_a_refused_commit_is_tried_again_not_dropped(tmp_path, pg_url):  # noqa: F811
    rules = [{"folder": "", "model": "nearest", "scale": 2, "format": "png", "metrics": []}]
    s = load_settings(write_config(tmp_path, rules=rules, database=pg_url))
    store = SqlStore(pg_url, statement_timeout_s=1.0)
    inbox, outbox, archive, failed = Root(s.inbox), Root(s.outbox), Root(s.archive), Root(s.failed)
    stages = Stages(
        s, store, ModelCache(), inbox, outbox, Mover(store, inbox, archive, failed), node="n", sandbox=shared_sandbox()
    )
    image(s.inbox / "a.png", (24, 16))
    store.register([Intake(s, inbox, shared_sandbox()).spec(PurePosixPath("a.png"))], node="n")
    (task,) = stages.claim(worker_id(), 1)
    stages.run_task(task, "cpu")
    assert task.error is None
    runner = Runner(stages, ["cpu"], 1, lambda _name: worker_id())
    runner._inflight.add(task.job.id)
    runner._tasks[task.job.id] = task
    locker = create_engine(pg_url)
    try:
        with locker.connect() as c:
            c.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))  # no write gets through until it ends
            runner._settle_q.put(task)
            with pytest.raises(Exception, match="statement timeout|canceling statement"):
                runner._settle()
            assert store.get(task.job.id).state == "running" and (s.inbox / "a.png").exists()
            assert runner._inflight == {task.job.id}, "the task was dropped with its commit"
            c.rollback()
        runner._settle()  # the lock is gone: the same batch commits now
    finally:
        locker.dispose()
        store.close()
    job = SqlStore(pg_url).get(task.job.id)
    assert job.state == "done" and (s.archive / "a.png").exists() and not (s.inbox / "a.png").exists()
    assert runner._inflight == set()
