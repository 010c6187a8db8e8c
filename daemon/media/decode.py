"""Decoding image files: the parser of bytes that someone else wrote.

The service runs this module only inside a sandbox child (:mod:`daemon.sandbox`), never in the daemon's own process:
the daemon never imports it (a test makes the import fail there, and every job still completes). Tools that decode
files their own user chose (``upscaled bench`` on a dataset, the tests) call it directly.

Decoding applies the EXIF orientation, keeps the colour profile and the other metadata (:mod:`daemon.media.metadata`),
alpha, 16-bit depth (known from the decoder's raw mode or dtype, never guessed from pixel values) and greyscale.
Pixels stay in their native integer type (uint8 or uint16). An animated GIF, WebP or APNG is one
:class:`~daemon.imageio.Frame` at a time: :attr:`Decoded.first`, then :meth:`Decoded.rest`, decoded one by one, each
checked to fit the canvas the header declared (a frame larger than its logical screen would otherwise be decoded at
its own size, past every pixel limit).

Readers: Pillow for everything, plus OpenCV for 16-bit colour PNG and TIFF (Pillow reads those as 8 bits),
pillow-heif's own reader for 10/12-bit HEIC (kept as 16 bits), and a reader of the JPEG XL size header (the JXL
plugin decodes the whole image just to open it).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from daemon.errors import DecodeError, EmptyFileError, ImageTooLargeError, UnreadableFileError
from daemon.imageio import ANIMATED_FORMATS, DEFAULT_MAX_FRAMES, Decoded, Frame, FrameSource, Probe
from daemon.media import formats
from daemon.media import metadata as md
from models.errors import UnsupportedImageError, UpscaledError

Image.MAX_IMAGE_PIXELS = None  # we check the pixel count ourselves, before decoding, with a configurable limit
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ORIENT = {  # EXIF orientation -> numpy transform of (H, W, C) that makes the image upright
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.swapaxes(a, 0, 1)[::-1],
}


# --- reading a file by path (tools only: the service passes descriptors) ---------------------------------------------
def read_no_follow(path: Path) -> bytes:
    """The file's bytes, refusing (ELOOP) to follow a symlink that replaced it, and anything but a regular file.

    ``O_NONBLOCK`` keeps a FIFO swapped in after a check from blocking the open; ``fstat`` then refuses it.

    Raises:
        OSError: as ``os.open`` raises it; ``EINVAL`` for something that is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return fh.read()


def decode(path: Path | str, max_pixels: int, max_frames: int = DEFAULT_MAX_FRAMES) -> Decoded:
    """Read ``path`` (never through a symlink) into a :class:`Decoded`.

    Raises:
        EmptyFileError, UnreadableFileError, DecodeError, ImageTooLargeError, UnsupportedImageError.
    """
    try:
        data = read_no_follow(Path(path))
    except PermissionError as exc:
        raise UnreadableFileError(f"cannot read {path}: permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsupportedImageError(f"{path} is a symbolic link; links are not followed") from None
        if exc.errno == errno.EINVAL:
            raise UnsupportedImageError(f"{path} is not a regular file") from None
        raise UnreadableFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_bytes(data, max_pixels, max_frames, name=str(path))


# --- JPEG XL: the size header, read without decoding ----------------------------------------------------------------
JXL_CODESTREAM = b"\xff\x0a"
JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


class _Bits:
    """JPEG XL's bit reader: least significant bit first."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u(self, n: int) -> int:
        value = 0
        for i in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise DecodeError("the JPEG XL size header is truncated")
            value |= ((self.data[byte] >> (self.pos & 7)) & 1) << i
            self.pos += 1
        return value

    def size(self) -> int:  # U32(1 + u(9), 1 + u(13), 1 + u(18), 1 + u(30))
        return 1 + self.u((9, 13, 18, 30)[self.u(2)])


def _jxl_codestream(data: bytes) -> bytes:
    """The start of the codestream: the file itself, or the first ``jxlc``/``jxlp`` box of the container."""
    if data.startswith(JXL_CODESTREAM):
        return data
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        head = 8
        if size == 1:
            size, head = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        if kind == b"jxlc":
            return data[pos + head : pos + head + 64]
        if kind == b"jxlp":
            return data[pos + head + 4 : pos + head + 4 + 64]
        if size < head:  # 0: "to the end of the file", and no codestream box came before it
            break
        pos += size
    raise DecodeError("the JPEG XL container has no codestream box")


def jxl_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG XL file's size header (ISO/IEC 18181-1, SizeHeader), without decoding it.

    Raises:
        DecodeError: no codestream, or a truncated header.
    """
    code = _jxl_codestream(data)
    if not code.startswith(JXL_CODESTREAM):
        raise DecodeError("the JPEG XL codestream does not start with its signature")
    bits = _Bits(code[2:])
    small = bits.u(1)
    height = (bits.u(5) + 1) * 8 if small else bits.size()
    ratio = bits.u(3)
    if ratio:
        num, den = _JXL_RATIOS[ratio]
        width = height * num // den
    else:
        width = (bits.u(5) + 1) * 8 if small else bits.size()
    return width, height


def _is_jxl(head: bytes) -> bool:
    return head.startswith(JXL_CODESTREAM) or head.startswith(JXL_CONTAINER)


# --- animations: every frame's rectangle, from the headers ---------------------------------------------------------
def gif_frames(data: bytes) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The logical screen (w, h) and each image's (left, top, width, height) of a GIF, from its blocks: nothing
    is decompressed (GIF89a: the logical screen descriptor, extension and image blocks, data sub-blocks).

    Raises:
        DecodeError: the blocks are truncated.
    """
    if len(data) < 13:
        raise DecodeError("the GIF is truncated in its header")
    screen = (int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little"))
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    frames = []

    def skip_sub_blocks(at: int) -> int:
        while at < len(data) and data[at]:
            at += data[at] + 1
        if at >= len(data):
            raise DecodeError("the GIF is truncated in a data block")
        return at + 1

    while pos < len(data):
        kind = data[pos]
        if kind == 0x3B:  # trailer
            break
        if kind == 0x21:  # extension: label, then sub-blocks
            pos = skip_sub_blocks(pos + 2)
        elif kind == 0x2C:  # image descriptor
            if pos + 10 > len(data):
                raise DecodeError("the GIF is truncated in an image descriptor")
            left, top, w, h = (int.from_bytes(data[pos + i : pos + i + 2], "little") for i in (1, 3, 5, 7))
            flags = data[pos + 9]
            frames.append((left, top, w, h))
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # local colours, LZW code size
            pos = skip_sub_blocks(pos)
        else:
            raise DecodeError(f"the GIF has an unknown block {kind:#04x} at byte {pos}")
    return screen, frames


def apng_frames(data: bytes) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The canvas (w, h) and each frame's (x, y, width, height) of an APNG, from its IHDR and fcTL chunks.

    Raises:
        DecodeError: the chunks are truncated.
    """
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DecodeError("the PNG is truncated in its header")
    canvas = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    frames, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if kind == b"fcTL" and length >= 20 and pos + 28 <= len(data):
            w, h, x, y = (int.from_bytes(data[pos + 12 + i : pos + 16 + i], "big") for i in (0, 4, 8, 12))
            frames.append((x, y, w, h))
        if kind == b"IEND":
            break
        pos += 12 + length
    return canvas, frames


def webp_frames(data: bytes) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The canvas (w, h) of an animated WebP (its VP8X chunk) and each ANMF frame's (x, y, width, height).

    Raises:
        DecodeError: the chunks are truncated, or there is no VP8X chunk.
    """
    if len(data) < 30 or data[12:16] != b"VP8X":
        raise DecodeError("the animated WebP has no VP8X header")
    canvas = (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    frames, pos = [], 12
    while pos + 8 <= len(data):
        kind, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if kind == b"ANMF" and pos + 20 <= len(data):
            x, y, w, h = (int.from_bytes(data[pos + 8 + i : pos + 11 + i], "little") for i in (0, 3, 6, 9))
            frames.append((2 * x, 2 * y, w + 1, h + 1))
        pos += 8 + length + (length & 1)
    return canvas, frames


def check_frames(data: bytes, fmt: str, name: str) -> None:
    """Every frame of an animated GIF, APNG or WebP lies inside the canvas its header declares: a decoder grows the
    canvas to a frame that does not (a 16x16 GIF with a 6000x6000 second frame), past every pixel limit.

    Raises:
        ImageTooLargeError: a frame outside the canvas.
    """
    screen, frames = {"gif": gif_frames, "png": apng_frames, "webp": webp_frames}[fmt](data)
    for i, (x, y, w, h) in enumerate(frames):
        if x + w > screen[0] or y + h > screen[1]:
            raise ImageTooLargeError(
                f"{name}: frame {i + 1} is {w}x{h} at ({x}, {y}), larger than the {screen[0]}x{screen[1]} canvas "
                "its header declares; every frame must fit the canvas"
            )


# --- opening and probing --------------------------------------------------------------------------------------------
def _open(fh: BinaryIO, name: str) -> Image.Image:
    formats.register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fh)
    except UnidentifiedImageError:
        fh.seek(0)
        head = fh.read(32)
        extra = formats.missing_input_codec(head)
        if extra is not None:
            raise UnsupportedImageError(
                f"{name} is a {'HEIC/HEIF' if extra == 'heif' else 'JPEG XL'} image; "
                f"reading it needs {formats.install_hint(extra)}"
            ) from None
        raise DecodeError(f"{name} is not an image (no known image format: {head[:8]!r}...)") from None
    except Exception as exc:  # Pillow raises many types on bad headers
        raise DecodeError(f"{name}: bad image header: {exc}") from None


def _check_pixels(w: int, h: int, frames: int, max_pixels: int, name: str) -> None:
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h} = {w * h} pixels, over the max_pixels limit of {max_pixels}")
    if w * h * frames > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {frames} frames of {w}x{h} = {w * h * frames} pixels, over the "
            f"max_pixels limit of {max_pixels} (all frames count)"
        )


def _probe_open(im: Image.Image, max_pixels: int, max_frames: int, name: str) -> Probe:
    """Check an open image's header against the limits."""
    w, h = im.size
    if w == 0 or h == 0:
        raise DecodeError(f"{name} has no pixels ({w}x{h})")
    pil = (im.format or "").upper()
    ours = formats.PIL_TO_OURS.get(pil)
    if ours is None:
        raise UnsupportedImageError(
            f"{name}: format {im.format} is not supported (png, jpeg, webp, tiff, bmp, gif, heic, avif, jxl)"
        )
    _check_pixels(w, h, 1, max_pixels, name)
    animated = ours in ANIMATED_FORMATS and bool(getattr(im, "is_animated", False))
    frames = 1
    if animated:
        try:
            frames = int(getattr(im, "n_frames", 1))  # header walk: GIF frames are skipped, not decoded
        except Exception as exc:
            raise DecodeError(f"{name} is damaged or truncated: {exc}") from None
        if frames > max_frames:
            raise ImageTooLargeError(
                f"{name} is an animation of {frames} frames, over the max_frames limit of {max_frames}"
            )
        if im.size != (w, h):  # the walk met a frame that does not fit the logical screen: Pillow grew the canvas
            raise ImageTooLargeError(
                f"{name}: a frame is larger than the {w}x{h} canvas its header declares "
                f"({im.size[0]}x{im.size[1]}); every frame must fit the canvas"
            )
        _check_pixels(w, h, frames, max_pixels, name)
    fmt = "png" if ours == "bmp" or (ours == "gif" and not animated) else ours
    return Probe(format=fmt, width=w, height=h, frames=frames, animated=animated)


def probe(fh: BinaryIO, max_pixels: int, max_frames: int = DEFAULT_MAX_FRAMES, name: str = "") -> Probe:
    """The format, size and frame count of the image in ``fh``, from its header (no pixel is decoded).

    ``fh`` holds the whole file (Pillow reads it from its start); it is left open. A JPEG XL file's size is read
    from its size header, since its plugin decodes the whole image to open it.

    Raises:
        DecodeError: not an image, or a damaged header.
        UnsupportedImageError: an image format we do not read (or whose extra is not installed: the message says
            which to install).
        ImageTooLargeError: over ``max_pixels`` (all frames count, every frame inside the declared canvas) or
            ``max_frames``.
    """
    name = name or getattr(fh, "name", "<stream>")
    head = fh.read(4096)
    fh.seek(0)
    if _is_jxl(head):
        if "jxl" in formats.register_plugins():
            raise UnsupportedImageError(f"{name} is a JPEG XL image; reading it needs {formats.install_hint('jxl')}")
        w, h = jxl_size(head)
        _check_pixels(w, h, 1, max_pixels, str(name))
        return Probe(format="jxl", width=w, height=h, frames=1, animated=False)
    im = _open(fh, str(name))
    p = _probe_open(im, max_pixels, max_frames, str(name))
    if p.animated:
        fh.seek(0)
        check_frames(fh.read(), p.format, str(name))
    return p


# --- decoding -------------------------------------------------------------------------------------------------------
def decode_bytes(data: bytes, max_pixels: int, max_frames: int = DEFAULT_MAX_FRAMES, name: str = "<bytes>") -> Decoded:
    """Decode an image file's bytes: its first frame now, the other frames on demand (:meth:`Decoded.rest`).

    Raises:
        EmptyFileError: no bytes.
        DecodeError: not an image, or damaged or truncated.
        UnsupportedImageError: a format, mode or sample type we do not read.
        ImageTooLargeError: over ``max_pixels`` (all frames count) or ``max_frames``, or a frame outside its canvas.
    """
    if not data:
        raise EmptyFileError(f"{name} is empty (0 bytes)")
    if _is_jxl(data[:4096]):  # the limits first, from the size header: the plugin decodes as it opens
        probe(io.BytesIO(data[:4096]), max_pixels, max_frames, name)
    im = _open(io.BytesIO(data), name)
    p = _probe_open(im, max_pixels, max_frames, name)
    if p.animated:
        check_frames(data, p.format, name)
    # Read the raw mode before anything (getexif on a PNG, for one) loads the pixels and clears the tiles.
    tile = getattr(im, "tile", None)  # an ImageFile's, before it loads
    rawmode = tile[0].args if tile else ""
    rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    meta, orientation = md.read(im, p.format, data)
    notes = list(meta.notes)
    meta.notes = []
    mode = im.mode
    if p.animated:
        source = _FrameSource(im, name, orientation, alpha=_animation_has_alpha(im))
        first = source.frame(0)
        if isinstance(rawmode, str) and ";16" in rawmode:
            notes.append("the 16-bit animated PNG is decoded at 8 bits (Pillow's APNG reader)")
        loop = im.info.get("loop")
        return Decoded(
            first=first,
            format=p.format,
            meta=meta,
            mode=mode,
            frames=p.frames,
            loop=None if loop is None else int(loop),
            notes=notes,
            _source=source,
        )
    try:
        if p.format in ("png", "tiff") and im.mode in ("RGB", "RGBA") and isinstance(rawmode, str) and ";16" in rawmode:
            arr = _decode_16bit_colour(data, name)
            mode = im.mode + ";16"
        elif p.format == "heic" and int(im.info.get("bit_depth", 8) or 8) > 8:
            arr, mode = _decode_deep_heif(data)
        else:
            im.load()
            arr, mode = _pil_to_array(im)
    except (UpscaledError, MemoryError):
        raise
    except Exception as exc:
        raise DecodeError(f"{name} is damaged or truncated: {exc}") from None
    if orientation in _ORIENT:
        arr = np.ascontiguousarray(_ORIENT[orientation](arr))
    n = getattr(im, "n_frames", 1)
    if n > 1:
        what = "page" if p.format == "tiff" else "frame"
        notes.append(f"the input has {n} {what}s; only the first {what} was upscaled")
    return Decoded(first=Frame(arr), format=p.format, meta=meta, mode=mode, frames=1, notes=notes)


def _decode_16bit_colour(data: bytes, name: str) -> np.ndarray:
    """Pillow reads 16-bit RGB(A) PNG/TIFF as 8 bits; OpenCV keeps all 16."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise DecodeError(f"{name} is damaged or truncated (16-bit decode failed)")
    if arr.ndim == 2:
        return arr[:, :, None]
    code = cv2.COLOR_BGR2RGB if arr.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
    return cv2.cvtColor(arr, code)


def _decode_deep_heif(data: bytes) -> tuple[np.ndarray, str]:
    """A 10/12-bit HEIC as 16-bit samples (Pillow's plugin would reduce it to 8 bits)."""
    import pillow_heif

    heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False)
    arr = np.asarray(heif)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr), heif.mode


def _pil_to_array(im: Image.Image) -> tuple[np.ndarray, str]:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.uint16)[:, :, None].copy(), mode
    if mode == "I":  # 32-bit integer: some decoders give 16-bit grey this way
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise UnsupportedImageError(f"32-bit integer samples outside 0..65535 are not supported (mode {mode})")
        return a.astype(np.uint16)[:, :, None], mode
    if mode == "F":
        raise UnsupportedImageError("floating-point images (mode F) are not supported; convert to 16-bit first")
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"))[:, :, None].copy(), mode
    if mode in ("LA", "La"):
        return np.asarray(im.convert("LA")).copy(), mode
    if mode in ("P", "PA"):
        has_alpha = "transparency" in im.info or mode == "PA"
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB")).copy(), mode
    if mode in ("RGB", "RGBA"):
        return np.asarray(im).copy(), mode
    if mode in ("RGBa", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return np.asarray(im.convert("RGBA" if mode == "RGBa" else "RGB")).copy(), mode
    raise UnsupportedImageError(f"image mode {mode!r} is not supported")


def _animation_has_alpha(im: Image.Image) -> bool:
    """Whether the animation's frames carry alpha; decided on the first frame so that every frame has the same
    layout (a GIF's later frames come back RGBA only when they use transparency)."""
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


class _FrameSource(FrameSource):
    """The open animation; decodes frame ``i`` when asked (Pillow composes each over the previous ones). Every
    frame must keep the canvas size the header declared."""

    def __init__(self, im: Image.Image, name: str, orientation: int, alpha: bool) -> None:
        self.im, self.name, self.orientation, self.alpha = im, name, orientation, alpha
        self.size = im.size

    def frame(self, index: int) -> Frame:
        im = self.im
        try:
            im.seek(index)
            if im.size != self.size:  # before load(): never decode a frame larger than the canvas
                raise ImageTooLargeError(
                    f"{self.name}: frame {index + 1} is {im.size[0]}x{im.size[1]}, larger than the "
                    f"{self.size[0]}x{self.size[1]} canvas its header declares"
                )
            im.load()
            info = dict(im.info)
            # GIF: graphic control disposal; APNG: dispose_op (Pillow's info "disposal") and blend_op.
            disposal = int(getattr(im, "disposal_method", info.get("disposal", 0)) or 0)
            blend = int(info.get("blend", 0) or 0)
            arr = np.asarray(im.convert("RGBA" if self.alpha else "RGB"))
        except EOFError:
            raise DecodeError(f"{self.name}: frame {index + 1} is missing (the file is truncated)") from None
        except (UpscaledError, MemoryError):
            raise
        except Exception as exc:
            raise DecodeError(f"{self.name}: frame {index + 1} is damaged or truncated: {exc}") from None
        if self.orientation in _ORIENT:
            arr = _ORIENT[self.orientation](arr)
        return Frame(
            np.ascontiguousarray(arr),
            duration_ms=int(round(float(info.get("duration", 0) or 0))),
            disposal=disposal,
            blend=blend,
        )

    def frames(self, start: int, stop: int) -> Iterator[Frame]:
        for i in range(start, stop):
            yield self.frame(i)
