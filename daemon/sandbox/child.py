"""A sandbox child: the only process that parses a file someone else wrote.

Started by :class:`daemon.sandbox.pool.Sandbox` as ``python -m daemon.sandbox.child FD BUDGET HARD_CPU LANDLOCK
SECCOMP RECYCLE_CALLS`` with a clean environment and one end of a ``SOCK_SEQPACKET`` socket pair as ``FD``. It

1. imports and warms up every decoder it may use (a tiny image of each format, decoded once), so that nothing is
   loaded from a path later;
2. confines itself (:mod:`daemon.sandbox.confine`): resource limits, no new privileges, Landlock, seccomp;
3. says ``ready``, then answers one request at a time until its socket closes (the daemon is gone, or let it go).

Every request carries the file as an open descriptor, never a path. Each call runs under its own memory budget
(the soft ``RLIMIT_AS``, from the header it has just read and the format) and CPU budget (the soft ``RLIMIT_CPU``);
the daemon adds a wall-clock deadline and kills the child past it. A call that runs out of its memory answers
``decode-limit`` and the child exits afterwards, since a library that failed an allocation half way may be left in
any state; the daemon starts another.

Replies are JSON with the large parts (pixels, metadata blocks, encoded previews) in a sealed memfd
(:mod:`daemon.sandbox.wire`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

# Before numpy and OpenCV load: one thread each. A child is one decode at a time; the daemon runs several children.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from daemon.errors import (  # noqa: E402
    BadSidecarError,
    DecodeError,
    EmptyFileError,
    FileTooLongError,
    ImageTooLargeError,
    InputChangedError,
    UnreadableFileError,
)
from daemon.fsops import read_at_most  # noqa: E402
from daemon.imageio import Decoded, assemble  # noqa: E402
from daemon.media import decode as dec  # noqa: E402
from daemon.media import formats  # noqa: E402
from daemon.media import metadata as md  # noqa: E402
from daemon.protocol import modcrop, quantise  # noqa: E402
from daemon.sandbox import confine, wire  # noqa: E402
from models.errors import UnsupportedImageError, UpscaledError  # noqa: E402
from models.resize import resize  # noqa: E402

MIB = 1 << 20
SLACK = 96 * MIB  # on top of every budget: the interpreter's own allocations during a call
READ_CHUNK = 8 * MIB
# Bytes per pixel of the widest layout each format can decode to (16-bit RGBA; 8-bit RGBA for the 8-bit formats).
_WIDEST = {"png": 8, "tiff": 8, "heic": 8, "avif": 8, "jxl": 8, "jpg": 4, "webp": 4, "gif": 4, "bmp": 4}
# Copies of the pixels a decode holds at its peak: the decoder's buffer, numpy's copy of it, the payload.
_COPIES = 3

_KINDS = {
    DecodeError: "decode",
    EmptyFileError: "empty-file",
    ImageTooLargeError: "too-large",
    UnsupportedImageError: "unsupported",
    InputChangedError: "input-changed",
    UnreadableFileError: "unreadable",
    BadSidecarError: "bad-sidecar",
}


class Child:
    """The request loop and the budget of one call."""

    def __init__(self, sock: socket.socket, hard_memory: int, hard_cpu: int, recycle_calls: int = 5000) -> None:
        self.sock = sock
        self.recycle_calls = recycle_calls  # a long-lived child is replaced now and then: no fragmentation builds up
        self.hard_memory = hard_memory
        self.hard_cpu = hard_cpu
        self.statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)  # read by fd after Landlock
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.budget = 0
        self.calls = 0

    # --- budgets ----------------------------------------------------------------------------------------------------
    def vm(self) -> int:
        """The address space in use now (what RLIMIT_AS counts)."""
        return int(os.pread(self.statm, 64, 0).split()[0]) * self.page

    def limit(self, budget: int, seconds: float) -> None:
        """This call may use ``budget`` more bytes of address space and ``seconds`` more CPU seconds."""
        self.budget = budget
        confine.set_call_limits(self.vm() + budget + SLACK, int(self.cpu_used() + seconds) + 2)

    def unlimit(self) -> None:
        """Back to the hard limits: the reply itself must not fail for want of memory."""
        confine.set_call_limits(self.hard_memory, self.hard_cpu)

    # --- the loop ---------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            got = wire.recv(self.sock)
            if got is None:
                return
            header, fds = got
            out_of_memory = False
            try:
                reply, payload = self.handle(header, fds)
            except MemoryError:
                reply, payload = self._error("decode-limit", self._budget_text()), None
                out_of_memory = True
            except UpscaledError as exc:
                reply, payload = self._error(_kind(exc), str(exc)), None
            except Exception as exc:  # a decoder's surprise: this file's problem, and the reply says what it was
                reply, payload = self._error("decode", f"the decoder failed: {type(exc).__name__}: {exc}"), None
            finally:
                self.unlimit()
                for fd in fds:
                    os.close(fd)
            self.calls += 1
            # A library that failed an allocation half way may be left in any state; a long life, fragmented.
            retire = out_of_memory or self.calls >= self.recycle_calls or self.cpu_used() > self.hard_cpu / 2
            if retire:
                reply["retire"] = True  # the daemon lets it go after this reply and starts another
            try:
                wire.send(self.sock, reply, [payload] if payload is not None else [])
            finally:
                if payload is not None:
                    os.close(payload)
            if retire:
                return

    @staticmethod
    def cpu_used() -> float:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_utime + use.ru_stime

    def _budget_text(self) -> str:
        return f"the decoder needed more than {_gib(self.budget)} (decode_memory_limit)"

    @staticmethod
    def _error(kind: str, message: str) -> dict[str, Any]:
        return {"ok": False, "kind": kind, "message": message[:2000]}

    def handle(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        op = req.get("op")
        handler: Callable[[dict[str, Any], list[int]], tuple[dict[str, Any], int | None]] | None = {
            "probe": self.op_probe,
            "decode": self.op_decode,
            "prepare": self.op_prepare,
            "text": self.op_text,
            "inspect": self.op_inspect,
            "render": self.op_render,
            "lr": self.op_lr,
            "ping": lambda r, f: ({"ok": True}, None),
        }.get(str(op))
        if handler is None:
            raise DecodeError(f"unknown sandbox operation {op!r}")
        return handler(req, fds)

    # --- reading the file -------------------------------------------------------------------------------------------
    def read(self, req: dict[str, Any], fds: list[int]) -> bytes:
        """The request's file: exactly ``size`` bytes from its descriptor (``size`` absent: all of it, up to
        ``max_bytes``). A file longer or shorter than that changed since it was registered."""
        if not fds:
            raise DecodeError("no file was passed")
        fd = fds[0]
        size = req.get("size")
        cap = int(size) if size is not None else int(req.get("max_bytes", 2 << 30))
        self.limit(cap + 2 * READ_CHUNK, float(req.get("seconds", 30)))
        name = str(req.get("name", "the file"))
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            data = read_at_most(fd, cap, name)
        except FileTooLongError:
            if size is None:
                raise ImageTooLargeError(f"{name} is over the {cap} bytes read for it") from None
            raise InputChangedError(
                f"{name} changed size after it was registered ({size} bytes then, more now); "
                "the new content is a job of its own"
            ) from None
        if size is not None and len(data) != size:
            raise InputChangedError(
                f"{name} changed size after it was registered ({size} bytes then, fewer now); "
                "the new content is a job of its own"
            )
        if not data:
            raise EmptyFileError(f"{name} is empty (0 bytes)")
        return data

    def header_budget(self, data: bytes, req: dict[str, Any]) -> dec.Probe:
        """The header, read under a budget of the file's size (HEIC and AVIF readers hold the whole file), then
        the budget for decoding what it declares: every frame at the format's widest layout, a few copies."""
        seconds = float(req.get("seconds", 30))
        self.limit(2 * len(data) + 64 * MIB, seconds)
        p = dec.probe(io.BytesIO(data), int(req["max_pixels"]), int(req["max_frames"]), str(req.get("name", "")))
        pixels = p.width * p.height * max(1, p.frames)
        self.limit(len(data) + _COPIES * pixels * _WIDEST.get(p.format, 8), seconds)
        return p

    # --- operations -------------------------------------------------------------------------------------------------
    def op_probe(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        """The header only: format, size, frames. Reads what the header needs (HEIC/AVIF: the whole file)."""
        if not fds:
            raise DecodeError("no file was passed")
        size = int(req["size"])
        self.limit(2 * size + 64 * MIB, float(req.get("seconds", 30)))
        with os.fdopen(os.dup(fds[0]), "rb") as fh:
            p = dec.probe(fh, int(req["max_pixels"]), int(req["max_frames"]), str(req.get("name", "")))
        probe = {"format": p.format, "width": p.width, "height": p.height, "frames": p.frames, "animated": p.animated}
        return {"ok": True, "probe": probe}, None

    def op_decode(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        """Every frame, the metadata, and the sha256 of exactly the bytes decoded."""
        data = self.read(req, fds)
        sha = hashlib.sha256(data).hexdigest()
        self.header_budget(data, req)
        d = dec.decode_bytes(data, int(req["max_pixels"]), int(req["max_frames"]), name=str(req.get("name", "")))
        del data
        frames = [d.first, *d.rest()]
        payload, reply = _pack_decoded(d, frames)
        reply["sha256"] = sha
        return reply, payload

    def op_prepare(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        """A decoded file's metadata fitted to one output (format, size, policy): EXIF and XMP are parsed here."""
        blocks = wire.Payload(fds[0]) if fds else None
        sizes = sum(int(v[1]) for v in req.get("meta", {}).values() if isinstance(v, list))
        self.limit(16 * sizes + 64 * MIB, float(req.get("seconds", 30)))
        meta = _meta_from(req.get("meta", {}), blocks)
        w, h = (int(v) for v in req["size"])
        prep, notes = md.prepare(meta, str(req["policy"]), str(req["fmt"]), (w, h))
        parts = {"icc": prep.icc, "exif": prep.exif, "xmp": prep.xmp}
        iptc = json.dumps(prep.iptc).encode() if prep.iptc else None
        writer = wire.PayloadWriter(wire.payload_size([len(b or b"") for b in [*parts.values(), iptc]]))
        out: dict[str, Any] = {k: writer.put(v).as_json() for k, v in parts.items() if v}
        if iptc:
            out["iptc"] = writer.put(iptc).as_json()
        return {"ok": True, "prepared": out, "notes": notes}, writer.seal()

    def op_text(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        """A sidecar prompt: UTF-8 text (a BOM dropped), stripped, at most ``limit`` bytes."""
        limit = int(req["limit"])
        name = str(req.get("name", "the prompt file"))
        if not fds:
            raise DecodeError("no file was passed")
        self.limit(4 * limit + 16 * MIB, 5.0)
        data = os.pread(fds[0], limit + 1, 0)
        if len(data) > limit:
            raise BadSidecarError(f"the prompt file {name} is over {limit} bytes; a prompt is a line of text")
        try:
            text = data.decode("utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            raise BadSidecarError(
                f"the prompt file {name} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        return {"ok": True, "text": text}, None

    # --- the web view's previews ------------------------------------------------------------------------------------
    def web_header(self, req: dict[str, Any], fds: list[int]) -> tuple[Image.Image, bytes, int]:
        """The file's header (Pillow's view, no pixels), its first bytes, and its size, under a small budget; a file
        far larger than its pixels can need is refused before the rest of it is read (a sparse gigabyte behind a
        valid header, in failed/)."""
        if not fds:
            raise DecodeError("no file was passed")
        name = str(req.get("name", ""))
        size = os.fstat(fds[0]).st_size
        self.limit(2 * min(size, int(req["max_bytes"])) + 64 * MIB, float(req.get("seconds", 30)))
        with os.fdopen(os.dup(fds[0]), "rb") as fh:
            im = _web_open(fh, name, int(req["max_pixels"]))
            head = os.pread(fds[0], 64, 0)
        w, h = im.size
        frames = int(getattr(im, "n_frames", 1) or 1)
        need = w * h * frames * 8 + 64 * MIB  # as the daemon's intake: raw 16-bit RGBA and room for metadata
        if size > need:
            raise ImageTooLargeError(f"{name} is {size} bytes, far more than a {w}x{h} image can need ({need})")
        return im, head, size

    def web_image(self, req: dict[str, Any], fds: list[int]) -> tuple[Image.Image, bytes]:
        """The header checked (:meth:`web_header`), then the whole file, under a budget for decoding it."""
        _, _, size = self.web_header(req, fds)
        data = self.read(dict(req, size=size), fds)
        im = _web_open(io.BytesIO(data), str(req.get("name", "")), int(req["max_pixels"]))
        w, h = im.size
        self.limit(len(data) + _COPIES * w * h * 8, float(req.get("seconds", 30)))
        return im, data

    def op_inspect(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        """What the job page shows about an image: its upright size, its format, whether the browser gets it as
        it is; ``verify`` decodes it too (a failed job's input is often truncated)."""
        if req.get("verify"):
            im, data = self.web_image(req, fds)
            _to_8bit(im, data, str(req.get("name", "")), 160, int(req["float_max_pixels"]))
        else:
            im, data, _ = self.web_header(req, fds)
        w, h = _upright_size(im)
        shown = _shown_as_is(im, data)
        return {"ok": True, "width": w, "height": h, "format": im.format or "", "as_is": shown}, None

    def op_render(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        """The image upright, at 8 bits, at most ``side`` pixels on its long side, as PNG or WebP."""
        im, data = self.web_image(req, fds)
        out = _to_8bit(im, data, str(req.get("name", "")), int(req["side"]), int(req["float_max_pixels"]))
        return _blob_reply(_encode_preview(out, str(req["fmt"])))

    def op_lr(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        """The LR image a benchmark job fed its model, made again from its HR input, as a PNG."""
        data = self.read(req, fds)
        name = str(req.get("name", ""))
        self.header_budget(data, req)
        d = dec.decode_bytes(data, int(req["max_pixels"]), name=name)
        s = int(req["scale"])
        hr = modcrop(d.rgb, s)
        lr_size = (hr.shape[1] // s, hr.shape[0] // s)
        if min(lr_size) < 1:
            raise DecodeError(f"{name} is {d.width}x{d.height}, too small for x{s}")
        lr = quantise(resize(hr, lr_size, str(req["kernel"]), levels=65535 if d.bits == 16 else 255), d.bits)
        arr = assemble(lr, None, 8, d.grey)
        im = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
        return _blob_reply(_encode_preview(im, "png"))


# --- packing replies ------------------------------------------------------------------------------------------------
def _kind(exc: UpscaledError) -> str:
    for cls, kind in _KINDS.items():
        if isinstance(exc, cls):
            return kind
    return "decode"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MIB:.0f} MiB"


def _pack_decoded(d: Decoded, frames: list[dec.Frame]) -> tuple[int, dict[str, Any]]:
    meta = d.meta
    blocks = {"icc": meta.icc, "exif": meta.exif, "xmp": meta.xmp}
    iptc = json.dumps(meta.iptc).encode() if meta.iptc else None
    sizes = [f.pixels.nbytes for f in frames] + [len(b or b"") for b in [*blocks.values(), iptc]]
    writer = wire.PayloadWriter(wire.payload_size(sizes))
    out_frames = []
    for f in frames:
        px = np.ascontiguousarray(f.pixels)
        section = writer.reserve(px.nbytes)
        np.frombuffer(writer.view(section), px.dtype).reshape(px.shape)[...] = px
        out_frames.append(
            {
                "at": section.as_json(),
                "shape": list(px.shape),
                "dtype": px.dtype.str,
                "duration_ms": f.duration_ms,
                "disposal": f.disposal,
                "blend": f.blend,
            }
        )
    out_meta: dict[str, Any] = {k: writer.put(v).as_json() for k, v in blocks.items() if v}
    if iptc:
        out_meta["iptc"] = writer.put(iptc).as_json()
    if meta.captured:
        out_meta["captured"] = meta.captured[:64]
    reply = {
        "ok": True,
        "format": d.format,
        "mode": d.mode,
        "frames": out_frames,
        "frame_count": d.frames,
        "loop": d.loop,
        "notes": [str(n)[:500] for n in d.notes[:20]],
        "meta": out_meta,
    }
    return writer.seal(), reply


def _meta_from(blocks: dict[str, Any], payload: wire.Payload | None) -> md.Metadata:
    meta = md.Metadata()
    if payload is not None:
        for key in ("icc", "exif", "xmp"):
            if key in blocks:
                setattr(meta, key, payload.bytes(payload.section(blocks[key], key)))
        if "iptc" in blocks:
            meta.iptc = json.loads(payload.bytes(payload.section(blocks["iptc"], "iptc")))
    if isinstance(blocks.get("captured"), str):
        meta.captured = blocks["captured"]
    return meta


def _blob_reply(data: bytes) -> tuple[dict[str, Any], int]:
    writer = wire.PayloadWriter(len(data))
    section = writer.put(data)
    return {"ok": True, "data": section.as_json()}, writer.seal()


# --- the web view's decoding ----------------------------------------------------------------------------------------
_BROWSER = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
_BROWSER_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}


def _web_open(fh: Any, name: str, max_pixels: int) -> Image.Image:
    formats.register_plugins()
    try:
        im = Image.open(fh)
    except Exception:  # never the first bytes: they would go to a browser (a row naming /etc/passwd)
        raise DecodeError(f"{name} is not an image (no known image format)") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h}, over the {max_pixels} pixels the web view previews")
    return im


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def _deep(im: Image.Image, data: bytes) -> bool:
    """More than 8 bits per sample (Pillow opens a 16-bit RGB PNG or TIFF as mode RGB, so the mode does not say)."""
    if im.mode.startswith("I") or im.mode == "F":
        return True
    if im.format == "PNG":
        return _png_bit_depth(data) > 8
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258, 8)
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def _shown_as_is(im: Image.Image, data: bytes) -> bool:
    return im.format in _BROWSER and im.mode in _BROWSER_MODES and not _deep(im, data)


def _upright_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    try:
        turned = int(im.getexif().get(0x0112, 1) or 1) in (5, 6, 7, 8)
    except Exception:  # a broken EXIF block: the decoder ignores it too
        turned = False
    return (h, w) if turned else (w, h)


def _to_8bit(im: Image.Image, data: bytes, name: str, side: int, float_max_pixels: int) -> Image.Image:
    try:
        if _deep(im, data):
            w, h = im.size
            if w * h > float_max_pixels:
                raise ImageTooLargeError(
                    f"{name} is {w}x{h} at 16 bits, over the {float_max_pixels} pixels the web view converts"
                )
            d = dec.decode_bytes(data, float_max_pixels, name=name)
            arr = assemble(d.rgb, d.alpha, 8, d.grey)
            out = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
        else:
            if im.format == "JPEG":
                im.draft("RGB", (side, side))  # the JPEG decoder scales by 1/2, 1/4, 1/8 for free
            im.load()
            out = ImageOps.exif_transpose(im)
            if out.mode not in ("L", "LA", "RGB", "RGBA"):
                has_alpha = "A" in out.mode or "transparency" in out.info
                out = out.convert("RGBA" if has_alpha else "RGB")
    except (UpscaledError, MemoryError):
        raise
    except Exception as exc:
        raise DecodeError(f"{name} is damaged or truncated: {exc}") from None
    if max(out.size) > side:
        out.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return out


def _encode_preview(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        im.save(buf, "WEBP", quality=80, method=4)
    else:
        im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# --- start-up -------------------------------------------------------------------------------------------------------
def warm_up() -> None:
    """Decode a tiny image of every format once, and run each metadata path: every module, codec library and
    encoding a call can reach is loaded now, before Landlock closes the filesystem."""
    formats.register_plugins()
    cv2.setNumThreads(1)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:5, 3:6] = 200
    exif = Image.Exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8769)[0x9003] = "2024:01:02 03:04:05"
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:ImageWidth="8"/></rdf:RDF></x:xmpmeta>'
    )
    samples: list[bytes] = []
    im = Image.fromarray(rgb)
    for fmt, params in (
        ("PNG", {"exif": exif.tobytes()}),
        ("JPEG", {"exif": exif.tobytes(), "xmp": xmp}),
        ("WEBP", {"xmp": xmp}),
        ("TIFF", {}),
        ("BMP", {}),
        ("GIF", {}),
        ("AVIF", {}),
        ("HEIF", {}),
        ("JXL", {}),
    ):
        buf = io.BytesIO()
        try:
            im.save(buf, fmt, **params)
        except (KeyError, OSError, ValueError):  # a codec that is not installed: its files are not read either
            continue
        samples.append(buf.getvalue())
    for frames_fmt in ("GIF", "WEBP", "PNG"):
        buf = io.BytesIO()
        im.save(buf, frames_fmt, save_all=True, append_images=[Image.fromarray(255 - rgb)], duration=[50, 50])
        samples.append(buf.getvalue())
    ok, enc = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint16))
    if ok:
        samples.append(enc.tobytes())
    jpeg = next(s for s in samples if s[:2] == b"\xff\xd8")
    samples.append(md.exiv2_write(jpeg, iptc={"Iptc.Application2.ObjectName": "warm-up"}))
    for data in samples:
        try:
            d = dec.decode_bytes(data, 1 << 20, name="warm-up")
            for _ in d.rest():
                pass
            md.prepare(d.meta, "keep", "png", (16, 16))
            md.prepare(d.meta, "basic", "jpg", (16, 16))
            web = _web_open(io.BytesIO(data), "warm-up", 1 << 20)
            _to_8bit(web, data, "warm-up", 4, 1 << 20)
        except UpscaledError:
            pass
    md.prepare(md.Metadata(xmp=xmp, iptc={"Iptc.Application2.ObjectName": "x"}), "keep", "tiff", (4, 4))
    _encode_preview(im, "webp")
    _encode_preview(im, "png")
    resize(np.zeros((8, 8, 3), np.float32), (4, 4), "matlab-bicubic", levels=255)
    for codec in ("latin-1", "utf-8-sig", "ascii", "utf-16"):
        "x".encode(codec).decode(codec)
    json.loads(json.dumps({"x": [1.5, "y"]}))
    hashlib.sha256(b"").hexdigest()


def main(argv: list[str]) -> int:
    fd, budget, hard_cpu, recycle = int(argv[1]), int(argv[2]), int(argv[3]), int(argv[6])
    use_landlock, use_seccomp = argv[4] == "1", argv[5] == "1"
    confine.die_with_parent()
    sock = socket.socket(fileno=fd)
    t0 = time.monotonic()
    warm_up()
    child = Child(sock, 0, hard_cpu, recycle)
    # The hard limit: what the warmed-up interpreter holds now, plus the largest budget one call may get.
    child.hard_memory = child.vm() + budget + SLACK
    got = confine.apply(child.hard_memory, hard_cpu, landlock=use_landlock, seccomp=use_seccomp)
    wire.send(
        sock,
        {
            "ready": True,
            "pid": os.getpid(),
            "confinement": got.describe(),
            "notes": got.notes,
            "vm": child.vm(),
            "start_seconds": round(time.monotonic() - t0, 3),
        },
    )
    try:
        child.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon went away
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
