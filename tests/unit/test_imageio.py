"""Decode and encode keep orientation, colour profile, alpha, bit depth and greyscale."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from daemon.errors import DecodeError, EmptyFileError, ImageTooLargeError
from daemon.imageio import decode, decode_bytes, encode, to_output_array
from models.errors import UnsupportedImageError

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
rng = np.random.default_rng(7)


def _roundtrip(arr: np.ndarray, fmt: str, **kw) -> tuple[np.ndarray, object]:
    data, _ = encode(arr, fmt, **kw)
    d = decode_bytes(data, 10**8)
    return to_output_array(d.rgb, d.alpha, d.bits, d.grey), d


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_colour_survives_exactly_with_its_profile(fmt):
    a = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    back, d = _roundtrip(a, fmt, icc=SRGB)
    assert d.bits == 16 and not d.grey and d.icc == SRGB
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_grey_stays_grey_and_16bit(fmt):
    a = rng.integers(0, 65536, (9, 11, 1), dtype=np.uint16)
    back, d = _roundtrip(a, fmt)
    assert d.bits == 16 and d.grey
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize(("chans", "fmt"), [(1, "png"), (2, "png"), (3, "png"), (4, "png"), (4, "webp"), (3, "tiff")])
def test_8bit_layouts_round_trip(chans, fmt):
    a = rng.integers(0, 256, (10, 12, chans), dtype=np.uint8)
    back, d = _roundtrip(a, fmt, quality=100)
    assert d.grey == (chans in (1, 2)) and (d.alpha is not None) == (chans in (2, 4))
    np.testing.assert_array_equal(back, a)  # webp at quality 100 is lossless


def test_exif_orientation_is_applied_and_reset(tmp_path):
    arr = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "o.png"
    im.save(path, exif=exif.tobytes())
    d = decode(path, 10**8)
    assert d.rgb.shape == (6, 4, 3)
    expected = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270), np.float32) / 255
    np.testing.assert_allclose(d.rgb, expected, atol=1e-6)
    data, _ = encode(to_output_array(d.rgb, None, 8, False), "jpg", exif=d.exif)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 1


def test_palette_and_cmyk_are_converted(tmp_path):
    p = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P")
    p.save(tmp_path / "p.png")
    assert decode(tmp_path / "p.png", 10**8).rgb.shape == (8, 8, 3)
    Image.new("CMYK", (5, 5), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    d = decode(tmp_path / "c.jpg", 10**8)
    assert d.rgb.shape == (5, 5, 3) and d.rgb[..., 1].mean() < 0.2  # magenta: little green


def test_jpeg_output_flattens_alpha_and_16bit_with_notes():
    a = np.zeros((4, 4, 4), np.uint16)
    a[..., 3] = 0  # fully transparent -> white
    data, notes = encode(a, "jpg")
    assert any("8 bits" in n for n in notes) and any("alpha" in n for n in notes)
    assert np.asarray(Image.open(io.BytesIO(data))).min() >= 250


def test_bad_inputs_raise_clear_typed_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(EmptyFileError, match="0 bytes"):
        decode(tmp_path / "empty.png", 10**8)
    with pytest.raises(DecodeError, match="not an image"):
        decode_bytes(b"hello, I am text\n" * 10, 10**8, "t.png")
    good, _ = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "png")
    with pytest.raises(DecodeError, match="damaged or truncated"):
        decode_bytes(good[: len(good) // 2], 10**8)
    jpg, _ = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "jpg")
    with pytest.raises(DecodeError):
        decode_bytes(jpg[: len(jpg) // 3], 10**8)
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        decode_bytes(good, 64 * 64 - 1)
    buf = io.BytesIO()
    Image.new("F", (4, 4)).save(buf, "TIFF")
    with pytest.raises(UnsupportedImageError, match="mode F"):
        decode_bytes(buf.getvalue(), 10**8)


def test_decompression_bomb_is_refused_before_decoding():
    # A PNG header claiming 30000 x 30000 pixels with a tiny compressed body.
    import struct

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    png = b"\x89PNG\r\n\x1a\n" + body
    with pytest.raises(ImageTooLargeError, match="900000000 pixels"):
        decode_bytes(png, 100_000_000)
