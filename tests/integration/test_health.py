"""``/readyz`` of a real started :class:`daemon.service.Service`, in each state where it must fail.

The unit tests of daemon/telemetry.py serve a stand-in's checks; here the checks are the service's own
(``Service.readiness``), over the real HTTP server, a real SQLite file and real folders. Each failing state is
made the way it happens: a reload of a broken file, a database that stops answering, a folder that is gone, a
rule whose weights are not there, a rule on a GPU this host does not have.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from daemon.service import Service
from tests.conftest import started_services, write_config

# The checks these tests make fail (the service has more: watcher, intake, sandbox).
CHECKS = {"config", "database", "inbox", "outbox", "archive", "failed", "weights", "devices"}
RULES = [{"folder": "", "model": "bicubic", "scale": 2}]


@pytest.fixture
def make(tmp_path) -> Iterator[Callable[..., Service]]:
    with started_services(tmp_path, http_listen="127.0.0.1:0", rules=RULES) as maker:
        yield maker


def readyz(svc: Service) -> tuple[int, dict[str, Any]]:
    assert svc.http is not None
    host, port = svc.http.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def failing(svc: Service) -> dict[str, str]:
    """The failed checks of /readyz with their reasons; asserts the answer's shape and that it is a 503."""
    status, body = readyz(svc)
    assert CHECKS <= set(body["checks"]), body
    bad = {k: c["reason"] for k, c in body["checks"].items() if not c["ok"]}
    assert (status, body["status"]) == ((503, "failing") if bad else (200, "ok")), (status, body)
    return bad


def reconfigure(svc: Service, tmp_path, text: str) -> None:
    """Rewrite the service's settings file and reload it, as SIGHUP does."""
    svc.settings.config_file.write_text(text)
    svc.reload()


def test_a_healthy_service_is_ready(make):
    assert failing(make()) == {}


def test_a_reload_of_a_broken_file_is_not_ready_until_a_good_one(make, tmp_path):
    svc = make()
    good = svc.settings.config_file.read_text()
    reconfigure(svc, tmp_path, good + "\nsettle_seconds = [unclosed\n")
    bad = failing(svc)
    assert set(bad) == {"config"} and "the last reload failed (the old settings stay)" in bad["config"], bad
    reconfigure(svc, tmp_path, good)
    assert failing(svc) == {}


def test_a_database_that_does_not_answer_is_not_ready(make):
    svc = make()
    db = svc.settings.sqlite_path()
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE jobs RENAME TO jobs_gone")
    try:
        bad = failing(svc)
        assert set(bad) == {"database"} and "no such table: jobs" in bad["database"], bad
    finally:
        with sqlite3.connect(db) as con:
            con.execute("ALTER TABLE jobs_gone RENAME TO jobs")
    assert failing(svc) == {}


@pytest.mark.parametrize("folder", ["inbox", "outbox", "archive", "failed"])
def test_a_folder_that_is_gone_is_not_ready(make, folder):
    svc = make()
    path = getattr(svc.settings, folder)
    shutil.rmtree(path)
    bad = failing(svc)
    assert set(bad) == {folder} and str(path) in bad[folder], bad


def test_a_rule_whose_weights_are_missing_is_not_ready(make, tmp_path):
    """Issue 21, row 5: a node with a rule's weights missing reported ready."""
    svc = make(rules=[*RULES, {"folder": "photos", "model": "fsrcnn", "scale": 4}], weights_dir="no-weights-here")
    bad = failing(svc)
    assert set(bad) == {"weights"}, f"a rule's weights are missing, so /readyz must fail on 'weights': {bad}"
    assert bad["weights"].startswith("missing for fsrcnn (upscaled ") and "weights fetch fsrcnn" in bad["weights"], bad


def test_a_rule_on_a_gpu_this_host_does_not_have_is_not_ready(make, tmp_path):
    svc = make()
    rules = [*RULES, {"folder": "gpu", "model": "bicubic", "scale": 2, "device": "cuda:7"}]
    reconfigure(svc, tmp_path, write_config(tmp_path, rules=rules, http_listen="127.0.0.1:0").read_text())
    bad = failing(svc)
    assert set(bad) == {"devices"} and "cuda:7" in bad["devices"], bad
