"""Promises of the running daemon that had no test: the real `upscaled run`, signalled, paused at failpoints, and
listened to on a notify socket of our own.

- watchdog pings keep coming through a long tiled job (every tile beats), and stop while a worker hangs in the model;
  STATUS= names the job, its stage and its tile;
- a job claimed by a daemon that died is taken back at the next start, not only once its lease runs out;
- SIGHUP reloads ``ignore`` and ``settle_seconds``, names the keys that need a restart, and queued jobs keep the
  rule they were registered with; SIGINT stops like SIGTERM;
- ``serve_folders``: a node claims only its folders' jobs; a custom ``ignore`` list holds for events and scans.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from pathlib import Path

import numpy as np
from PIL import Image

from daemon.failpoints import EXIT_CODE
from tests.acceptance.test_systemd import Listener
from tests.conftest import Daemon, image, ready_rows, rows, wait_for, write_config

FAST = {"folder": "", "model": "fsrcnn", "scale": 2, "metrics": []}


def put(tmp_path: Path, rel: str, size: tuple[int, int] = (40, 32), seed: int = 0) -> Path:
    """An image that appears whole in the inbox: written beside it, then renamed in."""
    staging = tmp_path / "staging" / Path(rel).name
    image(staging, size, seed=seed, format="PNG")  # PNG bytes whatever the name says
    dest = tmp_path / "inbox" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, dest)
    return dest


def event(d: Daemon, name: str) -> dict | None:
    return next((e for e in d.events() if e.get("event") == name), None)


def armed(tmp_path: Path, point: str, action: str = "pause") -> tuple[dict, Path]:
    """The environment that arms one failpoint, and the folder where its ``.hit`` / ``.release`` files go."""
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    return {
        "UPSCALED_FAILPOINTS_TEST": "1",
        "UPSCALED_FAILPOINTS": f"{point}={action}",
        "UPSCALED_FAILPOINT_DIR": str(marks),
    }, marks


# --- the watchdog ------------------------------------------------------------------------------------------------
def _pixels_for(seconds: float, weights_dir: Path) -> int:
    """How many input pixels FSRCNN x2 in 32 px tiles gets through in ``seconds`` on this machine, measured now
    (so the long job is long on a fast machine too, and not needlessly long on a slow one)."""
    from models import progress
    from models.registry import LoadContext, ModelCache

    up, _ = ModelCache().get("fsrcnn", 2, LoadContext(weights_dir, "cpu", 32, None))
    sample = np.random.default_rng(1).random((256, 256, 3)).astype(np.float32)
    t0 = time.monotonic()
    with progress.reporting(lambda done, total, unit="tile": None):
        up(sample)
    return int(seconds * sample.shape[0] * sample.shape[1] / max(1e-3, time.monotonic() - t0))


def test_watchdog_pings_keep_coming_through_a_long_tiled_job_and_status_shows_the_tile(tmp_path, weights_dir):
    watchdog = 2.0  # WatchdogSec: pings every 0.67 s while no thread is silent for 1 s (3x margin under load)
    listener = Listener(tmp_path, abstract=False)
    cfg = write_config(
        tmp_path, weights=weights_dir, settle_seconds=0.1, rules=[{**FAST, "tile": 32}]
    )  # 32 px tiles: thousands of beats in one image
    # Sized for 6 x WatchdogSec of tiles as measured in this process; in the daemon, beside its other threads, the
    # tiles have run at half that speed or less.
    side = int(np.clip(np.sqrt(_pixels_for(6 * watchdog, weights_dir)), 800, 3200))
    staging = tmp_path / "staging" / "big.png"
    staging.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(staging, compress_level=1)
    d = Daemon(cfg, {"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": str(int(watchdog * 1_000_000))})
    try:
        listener.wait_for("READY=1")
        os.rename(staging, tmp_path / "inbox" / "big.png")
        listener.until(
            lambda msgs: any(m.startswith("STATUS=") and "done 1" in m for _, m in msgs),
            180,
            what="the job done on STATUS=",
        )
        msgs = listener.messages
        tiles = [(t, m) for t, m in msgs if m.startswith("STATUS=") and "big.png (fsrcnn x2, tile " in m]
        assert tiles, [m for _, m in msgs if m.startswith("STATUS=")]
        first, last = tiles[0][0], tiles[-1][0]
        # Long enough that a worker beating once per job (not per tile) would go silent for more than WatchdogSec.
        assert last - first >= 2 * watchdog, f"the tiles took {last - first:.1f} s: too short to prove anything"
        # While the model runs (the encode that follows is test_watchdog_allows_a_long_encode's).
        pings = [t for t in listener.pings() if first <= t <= last]
        gaps = np.diff([first, *pings, last])
        assert gaps.max() < watchdog, f"no ping for {gaps.max():.1f} s while the model ran"
        assert any(first + watchdog <= t <= last for t in pings)  # after the job's first stage had gone stale
        assert d.stop() == 0
    finally:
        d.kill()
        listener.sock.close()


def test_watchdog_pings_keep_coming_through_one_long_call_that_cannot_beat(tmp_path, weights_dir):
    """A classical x2 of a 3000 x 3000 image: the resize and the 36 MP PNG encode are single calls, each longer
    than WatchdogSec / 2 here. Their allowance (5 s per megapixel) keeps the pings coming through them."""
    watchdog = 1.0  # a thread silent for 0.5 s would stop the pings
    listener = Listener(tmp_path, abstract=True)
    cfg = write_config(
        tmp_path,
        weights=weights_dir,
        settle_seconds=0.1,
        max_output_pixels=50_000_000,
        rules=[{"folder": "", "model": "bicubic", "scale": 2, "format": "png", "metrics": []}],
    )
    staging = tmp_path / "staging" / "wide.png"
    staging.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)).save(
        staging, compress_level=1
    )
    d = Daemon(cfg, {"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": str(int(watchdog * 1_000_000))})
    try:
        listener.wait_for("READY=1")
        os.rename(staging, tmp_path / "inbox" / "wide.png")
        dropped = time.monotonic()
        listener.until(
            lambda msgs: any(m.startswith("STATUS=") and "done 1" in m for _, m in msgs),
            180,
            what="the job done on STATUS=",
        )
        done = next(t for t, m in listener.messages if m.startswith("STATUS=") and "done 1" in m)
        write = [t for t, m in listener.messages if m.startswith("STATUS=") and "wide.png (bicubic x2, write)" in m]
        assert write, "STATUS= never showed the write stage"
        # The calls were long: without the allowance, these gaps are what systemd would have seen.
        assert done - write[0] > watchdog / 2, f"the write took {done - write[0]:.2f} s: too short to prove anything"
        pings = [t for t in listener.pings() if dropped <= t <= done]
        gaps = np.diff([dropped, *pings, done])
        assert gaps.max() < watchdog, f"no ping for {gaps.max():.1f} s during one long call"
        assert d.stop() == 0
        assert Image.open(tmp_path / "outbox" / "wide.bicubic.x2.png").size == (6000, 6000)
    finally:
        d.kill()
        listener.sock.close()


def test_a_worker_hung_in_the_model_stops_the_pings_and_they_resume_when_it_moves(tmp_path, weights_dir):
    watchdog = 2.0  # a thread silent for 1 s stops the pings; STATUS= still comes every 0.67 s
    listener = Listener(tmp_path, abstract=True)
    cfg = write_config(tmp_path, weights=weights_dir, settle_seconds=0.1, rules=[FAST])
    env, marks = armed(tmp_path, "in-infer")
    d = Daemon(cfg, env | {"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": str(int(watchdog * 1_000_000))})
    try:
        listener.wait_for("READY=1")
        put(tmp_path, "stuck.png")
        wait_for(lambda: (marks / "in-infer.hit").exists(), 60, what="a worker inside the model")
        hung_at = time.monotonic()  # the worker's last beat was before this
        listener.until(lambda msgs: any(t > hung_at + 2 * watchdog for t, _ in msgs), 60, what="4 s of messages")
        window = [(t, m) for t, m in listener.messages if hung_at + watchdog <= t <= hung_at + 2 * watchdog]
        statuses = [m for _, m in window if m.startswith("STATUS=")]
        assert statuses and "stuck.png (fsrcnn x2, infer)" in statuses[-1]  # the main loop lives, and says where
        assert "WATCHDOG=1" not in [m for _, m in window], "a hung worker must stop the pings"
        (marks / "in-infer.release").touch()
        released = time.monotonic()
        listener.until(
            lambda msgs: any(m == "WATCHDOG=1" and t > released for t, m in msgs), 60, what="the pings to resume"
        )
        assert d.stop() == 0
        assert (tmp_path / "outbox" / "stuck.fsrcnn.x2.png").exists()
    finally:
        d.kill()
        listener.sock.close()


# --- a claimed job is taken back at the next start ------------------------------------------------------------------
def test_a_claimed_job_of_a_dead_daemon_is_taken_back_at_the_next_start(tmp_path, weights_dir, daemon):
    # stale_seconds far away: only the start's own recovery can give the job back within this test.
    cfg = write_config(
        tmp_path, weights=weights_dir, settle_seconds=0.1, rules=[FAST], heartbeat_seconds=5, stale_seconds=600
    )
    env, _ = armed(tmp_path, "after-claim", "exit")
    d = Daemon(cfg, env)
    try:
        d.wait_started()
        put(tmp_path, "p.png")
        wait_for(lambda: d.proc.poll() is not None, 60, what="the daemon to die after its claim")
        assert d.proc.returncode == EXIT_CODE
    finally:
        d.kill()
    db = tmp_path / "var" / "upscaled.db"
    (left,) = rows(db, "SELECT state, output_path, attempts FROM jobs")
    assert left["state"] == "running" and left["attempts"] == 1
    d2 = daemon(cfg)
    started = event(d2, "service.started")
    assert started is not None and started["recovered_jobs"] == 1, started
    wait_for(
        lambda: ready_rows(db, "SELECT id FROM jobs WHERE state = 'done' AND input_moved_to IS NOT NULL"),
        60,
        what="the job done",
    )
    (job,) = rows(db, "SELECT state, output_path, attempts FROM jobs")
    assert job == {"state": "done", "output_path": left["output_path"], "attempts": 2}
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == ["p.fsrcnn.x2.png"]
    assert d2.stop() == 0


# --- SIGHUP and SIGINT ----------------------------------------------------------------------------------------------
def test_sighup_reloads_ignore_and_settle_keeps_queued_rules_and_names_what_needs_a_restart(tmp_path, weights_dir):
    old_rule = [{"folder": "", "model": "bicubic", "scale": 2, "metrics": []}]
    cfg = write_config(
        tmp_path, weights=weights_dir, settle_seconds=0.2, rules=old_rule, ignore=["*.skip-later"], workers=1
    )
    env, marks = armed(tmp_path, "in-infer")
    d = Daemon(cfg, env)
    db = tmp_path / "var" / "upscaled.db"
    try:
        d.wait_started()
        put(tmp_path, "first.png")  # holds the only inference thread: the next files queue up behind it
        wait_for(lambda: (marks / "in-infer.hit").exists(), 60, what="the first job inside the model")
        for i in range(4):
            put(tmp_path, f"q{i}.png", seed=i + 1)
        wait_for(lambda: len(ready_rows(db, "SELECT id FROM jobs")) == 5, 60, what="5 jobs registered")
        assert rows(db, "SELECT COUNT(*) AS n FROM jobs WHERE state = 'pending'")[0]["n"] >= 1  # queued, not run
        # The new file: another rule, another ignore list and settle time, and two keys that need a restart.
        write_config(
            tmp_path,
            weights=weights_dir,
            settle_seconds=2.0,
            ignore=["*.skip"],
            workers=2,
            outbox="outbox2",
            rules=[{"folder": "", "model": "bicubic", "scale": 3, "metrics": []}],
        )
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: event(d, "reload.done"), 60, what="reload.done")
        assert event(d, "reload.needs_restart")["keys"] == ["outbox", "workers"]
        skipped = put(tmp_path, "z.skip", seed=7)  # ignored from now on
        late = put(tmp_path, "late.skip-later", seed=8)  # no longer ignored: a PNG, whatever its name
        new = put(tmp_path, "new.png", seed=9)
        written_at = new.stat().st_mtime
        (marks / "in-infer.release").touch()
        # new.png came last: once it is registered, the files dropped before it have had their chance.
        wait_for(lambda: ready_rows(db, "SELECT id FROM jobs WHERE rel_path = 'new.png'"), 60, what="new.png")
        assert sorted(r["rel_path"] for r in rows(db, "SELECT rel_path FROM jobs")) == sorted(
            ["first.png", "q0.png", "q1.png", "q2.png", "q3.png", "late.skip-later", "new.png"]
        )
        wait_for(
            lambda: rows(db, "SELECT COUNT(*) AS n FROM jobs WHERE state = 'done'")[0]["n"] == 7,
            120,
            what="7 jobs done",
        )
        assert d.stop() == 0
    finally:
        d.kill()
    jobs = {r["rel_path"]: r for r in rows(db, "SELECT rel_path, output_path, created_at FROM jobs")}
    assert set(jobs) == {"first.png", "q0.png", "q1.png", "q2.png", "q3.png", "late.skip-later", "new.png"}
    outbox = tmp_path / "outbox"  # not outbox2: that key needs a restart, so the running daemon keeps the old one
    for name in ("first", "q0", "q1", "q2", "q3"):  # registered before the reload: their rule, their output
        assert jobs[f"{name}.png"]["output_path"] == str(outbox / f"{name}.bicubic.x2.png")
    assert jobs["new.png"]["output_path"] == str(outbox / "new.bicubic.x3.png")
    assert jobs["late.skip-later"]["output_path"] == str(outbox / "late.bicubic.x3.png")
    assert skipped.exists() and not late.exists()
    assert not (tmp_path / "outbox2").exists() or not any((tmp_path / "outbox2").iterdir())
    created = dt.datetime.fromisoformat(jobs["new.png"]["created_at"]).replace(tzinfo=dt.UTC).timestamp()
    assert created - written_at >= 2.0  # taken only once it had held still for the new settle_seconds


def test_sigint_stops_like_sigterm_after_the_job_in_flight(tmp_path, weights_dir):
    cfg = write_config(tmp_path, weights=weights_dir, settle_seconds=0.1, rules=[FAST])
    env, marks = armed(tmp_path, "in-infer")
    d = Daemon(cfg, env)
    try:
        d.wait_started()
        put(tmp_path, "a.png")
        wait_for(lambda: (marks / "in-infer.hit").exists(), 60, what="the job inside the model")
        d.proc.send_signal(signal.SIGINT)
        # A daemon without a SIGINT handler does not stop: Python raises KeyboardInterrupt in the main loop, then
        # waits for the worker in the model. Its traceback ends the wait at once, with the log, not after 60 s.
        wait_for(
            lambda: (
                event(d, "service.stopping")
                or d.proc.poll() is not None
                or "KeyboardInterrupt" in d.log_path.read_text()
            ),
            60,
            what="service.stopping",
        )
        stopping = event(d, "service.stopping")
        assert stopping is not None and stopping["signal"] == "SIGINT", d.log_path.read_text()[-2000:]
        assert d.proc.poll() is None  # it waits for the job in flight (stop_timeout)
        (marks / "in-infer.release").touch()
        assert d.proc.wait(60) == 0
    finally:
        d.kill()
    (job,) = rows(tmp_path / "var" / "upscaled.db", "SELECT state, input_moved_to FROM jobs")
    assert job == {"state": "done", "input_moved_to": str(tmp_path / "archive" / "a.png")}
    assert event(d, "service.stopped") is not None


# --- serve_folders and custom ignore lists, at daemon level -------------------------------------------------------
def test_a_node_claims_only_the_folders_it_serves(tmp_path, weights_dir, daemon):
    rules = [{"folder": f, "model": "bicubic", "scale": 2, "metrics": []} for f in ("a", "b")]
    shared = {k: str(tmp_path / k) for k in ("inbox", "outbox", "archive", "failed")}
    url = f"sqlite:///{tmp_path / 'var' / 'u.db'}"
    configs = {}
    for node, folders in (("n1", ["a"]), ("n2", ["b"])):
        (tmp_path / node).mkdir()
        configs[node] = write_config(
            tmp_path / node,
            weights=weights_dir,
            rules=rules,
            settle_seconds=0.1,
            node_name=node,
            serve_folders=folders,
            database=url,
            **shared,
        )
    db = tmp_path / "var" / "u.db"
    d1 = daemon(configs["n1"])
    put(tmp_path, "b/y.png", seed=1)
    wait_for(lambda: ready_rows(db, "SELECT id FROM jobs WHERE rel_path = 'b/y.png'"), 60, what="b/y.png registered")
    put(tmp_path, "a/x.png", seed=2)  # registered after y: a node serving b would have claimed y first
    wait_for(
        lambda: ready_rows(db, "SELECT id FROM jobs WHERE rel_path = 'a/x.png' AND state = 'done'"),
        60,
        what="a/x.png done",
    )
    (y,) = rows(db, "SELECT state, attempts, node FROM jobs WHERE rel_path = 'b/y.png'")
    assert y == {"state": "pending", "attempts": 0, "node": None}
    assert (tmp_path / "inbox" / "b" / "y.png").exists()
    assert d1.stop() == 0
    d2 = daemon(configs["n2"])
    wait_for(
        lambda: ready_rows(db, "SELECT id FROM jobs WHERE rel_path = 'b/y.png' AND state = 'done'"),
        60,
        what="b/y.png done by n2",
    )
    assert d2.stop() == 0
    by_node = {r["rel_path"]: r["node"] for r in rows(db, "SELECT rel_path, node FROM jobs")}
    assert by_node == {"a/x.png": "n1", "b/y.png": "n2"}
    assert rows(db, "SELECT name, folders FROM nodes ORDER BY name") == [
        {"name": "n1", "folders": '["a"]'},
        {"name": "n2", "folders": '["b"]'},
    ]


def test_a_custom_ignore_list_holds_for_the_startup_scan_and_for_events(tmp_path, weights_dir, daemon):
    cfg = write_config(
        tmp_path,
        weights=weights_dir,
        settle_seconds=0.1,
        ignore=["*.raw", "draft-*"],
        rules=[{"folder": "", "model": "bicubic", "scale": 2, "metrics": []}],
    )
    there = [put(tmp_path, "boot.raw", seed=1), put(tmp_path, "boot.png", seed=2)]  # before the start: the scan
    d = daemon(cfg)
    there += [put(tmp_path, "x.raw", seed=3), put(tmp_path, "draft-1.png", seed=4)]
    put(tmp_path, "y.part", seed=5)  # ignored by the default list only: this one is taken
    put(tmp_path, "z.png", seed=6)  # last: once it is done, the files before it have had their chance
    db = tmp_path / "var" / "upscaled.db"
    wait_for(lambda: len(ready_rows(db, "SELECT id FROM jobs WHERE state = 'done'")) == 3, 60, what="3 jobs done")
    assert d.stop() == 0
    assert sorted(r["rel_path"] for r in rows(db, "SELECT rel_path FROM jobs")) == ["boot.png", "y.part", "z.png"]
    assert [p.name for p in there if p.exists()] == ["boot.raw", "x.raw", "draft-1.png"]  # left alone, no job
