"""The PNG encoder: libpng through OpenCV, with zlib settings chosen from measured time and size (issue 11).

``compression`` keeps its 0-9 meaning (0 stores, 9 is smallest), mapped onto libpng's level, strategy and filter:

====  ==========  ========  ========  ================================================================
level  zlib level  strategy  filter    why
====  ==========  ========  ========  ================================================================
0      0           default   none      no compression: the fastest, about 3x the size
1      1           RLE       UP        the default: 1.07-1.35x as fast as ``cv2.imwrite`` with OpenCV's
                                       defaults (level 1, RLE, SUB) and 1-13 % smaller
2      1           RLE       PAETH     15-40 % slower than 1, 3-18 % smaller (smooth images gain most)
3-9    3-9         default   adaptive  zlib's and libpng's own meaning of the level, as Pillow and
                                       ``cv2.imwrite(..., [IMWRITE_PNG_COMPRESSION, n])`` give it
====  ==========  ========  ========  ================================================================

The figures behind the table are in docs/formats.md (``benchmarks/encode.py``). OpenCV writes the ICC profile
(iCCP) and the EXIF (eXIf) itself; XMP and IPTC are added by exiv2 afterwards (OpenCV writes XMP as a tEXt chunk,
which exiv2 and Adobe's readers do not read as XMP).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from daemon.errors import OutputError

DEFAULT_PNG_COMPRESSION = 1

_STRATEGY_RLE = cv2.IMWRITE_PNG_STRATEGY_RLE
_STRATEGY_DEFAULT = cv2.IMWRITE_PNG_STRATEGY_DEFAULT


def png_params(compression: int) -> list[int]:
    """OpenCV's imwrite parameters for ``compression`` 0-9 (see the module's table).

    Raises:
        OutputError: ``compression`` is outside 0-9.
    """
    if not 0 <= compression <= 9:
        raise OutputError(f"PNG compression must be 0-9, got {compression}")
    if compression == 0:
        level, strategy, filt = 0, _STRATEGY_DEFAULT, cv2.IMWRITE_PNG_FILTER_NONE
    elif compression == 1:
        level, strategy, filt = 1, _STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER_UP
    elif compression == 2:
        level, strategy, filt = 1, _STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER_PAETH
    else:
        level, strategy, filt = compression, _STRATEGY_DEFAULT, cv2.IMWRITE_PNG_ALL_FILTERS
    return [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_STRATEGY, strategy, cv2.IMWRITE_PNG_FILTER, filt]


def encode_png(arr: np.ndarray, compression: int, icc: bytes | None = None,
               exif_tiff: bytes | None = None) -> tuple[bytes, list[str]]:
    """PNG bytes of ``arr`` ((H, W, C) uint8 or uint16, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).

    ``exif_tiff`` is the EXIF's TIFF data without the ``Exif\\0\\0`` header (what an eXIf chunk holds). Returns the
    bytes and notes (16-bit grey with alpha is written as 16-bit RGBA: OpenCV has no two-channel PNG).

    Raises:
        OutputError: a bad compression level, or an encoder failure.
    """
    notes: list[str] = []
    params = png_params(compression)
    chans = arr.shape[2]
    if chans == 2 and arr.dtype == np.uint8:
        return _pillow_la(arr, compression, icc, exif_tiff), notes
    if chans == 2:
        notes.append("16-bit grey with alpha was written as 16-bit RGBA (equal colour channels)")
        arr = np.dstack([arr[:, :, :1]] * 3 + [arr[:, :, 1:]])
        chans = 4
    # OpenCV takes BGR(A); cvtColor swaps in place of a fancy-index copy (about 1 ms for 1280x1920).
    if chans == 3:
        img = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif chans == 4:
        img = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    else:
        img = arr
    kinds, blocks = [], []
    if icc:
        kinds.append(cv2.IMAGE_METADATA_ICCP)
        blocks.append(np.frombuffer(icc, np.uint8))
    if exif_tiff:
        kinds.append(cv2.IMAGE_METADATA_EXIF)
        blocks.append(np.frombuffer(exif_tiff, np.uint8))
    try:
        if kinds:
            ok, buf = cv2.imencodeWithMetadata(".png", img, kinds, blocks, params)
        else:
            ok, buf = cv2.imencode(".png", img, params)
    except cv2.error as exc:
        raise OutputError(f"OpenCV could not encode the {arr.shape[1]}x{arr.shape[0]} PNG: {exc}") from None
    if not ok:
        raise OutputError(f"OpenCV could not encode the {arr.shape[1]}x{arr.shape[0]} PNG")
    return buf.tobytes(), notes


def _pillow_la(arr: np.ndarray, compression: int, icc: bytes | None, exif_tiff: bytes | None) -> bytes:
    """8-bit grey+alpha through Pillow (OpenCV has no two-channel PNG), at the same zlib level and strategy."""
    level = 1 if compression in (1, 2) else compression
    params: dict = {"compress_level": level, "compress_type": 3 if compression in (1, 2) else -1}  # 3 = Z_RLE
    if icc:
        params["icc_profile"] = icc
    if exif_tiff:
        params["exif"] = b"Exif\x00\x00" + exif_tiff
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "LA").save(buf, "PNG", **params)
    return buf.getvalue()
