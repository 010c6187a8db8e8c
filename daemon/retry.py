"""``upscaled retry``: failed inputs back from ``failed/`` into the inbox, for the service to run again.

A failed job's input waits in ``failed/<rule folder>/<name>`` beside ``<name>.error.json``. Once its cause is fixed
(the weights fetched, the disk freed), the input goes back to where it came from, ``inbox/<rule folder>/<name>``,
and the service takes it in like any new file: it finds the failed job of that content and rule, and requeues it
(:func:`daemon.dispositions.for_existing` answers ``Requeue``), so it runs again as the same job and is not
archived as a duplicate. This module only moves files; it never writes to the database, so it is the same whether
the service runs now or starts later.

Each move is what the service's own moves are (:func:`daemon.fsops.move`): through directory handles, exclusive
(a name taken in the inbox gets ``-1``), and only of the file that is this job's input: its sha256 is checked against
the job's first. The job's ``.error.json`` is removed once the input is back (the next outcome writes a new one if
it fails again), and a ``<name>.prompt.txt`` kept beside it goes back with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy import select

from daemon.config import Settings
from daemon.fsops import Root, display, fit_name, move
from daemon.hints import Hints
from daemon.intake import sidecar_name
from daemon.jobs import Job
from daemon.store import SqlStore, jobs
from models.catalog import get_entry
from models.errors import UpscaledError
from models.weights import needs_weights, present

WEIGHTS_MISSING = "weights-missing"


@dataclass
class Outcome:
    """What happened to one job's input: ``moved`` back (to ``to``), or ``skipped`` with the reason in ``note``."""

    job: int
    file: str
    state: str
    to: str | None = None
    note: str = ""


def select_jobs(
    store: SqlStore,
    settings: Settings,
    ids: Iterable[int] = (),
    paths: Iterable[Path] = (),
    every_failed: bool = False,
    kind: str | None = None,
) -> list[int]:
    """The ids of the jobs to retry: ``ids`` as given; the failed jobs whose input is now the file ``path`` or lies
    in the folder ``path`` under ``failed/``; with ``every_failed`` or ``kind``, every failed job whose input was
    moved to ``failed/`` (of that error kind). Newest last, each once."""
    chosen = list(ids)
    failed_root = str(settings.failed).rstrip("/") + "/"
    q = select(jobs.c.id, jobs.c.input_moved_to).where(jobs.c.state == "failed", jobs.c.input_moved_to.is_not(None))
    if kind:
        q = q.where(jobs.c.error_kind == kind)
    with store.engine.connect() as c:
        rows = [(r.id, r.input_moved_to) for r in c.execute(q.order_by(jobs.c.id))]
    rows = [(i, p) for i, p in rows if p.startswith(failed_root)]
    wanted = [os.path.abspath(p) for p in paths]
    for job_id, moved_to in rows:
        if (every_failed or kind) and not wanted:
            chosen.append(job_id)
        elif any(moved_to == w or moved_to.startswith(w.rstrip("/") + "/") for w in wanted):
            chosen.append(job_id)
    return list(dict.fromkeys(chosen))


def retry(store: SqlStore, settings: Settings, job_ids: Iterable[int], force: bool = False) -> list[Outcome]:
    """Move the failed inputs of ``job_ids`` back into the inbox (see the module docstring), one at a time; a job
    that cannot be retried is reported ``skipped`` with why, and the others go on.

    A job that failed because its model's weights were missing is skipped while they still are (it would fail again
    at once), unless ``force``; the note gives the command that fetches them."""
    hints = Hints.of(settings)
    out = []
    with Root(settings.inbox) as inbox, Root(settings.failed) as failed:
        for job_id in job_ids:
            job = store.get(job_id)
            if job is None:
                out.append(Outcome(job_id, "", "skipped", note=f"there is no job {job_id}"))
                continue
            out.append(_one(job, inbox, failed, settings, hints, force))
    return out


def _one(job: Job, inbox: Root, failed: Root, settings: Settings, hints: Hints, force: bool) -> Outcome:
    def skipped(note: str) -> Outcome:
        return Outcome(job.id, job.name, "skipped", note=note)

    if job.state != "failed":
        return skipped(f"the job is {job.state}, not failed")
    if job.source != "watch":
        return skipped("a one-off job (`upscaled process`, `bench`): run it again with that command")
    if job.input_moved_to is None:
        return skipped("its input was not moved to failed/ (the service retries an input it left in the inbox)")
    if job.error_kind == WEIGHTS_MISSING and not force:
        entry = get_entry(job.rule.model)
        if needs_weights(entry) and not present(settings.weights_dir, entry):
            return skipped(f"the weights of {job.rule.model} are still missing: run `{hints.fetch([job.rule.model])}`")
    src = _input_in_failed(job, failed)
    if src is None:
        return skipped(f"its input is no longer in {display(job.input_moved_to)} (or is not this job's input)")
    try:
        dest = inbox.free_name(job.rel)
        side = failed.exists(_beside(src, ".prompt.txt"))
        dest_side = sidecar_name(dest)
        if side and dest_side is not None:  # first, so that the service finds the prompt with the image
            move(failed, _beside(src, ".prompt.txt"), inbox, dest_side)
        dest = move(failed, src, inbox, dest)
    except (OSError, UpscaledError) as exc:
        return skipped(f"cannot move it back: {exc}")
    _remove_reason(failed, src, job.id)
    return Outcome(job.id, job.name, "moved", to=display(str(inbox.abs(dest))))


def _beside(rel: PurePosixPath, suffix: str) -> PurePosixPath:
    """The name of a file kept beside ``rel`` in failed/ (``<name>.error.json``, ``<name>.prompt.txt``), as the
    service names it (:class:`daemon.dispositions.Mover`)."""
    return rel.with_name(fit_name(rel.name + suffix))


def _input_in_failed(job: Job, failed: Root) -> PurePosixPath | None:
    """Where ``job``'s input is under failed/: the place recorded with the job (or, for a name that is not UTF-8 and
    was recorded in its printable form, the job's own name there), if that file has the job's sha256. A file that
    failed before it was hashed (its key is not a content hash: :func:`daemon.intake.failure_key`) is the one at
    the recorded place."""
    recorded = failed.contains(Path(job.input_moved_to or ""))
    for rel in dict.fromkeys(c for c in (recorded, job.rel) if c is not None):
        try:
            fd, _st = failed.open_file(rel)
        except (OSError, UpscaledError):
            continue
        if job.sha.startswith("x"):
            os.close(fd)
            return rel if rel == recorded else None
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() == job.sha:
            return rel
    return None


def _remove_reason(failed: Root, src: PurePosixPath, job_id: int) -> None:
    """Remove the ``.error.json`` that explained ``job_id``'s failure; a reason file of another job is left alone."""
    reason = _beside(src, ".error.json")
    try:
        info = json.loads(failed.read_bytes(reason, limit=1 << 20))
    except (OSError, ValueError, UpscaledError):
        return
    if isinstance(info, dict) and info.get("job") == job_id:
        failed.unlink(reason)
