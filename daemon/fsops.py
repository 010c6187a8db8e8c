"""File operations that keep the invariants: atomic, durable, confined, never overwriting.

- An output is written to a hidden temp file in its final folder, fsynced, then ``os.replace``d into place, and
  the folder is fsynced, so the outbox shows either nothing or the whole file.
- Moves never overwrite: a taken name gets ``-1``, ``-2``, ... before its suffix.
- Paths built from file names are checked to stay inside their root.
"""

from __future__ import annotations

import errno
import filecmp
import glob
import json
import os
import shutil
import threading
import time
from pathlib import Path

from daemon.errors import DiskFullError, OutputError, OutputUnavailableError

NAME_MAX = 255  # bytes, on every Linux filesystem we write to

TMP_SUFFIX = ".upscaled-tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def confined(root: Path, rel: str | os.PathLike) -> Path:
    """``root / rel``, refusing anything that would land outside ``root``.

    Raises:
        OutputError: ``rel`` climbs out of ``root`` (``..``, an absolute path, a symlinked folder).
    """
    root = root.resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise OutputError(f"{rel} would leave {root}; refusing to write outside it")
    return target


def fit_name(name: str, max_bytes: int = NAME_MAX) -> str:
    """Shorten ``name`` to at most ``max_bytes`` UTF-8 bytes by trimming its stem, keeping the suffix."""
    if len(name.encode()) <= max_bytes:
        return name
    stem, suffix = _split(name)
    room = max(1, max_bytes - len(suffix.encode()))
    short = stem.encode()[:room].decode(errors="ignore")
    return short + suffix


def unique_path(path: Path) -> Path:
    """``path`` if free, else ``stem-1.ext``, ``stem-2.ext``, ..."""
    if not path.exists():
        return path
    stem, suffix = _split(path.name)
    n = 1
    while True:
        candidate = path.with_name(fit_name(f"{stem}-{n}{suffix}"))
        if not candidate.exists():
            return candidate
        n += 1


def _split(name: str) -> tuple[str, str]:
    """Split at the last dot, but keep compound suffixes we write together (``.error.json``)."""
    for compound in (".error.json",):
        if name.endswith(compound):
            return name[: -len(compound)], compound
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext) if dot and stem else (name, "")


def _raise_disk(exc: OSError, what: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(f"no space left while writing {what}") from exc
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        raise OutputUnavailableError(f"cannot write {what}: {exc.strerror or exc}") from exc
    raise OutputError(f"cannot write {what}: {exc.strerror or exc}") from exc


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file, and make it durable.

    Raises:
        DiskFullError: the disk is full (retryable).
        OutputError: any other write error.
    """
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _raise_disk(exc, str(path))


_TAG_ROOM = 32  # bytes kept for ".<pid>-<thread id>" in a temp file's name


def _temp_head(path: Path) -> str:
    return fit_name(f".{path.name}", NAME_MAX - _TAG_ROOM - len(TMP_SUFFIX))


def temp_path(path: Path) -> Path:
    """The hidden temp file this thread writes before it renames it to ``path``.

    Named by process and thread, so two threads writing one name (the worker and a reconcile in one daemon) or
    two nodes writing into one share never share a temp file.
    """
    return path.with_name(f"{_temp_head(path)}.{os.getpid()}-{threading.get_native_id()}{TMP_SUFFIX}")


def temp_files(path: Path, pid: int) -> list[Path]:
    """The temp files that process ``pid`` (any of its threads) left for ``path``."""
    return list(path.parent.glob(f"{glob.escape(_temp_head(path))}.{pid}-*{TMP_SUFFIX}"))


def remove_stale_temps(root: Path, older_than: float = 0.0) -> int:
    """Delete temp files a crash left behind under ``root``, if older than ``older_than`` seconds. Returns how many.

    With other daemons writing to the same outbox, ``older_than`` keeps their writes in flight safe.
    """
    n = 0
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(TMP_SUFFIX):
                p = Path(dirpath) / name
                try:
                    if older_than and p.stat().st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue
                p.unlink(missing_ok=True)
                n += 1
    return n


# Filesystems that have no hard links (FAT, some SMB mounts) answer link() with one of these.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}


def _same_file(a: Path, b: Path, copy: bool) -> bool:
    """Whether ``a`` and ``b`` are one file (two links), or, with ``copy``, ``b`` is a copy of ``a`` as
    :func:`_place` makes them: the same bytes and the same mtime (copied with it; to within 1 ms, for a
    filesystem with a coarser clock)."""
    try:
        if os.path.samefile(a, b):
            return True
        if not copy:
            return False
        sa, sb = os.stat(a), os.stat(b)
        return abs(sa.st_mtime_ns - sb.st_mtime_ns) <= 1_000_000 and filecmp.cmp(a, b, shallow=False)
    except FileNotFoundError:
        return False


def _place(src: Path, dest: Path) -> None:
    """Give ``src``'s bytes the name ``dest``, which must not exist yet; ``src`` stays where it is.

    Exclusive: ``os.link`` fails with FileExistsError where ``os.rename`` would silently overwrite, so of two
    movers aiming at one name (two nodes archiving one file, or two files with one name) exactly one wins. Across
    filesystems the bytes are copied to a hidden temp file beside ``dest`` and fsynced, and the temp file is
    linked to ``dest`` the same way. Where hard links are refused, an empty placeholder created with O_EXCL takes
    the name instead, and ``src`` (or the temp file) is renamed over it.

    Raises:
        FileExistsError: ``dest`` exists.
        FileNotFoundError: ``src`` is gone (another mover took it).
    """
    try:
        os.link(src, dest, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in _NO_LINKS | {errno.EXDEV}:
            raise
        cross = exc.errno == errno.EXDEV
    if not cross:  # no hard links here (or not to this file: fs.protected_hardlinks)
        _rename_exclusive(src, dest)
        return
    tmp = temp_path(dest)
    try:
        shutil.copy2(src, tmp, follow_symlinks=False)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, dest)
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            _rename_exclusive(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _rename_exclusive(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` only if no one else has the name: claim it with an O_EXCL placeholder first."""
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))  # FileExistsError if taken
    try:
        os.rename(src, dest)
    except BaseException:
        os.unlink(dest)  # give the name back
        raise


def move_unique(src: Path, dest: Path, reserved: bool = False) -> Path:
    """Move ``src`` to ``dest``, or to ``dest-1``, ``dest-2``, ... if that name holds another file. Returns where
    it went, durably.

    Never overwrites, and safe against a concurrent mover of the same ``src`` (another node archiving the same
    file): the name is taken exclusively (see :func:`_place`), and a name that is already a link to ``src`` (the
    other mover's, or our own interrupted earlier try) counts as done. ``reserved`` says ``dest`` was chosen for
    this very file and recorded (the archive path committed with the job), so a copy of ``src`` there (same bytes,
    same mtime) is this file, copied by another mover across filesystems; the same content dropped again later
    has its own mtime, and the move takes the next free name for it. ``src`` is removed last.

    Raises:
        FileNotFoundError: ``src`` is gone: another mover took it (and records where).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = dest, 0
    stem, suffix = _split(dest.name)
    while True:
        try:
            _place(src, candidate)
            break
        except FileExistsError:
            if _same_file(src, candidate, copy=reserved and candidate == dest):
                break
        n += 1
        candidate = dest.with_name(fit_name(f"{stem}-{n}{suffix}"))
    fsync_dir(candidate.parent)
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass  # the other mover removed it; its bytes are at `candidate`
    fsync_dir(src.parent)
    return candidate


def write_error_json(path: Path, info: dict) -> None:
    atomic_write(path, (json.dumps(info, indent=2, sort_keys=True, default=str) + "\n").encode())
