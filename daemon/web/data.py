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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Select, case, func, inspect, literal_column, select
from sqlalchemy.engine import Engine

from daemon import history
from daemon.errors import QueryError
from daemon.store import STATES, bench_runs, jobs, metrics

PAGE_SIZE = 50
DEFAULT_FOLDER = "/"  # the default rule's folder "" in a query string ("" there means "any folder")
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
MAIN_METRICS = {"benchmark": ("psnr_y", "ssim_y"), "upscale": ("lr_psnr_y", "brisque")}


def _day(value: str, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise QueryError(f"{name} expects a date as YYYY-MM-DD, got {value!r}") from None


@dataclass(frozen=True)
class Filters:
    """The list page's filters, from and back to a query string."""

    folder: str | None = None  # None: any; "" the default rule's folder
    model: str | None = None
    state: str | None = None
    since: dt.date | None = None  # created on or after this day (UTC)
    until: dt.date | None = None  # created on or before this day (UTC)
    q: str | None = None  # part of the file name (rel_path), any case
    run: int | None = None  # the jobs of one bench run

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Filters:
        """From a query string's parameters; empty values mean "any".

        Raises:
            QueryError: a state, date or run id that is not one; the message says what was expected.
        """

        def get(name: str) -> str | None:
            v = (params.get(name) or "").strip()
            return v or None

        folder = get("folder")
        state = get("state")
        if state is not None and state not in STATES:
            raise QueryError(f"state expects one of {', '.join(STATES)}, got {state!r}")
        run = get("run")
        if run is not None and not run.isdigit():
            raise QueryError(f"run expects a bench run id (a number), got {run!r}")
        since, until = get("from"), get("to")
        return cls(
            folder="" if folder == DEFAULT_FOLDER else folder,
            model=get("model"),
            state=state,
            since=_day(since, "from") if since else None,
            until=_day(until, "to") if until else None,
            q=get("q"),
            run=int(run) if run else None,
        )

    def params(self) -> dict[str, str]:
        """The query-string parameters that give these filters back."""
        out = {
            "folder": DEFAULT_FOLDER if self.folder == "" else self.folder,
            "model": self.model,
            "state": self.state,
            "from": self.since.isoformat() if self.since else None,
            "to": self.until.isoformat() if self.until else None,
            "q": self.q,
            "run": str(self.run) if self.run is not None else None,
        }
        return {k: v for k, v in out.items() if v is not None}

    def query(self, **extra: Any) -> str:
        """``?folder=...&page=2``: these filters plus ``extra`` (None leaves a key out), URL-encoded."""
        items = self.params() | {k: str(v) for k, v in extra.items() if v is not None}
        return "?" + urlencode(items) if items else ""

    @property
    def active(self) -> bool:
        return bool(self.params())

    def without(self, name: str) -> Filters:
        return replace(self, **{name: None})


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
    def _where(self, q: Select, f: Filters) -> Select:
        if f.folder is not None:
            q = q.where(jobs.c.folder == f.folder)
        if f.model:
            q = q.where(jobs.c.model_id == f.model)
        if f.state:
            q = q.where(jobs.c.state == f.state)
        if f.since:
            q = q.where(jobs.c.created_at >= dt.datetime.combine(f.since, dt.time()))
        if f.until:
            q = q.where(jobs.c.created_at < dt.datetime.combine(f.until + dt.timedelta(days=1), dt.time()))
        if f.q:
            pattern = "%" + f.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            q = q.where(jobs.c.rel_path.ilike(pattern, escape="\\"))
        if f.run is not None and "bench_run_id" in {c.name for c in self.columns}:
            q = q.where(jobs.c.bench_run_id == f.run)
        return q

    def page(self, filters: Filters, number: int = 1, size: int = PAGE_SIZE) -> Page:
        """Page ``number`` (from 1; past the end gives the last) of the jobs matching ``filters``, newest first.

        Each row has the :data:`LIST_COLUMNS` the database has, and ``metrics``: {name: value}.
        """
        with self.engine.connect() as c:
            total = c.execute(self._where(select(func.count()).select_from(jobs), filters)).scalar_one()
            pages = max(1, math.ceil(total / size))
            number = min(max(1, number), pages)
            q = (
                self._where(select(*self._list), filters)
                .order_by(jobs.c.id.desc())
                .limit(size)
                .offset((number - 1) * size)
            )
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
        """The files a job row names (``input``: where it went, else where it was; ``output``), and what the LR
        image needs; None if there is no such job. The only source of paths for the image routes."""
        cols = [
            jobs.c.id,
            jobs.c.state,
            jobs.c.mode,
            jobs.c.scale,
            jobs.c.input_path,
            jobs.c.input_moved_to,
            jobs.c.output_path,
        ]
        if "rule_json" in {c.name for c in self.columns}:
            cols.append(jobs.c.rule_json)
        with self.engine.connect() as c:
            row = c.execute(select(*cols).where(jobs.c.id == job_id)).first()
        if row is None:
            return None
        r = dict(row._mapping)
        return dict(
            input=r["input_moved_to"] or r["input_path"],
            output=r["output_path"],
            state=r["state"],
            mode=r["mode"],
            scale=r["scale"],
            rule_json=r.get("rule_json"),
        )

    # --- stats -------------------------------------------------------------------------------------------------------
    def stats(self, model: str | None, folder: str | None, since: str | None) -> list[dict[str, Any]]:
        """The rows of ``upscaled stats`` (:func:`daemon.history.stats`).

        Raises:
            QueryError: ``since`` is not 90s, 30m, 2h, 7d, 1w or an ISO date.
        """
        return history.stats(self.engine, model, folder, since)

    def per_day(self, model: str | None, folder: str | None, since: dt.datetime) -> list[dict[str, Any]]:
        """Jobs finished per UTC day since ``since``: [{day: date, done: n, failed: n}], every day present."""
        day = func.date(jobs.c.finished_at)
        q = (
            select(
                day.label("day"),
                func.sum(case((jobs.c.state == "done", 1), else_=0)).label("done"),
                func.sum(case((jobs.c.state == "failed", 1), else_=0)).label("failed"),
            )
            .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at >= since)
            .group_by(day)
        )
        if model:
            q = q.where(jobs.c.model_id == model)
        if folder is not None:
            q = q.where(jobs.c.folder == folder)
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


__all__ = ["DEFAULT_FOLDER", "MAIN_METRICS", "PAGE_SIZE", "Filters", "History", "Page"]
