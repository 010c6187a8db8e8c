"""The first hour's service side (issue 22), fast: a real Service stepped in this process, real folders, the real
`upscaled` CLI beside it. The same promises run against a real `upscaled run` in tests/acceptance/test_first_hour.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.service import Service
from models.devices import resolve_auto
from models.weights import fetch
from tests.conftest import MIRROR, ROOT, image, rows, started_services, wait_for, write_config

REAL_DEVICE = resolve_auto("auto")


def cli(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cfg.parent,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
    )


def run_until(svc: Service, predicate, timeout: float = 60.0) -> None:
    wait_for(lambda: svc.step(wait=0.05) is not None and predicate(), timeout, interval=0, what="the service")


def test_rule_folders_are_made_like_the_inbox_at_start_and_on_reload(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.chmod(inbox, 0o2775)
    if os.geteuid() == 0:
        os.chown(inbox, 4242, 4343)
    (inbox / "kept").mkdir()
    os.chmod(inbox / "kept", 0o700)  # one that exists is left as it is
    rules = [
        {"folder": "photos", "model": "bicubic", "scale": 2},
        {"folder": "clients/acme/raw", "model": "bicubic", "scale": 2},
        {"folder": "kept", "model": "bicubic", "scale": 2},
    ]
    with started_services(tmp_path) as make:
        svc = make(rules=rules)
        want = os.stat(inbox)
        for folder in ("photos", "clients", "clients/acme", "clients/acme/raw"):
            st = os.stat(inbox / folder)
            assert stat.S_IMODE(st.st_mode) == 0o2775, (folder, oct(st.st_mode))
            assert (st.st_uid, st.st_gid) == (want.st_uid, want.st_gid), folder
        assert stat.S_IMODE(os.stat(inbox / "kept").st_mode) == 0o700
        write_config(tmp_path, rules=[*rules, {"folder": "later", "model": "bicubic", "scale": 2}])
        svc.reload()
        assert stat.S_IMODE(os.stat(inbox / "later").st_mode) == 0o2775
        # A link where a rule folder should be is not followed, and costs only a warning.
        (tmp_path / "elsewhere").mkdir()
        (inbox / "linked").symlink_to(tmp_path / "elsewhere")
        write_config(tmp_path, rules=[*rules, {"folder": "linked/deeper", "model": "bicubic", "scale": 2}])
        svc.reload()
        assert not (tmp_path / "elsewhere" / "deeper").exists()
        image(inbox / "photos" / "a.png", (40, 30))
        run_until(svc, lambda: (tmp_path / "outbox" / "photos" / "a.bicubic.x2.png").exists())


def test_device_auto_is_the_real_device_in_the_service(tmp_path):
    with started_services(tmp_path) as make:
        svc = make(workers=2)
        assert svc.settings.devices() == [REAL_DEVICE]
        names = sorted(svc.runner.infer_names)
        assert names == [f"{REAL_DEVICE.replace(':', '')}.{i}" for i in range(2)]
        liveness = svc.liveness()
        assert f"thread {names[0]}" in liveness and not [k for k in liveness if "auto" in k]
        # A reload reads "auto" again: resolved the same, it is no change that needs a restart.
        svc.reload()
        assert svc.settings.devices() == [REAL_DEVICE]


def _espcn_setup(tmp_path: Path) -> tuple[Path, Path]:
    weights = tmp_path / "weights"
    assert all(r.status == "fetched" for r in fetch(weights, ["fsrcnn"], mirror=str(MIRROR)))
    cfg = write_config(
        tmp_path,
        weights=weights,
        weights_mirror=str(MIRROR),
        rules=[{"folder": "small", "model": "espcn", "scale": 2, "metrics": []}],
        settle_seconds=0.1,
    )
    return cfg, weights


def test_check_config_fails_on_missing_weights_with_the_exact_command(tmp_path):
    cfg, _ = _espcn_setup(tmp_path)
    res = cli(cfg, "check-config")
    hint = f"upscaled --config {cfg} weights fetch espcn --mirror {MIRROR}"
    assert res.returncode == 1 and f"WEIGHTS MISSING: run `{hint}`" in res.stdout, res.stdout
    assert f"run `{hint}` (or pass --no-weights" in res.stderr
    assert f'on each of {REAL_DEVICE} (device = "auto")' in res.stdout
    assert re.search(r"\(default\): bicubic x2 .* \(implicit: no rule in the file has folder", res.stdout)
    assert cli(cfg, "check-config", "--no-weights").returncode == 0


def test_retry_brings_a_failed_input_back_and_the_same_job_runs_again(tmp_path):
    cfg, weights = _espcn_setup(tmp_path)
    from daemon.config import load_settings

    svc = Service(load_settings(cfg))
    svc.start()
    try:
        db = tmp_path / "var" / "upscaled.db"
        image(tmp_path / "inbox" / "small" / "bird.png", (40, 32), seed=2)
        image(tmp_path / "inbox" / "small" / "cat.png", (40, 32), seed=3)
        failed = tmp_path / "failed" / "small"
        run_until(svc, lambda: (failed / "bird.png.error.json").exists() and (failed / "cat.png.error.json").exists())
        ids = {r["rel_path"]: r["id"] for r in rows(db, "SELECT id, rel_path FROM jobs")}
        # Still missing: left where it is, with the command that fetches them.
        res = cli(cfg, "retry", str(ids["small/bird.png"]))
        assert res.returncode == 1 and "still missing" in res.stdout and (failed / "bird.png").exists()
        assert all(r.status == "fetched" for r in fetch(weights, ["espcn"], mirror=str(MIRROR)))
        # cat.png in failed/ is not cat's input any more: it is refused, not moved.
        image(failed / "cat.png", (40, 32), seed=9)
        res = cli(cfg, "retry", str(failed), "--format", "json")
        outcome = {o["file"]: o for o in json.loads(res.stdout)}
        assert res.returncode == 1, res.stdout + res.stderr
        assert outcome["small/bird.png"]["state"] == "moved" and outcome["small/cat.png"]["state"] == "skipped"
        assert "not this job's input" in outcome["small/cat.png"]["note"]
        assert (tmp_path / "inbox" / "small" / "bird.png").exists() and not (failed / "bird.png").exists()
        assert not (failed / "bird.png.error.json").exists() and (failed / "cat.png.error.json").exists()
        run_until(svc, lambda: (tmp_path / "outbox" / "small" / "bird.espcn.x2.png").exists())
        run_until(
            svc, lambda: rows(db, "SELECT state FROM jobs WHERE id = ?", ids["small/bird.png"])[0]["state"] == "done"
        )
        assert len(rows(db, "SELECT id FROM jobs")) == 2  # the same job ran again: no third job, no duplicate
        assert (tmp_path / "archive" / "small" / "bird.png").exists()
    finally:
        svc.shutdown()


@pytest.mark.parametrize("fmt", ["console"])
def test_the_console_renderer_puts_the_file_first_and_escapes_names(tmp_path, fmt):
    """`upscaled process` logs to stderr: with log_format = "console" there, the same renderer as the service's."""
    cfg = write_config(tmp_path, log_format=fmt)
    name = "x\x1b[2Jy\nz.png"
    src = image(tmp_path / "in" / name, (40, 30))
    res = cli(cfg, "process", str(src), "--model", "bicubic", "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    done = next(line for line in res.stderr.splitlines() if " job.done " in line)
    assert re.search(r"job\.done\s+file=x\\x1b\[2Jy\\nz\.png job=\d+ model=bicubic", done), done
    assert "notes=" not in done and "metrics=" not in done and "moved_to" not in done
    assert "\x1b[2J" not in res.stderr and "\x1b[" not in res.stderr  # no escape reaches it, no colour off a TTY
