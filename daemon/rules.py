"""The rules as the service applies them, beyond what the file says: the default rule nobody wrote, and the rule
folders the inbox must have.

- A file that names no rule for ``folder = ""`` still has one: :meth:`daemon.config.Settings.all_rules` adds a
  built-in default for the inbox root and every folder no rule names. It is nobody's choice, so the service logs it
  at start and ``check-config`` shows it (:func:`implicit_default`).
- ``cp cat.jpg inbox/photos/`` needs ``inbox/photos`` to exist: the service makes every rule's folder at start and
  on SIGHUP (:func:`make_rule_folders`), shaped like the inbox.
"""

from __future__ import annotations

import os
import stat
from pathlib import PurePosixPath

from daemon.config import Rule, Settings
from daemon.fsops import Root
from models.errors import UpscaledError


def implicit_default(settings: Settings) -> Rule | None:
    """The built-in default rule when the file names no rule for ``folder = ""`` (files outside every rule folder
    get it), else None: a rule nobody wrote, which the service logs at start and ``check-config`` shows."""
    if any(r.folder == "" for r in settings.rules):
        return None
    return next(r for r in settings.all_rules() if r.folder == "")


def make_rule_folders(settings: Settings, inbox: Root) -> tuple[list[PurePosixPath], dict[str, str]]:
    """Make every rule's inbox folder that is missing (``inbox/photos`` for ``folder = "photos"``, and the folders
    above it), each with the inbox's own owner, group and mode: whoever may drop files into the inbox may drop them
    into the rule folders too (a group-writable, setgid inbox stays so below). Reached one component at a time from
    the inbox's handle, never through a link.

    Returns the folders it made, and {rule folder: why} for those it could not make or use (a file or a link where
    the folder should be, no permission): a problem to log, never a reason to stop the service. Raises nothing."""
    st = os.fstat(inbox.fd)
    made: list[PurePosixPath] = []
    problems: dict[str, str] = {}
    for rule in settings.all_rules():
        if not rule.folder:
            continue
        parts = PurePosixPath(rule.folder).parts
        try:
            for i in range(1, len(parts) + 1):
                rel = PurePosixPath(*parts[:i])
                if inbox.lstat(rel) is not None:
                    continue
                with inbox.folder(rel.parent) as parent:
                    try:
                        os.mkdir(rel.name, 0o700, dir_fd=parent)  # opened up below, once it is ours
                    except FileExistsError:
                        continue  # made a moment ago by someone else: theirs to shape
                    fd = os.open(rel.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                    try:
                        mine = os.fstat(fd)
                        if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
                            os.fchown(fd, st.st_uid, st.st_gid)  # before the mode: a chown clears setgid
                        os.fchmod(fd, stat.S_IMODE(st.st_mode))
                    finally:
                        os.close(fd)
                made.append(rel)
        except (OSError, UpscaledError) as exc:
            problems[rule.folder] = str(exc)
    return made, problems
