"""Intake: a complete file in the inbox -> a :class:`~daemon.jobs.JobSpec`, ready to register.

Nothing is trusted about an inbox file but what is read through the inbox's directory handle (:class:`Root`), and
nothing of it is parsed in this process:

1. ``lstat`` through the handle, one folder at a time without following links: a symlink, a FIFO or a folder swapped
   for a link fails as a job of its own (keyed on its name and time, so it fails exactly once) and is never opened;
2. open with ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat``: the size is checked against ``max_file_bytes`` *before* any
   byte is read; then the open descriptor goes to a sandbox process (:mod:`daemon.sandbox`), which reads the header
   (format, width, height, frames; every frame inside its canvas) and checks it against ``max_pixels`` and
   ``max_frames``, under its own memory, CPU and time budget;
3. the content sha256 is streamed from that same descriptor, 1 MiB at a time, never past the size ``fstat`` gave
   (hashing is reading, not parsing);
4. a ``<name>.prompt.txt`` beside it becomes the rule's prompt, for a backend that takes one: its text is decoded in
   the sandbox too.

The spec records the file's device, inode and size: a file replaced under the same name later is not this job's
input, and one that grew or shrank is not its content. The worker passes the file to the sandbox again, which hashes
exactly the bytes it decodes, and the worker checks that hash against this one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from daemon import imageio
from daemon.config import LiveSettings, Rule, Settings, UsesSettings
from daemon.errors import (
    BadSidecarError,
    EmptyFileError,
    FileTooLongError,
    ImageTooLargeError,
    UnsafePathError,
    reading,
)
from daemon.fsops import NAME_MAX, FileId, Root, display
from daemon.jobs import JobSpec
from daemon.sandbox import Sandbox
from models.errors import UpscaledError

SIDECAR_SUFFIX = ".prompt.txt"  # `photo.jpg.prompt.txt` beside `photo.jpg` holds that image's prompt
SIDECAR_MAX_BYTES = 4096  # the text encoder reads 77 tokens; anything this long is a mistake, not a prompt
CHUNK = 1 << 20


def sidecar_name(rel: PurePosixPath) -> PurePosixPath | None:
    """The name of ``rel``'s prompt sidecar, or None when ``rel`` cannot have one: a name within 11 bytes of the
    255-byte limit plus ``.prompt.txt`` is longer than any file name can be, so no such file exists."""
    name = rel.name + SIDECAR_SUFFIX
    if len(os.fsencode(name)) > NAME_MAX:
        return None
    return rel.with_name(name)


def no_such_name(exc: OSError) -> bool:
    """Whether ``exc`` says a name cannot exist here (ENAMETOOLONG: a filesystem with names shorter than 255 bytes),
    which for a sidecar means there is none."""
    return exc.errno == errno.ENAMETOOLONG


def read_prompt(root: Root, rel: PurePosixPath, sandbox: Sandbox) -> str | None:
    """The text of ``<rel>.prompt.txt`` under ``root``, or None if there is none (or ``rel``'s name is too long for
    one to exist).

    The text is UTF-8 (a BOM is dropped) with surrounding whitespace stripped, decoded in the sandbox; an empty file
    means an empty prompt.

    Raises:
        BadSidecarError: the sidecar is a link or not a regular file, unreadable, not UTF-8, or over 4 KiB.
    """
    side = sidecar_name(rel)
    if side is None:
        return None
    shown = display(side.name)
    try:
        fd, _ = root.open_file(side, limit=SIDECAR_MAX_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if no_such_name(exc):
            return None
        raise BadSidecarError(f"cannot read the prompt file {shown}: {exc.strerror or exc}") from None
    except UnsafePathError as exc:
        raise BadSidecarError(f"cannot read the prompt file {shown}: {exc}") from None
    except FileTooLongError:
        raise BadSidecarError(
            f"the prompt file {shown} is over {SIDECAR_MAX_BYTES} bytes; a prompt is a line of text"
        ) from None
    try:
        return sandbox.read_text(fd, SIDECAR_MAX_BYTES, shown)
    except OSError as exc:
        raise BadSidecarError(f"cannot read the prompt file {shown}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def with_sidecar_prompt(rule: Rule, root: Root, rel: PurePosixPath, sandbox: Sandbox) -> Rule:
    """``rule`` with its prompt replaced by the sidecar's text, for a backend that takes a prompt; else ``rule``."""
    if not rule.backend().takes_prompt:
        return rule
    prompt = read_prompt(root, rel, sandbox)
    return rule if prompt is None else rule.with_prompt(prompt)


def failure_key(rel: PurePosixPath, st: os.stat_result | None) -> str:
    """The key of a job for a file that fails before it is hashed: its name and time, so it fails once."""
    stamp = f"{os.fsencode(str(rel))!r}:{st.st_mtime_ns if st else 0}:{st.st_ino if st else 0}"
    return "x" + hashlib.sha256(stamp.encode()).hexdigest()[1:]


# Room for what a file may carry besides its pixels: EXIF with a thumbnail, ICC, XMP, IPTC, a PNG text chunk.
METADATA_ROOM = 64 << 20


def plausible_bytes(probe: imageio.Probe) -> int:
    """The most bytes an image of this size can take: its raw samples at 16-bit RGBA (no codec stores pixels in
    more, even uncompressed), and room for metadata."""
    return probe.width * probe.height * max(1, probe.frames) * 8 + METADATA_ROOM


def inspect(
    root: Root, rel: PurePosixPath, settings: Settings, sandbox: Sandbox, beat: Callable[[], None] = lambda: None
) -> tuple[str, imageio.Probe, os.stat_result]:
    """Open ``rel`` under ``root`` once, check its size, have the sandbox read its header (a file far larger than its
    pixels can need is refused: see :func:`plausible_bytes`), and stream its sha256 from the same descriptor.
    Returns (sha256, probe, fstat).

    Raises:
        FileNotFoundError: it went away.
        UnsafePathError: it (or a folder on its path) is a symbolic link, or not a regular file.
        UnreadableFileError, EmptyFileError, ImageTooLargeError, DecodeError, UnsupportedImageError, and the
        sandbox's DecodeLimitError, DecodeTimeoutError, DecoderCrashError.
    """
    name = display(str(root.abs(rel)))
    with reading(name):
        fd, st = root.open_file(rel)
    try:
        if st.st_size > settings.max_file_bytes:
            raise ImageTooLargeError(
                f"{name} is {st.st_size} bytes, over the max_file_bytes limit of {settings.max_file_bytes}"
            )
        if st.st_size == 0:
            raise EmptyFileError(f"{name} is empty (0 bytes)")
        probe = sandbox.probe(fd, st.st_size, name, settings.max_pixels, settings.max_frames, beat)
        need = plausible_bytes(probe)
        if st.st_size > need:  # a valid header on a huge tail: the worker would read all of it to decode it
            raise ImageTooLargeError(
                f"{name} is {st.st_size} bytes, but a {probe.width}x{probe.height} image "
                f"({probe.frames} frame(s)) needs at most {need}: {st.st_size - need} "
                "bytes of it are not its pixels"
            )
        digest = hashlib.sha256()
        with reading(name):
            done = 0
            while done < st.st_size and (chunk := os.pread(fd, min(CHUNK, st.st_size - done), done)):
                digest.update(chunk)
                done += len(chunk)
                beat()
    finally:
        os.close(fd)
    return digest.hexdigest(), probe, st


class Intake(UsesSettings):
    """Turns inbox files into job specs, reading them only through the inbox's directory handle."""

    def __init__(
        self, settings: Settings | LiveSettings, inbox: Root, sandbox: Sandbox, beat: Callable[[], None] | None = None
    ) -> None:
        self.live = LiveSettings.of(settings)
        self.inbox = inbox
        self.sandbox = sandbox
        self.beat = beat or (lambda: None)  # a sign of life while a large file is hashed

    def spec(self, rel: PurePosixPath) -> JobSpec | None:
        """The job spec for the inbox file ``rel``, or None if it is gone.

        Never raises for a bad file: a file that must fail (a link, not an image, too large, unreadable, a bad
        sidecar) gets a spec with ``failure`` set, and its job fails with that reason.
        """
        rule = self.settings.rule_for(str(rel.parent))
        base: dict[str, Any] = dict(rule=rule, rel=rel, input_path=display(str(self.inbox.abs(rel))), source="watch")
        try:
            st = self.inbox.lstat(rel)
        except UnsafePathError as exc:
            return JobSpec(sha=failure_key(rel, None), failure=exc, **base)
        if st is None:
            return None
        if not stat.S_ISREG(st.st_mode):
            what = (
                "a symbolic link; links are not followed out of the inbox"
                if stat.S_ISLNK(st.st_mode)
                else "not a regular file"
            )
            return JobSpec(
                sha=failure_key(rel, st),
                failure=UnsafePathError(f"{display(str(rel))} is {what}"),
                input_size=st.st_size,
                **base,
            )
        try:
            sha, probe, st = inspect(self.inbox, rel, self.settings, self.sandbox, self.beat)
            rule = with_sidecar_prompt(rule, self.inbox, rel, self.sandbox)
        except FileNotFoundError:
            return None
        except UpscaledError as exc:
            return JobSpec(sha=failure_key(rel, st), failure=exc, input_size=st.st_size, **base)
        return JobSpec(
            sha=sha,
            input_size=st.st_size,
            input_id=FileId.of(st),
            input_format=probe.format,
            input_width=probe.width,
            input_height=probe.height,
            frames=probe.frames,
            **(base | {"rule": rule}),
        )
