"""The image formats upscaled reads and writes: which package each needs, and the encoders' size limits.

Formats that need an optional package (HEIC/HEIF through ``pillow-heif``, JPEG XL through ``pillow-jxl-plugin``) are
registered with Pillow on first use; a missing package is an error that names the extra to install.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from daemon.errors import OutputError


@dataclass(frozen=True)
class FormatInfo:
    """What one output format can hold, and where its encoder stops."""

    name: str  # our name: png, jpg, webp, tiff, gif, avif, heic, jxl
    extra: str | None  # the optional extra that installs its codec, None when it is a core dependency
    max_side: int  # the encoder's largest width or height
    max_pixels: int | None = None  # the encoder's largest width x height, where it has one
    alpha: bool = True
    deep: bool = False  # can hold more than 8 bits per sample (16 for png/tiff/jxl grey, 10 or 12 for heic/avif)
    grey: bool = True  # has a one-channel layout
    lossy: bool = True  # quality applies (webp, heic, jxl and avif at quality 100 are lossless or near it)
    animated: bool = False


# The limits are the encoders' own (libjpeg-turbo: JPEG_MAX_DIMENSION 65500; libwebp: WEBP_MAX_DIMENSION 16383;
# libavif: 32768 per side and 16384 x 16384 pixels by default; x265 through libheif: 16384 per side here; GIF:
# 16-bit fields; PNG and TIFF: 2^31 - 1 in libpng, and classic TIFF's 4 GiB is checked on the bytes).
FORMATS: dict[str, FormatInfo] = {
    "png": FormatInfo("png", None, 2**31 - 1, deep=True, lossy=False, animated=True),
    "jpg": FormatInfo("jpg", None, 65500, alpha=False),
    "webp": FormatInfo("webp", None, 16383, grey=False, animated=True),
    "tiff": FormatInfo("tiff", None, 2**31 - 1, deep=True, lossy=False),
    "avif": FormatInfo("avif", None, 32768, max_pixels=16384 * 16384, deep=True),
    "heic": FormatInfo("heic", "heif", 16384, deep=True),
    "jxl": FormatInfo("jxl", "jxl", 1_073_741_823, deep=True),
    "gif": FormatInfo("gif", None, 65535, deep=False, lossy=False, animated=True),
}
# Every other list of formats (the rule's `format` choices, the CLI's, the lossy and the animated ones) is derived
# from FORMATS: a format is added there, once.
OUTPUT_FORMATS = tuple(FORMATS)
# Pillow's format names -> ours. BMP and still GIF inputs are written as PNG by default (see default_output).
PIL_TO_OURS = {
    "PNG": "png",
    "JPEG": "jpg",
    "MPO": "jpg",
    "WEBP": "webp",
    "TIFF": "tiff",
    "BMP": "bmp",
    "GIF": "gif",
    "AVIF": "avif",
    "HEIF": "heic",
    "JXL": "jxl",
}

_lock = threading.Lock()
_registered: set[str] = set()


def install_hint(extra: str) -> str:
    return f"pip install 'upscaled[{extra}]'"


def register_plugins() -> dict[str, str]:
    """Register the optional Pillow plugins that are installed. Returns {extra: why not} for those that are not.

    Safe to call often and from several threads: each plugin is registered once.
    """
    missing: dict[str, str] = {}
    with _lock:
        if "heif" not in _registered:
            try:
                import pillow_heif

                # HDR (10/12-bit) HEIC comes out as 16-bit through pillow_heif.open_heif, not through Pillow.
                pillow_heif.register_heif_opener()
                _registered.add("heif")
            except ImportError as exc:
                missing["heif"] = str(exc)
        if "jxl" not in _registered:
            try:
                import pillow_jxl  # noqa: F401  (registers the JXL plugin with Pillow on import)

                _registered.add("jxl")
            except ImportError as exc:
                missing["jxl"] = str(exc)
    return missing


def available(fmt: str) -> bool:
    """Whether ``fmt``'s codec is installed (core formats always are)."""
    info = FORMATS.get(fmt)
    if info is None:
        return False
    return info.extra is None or info.extra not in register_plugins()


def require_output(fmt: str) -> FormatInfo:
    """The :class:`FormatInfo` of an output format whose codec is installed.

    Raises:
        OutputError: an unknown format, or one whose optional extra is not installed (the message names it).
    """
    info = FORMATS.get(fmt)
    if info is None:
        raise OutputError(f"cannot write format {fmt!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    if info.extra is not None and info.extra in register_plugins():
        raise OutputError(f"writing {fmt} needs the optional codec package: {install_hint(info.extra)}")
    return info


def missing_input_codec(head: bytes) -> str | None:
    """The extra to install when ``head`` (a file's first bytes) is a HEIF or JPEG XL file that no plugin reads."""
    missing = register_plugins()
    brand = head[8:12] if head[4:8] == b"ftyp" else b""
    if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1") and "heif" in missing:
        return "heif"
    if (head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n")) and "jxl" in missing:
        return "jxl"
    return None


def check_limits(fmt: str, width: int, height: int) -> None:
    """Refuse, before any encoding, an image that ``fmt``'s encoder cannot hold.

    Raises:
        OutputError: the size is over the encoder's limit; the message gives both, and a format that can hold it.
    """
    info = require_output(fmt)
    if width < 1 or height < 1:
        raise OutputError(f"cannot write a {width}x{height} image: expected at least 1x1 pixels")
    over_side = max(width, height) > info.max_side
    over_pixels = info.max_pixels is not None and width * height > info.max_pixels
    if over_side or over_pixels:
        limit = f"{info.max_side} px per side" + (f" and {info.max_pixels} pixels" if info.max_pixels else "")
        raise OutputError(
            f"a {width}x{height} image is over the {fmt} encoder's limit of {limit}; "
            f'choose format = "png" or "tiff" for this rule, or a smaller scale'
        )
