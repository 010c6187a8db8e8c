"""File operations that keep the invariants: atomic, durable, confined, never overwriting.

- An output is written to a hidden temp file in its final folder, fsynced, then ``os.replace``d into place, and
  the folder is fsynced, so the outbox shows either nothing or the whole file.
- Moves never overwrite: a taken name gets ``-1``, ``-2``, ... before its suffix.
- Paths built from file names are checked to stay inside their root.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

from models.errors import DiskFull, OutputError, OutputUnavailable

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
        raise DiskFull(f"no space left while writing {what}") from exc
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        raise OutputUnavailable(f"cannot write {what}: {exc.strerror or exc}") from exc
    raise OutputError(f"cannot write {what}: {exc.strerror or exc}") from exc


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file, and make it durable.

    Raises:
        DiskFull: the disk is full (retryable).
        OutputError: any other write error.
    """
    tmp = temp_path(path, os.getpid())
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


def temp_path(path: Path, pid: int) -> Path:
    """The hidden temp file that process ``pid`` writes before it renames it to ``path``."""
    return path.with_name(fit_name(f".{path.name}", NAME_MAX - len(f".{pid}{TMP_SUFFIX}")) + f".{pid}{TMP_SUFFIX}")


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


def move_unique(src: Path, dest: Path) -> Path:
    """Move ``src`` to ``dest`` (or a free variant of it) durably. Returns where it went.

    A rename when both are on one filesystem; otherwise a copy that is fsynced before the source is removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest = unique_path(dest)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}{TMP_SUFFIX}")
        shutil.copy2(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        os.unlink(src)
    fsync_dir(dest.parent)
    fsync_dir(src.parent)
    return dest


def write_error_json(path: Path, info: dict) -> None:
    atomic_write(path, (json.dumps(info, indent=2, sort_keys=True, default=str) + "\n").encode())
