"""The daemon's side of the sandbox: a small pool of pre-started child processes, and the calls into them.

    daemon thread ──► Sandbox.decode(fd, ...) ──► an idle child ──► JSON reply + sealed memfd ──► checked ──► Decoded
                          │  waits with a deadline (decode_timeout), beating while it waits
                          └─► past it: SIGKILL, "decode-timeout"; a child that dies: "decode-limit" / "decode-crash"
    spawner thread: keeps ``processes`` children alive, replacing each one that dies or is killed

Every call takes one idle child for itself, passes the file as an open descriptor, and waits for the reply with a
deadline, calling ``beat`` at least twice a second so the calling thread's watchdog beat keeps coming. A child that
exceeds its memory budget answers ``decode-limit`` and exits; one that misses the deadline is killed; one that dies
(a decoder crash, SIGXCPU) is reaped and its signal named. Each of these fails the call with an error of its own kind
(:mod:`daemon.errors`), which fails that job only; the spawner starts a replacement. The daemon's memory, threads and
watchdog are never involved: the pixels arrive in a sealed memfd that is mapped, not copied.

Replies are checked before anything is built from them (:func:`decoded_from`): a child taken over by a decoder bug
can send only JSON and a memfd, never a pickle, and a reply whose shapes, sections or kinds are not what was asked
for is a ``decode-crash``.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from daemon import logs
from daemon.config import Settings
from daemon.errors import (
    BadSidecarError,
    DecodeError,
    DecodeLimitError,
    DecoderCrashError,
    DecodeTimeoutError,
    EmptyFileError,
    ImageTooLargeError,
    InputChangedError,
    SandboxUnavailableError,
    UnreadableFileError,
)
from daemon.fsops import display
from daemon.imageio import Decoded, DecodedFrames, Frame, Probe
from daemon.media.metadata import Metadata, Prepared
from daemon.sandbox import wire
from models.errors import UnsupportedImageError, UpscaledError

Beat = Callable[[], None]
T = TypeVar("T")
_ERRORS: dict[str, type[UpscaledError]] = {
    "decode": DecodeError,
    "empty-file": EmptyFileError,
    "too-large": ImageTooLargeError,
    "unsupported": UnsupportedImageError,
    "input-changed": InputChangedError,
    "unreadable": UnreadableFileError,
    "bad-sidecar": BadSidecarError,
    "decode-limit": DecodeLimitError,
}
_FORMATS = ("png", "jpg", "webp", "tiff", "gif", "avif", "heic", "jxl")
_DTYPES = {"|u1": np.uint8, "<u2": np.uint16}
START_SECONDS = 60.0  # a child that is not ready by then (imports, warm-up) is not going to be
MAX_NOTE = 500


def auto_memory_limit(max_pixels: int) -> int:
    """The default budget of one decode: the largest image the limits allow, at 16-bit RGBA (8 bytes a pixel),
    held a few times over (the decoder's buffer, numpy's copy, the payload) beside its file, plus room."""
    return 32 * max_pixels + (256 << 20)


@dataclass
class _Proc:
    """One child: its process and our end of its socket."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    confinement: str = ""
    calls: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass

    def reap(self, timeout: float = 5.0) -> int | None:
        """Its exit status (negative: the signal that ended it), waiting up to ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def close(self) -> None:
        self.sock.close()


class Sandbox:
    """``processes`` child processes that parse untrusted bytes, each call under ``timeout`` seconds and a memory
    budget of at most ``memory_limit`` bytes (0: :func:`auto_memory_limit` of ``max_pixels``). Thread-safe."""

    def __init__(
        self,
        processes: int = 2,
        timeout: float = 30.0,
        memory_limit: int = 0,
        max_pixels: int = 100_000_000,
        landlock: bool = True,
        seccomp: bool = True,
        recycle_calls: int = 5000,
    ) -> None:
        self.processes = max(1, processes)
        self.timeout = timeout
        self.memory_limit = memory_limit or auto_memory_limit(max_pixels)
        self.cpu_limit = int(max(3600.0, 200 * timeout))
        self.landlock, self.seccomp = landlock, seccomp
        self.recycle_calls = recycle_calls  # each child retires after this many calls (and says so first)
        self.log = logs.get("upscaled.sandbox")
        self._idle: list[_Proc] = []
        self._live = 0  # children started and not yet reaped (idle or busy)
        self._cond = threading.Condition()
        self._closed = False
        self._problem: str | None = None  # why the last start failed; None while they start
        self._spawner: threading.Thread | None = None
        self.replaced = 0  # children replaced after a death, a timeout or a budget overrun
        self.confinement = ""

    @classmethod
    def for_settings(cls, s: Settings) -> Sandbox:
        """The pool the settings describe (``sandbox_processes``, ``decode_timeout``, ``decode_memory_limit``)."""
        return cls(s.sandbox_processes, s.decode_timeout, s.decode_memory_limit, s.max_pixels)

    # --- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the spawner thread: it starts the children in the background (the daemon does not wait). Safe to
        call again."""
        with self._cond:
            if self._spawner is None and not self._closed:
                self._spawner = threading.Thread(target=self._spawn_loop, name="upscaled-sandbox", daemon=True)
                self._spawner.start()

    def close(self) -> None:
        """Let the children go (each exits when its socket closes) and stop the spawner. Safe to call twice."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for p in idle:
            p.close()
            p.reap(2.0)
        if self._spawner is not None:
            self._spawner.join(5.0)

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def problem(self) -> str | None:
        """Why no child can be started (for /readyz), or None."""
        with self._cond:
            return None if self._live else self._problem

    def pids(self) -> list[int]:
        with self._cond:
            return [p.pid for p in self._idle]

    def _spawn_loop(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self._closed and self._live >= self.processes:
                    self._cond.wait()
                if self._closed:
                    return
                self._live += 1  # counted while it starts, so the loop starts only what is missing
            try:
                proc = self._spawn()
            except (OSError, SandboxUnavailableError, wire.WireError) as exc:
                with self._cond:
                    self._live -= 1
                    self._problem = f"the sandbox process cannot start: {exc}"
                    self._cond.notify_all()
                self.log.error("sandbox.start_failed", error=str(exc), retry_in_seconds=delay)
                time.sleep(delay)
                delay = min(30.0, delay * 2)
                continue
            delay = 1.0
            with self._cond:
                self._problem = None
                if self._closed:
                    self._live -= 1
                    proc.close()
                    proc.reap(2.0)
                    return
                self._idle.append(proc)
                self._cond.notify_all()

    def _spawn(self) -> _Proc:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        here = str(Path(__file__).resolve().parents[2])  # the tree this daemon runs from: the child runs the same
        path = [here, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)),
            "LANG": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2",
        }
        if "PYTHONDONTWRITEBYTECODE" in os.environ:
            env["PYTHONDONTWRITEBYTECODE"] = os.environ["PYTHONDONTWRITEBYTECODE"]
        argv = [
            sys.executable,
            "-m",
            "daemon.sandbox.child",
            str(child.fileno()),
            str(self.memory_limit),
            str(self.cpu_limit),
            "1" if self.landlock else "0",
            "1" if self.seccomp else "0",
            str(self.recycle_calls),
        ]
        try:
            proc = subprocess.Popen(
                argv,
                pass_fds=[child.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C is the daemon's to handle, not the children's
            )
        finally:
            child.close()
        p = _Proc(proc, parent)
        ready = select.select([parent], [], [], START_SECONDS)[0]
        got = wire.recv(parent) if ready else None
        if got is None or not got[0].get("ready"):
            p.kill()
            status = p.reap()
            p.close()
            raise SandboxUnavailableError(
                "the sandbox process did not start" + (f" (exit status {status})" if status is not None else "")
            )
        header, fds = got
        for fd in fds:
            os.close(fd)
        p.confinement = str(header.get("confinement", ""))[:200]
        if p.confinement != self.confinement:
            self.confinement = p.confinement
            self.log.info(
                "sandbox.ready",
                pid=p.pid,
                confinement=p.confinement,
                notes=header.get("notes") or None,
                start_seconds=header.get("start_seconds"),
                memory_limit=self.memory_limit,
            )
        return p

    # --- one call -------------------------------------------------------------------------------------------------
    def _acquire(self, beat: Beat | None) -> _Proc:
        self.start()  # a pool nobody started starts with its first call
        with self._cond:
            while not self._idle:
                if self._closed:
                    raise SandboxUnavailableError("the sandbox is closed")
                if self._live == 0 and self._problem is not None:
                    raise SandboxUnavailableError(self._problem)
                self._cond.wait(0.5)
                if beat is not None:
                    beat()
            return self._idle.pop()

    def _release(self, p: _Proc) -> None:
        with self._cond:
            if self._closed:
                self._live -= 1
            else:
                self._idle.append(p)
            self._cond.notify_all()
        if self._closed:
            p.close()
            p.reap(2.0)

    def _discard(self, p: _Proc, why: str, name: str) -> int | None:
        """Let ``p`` go for good (killed if it still runs) and have the spawner replace it."""
        p.kill()
        status = p.reap()
        p.close()
        with self._cond:
            self._live -= 1
            self.replaced += 1
            self._cond.notify_all()
        self.log.warning("sandbox.replaced", pid=p.pid, why=why, file=name, status=status)
        return status

    def call(
        self, req: dict[str, Any], fds: list[int] | tuple[int, ...] = (), beat: Beat | None = None
    ) -> tuple[dict[str, Any], wire.Payload | None]:
        """Send ``req`` (with ``fds``) to an idle child and return its checked reply and payload.

        Raises:
            DecodeTimeoutError: no reply within :attr:`timeout` (the child is killed).
            DecodeLimitError: the child ran out of its memory or CPU budget.
            DecoderCrashError: the child died, or answered outside the protocol.
            SandboxUnavailableError: no child can be started.
            And the error the child reports for the file (:data:`_ERRORS`).
        """
        name = display(str(req.get("name", "the file")))
        req = dict(req, seconds=self.timeout)
        p = self._acquire(beat)
        try:
            wire.send(p.sock, req, fds)
        except OSError:  # it died while idle (the OOM killer's pick, say): no job is blamed, another takes it
            self._discard(p, "its socket failed", name)
            p = self._acquire(beat)
            try:
                wire.send(p.sock, req, fds)
            except OSError:
                status = self._discard(p, "its socket failed", name)
                raise self._death(status, name) from None
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(p.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        while not poller.poll(1000 * max(0.0, min(0.5, deadline - time.monotonic()))):
            if beat is not None:
                beat()
            if time.monotonic() >= deadline:
                self._discard(p, "decode-timeout", name)
                raise DecodeTimeoutError(
                    f"decode-timeout: parsing {name} took longer than {self.timeout:g} s (decode_timeout); its "
                    "sandbox process was stopped"
                )
        try:
            got = wire.recv(p.sock)
        except wire.WireError as exc:
            self._discard(p, f"protocol: {exc}", name)
            raise DecoderCrashError(f"decode-crash: the sandbox process parsing {name} broke the protocol") from None
        except OSError:  # ECONNRESET: it died with the request in hand
            got = None
        if got is None:
            status = self._discard(p, "it died", name)
            raise self._death(status, name)
        header, rfds = got
        try:
            payload = wire.Payload(rfds[0]) if len(rfds) == 1 else None
            if len(rfds) > 1:
                raise wire.WireError("more than one payload")
        except wire.WireError as exc:
            self._discard(p, f"protocol: {exc}", name)
            raise DecoderCrashError(f"decode-crash: the sandbox process parsing {name} broke the protocol") from None
        finally:
            for fd in rfds:
                os.close(fd)
        if header.get("retire") is True:  # it leaves after this reply (its budget of calls or CPU is spent)
            self._discard(p, "retired", name)
        if header.get("ok") is True:
            p.calls += 1
            if header.get("retire") is not True:
                self._release(p)
            return header, payload
        kind, message = str(header.get("kind", "")), _clean(header.get("message"))
        if kind == "decode-limit":  # the child exits after it (it said so): its decoder may be in any state
            raise DecodeLimitError(f"decode-limit: {message}")
        if header.get("retire") is not True:
            self._release(p)
        raise _ERRORS.get(kind, DecodeError)(message or f"{name} could not be parsed")

    def _death(self, status: int | None, name: str) -> UpscaledError:
        """The error for a child that died under a call, from its exit status."""
        if status is not None and status < 0:
            sig = signal.Signals(-status).name if -status in signal.valid_signals() else str(-status)
            if -status == signal.SIGXCPU:
                return DecodeLimitError(f"decode-limit: parsing {name} used more CPU time than its budget")
            if -status == signal.SIGKILL:
                return DecodeLimitError(
                    f"decode-limit: the sandbox process parsing {name} was killed (SIGKILL: the kernel's "
                    "out-of-memory killer, or an operator)"
                )
            return DecoderCrashError(f"decode-crash: the decoder crashed on {name} ({sig})")
        return DecoderCrashError(f"decode-crash: the sandbox process parsing {name} exited ({status})")

    # --- the operations ---------------------------------------------------------------------------------------------
    def probe(self, fd: int, size: int, name: str, max_pixels: int, max_frames: int, beat: Beat | None = None) -> Probe:
        """The header of the open file ``fd`` (``size`` bytes): format, size, frames, checked against the limits.

        Raises:
            DecodeError, UnsupportedImageError, ImageTooLargeError, and the errors of :meth:`call`.
        """
        req = {"op": "probe", "name": name, "size": size, "max_pixels": max_pixels, "max_frames": max_frames}
        header, _ = self.call(req, [fd], beat)
        return probe_from(header.get("probe"), max_pixels, max_frames)

    def decode(
        self, fd: int, size: int | None, name: str, max_pixels: int, max_frames: int, beat: Beat | None = None
    ) -> tuple[Decoded, str]:
        """Every frame and the metadata of the open file ``fd``, and the sha256 of exactly the bytes decoded.
        ``size``: the bytes it must hold (its registered size); a file longer or shorter changed since.

        Raises:
            InputChangedError: not ``size`` bytes.
            DecodeError, EmptyFileError, UnsupportedImageError, ImageTooLargeError, and those of :meth:`call`.
        """
        req = {"op": "decode", "name": name, "size": size, "max_pixels": max_pixels, "max_frames": max_frames}
        header, payload = self.call(req, [fd], beat)
        return decoded_from(header, payload, max_pixels, max_frames), _sha(header.get("sha256"))

    def decode_bytes(self, data: bytes, name: str, max_pixels: int, beat: Beat | None = None) -> Decoded:
        """Decode ``data`` (an output of ours, to measure it as written) in a child like any file."""
        writer = wire.PayloadWriter(len(data))
        writer.put(data)
        fd = writer.seal()
        try:
            return self.decode(fd, len(data), name, max_pixels, 1, beat)[0]
        finally:
            os.close(fd)

    def prepare(
        self, meta: Metadata, policy: str, fmt: str, size: tuple[int, int], beat: Beat | None = None
    ) -> tuple[Prepared, list[str]]:
        """``meta`` fitted to an output of ``fmt`` and ``size`` under ``policy``: EXIF and XMP are parsed (and
        rewritten) in a child; what comes back is written into the output as it is."""
        blocks = {"icc": meta.icc, "exif": meta.exif, "xmp": meta.xmp}
        iptc = json.dumps(meta.iptc).encode() if meta.iptc else None
        writer = wire.PayloadWriter(wire.payload_size([len(b or b"") for b in [*blocks.values(), iptc]]))
        sections: dict[str, Any] = {k: writer.put(v).as_json() for k, v in blocks.items() if v}
        if iptc:
            sections["iptc"] = writer.put(iptc).as_json()
        if meta.captured:
            sections["captured"] = meta.captured
        fd = writer.seal()
        try:
            req = {"op": "prepare", "name": "metadata", "policy": policy, "fmt": fmt, "size": list(size)}
            header, payload = self.call(dict(req, meta=sections), [fd], beat)
        finally:
            os.close(fd)
        return prepared_from(header, payload)

    def read_text(self, fd: int, limit: int, name: str, beat: Beat | None = None) -> str:
        """A sidecar prompt file's text (UTF-8, stripped), at most ``limit`` bytes.

        Raises:
            BadSidecarError: over ``limit``, or not UTF-8.
        """
        header, _ = self.call({"op": "text", "name": name, "limit": limit}, [fd], beat)
        text = header.get("text")
        if not isinstance(text, str) or len(text.encode("utf-8", "surrogatepass")) > limit:
            raise DecoderCrashError("decode-crash: the sandbox answered a prompt outside the protocol")
        return text

    def inspect(self, fd: int, name: str, verify: bool, max_pixels: int, float_max_pixels: int) -> dict[str, Any]:
        """For the web view: the upright size and Pillow's format name of an image file, whether a browser shows it
        as it is (``as_is``); ``verify`` decodes it too."""
        req = {
            "op": "inspect",
            "name": name,
            "verify": verify,
            "max_pixels": max_pixels,
            "float_max_pixels": float_max_pixels,
            "max_bytes": 2 << 30,
        }
        header, _ = self.call(req, [fd])
        w, h, fmt = header.get("width"), header.get("height"), header.get("format")
        if not (_count(w) and _count(h) and isinstance(fmt, str) and len(fmt) <= 16):
            raise DecoderCrashError("decode-crash: the sandbox answered an inspection outside the protocol")
        return {"width": w, "height": h, "format": fmt, "as_is": header.get("as_is") is True}

    def render(
        self, fd: int, name: str, side: int, fmt: str, max_pixels: int, float_max_pixels: int, max_bytes: int
    ) -> bytes:
        """For the web view: the image upright at 8 bits, at most ``side`` pixels on its long side, as ``fmt``
        (png or webp)."""
        req = {
            "op": "render",
            "name": name,
            "side": side,
            "fmt": fmt,
            "max_pixels": max_pixels,
            "float_max_pixels": float_max_pixels,
            "max_bytes": max_bytes,
        }
        return _blob(*self.call(req, [fd]))

    def benchmark_lr(self, fd: int, name: str, scale: int, kernel: str, max_pixels: int, max_bytes: int) -> bytes:
        """For the web view: the LR image of a benchmark job, made again from its HR input, as a PNG."""
        req = {
            "op": "lr",
            "name": name,
            "scale": scale,
            "kernel": kernel,
            "max_pixels": max_pixels,
            "max_frames": 1,
            "max_bytes": max_bytes,
        }
        return _blob(*self.call(req, [fd]))


# --- checking replies -------------------------------------------------------------------------------------------------
def _clean(text: Any, limit: int = 2000) -> str:
    """A child's text made printable and short: it goes into job rows, logs and .error.json files."""
    if not isinstance(text, str):
        return ""
    return display(text[:limit]).replace("\n", " ")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _sha(v: Any) -> str:
    if not (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
        raise DecoderCrashError("decode-crash: the sandbox answered without the file's sha256")
    return v


def _bad(what: str) -> DecoderCrashError:
    return DecoderCrashError(f"decode-crash: the sandbox's reply broke the protocol ({what})")


def _checked(fn: Callable[..., T]) -> Callable[..., T]:
    """A reply reader whose payload errors (a section past the end) are protocol breaks too."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except wire.WireError as exc:
            raise _bad(str(exc)) from None

    return wrapper


def probe_from(value: Any, max_pixels: int, max_frames: int) -> Probe:
    """A :class:`Probe` from a child's reply, checked against the limits it was asked to enforce."""
    if not isinstance(value, dict):
        raise _bad("no probe")
    fmt, w, h, n = value.get("format"), value.get("width"), value.get("height"), value.get("frames")
    if not (isinstance(fmt, str) and fmt in _FORMATS and _count(w) and _count(h) and _count(n)):
        raise _bad("probe fields")
    assert isinstance(w, int) and isinstance(h, int) and isinstance(n, int)
    if w * h * n > max_pixels or n > max_frames:
        raise _bad("a probe over the limits it was given")
    return Probe(format=fmt, width=w, height=h, frames=n, animated=value.get("animated") is True)


@_checked
def decoded_from(header: dict[str, Any], payload: wire.Payload | None, max_pixels: int, max_frames: int) -> Decoded:
    """A :class:`Decoded` whose frames are views of the payload (mapped, not copied), after checking every field:
    the format, each frame's shape, type and section, all frames alike, the limits, the metadata's types."""
    if payload is None:
        raise _bad("no payload")
    fmt, mode, items = header.get("format"), header.get("mode"), header.get("frames")
    if fmt not in _FORMATS or not isinstance(mode, str) or len(mode) > 16:
        raise _bad("format or mode")
    if not isinstance(items, list) or not 1 <= len(items) <= max_frames:
        raise _bad("frame count")
    frames: list[Frame] = []
    first_shape = None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad("frame")
        shape, dtype = item.get("shape"), _DTYPES.get(item.get("dtype", ""))
        if (
            dtype is None
            or not isinstance(shape, list)
            or len(shape) != 3
            or not all(_count(v) for v in shape)
            or shape[2] > 4
        ):
            raise _bad(f"frame {i + 1}'s shape or type")
        if first_shape is None:
            first_shape = shape
            if shape[0] * shape[1] * len(items) > max_pixels:
                raise _bad("frames over max_pixels")
        elif shape != first_shape:
            raise _bad(f"frame {i + 1} is not the size of frame 1")
        section = payload.section(item.get("at"), f"frame {i + 1}")
        count = shape[0] * shape[1] * shape[2]
        if section.length != count * np.dtype(dtype).itemsize:
            raise _bad(f"frame {i + 1}'s section")
        assert payload.map is not None
        arr = np.frombuffer(payload.map, dtype, count, section.offset).reshape(shape)
        frames.append(
            Frame(
                arr,
                duration_ms=_int(item.get("duration_ms"), 0, 10**7),
                disposal=_int(item.get("disposal"), 0, 3),
                blend=_int(item.get("blend"), 0, 1),
            )
        )
    loop = header.get("loop")
    notes = header.get("notes")
    return Decoded(
        first=frames[0],
        format=fmt,
        meta=_meta(header.get("meta"), payload),
        mode=mode,
        frames=len(frames),
        loop=_int(loop, 0, 65535) if loop is not None else None,
        notes=[_clean(n, MAX_NOTE) for n in notes[:20]] if isinstance(notes, list) else [],
        _source=DecodedFrames(frames),
    )


def _int(v: Any, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        return lo
    return max(lo, min(hi, v))


def _iptc(raw: bytes) -> dict[str, str | list[str]] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        raise _bad("IPTC") from None
    if not isinstance(value, dict):
        raise _bad("IPTC")
    out: dict[str, str | list[str]] = {}
    for k, v in value.items():
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[str(k)] = v
        elif isinstance(v, str):
            out[str(k)] = v
        else:
            raise _bad("IPTC values")
    return out or None


def _meta(value: Any, payload: wire.Payload) -> Metadata:
    if not isinstance(value, dict):
        raise _bad("metadata")
    meta = Metadata()
    for key in ("icc", "exif", "xmp"):
        if key in value:
            setattr(meta, key, payload.bytes(payload.section(value[key], key)) or None)
    if "iptc" in value:
        meta.iptc = _iptc(payload.bytes(payload.section(value["iptc"], "iptc")))
    captured = value.get("captured")
    meta.captured = captured[:64] if isinstance(captured, str) else None
    return meta


@_checked
def prepared_from(header: dict[str, Any], payload: wire.Payload | None) -> tuple[Prepared, list[str]]:
    value, notes = header.get("prepared"), header.get("notes")
    if not isinstance(value, dict):
        raise _bad("prepared metadata")
    prep = Prepared()
    if value and payload is None:
        raise _bad("no payload")
    if payload is not None:
        for key in ("icc", "exif", "xmp"):
            if key in value:
                setattr(prep, key, payload.bytes(payload.section(value[key], key)) or None)
        if "iptc" in value:
            prep.iptc = _iptc(payload.bytes(payload.section(value["iptc"], "iptc")))
    return prep, [_clean(n, MAX_NOTE) for n in notes[:20]] if isinstance(notes, list) else []


@_checked
def _blob(header: dict[str, Any], payload: wire.Payload | None) -> bytes:
    if payload is None:
        raise _bad("no payload")
    return payload.bytes(payload.section(header.get("data"), "data"))
