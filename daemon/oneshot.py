"""``upscaled process``: files named on the command line, through the same stages and the same history.

Each file is a job (source ``cli``) run by :meth:`daemon.worker.Stages.step` in this process: the same checks at
the door as the inbox's (size, header, streamed hash, through a directory handle), the same pixels, the same
metrics. The inputs are never moved. Each file has its own error boundary: a bad file, or a surprise from a
library, fails that file's job and the others go on.
"""

from __future__ import annotations

import hashlib
import traceback
from pathlib import Path, PurePosixPath
from typing import Any

from daemon import logs
from daemon.config import Rule, Settings
from daemon.errors import InternalError
from daemon.fsops import FileId, Root, display
from daemon.intake import failure_key, inspect, with_sidecar_prompt
from daemon.jobs import JobSpec, JobStore, worker_id
from daemon.sandbox import Sandbox
from daemon.store import SqlStore
from daemon.worker import Stages
from models.errors import UpscaledError
from models.registry import ModelCache


def process(
    settings: Settings,
    files: list[Path],
    rule: Rule,
    out_dir: Path,
    force: bool = False,
    store: JobStore | None = None,
    cache: ModelCache | None = None,
) -> list[dict[str, Any]]:
    """Upscale ``files`` by ``rule`` into ``out_dir``. Returns one report per file: file, state (done, failed,
    skipped), output, error, job, and on success the seconds and the metrics."""
    own = store is None
    store = store or SqlStore(settings.database)
    log = logs.get()
    reports = []
    sandbox = Sandbox.for_settings(settings)
    try:
        with Root(out_dir) as out, sandbox:
            stages = Stages(settings, store, cache or ModelCache(), None, out, None, sandbox=sandbox)
            for path in files:
                report: dict[str, Any] = dict(
                    file=display(str(path)), state="failed", output=None, error=None, job=None
                )
                reports.append(report)
                try:
                    _one(stages, settings, Path(path).absolute(), rule, out, force, report)
                except UpscaledError as exc:
                    report["error"] = f"{exc.kind}: {exc}"
                except Exception as exc:  # noqa: BLE001 - one file's surprise never ends the batch
                    log.error("process.crashed", file=report["file"], error=repr(exc), traceback=traceback.format_exc())
                    report["error"] = f"{InternalError.kind}: unexpected {type(exc).__name__}: {exc}"
    finally:
        if own:
            store.close()
    return reports


def _one(
    stages: Stages, settings: Settings, path: Path, rule: Rule, out: Root, force: bool, report: dict[str, Any]
) -> None:
    # The folder stays open (through its handle) from the header check to the last stage: the job reads its input
    # from it, whatever its name holds (a newline, bytes that are not UTF-8).
    with Root(path.parent, create=False) as folder:
        _in_folder(stages, settings, folder, path, rule, out, force, report)


def _in_folder(
    stages: Stages,
    settings: Settings,
    folder: Root,
    path: Path,
    rule: Rule,
    out: Root,
    force: bool,
    report: dict[str, Any],
) -> None:
    store = stages.store
    rel = PurePosixPath(path.name)
    # The output folder is part of what the run means: the same file into another folder is another job.
    base: dict[str, Any] = dict(rel=rel, input_path=display(str(path)), source="cli", folder="(cli)")
    try:
        sha, probe, st = inspect(folder, rel, settings, stages.sandbox)
        rule = with_sidecar_prompt(rule, folder, rel, stages.sandbox)  # the image's own prompt, as in the inbox
    except FileNotFoundError:
        report["error"] = f"{display(str(path))} does not exist"
        return
    except UpscaledError as exc:  # a bad file: a failed job of its own, in the history like any other
        fp = hashlib.sha256(f"{rule.fingerprint()}:{out.path}".encode()).hexdigest()[:16]
        failing = JobSpec(sha=failure_key(rel, folder.lstat(rel)), rule=rule, fingerprint=fp, failure=exc, **base)
        job = store.register([failing])[0].job
        store.fail(job.id, exc.kind, str(exc), owner=job.worker)
        report.update(job=job.id, error=f"{exc.kind}: {exc}")
        return
    fingerprint = hashlib.sha256(f"{rule.fingerprint()}:{out.path}".encode()).hexdigest()[:16]
    spec = JobSpec(
        sha=sha,
        rule=rule,
        input_size=st.st_size,
        input_id=FileId.of(st),
        input_format=probe.format,
        input_width=probe.width,
        input_height=probe.height,
        frames=probe.frames,
        fingerprint=fingerprint,
        **base,
    )
    reg = store.register([spec])[0]
    job = reg.job
    report["job"] = job.id
    if not reg.created:
        if job.state == "done" and not force and job.output_path and Path(job.output_path).exists():
            report.update(
                state="skipped",
                output=job.output_path,
                error="already processed with this rule and --out (use --force to redo)",
            )
            return
        if job.state == "running":
            report["error"] = "another process is working on this job"
            return
        store.requeue(job.id, rel, display(str(path)), FileId.of(st))
    task = stages.step(worker_id(), settings.default_device, job_id=job.id, root=folder)
    if task is None:
        report["error"] = "another process is working on this job"
        return
    if task.error is not None:
        report["error"] = f"{task.error.kind}: {task.error}"
        return
    report.update(
        state="done",
        output=task.job.output_path,
        seconds=round(sum(task.timer.times.values()), 4),
        **{m.name: m.value for m in task.metrics},
    )
    if task.work is not None and task.work.notes:
        report["notes"] = "; ".join(task.work.notes)
