"""The PNG fast path: every compression level is lossless for every layout, the levels trade time for size in
order, and ICC (iCCP), EXIF (eXIf), XMP (iTXt), alpha and 16 bits are all kept, checked on the chunks themselves
and with exiv2. Speed is measured by benchmarks/encode.py, not here."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pyexiv2
import pytest
from PIL import Image, ImageCms

from daemon.errors import OutputError
from daemon.imageio import Metadata, encode
from daemon.media.png import DEFAULT_PNG_COMPRESSION, encode_png, png_settings
from tests.conftest import SET5

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
BIRD = SET5 / "HR" / "bird.png"


def smooth(h: int = 96, w: int = 128, chans: int = 3, dtype=np.uint8) -> np.ndarray:
    """A model-like picture: a real photo enlarged x4 (smooth), or a gradient where Set5 is not there."""
    if BIRD.exists():
        src = np.asarray(Image.open(BIRD).convert("RGB"))[100:124, 100:132]
        rgb = cv2.resize(src, (w, h), interpolation=cv2.INTER_LANCZOS4)
    else:
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.dstack([x * 2, y * 2, x + y]).astype(np.uint8)
    arr = rgb.astype(np.uint16) * 257 if dtype == np.uint16 else rgb
    if chans in (1, 2):
        arr = arr[:, :, :1]
    if chans in (2, 4):
        arr = np.dstack([arr, np.tile(np.linspace(0, np.iinfo(dtype).max, w).astype(dtype), (h, 1))])
    return np.ascontiguousarray(arr)


def chunks(png: bytes) -> dict[bytes, list[bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out: dict[bytes, list[bytes]] = {}
    i = 8
    while i < len(png):
        (n,) = struct.unpack(">I", png[i : i + 4])
        kind, body = png[i + 4 : i + 8], png[i + 8 : i + 8 + n]
        assert struct.unpack(">I", png[i + 8 + n : i + 12 + n])[0] == zlib.crc32(kind + body)
        out.setdefault(kind, []).append(body)
        i += 12 + n
    return out


def read_cv2(png: bytes) -> np.ndarray:
    a = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if a.ndim == 2:
        return a[:, :, None]
    return cv2.cvtColor(a, cv2.COLOR_BGR2RGB if a.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)


@pytest.mark.parametrize("level", range(10))
@pytest.mark.parametrize(
    ("chans", "dtype"),
    [(1, np.uint8), (2, np.uint8), (3, np.uint8), (4, np.uint8), (1, np.uint16), (3, np.uint16), (4, np.uint16)],
)
def test_every_level_is_lossless_for_every_layout(level, chans, dtype):
    a = smooth(chans=chans, dtype=dtype)
    data, notes = encode(a, "png", compression=level)
    assert notes == []
    back = read_cv2(data) if chans != 2 else np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(back, a)


def test_levels_trade_time_for_size_in_order():
    a = smooth(192, 256)
    size = {level: len(encode(a, "png", compression=level)[0]) for level in (0, 1, 2, 6, 9)}
    assert size[0] > size[1] > size[2] and size[9] <= size[6]
    assert DEFAULT_PNG_COMPRESSION == 1
    assert png_settings(1) == (1, zlib.Z_RLE, True)  # deflate level 1, run-length strategy, rows UP-filtered
    assert png_settings(0)[2] is False and png_settings(6) == (6, zlib.Z_DEFAULT_STRATEGY, True)
    with pytest.raises(OutputError, match="0-9"):
        png_settings(10)


@pytest.mark.parametrize("level", [0, 1, 6])
def test_the_rows_are_filtered_as_the_level_says_and_level_1_is_the_stream_libpng_writes(level):
    """Each scanline starts with its filter type: none (0) at level 0, UP (2) on every row above it. At 1 the
    deflate stream has the settings libpng uses for OpenCV's level 1, RLE, UP: the same size within a per cent
    (zlib-ng's and zlib's matchers differ by a few bytes)."""
    a = smooth(192, 256)
    data = encode_png(a, level)
    idat = b"".join(chunks(data)[b"IDAT"])
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(192, 256 * 3 + 1)
    assert set(raw[:, 0].tolist()) == ({0} if level == 0 else {2})
    if level == 1:
        ok, ref = cv2.imencode(
            ".png",
            cv2.cvtColor(a, cv2.COLOR_RGB2BGR),
            [
                cv2.IMWRITE_PNG_COMPRESSION,
                1,
                cv2.IMWRITE_PNG_STRATEGY,
                cv2.IMWRITE_PNG_STRATEGY_RLE,
                cv2.IMWRITE_PNG_FILTER,
                cv2.IMWRITE_PNG_FILTER_UP,
            ],
        )
        assert ok and abs(len(data) - len(ref)) <= 0.01 * len(ref), (len(data), len(ref))


def test_a_large_image_is_written_in_bands_with_the_rows_across_band_edges_filtered_from_the_row_above():
    """Rows are filtered band by band (about 4 MB each): the first row of a band takes the last row of the band
    before as its "above". A 2000x1000 RGB picture spans two bands; decoded by Pillow and by OpenCV, it is exact."""
    rng = np.random.default_rng(5)
    a = np.repeat(np.repeat(rng.integers(0, 256, (200, 100, 3), dtype=np.uint8), 10, axis=0), 10, axis=1)
    for level in (0, 1, 3):
        data = encode_png(a, level)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), a)
        np.testing.assert_array_equal(read_cv2(data), a)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((4, 4, 5), np.uint8),
    ],
)
def test_what_a_png_cannot_hold_is_refused_by_name(arr):
    with pytest.raises(OutputError, match="cannot write a PNG"):
        encode_png(arr, 1)


@pytest.mark.parametrize(("chans", "dtype"), [(3, np.uint8), (4, np.uint8), (3, np.uint16), (4, np.uint16)])
def test_icc_exif_xmp_iptc_alpha_and_16bit_are_all_kept(chans, dtype):
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif.get_ifd(0x8769)[0xA002] = 1
    xmp = (
        b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title><rdf:Alt><rdf:li xml:lang="x-default">Kept'
        b'</rdf:li></rdf:Alt></dc:title></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    meta = Metadata(icc=SRGB, exif=exif.tobytes(), xmp=xmp, iptc={"Iptc.Application2.Keywords": ["k1", "k2"]})
    a = smooth(chans=chans, dtype=dtype)
    data, notes = encode(a, "png", meta=meta)
    assert notes == []
    c = chunks(data)
    assert c[b"IHDR"][0][8] == (16 if dtype == np.uint16 else 8)  # bit depth
    assert c[b"IHDR"][0][9] == (6 if chans == 4 else 2)  # colour type: RGBA or RGB
    iccp = c[b"iCCP"][0]
    assert zlib.decompress(iccp[iccp.index(b"\0") + 2 :]) == SRGB
    assert len(c[b"eXIf"]) == 1 and c[b"eXIf"][0].startswith((b"MM\x00*", b"II*\x00"))  # TIFF data, no header
    assert any(body.startswith(b"XML:com.adobe.xmp\0") for body in c.get(b"iTXt", []))
    np.testing.assert_array_equal(read_cv2(data), a)
    img = pyexiv2.ImageData(data)
    try:
        assert img.read_exif()["Exif.Image.Make"] == "TestCam"
        assert img.read_exif()["Exif.Photo.PixelXDimension"] == str(a.shape[1])  # fitted to the output
        assert "Kept" in str(img.read_xmp()["Xmp.dc.title"])
        assert img.read_iptc()["Iptc.Application2.Keywords"] == ["k1", "k2"]
        assert img.read_icc() == SRGB
    finally:
        img.close()


def test_16bit_grey_with_alpha_is_written_as_16bit_grey_with_alpha():
    a = smooth(chans=2, dtype=np.uint16)
    data, notes = encode(a, "png")
    assert notes == []
    assert chunks(data)[b"IHDR"][0][8:10] == bytes([16, 4])  # 16 bits, colour type 4: grey with alpha
    back = read_cv2(data)  # libpng expands grey+alpha to BGRA
    np.testing.assert_array_equal(back[:, :, 3], a[:, :, 1])
    for c in range(3):
        np.testing.assert_array_equal(back[:, :, c], a[:, :, 0])
