"""What a running daemon tells the outside: Prometheus metrics on ``/metrics``, health on ``/livez`` and ``/readyz``.

:class:`Telemetry` keeps the counters, histograms and gauges of one daemon (one *node*) in memory. The service calls
:meth:`Telemetry.job_started`, :meth:`Telemetry.job_ended` and :meth:`Telemetry.job_outcome` from its workers (any
thread), and :meth:`Telemetry.render` produces the text exposition when Prometheus scrapes. Two gauges are not kept
but computed at scrape time: the queue (``health.queue()``, a database query) and the device memory (the
``memory`` callable). A failure of either leaves that gauge out of the scrape and is logged: a scrape never raises
into the daemon and never turns into a 500.

:class:`HttpServer` serves the three endpoints from the standard library's ``ThreadingHTTPServer`` in a daemon
thread. It is deliberately not uvicorn: the daemon stays a plain threaded program, and a slow scrape or a stuck
client never touches the worker threads.

Every metric follows the Prometheus naming rules: the ``upscaled_`` prefix, base units (seconds, bytes, pixels),
``_total`` on counters, and only bounded labels (rule folders and model ids come from the configuration, statuses,
stages and states from the fixed tuples below; never file names). ``docs/metrics.md`` lists them all.

     worker threads ──job_started/job_ended/job_outcome──► Telemetry (lock) ◄──render()── HttpServer ◄── GET /metrics
                                                              │  at scrape time:
                                                              ├── health.queue()   -> upscaled_queue_jobs
                                                              └── memory()         -> upscaled_device_memory_used_bytes
"""

from __future__ import annotations

import bisect
import http.server
import ipaddress
import json
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from daemon import logs
from daemon.errors import ConfigError

STATUSES = ("done", "failed", "duplicate", "retried")
STAGES = ("queue", "decode", "infer", "encode", "write", "metrics", "total")
QUEUE_STATES = ("pending", "running")
DIRECTIONS = ("in", "out")
# Explicit buckets, 0.01 s to 1800 s: a bicubic x2 job takes a few milliseconds per stage, a Stable Diffusion x4 job
# on a CPU runs for many minutes. Roughly 2.5x apart, so any quantile is read to within one bucket of that ratio.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
# The default rule's folder is "" in the configuration; an empty label value is the same as no label in Prometheus.
DEFAULT_RULE_LABEL = "(default)"
LOG_EVERY_S = 60.0  # a failing scrape-time source is logged at most this often (Prometheus scrapes every 15 s)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Connections served at once (a thread each). A Prometheus keeps one, a probe or two come and go: 16 leaves room,
# and bounds what a client that opens connections and never speaks can take from the daemon.
MAX_CONNECTIONS = 16
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n"
)

log = logs.get("upscaled.telemetry")


class Health(Protocol):
    """What the service tells the health endpoints and the queue gauge. Implemented by the service.

    Every method may be called from the HTTP server's threads at any time, concurrently with the workers.
    """

    def liveness(self) -> dict[str, str | None]:
        """Check name -> None when it is fine, else why not: ``{"main_loop": None, "worker cpu.0": "no heartbeat
        for 93 s"}``. ``/livez`` answers 503 when any value is not None."""
        ...

    def readiness(self) -> dict[str, str | None]:
        """The same for ``/readyz``: config, database, inbox, outbox, weights, devices."""
        ...

    def queue(self) -> dict[str, int]:
        """``{"pending": n, "running": m}`` as this node reports them: ``running`` counts the jobs this node runs,
        ``pending`` the jobs waiting in the folders this node serves (shared with every node that serves them)."""
        ...


class _Throttled:
    """Logs a recurring failure once, then at most every ``every`` seconds with the count of the ones in between."""

    def __init__(self, event: str, every: float = LOG_EVERY_S) -> None:
        self.event, self.every = event, every
        self._last = -math.inf
        self._skipped = 0
        self._lock = threading.Lock()

    def __call__(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.every:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        log.warning(self.event, error=f"{type(exc).__name__}: {exc}", repeated=skipped)


class _Histogram:
    """Cumulative bucket counts and the sum of one label set (the exposition wants cumulative counts)."""

    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(BUCKETS, value)  # le semantics: a value equal to a bound belongs to that bucket
        if i < len(BUCKETS):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip(BUCKETS, self.counts, strict=True):
            running += count
            out.append((_float_str(bound), float(running)))
        out.append(("+Inf", float(self.n)))
        return out


def _float_str(v: float) -> str:
    """Bucket bounds as Prometheus clients write them: ``0.01``, ``1.0``, ``1800.0``."""
    return repr(float(v))


class Telemetry:
    """The metrics of one daemon (node). Thread-safe; every update is a few dict operations under one lock.

    ``node`` labels the queue gauge and the build info, so that several nodes on one database are told apart.
    ``build`` becomes the labels of ``upscaled_build_info`` (``torch``, ``cuda``, ``opencv``, ...) next to
    ``version``. ``memory`` returns the bytes in use per device (``{"cuda:0": 123}``, ``{}`` without a GPU); it is
    called at scrape time. ``health`` (also settable later, as the attribute of that name) gives the queue gauge.

    Raises:
        ValueError: a ``build`` key that is not a Prometheus label name, or that collides with ``version``/``node``.
    """

    def __init__(
        self,
        node: str,
        version: str,
        build: dict[str, str],
        memory: Callable[[], dict[str, int]] = dict,
        health: Health | None = None,
    ) -> None:
        for key in build:
            if not _LABEL_NAME.fullmatch(key) or key.startswith("__") or key in ("version", "node"):
                raise ValueError(
                    f"build keys must be Prometheus label names other than 'version' and 'node' "
                    f"(letters, digits, _; not starting with a digit or __), got {key!r}"
                )
        self.node = node
        self.version = version
        self.build = {k: str(v) for k, v in build.items()}
        self.memory = memory
        self.health = health
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str, str], float] = {}
        self._durations: dict[tuple[str, str, str], _Histogram] = {}
        self._in_progress: dict[str, int] = {}
        self._pixels = dict.fromkeys(DIRECTIONS, 0.0)
        # Seeded with the start, not 0: "seconds since the last success" then stays meaningful right after a start,
        # and the stall alert of docs/metrics.md measures from the last success or the start, whichever is later.
        self._last_success = time.time()
        self._queue_failed = _Throttled("telemetry.queue_failed")
        self._memory_failed = _Throttled("telemetry.memory_failed")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        # The usual process_* and python_* series (memory, CPU, open files, GC), as prometheus_client's default
        # registry has them; under systemd's ProcSubset=pid the process ones are left out quietly.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    # --- updates, from the workers ---------------------------------------------------------------------------------
    def declare(self, rules: Iterable[tuple[str, str]] = (), devices: Iterable[str] = ()) -> None:
        """Create the series of the configured (rule folder, model) pairs and devices at 0 before any job.

        Optional, and worth calling at start and on reload: ``increase()`` and ``rate()`` see a series only from
        its second sample, so a counter that appears at 1 hides the first job, and an alert on "no job done"
        needs the series to exist while nothing has been done yet.
        """
        with self._lock:
            for rule, model in rules:
                for status in STATUSES:
                    self._jobs.setdefault((_rule_label(rule), model, status), 0.0)
            for device in devices:
                self._in_progress.setdefault(device, 0)

    def job_started(self, device: str) -> None:
        """A worker on ``device`` took a job: ``upscaled_jobs_in_progress{device}`` goes up by one."""
        with self._lock:
            self._in_progress[device] = self._in_progress.get(device, 0) + 1

    def job_ended(self, device: str | None) -> None:
        """The job of :meth:`job_started` ended, whatever its outcome: the in-progress gauge of ``device`` goes down.

        ``None`` (the job never reached a device) changes nothing. An end without a start is logged and the gauge
        stays at 0 rather than going negative.
        """
        if device is None:
            return
        with self._lock:
            current = self._in_progress.get(device, 0)
            if current > 0:
                self._in_progress[device] = current - 1
                return
        log.warning("telemetry.unbalanced_job_ended", device=device)

    def job_outcome(
        self,
        *,
        rule: str,
        model: str,
        status: str,
        stages: dict[str, float] | None = None,
        pixels_in: int = 0,
        pixels_out: int = 0,
        finished_at: float | None = None,
    ) -> None:
        """Count one job's outcome under (``rule`` folder, ``model``, ``status``) and record its stage times.

        ``stages`` maps a stage of :data:`STAGES` to seconds; a ``None`` or NaN value (a stage it never reached) is
        left out, and a negative one (clocks of two nodes apart, for the queue time) counts as 0. ``pixels_in`` and
        ``pixels_out`` add to ``upscaled_pixels_total``. A ``done`` job sets the last-success time to
        ``finished_at`` (Unix seconds; default now), never moving it backwards.

        Raises:
            ValueError: ``status`` not in :data:`STATUSES`, a stage not in :data:`STAGES`, negative pixel counts.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        unknown = sorted(set(stages or {}) - set(STAGES))
        if unknown:
            raise ValueError(f"stages must be among {', '.join(STAGES)}, got {', '.join(map(repr, unknown))}")
        if pixels_in < 0 or pixels_out < 0:
            raise ValueError(f"pixel counts must be >= 0, got in={pixels_in} out={pixels_out}")
        times = {s: max(0.0, float(v)) for s, v in (stages or {}).items() if v is not None and not math.isnan(v)}
        rule_label = _rule_label(rule)
        with self._lock:
            key = (rule_label, model, status)
            self._jobs[key] = self._jobs.get(key, 0.0) + 1
            for stage, seconds in times.items():
                hist = self._durations.get((rule_label, model, stage))
                if hist is None:
                    hist = self._durations[(rule_label, model, stage)] = _Histogram()
                hist.observe(seconds)
            self._pixels["in"] += pixels_in
            self._pixels["out"] += pixels_out
            if status == "done":
                self._last_success = max(self._last_success, time.time() if finished_at is None else finished_at)

    def stage_time(self, *, rule: str, model: str, stage: str, seconds: float) -> None:
        """One stage's seconds for a job whose outcome was counted already (the metrics, measured after the done
        commit, in a later one).

        Raises:
            ValueError: ``stage`` not in :data:`STAGES`.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        if seconds is None or math.isnan(seconds):
            return
        key = (_rule_label(rule), model, stage)
        with self._lock:
            hist = self._durations.get(key)
            if hist is None:
                hist = self._durations[key] = _Histogram()
            hist.observe(max(0.0, float(seconds)))

    # --- reading -----------------------------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type: the body and header of ``GET /metrics``.

        Text format 0.0.4, which every Prometheus (and every agent that scrapes like one) reads; all our names are
        plain ASCII, so the newer 1.0.0 format would add nothing.
        """
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def queue(self) -> dict[str, int] | None:
        """``health.queue()`` checked (states of :data:`QUEUE_STATES`, counts >= 0), or None when there is no
        health or it failed (logged, throttled). Used by the queue gauge and the JSON of the health endpoints."""
        if self.health is None:
            return None
        try:
            found = self.health.queue()
            out = {state: int(found.get(state, 0)) for state in QUEUE_STATES}
            if any(v < 0 for v in out.values()):
                raise ValueError(f"queue counts must be >= 0, got {found!r}")
            return out
        except Exception as exc:  # a database that does not answer must not fail the scrape
            self._queue_failed(exc)
            return None

    def _snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(
                jobs=dict(self._jobs),
                durations={k: (h.buckets(), h.total) for k, h in self._durations.items()},
                in_progress=dict(self._in_progress),
                pixels=dict(self._pixels),
                last_success=self._last_success,
            )


def _rule_label(folder: str) -> str:
    return folder or DEFAULT_RULE_LABEL


class _Collector(Collector):
    """Turns a :class:`Telemetry` snapshot, and the scrape-time sources, into metric families."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def collect(self) -> Iterator[Metric]:
        t = self.t
        snap = t._snapshot()
        jobs = CounterMetricFamily(
            "upscaled_jobs", "Jobs that ended, by rule folder, model and outcome.", labels=["rule", "model", "status"]
        )
        for (rule, model, status), value in sorted(snap["jobs"].items()):
            jobs.add_metric([rule, model, status], value)
        yield jobs
        durations = HistogramMetricFamily(
            "upscaled_job_duration_seconds",
            "Time of each stage of a job (queue: from arrival to claim; total: the "
            "work stages together), by rule folder and model.",
            labels=["rule", "model", "stage"],
        )
        for (rule, model, stage), (buckets, total) in sorted(snap["durations"].items()):
            durations.add_metric([rule, model, stage], buckets, total)
        yield durations
        queue = t.queue()
        if queue is not None:  # absent, not 0, when it cannot be known: 0 would read as "nothing to do"
            gauge = GaugeMetricFamily(
                "upscaled_queue_jobs",
                "Jobs waiting (pending: in the folders this node serves, shared between the "
                "nodes that serve them) and running (on this node), when scraped.",
                labels=["node", "state"],
            )
            for state in QUEUE_STATES:
                gauge.add_metric([t.node, state], queue[state])
            yield gauge
        progress = GaugeMetricFamily(
            "upscaled_jobs_in_progress", "Jobs being worked on now, by device.", labels=["device"]
        )
        for device, n in sorted(snap["in_progress"].items()):
            progress.add_metric([device], n)
        yield progress
        pixels = CounterMetricFamily(
            "upscaled_pixels",
            "Pixels read (in) and written (out) by the jobs; rate() / 1e6 "
            "is megapixels per second, whatever the image size.",
            labels=["direction"],
        )
        for direction in DIRECTIONS:
            pixels.add_metric([direction], snap["pixels"][direction])
        yield pixels
        yield GaugeMetricFamily(
            "upscaled_last_success_timestamp_seconds",
            "Unix time of the last job done on this node (its start time before the first).",
            value=snap["last_success"],
        )
        memory = self._memory()
        if memory is not None:
            mem = GaugeMetricFamily(
                "upscaled_device_memory_used_bytes",
                "Memory in use on each GPU that torch sees, when scraped.",
                labels=["device"],
            )
            for device, used in sorted(memory.items()):
                mem.add_metric([device], used)
            yield mem
        yield InfoMetricFamily(
            "upscaled_build",
            "The version of upscaled and of the libraries it runs on.",
            value={"version": t.version, "node": t.node, **t.build},
        )

    def _memory(self) -> dict[str, int] | None:
        try:
            found = self.t.memory()
            return {str(device): int(used) for device, used in found.items()}
        except Exception as exc:  # a driver error must not fail the scrape
            self.t._memory_failed(exc)
            return None


# --- the HTTP server --------------------------------------------------------------------------------------------------
def parse_listen(value: str, key: str = "http_listen", default_port: int = 9807) -> tuple[str, int]:
    """``host:port`` -> (host, port): ``127.0.0.1:9807``, ``[::1]:9807``, ``localhost:9807``, ``:9807`` (every IPv4
    interface, ``0.0.0.0``). Port 0 lets the system choose.

    Raises:
        ValueError: not of that form, or a port outside 0..65535; the message names ``key`` and shows an example
            with ``default_port``.
    """
    expected = f"{key} expects host:port such as 127.0.0.1:{default_port} or [::1]:{default_port}"
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]\s]*):(\d{1,5})", value.strip())
    if m is None:
        hint = "; put an IPv6 address in brackets" if value.count(":") > 1 and "[" not in value else ""
        raise ValueError(f"{expected}, got {value!r}{hint}")
    host = m.group(1) if m.group(1) is not None else (m.group(3) or "0.0.0.0")
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"{expected}; the port must be 0 to 65535, got {port}")
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{expected}; {host!r} in brackets is not an IPv6 address") from None
    return host, port


def allowed_hosts_for(host: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The Host header values to accept when bound to ``host``: the loopback names and ``host`` itself, plus
    ``extra`` (the names a reverse proxy or a scraper uses). None (any) when bound to every interface and nothing is
    given: whoever exposes it that way is told to put a proxy in front. Used by ``upscaled web`` and by the
    telemetry server alike."""
    if extra:
        names = list(extra)
    elif host in ("0.0.0.0", "::", ""):
        return None
    else:
        names = []
    try:
        literal = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        literal = host
    return list(dict.fromkeys([*names, literal, "localhost", "127.0.0.1", "[::1]"]))


def host_allowed(header: str | None, allowed: Sequence[str] | None) -> bool:
    """Whether the Host header ``header`` names one of ``allowed`` (None: any). The port is ignored and so is case;
    ``*.example.org`` matches the names under example.org, and ``*`` any name (as Starlette's TrustedHostMiddleware
    reads the same list for ``upscaled web``). A request without a Host header matches nothing."""
    if allowed is None:
        return True
    host = (header or "").strip().lower()
    if host.startswith("["):  # [::1]:9807: the port follows the bracket
        host = host[: host.find("]") + 1] if "]" in host else ""
    else:
        host = host.partition(":")[0]
    if not host:
        return False
    for pattern in (p.lower() for p in allowed):
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name: take the first family it resolves to
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]


class _Server(http.server.ThreadingHTTPServer):
    """One thread per connection, at most :data:`MAX_CONNECTIONS` at once: a client that opens connections without
    end gets a 503 for each one past the cap, and the daemon's threads and memory stay bounded."""

    daemon_threads = True  # a client that hangs must not hold up the daemon's exit
    telemetry: Telemetry
    health: Health
    allowed_hosts: list[str] | None = None
    slots: threading.BoundedSemaphore
    refused: _Throttled

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused(ConnectionRefusedError(f"{MAX_CONNECTIONS} connections are open; {client_address[0]} refused"))
            try:
                request.setblocking(False)  # a fresh socket's buffer takes these bytes; never wait on the client
                request.send(_FULL)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()  # no thread was started to give the slot back
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection between scrapes
    server_version = "upscaled"
    sys_version = ""
    timeout = 30  # seconds a client may take to send its request before the thread gives up on it
    # Headers and body leave in one write, with TCP_NODELAY: two small writes on a keep-alive connection meet the
    # client's delayed ACK (Nagle), which adds 40 ms to every scrape.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self._host_ok():
            self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        if self._host_ok():
            self._answer(head=True)

    def _not_allowed(self) -> None:
        if self._host_ok():
            self._send(405, b"method not allowed: GET or HEAD\n", "text/plain; charset=utf-8", {"Allow": "GET, HEAD"})

    def _host_ok(self) -> bool:
        """Answer 400 to a Host this server was not bound for: a web page that rebinds its own name to 127.0.0.1
        (DNS rebinding) cannot read the endpoints from a browser on this host."""
        if host_allowed(self.headers.get("Host"), self.server.allowed_hosts):
            return True
        self.close_connection = True
        body = b"invalid Host header: this server answers only the names it is bound for (http_allowed_hosts)\n"
        self._send(400, body, "text/plain; charset=utf-8", {"Connection": "close"})
        return False

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def _answer(self, head: bool) -> None:
        path = urlsplit(self.path).path
        try:
            if path == "/metrics":
                body, ctype = self.server.telemetry.render()
                status = 200
            elif path in ("/livez", "/readyz"):
                status, body = _health_body(self.server.telemetry, self.server.health, path == "/livez")
                ctype = "application/json"
            else:
                status, ctype = 404, "text/plain; charset=utf-8"
                body = b"not found; this server answers /metrics, /livez and /readyz\n"
        except Exception:  # a bug here must not kill the server thread; the client sees a 500 once
            log.exception("telemetry.http_error", path=path)
            status, body, ctype = 500, b"internal error; see the daemon's log\n", "text/plain; charset=utf-8"
        self._send(status, b"" if head else body, ctype, {}, length=len(body))

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str], length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        # Every scrape would be a line on stderr (journald); requests go to the debug log instead.
        log.debug("telemetry.http", client=self.client_address[0], message=format % args)


def _health_body(telemetry: Telemetry, health: Health, live: bool) -> tuple[int, bytes]:
    """The status and JSON of /livez (``live``) or /readyz: ``{status, version, node, queue, checks}``."""
    which = "liveness" if live else "readiness"
    try:
        found = health.liveness() if live else health.readiness()
        checks = {
            str(name): {"ok": reason is None, "reason": None if reason is None else str(reason)}
            for name, reason in dict(found).items()
        }
    except Exception as exc:  # the checks themselves broke: that is a failed check, not a crash
        log.warning("telemetry.health_failed", which=which, error=f"{type(exc).__name__}: {exc}")
        checks = {which: {"ok": False, "reason": f"the {which} checks raised {type(exc).__name__}: {exc}"}}
    ok = all(c["ok"] for c in checks.values())
    doc = dict(
        status="ok" if ok else "failing",
        version=telemetry.version,
        node=telemetry.node,
        queue=telemetry.queue(),
        checks=checks,
    )
    return (200 if ok else 503), (json.dumps(doc, indent=2) + "\n").encode()


class HttpServer:
    """``/metrics``, ``/livez`` and ``/readyz`` on ``listen`` (``http_listen``), from a daemon thread.

    Anything else is 404; methods other than GET and HEAD are 405. Every answer has ``Cache-Control: no-store``. A
    Host header not among :func:`allowed_hosts_for` ``(host, allowed_hosts)`` gets 400; a connection past
    :data:`MAX_CONNECTIONS` open ones gets 503 and is closed.

    Raises:
        ConfigError: ``listen`` is not ``host:port`` (at construction), or cannot be bound (at :meth:`start`).
    """

    def __init__(self, listen: str, telemetry: Telemetry, health: Health, allowed_hosts: Sequence[str] = ()) -> None:
        try:
            self.host, self.port = parse_listen(listen)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.listen = listen
        self.allowed_hosts = allowed_hosts_for(self.host, allowed_hosts)
        self.telemetry = telemetry
        self.health = health
        if telemetry.health is None:  # the same service: its queue also goes into the gauge and the JSON
            telemetry.health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a daemon thread.

        Raises:
            ConfigError: the address cannot be bound (in use, not an address of this host, a privileged port).
            RuntimeError: already started.
        """
        if self._server is not None:
            raise RuntimeError("the HTTP server is already started")
        try:
            server_cls = type("_BoundServer", (_Server,), {"address_family": _family(self.host)})
            server = server_cls((self.host, self.port), _Handler)
        except OSError as exc:
            raise ConfigError(f"http_listen: cannot listen on {self.listen}: {exc.strerror or exc}") from None
        server.telemetry, server.health, server.allowed_hosts = self.telemetry, self.health, self.allowed_hosts
        server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        server.refused = _Throttled("telemetry.connections_full")
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="upscaled-http", daemon=True
        )
        self._thread.start()
        log.info("telemetry.listening", address="{}:{}".format(*self.address), endpoints="/metrics /livez /readyz")

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound: the port the system chose for port 0.

        Raises:
            RuntimeError: not started.
        """
        if self._server is None:
            raise RuntimeError("the HTTP server is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving and release the port; waits for the serving loop to end. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
