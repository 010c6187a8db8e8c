"""Failpoints: named places in the job path where a test makes the process stop dead, or wait until released.

The idea of FoundationDB's and TiKV's failpoints. Each crash window of the job path has a name (:data:`POINTS`), and
the code calls :func:`hit` there. A test runs the real daemon with::

    UPSCALED_FAILPOINTS_TEST=1 UPSCALED_FAILPOINTS="after-commit=exit"

and the daemon dies with ``os._exit`` (no cleanup, no flush: as a SIGKILL would leave it) the first time it gets
there (``in-decode=exit@killer``: the first time it gets there for a file whose name holds ``killer``), or
(``=pause``) writes ``<name>.hit`` into ``$UPSCALED_FAILPOINT_DIR`` and waits until a ``<name>.release`` file
appears. Without the explicit test switch nothing is armed whatever else the environment holds, so a stray
variable cannot crash a deployment, and production pays one ``if`` per point.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

POINTS = {
    "after-register": "the job is registered (pending); nothing claimed",
    "after-claim": "the job is claimed and its output path reserved (one commit); nothing written",
    "in-decode": "the input is about to be passed to the sandbox (a process that dies here dies while decoding it)",
    "in-infer": "the model is about to run (a paused worker here is a hung one: no heartbeat)",
    "mid-write": "the output's temp file is written and fsynced; not yet renamed into place",
    "after-write": "the output is in place and durable; the job is still running",
    "after-commit": "the job is committed done; the input is still in the inbox",
    "after-archive": "the input is in the archive; the metrics are not recorded yet",
    "on-fail": "the job is committed failed; the input is still in the inbox",
}
ACTIONS = ("exit", "pause")
EXIT_CODE = 86

_armed: dict[str, str] = {}
_subjects: dict[str, str] = {}  # point -> the text a subject must hold for it to fire ("" : any)
_done: set[str] = set()


def arm(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Arm the failpoints named in ``UPSCALED_FAILPOINTS`` (``name=action,...``), only under the test switch
    ``UPSCALED_FAILPOINTS_TEST=1``. Returns what is armed.

    Raises:
        ValueError: an unknown point or action (a typo in a test must not pass silently).
    """
    _armed.clear()
    _subjects.clear()
    _done.clear()
    if environ.get("UPSCALED_FAILPOINTS_TEST") != "1":
        return {}
    for item in filter(None, (s.strip() for s in environ.get("UPSCALED_FAILPOINTS", "").split(","))):
        name, _, spec = item.partition("=")
        action, _, subject = spec.partition("@")
        if name not in POINTS or action not in ACTIONS:
            raise ValueError(
                f"failpoint {item!r}: expected one of {sorted(POINTS)} = one of {list(ACTIONS)}, optionally @TEXT"
            )
        _armed[name] = action
        _subjects[name] = subject
    return dict(_armed)


def hit(name: str, subject: str = "") -> None:
    """The job path passes failpoint ``name`` (for ``subject``, a file's name): nothing happens unless a test armed
    it, for a subject that holds the text it was armed with. It fires once per process; armed with ``@TEXT``, once
    per subject: a pause then writes the subject into ``<name>.hit``, and takes the ``.release`` (and the ``.hit``)
    away when it goes on, so that the test can release the next subject the same way."""
    if not _armed:
        return
    action = _armed.get(name)
    wanted = _subjects.get(name, "")
    key = f"{name}@{subject}" if wanted else name
    if action is None or key in _done or wanted not in subject:
        return
    _done.add(key)
    folder = Path(os.environ.get("UPSCALED_FAILPOINT_DIR", "."))
    if action == "exit":
        sys.stderr.write(f"failpoint {name}: exit\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
    # Written whole, then renamed: a test that sees the .hit reads its subject, never an empty file.
    (folder / f"{name}.hit.tmp").write_text(subject)
    os.replace(folder / f"{name}.hit.tmp", folder / f"{name}.hit")
    release = folder / f"{name}.release"
    while not release.exists():
        time.sleep(0.01)
    if wanted:
        release.unlink()
        (folder / f"{name}.hit").unlink(missing_ok=True)
