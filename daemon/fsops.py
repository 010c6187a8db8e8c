"""File operations that keep the invariants, reached through directory handles: confined, atomic, exclusive.

Every folder the service works in (inbox, outbox, archive, failed, the ``--out`` of ``process``) is a :class:`Root`:
a directory handle opened once. A path under it is reached **one component at a time** from that handle, each
folder opened with ``O_NOFOLLOW | O_DIRECTORY``. So a folder swapped for a symbolic link after a file was registered
(``inbox/photos`` -> ``/etc``) cannot redirect a read, a write or a move out of the root: the walk stops with
:class:`~daemon.errors.UnsafePathError` instead. The last component is opened with ``O_NOFOLLOW`` (and
``O_NONBLOCK``, so a FIFO put in a file's place cannot block the open) and checked with ``fstat``.

- An output is written to a temp file with a random name created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``:
  a planted symlink or file under a predictable name cannot be written through), fsynced, renamed into place, and
  its folder fsynced: the outbox shows either nothing or the whole file.
- Moves never overwrite: the name is taken with ``link()``, which fails where ``rename()`` would silently replace,
  and a taken name gets ``-1``, ``-2``, ... before its suffix. Before a move the file's device and inode are checked
  against the ones recorded when it was registered: a file replaced meanwhile is not the job's input.
- Names are ``PurePosixPath``s of ``str`` components; a component that is not valid UTF-8 is carried with Python's
  surrogate escapes, so the exact bytes reach the kernel.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from daemon import failpoints
from daemon.errors import (
    DiskFullError,
    FileTooLongError,
    InputChangedError,
    OutputError,
    OutputUnavailableError,
    UnsafePathError,
)

NAME_MAX = 255  # bytes, on every Linux filesystem we write to
TMP_SUFFIX = ".upscaled-tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class FileId:
    """Which file a name pointed at: device and inode, as ``fstat`` saw them when the file was registered."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino)


def parts(rel: str | os.PathLike) -> list[str]:
    """The components of a relative path, checked: no empty, ``.`` or ``..`` component, not absolute.

    Raises:
        UnsafePathError: the path is absolute or would climb out of its root.
    """
    p = PurePosixPath(rel)
    if p.is_absolute() or any(c in ("", ".", "..") for c in p.parts):
        raise UnsafePathError(f"{display(str(rel))} would leave its folder")
    return list(p.parts)


def text_form(name: str) -> str:
    """``name`` as valid UTF-8 text, for the database: itself when it is UTF-8, else with ``\\xNN`` for the bytes
    that are not (the exact bytes of an input's name are kept beside it, see :func:`daemon.jobs.name_columns`)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def display(text: str, keep_newlines: bool = False) -> str:
    r"""``text`` (a stranger's file name, or a message that quotes one) with every character a terminal would act on
    escaped: ``\x1b``, ``\n``, ``\t``, ``\u202e``, and ``\xNN`` for a byte that is not UTF-8 (a surrogate escape).
    ``keep_newlines``: line breaks stay (our own multi-line messages); the other control characters are still
    escaped. The one printable form for logs, STATUS=, the job row's names and the CLI's output; never raises."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable() or (keep_newlines and c == "\n"):
            out.append(c)
        elif 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that was not UTF-8, carried as a surrogate escape
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _raise_write(exc: OSError, what: str) -> None:
    """Turn a write error into the error the worker reacts to: retry until fixed, or fail."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(f"no space left while writing {what}") from exc
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        raise OutputUnavailableError(f"cannot write {what}: {exc.strerror or exc}") from exc
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        raise UnsafePathError(f"cannot write {what}: a folder on its path is a symbolic link or not a folder") from exc
    raise OutputError(f"cannot write {what}: {exc.strerror or exc}") from exc


class Root:
    """A folder held open as a directory handle; every path below it is reached from the handle.

    The folder itself is created (with its parents) if missing. Close it with :meth:`close` (or use it as a context
    manager); a service keeps its roots open for its whole life.
    """

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self.dev = st.st_dev

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"

    def abs(self, rel: str | os.PathLike) -> Path:
        """The absolute path of ``rel`` under this root, for messages and the job row (never for opening)."""
        return self.path.joinpath(*parts(rel))

    def contains(self, path: Path) -> PurePosixPath | None:
        """``path`` relative to this root if it lies lexically below it, else None."""
        try:
            return PurePosixPath(Path(path).relative_to(self.path).as_posix())
        except ValueError:
            return None

    # --- walking ---------------------------------------------------------------------------------------------------
    @contextmanager
    def folder(self, rel_dir: str | os.PathLike, create: bool = False) -> Iterator[int]:
        """A handle on the folder ``rel_dir`` below the root, reached one component at a time without following
        links (created, mode 0777 & ~umask, where ``create`` and missing). Closed on exit.

        Raises:
            UnsafePathError: a component is a symbolic link or not a folder.
            FileNotFoundError: a component is missing and ``create`` is False.
        """
        fd = os.dup(self.fd)
        try:
            for name in parts(rel_dir) if str(rel_dir) not in ("", ".") else []:
                if create:
                    try:
                        os.mkdir(name, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePathError(
                            f"{display(str(rel_dir))}: {display(name)} under {self.path} is a "
                            f"symbolic link or not a folder; links are not followed"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def open_file(self, rel: str | os.PathLike, limit: int | None = None) -> tuple[int, os.stat_result]:
        """Open the regular file ``rel`` for reading; returns (fd, its stat). The caller closes the fd.

        ``limit``: the most bytes the caller will accept (the size registered for a job's input). A file whose
        ``fstat`` size is over it is refused before a byte is read; one that grows after the open is caught by
        :func:`read_at_most`, which reads no more than ``limit`` + 1 bytes from the descriptor.

        Raises:
            UnsafePathError: the file or a folder on its path is a symbolic link, or the file is not a regular file
                (a FIFO, a device, a folder).
            FileTooLongError: the file holds more than ``limit`` bytes.
            FileNotFoundError: it is gone.
            PermissionError, OSError: it cannot be opened.
        """
        p = parts(rel)
        with self.folder(PurePosixPath(*p[:-1]) if len(p) > 1 else "") as d:
            try:
                fd = os.open(p[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=d)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafePathError(f"{display(str(rel))} is a symbolic link; links are not followed") from None
                raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{display(str(rel))} is not a regular file")
            if limit is not None and st.st_size > limit:
                raise FileTooLongError(display(str(rel)), limit, st.st_size)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def lstat(self, rel: str | os.PathLike) -> os.stat_result | None:
        """The ``lstat`` of ``rel`` reached through the handle, or None if it (or a folder on its way) is missing.

        Raises:
            UnsafePathError: a folder on the way is a symbolic link.
        """
        p = parts(rel)
        try:
            with self.folder(PurePosixPath(*p[:-1]) if len(p) > 1 else "") as d:
                return os.stat(p[-1], dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, rel: str | os.PathLike) -> bool:
        """Whether something is at ``rel`` (reached without following links).

        Raises:
            UnsafePathError: a folder on the way is a symbolic link.
        """
        return self.lstat(rel) is not None

    def read_bytes(self, rel: str | os.PathLike, limit: int | None = None) -> bytes:
        """The bytes of the regular file ``rel``; with ``limit``, never more than ``limit`` of them.

        Raises:
            FileTooLongError: the file holds more than ``limit`` bytes: by its size when opened, or because it grew
                while it was read (at most ``limit`` + 1 bytes are read to tell).
            UnsafePathError, FileNotFoundError, OSError: as :meth:`open_file`.
        """
        fd, _st = self.open_file(rel, limit)
        try:
            if limit is None:
                with os.fdopen(fd, "rb", closefd=False) as fh:
                    return fh.read()
            return read_at_most(fd, limit, display(str(rel)))
        finally:
            os.close(fd)

    # --- writing ---------------------------------------------------------------------------------------------------
    def write_atomic(self, rel: str | os.PathLike, data: bytes | memoryview, *, sync: bool = True) -> None:
        """Write ``data`` to ``rel`` so that no reader ever sees a partial file, and make it durable.

        The bytes go to an exclusively created temp file with a random name beside the target, are fsynced, and the
        temp file is renamed over ``rel`` (the caller reserved that name). With ``sync`` the folder is fsynced too.

        Raises:
            DiskFullError: the disk is full or the quota reached (retried until fixed).
            OutputUnavailableError: the folder cannot be written (retried until fixed).
            UnsafePathError: a folder on the way is a symbolic link.
            OutputError: any other write error.
        """
        p = parts(rel)
        what = str(self.abs(rel))
        try:
            with self.folder(PurePosixPath(*p[:-1]) if len(p) > 1 else "", create=True) as d:
                tmp = _create_temp(d, p[-1])
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                    failpoints.hit("mid-write")
                    os.replace(tmp, p[-1], src_dir_fd=d, dst_dir_fd=d)
                except BaseException:
                    _unlink_quiet(tmp, d)
                    raise
                if sync:
                    os.fsync(d)
        except OSError as exc:
            _raise_write(exc, what)

    def write_json(self, rel: str | os.PathLike, info: dict) -> None:
        self.write_atomic(rel, (json.dumps(info, indent=2, sort_keys=True, default=str) + "\n").encode())

    def unlink(self, rel: str | os.PathLike, expect: FileId | None = None) -> bool:
        """Remove ``rel`` if it is still the file ``expect`` names (any file without ``expect``). Returns whether it
        removed something."""
        p = parts(rel)
        try:
            with self.folder(PurePosixPath(*p[:-1]) if len(p) > 1 else "") as d:
                if expect is not None:
                    st = os.stat(p[-1], dir_fd=d, follow_symlinks=False)
                    if FileId.of(st) != expect:
                        return False
                os.unlink(p[-1], dir_fd=d)
                os.fsync(d)
                return True
        except FileNotFoundError:
            return False

    def free_name(self, rel: str | os.PathLike) -> PurePosixPath:
        """``rel`` if nothing is there, else ``stem-1.ext``, ``stem-2.ext``, ... (the first free one).

        Raises:
            UnsafePathError: a folder on the way is a symbolic link.
        """
        p = PurePosixPath(*parts(rel))
        stem, suffix = split_name(p.name)
        candidate, n = p, 0
        while self.exists(candidate):
            n += 1
            candidate = p.with_name(fit_name(f"{stem}-{n}{suffix}"))
        return candidate

    def remove_temps_of(self, rel: str | os.PathLike, older_than: float = 0.0) -> int:
        """Delete the temp files a writer of ``rel`` left beside it (a dead worker's half-written output), if older
        than ``older_than`` seconds. Returns how many."""
        p = parts(rel)
        head = fit_name(f".{p[-1]}", NAME_MAX - 18 - len(TMP_SUFFIX)) + "."
        cutoff = time.time() - older_than
        n = 0
        try:
            with self.folder(PurePosixPath(*p[:-1]) if len(p) > 1 else "") as d:
                for name in os.listdir(d):
                    if name.startswith(head) and name.endswith(TMP_SUFFIX):
                        try:
                            if os.stat(name, dir_fd=d, follow_symlinks=False).st_mtime <= cutoff:
                                os.unlink(name, dir_fd=d)
                                n += 1
                        except FileNotFoundError:
                            continue
        except (FileNotFoundError, UnsafePathError):
            return 0
        return n

    def remove_stale_temps(self, older_than: float = 0.0) -> int:
        """Delete the temp files a crash left anywhere below the root, if older than ``older_than`` seconds (other
        daemons sharing the folder may be writing theirs right now). Returns how many. Never follows links."""
        n = 0
        cutoff = time.time() - older_than
        for _dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=self.fd, follow_symlinks=False):
            for name in files:
                if not name.endswith(TMP_SUFFIX):
                    continue
                try:
                    if older_than and os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime > cutoff:
                        continue
                    os.unlink(name, dir_fd=dfd)
                    n += 1
                except FileNotFoundError:
                    continue
        return n


def read_at_most(fd: int, limit: int, name: str) -> bytes:
    """The bytes from ``fd``'s position to its end, reading no more than ``limit`` + 1 of them: a file grown past
    the size it was registered with is never read whole (a 10 MB input extended to 1.5 GB while it is held open).
    The descriptor stays open.

    Raises:
        FileTooLongError: there are more than ``limit`` bytes (``name`` is for the message).
        OSError: the read fails.
    """
    left = limit + 1
    chunks: list[bytes] = []
    # Unbuffered, so that no read-ahead goes past limit + 1. The first read is sized by fstat: one allocation and,
    # for a file that did not grow, one more read that finds its end.
    want = min(left, os.fstat(fd).st_size + 1)
    with os.fdopen(fd, "rb", buffering=0, closefd=False) as raw:
        while left > 0:
            chunk = raw.read(want)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
            want = min(left, 1 << 20)
    if left <= 0:
        raise FileTooLongError(name, limit, None)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _create_temp(dir_fd: int, name: str, make: Callable[[str], None] | None = None) -> str:
    """Create a temp entry beside ``name`` with a random name, exclusively, and return its name: an empty file, or
    whatever ``make(tmp)`` creates in ``dir_fd`` (it must fail with FileExistsError where the name is taken)."""
    head = fit_name(f".{name}", NAME_MAX - 18 - len(TMP_SUFFIX))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = f"{head}.{secrets.token_hex(8)}{TMP_SUFFIX}"
        try:
            if make is None:
                os.close(os.open(tmp, flags, 0o666, dir_fd=dir_fd))
            else:
                make(tmp)
            return tmp
        except FileExistsError:  # 64 random bits: only a planted name gets here
            continue


def _unlink_quiet(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


# --- names ---------------------------------------------------------------------------------------------------------
def fit_name(name: str, max_bytes: int = NAME_MAX) -> str:
    """Shorten ``name`` to at most ``max_bytes`` bytes (as the kernel counts them) by trimming its stem, keeping
    the suffix."""
    if len(os.fsencode(name)) <= max_bytes:
        return name
    stem, suffix = split_name(name)
    room = max(1, max_bytes - len(os.fsencode(suffix)))
    raw = os.fsencode(stem)[:room]
    for cut in range(4):  # never end inside a UTF-8 sequence of a name that was valid UTF-8
        try:
            return raw[: len(raw) - cut].decode("utf-8") + suffix
        except UnicodeDecodeError:
            continue
    return os.fsdecode(raw) + suffix  # not UTF-8 to begin with: keep its bytes


def split_name(name: str) -> tuple[str, str]:
    """Split at the last dot, keeping the compound suffixes we write together (``.error.json``, ``.prompt.txt``)."""
    for compound in (".error.json", ".prompt.txt"):
        if name.endswith(compound) and len(name) > len(compound):
            return name[: -len(compound)], compound
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext) if dot and stem else (name, "")


# --- moves ---------------------------------------------------------------------------------------------------------
# Filesystems that have no hard links (FAT, some SMB mounts) answer link() with one of these; EPERM is also what
# fs.protected_hardlinks gives a service that does not own the file.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}


def move(
    src: Root,
    src_rel: str | os.PathLike,
    dst: Root,
    dst_rel: str | os.PathLike,
    *,
    expect: FileId | None = None,
    reserved: bool = False,
    special: bool = False,
) -> PurePosixPath:
    """Move ``src_rel`` under ``src`` to ``dst_rel`` under ``dst`` (or ``-1``, ``-2``, ... if that name holds another
    file), durably. Returns the name it got under ``dst``.

    Never overwrites, and safe against a concurrent mover of the same file (another node archiving it): the name is
    taken exclusively with ``link()`` (or an ``O_EXCL`` placeholder where links are refused), and a name that is
    already a link to the file (the other mover's, or our own interrupted try) counts as done. ``reserved``: ``dst_rel``
    was chosen for this very file and recorded (the archive path committed with the job), so a *copy* there with
    the same bytes and mtime is this file, copied by another mover across filesystems. ``special``: the source may
    be a symbolic link or a FIFO (moved as itself, never followed or opened: a bad entry quarantined; across
    filesystems it is made anew there, as ``mv`` does). The source is removed last.

    Raises:
        FileNotFoundError: the source is gone (another mover took it, and records where).
        InputChangedError: the source is not the file ``expect`` names any more (it was replaced after it was
            registered), or it was replaced or changed while it was copied across filesystems; nothing is moved.
        UnsafePathError: a folder on either path is a symbolic link.
        OSError: anything else (the caller keeps the input where it is and tries again later).
    """
    sp, dp = parts(src_rel), parts(dst_rel)
    with (
        src.folder(PurePosixPath(*sp[:-1]) if len(sp) > 1 else "") as sd,
        dst.folder(PurePosixPath(*dp[:-1]) if len(dp) > 1 else "", create=True) as dd,
    ):
        name = sp[-1]
        st = os.stat(name, dir_fd=sd, follow_symlinks=False)
        if expect is not None and FileId.of(st) != expect:
            raise InputChangedError(
                f"{display(str(src_rel))} was replaced after it was registered; it is not this "
                "job's input and stays where it is"
            )
        odd = stat.S_ISLNK(st.st_mode) or stat.S_ISFIFO(st.st_mode)
        if not stat.S_ISREG(st.st_mode) and not (special and odd):
            raise UnsafePathError(f"{display(str(src_rel))} is not a regular file")
        stem, suffix = split_name(dp[-1])
        candidate, n = dp[-1], 0
        while True:
            try:
                _place(sd, name, dd, candidate, st)
                break
            except FileExistsError:
                if _same_file(sd, name, dd, candidate, copy=reserved and n == 0):
                    break
            n += 1
            candidate = fit_name(f"{stem}-{n}{suffix}")
        os.fsync(dd)
        try:
            os.unlink(name, dir_fd=sd)
        except FileNotFoundError:
            pass  # the other mover removed it; its bytes are at `candidate`
        os.fsync(sd)
    return PurePosixPath(*dp[:-1], candidate)


def _place(sd: int, name: str, dd: int, dest: str, st: os.stat_result) -> None:
    """Give the bytes of ``name`` (in folder ``sd``; ``st``, its ``lstat``, says a regular file, a FIFO or a
    symbolic link) the name ``dest`` (in folder ``dd``), which must not exist yet; the source stays.

    Exclusive: ``link`` fails with FileExistsError where ``rename`` would silently overwrite, so of two movers aiming
    at one name exactly one wins. Where hard links are refused, an empty placeholder created with ``O_EXCL`` takes
    the name and the file is renamed over it. Across filesystems a copy is made beside ``dest`` under an exclusive
    temp name, then linked the same way: a regular file's bytes (its holes kept, see :func:`_copy_extents`), or a
    FIFO or symbolic link made anew as ``mv`` does (``mkfifo``, ``symlink`` with the same target). A special file
    is never opened: an open of a FIFO waits for a writer that never comes, and would stop the service with it.

    Raises:
        FileExistsError: ``dest`` exists.
        FileNotFoundError: the source is gone.
        InputChangedError: across filesystems, the source is not the file ``st`` describes any more, or changed
            while it was copied; nothing is placed.
    """
    try:
        os.link(name, dest, src_dir_fd=sd, dst_dir_fd=dd, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in _NO_LINKS | {errno.EXDEV}:
            raise
        cross = exc.errno == errno.EXDEV
    if not cross:
        _rename_exclusive(sd, name, dd, dest)
        return
    if stat.S_ISREG(st.st_mode):
        tmp = _create_temp(dd, dest)
        try:
            _copy_file(sd, name, dd, tmp, st)
            _link_exclusive(dd, tmp, dest)
        finally:
            _unlink_quiet(tmp, dd)
        return
    if stat.S_ISFIFO(st.st_mode):

        def make(tmp: str) -> None:
            os.mkfifo(tmp, stat.S_IMODE(st.st_mode), dir_fd=dd)

    else:  # a symbolic link: move() lets nothing else through
        target = os.readlink(name, dir_fd=sd)

        def make(tmp: str) -> None:
            os.symlink(target, tmp, dir_fd=dd)

    tmp = _create_temp(dd, dest, make)
    try:
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dd, follow_symlinks=False)
        _link_exclusive(dd, tmp, dest)
    finally:
        _unlink_quiet(tmp, dd)


def _copy_file(sd: int, name: str, dd: int, tmp: str, st: os.stat_result) -> None:
    """Copy the regular file ``name`` (``lstat`` ``st``) into the empty ``tmp``, with its mtime, and fsync it.

    The source is opened with ``O_NONBLOCK`` and checked with ``fstat`` first: a FIFO swapped in after ``st`` was
    taken cannot block the open. Exactly ``st.st_size`` bytes are copied, so a source that keeps growing cannot
    keep the copy (and the service) going.

    Raises:
        InputChangedError: the source is not the file ``st`` describes, or its size or mtime changed meanwhile.
    """
    fd_in = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sd)
    try:
        if FileId.of(os.fstat(fd_in)) != FileId.of(st):
            raise InputChangedError(f"{display(name)} was replaced while it was being moved; it stays where it is")
        fd_out = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dd)
        try:
            _copy_extents(fd_in, fd_out, st.st_size)
            after = os.fstat(fd_in)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise InputChangedError(f"{display(name)} changed while it was being moved; it stays where it is")
            os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))  # a copy keeps the mtime (see _same_file)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _copy_extents(fd_in: int, fd_out: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``fd_in`` to the empty ``fd_out``, keeping holes: only the extents that hold
    data (``SEEK_DATA`` / ``SEEK_HOLE``) are written, and the file is then extended to ``size``, so a hole stays a
    hole and a sparse 200 MB file costs its data on the other filesystem, not 200 MB. A filesystem that cannot
    tell where its holes are gets every byte copied."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd_in, pos, os.SEEK_DATA)
            end = min(size, os.lseek(fd_in, start, os.SEEK_HOLE))
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                break
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            start, end = pos, size
        os.lseek(fd_out, start, os.SEEK_SET)
        while start < end:
            sent = os.sendfile(fd_out, fd_in, start, min(end - start, 1 << 24))
            if sent == 0:  # it shrank under us; the size check after the copy says so
                break
            start += sent
        pos = end
    os.ftruncate(fd_out, size)


def _link_exclusive(dd: int, tmp: str, dest: str) -> None:
    """Give the finished temp entry ``tmp`` the name ``dest`` in the same folder, never overwriting: a link (of the
    entry itself, never a link's target), or a rename over an ``O_EXCL`` placeholder where links are refused.

    Raises:
        FileExistsError: ``dest`` exists.
    """
    try:
        os.link(tmp, dest, src_dir_fd=dd, dst_dir_fd=dd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        _rename_exclusive(dd, tmp, dd, dest)


def _rename_exclusive(sd: int, name: str, dd: int, dest: str) -> None:
    """Rename only if no one else has the name: claim it with an ``O_EXCL`` placeholder first."""
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dd))
    try:
        os.rename(name, dest, src_dir_fd=sd, dst_dir_fd=dd)
    except BaseException:
        os.unlink(dest, dir_fd=dd)  # give the name back
        raise


def _same_file(sd: int, name: str, dd: int, dest: str, copy: bool) -> bool:
    """Whether ``dest`` is ``name`` (two links), or, with ``copy``, a copy of it as :func:`_place` makes them: the
    same bytes and the same mtime (to within 1 ms, for a filesystem with a coarser clock)."""
    try:
        a = os.stat(name, dir_fd=sd, follow_symlinks=False)
        b = os.stat(dest, dir_fd=dd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    if not copy or not stat.S_ISREG(b.st_mode) or abs(a.st_mtime_ns - b.st_mtime_ns) > 1_000_000:
        return False
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never wait in the open of a FIFO
    try:
        fa = os.open(name, flags, dir_fd=sd)
    except FileNotFoundError:
        return False
    with os.fdopen(fa, "rb") as ha:
        try:
            fb = os.open(dest, flags, dir_fd=dd)
        except FileNotFoundError:
            return False
        with os.fdopen(fb, "rb") as hb:
            if not (stat.S_ISREG(os.fstat(fa).st_mode) and stat.S_ISREG(os.fstat(fb).st_mode)):
                return False
            return _same_bytes(ha, hb)


def _same_bytes(a, b) -> bool:  # noqa: ANN001 - two binary files
    while True:
        x, y = a.read(1 << 20), b.read(1 << 20)
        if x != y:
            return False
        if not x:
            return True
