"""``upscaled web``: a small read-only web view of the history (Starlette, Jinja2, uvicorn).

Pages: ``/`` (the jobs, newest first, filtered and paged), ``/jobs/<id>`` (a before/after slider with zoom to 1:1
pixels, stage times, every metric, the rule), ``/stats`` (the figures of ``upscaled stats`` and two charts) and
``/bench`` (the bench runs and their reports). Images come from ``/jobs/<id>/input``, ``/output``, ``/lr`` and
``/thumb``.

The rules it keeps:

- the database connection is read-only (:func:`daemon.store.make_engine` with ``readonly=True``);
- path parameters are ids (``{job_id:int}``); the only files it opens are those a job row names (and a bench run's
  report), through :mod:`daemon.web.images`, which does not follow links and sends only what decodes as an image;
- every string from the database goes through Jinja2's autoescape; nothing is marked safe but the charts, which
  escape their own labels;
- every answer carries a strict Content-Security-Policy (``default-src 'self'``, no inline script or style), so
  even markup that got through could not run; the styles and the slider's script are files under ``/static``;
- the Host header must be one of the names it was bound for (no DNS rebinding from a web page in the same browser).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon import __version__, logs
from daemon.errors import QueryError
from daemon.history import parse_since
from daemon.store import STAGES, make_engine
from daemon.web import charts
from daemon.web.data import DEFAULT_FOLDER, MAIN_METRICS, PAGE_SIZE, Filters, History
from daemon.web.images import DiskCache, Images
from models.errors import UpscaledError

HERE = Path(__file__).resolve().parent
CSP = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
# A bench report is one self-contained HTML file (inline CSS, data: images, no script): it gets its own policy, and
# a sandbox, because it is a file on disk rather than one of our templates.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
STATS_DAYS = 30

log = logs.get("upscaled.web")


class SecurityHeaders:
    """Adds the CSP and the other security headers to every answer that does not set its own CSP."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", CSP.encode()))
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- formatting for the templates ------------------------------------------------------------------------------------
def fmt_seconds(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return charts._fmt_s(float(v))


def fmt_bytes(v: int | None) -> str:
    if v is None:
        return ""
    size = float(v)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{v} B"  # pragma: no cover - the loop always returns


def fmt_metric(v: float | None, name: str = "") -> str:
    if v is None:
        return ""
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if math.isnan(v):
        return "NaN"
    if name.startswith("ssim") or name.endswith("ssim_y"):
        return f"{v:.4f}"
    if "psnr" in name:
        return f"{v:.2f} dB"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"


def fmt_time(v: dt.datetime | None) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%S") if v else ""


def fmt_scale(v: float | None) -> str:
    return "" if v is None else f"x{v:g}"


def thumb_box(width: int | None, height: int | None, box: tuple[int, int] = (80, 60)) -> tuple[int, int]:
    """The CSS size of a thumbnail that fits ``box`` with the image's aspect ratio (known before it loads, so the
    table does not jump as lazy images arrive)."""
    if not width or not height:
        return box
    ratio = min(box[0] / width, box[1] / height)
    return max(1, round(width * ratio)), max(1, round(height * ratio))


def make_env() -> Environment:
    """The Jinja2 environment: autoescape on for every template, unknown names are errors (not blank text)."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        seconds=fmt_seconds,
        bytes=fmt_bytes,
        metric=fmt_metric,
        time=fmt_time,
        scale=fmt_scale,
        tojson_pretty=lambda v: json.dumps(v, indent=2, sort_keys=True, ensure_ascii=False),
    )
    env.globals.update(
        version=__version__, thumb_box=thumb_box, DEFAULT_FOLDER=DEFAULT_FOLDER, MAIN_METRICS=MAIN_METRICS
    )
    return env


def _image_response(request: Request, served: Any, max_age: int = 300) -> Response:
    etag = f'"{served.etag}"'
    headers = {"ETag": etag, "Cache-Control": f"private, max-age={max_age}"}
    if request.headers.get("if-none-match") == etag:
        if served.file is not None:
            served.file.close()
        return Response(status_code=304, headers=headers)
    if served.file is not None:  # an original a browser shows as it is: streamed, never held whole
        headers["Content-Length"] = str(served.size)
        return StreamingResponse(served.chunks(), media_type=served.media_type, headers=headers)
    return Response(served.data, media_type=served.media_type, headers=headers)


class WebView:
    """The pages and image routes over one read-only engine. :func:`create_app` wraps it in a Starlette app."""

    def __init__(self, engine: Engine, images: Images, page_size: int = PAGE_SIZE) -> None:
        self.engine = engine
        self.history = History(engine)
        self.images = images
        self.page_size = page_size
        self.templates = Jinja2Templates(env=make_env())

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("title", "")
        context["root"] = request.scope.get("root_path", "").rstrip("/")
        context["nav"] = name.split(".")[0]
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    # --- pages -------------------------------------------------------------------------------------------------------
    def index(self, request: Request) -> Response:
        filters = Filters.parse(request.query_params)
        number = _int_param(request, "page", 1)
        page = self.history.page(filters, number, self.page_size)
        return self.render(
            request, "index.html", page=page, filters=filters, choices=self.history.choices(), title="history"
        )

    def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = self.history.job(job_id)
        if job is None:
            raise HTTPException(404, f"there is no job {job_id}")
        paths = dict(input=job.get("input_moved_to") or job.get("input_path"), output=job.get("output_path"))
        inp = self.images.probe(paths["input"], "input not kept", verify=job["state"] == "failed")
        out = self.images.probe(paths["output"], "no output" if job["state"] != "done" else "output no longer there")
        stages = [(s, job.get(f"t_{s}")) for s in STAGES]
        return self.render(
            request,
            "job.html",
            job=job,
            inp=inp,
            out=out,
            stages=stages,
            stage_chart=charts.stage_bars([s for s in stages if s[0] not in ("total", "queue")]),
            benchmark=job["mode"] == "benchmark",
            title=f"job {job_id}",
        )

    def stats(self, request: Request) -> Response:
        q = request.query_params
        model = (q.get("model") or "").strip() or None
        raw_folder = (q.get("folder") or "").strip()
        folder = None if not raw_folder else ("" if raw_folder == DEFAULT_FOLDER else raw_folder)
        since = (q.get("since") or "").strip() or None
        rows = self.history.stats(model, folder, since)
        today = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        start = parse_since(since) if since else today - dt.timedelta(days=STATS_DAYS - 1)
        start = max(start, today - dt.timedelta(days=366))  # one bar a day: a year at most
        start = dt.datetime.combine(start.date(), dt.time())
        days = self.history.per_day(model, folder, start)
        return self.render(
            request,
            "stats.html",
            rows=rows,
            model=model or "",
            folder=raw_folder,
            since=since or "",
            choices=self.history.choices(),
            days_chart=charts.per_day(days),
            time_chart=charts.time_bars(rows),
            days=len(days),
            title="stats",
        )

    def bench(self, request: Request) -> Response:
        runs = self.history.bench_runs()
        for r in runs:
            path = r["report_path"]
            r["report_state"] = None if not path else ("ok" if _is_file(path) else "missing")
        return self.render(
            request,
            "bench.html",
            runs=runs,
            has_report_column="report_path" in self.history.bench_columns,
            title="bench runs",
        )

    def bench_report(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        path = self.history.bench_report(run_id)
        if not path:
            raise HTTPException(404, f"bench run {run_id} has no report")
        try:
            data = _read_regular(path)
            if not path.lower().endswith((".html", ".htm")) or not data.lstrip()[:15].lower().startswith(
                (b"<!doctype html", b"<html")
            ):
                # The row names the file; it must still look like the HTML report it is meant to be.
                raise HTTPException(404, f"the report of bench run {run_id} at {path} is not an HTML file")
        except FileNotFoundError:
            raise HTTPException(404, f"the report of bench run {run_id} is no longer at {path}") from None
        except OSError as exc:
            raise HTTPException(
                404, f"the report of bench run {run_id} cannot be read: {exc.strerror or exc}"
            ) from None
        return Response(
            data,
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": REPORT_CSP, "Cache-Control": "private, max-age=60"},
        )

    # --- images ------------------------------------------------------------------------------------------------------
    def _paths(self, request: Request) -> dict[str, Any]:
        job_id = request.path_params["job_id"]
        paths = self.history.image_paths(job_id)
        if paths is None:
            raise HTTPException(404, f"there is no job {job_id}")
        return paths

    def _serve(self, request: Request, which: str) -> Response:
        paths = self._paths(request)
        path = paths[which]
        if not path:
            raise HTTPException(404, f"job {request.path_params['job_id']} has no {which} file")
        try:
            return _image_response(request, self.images.display(path))
        except FileNotFoundError:
            raise HTTPException(404, f"{which} not kept") from None
        except UpscaledError as exc:
            raise HTTPException(415, f"the {which} cannot be shown: {exc}") from None

    def input_image(self, request: Request) -> Response:
        return self._serve(request, "input")

    def output_image(self, request: Request) -> Response:
        return self._serve(request, "output")

    def lr_image(self, request: Request) -> Response:
        paths = self._paths(request)
        if paths["mode"] != "benchmark":
            raise HTTPException(404, "only a benchmark-mode job has an LR image")
        if not paths["input"]:
            raise HTTPException(404, "input not kept")
        try:
            return _image_response(
                request, self.images.benchmark_lr(paths["input"], paths["rule_json"], paths["scale"])
            )
        except FileNotFoundError:
            raise HTTPException(404, "input not kept: the LR image is made from it") from None
        except UpscaledError as exc:
            raise HTTPException(415, f"the LR image cannot be made: {exc}") from None

    def thumb(self, request: Request) -> Response:
        """The output's thumbnail, else the input's, else a "no preview" picture: always an image, so a list of
        failed jobs shows no broken images (and logs no errors in the browser)."""
        paths = self._paths(request)
        for which in ("output", "input"):
            path = paths[which]
            if not path:
                continue
            try:
                return _image_response(request, self.images.thumbnail(path), max_age=3600)
            except (FileNotFoundError, UpscaledError):
                continue
        return Response(NO_PREVIEW, media_type="image/svg+xml", headers={"Cache-Control": "no-cache"})


NO_PREVIEW = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="160" height="120" viewBox="0 0 160 120">'
    b'<rect width="160" height="120" fill="#eceff1"/><text x="80" y="65" font-family="sans-serif" '
    b'font-size="14" fill="#78909c" text-anchor="middle">no preview</text></svg>'
)


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise QueryError(f"{name} expects a whole number, got {raw!r}")
    return int(raw)


def _read_regular(path: str, limit: int = 256 << 20) -> bytes:
    """A regular file's bytes, not following a link in its last component, not blocking on a FIFO."""
    import os

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise OSError(f"{path} is over {limit} bytes")
        return fh.read()


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(Path(path).lstat().st_mode)
    except OSError:
        return False


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/upscaled/web`` (``~/.cache/upscaled/web``), or a temporary folder if that is not writable."""
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "upscaled" / "web"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-")
        probe.close()
        return path
    except OSError:
        return Path(tempfile.mkdtemp(prefix="upscaled-web-"))


def create_app(
    database_url: str,
    cache_dir: Path | None = None,
    allowed_hosts: list[str] | None = None,
    page_size: int = PAGE_SIZE,
    cache_bytes: int = 512 << 20,
) -> Starlette:
    """The web view's ASGI app over ``database_url``, opened read-only.

    ``cache_dir`` holds thumbnails and converted images (default :func:`default_cache_dir`), at most
    ``cache_bytes``. ``allowed_hosts`` are the Host names it answers (None: any;
    see :func:`daemon.telemetry.allowed_hosts_for`).

    Raises:
        QueryError: the database does not exist, is not upscaled's, or is too old for this version.
    """
    try:
        engine = make_engine(database_url, readonly=True)
    except FileNotFoundError as exc:
        raise QueryError(f"{exc}; start the service once (or run `upscaled db upgrade`) to make it") from None
    if engine.dialect.name == "postgresql":
        _read_only_sessions(engine)
    try:
        view = WebView(engine, Images(DiskCache(cache_dir or default_cache_dir(), cache_bytes)), page_size)
    except SQLAlchemyError as exc:
        raise QueryError(f"cannot read the database: {getattr(exc, 'orig', exc)}") from None

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if not request.url.path.endswith(("/input", "/output", "/lr", "/thumb", "/report")):
            return view.render(
                request, "error.html", status=exc.status_code, message=exc.detail, title=f"{exc.status_code}"
            )
        return Response(f"{exc.detail}\n", status_code=exc.status_code, media_type="text/plain; charset=utf-8")

    async def bad_query(request: Request, exc: Exception) -> Response:
        return view.render(request, "error.html", status=400, message=str(exc), title="400")

    async def database_error(request: Request, exc: Exception) -> Response:
        log.warning("web.database_error", path=request.url.path, error=str(getattr(exc, "orig", exc)))
        return view.render(
            request,
            "error.html",
            status=503,
            message=f"the database did not answer: {getattr(exc, 'orig', exc)}",
            title="503",
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("web.error", path=request.url.path)
        return Response(
            "internal error; see the web view's log\n", status_code=500, media_type="text/plain; charset=utf-8"
        )

    routes = [
        Route("/", view.index, name="index"),
        Route("/jobs/{job_id:int}", view.job, name="job"),
        Route("/jobs/{job_id:int}/input", view.input_image, name="input"),
        Route("/jobs/{job_id:int}/output", view.output_image, name="output"),
        Route("/jobs/{job_id:int}/lr", view.lr_image, name="lr"),
        Route("/jobs/{job_id:int}/thumb", view.thumb, name="thumb"),
        Route("/stats", view.stats, name="stats"),
        Route("/bench", view.bench, name="bench"),
        Route("/bench/{run_id:int}/report", view.bench_report, name="bench_report"),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts, www_redirect=False))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        view.images.close()  # its sandbox processes go with the app

    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: http_error,
            QueryError: bad_query,
            SQLAlchemyError: database_error,
            500: server_error,
        },
    )
    app.state.view = view
    return app


def _read_only_sessions(engine: Engine) -> None:
    """Every PostgreSQL session of ``engine`` is read-only, whatever the engine was made with: the web view never
    writes, and the server itself refuses it if a bug tried."""

    @event.listens_for(engine, "connect")
    def _set(dbapi_conn, _record):  # noqa: ANN001 - SQLAlchemy's event signature
        cur = dbapi_conn.cursor()
        cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        cur.close()
        dbapi_conn.commit()  # a SET inside a transaction that is rolled back would be undone with it
