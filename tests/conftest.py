"""Shared fixtures: real weights fetched from the shared mirror, real folders, real daemon subprocesses.

``UPSCALED_REQUIRE_ALL=1`` (``.ci/run`` sets it): a test that would skip, at collection or at run time, fails
instead and says why. A missing PostgreSQL, Chromium, systemd-analyze, ``../shared``, torch or root must turn CI
red, not quietly shrink the suite. The only skips it lets through are the ones in :data:`ALLOWED_SKIPS`, which say
that this machine has *more* than the test assumes (a GPU), or lacks what no package can add (IPv6 in the kernel).
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UPSCALED_SHARED", ROOT.parent / "shared")).resolve()  # as the settings resolve paths
MIRROR = SHARED / "weights"
SET5 = SHARED / "datasets" / "Set5"

REQUIRE_ALL_VAR = "UPSCALED_REQUIRE_ALL"
# Skip reasons that are not a missing resource CI could install: the machine has a GPU where a test needs none (or
# the reverse check), or the container's kernel has no IPv6. Everything else fails under UPSCALED_REQUIRE_ALL=1.
ALLOWED_SKIPS = (
    re.compile(r"assume a machine without CUDA"),
    re.compile(r"this machine has a GPU"),
    re.compile(r"no IPv6 in this kernel|::1 is not configured here"),
)


def require_all() -> bool:
    """Whether skips fail (CI): ``UPSCALED_REQUIRE_ALL=1``."""
    return os.environ.get(REQUIRE_ALL_VAR) == "1"


def skip_reason(longrepr: object) -> str:
    """The reason of a skip report (pytest keeps it as ``(path, line, "Skipped: reason")``)."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _refuse_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip report into a failure that names the reason, unless the reason is an allowed one."""
    if not require_all() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report.longrepr)
    if any(p.search(reason) for p in ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = f"{REQUIRE_ALL_VAR}=1 and this would skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A test (or its fixture setup: a missing server, a ``skipif`` marker) that skips fails under require-all."""
    report = yield
    _refuse_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A module that skips while it is collected (``pytest.importorskip`` of torch) fails under require-all.

    That is a collection error, which stops the session unless ``--continue-on-collection-errors`` (``.ci/run``)."""
    report = yield
    _refuse_skip(report)
    return report


class FakeClock:
    """A clock the test moves by hand, for a store (``clock()``: naive UTC, as :func:`daemon.jobs.utcnow`) and for a
    service or runner (``monotonic()``: seconds, as :func:`time.monotonic`). Both start at ``start`` and move only
    with :meth:`advance`."""

    def __init__(self, start: dt.datetime = dt.datetime(2026, 1, 1, 12, 0, 0)) -> None:
        self.start = self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def monotonic(self) -> float:
        return (self.now - self.start).total_seconds()

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


_SANDBOX: list[Any] = []


def shared_sandbox() -> Any:
    """One real sandbox pool (its child processes) for the whole test session, started on first use: the services,
    workers and intakes the tests build share it, where each would otherwise start its own."""
    if not _SANDBOX:
        from daemon.sandbox import Sandbox

        pool = Sandbox(processes=2, timeout=120.0, max_pixels=400_000_000)
        pool.start()
        atexit.register(pool.close)
        _SANDBOX.append(pool)
    return _SANDBOX[0]


@pytest.fixture(scope="session")
def sandbox() -> Any:
    return shared_sandbox()


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder filled through the project's own fetch code, from the shared offline mirror."""
    from models.weights import fetch

    if not MIRROR.is_dir():
        pytest.skip(f"no weights mirror at {MIRROR}")
    d = tmp_path_factory.mktemp("weights")
    reports = fetch(d, ["fsrcnn", "fsrcnn-small", "espcn", "lapsrn", "brisque"], mirror=str(MIRROR))
    bad = [r for r in reports if r.status not in ("fetched", "present")]
    assert not bad, bad
    return d


def write_config(folder: Path, weights: Path | None = None, rules: list[dict] | None = None, **keys) -> Path:
    """Write a settings.toml in ``folder`` with the four folders and a database under it."""
    lines = [
        'inbox = "inbox"',
        'outbox = "outbox"',
        'archive = "archive"',
        'failed = "failed"',
        'database = "sqlite:///var/upscaled.db"',
        "settle_seconds = 0.3",
        "rescan_seconds = 2.0",
    ]
    if weights is not None:
        lines.append(f"weights_dir = {json.dumps(str(weights))}")
    for k, v in keys.items():
        lines = [line for line in lines if not line.startswith(f"{k} =")]
        lines.append(f"{k} = {json.dumps(v)}")
    for rule in rules or []:
        lines.append("\n[[rules]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in rule.items()]
    path = folder / "settings.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def started_services(folder: Path, **defaults) -> Iterator[Callable[..., Any]]:
    """A maker of real :class:`daemon.service.Service` objects over one set of folders and one SQLite file under
    ``folder``, started, stepped by the test in its own thread: ``make(rules=None, **keys)`` writes the settings
    (``defaults`` overridden by ``keys``; the default ``rules`` when ``rules`` is None) and starts one. Making a
    second after ``shutdown()`` of the first is the next start of the daemon. Those not shut down are at the end."""
    from daemon.config import load_settings
    from daemon.service import Service

    made: list[Service] = []

    def make(rules: list[dict] | None = None, **keys) -> Service:
        cfg = write_config(folder, **{**defaults, **keys, **({} if rules is None else {"rules": rules})})
        svc = Service(load_settings(cfg), sandbox=shared_sandbox())
        svc.start()
        made.append(svc)
        return svc

    try:
        yield make
    finally:
        for svc in made:
            if svc.inbox.fd >= 0:  # not shut down yet (shutdown closes the folder handles)
                svc.shutdown()


def image(path: Path, size: tuple[int, int] = (40, 32), mode: str = "RGB", seed: int = 0, **save) -> Path:
    """A small real image with texture (a crop of a Set5 picture when it is there)."""
    rng = np.random.default_rng(seed)
    src = SET5 / "HR" / "baby.png"
    if src.exists():
        big = np.asarray(Image.open(src).convert("RGB"))
        y, x = rng.integers(0, big.shape[0] - size[1] + 1), rng.integers(0, big.shape[1] - size[0] + 1)
        arr = big[y : y + size[1], x : x + size[0]]
    else:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(np.ascontiguousarray(arr)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **save)
    return path


class Daemon:
    """A real `upscaled run` subprocess, with its log captured to a file; ``prefix`` runs it under a command such
    as ``setpriv`` (see tests.acceptance.test_acceptance._without_read_override)."""

    def __init__(self, config: Path, env: dict | None = None, prefix: list[str] | None = None) -> None:
        self.config = config
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        full_env = dict(os.environ, UPSCALED_CONFIG=str(config), PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "daemon", "run"],
            cwd=config.parent,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def wait_started(self, timeout: float = 30.0) -> None:
        def started() -> bool:
            return any(e.get("event") == "service.started" for e in self.events()) or self.proc.poll() is not None

        wait_for(started, timeout, what="service.started")
        assert self.proc.poll() is None, self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def daemon() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Path, env: dict | None = None) -> Daemon:
        d = Daemon(config, env)
        started.append(d)
        d.wait_started()
        return d

    yield start
    for d in started:
        d.kill()


@contextmanager
def sqlite(path: Path):
    import sqlite3

    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    try:
        yield con
    finally:
        con.close()


def rows(db: Path, sql: str, *params) -> list[dict]:
    with sqlite(db) as con:
        return [dict(r) for r in con.execute(sql, params)]


def ready_rows(db: Path, sql: str, *params) -> list[dict]:
    """:func:`rows` for a poll that may start before the daemon has created the database and its tables: [] then."""
    import sqlite3

    if not db.exists():
        return []
    try:
        return rows(db, sql, *params)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
