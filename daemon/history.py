"""Reading the history back: the library behind ``upscaled history``, ``stats`` and ``query``.

Pure functions over a SQLAlchemy engine that return lists of dicts; the CLI only formats them.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
from collections import defaultdict
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from daemon.errors import QueryError
from daemon.jobs import utcnow
from daemon.store import make_engine, reader_powers

SUMMARY_METRICS = ("psnr_y", "ssim_y", "brisque", "lr_psnr_y")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str) -> dt.datetime:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w`` ago, or an ISO date/time (UTC)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if m:
        return utcnow() - dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        return dt.datetime.fromisoformat(value).replace(tzinfo=None)
    except ValueError:
        raise QueryError(f"--since expects 90s, 30m, 2h, 7d, 1w or an ISO date, got {value!r}") from None


def _where(model: str | None, folder: str | None, status: str | None, since: str | None) -> tuple[str, dict]:
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if model:
        clauses.append("j.model_id = :model")
        params["model"] = model
    if folder is not None:
        clauses.append("j.folder = :folder")
        params["folder"] = folder.strip("/")
    if status:
        clauses.append("j.state = :status")
        params["status"] = status
    if since:
        clauses.append("j.created_at >= :since")
        params["since"] = parse_since(since)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def history(
    engine: Engine,
    model: str | None = None,
    folder: str | None = None,
    status: str | None = None,
    since: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    where, params = _where(model, folder, status, since)
    sql = f"""
SELECT j.id, j.state, j.folder, j.rel_path AS file, j.model_id AS model, j.outscale AS scale, j.mode, j.device,
  j.output_width AS width, j.output_height AS height, j.t_total AS total_s, j.t_infer AS infer_s,
  jm.psnr_y, jm.ssim_y, jm.brisque, jm.lr_psnr_y, j.created_at, j.error_kind, j.error, j.output_path
FROM jobs j JOIN job_metrics jm ON jm.id = j.id{where}
ORDER BY j.id DESC LIMIT :limit"""
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(text(sql), params | {"limit": limit})]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def stats(
    engine: Engine, model: str | None = None, folder: str | None = None, since: str | None = None
) -> list[dict[str, Any]]:
    """Per model, scale, mode and folder: count, failures, mean/p50/p95 total time, mean metrics."""
    where, params = _where(model, folder, None, since)
    sql = f"""
SELECT j.model_id, j.outscale, j.mode, j.folder, j.state, j.t_total, {", ".join("jm." + m for m in SUMMARY_METRICS)}
FROM jobs j JOIN job_metrics jm ON jm.id = j.id{where}"""
    groups: dict[tuple, list] = defaultdict(list)
    with engine.connect() as c:
        for r in c.execute(text(sql), params):
            groups[(r.model_id, r.outscale, r.mode, r.folder)].append(r)
    out = []
    for (mid, scale, mode, folder), rows in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        times = sorted(r.t_total for r in rows if r.state == "done" and r.t_total is not None)
        row: dict[str, Any] = dict(
            model=mid,
            scale=scale,
            mode=mode,
            folder=folder,
            jobs=len(rows),
            done=sum(r.state == "done" for r in rows),
            failed=sum(r.state == "failed" for r in rows),
            mean_s=statistics.fmean(times) if times else None,
            p50_s=_pct(times, 50),
            p95_s=_pct(times, 95),
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
        QueryError: the database is missing, the role may do what a reader must not, the SQL is refused, or it
            failed.
    """
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
                    cur.execute(str(compiled), compiled.construct_params(params or {}), prepare=True)
                    if cur.description is None:
                        return []
                    names = [d.name for d in cur.description]
                    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            res = c.execute(text(sql), params or {})
            return [dict(r._mapping) for r in res] if res.returns_rows else []
    except SQLAlchemyError as exc:
        msg = str(getattr(exc, "orig", exc)) or str(exc)
        raise QueryError(f"query failed: {msg}") from None
    except Exception as exc:  # the driver's own errors on the PostgreSQL path (psycopg.Error)
        if type(exc).__module__.split(".")[0] not in ("psycopg", "sqlite3"):
            raise
        raise QueryError(f"query failed: {exc}") from None
    finally:
        engine.dispose()
