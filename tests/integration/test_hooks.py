"""Hooks against a real HTTP server on 127.0.0.1 that the test runs, and real commands (daemon/hooks.py)."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

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
    """A local HTTP server that answers each request with the next status in ``statuses`` (then 200), and with a
    ``Location`` header when ``location`` is given (a redirect); it records every request, GET or POST."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0, location: str | None = None) -> None:
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        self.delay = delay
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": json.loads(body) if body else None,
                    }
                )
                time.sleep(outer.delay)
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # noqa: N815 (the stdlib's name): a followed redirect arrives as a GET

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


# A command that writes what it got (its stdin's JSON, its argv as bytes in hex, its environment) to argv[1].
SPY = (
    "import json, os, sys; d = json.load(sys.stdin); "
    "json.dump({'payload': d, 'argv': [os.fsencode(a).hex() for a in sys.argv[2:]], "
    "'env': {k: os.fsencode(v).hex() for k, v in os.environ.items()}}, open(sys.argv[1], 'w'))"
)


def spy(out: Path, *argv: str, **keys) -> Hook:
    return Hook(command=[sys.executable, "-c", SPY, str(out), *argv], **keys)


def seen_by(out: Path) -> dict:
    """What the spy command wrote: its payload, and its argv and environment decoded back to exact bytes."""
    seen = json.loads(out.read_text())
    seen["argv"] = [bytes.fromhex(a) for a in seen["argv"]]
    seen["env"] = {k: bytes.fromhex(v) for k, v in seen["env"].items()}
    return seen


def test_a_real_command_gets_the_payload_argv_fields_and_only_a_minimal_environment(tmp_path):
    out = tmp_path / "seen.json"
    rec = Recorder()
    service_env = {
        "UPSCALED_HOOK_TOKEN": "t0k",
        "UPSCALED_PASSED": "p4ss",
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "UPSCALED_DATABASE": "postgresql+psycopg://upscaled:s3cret@db/upscaled",
        "AWS_SECRET_ACCESS_KEY": "nope",
    }
    runner = HookRunner(rec, env=service_env)
    runner.submit([spy(out, "{input}", "${UPSCALED_HOOK_TOKEN}", pass_env=["UPSCALED_PASSED"])], EVENT)
    (row,) = rec.wait()
    assert row[2], row
    seen = seen_by(out)
    assert seen["argv"] == [b"/in/a b.png", b"t0k"]  # one argv item per name: no shell splitting
    assert seen["payload"]["metrics"] == {"brisque": 21.5} and seen["payload"]["job_id"] == 42
    env = seen["env"]
    fields = {f"UPSCALED_{k}" for k in ("JOB_ID", "EVENT", "INPUT", "OUTPUT", "MODEL", "RULE")}
    python_own = {"LC_CTYPE"}  # Python's UTF-8 mode in a C locale sets it in the child itself
    assert set(env) - python_own == {"PATH", "LANG", "UPSCALED_PASSED"} | fields, (
        f"a hook's environment is PATH, LANG, what pass_env names and the fields, not the service's: {sorted(env)}"
    )
    assert env["UPSCALED_JOB_ID"] == b"42" and env["UPSCALED_PASSED"] == b"p4ss" and env["PATH"] == b"/usr/bin:/bin"
    assert "t0k" not in row[3]


def test_a_variable_that_pass_env_names_and_that_is_not_set_fails_the_hook_naming_it(tmp_path):
    rec = Recorder()
    HookRunner(rec, env={}).submit([spy(tmp_path / "x.json", pass_env=["UPSCALED_NOT_SET"], retries=5)], EVENT)
    (row,) = rec.wait(timeout=5)
    assert not row[2] and "UPSCALED_NOT_SET is not set (named in pass_env)" in row[3], row
    assert not (tmp_path / "x.json").exists()


def test_a_command_that_outlives_its_timeout_is_killed_and_recorded_as_timed_out():
    """Issue 21, row 1: a hung hook must not run on (two of them would stop every hook) nor pass for a success."""
    rec = Recorder()
    runner = HookRunner(rec, env={}, workers=1)
    t0 = time.monotonic()
    runner.submit([Hook(command=[sys.executable, "-c", "import time; time.sleep(4)"], timeout=0.3, retries=0)], EVENT)
    (row,) = rec.wait(timeout=15)
    took = time.monotonic() - t0
    assert not row[2], f"a command past its timeout must be recorded as failed, got {row[3]!r}"
    assert "timed out after 0.3 s (killed)" in row[3] and took < 3, (row[3], took)


def test_a_redirect_is_not_followed_and_fails_naming_where_it_pointed():
    """Issue 20: a 302 to another host must not get the payload nor the Authorization header, and the hook is not
    recorded as delivered."""
    elsewhere = Server()
    first = Server(statuses=[302], location=elsewhere.url + "/collect")
    try:
        rec = Recorder()
        hook = Hook(url=first.url, headers={"Authorization": "Bearer ${TOKEN}"}, retries=3, backoff=0.01)
        HookRunner(rec, env={"TOKEN": "s3cret"}).submit([hook], EVENT)
        (row,) = rec.wait()
        assert not row[2], f"a redirect is not a delivery: {row[3]!r}"
        assert "HTTP 302" in row[3] and elsewhere.url + "/collect" in row[3] and "after 1 attempt" in row[3], row[3]
        assert elsewhere.requests == [], f"the redirect was followed: {elsewhere.requests}"
        assert len(first.requests) == 1
    finally:
        first.close()
        elsewhere.close()


def test_a_name_that_is_not_utf8_reaches_every_hook_exactly(tmp_path):
    """Issue 20: every hook of a job with a non-UTF-8 name failed with UnicodeEncodeError (so a moderation hook could
    be evaded). The command gets the exact bytes; the JSON gets printable text and the exact bytes in base64."""
    name = os.fsdecode(b"/in/ph\xff\xfe.png")
    event = HookEvent(event="done", job_id=5, input=name, output=os.fsdecode(b"/out/ph\xff\xfe.x2.png"))
    server = Server()
    out = tmp_path / "seen.json"
    try:
        rec = Recorder()
        HookRunner(rec, env={}).submit([spy(out, "{input}"), Hook(url=server.url, retries=0)], event)
        rows = rec.wait(2)
        assert all(r[2] for r in rows), rows
        seen = seen_by(out)
        assert seen["argv"] == [b"/in/ph\xff\xfe.png"] and seen["env"]["UPSCALED_INPUT"] == b"/in/ph\xff\xfe.png"
        for body in (seen["payload"], server.requests[0]["body"]):
            assert body["input"] == "/in/ph\\xff\\xfe.png", body["input"]
            assert base64.b64decode(body["input_raw"]) == b"/in/ph\xff\xfe.png"
            assert base64.b64decode(body["output_raw"]) == b"/out/ph\xff\xfe.x2.png"
    finally:
        server.close()
    plain = EVENT.payload()
    assert plain["input_raw"] is None and plain["output_raw"] is None  # a UTF-8 name has no raw form


def test_fields_are_filled_in_one_pass_so_a_name_cannot_bring_in_another_field(tmp_path):
    """Issue 20: ``{output}`` and ``{rule}`` inside an input name were substituted a second time."""
    out = tmp_path / "seen.json"
    event = HookEvent(event="done", job_id=1, input="/in/{output}{rule}${HOME}.png", output="/out/o.png", rule="r")
    rec = Recorder()
    HookRunner(rec, env={"HOME": "/root"}).submit([spy(out, "{input}", "{rule}:{output}")], event)
    (row,) = rec.wait()
    assert row[2], row
    assert seen_by(out)["argv"] == [b"/in/{output}{rule}${HOME}.png", b"r:/out/o.png"]


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
        ({"url": "http://x", "timout": 1}, r"timout\n  Extra inputs are not permitted"),
        ({"url": "http://x", "header": {"Authorization": "x"}}, r"header\n  Extra inputs are not permitted"),
        ({"url": "http://x", "pass_env": ["A"]}, "pass_env only applies to a command hook"),
        ({"command": ["a"], "pass_env": ["A B"]}, "must be environment variable names"),
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


def test_a_typo_in_a_hook_table_stops_the_configuration_naming_the_key(tmp_path):
    """Issue 21, row 2: ``timout = 1`` and ``header = {...}`` were taken silently, and the hook ran with the default
    timeout and no auth header."""
    from daemon.config import load_settings
    from daemon.errors import ConfigError
    from tests.conftest import write_config

    cfg = write_config(tmp_path, rules=[{"folder": "x", "model": "bicubic"}])
    cfg.write_text(
        cfg.read_text()
        + '\n[[rules.on_done]]\nurl = "http://127.0.0.1/x"\nheader = { Authorization = "Bearer x" }\ntimout = 1\n'
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "rules[0].on_done[0].header: unknown key" in str(err.value), str(err.value)
    assert "rules[0].on_done[0].timout: unknown key" in str(err.value), str(err.value)


def test_a_hook_is_given_where_the_input_went_not_the_inbox_path_it_left(tmp_path):
    """Issue 21, row 3: the worker must hand a hook the input's new place (archive/ or failed/): the inbox path
    names a file that no longer exists. The hooks are real commands that check the file is there."""
    from daemon.hooks import HookRunner
    from tests.unit.test_worker import Rig

    rig = Rig(tmp_path)
    exists = [sys.executable, "-c", "import os, sys; sys.exit(0 if os.path.isfile(sys.argv[1]) else 7)", "{input}"]
    hook = Hook(command=exists, retries=0)
    rig.stages.live.settings = rig.settings.model_copy(update={"on_done": [hook], "on_failed": [hook]})
    rec = Recorder()
    rig.stages.hooks = HookRunner(rec, env={})
    rig.admit(rig.drop("good.png"))
    rig.step()
    (rig.settings.inbox / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG header, no image
    reg, spec = rig.admit(PurePosixPath("bad.png"))
    if spec.failure is None:  # refused at the door or when decoded: either way a failed job with a hook
        rig.step()
    else:
        from daemon.worker import Task

        rig.stages.settle([Task(job=reg.job, root=rig.inbox, rel=spec.rel, error=spec.failure)])
    rows = sorted(rec.wait(2))
    assert [(r[1], r[2]) for r in rows] == [("on_done", True), ("on_failed", True)], (
        "a hook's {input} must name the file where it is now (exit 7: it does not exist there)",
        rows,
    )
    assert (rig.settings.archive / "good.png").is_file() and (rig.settings.failed / "bad.png").is_file()
