"""The first hour with a real daemon (issue 22): what a newcomer meets after `make run`.

- the rule folders exist at start and after SIGHUP, shaped like the inbox (owner, group, mode);
- ``device = "auto"`` is named as the real device everywhere: check-config, /metrics, /livez, nodes;
- the rule nobody wrote is logged and shown; missing weights make check-config fail, and every hint is the exact
  command for this configuration, which is then run as printed;
- ``upscaled retry`` brings a failed input back, the service runs the same job again, and its .error.json is gone;
- the console log on a terminal: colour, the file first, relative paths, no empty keys, escaped names, a
  multi-line error on lines of its own.

Every check runs the real `upscaled` (a subprocess) against a real `upscaled run`.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from models.devices import resolve_auto
from models.weights import fetch
from tests.conftest import MIRROR, ROOT, Daemon, image, rows, wait_for, write_config

REAL_DEVICE = resolve_auto("auto")  # cpu here; cuda:0 on a machine with a GPU


def up(cfg: Path, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess:
    """`upscaled --config CFG ARGS` as a subprocess; ``ok``: it must exit 0 (True), non-zero (False), or either."""
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cfg.parent,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    if ok is not None:
        assert (res.returncode == 0) is ok, (args, res.returncode, res.stdout, res.stderr)
    return res


def as_run(hint: str) -> list[str]:
    """A printed `upscaled ...` command, run through this interpreter as the same program."""
    argv = shlex.split(hint)
    assert argv[0] == "upscaled", hint  # python -m daemon: the program is not the venv's script
    return [sys.executable, "-m", "daemon", *argv[1:]]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_rule_folders_real_devices_exact_hints_and_retry(tmp_path):
    weights = tmp_path / "weights"
    assert all(r.status == "fetched" for r in fetch(weights, ["fsrcnn"], mirror=str(MIRROR)))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.chmod(inbox, 0o2770)  # a group-shared drop folder: its rule folders must be too
    if os.geteuid() == 0:
        os.chown(inbox, 4242, 4343)
    rules = [
        {"folder": "photos", "model": "fsrcnn", "scale": 2, "metrics": []},
        {"folder": "clients/acme", "model": "bicubic", "scale": 2, "metrics": []},
        {"folder": "small", "model": "espcn", "scale": 2, "metrics": []},
    ]
    cfg = write_config(tmp_path, weights=weights, rules=rules, weights_mirror=str(MIRROR), http_listen="127.0.0.1:0")

    # check-config: the real device; the default rule nobody wrote; espcn's weights missing is an error.
    res = up(cfg, "check-config", ok=False)
    assert f'worker(s) on each of {REAL_DEVICE} (device = "auto")' in res.stdout, res.stdout
    assert re.search(r"\(default\): bicubic x2 .*implicit", res.stdout), res.stdout
    hint = f"upscaled --config {shlex.quote(str(cfg))} weights fetch espcn --mirror {shlex.quote(str(MIRROR))}"
    assert f"WEIGHTS MISSING: run `{hint}`" in res.stdout and hint in res.stderr
    assert "auto" not in res.stdout.replace('(device = "auto")', "")
    assert up(cfg, "check-config", "--no-weights").returncode == 0

    d = Daemon(cfg)
    try:
        d.wait_started(timeout=120)  # a loaded machine starts it slowly
        # 1. Every rule folder, shaped like the inbox.
        want = os.stat(inbox)
        for folder in ("photos", "clients", "clients/acme", "small"):
            st = os.stat(inbox / folder)
            assert stat.S_IMODE(st.st_mode) == 0o2770 and (st.st_uid, st.st_gid) == (want.st_uid, want.st_gid), folder
        events = d.events()
        assert any(e["event"] == "rule.implicit_default" and e["model"] == "bicubic" for e in events)
        missing = next(e for e in events if e["event"] == "weights.missing")
        assert missing["model"] == "espcn" and missing["fix"] == hint

        # 3. The real device on /metrics, /livez and in `nodes`; "auto" nowhere.
        base = "http://" + next(e["address"] for e in d.events() if e["event"] == "telemetry.listening")
        status, metrics = get(base + "/metrics")
        assert status == 200 and f'device="{REAL_DEVICE}"' in metrics and 'device="auto"' not in metrics
        status, body = get(base + "/livez")
        threads = [k for k in json.loads(body)["checks"] if k.startswith("thread ")]
        assert f"thread {REAL_DEVICE.replace(':', '')}.0" in threads and not [t for t in threads if "auto" in t], (
            threads
        )
        status, body = get(base + "/readyz")
        assert hint in json.loads(body)["checks"]["weights"]["reason"]
        (node,) = json.loads(up(cfg, "nodes", "--format", "json").stdout)
        assert node["device"] == REAL_DEVICE

        # The README's first command: a file copied into a rule folder.
        image(inbox / "photos" / "cat.png", (48, 40))
        wait_for(lambda: (tmp_path / "outbox" / "photos" / "cat.fsrcnn.x2.png").exists(), 180, what="cat's output")

        # 5. A job that fails for missing weights; its hint, run as printed; `upscaled retry`; the same job done.
        image(inbox / "small" / "bird.png", (48, 40), seed=3)
        failed_json = tmp_path / "failed" / "small" / "bird.png.error.json"
        wait_for(failed_json.exists, 180, what="bird.png in failed/")
        (job,) = rows(
            tmp_path / "var" / "upscaled.db",
            "SELECT id, state, error_kind FROM jobs WHERE rel_path = ?",
            "small/bird.png",
        )
        assert (job["state"], job["error_kind"]) == ("failed", "weights-missing")
        early = up(cfg, "retry", str(job["id"]), ok=False)  # the weights are still missing: it stays, and says why
        assert "still missing" in early.stdout and hint in early.stdout and failed_json.exists()
        subprocess.run(
            as_run(hint), check=True, capture_output=True, cwd="/", env=dict(os.environ, PYTHONPATH=str(ROOT))
        )
        res = up(cfg, "retry", "--kind", "weights-missing", "--format", "json")
        (moved,) = json.loads(res.stdout)
        assert moved["job"] == job["id"] and moved["state"] == "moved"
        assert moved["to"] == str(inbox / "small" / "bird.png")
        assert not failed_json.exists() and not (tmp_path / "failed" / "small" / "bird.png").exists()
        wait_for(lambda: (tmp_path / "outbox" / "small" / "bird.espcn.x2.png").exists(), 180, what="bird's output")
        db = tmp_path / "var" / "upscaled.db"
        wait_for(lambda: rows(db, "SELECT state FROM jobs WHERE id = ?", job["id"])[0]["state"] == "done", 120)
        assert len(rows(db, "SELECT id FROM jobs WHERE rel_path = 'small/bird.png'")) == 1  # the same job, no duplicate
        assert (tmp_path / "archive" / "small" / "bird.png").exists()
        assert up(cfg, "retry", "--failed").stderr.startswith("no failed job matches")
        done = up(cfg, "retry", str(job["id"]), ok=False)
        assert "the job is done, not failed" in done.stdout

        # 1 again: a rule added while it runs gets its folder on SIGHUP.
        write_config(
            tmp_path,
            weights=weights,
            rules=[*rules, {"folder": "later/on", "model": "bicubic", "scale": 2}],
            weights_mirror=str(MIRROR),
            http_listen="127.0.0.1:0",
        )
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e["event"] == "reload.done" for e in d.events()), 120, what="reload.done")
        assert stat.S_IMODE(os.stat(inbox / "later" / "on").st_mode) == 0o2770
        assert d.stop() == 0
    finally:
        d.kill()


def _pty_daemon(cfg: Path) -> tuple[subprocess.Popen, int]:
    """`upscaled run` with its stdout and stderr on a pseudo-terminal, as a person starts it."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "run"],
        stdout=slave,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        cwd=cfg.parent,
        env={k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"PYTHONPATH": str(ROOT)},
    )
    os.close(slave)
    return proc, master


def _read(master: int, until: str, out: list[str], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while until not in "".join(out):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {until!r} in the console: {''.join(out)[-2000:]}")
        if select.select([master], [], [], 0.2)[0]:
            try:
                out.append(os.read(master, 65536).decode("utf-8", "replace"))
            except OSError:
                break
    return "".join(out)


def test_the_console_log_on_a_terminal_reads_well_and_cannot_be_driven_by_a_name(tmp_path):
    cfg = write_config(tmp_path, log_format="auto")  # auto: a terminal gets the console form
    proc, master = _pty_daemon(cfg)
    out: list[str] = []
    try:
        _read(master, "service.started", out, timeout=180)
        hostile = "a\x1b[31mred\x07.png"
        image(tmp_path / "inbox" / hostile, (40, 32))
        (tmp_path / "inbox" / "bad.png").write_text("not an image")
        text = _read(master, "job.measured", out)
        text = _read(master, "job.failed", out)
        lines = text.replace("\r\n", "\n").splitlines()
        assert "\x1b[32minfo" in text  # the level, coloured on a terminal
        done = next(line for line in lines if " job.done " in line)
        # The file first, then the job; paths relative to the folders' parent; no empty or placeholder keys.
        assert re.search(r"job\.done\s+file=a\\x1b\[31mred\\x07\.png job=\d+ ", done), done
        assert " output=outbox/a\\x1b[31mred\\x07.bicubic.x2.png" in done and " moved_to=archive/a" in done
        assert "notes=" not in done and "metrics=" not in done and str(tmp_path) not in done
        assert "\x1b[31mred" not in text and "\x07" not in text  # the name's escapes never reach the terminal
        failed = next(line for line in lines if " job.failed " in line)
        assert re.search(r"job\.failed\s+file=bad\.png job=\d+", failed), failed
        # A reload that fails: its multi-line reason on indented lines of its own, not a literal "\n".
        (tmp_path / "settings.toml").write_text((tmp_path / "settings.toml").read_text() + "settle_secnds = 1\n")
        proc.send_signal(signal.SIGHUP)
        text = _read(master, "reload.failed", out)
        text = _read(master, "did you mean", out)
        tail = text.replace("\r\n", "\n").split("reload.failed", 1)[1]
        assert "\\n" not in tail.split("did you mean")[0]
        assert re.search(r"\n {4,}.*settings\.toml, line \d+: settle_secnds: unknown key", tail), tail
    finally:
        proc.terminate()
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # drained, so its last lines cannot block it
            if select.select([master], [], [], 0.2)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    break
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        os.close(master)
