"""Metadata under keep / strip / basic: what survives, what is fitted to the new size, what is dropped with a note.

Outputs are read back with exiv2 (pyexiv2) or tifffile, not with the Pillow code that wrote most of them.
"""

from __future__ import annotations

import io

import numpy as np
import pyexiv2
import pytest
from PIL import Image, ImageCms

from daemon.imageio import Metadata, encode
from daemon.media import formats, metadata
from daemon.media.decode import decode_bytes

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
TITLE = "Harbour at dawn"
XMP = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"
 xmlns:exif="http://ns.adobe.com/exif/1.0/" tiff:ImageWidth="60" tiff:ImageLength="40" tiff:Orientation="6"
 exif:PixelXDimension="60" exif:PixelYDimension="40">
<dc:title><rdf:Alt><rdf:li xml:lang="x-default">{TITLE}</rdf:li></rdf:Alt></dc:title>
</rdf:Description></rdf:RDF></x:xmpmeta>
<?xpacket end="w"?>""".encode()
DATE = "2019:05:06 07:08:09"
ALL = ["png", "jpg", "webp", "tiff", "avif", "heic", "jxl"]


def _exif(width: int = 60, height: int = 40) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif[0x0112] = 1
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = DATE
    sub[0xA002], sub[0xA003] = width, height
    return exif


def tagged_jpeg() -> bytes:
    """A 60x40 JPEG with ICC, EXIF (Make, date, pixel size), XMP (title, sizes) and IPTC (title, keywords), the
    XMP and IPTC written by exiv2 as a photo manager would."""
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", quality=95, icc_profile=SRGB, exif=_exif().tobytes())
    img = pyexiv2.ImageData(buf.getvalue())
    img.modify_raw_xmp(XMP.decode())
    img.modify_iptc({"Iptc.Application2.ObjectName": TITLE, "Iptc.Application2.Keywords": ["sea", "boats"]})
    data = img.get_bytes()
    img.close()
    return data


def same_profile(got: bytes | None, fmt: str) -> bool:
    """The output's profile is ours: byte for byte, except in JPEG XL, which stores a known profile such as sRGB as
    an enumerated colour encoding and gives back an equivalent profile of its own."""
    if fmt != "jxl":
        return got == SRGB
    return (
        got is not None and ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(got))).strip() == "sRGB"
    )


def read_back(data: bytes) -> dict:
    img = pyexiv2.ImageData(data)
    try:
        return {"exif": img.read_exif(), "xmp": img.read_xmp(), "iptc": img.read_iptc(), "icc": img.read_icc()}
    finally:
        img.close()


def _x2(d) -> np.ndarray:
    return np.repeat(np.repeat(d.first.pixels, 2, axis=0), 2, axis=1)


def test_decode_reads_every_block():
    d = decode_bytes(tagged_jpeg(), 10**8)
    m = d.meta
    assert m.icc == SRGB and m.captured == DATE and m.date() == "2019-05-06"
    assert TITLE.encode() in m.xmp
    assert m.iptc == {"Iptc.Application2.ObjectName": TITLE, "Iptc.Application2.Keywords": ["sea", "boats"]}
    assert Image.Exif().load(m.exif) is None  # a loadable EXIF block


@pytest.mark.parametrize("fmt", ["jpg", "png", "tiff"])
def test_keep_carries_everything_with_the_new_size(fmt):
    d = decode_bytes(tagged_jpeg(), 10**8)
    data, notes = encode(_x2(d), fmt, meta=d.meta, policy="keep")
    got = read_back(data)
    assert got["exif"]["Exif.Image.Make"] == "TestCam"
    assert got["exif"]["Exif.Photo.DateTimeOriginal"] == DATE
    # Stale sizes were the second half of the bug: the EXIF and the XMP now state the output's size.
    assert (got["exif"]["Exif.Photo.PixelXDimension"], got["exif"]["Exif.Photo.PixelYDimension"]) == ("120", "80")
    assert (got["xmp"]["Xmp.tiff.ImageWidth"], got["xmp"]["Xmp.tiff.ImageLength"]) == ("120", "80")
    assert (got["xmp"]["Xmp.exif.PixelXDimension"], got["xmp"]["Xmp.exif.PixelYDimension"]) == ("120", "80")
    assert got["xmp"]["Xmp.tiff.Orientation"] == "1"
    assert TITLE in str(got["xmp"]["Xmp.dc.title"])
    assert got["iptc"]["Iptc.Application2.Keywords"] == ["sea", "boats"]
    assert got["icc"] == SRGB
    assert notes == []


@pytest.mark.parametrize("fmt", ["webp", "avif", "heic", "jxl"])
def test_keep_in_formats_without_iptc_keeps_the_rest_and_says_so(fmt):
    d = decode_bytes(tagged_jpeg(), 10**8)
    data, notes = encode(_x2(d), fmt, meta=d.meta, policy="keep")
    formats.register_plugins()
    im = Image.open(io.BytesIO(data))
    exif = im.getexif()
    assert exif[0x010F] == "TestCam" and exif.get_ifd(0x8769)[0xA002] == 120
    assert same_profile(im.info.get("icc_profile"), fmt)
    if fmt != "jxl":  # the JXL plugin writes the XMP box but does not read it back; exiv2 does
        assert TITLE.encode() in im.info["xmp"]
    else:
        assert TITLE in str(read_back(data)["xmp"]["Xmp.dc.title"])
    assert notes == [f"{fmt} cannot hold IPTC; it was dropped"]


@pytest.mark.parametrize("fmt", ALL)
def test_strip_keeps_only_the_profile(fmt):
    d = decode_bytes(tagged_jpeg(), 10**8)
    data, _ = encode(_x2(d), fmt, meta=d.meta, policy="strip")
    formats.register_plugins()
    im = Image.open(io.BytesIO(data))
    assert same_profile(im.info.get("icc_profile"), fmt)
    assert not im.getexif().get(0x010F)
    assert TITLE.encode() not in data  # neither the XMP title nor the IPTC one is anywhere in the file


@pytest.mark.parametrize("fmt", ["jpg", "png", "tiff", "webp"])
def test_basic_keeps_the_profile_and_the_capture_date(fmt):
    d = decode_bytes(tagged_jpeg(), 10**8)
    data, _ = encode(_x2(d), fmt, meta=d.meta, policy="basic")
    got = read_back(data)
    assert got["exif"].get("Exif.Photo.DateTimeOriginal") == DATE
    assert "Exif.Image.Make" not in got["exif"] and not got["xmp"] and not got["iptc"]
    assert got["icc"] == SRGB


def test_tiff_input_structure_tags_never_reach_the_output():
    """Pillow's getexif() on a TIFF is the TIFF's own IFD: width, strips, compression. None of it may be kept."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(
        buf, "TIFF", tiffinfo={271: "TestCam"}, compression="tiff_lzw"
    )
    d = decode_bytes(buf.getvalue(), 10**8)
    kept = Image.Exif()
    kept.load(d.meta.exif)
    assert kept[0x010F] == "TestCam"
    assert not set(kept) & metadata.STRUCTURAL_TAGS, sorted(set(kept) & metadata.STRUCTURAL_TAGS)
    for fmt in ("tiff", "jpg", "png"):
        data, _ = encode(_x2(d), fmt, meta=d.meta)
        exif = read_back(data)["exif"]
        width = exif.get("Exif.Image.ImageWidth")
        assert width in (None, "120"), (fmt, width)  # only TIFF has the tag, and then it is its own


def test_a_broken_exif_block_is_dropped_with_a_note_not_a_failure():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "PNG", exif=b"Exif\x00\x00MM\x00*garbage")
    d = decode_bytes(buf.getvalue(), 10**8)
    assert d.meta.exif is None or isinstance(d.meta.exif, bytes)
    data, _ = encode(d.first.pixels, "png", meta=d.meta)
    assert decode_bytes(data, 100).width == 4


def test_an_rgb_profile_is_not_written_on_a_grey_output():
    data, notes = encode(np.zeros((4, 4, 1), np.uint8), "png", meta=Metadata(icc=SRGB))
    assert notes == ["the RGB colour profile cannot describe a grey png; it was dropped"]
    assert "icc_profile" not in Image.open(io.BytesIO(data)).info


def test_gif_carries_no_metadata_and_says_so():
    d = decode_bytes(tagged_jpeg(), 10**8)
    _, notes = encode(d.first.pixels, "gif", meta=d.meta)
    assert any("cannot hold EXIF or XMP or IPTC" in n for n in notes)


def test_prepare_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="got 'full'"):
        metadata.prepare(Metadata(), "full", "png", (1, 1))


def test_date_of_a_bad_capture_string_is_none():
    assert Metadata(captured="not a date").date() is None
    assert Metadata(captured="2020:01:02 03:04:05").date("%Y%m%d") == "20200102"


@pytest.mark.parametrize("fmt", ALL)
def test_every_format_reads_back_what_it_carries_as_an_input(fmt):
    """An output dropped into another rule: its metadata is read again, whatever the container."""
    d = decode_bytes(tagged_jpeg(), 10**8)
    data, _ = encode(d.first.pixels, fmt, meta=d.meta)
    again = decode_bytes(data, 10**8).meta
    assert again.captured == DATE and again.exif is not None and same_profile(again.icc, fmt)
    assert TITLE.encode() in again.xmp
    assert (again.iptc is not None) == ("iptc" in metadata.CARRIES[fmt])
