"""``upscaled history`` and ``stats`` filters (daemon/history.py) over a real SQLite history, in process."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import PurePosixPath

import pytest

from daemon.config import Rule
from daemon.history import history, parse_since
from daemon.jobs import JobSpec
from daemon.store import SqlStore, make_engine
from models.errors import UpscaledError


def spec(i: int, folder: str) -> JobSpec:
    return JobSpec(
        sha=f"{i:064x}",
        rule=Rule(folder=folder, model="bicubic"),
        rel=PurePosixPath(f"{folder}/{i}.png"),
        input_path=f"/in/{folder}/{i}.png",
        folder=folder,
    )


def test_since_folder_and_status_filter_the_history(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    store = SqlStore(url)
    try:
        jobs = [r.job for r in store.register([spec(1, "photos"), spec(2, "photos"), spec(3, "scans")])]
    finally:
        store.close()
    three_hours_ago = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(hours=3)
    with sqlite3.connect(tmp_path / "h.db") as con:  # the first job arrived three hours ago
        con.execute("UPDATE jobs SET created_at = ? WHERE id = ?", (three_hours_ago.isoformat(" "), jobs[0].id))
    engine = make_engine(url, readonly=True)
    try:
        ids = lambda **f: sorted(r["id"] for r in history(engine, **f))  # noqa: E731
        assert ids() == sorted(j.id for j in jobs)
        assert ids(since="2h") == [jobs[1].id, jobs[2].id], "--since 2h must show the jobs of the last two hours only"
        assert ids(since="4h") == sorted(j.id for j in jobs)
        assert ids(folder="photos") == [jobs[0].id, jobs[1].id] and ids(folder="photos/", since="2h") == [jobs[1].id]
        assert ids(status="done") == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("bad", ["yesterday", "2 hours", "-1h"])
def test_a_since_that_is_not_a_duration_or_a_date_says_what_it_expects(bad):
    with pytest.raises(UpscaledError, match="--since expects 90s, 30m, 2h, 7d, 1w or an ISO date"):
        parse_since(bad)
