"""What happens to an input: a pure decision (:func:`after_run`, :func:`for_existing`), then one way to carry it out
(:meth:`Mover.carry_out`).

The decisions are plain functions of the job, what happened and the policy, with the time passed in: they are
unit-tested without files, threads or a database (tests/unit/test_dispositions.py). The :class:`Mover` carries them
out through the folders' directory handles (:mod:`daemon.fsops`), always *after* the commit that decided them, so a
crash between the two leaves the input in the inbox and the next scan finishes the move (see the crash table in
docs/reliability.md). Both deciders go through :meth:`Mover.carry_out`: the worker once a run's outcome is committed,
the service when it finds an inbox file whose content already has a job.

    after a run (the worker commits the outcome first: finish, retry_later or fail)
      success ──► Archive (the name committed with `done`) or Archive(None): delete (delete_inputs)
      error   ──► RetryAt  (Retry.UNTIL_FIXED: always; Retry.BACKOFF: while attempts < max_attempts)
              └─► Quarantine (failed/<rule folder>/<name> beside <name>.error.json)
      a `cli` or `bench` job, or an input replaced since it was registered: Keep

    a file whose content has a job (for_existing: job state x same name x input present x owner alive)
      done    ──► Archive (its committed name, or a free one: a duplicate)
      failed  ──► Quarantine, LeaveToOwner (its worker is moving it right now), or Requeue (dropped in again)
      pending or running ──► Wait, or Follow (the input was renamed while it waited)
"""

from __future__ import annotations

import datetime as dt
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from daemon import logs
from daemon.config import Settings
from daemon.errors import InputChangedError
from daemon.fsops import FileId, Root, display, fit_name, move, text_form
from daemon.intake import no_such_name, sidecar_name
from daemon.jobs import Job, JobStore
from models.errors import Retry, UpscaledError


@dataclass(frozen=True)
class Policy:
    """The settings the decisions depend on."""

    max_attempts: int = 3
    retry_seconds: float = 30.0
    retry_max_seconds: float = 600.0
    delete_inputs: bool = False
    stale_seconds: float = 30.0

    @classmethod
    def of(cls, s: Settings) -> Policy:
        return cls(s.max_attempts, s.retry_seconds, s.retry_max_seconds, s.delete_inputs, s.stale_seconds)

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: ``retry_seconds`` doubling per attempt, capped."""
        return min(self.retry_max_seconds, self.retry_seconds * 2.0 ** max(0, attempts - 1))


# --- actions -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Archive:
    """Move the input to the archive, or delete it (``delete_inputs``).

    ``reserved``: to the name committed with the job's ``done`` (``rel``, or the job's ``input_moved_to`` when
    ``rel`` is None), which counts a copy of this very file found there as done. Else to ``rel``, or the first free
    name after it (``-1``, ``-2``, ...), or deleted when ``rel`` is None."""

    rel: PurePosixPath | None
    reserved: bool = False


@dataclass(frozen=True)
class Keep:
    """Leave the input where it is."""

    why: str


@dataclass(frozen=True)
class Quarantine:
    """Fail the job (if not committed yet) and move the input to failed/ beside its reason."""

    kind: str
    error: str


@dataclass(frozen=True)
class RetryAt:
    """Put the job back to pending until ``at``; the input stays in the inbox."""

    at: dt.datetime
    kind: str
    error: str


@dataclass(frozen=True)
class Wait:
    """The file's job is queued or running: nothing to do now (a duplicate is decided when the job ends)."""


@dataclass(frozen=True)
class Requeue:
    """A file whose content failed before was dropped again: the user asks for another try."""


@dataclass(frozen=True)
class Follow:
    """The queued job's input was renamed (or rewritten with the same bytes): the job follows the file."""


@dataclass(frozen=True)
class LeaveToOwner:
    """The job failed a moment ago; its worker, alive, moves the input itself. Look again later."""


Action = Archive | Keep | Quarantine | RetryAt | Wait | Requeue | Follow | LeaveToOwner


def after_run(
    job: Job, error: UpscaledError | None, policy: Policy, now: dt.datetime, archive_rel: PurePosixPath | None = None
) -> Action:
    """What happens to ``job``'s input once its run ended (``error`` None: it succeeded).

    ``archive_rel`` is the archive name committed with the job's ``done`` (the caller looked it up, free, before
    the commit). A job that did not come from the watch folders (``upscaled process``, ``bench``) never moves its
    input, and neither does a job whose input was replaced since it was registered: the new file is a job of its
    own.
    """
    if error is None:
        if job.source != "watch":
            return Keep("the input of a one-off run stays where it is")
        if policy.delete_inputs or archive_rel is None:
            return Archive(None)
        return Archive(archive_rel, reserved=True)
    if error.retry is Retry.UNTIL_FIXED or (error.retry is Retry.BACKOFF and job.attempts < policy.max_attempts):
        return RetryAt(now + dt.timedelta(seconds=policy.backoff(job.attempts)), error.kind, str(error))
    if job.source != "watch":
        return Keep(f"{error.kind}: {error}")
    if isinstance(error, InputChangedError):
        return Keep("the file under this name is not this job's input any more; it is a job of its own")
    return Quarantine(error.kind, str(error))


def for_existing(
    job: Job,
    rel: PurePosixPath,
    file_id: FileId | None,
    policy: Policy,
    now: dt.datetime,
    owner_may_live: bool,
    job_input_present: bool,
) -> Action:
    """What to do with the inbox file ``rel`` whose content already has ``job`` under its rule.

    ``owner_may_live``: the worker that failed the job may still be running (and about to move the input);
    ``job_input_present``: the job's own input is still at its name (for a queued job seen under another name).
    """
    same = job.rel == rel
    if job.state == "done":
        if same and job.input_moved_to and not policy.delete_inputs:
            return Archive(None, reserved=True)  # to the name committed with `done` (see Mover.finish_archive)
        return Archive(None if policy.delete_inputs else rel)  # finished, or a duplicate: archive it
    if job.state == "failed":
        if same and job.input_moved_to is None:  # committed, not yet moved
            recent = job.finished_at is not None and (now - job.finished_at).total_seconds() <= policy.stale_seconds
            if recent and owner_may_live:
                return LeaveToOwner()
            return Quarantine(job.error_kind or "error", job.error or "")
        return Requeue()  # dropped in again after failing
    if same:
        return Follow() if file_id is not None and job.input_id is not None and file_id != job.input_id else Wait()
    return Wait() if job_input_present else Follow()


# --- carrying them out -----------------------------------------------------------------------------------------------
class Mover:
    """Moves inputs (and their prompt sidecars) out of the inbox, through the folders' handles, never overwriting."""

    def __init__(self, store: JobStore, inbox: Root, archive: Root, failed: Root) -> None:
        self.store = store
        self.inbox, self.archive_root, self.failed_root = inbox, archive, failed
        self.log = logs.get()

    def archive_name(self, rel: PurePosixPath) -> PurePosixPath:
        """A free name for ``rel`` in the archive, to commit with the job."""
        return self.archive_root.free_name(rel)

    def carry_out(self, action: Action, job: Job, rel: PurePosixPath, expect: FileId | None) -> str | None:
        """Do what ``action`` says to the inbox file ``rel`` (the job's input, or a file with the same content), once
        the commit that decided it is made. ``job`` is the job as committed; ``expect`` is the identity ``rel`` had
        when it was looked at: a file replaced since is never moved.

        - Archive, Quarantine: the move; where ``rel`` is the job's own input and it went somewhere other than the
          job records, the job's ``input_moved_to`` follows it. A duplicate's move is never recorded on the job.
        - Requeue: the failed job is pending again, for ``rel``; Follow: the waiting job's input is ``rel`` now.
        - Keep, RetryAt (committed by the job's owner), Wait, LeaveToOwner: nothing is done to the file.

        Returns the absolute path the file went to, or None (deleted, left where it is, gone, or the move failed:
        the input stays in the inbox, and a rescan decides again). Never raises for a file that cannot be moved.
        """
        if isinstance(action, Archive):
            dest, reserved = action.rel, action.reserved
            if reserved and dest is None:
                dest = self.archive_root.contains(Path(job.input_moved_to)) if job.input_moved_to else None
                if dest is None:  # recorded under another archive folder (it was moved since): a free name here
                    dest, reserved = self.archive_name(rel), False
            elif not reserved and dest is not None:
                dest = self.archive_name(dest)
            moved = self.archive(job, rel, dest, reserved=reserved, expect=expect)
        elif isinstance(action, Quarantine):
            moved = self.quarantine(job, rel, action.kind, action.error, expect=expect)
        elif isinstance(action, Requeue):
            self.store.requeue(job.id, rel, display(str(self.inbox.abs(rel))), expect)
            return None
        elif isinstance(action, Follow):
            self.store.rename(job.id, rel, display(str(self.inbox.abs(rel))), expect)
            return None
        else:
            return None
        recorded = job.input_moved_to
        if moved is not None and rel == job.rel and (recorded is None or text_form(moved) != text_form(recorded)):
            self.store.record_move(job.id, moved)
        return moved

    def archive(
        self,
        job: Job,
        rel: PurePosixPath,
        dest: PurePosixPath | None,
        *,
        reserved: bool = False,
        expect: FileId | None = None,
    ) -> str | None:
        """Move the inbox file ``rel`` to ``dest`` in the archive (or delete it when ``dest`` is None); returns the
        absolute path it went to, or None (deleted, gone, replaced, or the move failed: it is retried on a rescan).
        """
        try:
            if dest is None:
                if self.inbox.unlink(rel, expect):
                    self._sidecar(rel, None)
                return None
            moved = move(self.inbox, rel, self.archive_root, dest, expect=expect, reserved=reserved)
            self._sidecar(rel, moved, self.archive_root)
            return str(self.archive_root.abs(moved))
        except FileNotFoundError:
            return None
        except InputChangedError as exc:
            # Another file holds the name now (a job of its own): this job's input went nowhere, and the archive
            # path committed with it must not point at the copy the new file's job will make.
            self.store.record_move(job.id, None)
            self.log.warning(
                "archive.skipped",
                job=job.id,
                file=display(str(rel)),
                error=str(exc),
                note="the file under this name is not this job's input any more; left for its own job",
            )
            return None
        except (OSError, UpscaledError) as exc:
            self.log.error(
                "archive.failed",
                job=job.id,
                file=display(str(rel)),
                error=str(exc),
                note="kept in the inbox; retried on a rescan",
            )
            return None

    def quarantine(
        self, job: Job, rel: PurePosixPath, kind: str, error: str, expect: FileId | None = None
    ) -> str | None:
        """Put the inbox file ``rel`` in failed/ beside ``<name>.error.json``; the reason is written first. Returns
        the absolute path it went to, or None (gone, replaced, or failed/ not writable: the input stays in the
        inbox and the next scan tries again)."""
        info = dict(
            file=job.name,
            job=job.id,
            kind=kind,
            error=error,
            model=job.rule.model,
            scale=job.rule.final_scale,
            folder=job.folder,
            attempts=job.attempts,
            failed_at=self.store.clock().isoformat() + "Z",
        )
        try:
            dest = self.failed_root.free_name(rel)
            reason = dest.with_name(fit_name(dest.name + ".error.json"))
            self.failed_root.write_json(reason, info)
            try:
                moved = move(self.inbox, rel, self.failed_root, dest, expect=expect, special=True)
            except (FileNotFoundError, UpscaledError):
                # Another node's reconcile moved it a moment ago (and records where), or it is not this job's
                # input any more: this reason file belongs to no image.
                if not self.failed_root.exists(dest):
                    self.failed_root.unlink(reason)
                return None
            if moved != dest:  # the name was taken meanwhile: the reason goes with the image
                self.failed_root.write_json(moved.with_name(fit_name(moved.name + ".error.json")), info)
                self.failed_root.unlink(reason)
            self._sidecar(rel, moved, self.failed_root)  # kept with its image, for a retry
        except (OSError, UpscaledError) as exc:
            self.log.error("quarantine.failed", job=job.id, file=job.name, error=str(exc), note="kept in the inbox")
            return None
        return str(self.failed_root.abs(moved))

    def _sidecar(self, rel: PurePosixPath, dest: PurePosixPath | None, root: Root | None = None) -> None:
        """A ``<name>.prompt.txt`` beside an input goes where the input went (or is deleted with it). An input whose
        name is too long to have one (255 bytes) has none: nothing to do, nothing to warn about."""
        side = sidecar_name(rel)
        if side is None:
            return
        try:
            st = self.inbox.lstat(side)
            if st is None or not stat.S_ISREG(st.st_mode):
                return
            if dest is None or root is None:
                self.inbox.unlink(side)
            else:
                move(self.inbox, side, root, dest.with_name(fit_name(dest.name + ".prompt.txt")))
        except OSError as exc:
            if not no_such_name(exc):  # a filesystem with shorter names: no sidecar can be there
                self.log.warning("sidecar.move_failed", file=display(str(side)), error=str(exc))
        except UpscaledError as exc:
            self.log.warning("sidecar.move_failed", file=display(str(side)), error=str(exc))
