"""The web view's reads of the history: pages of jobs with filters, one job, the stats, the bench runs.

Everything goes through a read-only engine (:func:`daemon.store.make_engine` with ``readonly=True``) and selects
only columns that the database has: the ``jobs`` columns are taken from the database itself when the view starts,
and ``bench_runs.report_path`` is used where a newer schema has it. Values come back as plain dicts; escaping is
the templates' business (Jinja2 autoescape).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import case, func, inspect, literal_column, select
from sqlalchemy.engine import Engine

from daemon import history
from daemon.errors import QueryError
from daemon.history import DEFAULT_FOLDER, MAIN_METRICS, Filters
from daemon.store import STATES, bench_runs, jobs, metrics

PAGE_SIZE = 50
# What the list shows when no `source` is asked for: the service's jobs and `upscaled process`'s, not the bench's
# (a bench run adds dozens of rows at once and buries them); `?source=all` or `?source=bench` shows those.
LIST_SOURCES = ("watch", "cli")
# The columns the pages cannot do without; a database older than these needs `upscaled db upgrade`.
REQUIRED = (
    "id",
    "state",
    "folder",
    "rel_path",
    "input_path",
    "output_path",
    "input_moved_to",
    "model_id",
    "scale",
    "outscale",
    "mode",
    "created_at",
    "finished_at",
    "error_kind",
    "error",
    "t_total",
)
LIST_COLUMNS = (
    "id",
    "state",
    "source",
    "folder",
    "rel_path",
    "mode",
    "model_id",
    "scale",
    "outscale",
    "device",
    "input_width",
    "input_height",
    "output_width",
    "output_height",
    "error_kind",
    "error",
    "created_at",
    "finished_at",
    "t_queue",
    "t_infer",
    "t_total",
    "output_path",
    "input_path",
    "input_moved_to",
    "bench_run_id",
    "progress",
    "attempts",
)


@dataclass(frozen=True)
class ListFilters(Filters):
    """The list page's filters: :class:`daemon.history.Filters` (which builds the SQL), read from its query string
    and written back into its links, bench jobs left out unless asked for (:data:`LIST_SOURCES`)."""

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> ListFilters:
        """Raises: QueryError: a parameter that is not what it should be (see :meth:`Filters.parse`)."""
        return cls.parse(params, LIST_SOURCES)  # type: ignore[return-value]

    def query(self, **extra: Any) -> str:
        """``?folder=...&page=2``: these filters plus ``extra`` (None leaves a key out), URL-encoded."""
        items = self.params(LIST_SOURCES) | {k: str(v) for k, v in extra.items() if v is not None}
        return "?" + urlencode(items) if items else ""

    @property
    def active(self) -> bool:
        return bool(self.params(LIST_SOURCES))

    @property
    def source(self) -> str:
        """The value of the source menu: "" (the default), ``all``, or one source."""
        return self.params(LIST_SOURCES).get("source", "")


@dataclass
class Page:
    """One page of the history: the rows (each with its ``metrics`` dict), where it is, and how many there are."""

    rows: list[dict[str, Any]]
    number: int
    size: int
    total: int
    filters: Filters = field(default_factory=Filters)

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.size))

    @property
    def first(self) -> int:
        return 0 if not self.total else (self.number - 1) * self.size + 1

    @property
    def last(self) -> int:
        return min(self.total, self.number * self.size)


class History:
    """Read-only queries for the pages. Thread-safe (one engine, a connection per call).

    Raises:
        QueryError: at construction, a database without the ``jobs`` table or with an older schema.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.connect() as c:
            insp = inspect(c)
            if not insp.has_table("jobs"):
                raise QueryError("the database has no jobs table: is it upscaled's? (`upscaled db upgrade` makes one)")
            have = {col["name"] for col in insp.get_columns("jobs")}
            self.bench_columns = (
                {col["name"] for col in insp.get_columns("bench_runs")} if insp.has_table("bench_runs") else set()
            )
        missing = [c for c in REQUIRED if c not in have]
        if missing:
            raise QueryError(
                f"the database's jobs table lacks {', '.join(missing)}: it is from an older version; "
                "run `upscaled db upgrade`"
            )
        self.columns = [c for c in jobs.c if c.name in have]  # only what exists, in the store's order
        self._list = [jobs.c[n] for n in LIST_COLUMNS if n in have]

    # --- the list ----------------------------------------------------------------------------------------------------
    def page(self, filters: Filters, number: int = 1, size: int = PAGE_SIZE) -> Page:
        """Page ``number`` (from 1; past the end gives the last) of the jobs matching ``filters``, newest first.

        Each row has the :data:`LIST_COLUMNS` the database has, and ``metrics``: {name: value}.
        """
        have = [c.name for c in self.columns]
        with self.engine.connect() as c:
            total = c.execute(filters.apply(select(func.count()).select_from(jobs), have)).scalar_one()
            pages = max(1, math.ceil(total / size))
            number = min(max(1, number), pages)
            q = filters.apply(select(*self._list), have).order_by(jobs.c.id.desc())
            q = q.limit(size).offset((number - 1) * size)
            rows = [dict.fromkeys(LIST_COLUMNS) | dict(r._mapping) for r in c.execute(q)]
            by_id = {r["id"]: r for r in rows}
            for r in rows:
                r["metrics"] = {}
            if by_id:
                found = c.execute(
                    select(metrics.c.job_id, metrics.c.name, metrics.c.value).where(metrics.c.job_id.in_(list(by_id)))
                )
                for m in found:
                    by_id[m.job_id]["metrics"][m.name] = m.value
        return Page(rows, number, size, total, filters)

    def summary(self, sources: tuple[str, ...] | None, now: dt.datetime, hours: float = 1.0) -> dict[str, Any]:
        """The strip above the list: ``pending`` and ``running`` now; ``done`` and ``failed`` among the jobs that
        finished in the last ``hours`` (UTC, up to ``now``), and ``failure_rate`` = failed / (done + failed) of
        those (None when none finished); jobs of ``sources`` only (None: every source)."""
        have = [c.name for c in self.columns]
        since = now - dt.timedelta(hours=hours)
        by_state = Filters(sources=sources).apply(
            select(jobs.c.state, func.count()).select_from(jobs).group_by(jobs.c.state), have
        )
        recent = Filters(sources=sources).apply(
            select(jobs.c.state, func.count())
            .select_from(jobs)
            .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at >= since)
            .group_by(jobs.c.state),
            have,
        )
        with self.engine.connect() as c:
            now_counts = dict(c.execute(by_state).all())
            hour = dict(c.execute(recent).all())
        done, failed = int(hour.get("done", 0)), int(hour.get("failed", 0))
        return dict(
            pending=int(now_counts.get("pending", 0)),
            running=int(now_counts.get("running", 0)),
            done=done,
            failed=failed,
            failure_rate=failed / (done + failed) if done + failed else None,
            hours=hours,
        )

    def choices(self) -> dict[str, list[str]]:
        """The folders and models that occur, for the filter menus."""
        with self.engine.connect() as c:
            folders = [r[0] for r in c.execute(select(jobs.c.folder).distinct().order_by(jobs.c.folder))]
            models = [r[0] for r in c.execute(select(jobs.c.model_id).distinct().order_by(jobs.c.model_id))]
        return {"folders": folders, "models": models, "states": list(STATES)}

    # --- one job -----------------------------------------------------------------------------------------------------
    def job(self, job_id: int) -> dict[str, Any] | None:
        """Every column of the job the database has, plus ``metric_rows`` (name, value, space, shave, reference,
        protocol), ``newer`` and ``older`` (the neighbouring ids, or None), or None if there is no such job."""
        with self.engine.connect() as c:
            row = c.execute(select(*self.columns).where(jobs.c.id == job_id)).first()
            if row is None:
                return None
            job = dict.fromkeys(jobs.c.keys()) | dict(row._mapping)  # columns an older schema lacks read as None
            job["metric_rows"] = [
                dict(m._mapping)
                for m in c.execute(
                    select(
                        metrics.c.name,
                        metrics.c.value,
                        metrics.c.space,
                        metrics.c.shave,
                        metrics.c.reference,
                        metrics.c.protocol,
                    )
                    .where(metrics.c.job_id == job_id)
                    .order_by(metrics.c.name)
                )
            ]
            job["newer"] = c.execute(select(func.min(jobs.c.id)).where(jobs.c.id > job_id)).scalar()
            job["older"] = c.execute(select(func.max(jobs.c.id)).where(jobs.c.id < job_id)).scalar()
        job["rule"] = _json_or_none(job.get("rule_json"))
        job["gen"] = _json_or_none(job.get("gen_params"))
        return job

    def image_paths(self, job_id: int) -> dict[str, Any] | None:
        """The files a job row names (``input``: where it went, else where it was; ``output``), as the kernel names
        them (:func:`exact_path`), and what the LR image needs; None if there is no such job. The only source of
        paths for the image routes and the job page's images. A path that cannot be told exactly is None (not
        shown)."""
        cols = [
            jobs.c.id,
            jobs.c.state,
            jobs.c.mode,
            jobs.c.scale,
            jobs.c.input_path,
            jobs.c.input_moved_to,
            jobs.c.output_path,
        ]
        have = {c.name for c in self.columns}
        cols += [jobs.c[n] for n in ("rule_json", "rel_path_raw") if n in have]
        with self.engine.connect() as c:
            row = c.execute(select(*cols).where(jobs.c.id == job_id)).first()
        if row is None:
            return None
        r = dict(row._mapping)
        raw = r.get("rel_path_raw")
        return dict(
            input=exact_path(r["input_moved_to"] or r["input_path"], raw),
            output=exact_path(r["output_path"], raw) if r["state"] == "done" else None,
            state=r["state"],
            mode=r["mode"],
            scale=r["scale"],
            rule_json=r.get("rule_json"),
        )

    # --- stats -------------------------------------------------------------------------------------------------------
    def stats(
        self, model: str | None, folder: str | None, since: str | None, sources: tuple[str, ...] | None = None
    ) -> list[dict[str, Any]]:
        """The rows of ``upscaled stats`` (:func:`daemon.history.stats`).

        Raises:
            QueryError: ``since`` is not 90s, 30m, 2h, 7d, 1w or an ISO date.
        """
        return history.stats(self.engine, model, folder, since, sources)

    def per_day(
        self, model: str | None, folder: str | None, since: dt.datetime, sources: tuple[str, ...] | None = None
    ) -> list[dict[str, Any]]:
        """Jobs finished per UTC day since ``since``: [{day: date, done: n, failed: n}], every day present."""
        day = func.date(jobs.c.finished_at)
        q = Filters(folder=folder, model=model, sources=sources).apply(
            select(
                day.label("day"),
                func.sum(case((jobs.c.state == "done", 1), else_=0)).label("done"),
                func.sum(case((jobs.c.state == "failed", 1), else_=0)).label("failed"),
            )
            .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at >= since)
            .group_by(day),
            [c.name for c in self.columns],
        )
        with self.engine.connect() as c:
            found = {_as_date(r.day): (int(r.done or 0), int(r.failed or 0)) for r in c.execute(q)}
        first, last = since.date(), dt.datetime.now(dt.UTC).date()
        out = []
        d = first
        while d <= last:
            done, failed = found.get(d, (0, 0))
            out.append(dict(day=d, done=done, failed=failed))
            d += dt.timedelta(days=1)
        return out

    # --- bench runs --------------------------------------------------------------------------------------------------
    def bench_runs(self) -> list[dict[str, Any]]:
        """Every bench run, newest first, with its settings parsed, its job counts and ``report_path`` (None where
        the schema has no such column or the run has none)."""
        if not self.bench_columns:
            return []
        cols = [bench_runs.c.id, bench_runs.c.started_at, bench_runs.c.settings]
        has_report = "report_path" in self.bench_columns
        with self.engine.connect() as c:
            runs = [
                dict(r._mapping)
                for r in c.execute(
                    select(*cols, *([_report_path()] if has_report else [])).order_by(bench_runs.c.id.desc())
                )
            ]
            counts: dict[int, dict[str, int]] = {}
            if "bench_run_id" in {col.name for col in self.columns}:
                q = (
                    select(jobs.c.bench_run_id, jobs.c.state, func.count())
                    .where(jobs.c.bench_run_id.is_not(None))
                    .group_by(jobs.c.bench_run_id, jobs.c.state)
                )
                for run_id, state, n in c.execute(q):
                    counts.setdefault(run_id, {})[state] = n
        for r in runs:
            r["settings"] = _json_or_none(r["settings"]) or {}
            r.setdefault("report_path", None)
            r["counts"] = counts.get(r["id"], {})
            r["jobs"] = sum(r["counts"].values())
        return runs

    def bench_report(self, run_id: int) -> str | None:
        """The report path of a bench run, or None (no such run, no column, none recorded)."""
        if "report_path" not in self.bench_columns:
            return None
        with self.engine.connect() as c:
            return c.execute(select(_report_path()).select_from(bench_runs).where(bench_runs.c.id == run_id)).scalar()


# A byte that is not UTF-8, as a name's text form writes it (daemon.fsops.text_form: "backslashreplace").
_BYTE_ESCAPE = re.compile(r"\\x([89a-f][0-9a-f])")


def exact_path(text: str | None, raw_rel: bytes | None) -> str | None:
    """The path the kernel knows for a path the job row records in text form.

    A name that is valid UTF-8 is recorded as it is. One that is not (``ph\\xff.png`` with the byte 0xff) is
    recorded with ``\\xff`` written out, and its exact bytes are kept in ``rel_path_raw``: that text is also the
    name of another file, literally ``ph\\xff.png``, so it must not be opened as it reads. For such a job (``raw_rel``
    given) the escapes are turned back into the bytes they stand for (as a str with surrogate escapes, the way
    :func:`os.fsdecode` carries them). When the raw name itself holds a backslash, which escapes came from bytes and
    which were typed cannot be told apart: None, and the file is not shown.
    """
    if text is None or raw_rel is None:
        return text
    if b"\\" in raw_rel:
        return None
    return _BYTE_ESCAPE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


def _report_path() -> Any:
    # Not in the store's Table (a newer revision adds it): named here, and read only where the database has it.
    return literal_column("bench_runs.report_path").label("report_path")


def _as_date(v: Any) -> dt.date:
    if isinstance(v, dt.datetime):
        return v.date()
    if isinstance(v, dt.date):
        return v
    return dt.date.fromisoformat(str(v)[:10])


def _json_or_none(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


__all__ = [
    "DEFAULT_FOLDER",
    "LIST_SOURCES",
    "MAIN_METRICS",
    "PAGE_SIZE",
    "Filters",
    "History",
    "ListFilters",
    "Page",
    "exact_path",
]
