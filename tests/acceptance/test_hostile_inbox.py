"""The hostile-inbox suite: every finding of the adversarial review, tried again as an attacker would, on the
real daemon and the real CLI wherever they can run.

The inbox, the names in it and the mirrors the weights come from are not trusted; the configuration and the weights
folder are (docs/security.md). Each test is named after its finding (``f01`` ... ``f19``) and says in its docstring
what the attack was and what must hold. Races are not left to chance: the failpoints of :mod:`daemon.failpoints`
stop the real daemon at the exact window (``after-claim``, ``in-infer``, ``mid-write``, ``on-fail``), the test swaps
folders, files and links there, and releases it.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, Daemon, image, rows, shared_sandbox, wait_for, write_config
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)

BICUBIC = {"folder": "", "model": "bicubic", "scale": 2, "metrics": []}
UNIT = ROOT / "systemd" / "upscaled.service"
SECURITY_DOC = ROOT / "docs" / "security.md"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


# --- helpers --------------------------------------------------------------------------------------------------------
def jobs(db: Path) -> list[dict]:
    """Every job row, or [] while the daemon has not made the database yet."""
    try:
        return rows(db, "SELECT * FROM jobs ORDER BY id") if db.exists() else []
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def settled(db: Path, n: int) -> list[dict]:
    """The job rows once ``n`` of them are done or failed, else []."""
    js = jobs(db)
    return js if sum(j["state"] in ("done", "failed") for j in js) >= n else []


def armed(marks: Path, *points: str) -> dict[str, str]:
    """The environment that stops the daemon at ``points`` until the test releases it (see daemon/failpoints.py)."""
    marks.mkdir(exist_ok=True)
    return {
        "UPSCALED_FAILPOINTS_TEST": "1",
        "UPSCALED_FAILPOINTS": ",".join(f"{p}=pause" for p in points),
        "UPSCALED_FAILPOINT_DIR": str(marks),
    }


def reached(marks: Path, point: str, timeout: float = 30.0) -> None:
    wait_for(lambda: (marks / f"{point}.hit").exists(), timeout, what=f"the daemon at failpoint {point}")


def release(marks: Path, point: str) -> None:
    (marks / f"{point}.release").touch()


def drop(inbox: Path, rel: str | bytes, size: tuple[int, int] = (40, 32), seed: int = 0, **save) -> Path:
    """Write an image outside the inbox, then rename it in: it arrives complete, as a careful uploader's would."""
    staging = inbox.parent / "staging"
    staging.mkdir(exist_ok=True)
    name = os.fsdecode(rel)
    tmp = image(staging / f"{seed}-{len(name)}{Path(name).suffix or '.png'}", size, seed=seed, **save)
    dest = inbox / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, dest)
    return dest


def cli(
    cfg: Path, *args: str, umask: int = 0o022, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """The real `upscaled` command line, in a process whose own umask is ``umask`` (the shell's, not the settings');
    stdout as bytes, so a raw escape in it cannot hide."""
    full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full.pop("UPSCALED_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), *map(str, args)],
        cwd=cfg.parent,
        env=full,
        capture_output=True,
        timeout=timeout,
        preexec_fn=lambda: os.umask(umask),
    )


def cli_all(cfg: Path, *commands: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several independent `upscaled` commands at once (each pays the interpreter's start-up; they overlap)."""
    full = dict(os.environ, PYTHONUNBUFFERED="1")
    full.pop("UPSCALED_CONFIG", None)
    procs = [
        (
            args,
            subprocess.Popen(
                [sys.executable, "-m", "daemon", "--config", str(cfg), *map(str, args)],
                cwd=cfg.parent,
                env=full,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=lambda: os.umask(0o022),
            ),
        )
        for args in commands
    ]
    done = []
    for args, p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return done


def cli_here(cfg: Path, *args: str):  # noqa: ANN201 - click.testing.Result
    """The same command line run in this process, for checks that do not depend on a process of their own (what a
    reader prints, whether it touches the database); saves the interpreter's start-up. The umask the command sets
    is put back."""
    from click.testing import CliRunner

    from daemon.cli import main

    old = os.umask(0o022)
    try:
        return CliRunner().invoke(main, ["--config", str(cfg), *map(str, args)])
    finally:
        os.umask(old)


def text(res: subprocess.CompletedProcess) -> str:
    return res.stdout.decode("utf-8", "backslashreplace") + res.stderr.decode("utf-8", "backslashreplace")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def proc_status(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmHWM: peak resident memory) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def bytes_read(pid: int) -> int:
    """How many bytes the process has read with read() and friends so far (/proc/PID/io rchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


class Notify:
    """A datagram socket standing in for systemd's notify socket; collects every message with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.env = {"NOTIFY_SOCKET": str(path)}
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode("utf-8", "backslashreplace")))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()

    def pings(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [t for t, m in self.messages if m == "WATCHDOG=1" and since <= t <= until]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    n = Notify(tmp_path / "notify.sock")
    yield n
    n.close()


def stop(d: Daemon) -> None:
    """Stop a daemon that must still be alive; it exits 0."""
    assert d.proc.poll() is None, d.log_path.read_text()[-3000:]
    assert d.stop() == 0, d.log_path.read_text()[-3000:]


# --- 1. folders swapped for links ----------------------------------------------------------------------------------
def test_f01_folders_swapped_for_links_mid_job_are_never_read_moved_through_or_aimed_at_the_database(tmp_path):
    """A folder swapped for a symlink after its file was registered: before, the worker read a file outside the
    inbox, upscaled it and archived the original, and the same trick could move the service's own database.

    Three windows, one daemon: after the claim (the read must refuse), after the read (the archive move must
    refuse), and after a failed job's commit (the quarantine move must not take the database). Whatever the links
    point at stays where it is, unread and unmoved; no output holds its pixels."""
    cfg = write_config(tmp_path, rules=[BICUBIC], settle_seconds=0.1)
    inbox, marks, db = tmp_path / "inbox", tmp_path / "marks", tmp_path / "var" / "upscaled.db"
    outside = tmp_path / "outside"
    secrets = {n: image(outside / n, (36, 30), seed=20 + i) for i, n in enumerate(("a.png", "b.png"))}
    before = {n: (p.read_bytes(), p.stat().st_ino) for n, p in secrets.items()}
    d = Daemon(cfg, armed(marks, "on-fail", "after-claim", "in-infer"))
    try:
        d.wait_started()
        db_ino = db.stat().st_ino
        # (a) A file whose quarantine move would take inbox/x/upscaled.db once x points at the database's folder.
        (inbox / "x").mkdir()
        (tmp_path / "staging").mkdir()
        (tmp_path / "staging" / "upscaled.db").write_bytes(b"not an image, and it fails")
        os.rename(tmp_path / "staging" / "upscaled.db", inbox / "x" / "upscaled.db")
        reached(marks, "on-fail")  # committed failed; the move to failed/ is next
        os.rename(inbox / "x", tmp_path / "stash-x")
        os.symlink(db.parent, inbox / "x")
        release(marks, "on-fail")
        # The main thread tries the move, then takes in the link that appeared: that one is quarantined (the
        # link itself, never what it points at).
        wait_for(
            lambda: [j for j in jobs(db) if j["rel_path"] == "x" and j["input_moved_to"]],
            20,
            what="the link x quarantined after the refused move",
        )
        # (b) Swapped between the claim and the read.
        drop(inbox, "one/a.png", seed=1)
        reached(marks, "after-claim")
        os.rename(inbox / "one", tmp_path / "stash-one")
        os.symlink(outside, inbox / "one")
        release(marks, "after-claim")
        wait_for(lambda: [j for j in jobs(db) if j["rel_path"] == "one/a.png" and j["state"] == "failed"], 30)
        # (c) Swapped between the read and the archive move.
        drop(inbox, "two/b.png", seed=2)
        reached(marks, "in-infer")
        os.rename(inbox / "two", tmp_path / "stash-two")
        os.symlink(outside, inbox / "two")
        release(marks, "in-infer")
        wait_for(lambda: [j for j in jobs(db) if j["rel_path"] == "two/b.png" and j["state"] == "done"], 30)
        time.sleep(0.5)  # the archive move comes right after the commit
        stop(d)
    finally:
        d.kill()
    by_name = {j["rel_path"]: j for j in jobs(db)}
    # The database never moved, and is still the service's.
    assert db.stat().st_ino == db_ino and by_name["x/upscaled.db"]["state"] == "failed"
    assert by_name["x/upscaled.db"]["input_moved_to"] is None
    assert not [p for p in (tmp_path / "failed").rglob("*") if p.name.startswith("upscaled.db")]
    assert (tmp_path / "stash-x" / "upscaled.db").read_bytes() == b"not an image, and it fails"
    assert os.readlink(by_name["x"]["input_moved_to"]) == str(db.parent)  # the link moved, not its target
    # The files the links point at: where they were, as they were.
    for n, p in secrets.items():
        assert (p.read_bytes(), p.stat().st_ino) == before[n], n
    one = by_name["one/a.png"]
    assert one["error_kind"] == "unsafe-path" and "symbolic link" in one["error"], one
    # b's own pixels (40x32, read before the swap) were upscaled; the 36x30 file outside was not.
    two = by_name["two/b.png"]
    assert Image.open(two["output_path"]).size == (80, 64)
    assert not (tmp_path / "outbox" / "one").exists()
    assert not [p for p in (tmp_path / "archive").rglob("*") if p.is_file()], "nothing may be archived through a link"
    moved = [p for p in (tmp_path / "failed").rglob("*") if p.is_file() and not p.is_symlink()]
    assert all(p.read_bytes() not in {b for b, _ in before.values()} for p in moved)
    events = {e.get("event") for e in d.events()}
    assert "archive.failed" in events and "job.crashed" not in events


# --- 2. planted temp names -----------------------------------------------------------------------------------------
def test_f02_planted_temp_name_symlinks_are_never_written_through(tmp_path):
    """The temp file of an output used to be `.<name>.<pid>-<tid>.upscaled-tmp`, opened without O_EXCL: a symlink
    planted under that name (the pid and thread ids are in /proc) made the service overwrite its target and left the
    output a link to it. Now the name is random and created exclusively: planted links at every name the old scheme
    could use, and at the output's own name, are never followed."""
    cfg = write_config(tmp_path, rules=[BICUBIC], settle_seconds=0.1)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious, outside the outbox")
    marks, outbox = tmp_path / "marks", tmp_path / "outbox"
    d = Daemon(cfg, armed(marks, "mid-write"))
    try:
        d.wait_started()
        pid = d.proc.pid
        planted = []
        for target in ("p.bicubic.x2.png", "p.bicubic.x2-1.png"):
            for tid in os.listdir(f"/proc/{pid}/task"):
                planted.append(outbox / f".{target}.{pid}-{tid}.upscaled-tmp")
        planted.append(outbox / "p.bicubic.x2.png")  # the output's own name, taken by a link
        for p in planted:
            os.symlink(victim, p)
        drop(tmp_path / "inbox", "p.png")
        reached(marks, "mid-write")  # the temp file is written and fsynced, not yet renamed
        temps = [p for p in outbox.iterdir() if p.name.endswith(".upscaled-tmp") and not p.is_symlink()]
        assert len(temps) == 1, sorted(p.name for p in outbox.iterdir())
        st = temps[0].lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        assert re.fullmatch(r"\.p\.bicubic\.x2-1\.png\.[0-9a-f]{16}\.upscaled-tmp", temps[0].name), temps[0].name
        release(marks, "mid-write")
        db = tmp_path / "var" / "upscaled.db"
        wait_for(lambda: [j for j in jobs(db) if j["state"] == "done"], 30)
        stop(d)
    finally:
        d.kill()
    assert victim.read_bytes() == b"precious, outside the outbox"
    (job,) = jobs(tmp_path / "var" / "upscaled.db")
    out = Path(job["output_path"])
    assert out.name == "p.bicubic.x2-1.png" and not out.is_symlink() and Image.open(out).size == (80, 64)
    assert all(p.is_symlink() and os.readlink(p) == str(victim) for p in planted), "a planted link was replaced"


# --- 3, 4, 13, 14: hostile names, one daemon ----------------------------------------------------------------------
NAMES = {
    "newline": "a\nWATCHDOG=trigger\nSTOPPING=1.png",
    "escape": "e\x1b]0;pwned\x07\x1b[2J.png",  # sets the terminal's title, then clears the screen
    "bytes": os.fsdecode(b"bad\xff\xfe.png"),  # not UTF-8
    "long": "n" * 251 + ".png",  # 255 bytes: `name + ".prompt.txt"` cannot exist
    "plain": "plain.png",
}


@pytest.fixture(scope="module")
def names_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One daemon fed every hostile name: the newline one alone first, held inside the model while STATUS= goes
    out, then the rest in one batch (the non-UTF-8 name with the others, as in the report)."""
    tmp = tmp_path_factory.mktemp("names")
    cfg = write_config(tmp, rules=[BICUBIC], settle_seconds=0.2)
    listener = Notify(tmp / "notify.sock")
    marks = tmp / "marks"
    env = dict(listener.env, WATCHDOG_USEC="1500000", **armed(marks, "in-infer"))
    d = Daemon(cfg, env)
    db = tmp / "var" / "upscaled.db"
    try:
        d.wait_started()
        drop(tmp / "inbox", NAMES["newline"], seed=1)
        reached(marks, "in-infer")
        time.sleep(1.2)  # STATUS= goes out every half second: several name this job
        release(marks, "in-infer")
        for i, key in enumerate(("escape", "bytes", "long", "plain")):
            drop(tmp / "inbox", NAMES[key], seed=2 + i)
        wait_for(lambda: settled(db, len(NAMES)), 60, what="every hostile name settled")
        time.sleep(0.3)
        before_stop = len(listener.messages)
        stop(d)
        time.sleep(0.2)
    finally:
        d.kill()
        listener.close()
    return SimpleNamespace(
        tmp=tmp,
        cfg=cfg,
        db=db,
        log=d.log_path.read_text(),
        events=d.events(),
        messages=[m for _, m in listener.messages],
        before_stop=before_stop,
    )


def test_f03_a_newline_in_a_name_cannot_inject_notify_commands(names_run):
    """`STATUS=working on a\\nWATCHDOG=trigger\\nSTOPPING=1.png` was sent raw: systemd read three commands, and
    could be looped through watchdog restarts. Every STATUS text is one printable line now."""
    running = names_run.messages[: names_run.before_stop]
    statuses = [m for m in running if m.startswith("STATUS=")]
    assert any("a\\nWATCHDOG=trigger\\nSTOPPING=1.png" in m for m in statuses), statuses
    for m in running:
        lines = m.split("\n")
        assert "WATCHDOG=trigger" not in lines and "STOPPING=1" not in lines, m
        assert not any(ch in m for ch in "\x1b\x07\r"), m
    assert any("STOPPING=1" in m.split("\n") for m in names_run.messages[names_run.before_stop :])  # the real stop


def test_f04_a_name_that_is_not_utf8_is_stored_losslessly_and_blocks_no_other_file(names_run):
    """`bad\\xff\\xfe.png` raised UnicodeEncodeError at registration: it sat in the inbox forever, with no reason,
    and the files admitted with it were stuck too. Now its job is an ordinary one: the name is stored as printable
    UTF-8 text and as its exact bytes, and every file of the batch is done."""
    by_raw = {
        bytes(j["rel_path_raw"]) if j["rel_path_raw"] is not None else j["rel_path"].encode(): j
        for j in jobs(names_run.db)
    }
    assert all(j["state"] == "done" for j in by_raw.values()), [(j["rel_path"], j["error"]) for j in by_raw.values()]
    assert set(by_raw) == {os.fsencode(n) for n in NAMES.values()}
    bad = by_raw[b"bad\xff\xfe.png"]
    assert bad["rel_path"] == "bad\\xff\\xfe.png"
    assert Path(bad["output_path"]).name == "bad\\xff\\xfe.bicubic.x2.png"  # other programs read the outbox as text
    assert b"bad\xff\xfe.png" in os.listdir(os.fsencode(names_run.tmp / "archive"))  # archived under its own bytes
    assert not list((names_run.tmp / "inbox").iterdir())


def test_f13_a_255_byte_name_has_no_sidecar_and_no_false_message(names_run):
    """With a 255-byte name, `name + ".prompt.txt"` failed with ENAMETOOLONG, and the log said the file was "kept in
    the inbox", which was wrong. Such a name cannot have a sidecar: no lookup fails, nothing is logged about one."""
    from daemon.fsops import Root
    from daemon.intake import read_prompt, sidecar_name

    long = NAMES["long"]
    (job,) = [j for j in jobs(names_run.db) if j["rel_path"] == long]
    assert job["state"] == "done" and job["input_moved_to"] == str(names_run.tmp / "archive" / long)
    assert (names_run.tmp / "archive" / long).is_file()
    assert "kept in the inbox" not in names_run.log and "File name too long" not in names_run.log
    assert not [e for e in names_run.events if e.get("event") in ("sidecar.move_failed", "archive.failed")]
    # The lookup a prompt-taking rule makes (the diffusion backend; no model here to run one) says: no sidecar.
    assert sidecar_name(PurePosixPath(long)) is None
    folder = names_run.tmp / "sidecars"
    folder.mkdir()
    (folder / "x.png.prompt.txt").write_text("a red fox\n")
    with Root(folder) as root:
        assert read_prompt(root, PurePosixPath(long), shared_sandbox()) is None
        # a name that can have one still does
        assert read_prompt(root, PurePosixPath("x.png"), shared_sandbox()) == "a red fox"


def test_f14_cli_output_escapes_every_control_character(names_run):
    """`history` printed terminal escape sequences from file names raw: a name could retitle or clear the terminal
    of whoever looked. Table and CSV show them escaped, one row per line; JSON escapes them itself."""
    table = cli(names_run.cfg, "history")  # the real process, its real stdout
    assert table.returncode == 0, text(table)
    for raw in (b"\x1b", b"\x07", b"\r"):
        assert raw not in table.stdout
    lines = table.stdout.decode().splitlines()
    assert len(lines) == 2 + len(NAMES), lines  # header, rule, one line per job
    assert any("a\\nWATCHDOG=trigger" in line for line in lines) and any("e\\x1b]0;pwned" in line for line in lines)
    as_csv = cli_here(names_run.cfg, "history", "--format", "csv")
    assert as_csv.exit_code == 0 and b"\x1b" not in as_csv.stdout_bytes and b"\x07" not in as_csv.stdout_bytes
    records = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert len(records) == 1 + len(NAMES) and not any("\n" in f or "\x1b" in f for r in records for f in r)
    as_json = cli_here(names_run.cfg, "query", "SELECT rel_path AS file FROM jobs ORDER BY id", "--format", "json")
    assert as_json.exit_code == 0 and not re.search(rb"[\x00-\x09\x0b-\x1f]", as_json.stdout_bytes)
    assert {r["file"] for r in json.loads(as_json.stdout)} >= {NAMES["newline"], NAMES["escape"]}


# --- 5, 6: PostgreSQL -------------------------------------------------------------------------------------------------
def test_f05_query_cannot_change_a_postgresql_database(tmp_path, pg_url):  # noqa: F811
    """`query "COMMIT; DELETE FROM nodes"` deleted rows and `"COMMIT; DROP TABLE metrics CASCADE"` dropped a table:
    `SET TRANSACTION READ ONLY` does not survive a second statement. One statement, prepared on the server, on a
    session that starts read-only: nothing written, whatever SQL is handed in."""
    from sqlalchemy import create_engine
    from sqlalchemy import text as sql

    from daemon.errors import QueryError
    from daemon.history import query

    cfg = write_config(tmp_path, database=pg_url)
    assert cli_here(cfg, "db", "upgrade").exit_code == 0
    eng = create_engine(pg_url)
    with eng.begin() as c:
        c.execute(sql("INSERT INTO meta (key, value) VALUES ('canary', 'alive')"))
    for res in cli_all(cfg, ["query", "COMMIT; DELETE FROM meta"], ["query", "COMMIT; DROP TABLE metrics CASCADE"]):
        assert res.returncode != 0 and "query failed" in text(res), text(res)  # the report's two, by the CLI
    for hostile in (
        "DELETE FROM meta",
        "WITH d AS (DELETE FROM meta RETURNING key) SELECT key FROM d",
        "BEGIN READ WRITE; DELETE FROM meta; COMMIT",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; DELETE FROM meta",
        "CREATE TABLE planted (x int)",
    ):
        with pytest.raises(QueryError):
            query(pg_url, hostile)
    with eng.connect() as c:
        assert c.execute(sql("SELECT value FROM meta WHERE key = 'canary'")).scalar() == "alive"
        assert c.execute(sql("SELECT to_regclass('metrics') IS NOT NULL")).scalar()
        assert c.execute(sql("SELECT to_regclass('planted') IS NULL")).scalar()
    eng.dispose()
    ok = cli_here(cfg, "query", "SELECT value FROM meta WHERE key = :k", "-p", "k", "canary", "--format", "json")
    assert ok.exit_code == 0 and json.loads(ok.stdout) == [{"value": "alive"}]


def test_f06_the_postgresql_password_never_reaches_the_log(tmp_path, pg_url):  # noqa: F811
    """The service logged its database URL, password and all, at start. It logs the URL masked; so do `db upgrade`
    and the errors of a connection that fails."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    secret = url.password or "Hunter2-n0t-in-logs"  # the test server trusts local connections: any password works
    with_pw = url.set(password=secret).render_as_string(hide_password=False)
    cfg = write_config(tmp_path, database=with_pw, rules=[BICUBIC])
    up = cli(cfg, "db", "upgrade")
    assert up.returncode == 0 and secret not in text(up) and "***" in text(up), text(up)
    d = Daemon(cfg)
    try:
        d.wait_started()
        stop(d)
    finally:
        d.kill()
    log = d.log_path.read_text()
    (started,) = [e for e in d.events() if e.get("event") == "service.started"]
    assert "***" in started["database"] and secret not in log
    unreachable = url.set(password=secret, port=1).render_as_string(hide_password=False)
    (tmp_path / "bad").mkdir()
    bad = cli(write_config(tmp_path / "bad", database=unreachable), "db", "upgrade", timeout=60)
    assert bad.returncode != 0 and secret not in text(bad), text(bad)


# --- 7: a sparse 2 GB file -----------------------------------------------------------------------------------------
def test_f07_a_sparse_2gb_file_is_refused_from_its_header_without_being_read(tmp_path, notify):
    """The whole input was read and hashed before any check: a 2 GB sparse `.png` raised peak memory to 2.3 GB and
    held the main thread past its watchdog pings. Now the size and the header come first, from one descriptor: a
    2 GiB file of nothing fails as "not an image" (and one byte more as over max_file_bytes) after a few bytes, peak
    memory does not move, and the pings keep coming."""
    cfg = write_config(tmp_path, rules=[BICUBIC], settle_seconds=0.1)
    d = Daemon(cfg, dict(notify.env, WATCHDOG_USEC="1500000"))
    db = tmp_path / "var" / "upscaled.db"
    try:
        d.wait_started()
        pid = d.proc.pid
        time.sleep(0.5)
        hwm0, read0, t0 = proc_status(pid, "VmHWM"), bytes_read(pid), time.monotonic()
        (tmp_path / "staging").mkdir()
        for name, size in (("sparse.png", 2 << 30), ("over.png", (2 << 30) + 1)):
            with open(tmp_path / "staging" / name, "wb") as fh:
                fh.truncate(size)  # sparse: no block is written
            os.rename(tmp_path / "staging" / name, tmp_path / "inbox" / name)
        wait_for(lambda: settled(db, 2), 30, what="both sparse files failed")
        t1 = time.monotonic()
        time.sleep(1.0)
        hwm1, read1 = proc_status(pid, "VmHWM"), bytes_read(pid)
        stop(d)
    finally:
        d.kill()
    by_name = {j["rel_path"]: j for j in jobs(db)}
    assert by_name["sparse.png"]["error_kind"] == "decode" and "not an image" in by_name["sparse.png"]["error"]
    assert by_name["over.png"]["error_kind"] == "too-large" and "max_file_bytes" in by_name["over.png"]["error"]
    assert read1 - read0 < 64 << 20, f"read {read1 - read0} bytes of two 2 GiB files"
    assert hwm1 - hwm0 < 128 << 20, f"peak RSS grew by {(hwm1 - hwm0) >> 20} MiB"
    pings = [t0, *notify.pings(t0, t1 + 1.0), t1 + 1.0]
    assert len(pings) >= 4 and max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 1.5, pings


def test_f07_a_valid_header_with_a_huge_sparse_tail_is_not_held_in_memory(tmp_path):
    """The header passes, but the file is far larger than a 40x32 picture can need: it is refused at the door, before
    it is hashed, and the worker never reads it (measured before the check at 2 GiB: peak RSS 2.28 GB and 17 s).
    Here 512 MiB keeps the run short."""
    cfg = write_config(tmp_path, rules=[BICUBIC], settle_seconds=0.1)
    d = Daemon(cfg)
    db = tmp_path / "var" / "upscaled.db"
    try:
        d.wait_started()
        time.sleep(0.5)
        hwm0 = proc_status(d.proc.pid, "VmHWM")
        tail = image(tmp_path / "staging" / "tail.png")
        with open(tail, "r+b") as fh:
            fh.truncate(512 << 20)
        os.rename(tail, tmp_path / "inbox" / "tail.png")
        wait_for(lambda: settled(db, 1), 60)
        hwm1 = proc_status(d.proc.pid, "VmHWM")
        stop(d)
    finally:
        d.kill()
    (job,) = jobs(db)
    assert job["error_kind"] == "too-large" and "are not its pixels" in job["error"], job
    assert hwm1 - hwm0 < 128 << 20, f"peak RSS grew by {(hwm1 - hwm0) >> 20} MiB for a 40x32 picture"


# --- 8, 9: pixel limits --------------------------------------------------------------------------------------------
def test_f08_an_output_over_max_output_pixels_is_refused_before_inference(tmp_path):
    """Only the input had a pixel limit: a permitted 100 MP input at x4 needs about 70 GB. The output limit is
    checked before the model runs. Scaled down here (200x200 at x4 against a 100 000-pixel limit): the daemon is
    armed to die the moment any job reaches inference, and the refused job must not get there; a small file after
    it does, which proves the trap was set."""
    cfg = write_config(
        tmp_path, rules=[dict(BICUBIC, scale=4)], settle_seconds=0.1, max_pixels=1_000_000, max_output_pixels=100_000
    )
    db = tmp_path / "var" / "upscaled.db"
    d = Daemon(cfg, {"UPSCALED_FAILPOINTS_TEST": "1", "UPSCALED_FAILPOINTS": "in-infer=exit"})
    try:
        d.wait_started()
        drop(tmp_path / "inbox", "huge.png", (200, 200))
        wait_for(lambda: settled(db, 1), 30)
        (job,) = jobs(db)
        assert d.proc.poll() is None, "the refused job reached inference"
        assert job["error_kind"] == "too-large" and "max_output_pixels" in job["error"] and "100000" in job["error"]
        assert not [p for p in (tmp_path / "outbox").rglob("*") if p.is_file()]
        drop(tmp_path / "inbox", "small.png", (50, 50), seed=1)  # 200x200 out: allowed, so it reaches the model
        wait_for(lambda: d.proc.poll() is not None, 30, what="the armed failpoint")
        assert d.proc.returncode == 86
    finally:
        d.kill()


def test_f09_a_jpeg_output_larger_than_max_pixels_is_measured_not_failed(tmp_path):
    """jpg/webp outputs were decoded again for the metrics under the *input* limit: a 26 MP photo at x2 failed after
    its output was written, and left an orphan. Scaled down: an input just under max_pixels, x2, as jpg, with a
    metric that decodes the output. Our own output is not untrusted input: done, measured, one output."""
    cfg = write_config(
        tmp_path,
        settle_seconds=0.1,
        max_pixels=20_000,
        max_output_pixels=1_000_000,
        rules=[dict(BICUBIC, metrics=["lr_psnr_y"])],
    )
    db = tmp_path / "var" / "upscaled.db"
    d = Daemon(cfg)
    try:
        d.wait_started()
        drop(tmp_path / "inbox", "photo.jpg", (160, 120), quality=90)  # 19 200 pixels in, 76 800 out
        wait_for(lambda: [j for j in settled(db, 1) if j["metrics_state"] in ("done", None)], 30)
        stop(d)
    finally:
        d.kill()
    (job,) = jobs(db)
    assert job["state"] == "done" and job["metrics_state"] == "done", job
    assert [m["name"] for m in rows(db, "SELECT name FROM metrics WHERE job_id = ?", job["id"])] == ["lr_psnr_y"]
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == ["photo.bicubic.x2.jpg"]
    assert not list((tmp_path / "failed").iterdir())


# --- 10: hostile mirrors -------------------------------------------------------------------------------------------
class _JunkMirror(http.server.BaseHTTPRequestHandler):
    """Serves junk for every path; under /stream/ it never stops and declares no length."""

    served: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.path.startswith("/stream/"):
            self.send_response(200)
            self.end_headers()
            sent = 0
            try:
                while sent < 1 << 30:
                    self.wfile.write(b"\0" * (1 << 20))
                    sent += 1 << 20
                    self.served[self.path] = sent
            except OSError:  # the client hung up: what the test wants
                pass
            return
        body = b"junk from a hostile mirror\n" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.served[self.path] = len(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def junk_mirror() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JunkMirror)
    _JunkMirror.served = {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_f10_a_hostile_mirror_cannot_plant_weights(tmp_path, junk_mirror):
    """A mirror that served junk as `EDSR_x2.pb` was recorded (trust on first use) and `weights verify` then
    called it present. Now: a pinned file must match its sha256; a file with no published hash is not even asked
    for without --trust-unhashed, and with it is recorded, logged, and called `trusted`, never `present`; a mirror
    that never stops is cut off at the file's size limit; junk in the weights folder is a mismatch."""
    weights = tmp_path / "w"
    cfg = write_config(tmp_path, weights=weights)
    pinned = cli(cfg, "weights", "fetch", "fsrcnn", "--mirror", junk_mirror, "--format", "json")
    assert pinned.returncode == 1
    assert [r["status"] for r in json.loads(pinned.stdout)] == ["failed"] * 3
    assert all("does not match" in r["detail"] for r in json.loads(pinned.stdout))
    refused = cli(cfg, "weights", "fetch", "edsr", "--mirror", junk_mirror, "--format", "json")
    assert refused.returncode == 1 and all("--trust-unhashed" in r["detail"] for r in json.loads(refused.stdout))
    assert not any("EDSR" in p for p in _JunkMirror.served), "asked the mirror for a file it could not check"
    endless = cli(
        cfg, "weights", "fetch", "edsr", "--trust-unhashed", "--mirror", junk_mirror + "/stream", "--format", "json"
    )
    assert endless.returncode == 1 and all("limit" in r["detail"] for r in json.loads(endless.stdout)), text(endless)
    # Stopped at EDSR's 64 MiB cap, not at the server's 1 GiB (what it counts includes the sockets' buffers).
    assert max(_JunkMirror.served.values()) < (64 << 20) + (32 << 20)
    assert not [p for p in weights.rglob("*") if p.is_file() and p.name != "recorded-sha256.json"]
    trusted = cli(cfg, "weights", "fetch", "edsr", "--trust-unhashed", "--mirror", junk_mirror, "--format", "json")
    assert trusted.returncode == 0 and {r["status"] for r in json.loads(trusted.stdout)} == {"recorded"}
    assert b"weights.trusted_unhashed" in trusted.stderr  # logged ...
    record = json.loads((weights / "recorded-sha256.json").read_text())["opencv/EDSR_x2.pb"]
    assert record["trusted_unhashed"] is True and record["source"].startswith(junk_mirror)  # ... and recorded
    verify = cli(cfg, "weights", "verify", "edsr", "--format", "json")
    assert verify.returncode == 0 and {r["status"] for r in json.loads(verify.stdout)} == {"trusted"}
    (weights / "opencv").mkdir(exist_ok=True)
    (weights / "opencv" / "FSRCNN_x2.pb").write_bytes(b"junk in the weights folder")
    (weights / "opencv" / "FSRCNN_x3.pb").write_bytes(b"more junk")
    record_all = json.loads((weights / "recorded-sha256.json").read_text())
    record_all["opencv/FSRCNN_x3.pb"] = sha(weights / "opencv" / "FSRCNN_x3.pb")  # an old bare record: no say-so
    (weights / "recorded-sha256.json").write_text(json.dumps(record_all))
    verify = cli(cfg, "weights", "verify", "fsrcnn", "--format", "json")
    status = {r["path"]: r["status"] for r in json.loads(verify.stdout)}
    assert verify.returncode == 1 and status["opencv/FSRCNN_x2.pb"] == "mismatch"
    assert status["opencv/FSRCNN_x3.pb"] == "mismatch"  # the catalogue's hash wins over any record


# --- 11: the loaders -----------------------------------------------------------------------------------------------
def test_f11_torch_floor_safetensors_and_a_pickle_that_would_run_code(tmp_path):
    """torch>=2.4 admitted versions whose `weights_only` loader can be bypassed (up to 2.5.1): the floor is 2.6.
    Hub snapshots are fetched as safetensors only. And a .pth that runs code when unpickled is refused without
    running it, through the real `process` command."""
    from packaging.requirements import Requirement

    from models.weights import HUB_ALLOW, HUB_IGNORE

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floors = [
        Requirement(r).specifier
        for extra in project.values()
        for r in extra
        if r.startswith("torch") and Requirement(r).name == "torch"
    ]
    assert floors and all(not s.contains("2.5.1") and s.contains("2.6.0") for s in floors), floors
    assert all(p.endswith((".json", ".txt", ".safetensors")) for p in HUB_ALLOW)
    assert {"*.bin", "*.ckpt", "*.pt", "*.pth"} <= set(HUB_IGNORE)
    torch = pytest.importorskip("torch")
    marker = tmp_path / "the-pickle-ran"

    class Evil:
        def __reduce__(self):  # noqa: ANN204 - what an attacker's file holds: a call made while unpickling
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"params": Evil()}, evil)
    cfg = write_config(tmp_path)
    picture = image(tmp_path / "in" / "p.png")
    res = cli(
        cfg,
        "process",
        picture,
        "--model",
        f"file:{evil}",
        "--scale",
        "2",
        "--out",
        tmp_path / "out",
        "--format",
        "json",
        timeout=180,
    )
    assert res.returncode == 1, text(res)
    (report,) = json.loads(res.stdout)
    assert report["state"] == "failed" and report["error"].startswith("unsafe-weights"), report
    assert not marker.exists(), "unpickling ran the attacker's code"


# --- 12: folders inside folders ------------------------------------------------------------------------------------
def test_f12_an_inbox_inside_the_outbox_and_the_database_or_weights_inside_the_inbox_are_refused(tmp_path):
    """The configuration accepted an inbox inside the outbox (one file gave 4 chained jobs), and the database or
    weights_dir inside the inbox (reachable by any inbox writer). Refused both ways, with the keys named."""
    from daemon.config import load_settings
    from models.errors import UpscaledError

    cfg = write_config(tmp_path, inbox="outbox/in")
    res = cli(cfg, "check-config")
    assert res.returncode != 0 and b"inbox" in res.stderr and b"must not be inside the outbox" in res.stderr
    cases = {
        "outbox inside the inbox": dict(outbox="inbox/out"),
        "database inside the inbox": dict(database="sqlite:///inbox/db/upscaled.db"),
        "weights inside the inbox": dict(weights_dir="inbox/weights"),
    }
    for what, keys in cases.items():
        sub = tmp_path / what.replace(" ", "-")
        sub.mkdir()
        with pytest.raises(UpscaledError, match="must not be inside the"):
            load_settings(write_config(sub, **keys))
    (tmp_path / "fine").mkdir()
    assert load_settings(write_config(tmp_path / "fine")).inbox == tmp_path / "fine" / "inbox"  # the check can pass


# --- 15: process keeps going -----------------------------------------------------------------------------------------
def test_f15_process_gives_each_file_its_own_error_boundary(tmp_path):
    """`process` stopped the whole batch on an exception it did not expect (cv2.error from a corrupt .pb) and left
    the job `running`. The weights here are junk the user chose to trust (--trust-unhashed): each file fails its
    own job with the reason, the batch goes on, nothing stays running."""
    mirror = tmp_path / "mirror" / "opencv"
    mirror.mkdir(parents=True)
    (mirror / "EDSR_x2.pb").write_bytes(b"not a TensorFlow graph")
    cfg = write_config(tmp_path, weights=tmp_path / "w")
    got = cli(cfg, "weights", "fetch", "edsr", "--trust-unhashed", "--mirror", mirror.parent)
    assert got.returncode == 1 and b"recorded" in got.stdout  # x3 and x4 are not on this mirror
    pictures = [image(tmp_path / "in" / f"{n}.png", seed=i) for i, n in enumerate("ab")]
    res = cli(
        cfg, "process", *pictures, "--model", "edsr", "--scale", "2", "--out", tmp_path / "out", "--format", "json"
    )
    assert res.returncode == 1, text(res)
    reports = json.loads(res.stdout)
    assert [r["state"] for r in reports] == ["failed", "failed"], reports
    assert all(r["error"].startswith("internal: unexpected") for r in reports), reports
    states = [j["state"] for j in jobs(tmp_path / "var" / "upscaled.db")]
    assert states == ["failed", "failed"]


# --- 16: readers and umask -------------------------------------------------------------------------------------------
def test_f16_cli_readers_never_create_or_migrate_and_writers_keep_the_umask(tmp_path):
    """`history` created a 0644 database, and `history`, `stats` and `report` migrated the database as a side
    effect. Readers open it read-only and change nothing (an old schema stays old); what a command creates follows
    the `umask` setting, whatever the shell's is."""
    cfg = write_config(tmp_path, umask="077")
    db = tmp_path / "var" / "upscaled.db"
    for reader in (
        ["history"],
        ["stats"],
        ["query", "SELECT 1"],
        ["nodes"],
        ["report", "--out", tmp_path / "r.html"],
        ["web", "--listen", "127.0.0.1:0"],
    ):
        res = cli_here(cfg, *reader)
        assert res.exit_code != 0 and "does not exist" in res.output, (reader, res.output)
    assert not (tmp_path / "var").exists() and not (tmp_path / "r.html").exists()
    assert cli(cfg, "db", "upgrade").returncode == 0
    assert stat.S_IMODE(db.stat().st_mode) == 0o600 and stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    report = cli(cfg, "report", "--out", "r.html")
    assert report.returncode == 0 and stat.S_IMODE((tmp_path / "r.html").stat().st_mode) == 0o600
    # A database at schema 2, from before the migrations: readers read it as it is, and leave it so.
    legacy = tmp_path / "legacy" / "upscaled.db"
    legacy.parent.mkdir()
    with sqlite3.connect(legacy) as con:
        con.executescript((ROOT / "tests" / "data" / "schema_v2_sqlite.sql").read_text())
    legacy_cfg = write_config(legacy.parent, database="sqlite:///upscaled.db")
    digest = sha(legacy)
    for reader in (
        ["history"],
        ["stats"],
        ["query", "SELECT count(*) AS n FROM jobs"],
        ["nodes"],
        ["report", "--out", tmp_path / "old.html"],
    ):
        cli_here(legacy_cfg, *reader)  # it may fail on the old schema; it must not touch it
    assert sha(legacy) == digest
    with sqlite3.connect(legacy) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "alembic_version" not in tables
    # The web view on it: serves, and leaves it as it was.
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(legacy_cfg), "web", "--listen", "127.0.0.1:0"],
        cwd=legacy.parent,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        line = proc.stderr.readline().decode()
        assert "upscaled web: http://" in line, line
    finally:
        proc.terminate()
        proc.wait(20)
    assert sha(legacy) == digest


# --- 17: encoder limits ----------------------------------------------------------------------------------------------
def test_f17_a_webp_over_16383_px_is_refused_with_a_clear_error(tmp_path):
    """A WebP output wider than 16383 px ended as an `internal` error with a traceback. The encoder's limit is
    checked before encoding: an `output` error that names the limit and a format that can hold the image."""
    cfg = write_config(tmp_path, settle_seconds=0.1, rules=[dict(BICUBIC, scale=8, format="webp")])
    db = tmp_path / "var" / "upscaled.db"
    d = Daemon(cfg)
    try:
        d.wait_started()
        wide = tmp_path / "wide.png"  # wider than the Set5 picture image() crops from: noise will do
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 2100, 3), dtype=np.uint8)).save(wide)
        os.rename(wide, tmp_path / "inbox" / "wide.png")  # 16800 x 64 out
        wait_for(lambda: settled(db, 1), 60)
        stop(d)
    finally:
        d.kill()
    (job,) = jobs(db)
    assert job["state"] == "failed" and job["error_kind"] == "output", job
    assert "16800x64" in job["error"] and "16383" in job["error"] and "webp" in job["error"], job["error"]
    assert "Traceback" not in d.log_path.read_text()
    assert not [e for e in d.events() if e.get("event") == "job.crashed"]
    assert not [p for p in (tmp_path / "outbox").rglob("*") if p.is_file()]


# --- 18: BRISQUE files ---------------------------------------------------------------------------------------------
def test_f18_tampered_brisque_files_are_refused_at_load(tmp_path, weights_dir):
    """The BRISQUE .yml files were not verified again when loaded. A subtly edited model (still a valid file, so
    it would score) is refused by its sha256: no brisque score is recorded. Put back, the next job scores again: the
    hash is what refused it."""
    from models.catalog import CATALOG
    from models.errors import WeightsCorruptError
    from models.weights import locate

    weights = tmp_path / "w"
    shutil.copytree(weights_dir, weights)
    model = weights / "quality" / "brisque_model_live.yml"
    good = model.read_bytes()
    assert b"gamma: 5.0000000000000003e-02" in good
    model.write_bytes(good.replace(b"gamma: 5.0000000000000003e-02", b"gamma: 6.0000000000000003e-02"))
    with pytest.raises(WeightsCorruptError, match="sha256"):  # the check the worker's BRISQUE lookup makes
        locate(weights, CATALOG["brisque"], 0)
    cfg = write_config(tmp_path, weights=weights, settle_seconds=0.1, rules=[dict(BICUBIC, metrics=["brisque"])])
    db = tmp_path / "var" / "upscaled.db"
    d = Daemon(cfg)
    try:
        d.wait_started()
        drop(tmp_path / "inbox", "one.png", seed=1)
        # the metrics trail the done commit: put the file back only once job one's metrics are settled
        wait_for(lambda: [j for j in settled(db, 1) if j["metrics_state"] not in ("pending", None)], 30)
        model.write_bytes(good)
        drop(tmp_path / "inbox", "two.png", seed=2)
        wait_for(lambda: len([e for e in d.events() if e.get("event") == "job.done"]) == 2, 30)
        stop(d)
    finally:
        d.kill()
    one, two = jobs(db)
    assert one["state"] == two["state"] == "done"
    assert rows(db, "SELECT name FROM metrics WHERE job_id = ?", one["id"]) == []
    assert [r["name"] for r in rows(db, "SELECT name FROM metrics WHERE job_id = ?", two["id"])] == ["brisque"]


# --- 19: FIFOs -------------------------------------------------------------------------------------------------------
def test_f19_a_fifo_swapped_in_after_registration_blocks_nothing(tmp_path):
    """A FIFO swapped in after `lstat` blocked `open()`, and with it the service. Opened with O_NONBLOCK and
    checked with fstat: the job fails, and the next file is done as if nothing happened. A FIFO dropped as such
    fails at the door."""
    cfg = write_config(tmp_path, rules=[BICUBIC], settle_seconds=0.1)
    inbox, marks, db = tmp_path / "inbox", tmp_path / "marks", tmp_path / "var" / "upscaled.db"
    d = Daemon(cfg, armed(marks, "after-claim"))
    try:
        d.wait_started()
        drop(inbox, "f.png")
        reached(marks, "after-claim")
        os.unlink(inbox / "f.png")
        os.mkfifo(inbox / "f.png")  # no writer will ever open it: an open() without O_NONBLOCK never returns
        release(marks, "after-claim")
        os.mkfifo(inbox / "direct.png")
        time.sleep(0.5)
        drop(inbox, "g.png", seed=3)
        wait_for(
            lambda: [j for j in jobs(db) if j["rel_path"] == "g.png" and j["state"] == "done"],
            30,
            what="the next file done: the service was not blocked",
        )
        wait_for(lambda: all(j["state"] in ("done", "failed") for j in jobs(db)), 30)
        stop(d)
    finally:
        d.kill()
    by_name: dict[str, list[dict]] = {}
    for j in jobs(db):
        by_name.setdefault(j["rel_path"], []).append(j)
    assert all(j["state"] == "failed" for j in by_name["f.png"] + by_name["direct.png"]), by_name
    assert {j["error_kind"] for j in by_name["f.png"]} <= {"unsafe-path", "input-changed"}
    assert any("not a regular file" in (j["error"] or "") for j in by_name["direct.png"])


# --- issue 20, part B: one file must never stop the service ---------------------------------------------------------
@pytest.fixture
def failed_elsewhere(tmp_path: Path) -> Iterator[Path]:
    """A failed/ folder on a filesystem of its own (as docs/security.md recommends for the inbox): a tmpfs mounted
    for the test when it runs as root, else a folder in /dev/shm."""
    path = tmp_path / "failed-fs"
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(path)]
    mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0
    if not mounted:
        shm = Path("/dev/shm")
        if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("no second filesystem: a tmpfs cannot be mounted here (not root) and /dev/shm is missing")
        path = Path(tempfile.mkdtemp(dir=shm, prefix="upscaled-failed-"))
    assert os.stat(path).st_dev != os.stat(tmp_path).st_dev
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def test_i20_f01_a_fifo_quarantined_to_failed_on_another_filesystem_blocks_nothing(tmp_path, failed_elsewhere, notify):
    """A FIFO dropped in the inbox fails at the door. Quarantining it to failed/ on another filesystem hit EXDEV,
    and the copy opened the FIFO without O_NONBLOCK: the main thread waited for a writer forever, nothing more was
    admitted, no watchdog ping went out, and SIGTERM could not stop it. Now a FIFO, or a link, is made anew in
    failed/ as `mv` does, and never opened: the next file is done, the pings keep coming, SIGTERM stops it."""
    cfg = write_config(tmp_path, rules=[BICUBIC], settle_seconds=0.1, failed=str(failed_elsewhere))
    inbox, db = tmp_path / "inbox", tmp_path / "var" / "upscaled.db"
    d = Daemon(cfg, dict(notify.env, WATCHDOG_USEC="2000000"))
    try:
        d.wait_started()
        t0 = time.monotonic()
        os.mkfifo(inbox / "pipe.png")
        os.symlink("/etc/passwd", inbox / "link.png")
        wait_for(lambda: settled(db, 2), 30, what="the FIFO and the link failed")
        drop(inbox, "good.png", seed=4)
        wait_for(
            lambda: [j for j in jobs(db) if j["rel_path"] == "good.png" and j["state"] == "done"],
            30,
            what="the next file done: the main thread was not blocked",
        )
        wait_for(lambda: not (inbox / "pipe.png").exists() and not (inbox / "link.png").is_symlink(), 30)
        t1 = time.monotonic()
        stop(d)
    finally:
        d.kill()
    assert stat.S_ISFIFO(os.lstat(failed_elsewhere / "pipe.png").st_mode)
    assert os.readlink(failed_elsewhere / "link.png") == "/etc/passwd"
    for name in ("pipe.png", "link.png"):
        reason = json.loads((failed_elsewhere / f"{name}.error.json").read_text())
        assert reason["kind"] == "unsafe-path" and name in reason["error"], reason
    pings = [t0, *notify.pings(t0, t1), t1]
    assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 1.5, pings


def test_i20_f10_a_sparse_file_stays_sparse_in_failed_on_another_filesystem(tmp_path, failed_elsewhere):
    """A 200 MB sparse file (a valid header on a tail of holes) is refused at the door and quarantined to failed/ on
    another filesystem. The copy wrote every byte: 200 MB of disk for a file that held a few KB. Now only its data
    extents are copied, and it stays sparse there."""
    cfg = write_config(tmp_path, rules=[BICUBIC], settle_seconds=0.1, failed=str(failed_elsewhere))
    inbox = tmp_path / "inbox"
    d = Daemon(cfg)
    try:
        d.wait_started()
        tail = image(tmp_path / "staging" / "tail.png")
        with open(tail, "r+b") as fh:
            fh.truncate(200 << 20)
        os.rename(tail, inbox / "tail.png")
        wait_for(lambda: (failed_elsewhere / "tail.png").exists() and not (inbox / "tail.png").exists(), 60)
        stop(d)
    finally:
        d.kill()
    st = os.stat(failed_elsewhere / "tail.png")
    assert st.st_size == 200 << 20
    assert st.st_blocks * 512 < 1 << 20, f"{st.st_blocks * 512} bytes of disk for a few KB of data"
    assert json.loads((failed_elsewhere / "tail.png.error.json").read_text())["kind"] == "too-large"


def test_i20_f02_a_folder_swapped_for_a_file_a_loop_or_a_locked_folder_halts_no_intake(tmp_path):
    """Write `inbox/a/x.png`, and before it settles move `inbox/a` away and put a plain file named `a` in its place:
    `lstat` of the waiting file raised NotADirectoryError in every loop, since only FileNotFoundError was caught, and
    no file was taken again while /livez and /readyz stayed 200. The same for a folder swapped for a link loop
    (ELOOP) or made unsearchable (EACCES; the daemon runs without root's permission override here). Each path now
    stands alone: the files beside them are done, and the locked one once its folder opens again."""
    from tests.acceptance.test_acceptance import _without_read_override
    from tests.acceptance.test_telemetry_daemon import address, get

    cfg = write_config(tmp_path, rules=[BICUBIC], settle_seconds=2.0, http_listen="127.0.0.1:0")
    inbox, db = tmp_path / "inbox", tmp_path / "var" / "upscaled.db"
    for folder in ("a", "c", "d"):
        (inbox / folder).mkdir(parents=True)
    d = Daemon(cfg, prefix=_without_read_override())
    try:
        d.wait_started()
        base = address(d)
        for rel, seed in (("a/x.png", 1), ("c/y.png", 2), ("d/z.png", 3)):
            drop(inbox, rel, seed=seed)
        time.sleep(0.7)  # the watcher has them; they settle after 2 s
        os.rename(inbox / "a", tmp_path / "a-away")
        (inbox / "a").write_text("a file where the folder was")
        os.rename(inbox / "c", tmp_path / "c-away")
        os.symlink("c", inbox / "c")  # a loop
        os.chmod(inbox / "d", 0)
        drop(inbox, "b.png", seed=5)
        wait_for(
            lambda: [j for j in jobs(db) if j["rel_path"] == "b.png" and j["state"] == "done"],
            30,
            what="the file beside them done: intake goes on",
        )
        assert get(base + "/livez")[0] == 200 and get(base + "/readyz")[0] == 200
        os.chmod(inbox / "d", 0o755)
        wait_for(
            lambda: [j for j in jobs(db) if j["rel_path"] == "d/z.png" and j["state"] == "done"],
            30,
            what="the locked file, once its folder opened again (the next rescan)",
        )
        stop(d)
    finally:
        os.chmod(inbox / "d", 0o755)
        d.kill()
    unreachable = {e["file"]: e["error"] for e in d.events() if e.get("event") == "watcher.unreachable"}
    assert unreachable.get(str(inbox / "c" / "y.png"), "").startswith("Too many levels of symbolic links"), unreachable
    assert unreachable.get(str(inbox / "d" / "z.png")) == "Permission denied", unreachable
    assert not [e for e in d.events() if e.get("event") == "loop.error"]


# --- the unit --------------------------------------------------------------------------------------------------------
def _exposure(unit_text: str, folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "upscaled.service"
    path.write_text(
        unit_text.replace("/opt/upscaled/.venv/bin/upscaled", str(Path(sys.executable).with_name("upscaled")))
    )
    verify = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert verify.returncode == 0 and "upscaled.service" not in verify.stderr, verify.stderr
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for upscaled.service: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    return float(m.group(1))


def drop_ins(doc: str) -> dict[str, str]:
    """The drop-ins docs/security.md gives: fenced ``ini`` blocks whose first line names the file."""
    found = {}
    for block in re.findall(r"```ini\n(.*?)```", doc, re.S):
        first = block.splitlines()[0]
        m = re.fullmatch(r"# (/etc/systemd/system/upscaled\.service\.d/[\w.-]+\.conf)", first)
        if m:
            found[m.group(1)] = block
    return found


@needs_systemd
def test_unit_hardening_limits_a_read_only_weights_folder_and_the_network_drop_ins(tmp_path):
    """The unit bounds memory and tasks (overridable with a drop-in), mounts the weights folder read-only, and says
    how to scrape /metrics; its exposure stays at or under 1.5. The network drop-ins of docs/security.md (no network
    for a SQLite-only node, an allow list for PostgreSQL) verify cleanly and only lower it."""
    unit = UNIT.read_text()
    for key in ("MemoryHigh=", "MemoryMax=", "TasksMax=", "ReadOnlyPaths=-/var/cache/upscaled/weights"):
        assert re.search(rf"^{re.escape(key)}\S", unit, re.M) or key in unit.splitlines(), key
    assert "127.0.0.1:9807" in unit and "/metrics" in unit
    base = _exposure(unit, tmp_path / "base")
    assert base <= 1.5
    doc = SECURITY_DOC.read_text()
    found = drop_ins(doc)
    assert len(found) >= 4, found  # no network, localhost only, PostgreSQL only, the password as a credential
    assert any("PrivateNetwork=yes" in b for b in found.values())
    assert any("IPAddressDeny=any" in b and "IPAddressAllow=" in b for b in found.values())
    for i, (name, block) in enumerate(found.items()):
        assert _exposure(unit + "\n" + block, tmp_path / f"drop-in-{i}") <= base, name
    for must in (
        "0640",
        "LoadCredential=",
        "EnvironmentFile",
        "SELECT",
        "default_transaction_read_only",
        "--trust-unhashed",
        "ReadOnlyPaths=",
    ):
        assert must in doc, must
