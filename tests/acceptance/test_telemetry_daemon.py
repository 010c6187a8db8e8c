"""A real daemon's /metrics, /livez and /readyz: counters that move with real jobs, and a hung worker seen."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.test_hostile_inbox import notify  # noqa: F401  (fixture)
from tests.conftest import Daemon, image, wait_for, write_config
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)

RULES = [{"folder": "", "model": "fsrcnn", "scale": 2, "metrics": []}]


def address(d: Daemon) -> str:
    ev = wait_for(lambda: next((e for e in d.events() if e.get("event") == "telemetry.listening"), None), 30)
    return "http://" + ev["address"]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(base: str) -> dict[tuple[str, tuple], float]:
    status, body = get(base + "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_move_with_real_jobs_and_the_scrape_parses(tmp_path, weights_dir, daemon):
    cfg = write_config(tmp_path, weights=weights_dir, rules=RULES, settle_seconds=0.1, http_listen="127.0.0.1:0")
    d = daemon(cfg)
    base = address(d)
    before = samples(base)
    done_key = ("upscaled_jobs_total", (("model", "fsrcnn"), ("rule", "(default)"), ("status", "done")))
    failed_key = ("upscaled_jobs_total", (("model", "fsrcnn"), ("rule", "(default)"), ("status", "failed")))
    assert before[done_key] == 0 and before[failed_key] == 0  # declared at start, before any job
    image(tmp_path / "inbox" / "a.png", (40, 30))
    image(tmp_path / "inbox" / "b.png", (40, 30), seed=2)
    (tmp_path / "inbox" / "bad.png").write_text("not an image")
    wait_for(
        lambda: samples(base).get(done_key) == 2 and samples(base).get(failed_key) == 1,
        60,
        what="2 done and 1 failed on /metrics",
    )
    after = samples(base)
    assert after[("upscaled_pixels_total", (("direction", "in"),))] == 2 * 40 * 30
    assert after[("upscaled_pixels_total", (("direction", "out"),))] == 2 * 80 * 60
    hist = ("upscaled_job_duration_seconds_count", (("model", "fsrcnn"), ("rule", "(default)"), ("stage", "infer")))
    assert after[hist] == 2
    assert (
        after[("upscaled_last_success_timestamp_seconds", ())]
        >= before[("upscaled_last_success_timestamp_seconds", ())]
    )
    assert any(k[0] == "upscaled_build_info" for k in after)
    status, body = get(base + "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["status"] == "ok" and ready["queue"] == {"pending": 0, "running": 0}
    assert set(ready["checks"]) >= {"database", "inbox", "outbox", "weights", "devices", "config"}
    assert get(base + "/nothing-here")[0] == 404
    assert d.stop() == 0


def test_livez_turns_503_while_a_worker_hangs_and_200_when_it_moves_again(tmp_path, weights_dir):
    cfg = write_config(
        tmp_path, weights=weights_dir, rules=RULES, settle_seconds=0.1, http_listen="127.0.0.1:0", hung_seconds=1.0
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    d = Daemon(
        cfg,
        {
            "UPSCALED_FAILPOINTS_TEST": "1",
            "UPSCALED_FAILPOINTS": "in-infer=pause",
            "UPSCALED_FAILPOINT_DIR": str(marks),
        },
    )
    try:
        d.wait_started()
        base = address(d)
        assert get(base + "/livez")[0] == 200
        image(tmp_path / "inbox" / "stuck.png", (40, 30))
        wait_for(lambda: (marks / "in-infer.hit").exists(), 30, what="a worker inside the model")
        status, body = wait_for(lambda: (r := get(base + "/livez"))[0] == 503 and r, 10, what="/livez 503")
        info = json.loads(body)
        hung = {k: v for k, v in info["checks"].items() if not v["ok"]}
        assert len(hung) == 1 and "stuck.png" in next(iter(hung.values()))["reason"]
        (marks / "in-infer.release").touch()
        wait_for(lambda: (Path(tmp_path) / "outbox" / "stuck.fsrcnn.x2.png").exists(), 30)
        wait_for(lambda: get(base + "/livez")[0] == 200, 10, what="/livez 200 again")
        assert d.stop() == 0
    finally:
        d.kill()


# --- issue 20, part B: health tells the truth ------------------------------------------------------------------------
BICUBIC = [{"folder": "", "model": "bicubic", "scale": 2, "metrics": []}]


def checks(base: str, path: str) -> tuple[int, dict[str, str | None]]:
    """The status of /livez or /readyz and each check's reason (None when it passed)."""
    status, body = get(base + path)
    return status, {k: v["reason"] for k, v in json.loads(body)["checks"].items()}


def test_readyz_and_livez_fail_while_the_database_refuses_writes_and_come_back_with_it(
    tmp_path,
    pg_server,  # noqa: F811
    pg_url,  # noqa: F811
    notify,  # noqa: F811
):
    """The database goes read-only under a running daemon (a failover to a standby does this). Every registration
    and every claim fails, the main loop raises on every pass, and the node's heartbeat is refused: /readyz says the
    database takes no writes and intake is failing; once a thread has failed every pass for half of WatchdogSec,
    /livez names it and the watchdog pings stop, both from the same beats. Before, /readyz stayed 200 (the database
    still answered reads), /livez stayed 200 (a failing pass beat like a good one), and the file that arrived
    meanwhile was forgotten until a restart. When writes come back, the file is done and both endpoints are 200."""
    from sqlalchemy import create_engine, text

    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(f"{pg_server}/postgres", isolation_level="AUTOCOMMIT")

    def read_only(on: bool) -> None:
        """Every new session of the database read-only (or not), and the daemon's sessions ended so that its pool
        opens new ones."""
        with admin.connect() as c:
            change = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
            c.execute(text(f"ALTER DATABASE {name} {change}"))
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})

    cfg = write_config(
        tmp_path,
        rules=BICUBIC,
        database=pg_url,
        settle_seconds=0,
        heartbeat_seconds=0.5,
        stale_seconds=30,
        http_listen="127.0.0.1:0",
    )
    d = Daemon(cfg, dict(notify.env, WATCHDOG_USEC="4000000"))  # stuck after 2 s: hung_seconds (300) is longer
    try:
        d.wait_started()
        base = address(d)
        assert checks(base, "/readyz")[0] == 200 and checks(base, "/livez")[0] == 200
        read_only(True)
        image(tmp_path / "staging" / "a.png", (40, 30))
        (tmp_path / "staging" / "a.png").rename(tmp_path / "inbox" / "a.png")
        wait_for(lambda: checks(base, "/readyz")[1]["database"] is not None, 10, what="the refused heartbeat")
        wait_for(lambda: checks(base, "/readyz")[1]["intake"] is not None, 10, what="intake failing")
        status, ready = checks(base, "/readyz")
        assert status == 503
        assert "takes no writes" in ready["database"], ready
        assert "main loop has failed its last" in ready["intake"] and "read-only transaction" in ready["intake"]

        def both_stuck() -> dict[str, str | None] | None:
            status, live = checks(base, "/livez")
            return live if status == 503 and live["thread main"] and live["thread feed"] else None

        live = wait_for(both_stuck, 10, what="/livez 503 naming the main loop and the feed")
        stuck_at = time.monotonic()
        for thread in ("thread main", "thread feed"):  # the main loop registers, the feed claims: both refused
            assert "every pass of its loop has failed" in live[thread] and "read-only" in live[thread], live
        time.sleep(2.5)
        assert checks(base, "/livez")[0] == 503
        assert not notify.pings(stuck_at + 0.2, time.monotonic()), "the watchdog pinged while /livez said stuck"
        assert any("the main loop is failing" in m for _, m in notify.messages if m.startswith("STATUS=")), "STATUS="
        read_only(False)
        wait_for(lambda: (tmp_path / "outbox" / "a.bicubic.x2.png").exists(), 20, what="the file done afterwards")
        wait_for(lambda: checks(base, "/readyz")[0] == 200, 10, what="/readyz 200 again")
        wait_for(lambda: checks(base, "/livez")[0] == 200, 10, what="/livez 200 again")
        back = time.monotonic()
        wait_for(lambda: notify.pings(back), 10, what="the pings again")
        assert d.stop() == 0
    finally:
        d.kill()
        admin.dispose()


def test_readyz_fails_while_the_inbox_is_not_the_folder_it_watches(tmp_path):
    """The inbox folder is deleted under a running daemon, then made again. The polling observer (for network
    shares) stops with the old folder, and the daemon's handle still points at that one: files dropped into the new
    folder would never be taken. /readyz said 200 again as soon as the path was writable; now it names the
    stopped watcher and the replaced inbox. The daemon is not stuck: /livez stays 200."""
    cfg = write_config(
        tmp_path, rules=BICUBIC, settle_seconds=0.1, http_listen="127.0.0.1:0", observer="polling", poll_seconds=0.2
    )
    d = Daemon(cfg)
    try:
        d.wait_started()
        base = address(d)
        assert checks(base, "/readyz")[0] == 200
        shutil.rmtree(tmp_path / "inbox")
        wait_for(lambda: checks(base, "/readyz")[1]["watcher"] is not None, 10, what="the watcher seen stopped")
        (tmp_path / "inbox").mkdir()
        wait_for(lambda: "not the folder" in (checks(base, "/readyz")[1]["inbox"] or ""), 10, what="a new inbox")
        status, ready = checks(base, "/readyz")
        assert status == 503 and "inbox watcher has stopped" in ready["watcher"], ready
        assert "not the folder the service opened at start" in ready["inbox"], ready
        assert checks(base, "/livez")[0] == 200
        assert d.stop() == 0
    finally:
        d.kill()


def test_the_health_server_answers_only_its_own_host_names_and_caps_its_connections(tmp_path):
    """A page in a browser on this host can rebind its own name to 127.0.0.1 and read what the endpoints say; the
    server answered any Host. Now a Host that is not a name it was bound for (or one of http_allowed_hosts) gets
    400. And it started a thread for every connection, without end: a client holding connections open took a
    thread each. Past MAX_CONNECTIONS the next is answered 503 and closed; the threads stay bounded, and the
    server answers again once they close."""
    from daemon.telemetry import MAX_CONNECTIONS

    cfg = write_config(
        tmp_path,
        rules=BICUBIC,
        http_listen="127.0.0.1:0",
        http_allowed_hosts=["metrics.example.org", "*.scrape.example.org"],
    )
    d = Daemon(cfg)
    held: list[socket.socket] = []
    try:
        d.wait_started()
        base = address(d)
        port = int(base.rsplit(":", 1)[1])

        def ask(host: str | None) -> int:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /livez HTTP/1.1\r\n" + (b"Host: %s\r\n" % host.encode() if host else b"") + b"\r\n")
                return int(s.recv(64).split()[1])

        for ok in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "LocalHost",
            "metrics.example.org:443",
            "a.scrape.example.org",
        ):
            assert ask(ok) == 200, ok
        for bad in ("evil.example:9807", "127.0.0.1.evil.example", "scrape.example.org", None):
            assert ask(bad) == 400, bad
        threads0 = proc_threads(d.proc.pid)
        for _ in range(MAX_CONNECTIONS):  # open, and never say a word: the server takes them in order, a slot each
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for _ in range(3 * MAX_CONNECTIONS):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                answer = s.recv(256)
            assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer, answer
        assert proc_threads(d.proc.pid) <= threads0 + MAX_CONNECTIONS
        for s in held:
            s.close()
        held.clear()
        wait_for(lambda: get(base + "/livez")[0] == 200, 10, what="served again once they closed")
        assert d.stop() == 0
    finally:
        for s in held:
            s.close()
        d.kill()


def proc_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise KeyError("Threads")
