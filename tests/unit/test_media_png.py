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

from daemon.imageio import Metadata, encode
from daemon.media.png import DEFAULT_PNG_COMPRESSION, png_params
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
@pytest.mark.parametrize(("chans", "dtype"), [(1, np.uint8), (2, np.uint8), (3, np.uint8), (4, np.uint8),
                                              (1, np.uint16), (3, np.uint16), (4, np.uint16)])
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
    assert png_params(1) == [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
                             cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


@pytest.mark.parametrize(("chans", "dtype"), [(3, np.uint8), (4, np.uint8), (3, np.uint16), (4, np.uint16)])
def test_icc_exif_xmp_iptc_alpha_and_16bit_are_all_kept(chans, dtype):
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif.get_ifd(0x8769)[0xA002] = 1
    xmp = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
           b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
           b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title><rdf:Alt><rdf:li xml:lang="x-default">Kept'
           b"</rdf:li></rdf:Alt></dc:title></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>")
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


def test_16bit_grey_with_alpha_keeps_alpha_as_rgba():
    a = smooth(chans=2, dtype=np.uint16)
    data, notes = encode(a, "png")
    assert notes == ["16-bit grey with alpha was written as 16-bit RGBA (equal colour channels)"]
    back = read_cv2(data)
    np.testing.assert_array_equal(back[:, :, 3], a[:, :, 1])
    for c in range(3):
        np.testing.assert_array_equal(back[:, :, c], a[:, :, 0])
