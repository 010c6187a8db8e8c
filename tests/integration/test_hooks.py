"""Hooks against a real HTTP server on 127.0.0.1 that the test runs, and real commands (daemon/hooks.py)."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from daemon.hooks import Hook, HookEvent, HookRunner, Hooks
from tests.conftest import wait_for

EVENT = HookEvent(
    event="done",
    job_id=42,
    input="/in/a b.png",
    output="/out/a b.x4.png",
    model="fsrcnn",
    rule="photos",
    times={"t_infer": 0.5, "t_total": 0.8},
    metrics={"brisque": 21.5},
)


class Server:
    """A local HTTP server that answers each POST with the next status in ``statuses`` (then 200)."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        self.delay = delay
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                time.sleep(outer.delay)
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[int, str, bool, str]] = []

    def __call__(self, job_id: int, event: str, ok: bool, detail: str) -> None:
        self.rows.append((job_id, event, ok, detail))

    def wait(self, n: int = 1, timeout: float = 20) -> list[tuple[int, str, bool, str]]:
        wait_for(lambda: len(self.rows) >= n, timeout=timeout, what=f"{n} hook result(s)")
        return self.rows


def test_post_json_with_a_secret_header_from_the_environment(server):
    rec = Recorder()
    runner = HookRunner(rec, env={"UPSCALED_HOOK_TOKEN": "s3cret", "HOOK_PATH": "hooks/done"})
    hook = Hook(url=server.url + "/${HOOK_PATH}", headers={"Authorization": "Bearer ${UPSCALED_HOOK_TOKEN}"})
    runner.submit([hook], EVENT)
    (row,) = rec.wait()
    assert row[:3] == (42, "on_done", True) and "HTTP 200 after 1 attempt" in row[3]
    assert "s3cret" not in row[3] and "${HOOK_PATH}" in row[3]  # recorded as configured, never expanded
    (req,) = server.requests
    assert req["path"] == "/hooks/done" and req["headers"]["Authorization"] == "Bearer s3cret"
    body = req["body"]
    assert body["job_id"] == 42 and body["event"] == "done" and body["input"] == "/in/a b.png"
    assert body["output"] == "/out/a b.x4.png" and body["model"] == "fsrcnn" and body["rule"] == "photos"
    assert body["times"]["t_total"] == 0.8 and body["metrics"] == {"brisque": 21.5}
    assert runner.close()


def test_server_errors_are_retried_with_backoff_then_succeed():
    server = Server(statuses=[500, 503])
    try:
        rec = Recorder()
        runner = HookRunner(rec, env={})
        t0 = time.monotonic()
        runner.submit([Hook(url=server.url, retries=3, backoff=0.05)], EVENT)
        (row,) = rec.wait()
        assert row[2] and "after 3 attempts" in row[3] and len(server.requests) == 3
        assert time.monotonic() - t0 >= 0.05 + 0.1  # waited 0.05 s, then 0.1 s
    finally:
        server.close()


def test_a_client_error_is_not_retried():
    server = Server(statuses=[404])
    try:
        rec = Recorder()
        HookRunner(rec, env={}).submit([Hook(url=server.url, retries=5, backoff=0.01)], EVENT)
        (row,) = rec.wait()
        assert not row[2] and "HTTP 404" in row[3] and "after 1 attempt" in row[3] and len(server.requests) == 1
    finally:
        server.close()


def test_submit_never_blocks_on_a_slow_or_dead_endpoint():
    server = Server(delay=1.5)
    try:
        rec = Recorder()
        runner = HookRunner(rec, env={}, workers=1)
        t0 = time.monotonic()
        runner.submit([Hook(url=server.url, timeout=0.3, retries=1, backoff=0.01)] * 3, EVENT)
        assert time.monotonic() - t0 < 0.1
        rows = rec.wait(3)
        assert all(not ok and "no answer: timed out" in detail for _, _, ok, detail in rows), rows
    finally:
        server.close()


def test_a_full_queue_is_recorded_not_waited_on():
    server = Server(delay=1.0)
    try:
        rec = Recorder()
        runner = HookRunner(rec, env={}, workers=1, max_pending=1)
        t0 = time.monotonic()
        runner.submit([Hook(url=server.url, retries=0)] * 5, EVENT)
        assert time.monotonic() - t0 < 0.1
        dropped = [r for r in rec.wait(3, timeout=5) if "already waiting" in r[3]]
        assert dropped and not dropped[0][2]
    finally:
        server.close()


def test_a_real_command_gets_the_payload_argv_fields_and_environment(tmp_path):
    out = tmp_path / "seen.json"
    script = (
        "import json, os, sys; d = json.load(sys.stdin); "
        "json.dump({'payload': d, 'argv': sys.argv[1:], 'job': os.environ['UPSCALED_JOB_ID'], "
        "'token': os.environ.get('UPSCALED_HOOK_TOKEN')}, open(sys.argv[1], 'w'))"
    )
    rec = Recorder()
    runner = HookRunner(rec, env={"UPSCALED_HOOK_TOKEN": "t0k", "PATH": "/usr/bin:/bin"})
    runner.submit([Hook(command=[sys.executable, "-c", script, str(out), "{input}", "${UPSCALED_HOOK_TOKEN}"])], EVENT)
    (row,) = rec.wait()
    assert row[2], row
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(out), "/in/a b.png", "t0k"]  # one argv item per name: no shell splitting
    assert seen["job"] == "42" and seen["payload"]["metrics"] == {"brisque": 21.5} and seen["token"] == "t0k"
    assert "t0k" not in row[3]


def test_a_failing_command_is_retried_and_recorded_with_its_stderr():
    rec = Recorder()
    script = "import sys; sys.stderr.write('disk on fire'); sys.exit(3)"
    HookRunner(rec, env={}).submit(
        [Hook(command=[sys.executable, "-c", script], retries=2, backoff=0.01)],
        HookEvent(event="failed", job_id=7, input="/in/x.png", error="bad"),
    )
    (row,) = rec.wait()
    assert row[:3] == (7, "on_failed", False) and "exit 3: disk on fire after 3 attempts" in row[3]


def test_a_missing_program_or_variable_fails_at_once_with_its_name(tmp_path):
    rec = Recorder()
    runner = HookRunner(rec, env={})
    runner.submit(
        [
            Hook(command=[str(tmp_path / "nope")], retries=5, backoff=5),
            Hook(url="https://example.invalid/${UPSCALED_HOOK_URL_TOKEN}", retries=5, backoff=5),
        ],
        EVENT,
    )
    rows = rec.wait(2, timeout=5)  # no 5 s backoff: neither is retried
    details = " | ".join(r[3] for r in rows)
    assert "was not found" in details and "UPSCALED_HOOK_URL_TOKEN is not set" in details
    assert not any(r[2] for r in rows)


def test_a_failing_record_callback_does_not_stop_the_runner(server):
    calls = []

    def record(*row: object) -> None:
        calls.append(row)
        raise RuntimeError("database is locked")

    runner = HookRunner(record, env={}, workers=1)
    runner.submit([Hook(url=server.url), Hook(url=server.url)], EVENT)
    wait_for(lambda: len(calls) == 2, timeout=10, what="both hooks")
    assert runner.close()


def test_close_runs_what_is_queued_and_refuses_new_work(server):
    rec = Recorder()
    runner = HookRunner(rec, env={})
    runner.submit([Hook(url=server.url)], EVENT)
    assert runner.close(timeout=10)
    runner.submit([Hook(url=server.url)], EVENT)
    assert [r[2] for r in rec.rows] == [True, False] and "stopping" in rec.rows[1][3]


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({}, "exactly one of command"),
        ({"command": ["a"], "url": "http://x"}, "exactly one of command"),
        ({"command": []}, "must name a program"),
        ({"url": "file:///etc/passwd"}, "http:// or https://"),
        ({"command": ["a"], "headers": {"A": "b"}}, "headers only apply"),
        ({"url": "http://x", "retries": 99}, "less than or equal to 20"),
    ],
)
def test_bad_hooks_are_config_errors(keys, match):
    with pytest.raises(ValidationError, match=match):
        Hook(**keys)


def test_hooks_keys_take_one_table_or_a_list():
    h = Hooks(on_done={"url": "http://127.0.0.1/x"}, on_failed=[{"command": ["true"]}, {"url": "https://h/y"}])
    assert len(h.on_done) == 1 and len(h.on_failed) == 2 and Hooks().on_done == []


def test_payload_is_json_with_every_field():
    p = HookEvent(event="failed", job_id=1, input="i", error="boom", error_kind="decode", extra={"node": "n1"})
    doc = json.loads(json.dumps(p.payload()))
    assert doc["error"] == "boom" and doc["error_kind"] == "decode" and doc["node"] == "n1" and doc["schema"] == 1
