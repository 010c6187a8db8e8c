"""The errors of the service side: configuration, input files, outputs and the queue.

They share the base, the ``kind`` and the :class:`~models.errors.Retry` policy of :mod:`models.errors` (why the base
lives there: docs/development.md, "Where errors live").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from models.errors import ImageError, ResourceError, Retry, UpscaledError


class ConfigError(UpscaledError):
    """The configuration is unusable; the message names the key and the file (and the overriding variable)."""

    kind = "config"


class NodeInUseError(ConfigError):
    """A daemon joined under the ``node_name`` of a node that is still alive: two daemons with one name would take
    over each other's jobs. ``name``, ``host`` and ``pid`` say who holds it."""

    def __init__(self, name: str, host: str, pid: int) -> None:
        super().__init__(f"node name {name!r} is in use by pid {pid} on {host}; give every daemon its own node_name")
        self.name, self.host, self.pid = name, host, pid


# --- input files ---------------------------------------------------------------------------------------------------
class EmptyFileError(ImageError):
    """The input has 0 bytes."""

    kind = "empty-file"


class DecodeError(ImageError):
    """The input is not an image, or is damaged or truncated."""

    kind = "decode"


class ImageTooLargeError(ImageError):
    """The input (or the output it would make) is over the pixel or frame limits."""

    kind = "too-large"


class FileTooLongError(ImageTooLargeError):
    """A file holds more bytes than its reader accepts (:meth:`daemon.fsops.Root.read_bytes` with a ``limit``): a
    job's input grown past the size it was registered with, or a prompt sidecar over its cap.

    ``size`` is the length ``fstat`` gave, or None when the file grew while it was read (then it is over ``limit``,
    by how much is not known: the reader stopped one byte past it)."""

    def __init__(self, name: str, limit: int, size: int | None) -> None:
        self.name, self.limit, self.size = name, limit, size
        seen = f"{size} bytes" if size is not None else "more (it grew while it was read)"
        super().__init__(f"{name} holds {seen}, over the {limit} bytes it may have")

    def __reduce__(self) -> tuple[type[FileTooLongError], tuple[str, int, int | None]]:
        return type(self), (self.name, self.limit, self.size)  # picklable: it may cross from a child process


class UnreadableFileError(ImageError):
    """The input cannot be opened or read (permissions, I/O error)."""

    kind = "unreadable"


class BadSidecarError(ImageError):
    """The ``<image>.prompt.txt`` beside an input cannot be used: unreadable, not UTF-8 text, too long, a link."""

    kind = "bad-sidecar"


class UnsafePathError(UpscaledError):
    """A path the service would read, write or move through leaves its folder: a symbolic link (or a folder swapped
    for one after the file was registered), a name with ``..``, or something that is not a regular file."""

    kind = "unsafe-path"


class InputChangedError(ImageError):
    """The input was replaced (another file under its name) or rewritten after it was registered: it is not the
    job's input any more. The new file is a job of its own."""

    kind = "input-changed"


class DecodeLimitError(ImageError):
    """Parsing the input needed more memory (or CPU time) than its sandbox budget: a decompression bomb, or a
    budget set too low for a real image (``decode_memory_limit``)."""

    kind = "decode-limit"


class DecodeTimeoutError(ImageError):
    """Parsing the input took longer than ``decode_timeout``; its sandbox process was killed."""

    kind = "decode-timeout"


class DecoderCrashError(ImageError):
    """The sandbox process parsing the input died (a decoder crashed on it, or broke the protocol)."""

    kind = "decode-crash"


class PoisonJobError(ImageError):
    """The service died while this job was the only one in flight, ``max_recoveries`` times: it is not retried
    again."""

    kind = "poison"


# --- outputs -------------------------------------------------------------------------------------------------------
class DiskFullError(ResourceError):
    """No space left (or the quota is reached) while writing an output, a reason file or a move."""

    kind = "disk-full"
    retry = Retry.UNTIL_FIXED


class OutputUnavailableError(ResourceError):
    """The outbox (or the archive) cannot be written: permissions, a read-only or missing mount."""

    kind = "output-unavailable"
    retry = Retry.UNTIL_FIXED


class OutputError(UpscaledError):
    """The output cannot be written for a reason that is not transient (a name that would leave the outbox, an
    image over the encoder's limits)."""

    kind = "output"


class SandboxUnavailableError(ResourceError):
    """No sandbox process can be started to parse inputs (the interpreter or a codec library fails to load): every
    job waits, its input kept, until it can."""

    kind = "sandbox-unavailable"
    retry = Retry.UNTIL_FIXED


# --- the queue -----------------------------------------------------------------------------------------------------
class InternalError(UpscaledError):
    """A bug, or a library's surprise, while running a job: that job fails, the service goes on."""

    kind = "internal"


class QueryError(UpscaledError):
    """A read-only query was refused or failed."""

    kind = "query"


@contextlib.contextmanager
def reading(name: str) -> Iterator[None]:
    """Opening or reading the input ``name``: an ``OSError`` becomes :class:`UnreadableFileError` naming it and why.
    ``FileNotFoundError`` (the file went away: not a failure of the file) passes through."""
    try:
        yield
    except FileNotFoundError:
        raise
    except PermissionError:
        raise UnreadableFileError(f"cannot read {name}: permission denied") from None
    except OSError as exc:
        raise UnreadableFileError(f"cannot read {name}: {exc.strerror or exc}") from None
