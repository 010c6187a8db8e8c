"""Reading the history back: the library behind ``upscaled history``, ``stats``, ``query`` and the web view.

Pure functions over a SQLAlchemy engine that return lists of dicts; the CLI and the web view only format them.
:class:`Filters` is the one place where "which jobs" becomes SQL: ``history``, ``stats`` and every page of the web
view build their WHERE clause with :meth:`Filters.where`.

The figures and what they mean (the CLI's help, docs/commands.md and the web view's stats page say the same):

- ``total_s``: a job's wall time, from the claim to the commit of its result: read and decode, the model (with its
  load when it was the first job on that model), encode and write, and for a benchmark-mode job its metrics too.
- ``infer_s``: the model alone, warm or not. It is what ``upscaled bench`` reports as ``s_per_image`` (there, the
  median of warm runs, the load timed apart), and the figure to compare with it.
- ``scale`` is the model's native scale (as the ``jobs`` table and the ``model_summary`` view have it); ``outscale``
  the final scale of the output, after the finishing resize (``scale = 2`` with ``outscale = 1.5``).
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Select, column, select, table, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from daemon.errors import QueryError
from daemon.jobs import STATES, utcnow
from daemon.store import jobs, make_engine, reader_powers

SUMMARY_METRICS = ("psnr_y", "ssim_y", "brisque", "lr_psnr_y")
# The metrics that say how good a job's output is, by mode: against the HR ground truth in benchmark mode; without a
# reference (BRISQUE) and against the LR input (consistency) when upscaling.
MAIN_METRICS = {"benchmark": ("psnr_y", "ssim_y"), "upscale": ("lr_psnr_y", "brisque")}
SOURCES = ("watch", "cli", "bench")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# The per-job metrics pivoted into columns: a view every schema since revision 0001 has.
job_metrics = table("job_metrics", column("id"), *(column(m) for m in SUMMARY_METRICS))
# The earliest and latest instants a filter can name: what lies outside is no date a job can have, and would only
# overflow the driver's datetime.
_EARLIEST, _LATEST = dt.datetime(1970, 1, 1), dt.datetime(9999, 12, 31)


def parse_since(value: str) -> dt.datetime:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w`` ago, or an ISO date/time (UTC).

    Raises:
        QueryError: anything else, or a time so far back it is before 1970.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value, re.ASCII)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        now = utcnow()
        if seconds > (now - _EARLIEST).total_seconds():
            raise QueryError(f"--since {value[:40]!r} is before 1970: no job is that old")
        return now - dt.timedelta(seconds=seconds)
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise QueryError(f"--since expects 90s, 30m, 2h, 7d, 1w or an ISO date, got {value[:40]!r}") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return when.replace(tzinfo=None)


@dataclass(frozen=True)
class Filters:
    """Which jobs: every field None means "any". The one builder of the history's WHERE clauses.

    ``folder``: a rule folder ("" is the default rule's); ``since`` / ``before``: created at or after / before
    (UTC); ``q``: part of the file name, any case; ``run``: the jobs of one bench run; ``sources``: where jobs came
    from (``watch``: the service, ``cli``: ``upscaled process``, ``bench``).
    """

    folder: str | None = None
    model: str | None = None
    state: str | None = None
    since: dt.datetime | None = None
    before: dt.datetime | None = None
    q: str | None = None
    run: int | None = None
    sources: tuple[str, ...] | None = None

    def where(self, have: Iterable[str] | None = None) -> list[ColumnElement[bool]]:
        """The conditions on the ``jobs`` table, to AND together. ``have``: the columns the database has (an older
        schema may lack ``bench_run_id`` or ``source``: that filter is then left out); None: all of them."""
        cols = set(have) if have is not None else {c.name for c in jobs.c}
        out: list[ColumnElement[bool]] = []
        if self.folder is not None:
            out.append(jobs.c.folder == self.folder.strip("/"))
        if self.model:
            out.append(jobs.c.model_id == self.model)
        if self.state:
            out.append(jobs.c.state == self.state)
        if self.since is not None:
            out.append(jobs.c.created_at >= self.since)
        if self.before is not None:
            out.append(jobs.c.created_at < self.before)
        if self.q:
            pattern = "%" + self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            out.append(jobs.c.rel_path.ilike(pattern, escape="\\"))
        if self.run is not None and "bench_run_id" in cols:
            out.append(jobs.c.bench_run_id == self.run)
        if self.sources is not None and "source" in cols:
            out.append(jobs.c.source.in_(self.sources))
        return out

    def apply(self, q: Select, have: Iterable[str] | None = None) -> Select:
        """``q`` with :meth:`where` applied."""
        conditions = self.where(have)
        return q.where(*conditions) if conditions else q

    # --- a query string and back (the web view's links) -----------------------------------------------------------
    @classmethod
    def parse(cls, params: Mapping[str, str], default_sources: tuple[str, ...] | None = None) -> Filters:
        """From a query string's parameters (``folder`` with ``/`` for the default rule, ``model``, ``state``,
        ``from`` and ``to`` as YYYY-MM-DD days, both included, ``q``, ``run``, ``source``: ``watch``, ``cli``,
        ``bench`` or ``all``); empty values mean "any". Without ``source``, ``default_sources`` (``run`` names a
        bench run's jobs, so with it every source).

        Raises:
            QueryError: a state, date, run id or source that is not one; the message says what was expected.
        """

        def get(name: str) -> str | None:
            v = (params.get(name) or "").strip()
            return v or None

        folder, state, run, source = get("folder"), get("state"), get("run"), get("source")
        if state is not None and state not in STATES:
            raise QueryError(f"state expects one of {', '.join(STATES)}, got {state!r}")
        if run is not None and not (run.isascii() and run.isdigit() and len(run) <= 12):
            raise QueryError(f"run expects a bench run id (a number), got {run[:40]!r}")
        if source is not None and source not in (*SOURCES, "all"):
            raise QueryError(f"source expects one of {', '.join(SOURCES)} or all, got {source[:40]!r}")
        first, last = get("from"), get("to")
        since = _day(first, "from") if first else None
        until = _day(last, "to") if last else None
        sources: tuple[str, ...] | None
        if source is not None:
            sources = None if source == "all" else (source,)
        else:
            sources = None if run is not None else default_sources
        return cls(
            folder="" if folder == DEFAULT_FOLDER else folder,
            model=get("model"),
            state=state,
            since=dt.datetime.combine(since, dt.time()) if since else None,
            before=dt.datetime.combine(until, dt.time()) + dt.timedelta(days=1) if until else None,
            q=get("q"),
            run=int(run) if run is not None else None,
            sources=sources,
        )

    def params(self, default_sources: tuple[str, ...] | None = None) -> dict[str, str]:
        """The query-string parameters that give these filters back through :meth:`parse`."""
        source = None
        if self.sources != default_sources and not (self.run is not None and self.sources is None):
            source = "all" if self.sources is None else ",".join(self.sources)
        out = {
            "folder": DEFAULT_FOLDER if self.folder == "" else self.folder,
            "model": self.model,
            "state": self.state,
            "from": self.since.date().isoformat() if self.since else None,
            "to": (self.before - dt.timedelta(days=1)).date().isoformat() if self.before else None,
            "q": self.q,
            "run": str(self.run) if self.run is not None else None,
            "source": source,
        }
        return {k: v for k, v in out.items() if v is not None}

    def without(self, name: str) -> Filters:
        return replace(self, **{name: None})


DEFAULT_FOLDER = "/"  # the default rule's folder "" in a query string ("" there means "any folder")


def _day(value: str, name: str) -> dt.date:
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise QueryError(f"{name} expects a date as YYYY-MM-DD, got {value[:40]!r}") from None
    if not _EARLIEST.date() <= day < _LATEST.date():
        raise QueryError(f"{name} expects a date from 1970-01-01 to 9999-12-30, got {value!r}")
    return day


def history(
    engine: Engine,
    model: str | None = None,
    folder: str | None = None,
    status: str | None = None,
    since: str | None = None,
    limit: int = 50,
    sources: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs matching the filters, newest first: each with its file, rule, sizes in and out,
    times, main metrics, error, and ``output_path`` only where an output was written (a done job).

    Raises:
        QueryError: ``since`` is not a time (see :func:`parse_since`).
    """
    f = Filters(folder=folder, model=model, state=status, since=parse_since(since) if since else None, sources=sources)
    j = jobs.c
    q = f.apply(
        select(
            j.id,
            j.state,
            j.source,
            j.folder,
            j.rel_path.label("file"),
            j.model_id.label("model"),
            j.scale,
            j.outscale,
            j.mode,
            j.device,
            j.input_width,
            j.input_height,
            j.output_width,
            j.output_height,
            j.t_total.label("total_s"),
            j.t_infer.label("infer_s"),
            *(job_metrics.c[m] for m in SUMMARY_METRICS),
            j.created_at,
            j.error_kind,
            j.error,
            j.output_path,
        ).select_from(jobs.join(job_metrics, job_metrics.c.id == j.id))
    )
    with engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(q.order_by(j.id.desc()).limit(limit))]
    for r in rows:
        if r["state"] != "done":  # planned when it was claimed, never written
            r["output_path"] = None
    return rows


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def stats(
    engine: Engine,
    model: str | None = None,
    folder: str | None = None,
    since: str | None = None,
    sources: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Per model, native scale, final scale, mode and folder: jobs, done, failed; the mean, p50 and p95 of the done
    jobs' total seconds, the p50 of their model seconds (``p50_infer_s``, what ``bench`` calls s_per_image); the
    mean of each main metric. See the module docstring for what each figure is.

    Raises:
        QueryError: ``since`` is not a time (see :func:`parse_since`).
    """
    f = Filters(folder=folder, model=model, since=parse_since(since) if since else None, sources=sources)
    j = jobs.c
    metric_cols = [job_metrics.c[m] for m in SUMMARY_METRICS]
    q = f.apply(
        select(
            j.model_id, j.scale, j.outscale, j.mode, j.folder, j.state, j.t_total, j.t_infer, *metric_cols
        ).select_from(jobs.join(job_metrics, job_metrics.c.id == j.id))
    )
    groups: dict[tuple, list] = defaultdict(list)
    with engine.connect() as c:
        for r in c.execute(q):
            groups[(r.model_id, r.scale, r.outscale, r.mode, r.folder)].append(r)
    out = []
    for (mid, scale, outscale, mode, folder), rows in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        done = [r for r in rows if r.state == "done"]
        times = sorted(r.t_total for r in done if r.t_total is not None)
        infer = sorted(r.t_infer for r in done if r.t_infer is not None)
        row: dict[str, Any] = dict(
            model=mid,
            scale=scale,
            outscale=outscale,
            mode=mode,
            folder=folder,
            jobs=len(rows),
            done=len(done),
            failed=sum(r.state == "failed" for r in rows),
            mean_s=statistics.fmean(times) if times else None,
            p50_s=_pct(times, 50),
            p95_s=_pct(times, 95),
            p50_infer_s=_pct(infer, 50),
        )
        for m in SUMMARY_METRICS:
            vals = [getattr(r, m) for r in rows if getattr(r, m) is not None]
            row[f"mean_{m}"] = statistics.fmean(vals) if vals else None
        out.append(row)
    return out


def query(url: str, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run exactly one read-only statement with named parameters (``:name``).

    The connection itself is read-only (SQLite ``mode=ro`` and ``query_only``; PostgreSQL sessions with
    ``default_transaction_read_only = on``), and the statement goes as *one* statement: SQLite's driver refuses a
    second one, and on PostgreSQL it is sent as a server-side prepared statement, which cannot hold two (so
    ``COMMIT; DELETE ...`` is refused before anything runs). On PostgreSQL it runs only as a reader role, one that
    cannot stall the daemon's claims with an advisory lock nor terminate its sessions (docs/security.md).

    Raises:
        QueryError: the database is missing; the role may do what a reader must not; a ``:name`` has no value; the
            statement would write (``query`` is read-only, and says so); or it failed (the database's message,
            without SQLAlchemy's links).
    """
    params = dict(params or {})
    try:
        names = set(text(sql).compile().params)
    except SQLAlchemyError as exc:
        raise QueryError(f"query failed: {_reason(exc)}") from None
    missing = sorted(names - set(params))
    if missing:
        given = " ".join(f"-p {n} VALUE" for n in missing)
        raise QueryError(f"the query names {', '.join(':' + n for n in missing)}: give a value with {given}")
    unused = sorted(set(params) - names)
    if unused:
        raise QueryError(f"-p {', '.join(unused)}: the query has no such :parameter")
    try:
        engine = make_engine(url, readonly=True)
    except FileNotFoundError as exc:
        raise QueryError(str(exc)) from None
    try:
        with engine.connect() as c:
            if engine.dialect.name == "postgresql":
                powers = reader_powers(c)
                if powers:
                    role = c.execute(text("SELECT current_user")).scalar()
                    raise QueryError(
                        f"upscaled query runs as a reader role only, and role {role!r} {' and '.join(powers)}; "
                        "connect it as the reader role of docs/security.md (Readers cannot stall the daemon)"
                    )
                compiled = text(sql).compile(dialect=engine.dialect)
                raw = c.connection.driver_connection
                assert raw is not None  # an open connection
                with raw.cursor() as cur:
                    cur.execute(str(compiled), compiled.construct_params(params), prepare=True)
                    if cur.description is None:
                        return []
                    names_ = [d.name for d in cur.description]
                    return [dict(zip(names_, row, strict=True)) for row in cur.fetchall()]
            res = c.execute(text(sql), params)
            return [dict(r._mapping) for r in res] if res.returns_rows else []
    except SQLAlchemyError as exc:
        raise _query_error(_reason(exc)) from None
    except Exception as exc:  # the driver's own errors on the PostgreSQL path (psycopg.Error)
        if type(exc).__module__.split(".")[0] not in ("psycopg", "sqlite3"):
            raise
        raise _query_error(str(exc)) from None
    finally:
        engine.dispose()


def _reason(exc: SQLAlchemyError) -> str:
    """The database's own message, without SQLAlchemy's "(Background on this error at: https://...)" line."""
    msg = str(getattr(exc, "orig", None) or exc)
    return re.sub(r"\s*\(Background on this error at: [^)]*\)", "", msg).strip()


def _query_error(msg: str) -> QueryError:
    lowered = msg.lower()
    if "readonly" in lowered or "read-only" in lowered or "read only" in lowered:
        return QueryError(
            "query is read-only: it runs one SELECT (or WITH ... SELECT) and never changes the history; "
            f"the database refused a write ({msg})"
        )
    return QueryError(f"query failed: {msg}")


__all__ = [
    "DEFAULT_FOLDER",
    "MAIN_METRICS",
    "Filters",
    "history",
    "parse_since",
    "query",
    "stats",
]
