"""Telemetry and its HTTP server: the exposition parsed back with prometheus_client's own parser, over a real socket.

The Health here is a stand-in with settable checks and queue, for the server's own behaviour (status codes, the
JSON, a check that raises); the service's real checks, in each state where /readyz must fail, are tested in
tests/integration/test_health.py. Everything else is real: the registry, the text exposition, the
ThreadingHTTPServer, urllib as the client.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemon.errors import ConfigError
from daemon.telemetry import BUCKETS, STAGES, STATUSES, HttpServer, Telemetry, parse_listen

BUILD = {"torch": "2.14.1", "cuda": "12.8", "opencv": "4.14.0"}


class FakeHealth:
    """Stands in for the service: checks and queue set by the test; ``fail_queue`` makes queue() raise."""

    def __init__(self) -> None:
        self.live: dict[str, str | None] = {"main_loop": None, "worker cpu.0": None}
        self.ready: dict[str, str | None] = dict.fromkeys(
            ("config", "database", "inbox", "outbox", "weights", "devices")
        )
        self.pending, self.running = 3, 1
        self.fail_queue: Exception | None = None
        self.queue_calls = 0

    def liveness(self) -> dict[str, str | None]:
        return dict(self.live)

    def readiness(self) -> dict[str, str | None]:
        return dict(self.ready)

    def queue(self) -> dict[str, int]:
        self.queue_calls += 1
        if self.fail_queue is not None:
            raise self.fail_queue
        return {"pending": self.pending, "running": self.running}


def families(telemetry: Telemetry) -> dict:
    body, ctype = telemetry.render()
    assert ctype.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(fams: dict, name: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of one family."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fams[name].samples}


@pytest.fixture
def health() -> FakeHealth:
    return FakeHealth()


@pytest.fixture
def telemetry(health: FakeHealth) -> Telemetry:
    return Telemetry("node-a", "0.1.0", BUILD, memory=lambda: {"cuda:0": 1_500_000_000}, health=health)


@pytest.fixture
def server(telemetry: Telemetry, health: FakeHealth) -> Iterator[HttpServer]:
    srv = HttpServer("127.0.0.1:0", telemetry, health)
    srv.start()
    yield srv
    srv.close()


def get(srv: HttpServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = srv.address
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


# --- the exposition --------------------------------------------------------------------------------------------------
def test_every_metric_has_its_name_type_and_labels(telemetry):
    telemetry.job_started("cpu")
    telemetry.job_outcome(
        rule="photos",
        model="fsrcnn",
        status="done",
        stages=dict.fromkeys(STAGES, 0.2),
        pixels_in=1000,
        pixels_out=16000,
    )
    fams = families(telemetry)
    expected = {
        "upscaled_jobs": ("counter", {"rule", "model", "status"}),
        "upscaled_job_duration_seconds": ("histogram", {"rule", "model", "stage"}),
        "upscaled_queue_jobs": ("gauge", {"node", "state"}),
        "upscaled_jobs_in_progress": ("gauge", {"device"}),
        "upscaled_pixels": ("counter", {"direction"}),
        "upscaled_last_success_timestamp_seconds": ("gauge", set()),
        "upscaled_device_memory_used_bytes": ("gauge", {"device"}),
        "upscaled_build_info": ("gauge", {"version", "node", "torch", "cuda", "opencv"}),
    }
    for name, (kind, labels) in expected.items():
        assert name in fams, f"{name} missing; have {sorted(fams)}"
        assert fams[name].type == kind, (name, fams[name].type)
        for s in fams[name].samples:
            bucket = {"le"} if s.name.endswith("_bucket") else set()
            assert set(s.labels) == labels | bucket, (name, s)
    # Counters are exposed with _total, histograms with _bucket/_sum/_count; every upscaled_ sample has a known name.
    assert {s.name for s in fams["upscaled_jobs"].samples} == {"upscaled_jobs_total"}
    assert {s.name for s in fams["upscaled_pixels"].samples} == {"upscaled_pixels_total"}
    names = {s.name for f in fams.values() for s in f.samples if s.name.startswith("upscaled_")}
    assert not {n for n in names if n.endswith("_created")}, "no _created series: they double the series count"
    body = telemetry.render()[0].decode()
    assert body.count("# TYPE upscaled_") == len(expected)


def test_counters_and_histograms_move_with_outcomes(telemetry):
    telemetry.job_outcome(
        rule="photos",
        model="fsrcnn",
        status="done",
        stages={"decode": 0.01, "infer": 0.011, "total": 2000.0},
        pixels_in=10,
        pixels_out=160,
    )
    telemetry.job_outcome(rule="photos", model="fsrcnn", status="done", stages={"infer": 0.3})
    telemetry.job_outcome(rule="", model="bicubic", status="failed", stages={"decode": 0.002})
    fams = families(telemetry)
    jobs = samples(fams, "upscaled_jobs")
    assert jobs[("upscaled_jobs_total", (("model", "fsrcnn"), ("rule", "photos"), ("status", "done")))] == 2
    # The default rule's folder "" is labelled "(default)": an empty label value would be no label at all.
    assert jobs[("upscaled_jobs_total", (("model", "bicubic"), ("rule", "(default)"), ("status", "failed")))] == 1
    hist = samples(fams, "upscaled_job_duration_seconds")

    def bucket(stage: str, le: str, model: str = "fsrcnn", rule: str = "photos") -> float:
        return hist[
            ("upscaled_job_duration_seconds_bucket", (("le", le), ("model", model), ("rule", rule), ("stage", stage)))
        ]

    assert bucket("decode", "0.01") == 1  # a value on a bound is in that bucket (le: less or equal)
    assert bucket("infer", "0.01") == 0 and bucket("infer", "0.025") == 1 and bucket("infer", "0.5") == 2
    assert bucket("total", "1800.0") == 0 and bucket("total", "+Inf") == 1  # past the last bound: +Inf only
    assert bucket("decode", "0.01", "bicubic", "(default)") == 1
    key = (("model", "fsrcnn"), ("rule", "photos"), ("stage", "infer"))
    assert hist[("upscaled_job_duration_seconds_count", key)] == 2
    assert hist[("upscaled_job_duration_seconds_sum", key)] == pytest.approx(0.311)
    les = [
        s.labels["le"]
        for s in fams["upscaled_job_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["stage"] == "infer"
    ]
    assert les == [repr(float(b)) for b in BUCKETS] + ["+Inf"]
    assert float(les[0]) == 0.01 and float(les[-2]) == 1800.0
    pixels = samples(fams, "upscaled_pixels")
    assert pixels[("upscaled_pixels_total", (("direction", "in"),))] == 10
    assert pixels[("upscaled_pixels_total", (("direction", "out"),))] == 160


def test_stage_values_that_were_not_measured_are_left_out_and_negative_ones_are_zero(telemetry):
    telemetry.job_outcome(
        rule="a", model="m", status="failed", stages={"decode": None, "infer": float("nan"), "queue": -0.5}
    )  # type: ignore[dict-item]
    hist = samples(families(telemetry), "upscaled_job_duration_seconds")
    stages = {dict(k[1])["stage"] for k in hist}
    assert stages == {"queue"}
    assert hist[("upscaled_job_duration_seconds_sum", (("model", "m"), ("rule", "a"), ("stage", "queue")))] == 0.0


def test_bad_outcomes_are_refused_with_what_was_expected(telemetry):
    with pytest.raises(ValueError, match=r"status must be one of done, failed, duplicate, retried, got 'ok'"):
        telemetry.job_outcome(rule="a", model="m", status="ok")
    with pytest.raises(ValueError, match=r"stages must be among queue, .*, got 'load'"):
        telemetry.job_outcome(rule="a", model="m", status="done", stages={"load": 1.0, "infer": 1.0})
    with pytest.raises(ValueError, match="pixel counts must be >= 0"):
        telemetry.job_outcome(rule="a", model="m", status="done", pixels_in=-1)
    assert families(telemetry)["upscaled_jobs"].samples == []  # nothing of the refused calls was counted


def test_build_keys_must_be_label_names():
    with pytest.raises(ValueError, match=r"got 'torch-version'"):
        Telemetry("n", "1", {"torch-version": "2"})
    with pytest.raises(ValueError, match=r"got 'version'"):
        Telemetry("n", "1", {"version": "2"})


def test_in_progress_goes_up_and_down_per_device_and_never_below_zero(telemetry):
    for _ in range(3):
        telemetry.job_started("cuda:0")
    telemetry.job_started("cpu")
    telemetry.job_ended("cuda:0")
    telemetry.job_ended(None)  # a job that never reached a device: nothing was counted for it
    with capture_logs() as logged:
        telemetry.job_ended("cpu")
        telemetry.job_ended("cpu")  # one end too many
    gauge = samples(families(telemetry), "upscaled_jobs_in_progress")
    assert gauge == {
        ("upscaled_jobs_in_progress", (("device", "cpu"),)): 0,
        ("upscaled_jobs_in_progress", (("device", "cuda:0"),)): 2,
    }
    assert [e["event"] for e in logged] == ["telemetry.unbalanced_job_ended"]


def test_declare_creates_zero_series_before_any_job(telemetry):
    telemetry.declare(rules=[("", "fsrcnn"), ("photos", "espcn")], devices=["cuda:0", "cuda:1"])
    fams = families(telemetry)
    jobs = samples(fams, "upscaled_jobs")
    assert len(jobs) == 2 * len(STATUSES) and set(jobs.values()) == {0.0}
    assert ("upscaled_jobs_total", (("model", "espcn"), ("rule", "photos"), ("status", "retried"))) in jobs
    assert set(samples(fams, "upscaled_jobs_in_progress").values()) == {0}


def test_last_success_starts_at_the_start_follows_done_jobs_and_never_goes_back(health):
    before = time.time()
    t = Telemetry("n", "1", {}, health=health)
    after = time.time()

    def last() -> float:
        return families(t)["upscaled_last_success_timestamp_seconds"].samples[0].value

    assert before <= last() <= after
    t.job_outcome(rule="a", model="m", status="failed", finished_at=after + 100)
    assert last() <= after  # a failure is not a success
    t.job_outcome(rule="a", model="m", status="done", finished_at=after + 50)
    assert last() == after + 50
    t.job_outcome(rule="a", model="m", status="done", finished_at=after + 10)  # a slower worker reports late
    assert last() == after + 50


def test_queue_gauge_is_computed_when_scraped_and_labelled_by_node(telemetry, health):
    health.pending, health.running = 7, 2
    q = samples(families(telemetry), "upscaled_queue_jobs")
    assert q == {
        ("upscaled_queue_jobs", (("node", "node-a"), ("state", "pending"))): 7,
        ("upscaled_queue_jobs", (("node", "node-a"), ("state", "running"))): 2,
    }
    health.pending = 0
    calls = health.queue_calls
    q = samples(families(telemetry), "upscaled_queue_jobs")
    assert q[("upscaled_queue_jobs", (("node", "node-a"), ("state", "pending")))] == 0
    assert health.queue_calls == calls + 1


def test_a_failing_queue_or_memory_source_leaves_its_gauge_out_and_is_logged_once(telemetry, health):
    health.fail_queue = RuntimeError("database is locked")

    def broken_memory() -> dict[str, int]:
        raise OSError("NVML: driver not loaded")

    telemetry.memory = broken_memory
    with capture_logs() as logged:
        for _ in range(3):
            fams = families(telemetry)
    assert "upscaled_queue_jobs" not in fams and "upscaled_device_memory_used_bytes" not in fams
    assert "upscaled_jobs" in fams and "upscaled_build_info" in fams
    events = [e["event"] for e in logged]
    assert events == ["telemetry.queue_failed", "telemetry.memory_failed"], logged  # throttled: once per minute
    assert "database is locked" in logged[0]["error"]


def test_no_gpu_means_no_memory_samples(health):
    t = Telemetry("n", "1", {}, health=health)  # memory defaults to dict(): nothing
    fams = families(t)
    assert fams["upscaled_device_memory_used_bytes"].samples == []


def test_updates_from_many_threads_are_all_counted(telemetry):
    def work() -> None:
        for _ in range(500):
            telemetry.job_started("cpu")
            telemetry.job_outcome(rule="a", model="m", status="done", stages={"infer": 0.05}, pixels_out=2)
            telemetry.job_ended("cpu")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    fams = families(telemetry)
    assert (
        samples(fams, "upscaled_jobs")[("upscaled_jobs_total", (("model", "m"), ("rule", "a"), ("status", "done")))]
        == 4000
    )
    assert samples(fams, "upscaled_pixels")[("upscaled_pixels_total", (("direction", "out"),))] == 8000
    assert samples(fams, "upscaled_jobs_in_progress")[("upscaled_jobs_in_progress", (("device", "cpu"),))] == 0


# --- over HTTP -------------------------------------------------------------------------------------------------------
def test_metrics_over_http_parse(server, telemetry):
    telemetry.job_outcome(rule="photos", model="fsrcnn", status="duplicate")
    status, headers, body = get(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert (
        samples(fams, "upscaled_jobs")[
            ("upscaled_jobs_total", (("model", "fsrcnn"), ("rule", "photos"), ("status", "duplicate")))
        ]
        == 1
    )
    assert "process_cpu_seconds" in fams or "python_info" in fams  # the usual process/platform series


def test_livez_turns_503_when_a_check_fails_and_back(server, health):
    status, headers, body = get(server, "/livez")
    doc = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert set(doc) == {"status", "version", "node", "queue", "checks"}
    assert doc["status"] == "ok" and doc["version"] == "0.1.0" and doc["node"] == "node-a"
    assert doc["queue"] == {"pending": 3, "running": 1}
    assert doc["checks"]["worker cpu.0"] == {"ok": True, "reason": None}
    health.live["worker cpu.0"] = "no heartbeat for 93 s"
    status, _, body = get(server, "/livez")
    doc = json.loads(body)
    assert status == 503 and doc["status"] == "failing"
    assert doc["checks"]["worker cpu.0"] == {"ok": False, "reason": "no heartbeat for 93 s"}
    assert doc["checks"]["main_loop"]["ok"] is True
    health.live["worker cpu.0"] = None
    assert get(server, "/livez")[0] == 200


def test_readyz_names_the_failed_check(server, health):
    assert get(server, "/readyz")[0] == 200
    health.ready["outbox"] = "/srv/outbox is not writable: Permission denied"
    status, _, body = get(server, "/readyz")
    doc = json.loads(body)
    assert status == 503
    failed = [name for name, c in doc["checks"].items() if not c["ok"]]
    assert failed == ["outbox"] and "not writable" in doc["checks"]["outbox"]["reason"]


def test_checks_that_raise_are_a_503_not_a_500(server, health):
    def boom() -> dict[str, str | None]:
        raise RuntimeError("store closed")

    health.liveness = boom  # type: ignore[method-assign]
    with capture_logs() as logged:
        status, _, body = get(server, "/livez")
    doc = json.loads(body)
    assert status == 503
    assert doc["checks"] == {
        "liveness": {"ok": False, "reason": "the liveness checks raised RuntimeError: store closed"}
    }
    assert logged[0]["event"] == "telemetry.health_failed"


def test_a_failing_queue_keeps_the_endpoints_up(server, health):
    health.fail_queue = TimeoutError("database did not answer")
    status, _, body = get(server, "/metrics")
    assert status == 200 and b"upscaled_queue_jobs" not in body and b"upscaled_jobs_in_progress" in body
    status, _, body = get(server, "/livez")
    assert status == 200 and json.loads(body)["queue"] is None


def test_other_paths_are_404_and_other_methods_405(server):
    for path in ("/", "/metrics/", "/livez/x", "/../etc/passwd", "/healthz"):
        assert get(server, path)[0] == 404, path
    status, headers, _ = get(server, "/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = get(server, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 100
    assert get(server, "/livez?verbose=1")[0] == 200  # a query string does not change the path


def test_keep_alive_serves_several_requests_on_one_connection(server):
    import http.client

    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for path in ("/metrics", "/livez", "/readyz", "/metrics"):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
    finally:
        conn.close()


def test_close_releases_the_port_and_is_idempotent(telemetry, health):
    srv = HttpServer("127.0.0.1:0", telemetry, health)
    srv.start()
    host, port = srv.address
    with pytest.raises(RuntimeError, match="already started"):
        srv.start()
    srv.close()
    srv.close()
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.address
    again = HttpServer(f"127.0.0.1:{port}", telemetry, health)
    again.start()
    try:
        assert again.address == (host, port)
    finally:
        again.close()


def test_a_port_in_use_is_a_config_error_that_names_the_key(telemetry, health):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        srv = HttpServer(f"127.0.0.1:{taken.getsockname()[1]}", telemetry, health)
        with pytest.raises(ConfigError, match=r"http_listen: cannot listen on 127\.0\.0\.1:\d+: Address already in"):
            srv.start()
    finally:
        taken.close()


def test_ipv6_loopback(telemetry, health):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    srv = HttpServer("[::1]:0", telemetry, health)
    try:
        srv.start()
    except ConfigError as exc:
        pytest.skip(f"::1 is not configured here: {exc}")
    try:
        host, port = srv.address
        assert host == "::1"
        with urllib.request.urlopen(f"http://[::1]:{port}/livez", timeout=10) as resp:
            assert resp.status == 200
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9807", ("127.0.0.1", 9807)),
        ("[::1]:9807", ("::1", 9807)),
        ("localhost:0", ("localhost", 0)),
        (":9807", ("0.0.0.0", 9807)),
        (" 10.0.0.5:80 ", ("10.0.0.5", 80)),
    ],
)
def test_parse_listen(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9807", r"http_listen expects host:port such as 127\.0\.0\.1:9807 or \[::1\]:9807, got '9807'$"),
        ("127.0.0.1", "got '127.0.0.1'"),
        ("::1:9807", "put an IPv6 address in brackets"),
        ("127.0.0.1:70000", "the port must be 0 to 65535, got 70000"),
        ("[nothex]:80", "got '\\[nothex\\]:80'"),
        ("[1.2.3.4]:80", "'1.2.3.4' in brackets is not an IPv6 address"),
        ("host:port", "got 'host:port'"),
    ],
)
def test_parse_listen_refuses_with_the_expected_form(value, message):
    with pytest.raises(ValueError, match=message):
        parse_listen(value)


def test_http_server_refuses_a_bad_listen_string_as_a_config_error(telemetry, health):
    with pytest.raises(ConfigError, match="http_listen expects host:port"):
        HttpServer("localhost", telemetry, health)


def test_the_servers_health_feeds_the_queue_gauge_of_a_telemetry_made_without_one(health):
    t = Telemetry("node-b", "0.1.0", {})
    srv = HttpServer("127.0.0.1:0", t, health)
    srv.start()
    try:
        _, _, body = get(srv, "/metrics")
        assert b'upscaled_queue_jobs{node="node-b",state="pending"} 3.0' in body
        assert json.loads(get(srv, "/readyz")[2])["queue"] == {"pending": 3, "running": 1}
    finally:
        srv.close()
