"""Image files without losing what the user cares about: the decoded form, and encoding.

:class:`Decoded` is what a decoder gives back: the first :class:`Frame`, the other frames on demand
(:meth:`Decoded.rest`), the metadata (:class:`Metadata`), the format and the decoder's mode. Pixels stay in their
native integer type (uint8 or uint16), upright (the EXIF orientation applied), with alpha and greyscale kept. Decoding
itself is :mod:`daemon.media.decode`, which the service runs only inside its sandbox processes
(:mod:`daemon.sandbox`): this module parses no file that someone else wrote.

Encode writes any of png, jpg, webp, tiff, avif, heic, jxl (and gif for animations), checks the encoder's size
limits first, and writes the metadata the ``policy`` keeps and the format can hold (see
:mod:`daemon.media.metadata`): blocks the sandbox already fitted to the output (:class:`Prepared`), or, for tools,
a :class:`Metadata` prepared here. Formats that need a package (``heif``, ``jxl``) say which extra to install.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from daemon.errors import OutputError
from daemon.media import formats
from daemon.media import metadata as md
from daemon.media.metadata import Metadata, Policy, Prepared
from daemon.media.png import DEFAULT_PNG_COMPRESSION, encode_png, insert_xmp
from models.errors import UnsupportedImageError, UpscaledError
from models.pixels import alpha_of, colour_of, to_unit_float

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_PNG_COMPRESSION",
    "Decoded",
    "Frame",
    "Metadata",
    "Policy",
    "Prepared",
    "Probe",
    "assemble",
    "encode",
    "encode_animation",
    "to_output_array",
]

DEFAULT_MAX_FRAMES = 1000  # an animation with more frames is refused (a 3000-frame GIF is a job of hours)
# The animations we upscale frame by frame; others keep their first frame.
ANIMATED_FORMATS = tuple(name for name, info in formats.FORMATS.items() if info.animated)
EXTENSIONS = {
    "png": "png",
    "jpeg": "jpg",
    "jpg": "jpg",
    "webp": "webp",
    "tiff": "tiff",
    "tif": "tiff",
    "bmp": "png",
    "gif": "gif",
    "avif": "avif",
    "heic": "heic",
    "heif": "heic",
    "jxl": "jxl",
}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, as the grey path has always used


@dataclass
class Frame:
    """One picture of an image: a still image has one, an animation several.

    ``pixels`` is (H, W, C) uint8 or uint16, upright, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA. Decoded frames are
    whole canvases, already composed the way a viewer shows them (Pillow composes GIF, APNG and WebP frames over
    the previous ones), so no offsets are needed. ``disposal`` and ``blend`` are the input's values as its format
    numbers them (GIF: 0-3 in the graphic control extension; APNG: dispose_op 0-2, blend_op 0-1; WebP: 0, since
    libwebp's encoder chooses its own), kept for the output (see :func:`encode_animation`).
    """

    pixels: np.ndarray
    duration_ms: int = 0
    disposal: int = 0
    blend: int = 0


@dataclass(frozen=True)
class Probe:
    """What the header says: enough to refuse a file before decoding a pixel."""

    format: str  # png, jpg, webp, tiff, gif, heic, avif, jxl (bmp -> png)
    width: int
    height: int
    frames: int  # frames that will be decoded (1 for a still, a multi-page TIFF or an animated AVIF)
    animated: bool


class FrameSource:
    """Where :meth:`Decoded.rest` takes frames 2..n from: a decoder's open animation, or frames already decoded."""

    def frames(self, start: int, stop: int) -> Iterator[Frame]:
        raise NotImplementedError


class DecodedFrames(FrameSource):
    """Frames that are all decoded already (a sandbox child sends every frame at once)."""

    def __init__(self, frames: Sequence[Frame]) -> None:
        self._frames = list(frames)

    def frames(self, start: int, stop: int) -> Iterator[Frame]:
        return iter(self._frames[start:stop])


@dataclass
class Decoded:
    """A decoded image: the first frame, the metadata, and the rest of the frames on demand."""

    first: Frame
    format: str  # the format we would write back by default: png, jpg, webp, tiff, gif, heic, avif, jxl
    meta: Metadata
    mode: str  # the decoder's mode, for the job row
    frames: int = 1
    loop: int | None = None  # animation loop count (0 = forever), None when the input does not say
    notes: list[str] = field(default_factory=list)  # what a person should know
    _source: FrameSource | None = field(default=None, repr=False)

    def rest(self) -> Iterator[Frame]:
        """Frames 2..n, decoded one at a time as the iterator is advanced (never all at once). Empty for a still.

        Raises:
            DecodeError: a later frame is damaged or truncated.
        """
        if self._source is None or self.frames < 2:
            return iter(())
        return self._source.frames(1, self.frames)

    # --- convenience, for the bench, the metrics and the tests ---------------------------------------------------
    @property
    def bits(self) -> int:
        return 16 if self.first.pixels.dtype == np.uint16 else 8

    @property
    def grey(self) -> bool:
        return self.first.pixels.shape[2] in (1, 2)

    @property
    def has_alpha(self) -> bool:
        return self.first.pixels.shape[2] in (2, 4)

    @property
    def width(self) -> int:
        return self.first.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.first.pixels.shape[0]

    @property
    def animated(self) -> bool:
        return self.frames > 1

    def colour(self) -> np.ndarray:
        """The first frame's colour as (H, W, 3) RGB in its native dtype (a grey image repeated to three channels)."""
        return colour_of(self.first.pixels)

    def alpha_native(self) -> np.ndarray | None:
        """The first frame's alpha as (H, W) in its native dtype, or None."""
        return alpha_of(self.first.pixels)

    @functools.cached_property
    def alpha(self) -> np.ndarray | None:
        """The first frame's alpha as float32 (H, W) in [0, 1], or None: the float companion of :attr:`rgb`, an
        attribute as it always was (the web view and older tests read ``dec.alpha`` this way)."""
        a = self.alpha_native()
        return None if a is None else to_unit_float(a)

    @functools.cached_property
    def rgb(self) -> np.ndarray:
        """The first frame's colour as float32 (H, W, 3) in [0, 1] (the float path: 16-bit, metrics, the bench)."""
        return to_unit_float(self.colour())

    @property
    def icc(self) -> bytes | None:
        return self.meta.icc

    @property
    def exif(self) -> bytes | None:
        return self.meta.exif


# --- model output -> integer pixels ---------------------------------------------------------------------------------
def _quantise_into(out: np.ndarray, c: int, plane: np.ndarray, peak: float) -> None:
    if plane.dtype == out.dtype:
        out[:, :, c] = plane
        return
    if plane.dtype == np.uint8 and out.dtype == np.uint16:
        out[:, :, c] = plane.astype(np.uint16) * 257
        return
    if plane.dtype == np.uint16 and out.dtype == np.uint8:
        out[:, :, c] = ((plane.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return
    if not np.issubdtype(plane.dtype, np.floating):
        raise UnsupportedImageError(f"expected uint8, uint16 or float samples, got {plane.dtype}")
    scaled = plane.astype(np.float32) * np.float32(peak)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, peak, out=scaled)
    out[:, :, c] = scaled


def assemble(colour: np.ndarray, alpha: np.ndarray | None, bits: int, grey: bool) -> np.ndarray:
    """The integer array to encode, from a model's output and the (resized) alpha.

    ``colour`` is (H, W, 3) uint8 (8-bit models' native path), uint16, or float in [0, 1]; ``alpha`` is (H, W) in
    any of those types, or None. ``bits`` (8 or 16) picks the output dtype; ``grey`` brings the three channels back
    to one with BT.601 luma (the model ran on three equal channels, whose outputs may drift apart slightly).
    Returns (H, W, C) uint8 or uint16, C = 1 + grey..4. Works one plane at a time: a full float copy of a large
    output is GBs.

    Raises:
        UnsupportedImageError: a shape or dtype other than the above, or an alpha of another size.
    """
    if colour.ndim != 3 or colour.shape[2] not in (1, 3):
        raise UnsupportedImageError(f"expected colour of shape (H, W, 3), got {colour.shape}")
    if alpha is not None and alpha.shape[:2] != colour.shape[:2]:
        raise UnsupportedImageError(
            f"alpha is {alpha.shape[1]}x{alpha.shape[0]}, colour is "
            f"{colour.shape[1]}x{colour.shape[0]}; expected the same size"
        )
    if bits not in (8, 16):
        raise UnsupportedImageError(f"expected 8 or 16 bits, got {bits}")
    dtype = np.uint16 if bits == 16 else np.uint8
    peak = 65535.0 if bits == 16 else 255.0
    h, w = colour.shape[:2]
    n_colour = 1 if grey else 3
    out = np.empty((h, w, n_colour + (alpha is not None)), dtype)
    if grey and colour.shape[2] == 3:
        scale = 1.0
        if colour.dtype == np.uint8:
            scale = 1 / 255.0
        elif colour.dtype == np.uint16:
            scale = 1 / 65535.0
        luma = colour.reshape(-1, 3) @ (_LUMA * np.float32(scale))
        _quantise_into(out, 0, luma.reshape(h, w), peak)
    else:
        for c in range(n_colour):
            _quantise_into(out, c, colour[:, :, c], peak)
    if alpha is not None:
        _quantise_into(out, n_colour, alpha, peak)
    return out


def to_output_array(rgb: np.ndarray, alpha: np.ndarray | None, bits: int, grey: bool) -> np.ndarray:
    """Float pixels to the output's integer type (the float path's name for :func:`assemble`)."""
    return assemble(rgb, alpha, bits, grey)


# --- writing ----------------------------------------------------------------------------------------------------------
def _check_array(arr: np.ndarray) -> None:
    if (
        not isinstance(arr, np.ndarray)
        or arr.ndim != 3
        or arr.shape[2] not in (1, 2, 3, 4)
        or arr.dtype not in (np.uint8, np.uint16)
    ):
        got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise OutputError(f"expected an (H, W, C) uint8 or uint16 array with C in 1..4 to encode, got {got}")


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _fit_to_format(arr: np.ndarray, fmt: str, info: formats.FormatInfo, notes: list[str]) -> np.ndarray:
    """The array in a layout ``fmt`` can hold, with a note for each thing lost."""
    chans = arr.shape[2]
    if arr.dtype == np.uint16 and not info.deep:
        notes.append(f"{fmt} holds 8 bits per sample; the 16-bit result was reduced to 8 bits")
        arr = _to_8bit(arr)
    if not info.alpha and chans in (2, 4):
        notes.append(f"{fmt} has no alpha channel; the image was flattened onto white")
        peak = 65535.0 if arr.dtype == np.uint16 else 255.0
        a = arr[:, :, -1:].astype(np.float32) / np.float32(peak)
        arr = np.rint(arr[:, :, :-1] * a + np.float32(peak) * (1 - a)).astype(arr.dtype)
    return arr


def encode(
    arr: np.ndarray,
    fmt: str,
    *,
    quality: int = 95,
    compression: int = DEFAULT_PNG_COMPRESSION,
    meta: Metadata | Prepared | None = None,
    policy: str = "keep",
) -> tuple[bytes, list[str]]:
    """Encode ``arr`` ((H, W, C) uint8 or uint16, from :func:`assemble`) as ``fmt``. Returns (bytes, notes).

    ``quality`` (1-100) applies to jpg, webp, avif, heic and jxl; 100 means lossless for webp, heic and jxl.
    ``compression`` (0-9) applies to png (see :mod:`daemon.media.png`) and tiff (zlib level). ``meta``: blocks
    already fitted to this output (:class:`Prepared`, what the service passes: its sandbox fitted them), written as
    they are; or a :class:`Metadata` fitted here under ``policy`` (tools): ``keep`` writes all of it the format can
    carry (EXIF with orientation 1 and its pixel size updated, ICC, XMP, IPTC), ``strip`` only the ICC profile,
    ``basic`` the ICC profile and the capture date. 16-bit and alpha are kept where the format holds them; a note
    says what was reduced or dropped.

    Raises:
        OutputError: an unknown format or one whose extra is missing (the message names it), a size over the
            encoder's limit (checked before encoding), a bad array, or an encoder failure.
    """
    _check_array(arr)
    info = formats.require_output(fmt)
    h, w = arr.shape[:2]
    formats.check_limits(fmt, w, h)
    if fmt == "gif":
        return encode_animation(
            [Frame(arr)], "gif", loop=None, quality=quality, compression=compression, meta=meta, policy=policy
        )
    if not 1 <= quality <= 100:
        raise OutputError(f"quality must be 1-100, got {quality}")
    prep, notes = _prepared(meta, policy, fmt, (w, h))
    arr = _fit_to_format(arr, fmt, info, notes)
    if prep.icc:
        _match_profile(prep, arr, fmt, notes)
    try:
        data, later = _ENCODERS[fmt](arr, quality, compression, prep, notes)
    except UpscaledError:
        raise
    except Exception as exc:  # a codec's own error: say which, never a traceback in the job row
        raise OutputError(
            f"the {fmt} encoder failed on a {w}x{h} {arr.dtype} image with {arr.shape[2]} channel(s): {exc}"
        ) from None
    if later.exif or later.xmp or later.iptc:
        try:
            data = md.exiv2_write(data, exif=later.exif, xmp=later.xmp, iptc=later.iptc)
        except Exception as exc:  # metadata never fails a job: the pixels are written without it
            notes.append(f"exiv2 could not write the {fmt} metadata; it was dropped ({exc})")
    return data, notes


def _prepared(
    meta: Metadata | Prepared | None, policy: str, fmt: str, size: tuple[int, int]
) -> tuple[Prepared, list[str]]:
    if isinstance(meta, Prepared):
        return Prepared(icc=meta.icc, exif=meta.exif, xmp=meta.xmp, iptc=meta.iptc), []
    try:
        return md.prepare(meta, policy, fmt, size)
    except ValueError as exc:
        raise OutputError(str(exc)) from None


def _match_profile(prep: md.Prepared, arr: np.ndarray, fmt: str, notes: list[str]) -> None:
    """Drop a profile whose colour space is not the output's (an RGB profile on a grey PNG is invalid, and libpng
    drops it with a warning on stderr): a grey output keeps only a GRAY profile, a colour one only an RGB one."""
    chans = arr.shape[2]
    grey_out = (chans == 1 and fmt != "webp") or (chans == 2 and fmt in ("png", "tiff", "jxl") and arr.itemsize == 1)
    space = md.icc_colour_space(prep.icc or b"")
    if space in ("RGB", "GRAY") and (space == "GRAY") != grey_out:
        notes.append(
            f"the {space} colour profile cannot describe a {'grey' if grey_out else 'colour'} {fmt}; it was dropped"
        )
        prep.icc = None


_Later = md.Prepared  # the blocks left for exiv2 to write after the encoder


def _pil_image(arr: np.ndarray) -> Image.Image:
    if arr.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]))  # L, or I;16 for uint16
    return Image.fromarray(np.ascontiguousarray(arr))  # LA, RGB, RGBA


def _meta_params(prep: md.Prepared) -> dict:
    params: dict = {}
    if prep.icc:
        params["icc_profile"] = prep.icc
    if prep.exif:
        params["exif"] = prep.exif
    if prep.xmp:
        params["xmp"] = prep.xmp
    return params


def _enc_png(arr, quality, compression, prep, notes):
    data = encode_png(arr, compression, prep.icc, prep.exif_tiff, prep.xmp)
    return data, _Later(iptc=prep.iptc)


def _enc_jpg(arr, quality, compression, prep, notes):
    buf = io.BytesIO()
    _pil_image(arr).save(buf, "JPEG", quality=quality, **_meta_params(prep))
    return buf.getvalue(), _Later(iptc=prep.iptc)


def _enc_webp(arr, quality, compression, prep, notes):
    im = _pil_image(arr)
    if im.mode in ("L", "LA"):  # WebP has no grey layout: the same grey in three channels
        im = im.convert("RGBA" if im.mode == "LA" else "RGB")
    params = _meta_params(prep)
    if quality >= 100:  # quality 100 means "keep every pixel" for webp; exact keeps colour under alpha 0
        params.update(lossless=True, exact=True)
    buf = io.BytesIO()
    im.save(buf, "WEBP", quality=quality, **params)
    return buf.getvalue(), _Later()


def _enc_tiff(arr, quality, compression, prep, notes):
    """tifffile for every TIFF: 8 and 16 bits, grey, alpha as an unassociated extra sample, zlib at the rule's
    level, ICC as its tag. EXIF, XMP and IPTC are written by exiv2 afterwards."""
    import tifffile

    chans = arr.shape[2]
    if chans == 2 and arr.dtype == np.uint16:  # Pillow (and so our reader, and many others) cannot read it
        notes.append("16-bit grey with alpha was written as 16-bit RGBA (equal colour channels)")
        arr = np.dstack([arr[:, :, :1]] * 3 + [arr[:, :, 1:]])
        chans = 4
    photometric = "minisblack" if chans in (1, 2) else "rgb"
    extrasamples = ("unassalpha",) if chans in (2, 4) else None
    buf = io.BytesIO()
    data = arr[:, :, 0] if chans == 1 else arr
    tifffile.imwrite(
        buf,
        data,
        photometric=photometric,
        extrasamples=extrasamples,
        compression="zlib",
        compressionargs={"level": max(1, compression)} if compression else None,
        predictor=True if compression else None,
        iccprofile=prep.icc,
        metadata=None,
        software=None,
        extratags=[(700, "B", len(prep.xmp), prep.xmp, True)] if prep.xmp else None,  # XMP, written as it is
        bigtiff=arr.nbytes > 2**32 - 2**25,
    )
    return buf.getvalue(), _Later(exif=prep.exif, iptc=prep.iptc)


def _enc_avif(arr, quality, compression, prep, notes):
    if arr.dtype == np.uint16:  # Pillow's AVIF writer is 8-bit; OpenCV's writes 10 and 12 bits
        return _enc_avif_deep(arr, quality, prep, notes), _Later()
    im = _pil_image(arr)
    if im.mode == "LA":
        im = im.convert("RGBA")
    buf = io.BytesIO()
    im.save(buf, "AVIF", quality=quality, **_meta_params(prep))
    return buf.getvalue(), _Later()


def _enc_avif_deep(arr, quality, prep, notes):
    notes.append("avif holds up to 12 bits per sample; the 16-bit result was written at 12 bits")
    chans = arr.shape[2]
    if chans == 2:
        arr = np.dstack([arr[:, :, :1]] * 3 + [arr[:, :, 1:]])
        chans = 4
    deep = ((arr.astype(np.uint32) * 4095 + 32767) // 65535).astype(np.uint16)  # 16 -> 12 bits, rounded
    if chans == 3:
        deep = cv2.cvtColor(deep, cv2.COLOR_RGB2BGR)
    elif chans == 4:
        deep = cv2.cvtColor(deep, cv2.COLOR_RGBA2BGRA)
    kinds, blocks = [], []
    for kind, block in (
        (cv2.IMAGE_METADATA_ICCP, prep.icc),
        (cv2.IMAGE_METADATA_EXIF, prep.exif_tiff),
        (cv2.IMAGE_METADATA_XMP, prep.xmp),
    ):
        if block:
            kinds.append(kind)
            blocks.append(np.frombuffer(block, np.uint8))
    ok, buf = cv2.imencodeWithMetadata(
        ".avif", deep, kinds, blocks, [cv2.IMWRITE_AVIF_DEPTH, 12, cv2.IMWRITE_AVIF_QUALITY, quality]
    )
    if not ok:
        raise OutputError("OpenCV could not encode the 12-bit AVIF")
    return buf.tobytes()


def _enc_heic(arr, quality, compression, prep, notes):
    import pillow_heif

    q = -1 if quality >= 100 else quality  # pillow-heif: -1 is lossless
    params = _meta_params(prep)
    buf = io.BytesIO()
    if arr.dtype == np.uint16:  # HEIC holds 10 bits here (x265); pillow-heif scales 16 -> 10
        if arr.shape[2] == 2:  # no grey+alpha layout in pillow-heif: grey repeated into RGBA
            arr = np.dstack([arr[:, :, :1]] * 3 + [arr[:, :, 1:]])
        mode = {1: "L;16", 3: "RGB;16", 4: "RGBA;16"}[arr.shape[2]]
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        heif = pillow_heif.from_bytes(
            mode=mode, size=(arr.shape[1], arr.shape[0]), data=np.ascontiguousarray(arr).tobytes()
        )
        heif.save(buf, quality=q, **params)
        notes.append("heic holds 10 bits per sample here; the 16-bit result was written at 10 bits")
        return buf.getvalue(), _Later()
    im = _pil_image(arr)
    if im.mode == "LA":
        im = im.convert("RGBA")
    im.save(buf, "HEIF", quality=q, **params)
    return buf.getvalue(), _Later()


def _enc_jxl(arr, quality, compression, prep, notes):
    if arr.dtype == np.uint16 and arr.shape[2] != 1:  # the JXL plugin writes 16 bits for grey only
        notes.append("the jxl writer holds 16 bits for grey only; the colour result was reduced to 8 bits")
        arr = _to_8bit(arr)
    params = _meta_params(prep)
    if prep.exif:
        params["exif"] = prep.exif_tiff  # the plugin's EXIF box takes the TIFF data without its header
    buf = io.BytesIO()
    # use_original_profile: keep the input's ICC profile as it is (lossy JXL would otherwise encode in XYB and
    # write a synthesised profile in its place).
    _pil_image(arr).save(buf, "JXL", quality=quality, lossless=quality >= 100, use_original_profile=True, **params)
    return buf.getvalue(), _Later()


_ENCODERS = {
    "png": _enc_png,
    "jpg": _enc_jpg,
    "webp": _enc_webp,
    "tiff": _enc_tiff,
    "avif": _enc_avif,
    "heic": _enc_heic,
    "jxl": _enc_jxl,
}


# --- animations -------------------------------------------------------------------------------------------------------
_APNG_BLEND_SOURCE = 0
_GIF_RESTORE_PREVIOUS, _GIF_RESTORE_BACKGROUND = 3, 2


def _gif_palette(im: Image.Image) -> Image.Image:
    """The frame in 256 colours, done as each frame arrives so that the waiting frames take a third of the memory;
    a fully transparent colour becomes the transparent index.

    Fast octree, not Pillow's default median cut: on a 640x480 photo frame it took 3-13 ms instead of 340-500 ms,
    for 36.7 instead of 37.6 dB (benchmarks/animation.py; docs/formats.md).
    """
    if im.mode in ("L", "P"):
        return im
    p = im.quantize(256, method=Image.Quantize.FASTOCTREE)
    if p.palette is not None and p.palette.mode == "RGBA":
        for rgba, index in p.palette.colors.items():
            if rgba[3] == 0:
                p.info["transparency"] = index
                break
    return p


def encode_animation(
    frames: Iterable[Frame],
    fmt: str,
    *,
    loop: int | None = 0,
    quality: int = 95,
    compression: int = DEFAULT_PNG_COMPRESSION,
    meta: Metadata | Prepared | None = None,
    policy: str = "keep",
) -> tuple[bytes, list[str]]:
    """Encode whole-canvas frames (at output size) as an animated ``fmt``: gif, webp, or png (APNG).

    Each frame's duration is kept (GIF rounds to 10 ms), the loop count is kept (``None``: play once), and so is
    the disposal, with two exceptions that keep the output identical to the input as shown: a GIF "restore to
    previous" (3) becomes "restore to background" (2), since Pillow's GIF writer diffs each frame against the last
    one only; and APNG frames are blended with OP_SOURCE, since each frame already is the composed canvas and
    OP_OVER would lay semi-transparent edges over themselves. WebP's disposal and blending are chosen by libwebp's
    animation encoder. Frames are consumed one at a time; each is held once, at output size, until the file is
    written (Pillow's writers need them all to diff and merge), so the animation is never held twice.
    Identical consecutive frames are merged by the writers, their durations added.

    Raises:
        OutputError: ``fmt`` cannot hold an animation, its extra is missing, a frame is over the encoder's limits,
            frames differ in size or layout, or no frame was given.
    """
    if fmt not in ("gif", "webp", "png"):
        raise OutputError(f"{fmt} output cannot hold an animation; expected gif, webp or png (APNG)")
    formats.require_output(fmt)
    notes: list[str] = []
    images: list[Image.Image] = []
    durations: list[int] = []
    disposals: list[int] = []
    shape = None
    for i, frame in enumerate(frames):
        arr = frame.pixels
        _check_array(arr)
        if shape is None:
            shape = arr.shape
            formats.check_limits(fmt, arr.shape[1], arr.shape[0])
            if arr.dtype == np.uint16:
                notes.append(f"animated {fmt} is written at 8 bits per sample; the 16-bit result was reduced")
        elif arr.shape != shape:
            raise OutputError(
                f"frame {i + 1} is {arr.shape}, frame 1 is {shape}: all frames of an animation "
                "must have the same size and channels"
            )
        if arr.dtype == np.uint16:
            arr = _to_8bit(arr)
        im = _pil_image(arr)
        if im.mode == "LA":
            im = im.convert("RGBA")
        if fmt == "gif":
            im = _gif_palette(im)  # 1 byte a pixel while the frames wait, instead of 3 or 4
        images.append(im)
        durations.append(max(0, int(frame.duration_ms)))
        disposals.append(frame.disposal)
    if not images:
        raise OutputError("an animation needs at least one frame, got none")
    prep, meta_notes = _prepared(meta, policy, fmt, images[0].size)
    notes += meta_notes
    buf = io.BytesIO()
    single = len(images) == 1  # the writers take per-frame lists only for several frames
    params: dict = {
        "save_all": not single,
        "append_images": images[1:],
        "duration": durations[0] if single else durations,
    }
    if loop is not None:
        params["loop"] = int(loop)
    elif fmt in ("webp", "png"):
        params["loop"] = 1  # "play once": these formats' writers default to forever
    try:
        if fmt == "gif":
            gif_disposal = [_GIF_RESTORE_BACKGROUND if d == _GIF_RESTORE_PREVIOUS else d for d in disposals]
            params["disposal"] = gif_disposal[0] if single else gif_disposal
            images[0].save(buf, "GIF", **params)
        elif fmt == "png":
            apng_disposal = [d if d in (0, 1, 2) else 0 for d in disposals]
            params.update(
                disposal=apng_disposal[0] if single else apng_disposal,
                blend=_APNG_BLEND_SOURCE,
                compress_level=max(1, min(compression, 9)),
                default_image=False,
            )
            params.update(_meta_params(md.Prepared(icc=prep.icc, exif=prep.exif)))
            images[0].save(buf, "PNG", **params)
        else:
            params.update(_meta_params(prep))
            if quality >= 100:
                params.update(lossless=True, exact=True)
            images[0].save(buf, "WEBP", quality=quality, **params)
    except UpscaledError:
        raise
    except Exception as exc:
        raise OutputError(
            f"the animated {fmt} encoder failed on {len(images)} frames of "
            f"{images[0].size[0]}x{images[0].size[1]}: {exc}"
        ) from None
    data = buf.getvalue()
    if fmt == "png" and prep.xmp:
        data = insert_xmp(data, prep.xmp)
    if fmt == "png" and prep.iptc:
        try:
            data = md.exiv2_write(data, iptc=prep.iptc)
        except Exception as exc:
            notes.append(f"exiv2 could not write the png metadata; it was dropped ({exc})")
    return data, notes
