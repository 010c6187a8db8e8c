"""The messages between the daemon and a sandbox child, over a ``SOCK_SEQPACKET`` socket pair.

A message is one packet: a JSON header (UTF-8, at most :data:`MAX_HEADER` bytes) and up to two file descriptors
passed with ``SCM_RIGHTS``. Large things never travel in the packet: the pixels, and the metadata blocks, go in a
*payload*, a memfd that the sender fills, seals (no write, grow or shrink from then on) and passes; the header says
where each part lies in it (:class:`Section`). The daemon maps a child's payload read-only after checking its seals
and size, so a child cannot change the pixels under it, nor shrink the file into a SIGBUS.

Nothing is pickled in either direction: a child that a decoder bug has taken over can send only JSON and a sealed
memfd, and the daemon checks both against what it asked for (:mod:`daemon.sandbox.pool`).
"""

from __future__ import annotations

import array
import fcntl
import json
import mmap
import os
import socket
from dataclasses import dataclass
from typing import Any

MAX_HEADER = 64 << 10  # the JSON part; everything large travels in a payload
MAX_FDS = 2
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class WireError(Exception):
    """A message that breaks the protocol: too large, not JSON, a payload without its seals."""


@dataclass(frozen=True)
class Section:
    """``length`` bytes at ``offset`` of a payload."""

    offset: int
    length: int

    def as_json(self) -> list[int]:
        return [self.offset, self.length]


class PayloadWriter:
    """Builds a payload memfd: reserve sections, write into them, then :meth:`seal`."""

    def __init__(self, size: int, name: str = "upscaled-payload") -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.size = size
        self.used = 0
        self.map: mmap.mmap | None = None
        if size:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def reserve(self, length: int, align: int = 64) -> Section:
        offset = -(-self.used // align) * align
        if offset + length > self.size:
            raise WireError(f"payload: {offset + length} bytes needed, {self.size} reserved")
        self.used = offset + length
        return Section(offset, length)

    def view(self, section: Section) -> memoryview:
        assert self.map is not None
        return memoryview(self.map)[section.offset : section.offset + section.length]

    def put(self, data: bytes | memoryview) -> Section:
        section = self.reserve(len(data))
        if len(data):
            self.view(section)[:] = data
        return section

    def seal(self) -> int:
        """Unmap, seal and return the fd (the caller passes it and closes it)."""
        if self.map is not None:
            self.map.close()
            self.map = None
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        return self.fd

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        os.close(self.fd)


def payload_size(parts: list[int], align: int = 64) -> int:
    """The bytes a payload of these part lengths needs, aligned as :meth:`PayloadWriter.reserve` aligns them."""
    total = 0
    for length in parts:
        total = -(-total // align) * align + length
    return total


class Payload:
    """A received payload, mapped read-only (copy-on-write: the daemon may change its arrays in place)."""

    def __init__(self, fd: int) -> None:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            raise WireError(f"payload: not a sealable memfd ({exc.strerror})") from None
        if seals & SEALS != SEALS:
            raise WireError(f"payload: not sealed (seals {seals:#x})")
        self.size = os.fstat(fd).st_size
        self.map = mmap.mmap(fd, self.size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) if self.size else None

    def section(self, value: Any, what: str) -> Section:
        """A section from a header value, checked to lie inside the payload.

        Raises:
            WireError: not ``[offset, length]`` of non-negative ints, or past the end.
        """
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            raise WireError(f"{what}: expected [offset, length], got {value!r:.80}")
        offset, length = value
        if offset + length > self.size:
            raise WireError(f"{what}: {offset}+{length} is past the payload's {self.size} bytes")
        return Section(offset, length)

    def bytes(self, section: Section) -> bytes:
        if not section.length or self.map is None:
            return b""
        return self.map[section.offset : section.offset + section.length]

    def buffer(self, section: Section) -> memoryview:
        assert self.map is not None
        return memoryview(self.map)[section.offset : section.offset + section.length]


def send(sock: socket.socket, header: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message. Raises OSError (the peer is gone) or WireError (the header is too large)."""
    data = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_HEADER:
        raise WireError(f"a header of {len(data)} bytes is over the {MAX_HEADER} limit")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message: (header, fds), or None when the peer closed its end.

    The fds received are the caller's to close, also when this raises.

    Raises:
        WireError: a truncated or non-JSON header, too many fds.
        OSError: the socket failed.
    """
    data, anc, flags, _ = sock.recvmsg(MAX_HEADER, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(blob[: len(blob) - len(blob) % 4])
            fds.extend(got)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise WireError("a message was truncated (too large, or too many descriptors)")
    if not data and not fds:
        return None
    try:
        header = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        for fd in fds:
            os.close(fd)
        raise WireError(f"a header that is not JSON: {exc}") from None
    if not isinstance(header, dict):
        for fd in fds:
            os.close(fd)
        raise WireError("a header that is not a JSON object")
    return header, fds
