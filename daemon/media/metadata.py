"""Metadata carried from an input to its output: ICC profile, EXIF, XMP and IPTC, under a keep/strip/basic policy.

Reading uses Pillow (ICC, EXIF, XMP) and exiv2 through ``pyexiv2`` (IPTC, and XMP where Pillow has no reader).
Writing uses the encoder where it takes the block (Pillow, OpenCV, pillow-heif, the JXL plugin), and exiv2 where it
does not (XMP in PNG, IPTC in JPEG, PNG and TIFF, EXIF in 16-bit TIFF). Nothing is packed by hand.

Two things are fixed on the way, because the output is a new image:

- The EXIF keeps no TIFF *structure* tags (ImageWidth, StripOffsets, BitsPerSample, ...). Pillow returns a TIFF's
  whole first IFD as its "EXIF"; written into the output, those tags described the input, and an 8-bit TIFF came
  out with ``ImageWidth`` 60 and ``ImageLength`` 80 after a x2.
- The orientation is reset to 1 (it is applied at decode), and the sizes the EXIF and XMP state
  (``PixelXDimension``/``PixelYDimension``, ``tiff:ImageWidth``/``ImageLength``) are set to the output's size.
"""

from __future__ import annotations

import datetime as dt
import io
import threading
import warnings
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

Policy = Literal["keep", "strip", "basic"]
POLICIES: tuple[str, ...] = ("keep", "strip", "basic")

ORIENTATION = 0x0112
EXIF_IFD = 0x8769
DATE_TIME_ORIGINAL = 0x9003
PIXEL_X, PIXEL_Y = 0xA002, 0xA003
# TIFF tags that describe how a TIFF file stores its pixels (TIFF 6.0 baseline and extensions, Exif 2.3 4.6.8
# "not recorded" tags), and blocks we carry on their own (XMP 700, IPTC 33723, Photoshop resources 34377, ICC 34675,
# Photoshop layers 37724). None of them may describe the output.
STRUCTURAL_TAGS = frozenset(
    {
        254,
        255,
        256,
        257,
        258,
        259,
        262,
        263,
        264,
        265,
        266,
        273,
        277,
        278,
        279,
        280,
        281,
        284,
        288,
        289,
        290,
        291,
        292,
        293,
        317,
        320,
        321,
        322,
        323,
        324,
        325,
        330,
        332,
        338,
        339,
        340,
        341,
        347,
        512,
        513,
        514,
        515,
        517,
        518,
        519,
        520,
        521,
        529,
        530,
        532,
        700,
        33723,
        34377,
        34675,
        37724,
        50838,
        50839,
    }
)
# Which blocks each output format can carry (and so which are lost, with a note, under "keep").
CARRIES: dict[str, frozenset[str]] = {
    "png": frozenset({"icc", "exif", "xmp", "iptc"}),
    "jpg": frozenset({"icc", "exif", "xmp", "iptc"}),
    "tiff": frozenset({"icc", "exif", "xmp", "iptc"}),
    "webp": frozenset({"icc", "exif", "xmp"}),
    "avif": frozenset({"icc", "exif", "xmp"}),
    "heic": frozenset({"icc", "exif", "xmp"}),
    "jxl": frozenset({"icc", "exif", "xmp"}),
    "gif": frozenset(),
}

# An XMP packet with more markup than this (tags and attributes: about 2,000 properties) is dropped before exiv2 sees
# it: exiv2's time grows with the square of the property count (8,000 properties took 10.6 s), and real photos carry a
# few hundred.
MAX_XMP_ITEMS = 4000
MAX_XMP_BYTES = 1 << 20
# What one JPEG APP1 segment holds (65,535 bytes with its length field): EXIF with its "Exif\0\0" header, and an XMP
# packet after its 29-byte namespace header. Anything longer cannot be written as one segment and is dropped.
JPEG_MAX_EXIF = 65533
JPEG_MAX_XMP = 65533 - 29

_exiv2_lock = threading.Lock()  # pyexiv2 keeps global state (log level, namespaces): one call at a time


@dataclass
class Metadata:
    """What can be carried from an input to its output.

    ``exif`` is a TIFF-structured EXIF block as Pillow writes it (``Exif\\0\\0`` header), already cleaned: no TIFF
    structure tags, orientation 1. ``xmp`` is the raw XMP packet (UTF-8 XML). ``iptc`` holds the IPTC IIM datasets
    as exiv2 names them (``{"Iptc.Application2.ObjectName": "title", "Iptc.Application2.Keywords": ["a", "b"]}``):
    exiv2 reads and writes them in every container that has IPTC, so they need no hand-written IIM packing.
    ``captured`` is the EXIF DateTimeOriginal (``YYYY:MM:DD HH:MM:SS``) for ``metadata = "basic"`` and ``{date}``.
    """

    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    iptc: dict[str, str | list[str]] | None = None
    captured: str | None = None
    notes: list[str] = field(default_factory=list)  # what went wrong reading them (a broken block is dropped)

    def date(self, fmt: str = "%Y-%m-%d") -> str | None:
        """The capture date formatted with ``fmt`` (for the ``{date}`` naming field), or None if unknown/invalid."""
        if not self.captured:
            return None
        try:
            return dt.datetime.strptime(self.captured.strip()[:19], "%Y:%m:%d %H:%M:%S").strftime(fmt)
        except ValueError:
            return None


def _exiv2():  # imported on use: the service starts without loading exiv2
    import pyexiv2

    pyexiv2.set_log_level(4)  # its warnings go to stderr, bypassing our logs; failures still raise
    return pyexiv2


# --- reading ---------------------------------------------------------------------------------------------------------
def read(im: Image.Image, fmt: str, data: bytes) -> tuple[Metadata, int]:
    """The metadata of the open image ``im`` (format ``fmt``, file bytes ``data``) and the EXIF orientation to apply.

    HEIC and JPEG XL decoders apply their own orientation (the container's transforms, which take precedence over
    EXIF by those formats' specifications), so their orientation to apply is 1. A block that cannot be read is
    dropped with a note, never failing the image.
    """
    meta = Metadata()
    icc = im.info.get("icc_profile")
    meta.icc = bytes(icc) if icc else None
    orientation = 1
    try:
        with warnings.catch_warnings(record=True) as caught:  # Pillow warns on a corrupt block: that is a note
            warnings.simplefilter("always")
            exif = im.getexif()
        meta.notes += [f"the EXIF block is damaged ({w.message}); what could be read was kept" for w in caught]
        orientation = int(exif.get(ORIENTATION, 1) or 1)
        meta.captured = _text(exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL))
        meta.exif = clean_exif(exif)
    except Exception as exc:  # a broken EXIF block must not fail the image
        orientation, meta.exif = 1, None
        meta.notes.append(f"the EXIF block could not be read and was dropped ({exc})")
    if fmt in ("heic", "jxl"):
        orientation = 1
    meta.xmp = _read_xmp(im, fmt, data, meta.notes)
    if _has_iptc(im, fmt):
        meta.iptc = _read_iptc(data, meta.notes)
    return meta, orientation


def _text(v: object) -> str | None:
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    return v.strip("\x00 ") or None if isinstance(v, str) else None


def clean_exif(exif: Image.Exif) -> bytes | None:
    """``exif`` without TIFF structure tags and with orientation 1, as bytes; None when nothing is left."""
    for tag in [t for t in exif if t in STRUCTURAL_TAGS]:
        del exif[tag]
    if ORIENTATION in exif:
        exif[ORIENTATION] = 1
    if not len(exif) and not exif.get_ifd(EXIF_IFD):
        return None
    return exif.tobytes()


def _read_xmp(im: Image.Image, fmt: str, data: bytes, notes: list[str]) -> bytes | None:
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if not xmp and fmt == "tiff":
        xmp = getattr(im, "tag_v2", {}).get(700)
    if not xmp and fmt == "jxl" and b"xml " in data[: 4096 * 16]:  # JXL's Pillow plugin reads only the EXIF box
        try:
            with _exiv2_lock:
                img = _exiv2().ImageData(data)
                try:
                    xmp = img.read_raw_xmp() or None
                finally:
                    img.close()
        except Exception as exc:
            notes.append(f"the XMP packet could not be read and was dropped ({exc})")
    if isinstance(xmp, tuple):  # TIFF BYTE arrays come back as tuples of ints
        xmp = bytes(xmp)
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return _bounded_xmp(bytes(xmp), notes) if xmp else None


def xmp_items(xmp: bytes) -> int:
    """An upper bound on the properties of an XMP packet, counted without parsing it: each property is an element
    (one or two tags) or an attribute (``="``)."""
    return xmp.count(b"<") + xmp.count(b'="')


def _bounded_xmp(xmp: bytes, notes: list[str]) -> bytes | None:
    """``xmp``, or None (with a note) when it is too large for exiv2 to take in bounded time."""
    if len(xmp) > MAX_XMP_BYTES or xmp_items(xmp) > MAX_XMP_ITEMS:
        notes.append(
            f"the XMP packet ({len(xmp)} bytes, up to {xmp_items(xmp)} properties) is over the "
            f"{MAX_XMP_BYTES} bytes or {MAX_XMP_ITEMS} properties kept; it was dropped"
        )
        return None
    return xmp


def _has_iptc(im: Image.Image, fmt: str) -> bool:
    if fmt == "jpg":
        return 0x0404 in (im.info.get("photoshop") or {})
    if fmt == "tiff":
        return 33723 in getattr(im, "tag_v2", {})
    if fmt == "png":
        return any("iptc" in str(k).lower() for k in im.info)
    return False


def _read_iptc(data: bytes, notes: list[str]) -> dict[str, str | list[str]] | None:
    try:
        with _exiv2_lock:
            img = _exiv2().ImageData(data)
            try:
                try:
                    iptc = img.read_iptc()
                except UnicodeDecodeError:  # IIM before 1:90 CodedCharacterSet is often Latin-1
                    iptc = img.read_iptc(encoding="latin-1")
            finally:
                img.close()
        return iptc or None
    except Exception as exc:
        notes.append(f"the IPTC block could not be read and was dropped ({exc})")
        return None


# --- preparing for an output -----------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """The blocks to write into one output, already fitted to it."""

    icc: bytes | None = None
    exif: bytes | None = None  # with the Exif\0\0 header
    xmp: bytes | None = None
    iptc: dict[str, str | list[str]] | None = None

    @property
    def exif_tiff(self) -> bytes | None:
        """The EXIF without its ``Exif\\0\\0`` header (PNG's eXIf chunk and JXL's box hold the TIFF data alone)."""
        if self.exif and self.exif.startswith(b"Exif\x00\x00"):
            return self.exif[6:]
        return self.exif


def prepare(meta: Metadata | None, policy: str, fmt: str, size: tuple[int, int]) -> tuple[Prepared, list[str]]:
    """The blocks of ``meta`` that ``policy`` keeps and ``fmt`` can hold, fitted to an output of ``size`` (w, h).

    Returns the blocks and notes about what was dropped. ``keep``: ICC, EXIF (orientation 1, pixel dimensions set),
    XMP (sizes and orientation set), IPTC. ``strip``: ICC only. ``basic``: ICC and a minimal EXIF with the capture
    date.

    Raises:
        ValueError: ``policy`` is not keep, strip or basic.
    """
    if policy not in POLICIES:
        raise ValueError(f"metadata policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    out, notes = Prepared(), list[str]()
    if meta is None:
        return out, notes
    carries = CARRIES.get(fmt, frozenset())
    out.icc = meta.icc if "icc" in carries else None
    if meta.icc and "icc" not in carries:
        notes.append(f"{fmt} cannot hold a colour profile; the ICC profile was dropped")
    if policy == "strip":
        return out, notes
    if policy == "basic":
        if meta.captured and "exif" in carries:
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL] = meta.captured
            out.exif = exif.tobytes()
        return out, notes
    lost = [
        name
        for name, block in (("EXIF", meta.exif), ("XMP", meta.xmp), ("IPTC", meta.iptc))
        if block and name.lower() not in carries
    ]
    if lost:
        notes.append(f"{fmt} cannot hold {' or '.join(lost)}; {'it was' if len(lost) == 1 else 'they were'} dropped")
    if meta.exif and "exif" in carries:
        out.exif = _fit_exif(meta.exif, size, notes)
    if meta.xmp and "xmp" in carries:
        out.xmp = _fit_xmp(meta.xmp, size, notes)
    if meta.iptc and "iptc" in carries:
        out.iptc = meta.iptc
    if fmt == "jpg":
        _fit_jpeg_segments(out, notes)
    return out, notes


def _fit_jpeg_segments(out: Prepared, notes: list[str]) -> None:
    """Drop (with a note) an EXIF or XMP block that one JPEG APP1 segment cannot hold."""
    if out.exif and len(out.exif) > JPEG_MAX_EXIF:
        notes.append(f"the EXIF block ({len(out.exif)} bytes) is over the {JPEG_MAX_EXIF} a JPEG holds; it was dropped")
        out.exif = None
    if out.xmp and len(out.xmp) > JPEG_MAX_XMP:
        notes.append(f"the XMP packet ({len(out.xmp)} bytes) is over the {JPEG_MAX_XMP} a JPEG holds; it was dropped")
        out.xmp = None


def parses(meta: Metadata | None, policy: str) -> bool:
    """Whether :func:`prepare` would parse a block of ``meta`` (EXIF, XMP: bytes someone else wrote) under
    ``policy``. The service runs such a prepare in its sandbox (:meth:`daemon.sandbox.Sandbox.prepare`); the others
    only copy bytes and build new ones."""
    return meta is not None and policy == "keep" and bool(meta.exif or meta.xmp)


def _fit_exif(exif_bytes: bytes, size: tuple[int, int], notes: list[str]) -> bytes | None:
    try:
        exif = Image.Exif()
        exif.load(exif_bytes)
        sub = exif.get_ifd(EXIF_IFD)
        if sub:  # Exif 2.3: the Exif IFD of a compressed image states its valid pixel size
            sub[PIXEL_X], sub[PIXEL_Y] = size
        exif[ORIENTATION] = 1
        return exif.tobytes()
    except Exception as exc:
        notes.append(f"the EXIF block could not be rewritten and was dropped ({exc})")
        return None


# exiv2 opens a bare packet as an XMP sidecar, which mirrors the tiff: and exif: properties into EXIF on reading
# and back over them on writing: those are set through their EXIF names, the rest through their XMP names.
_SIDECAR_EXIF_KEYS = (
    ("Exif.Image.ImageWidth", 0),
    ("Exif.Image.ImageLength", 1),
    ("Exif.Photo.PixelXDimension", 0),
    ("Exif.Photo.PixelYDimension", 1),
)
_XMP_SIZE_KEYS = (
    ("Xmp.tiff.ImageWidth", 0),
    ("Xmp.tiff.ImageLength", 1),
    ("Xmp.exif.PixelXDimension", 0),
    ("Xmp.exif.PixelYDimension", 1),
)


def _fit_xmp(xmp: bytes, size: tuple[int, int], notes: list[str]) -> bytes | None:
    """The packet with the sizes and orientation it states set to the output's, through exiv2's XMP toolkit."""
    try:
        with _exiv2_lock:
            packet = _exiv2().ImageData(xmp)
            try:
                have_xmp, have_exif = packet.read_xmp(), packet.read_exif()
                exif_changes = {k: str(size[i]) for k, i in _SIDECAR_EXIF_KEYS if k in have_exif}
                xmp_changes = {k: str(size[i]) for k, i in _XMP_SIZE_KEYS if k in have_xmp}
                if "Exif.Image.Orientation" in have_exif:
                    exif_changes["Exif.Image.Orientation"] = "1"
                if "Xmp.tiff.Orientation" in have_xmp:
                    xmp_changes["Xmp.tiff.Orientation"] = "1"
                if not (exif_changes or xmp_changes):
                    return xmp
                if exif_changes:
                    packet.modify_exif(exif_changes)
                if xmp_changes:
                    packet.modify_xmp(xmp_changes)
                return packet.get_bytes()
            finally:
                packet.close()
    except Exception as exc:
        notes.append(f"the XMP packet could not be read by exiv2 and was dropped ({exc})")
        return None


def icc_colour_space(icc: bytes) -> str:
    """The data colour space an ICC profile describes ("RGB", "GRAY", "CMYK", ...), from its header (ICC.1
    7.2.6: bytes 16-19), or "" for a profile too short to have one."""
    return icc[16:20].decode("ascii", "replace").strip() if len(icc) >= 20 else ""


# --- writing what the encoder could not -----------------------------------------------------------------------------
def exiv2_write(
    data: bytes, *, exif: bytes | None = None, xmp: bytes | None = None, iptc: dict[str, str | list[str]] | None = None
) -> bytes:
    """``data`` (an encoded PNG, JPEG or TIFF) with the given blocks written into it by exiv2.

    EXIF goes through a one-pixel JPEG carrier that Pillow writes and exiv2 copies from, so the block is copied as
    binary, not through exiv2's text form.

    Raises:
        RuntimeError, ValueError: exiv2 could not write the file (the caller turns it into a note).
    """
    if not (exif or xmp or iptc):
        return data
    pyexiv2 = _exiv2()
    with _exiv2_lock:
        img = pyexiv2.ImageData(data)
        try:
            if exif:
                buf = io.BytesIO()
                Image.new("L", (1, 1)).save(buf, "JPEG", exif=exif)
                carrier = pyexiv2.ImageData(buf.getvalue())
                try:
                    carrier.copy_to_another_image(
                        img, exif=True, iptc=False, xmp=False, comment=False, icc=False, thumbnail=False
                    )
                finally:
                    carrier.close()
            if xmp:
                img.modify_raw_xmp(xmp.decode("utf-8"))
            if iptc:
                img.modify_iptc(iptc)
            return img.get_bytes()
        finally:
            img.close()
