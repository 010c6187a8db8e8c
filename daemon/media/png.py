"""The PNG encoder: our own writer, numpy for the row filters and zlib-ng for the deflate (see docs/formats.md).

libpng (what ``cv2.imwrite`` and Pillow call) spends most of a fast PNG outside zlib: at level 0, storing without
compressing, OpenCV still takes 80 % of its level-1 time on a 320x480 output. The row filters are a few vectorised
numpy operations, and zlib-ng deflates the same stream settings 1.5-2x as fast as zlib; the writer is the chunk
layout of the PNG specification (IHDR, iCCP, eXIf, iTXt, IDAT, IEND) and nothing else.

``compression`` keeps its 0-9 meaning (0 stores, 9 is smallest). Every level but 0 filters each row with UP (the
byte above subtracted): on model output and on photo mosaics alike it gave smaller files than libpng's adaptive
choice, and it is one numpy subtraction. Times and sizes against ``cv2.imencode('.png')`` with OpenCV's defaults
(1280x1920, smooth model output / photo mosaic; docs/formats.md has the run):

=====  ==========  ========  ======  =====================================================================
level  zlib level  strategy  filter  what it gives
=====  ==========  ========  ======  =====================================================================
0      0           default   none    no compression: 15-24x as fast, 1.6-3.2x the size
1      1           RLE       UP      the default: 1.8-1.9x as fast, 5-11 % smaller
2-9    2-9         default   UP      smaller with each level; 3 is about OpenCV's level-6 size at
                                     OpenCV's default speed, 9 is 3-30x slower than 1
=====  ==========  ========  ======  =====================================================================

The figures are in docs/formats.md (``benchmarks/encode.py``). Every layout is written natively:
grey, grey with alpha, RGB and RGBA at 8 or 16 bits. The ICC profile goes into iCCP, the EXIF into eXIf and the
XMP packet into an iTXt chunk (``XML:com.adobe.xmp``), all before the pixels and each written as it is given; IPTC
is added by exiv2 afterwards. Rows are filtered and deflated in bands of about
4 MB, so that a large output never has a second full copy in memory.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from zlib_ng import zlib_ng as _deflate  # the same streams as zlib, faster

from daemon.errors import OutputError

DEFAULT_PNG_COMPRESSION = 1

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type: grey, grey+alpha, RGB, RGBA
_BAND_BYTES = 4 << 20
_IDAT_BYTES = 1 << 20


def png_settings(compression: int) -> tuple[int, int, bool]:
    """(deflate level, deflate strategy, whether rows are UP-filtered) for ``compression`` 0-9.

    Raises:
        OutputError: ``compression`` is outside 0-9.
    """
    if not 0 <= compression <= 9:
        raise OutputError(f"PNG compression must be 0-9, got {compression}")
    return compression, zlib.Z_RLE if compression == 1 else zlib.Z_DEFAULT_STRATEGY, compression > 0


def encode_png(
    arr: np.ndarray,
    compression: int,
    icc: bytes | None = None,
    exif_tiff: bytes | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """PNG bytes of ``arr`` ((H, W, C) uint8 or uint16, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).

    ``exif_tiff`` is the EXIF's TIFF data without the ``Exif\\0\\0`` header (what an eXIf chunk holds); ``xmp`` the
    XMP packet (UTF-8 XML).

    Raises:
        OutputError: a bad compression level, layout or sample type.
    """
    level, strategy, up = png_settings(compression)
    if (
        arr.ndim != 3
        or arr.shape[2] not in _COLOUR_TYPE
        or arr.dtype not in (np.uint8, np.uint16)
        or 0 in arr.shape[:2]
    ):
        raise OutputError(f"cannot write a PNG of a {arr.dtype} array shaped {arr.shape}")
    h, w, chans = arr.shape
    depth = 8 * arr.dtype.itemsize
    raw = arr if depth == 8 else arr.astype(">u2")  # PNG samples are big-endian
    rows = np.ascontiguousarray(raw).view(np.uint8).reshape(h, w * chans * arr.dtype.itemsize)

    out = [_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, _COLOUR_TYPE[chans], 0, 0, 0))]
    if icc:
        out.append(_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)))
    if exif_tiff:
        out.append(_chunk(b"eXIf", exif_tiff))
    if xmp:
        out.append(_xmp_chunk(xmp))
    z = _deflate.compressobj(level, zlib.DEFLATED, 15, 8, strategy)
    pending: list[bytes] = []
    size = 0
    band = max(1, _BAND_BYTES // rows.shape[1])
    for r0 in range(0, h, band):
        above = rows[r0 - 1] if r0 else None
        piece = z.compress(_scanlines(rows[r0 : r0 + band], above, up))
        if piece:
            pending.append(piece)
            size += len(piece)
        if size >= _IDAT_BYTES:
            out.append(_chunk(b"IDAT", b"".join(pending)))
            pending, size = [], 0
    pending.append(z.flush())
    out.append(_chunk(b"IDAT", b"".join(pending)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def _xmp_chunk(xmp: bytes) -> bytes:
    """The iTXt chunk of an XMP packet (XMP Specification Part 3, 1.1.5): keyword, uncompressed, no language."""
    return _chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp)


def insert_xmp(png: bytes, xmp: bytes) -> bytes:
    """``png`` (one we wrote, or Pillow's APNG) with an XMP iTXt chunk right after its IHDR.

    Raises:
        OutputError: ``png`` does not start with a PNG signature and an IHDR chunk.
    """
    end = len(_SIGNATURE) + 8 + 13 + 4  # signature, IHDR's length and type, its 13 bytes, its CRC
    if not png.startswith(_SIGNATURE) or png[len(_SIGNATURE) + 4 : len(_SIGNATURE) + 8] != b"IHDR":
        raise OutputError("expected a PNG that starts with its IHDR chunk")
    return png[:end] + _xmp_chunk(xmp) + png[end:]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", _deflate.crc32(body, _deflate.crc32(kind)))


def _scanlines(rows: np.ndarray, above: np.ndarray | None, up: bool) -> np.ndarray:
    """``rows`` (n, stride) as PNG scanlines: each prefixed with its filter type, 2 (UP: minus the byte above, mod
    256) or 0 (none). ``above`` is the row before the band; None at the top of the image, where it is zeros."""
    n, stride = rows.shape
    out = np.empty((n, stride + 1), np.uint8)
    if not up:
        out[:, 0] = 0
        out[:, 1:] = rows
        return out
    out[:, 0] = 2
    out[0, 1:] = rows[0] if above is None else rows[0] - above
    np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])
    return out
