"""systemd: the unit file (verify, security exposure) and the notify protocol against a real socket."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.notify import Notifier
from daemon.service import Service
from tests.conftest import ROOT, image, ready_rows, rows, wait_for, write_config

UNIT = ROOT / "systemd" / "upscaled.service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with its ExecStart pointing at this environment's console script, so verify can check it."""
    exe = Path(sys.executable).with_name("upscaled")
    text = UNIT.read_text().replace("/opt/upscaled/.venv/bin/upscaled", str(exe))
    out = tmp_path / "upscaled.service"
    out.write_text(text)
    return out


@needs_systemd
def test_unit_verifies_cleanly(tmp_path):
    res = subprocess.run(["systemd-analyze", "verify", str(_unit_copy(tmp_path))], capture_output=True, text=True)
    assert res.returncode == 0 and "upscaled.service" not in res.stderr, res.stderr


@needs_systemd
def test_unit_security_exposure_is_at_most_1_5(tmp_path):
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(_unit_copy(tmp_path))], capture_output=True, text=True
    )
    m = re.search(r"Overall exposure level for upscaled.service: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 1.5  # 1.3 with the shipped unit: the bound leaves room for one more allowance
    unit = UNIT.read_text()
    for must in (
        "Type=notify",
        "WatchdogSec=",
        "KillMode=mixed",
        "TimeoutStopSec=",
        "Restart=on-failure",
        "StateDirectory=",
        "CacheDirectory=",
        "EnvironmentFile=",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "NoNewPrivileges=yes",
        "SystemCallFilter=@system-service",
        "DeviceAllow=/dev/nvidiactl",
    ):
        assert must in unit, must
    assert "PrivateDevices=yes" not in unit and "MemoryDenyWriteExecute=yes" not in unit  # they break CUDA/PyTorch


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, tmp_path: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"upscaled-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = tmp_path / "notify.sock"
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                pass
        return [m for _, m in self.messages]

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, m in self.messages:
                if needle in m:
                    return m
            self.collect(0.1)
        pytest.fail(f"no {needle!r} in {self.messages}")

    def until(
        self, predicate: Callable[[list[tuple[float, str]]], bool], timeout: float = 30.0, what: str = ""
    ) -> list[tuple[float, str]]:
        """Collect until ``predicate(messages)`` holds; fail after ``timeout`` seconds. Returns the messages."""
        end = time.monotonic() + timeout
        while not predicate(self.messages):
            if time.monotonic() > end:
                pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}; got {self.messages}")
            self.collect(0.1)
        return self.messages

    def pings(self) -> list[float]:
        """When each ``WATCHDOG=1`` arrived (monotonic seconds)."""
        return [t for t, m in self.messages if m == "WATCHDOG=1"]


WATCHDOG_S = 3.0  # WatchdogSec for the tests: pings come every second, so a loaded machine has a 3x margin


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_protocol_with_a_real_socket(tmp_path, weights_dir, abstract):
    listener = Listener(tmp_path, abstract)
    cfg = write_config(tmp_path, weights=weights_dir)
    env = dict(
        os.environ, UPSCALED_CONFIG=str(cfg), NOTIFY_SOCKET=listener.env, WATCHDOG_USEC=str(int(WATCHDOG_S * 1_000_000))
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        ready = listener.wait_for("READY=1")
        # READY only once the database is open and the watcher runs: both exist by now.
        assert (tmp_path / "var" / "upscaled.db").exists() and (tmp_path / "inbox").is_dir()
        assert f"MAINPID={proc.pid}" in ready
        image(tmp_path / "inbox" / "n.png", (30, 20))
        wait_for(lambda: (tmp_path / "outbox" / "n.bicubic.x2.png").exists(), 60)

        def seen(msgs: list[tuple[float, str]]) -> bool:
            done = [t for t, m in msgs if m.startswith("STATUS=") and "done 1" in m]
            return bool(done) and len([t for t, m in msgs if m == "WATCHDOG=1" and t > done[0]]) >= 2

        listener.until(seen, 60, what="the job done on STATUS= and two pings after it")
        statuses = [m for _, m in listener.messages if m.startswith("STATUS=")]
        assert all("queue" in s for s in statuses)
        pings = listener.pings()
        # systemd's own rule: a ping within every WatchdogSec (the service pings every WatchdogSec / 3).
        assert len(pings) >= 3 and max(b - a for a, b in zip(pings, pings[1:], strict=False)) < WATCHDOG_S
        proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING=1")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.sock.close()


def test_a_hung_worker_stops_the_watchdog_pings(tmp_path, weights_dir):
    listener = Listener(tmp_path, abstract=False)
    now = [1000.0]
    notifier = Notifier({"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": "4000000"})
    svc = Service(load_settings(write_config(tmp_path, weights=weights_dir)), clock=lambda: now[0], notifier=notifier)
    for b in svc.runner.beats.values():
        b.at = now[0]
    svc._tell_systemd()
    assert "WATCHDOG=1" in listener.collect(0.2)
    now[0] += 10.0  # the worker has not moved for 10 s, over half of WatchdogSec
    listener.messages.clear()
    svc._tell_systemd()
    got = listener.collect(0.2)
    assert any(m.startswith("STATUS=") for m in got) and "WATCHDOG=1" not in got
    svc.shutdown()


def test_sighup_reloads_rules_and_a_bad_file_keeps_the_old_ones(tmp_path, weights_dir, daemon):
    cfg = write_config(tmp_path, weights=weights_dir, rules=[{"folder": "x", "model": "bicubic", "scale": 2}])
    d = daemon(cfg)
    (tmp_path / "inbox" / "x").mkdir(parents=True, exist_ok=True)
    write_config(tmp_path, weights=weights_dir, rules=[{"folder": "x", "model": "fsrcnn", "scale": 3}])
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload.done" for e in d.events()), 20)
    image(tmp_path / "inbox" / "x" / "a.png", (30, 20))
    wait_for(lambda: (tmp_path / "outbox" / "x" / "a.fsrcnn.x3.png").exists(), 30)
    cfg.write_text(cfg.read_text() + "\nnot valid toml [\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload.failed" for e in d.events()), 20)
    image(tmp_path / "inbox" / "x" / "b.png", (30, 20), seed=5)
    wait_for(lambda: (tmp_path / "outbox" / "x" / "b.fsrcnn.x3.png").exists(), 30)
    assert d.stop() == 0


def test_sigterm_past_the_deadline_gives_the_job_back_and_exits_0(tmp_path, weights_dir, daemon):
    cfg = write_config(
        tmp_path,
        weights=weights_dir,
        stop_timeout=0.3,
        rules=[{"folder": "", "model": "lapsrn", "scale": 8, "metrics": []}],
    )
    d = daemon(cfg)
    image(tmp_path / "inbox" / "long.png", (160, 160))
    db = tmp_path / "var" / "upscaled.db"
    wait_for(lambda: ready_rows(db, "SELECT id FROM jobs WHERE state = 'running'"), 30, interval=0.01)
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5
    (job,) = rows(db, "SELECT state, attempts FROM jobs")
    # LapSRN x8 to 1280 x 1280 takes seconds on a CPU, far past the 0.3 s deadline: the job is given back, and
    # its attempt does not count.
    assert job == {"state": "pending", "attempts": 0}
    assert any(e.get("event") == "service.stop_deadline" for e in d.events())
    assert (tmp_path / "inbox" / "long.png").exists()
    d2 = daemon(
        write_config(
            tmp_path, weights=weights_dir, rules=[{"folder": "", "model": "lapsrn", "scale": 8, "metrics": []}]
        )
    )
    wait_for(lambda: rows(db, "SELECT state FROM jobs")[0]["state"] == "done", 120)
    assert d2.stop() == 0
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == ["long.lapsrn.x8.png"]  # no temp file, no copy
