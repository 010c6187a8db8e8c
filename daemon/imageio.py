"""Decoding and encoding images without losing what the user cares about.

Decode applies the EXIF orientation, keeps the ICC profile, keeps alpha, keeps 16-bit depth (known from the
decoder's raw mode or dtype, never guessed from pixel values) and keeps greyscale. Pixels come out as float32 in
[0, 1]; :class:`Decoded` remembers how to put them back.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from daemon.errors import DecodeError, EmptyFileError, ImageTooLargeError, UnreadableFileError
from models.errors import UnsupportedImageError, UpscaledError

Image.MAX_IMAGE_PIXELS = None  # we check the pixel count ourselves, before decoding, with a configurable limit
ImageFile.LOAD_TRUNCATED_IMAGES = False

EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp", "tiff": "tiff", "tif": "tiff",
              "bmp": "png", "gif": "png"}
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF"}
_ORIENT = {  # EXIF orientation -> numpy transform of (H, W, C) that makes the image upright
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.swapaxes(a, 0, 1)[::-1],
}


@dataclass
class Decoded:
    rgb: np.ndarray  # float32 (H, W, 3) in [0, 1], upright
    alpha: np.ndarray | None  # float32 (H, W) in [0, 1], or None
    bits: int  # 8 or 16
    grey: bool  # the source had one colour channel
    format: str  # png, jpg, webp, tiff: the format we would write back by default
    icc: bytes | None = None
    exif: bytes | None = None  # with the orientation reset to 1
    mode: str = ""  # the decoder's mode, for the job row
    notes: list[str] = field(default_factory=list)  # what a person should know (first frame of an animation, ...)

    @property
    def width(self) -> int:
        return self.rgb.shape[1]

    @property
    def height(self) -> int:
        return self.rgb.shape[0]


def _to_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    raise UnsupportedImageError(f"expected 8- or 16-bit samples, got {a.dtype}")


def read_no_follow(path: Path) -> bytes:
    """The file's bytes, refusing (ELOOP) to follow a symlink that replaced it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def decode(path: Path, max_pixels: int) -> Decoded:
    """Read ``path`` into a :class:`Decoded`.

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
        raise UnreadableFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not data:
        raise EmptyFileError(f"{path} is empty (0 bytes)")
    return decode_bytes(data, max_pixels, name=str(path))


def decode_bytes(data: bytes, max_pixels: int, name: str = "<bytes>") -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"{name} is not an image (no known image format: {data[:8]!r}...)") from None
    except Exception as exc:  # Pillow raises many types on bad headers
        raise DecodeError(f"{name}: bad image header: {exc}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h} = {w * h} pixels, over the max_pixels limit of {max_pixels}")
    if w == 0 or h == 0:
        raise DecodeError(f"{name} has no pixels ({w}x{h})")
    fmt = EXTENSIONS.get((im.format or "").lower())
    if fmt is None:
        raise UnsupportedImageError(f"{name}: format {im.format} is not supported (png, jpeg, webp, tiff, bmp, gif)")
    # Read the raw mode before anything (getexif on a PNG, for one) loads the pixels and clears the tiles.
    rawmode = im.tile[0].args if im.tile else ""
    rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    icc = im.info.get("icc_profile") or None
    orientation = 1
    exif_bytes = None
    try:
        exif = im.getexif()
        orientation = int(exif.get(0x0112, 1) or 1)
        if exif:
            exif[0x0112] = 1
            exif_bytes = exif.tobytes()
    except Exception:  # a broken EXIF block must not fail the image
        orientation, exif_bytes = 1, None
    try:
        if im.mode in ("RGB", "RGBA") and isinstance(rawmode, str) and ";16" in rawmode:
            arr = _decode_16bit_colour(data, name)
            mode = im.mode + ";16"
        else:
            im.load()
            arr, mode = _pil_to_array(im)
    except UpscaledError:
        raise
    except Exception as exc:
        raise DecodeError(f"{name} is damaged or truncated: {exc}") from None
    if orientation in _ORIENT:
        arr = np.ascontiguousarray(_ORIENT[orientation](arr))
    grey = arr.shape[2] in (1, 2)
    has_alpha = arr.shape[2] in (2, 4)
    bits = 16 if arr.dtype == np.uint16 else 8
    f = _to_float(arr)
    colour = f[:, :, :1] if grey else f[:, :, :3]
    rgb = np.repeat(colour, 3, axis=2) if grey else colour
    alpha = f[:, :, -1] if has_alpha else None
    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        what = "page" if fmt == "tiff" else "frame"
        notes.append(f"the input has {frames} {what}s; only the first {what} was upscaled")
    return Decoded(rgb=np.ascontiguousarray(rgb), alpha=alpha, bits=bits, grey=grey, format=fmt, icc=icc,
                   exif=exif_bytes, mode=mode, notes=notes)


def _decode_16bit_colour(data: bytes, name: str) -> np.ndarray:
    """Pillow reads 16-bit RGB(A) PNG/TIFF as 8 bits; OpenCV keeps all 16."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise DecodeError(f"{name} is damaged or truncated (16-bit decode failed)")
    if arr.ndim == 2:
        return arr[:, :, None]
    order = [2, 1, 0, 3][: arr.shape[2]]
    return np.ascontiguousarray(arr[:, :, order])


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
    if mode == "LA" or mode == "La":
        return np.asarray(im.convert("LA")).copy(), mode
    if mode in ("P", "PA"):
        has_alpha = "transparency" in im.info or mode == "PA"
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB")).copy(), mode
    if mode in ("RGB", "RGBA"):
        return np.asarray(im).copy(), mode
    if mode in ("RGBa", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return np.asarray(im.convert("RGBA" if mode == "RGBa" else "RGB")).copy(), mode
    raise UnsupportedImageError(f"image mode {mode!r} is not supported")


def to_output_array(rgb: np.ndarray, alpha: np.ndarray | None, bits: int, grey: bool) -> np.ndarray:
    """Quantise float pixels to the output's integer type: (H, W, C) with C in 1, 2, 3, 4."""
    if grey:
        # The model ran on three equal channels; its output channels may drift apart slightly. BT.601 luma
        # brings them back to one.
        colour = (rgb @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
    else:
        colour = rgb
    peak = 65535.0 if bits == 16 else 255.0
    planes = [colour[:, :, c] for c in range(colour.shape[2])] + ([] if alpha is None else [alpha])
    out = np.empty(colour.shape[:2] + (len(planes),), np.uint16 if bits == 16 else np.uint8)
    for c, plane in enumerate(planes):  # one plane at a time: a full float copy of a large output is GBs
        scaled = plane * np.float32(peak)
        np.rint(scaled, out=scaled)
        np.clip(scaled, 0, peak, out=scaled)
        out[:, :, c] = scaled
    return out


def encode(arr: np.ndarray, fmt: str, quality: int = 95, icc: bytes | None = None,
           exif: bytes | None = None, compression: int = 6) -> tuple[bytes, list[str]]:
    """Encode an integer array from :func:`to_output_array` as ``fmt``. Returns (bytes, warnings)."""
    notes: list[str] = []
    chans = arr.shape[2]
    if fmt in ("jpg", "webp") and arr.dtype == np.uint16:
        notes.append(f"{fmt} holds 8 bits per sample; the 16-bit result was reduced to 8 bits")
        arr = np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    if fmt == "jpg" and chans in (2, 4):
        notes.append("jpg has no alpha channel; the image was flattened onto white")
        a = arr[:, :, -1:].astype(np.float32) / 255.0
        arr = np.rint(arr[:, :, :-1] * a + 255.0 * (1 - a)).astype(np.uint8)
        chans -= 1
    if arr.dtype == np.uint16 and chans >= 3:
        return _encode_16bit_colour(arr, fmt, icc, compression), notes
    if arr.dtype == np.uint16:  # 16-bit grey (alpha, if any, is dropped: Pillow has no 16-bit LA)
        if chans == 2:
            notes.append("16-bit grey with alpha is written without its alpha channel")
        im = Image.fromarray(np.ascontiguousarray(arr[:, :, 0]))  # uint16 -> mode I;16
    else:
        im = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if chans == 1 else arr))  # L, LA, RGB or RGBA
    params: dict = {}
    if icc:
        params["icc_profile"] = icc
    if exif and fmt in ("jpg", "webp", "png", "tiff"):
        params["exif"] = exif
    if fmt in ("jpg", "webp"):
        params["quality"] = quality
    if fmt == "webp" and quality >= 100:
        params["lossless"] = True  # quality 100 means "keep every pixel" for webp
    if fmt == "png":
        params["compress_level"] = compression
    if fmt == "tiff":
        params["compression"] = "tiff_deflate"
    buf = io.BytesIO()
    try:
        im.save(buf, format=_PIL_FORMAT[fmt], **params)
    except (OSError, ValueError):
        if "exif" not in params:
            raise
        params.pop("exif")  # an EXIF block the encoder rejects is dropped rather than failing the job
        notes.append("the EXIF block could not be written and was dropped")
        buf = io.BytesIO()
        im.save(buf, format=_PIL_FORMAT[fmt], **params)
    return buf.getvalue(), notes


def _encode_16bit_colour(arr: np.ndarray, fmt: str, icc: bytes | None, compression: int = 6) -> bytes:
    order = [2, 1, 0, 3][: arr.shape[2]]
    bgr = np.ascontiguousarray(arr[:, :, order])
    if fmt == "tiff":
        import tifffile

        buf = io.BytesIO()
        extratags = [(34675, "B", len(icc), icc, True)] if icc else []
        tifffile.imwrite(buf, arr, photometric="rgb", compression="zlib", compressionargs={"level": compression},
                         extratags=extratags)
        return buf.getvalue()
    ok, png = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:  # pragma: no cover - OpenCV's PNG encoder does not fail on valid arrays
        raise DecodeError("OpenCV could not encode the 16-bit PNG")
    data = png.tobytes()
    return _png_insert_icc(data, icc) if icc else data


def _png_insert_icc(png: bytes, icc: bytes) -> bytes:
    """Insert an iCCP chunk right after IHDR (OpenCV cannot write colour profiles)."""
    body = b"icc\x00\x00" + zlib.compress(icc)
    chunk = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


@dataclass(frozen=True)
class Probe:
    format: str
    width: int
    height: int
    frames: int = 1
    animated: bool = False


def probe(fh, max_pixels: int, max_frames: int, name: str = "") -> Probe:  # noqa: ANN001 - a binary file
    """What the header says, without decoding pixels.

    Raises:
        DecodeError: not an image. UnsupportedImageError: a format we do not read. ImageTooLargeError: over
        ``max_pixels`` (all frames) or ``max_frames``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except UnidentifiedImageError:
        raise DecodeError(f"{name} is not an image (no known image format)") from None
    except Exception as exc:  # Pillow raises many types on bad headers
        raise DecodeError(f"{name}: bad image header: {exc}") from None
    fmt = EXTENSIONS.get((im.format or "").lower())
    if fmt is None:
        raise UnsupportedImageError(f"{name}: format {im.format} is not supported")
    w, h = im.size
    frames = getattr(im, "n_frames", 1)
    if frames > max_frames:
        raise ImageTooLargeError(f"{name} has {frames} frames, over the max_frames limit of {max_frames}")
    if w * h * frames > max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h} x {frames} frame(s) = {w * h * frames} pixels, over the "
                                 f"max_pixels limit of {max_pixels}")
    if w == 0 or h == 0:
        raise DecodeError(f"{name} has no pixels ({w}x{h})")
    return Probe(fmt, w, h, frames, frames > 1)


# --- interim adapter: the API of the media layer (replaced by the media branch) ------------------------------------
@dataclass
class Metadata:
    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    iptc: bytes | None = None
    captured: str | None = None


@dataclass
class Frame:
    pixels: np.ndarray
    duration_ms: int = 0
    disposal: int = 0


def _native(d: Decoded) -> np.ndarray:
    peak = 65535.0 if d.bits == 16 else 255.0
    dtype = np.uint16 if d.bits == 16 else np.uint8
    colour = d.rgb[:, :, :1] if d.grey else d.rgb
    planes = [colour] + ([] if d.alpha is None else [d.alpha[:, :, None]])
    return np.rint(np.concatenate(planes, axis=2) * peak).astype(dtype)


Decoded.first = property(lambda self: Frame(_native(self)))  # type: ignore[attr-defined]
Decoded.meta = property(lambda self: Metadata(self.icc, self.exif))  # type: ignore[attr-defined]
Decoded.frames = 1  # type: ignore[attr-defined]
Decoded.loop = None  # type: ignore[attr-defined]
Decoded.rest = lambda self: iter(())  # type: ignore[attr-defined]


def assemble(colour: np.ndarray, alpha: np.ndarray | None, bits: int, grey: bool) -> np.ndarray:
    if colour.dtype == np.uint8:
        c = colour.astype(np.float32) / 255.0
        a = None if alpha is None else alpha.astype(np.float32) / 255.0
    else:
        c, a = colour, alpha
    return to_output_array(c, a, bits, grey)


_old_encode = encode


def encode(arr, fmt, quality=95, icc=None, exif=None, compression=6, *, meta=None, policy="keep"):  # type: ignore[no-redef]  # noqa: ANN001, ANN201
    if meta is not None:
        icc, exif = meta.icc, meta.exif
    return _old_encode(arr, fmt, quality, icc, exif, compression)


def encode_animation(frames, fmt, **kw):  # noqa: ANN001, ANN003, ANN201
    raise NotImplementedError("animations come with the media branch")


_old_decode_bytes = decode_bytes


def decode_bytes(data: bytes, max_pixels: int, max_frames: int = 1000, name: str = "<bytes>") -> Decoded:  # type: ignore[no-redef]  # noqa: E501
    return _old_decode_bytes(data, max_pixels, name=name)
