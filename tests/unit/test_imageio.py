"""Decode and encode keep orientation, colour profile, alpha, bit depth and greyscale; probe reads only headers;
assemble turns model output into the integers to encode; encode refuses what its encoder cannot hold."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from daemon.errors import DecodeError, EmptyFileError, ImageTooLargeError, OutputError
from daemon.imageio import (
    Metadata,
    assemble,
    encode,
    to_output_array,
)
from daemon.media import formats
from daemon.media.decode import decode, decode_bytes, probe
from models.errors import UnsupportedImageError

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
rng = np.random.default_rng(7)


def _roundtrip(arr: np.ndarray, fmt: str, **kw) -> tuple[np.ndarray, object]:
    data, _ = encode(arr, fmt, **kw)
    d = decode_bytes(data, 10**8)
    return d.first.pixels, d


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_colour_survives_exactly_with_its_profile(fmt):
    a = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    back, d = _roundtrip(a, fmt, meta=Metadata(icc=SRGB))
    assert d.bits == 16 and not d.grey and d.icc == SRGB and back.dtype == np.uint16
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_grey_stays_grey_and_16bit(fmt):
    a = rng.integers(0, 65536, (9, 11, 1), dtype=np.uint16)
    back, d = _roundtrip(a, fmt)
    assert d.bits == 16 and d.grey
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize(
    ("chans", "fmt"),
    [(1, "png"), (2, "png"), (3, "png"), (4, "png"), (4, "webp"), (3, "tiff"), (2, "tiff"), (4, "tiff"), (4, "jxl")],
)
def test_8bit_layouts_round_trip_as_uint8(chans, fmt):
    a = rng.integers(0, 256, (10, 12, chans), dtype=np.uint8)
    back, d = _roundtrip(a, fmt, quality=100)
    assert d.grey == (chans in (1, 2)) and d.has_alpha == (chans in (2, 4))
    assert back.dtype == np.uint8  # 8-bit stays uint8 end to end
    np.testing.assert_array_equal(back, a)  # webp and jxl at quality 100 are lossless


def test_colour_alpha_and_rgb_views():
    a = rng.integers(0, 256, (5, 6, 2), dtype=np.uint8)
    _, d = _roundtrip(a, "png")
    assert d.colour().shape == (5, 6, 3) and d.colour().dtype == np.uint8
    np.testing.assert_array_equal(d.colour()[:, :, 2], a[:, :, 0])  # grey repeated
    np.testing.assert_array_equal(d.alpha_native(), a[:, :, 1])
    np.testing.assert_allclose(d.alpha, a[:, :, 1] / 255.0, atol=1e-7)
    assert d.alpha.dtype == np.float32
    np.testing.assert_allclose(d.rgb, a[:, :, :1].repeat(3, axis=2) / 255.0, atol=1e-7)
    assert d.rgb.dtype == np.float32 and d.width == 6 and d.height == 5 and d.frames == 1
    assert list(d.rest()) == []


def test_exif_orientation_is_applied_and_reset(tmp_path):
    arr = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "o.png"
    im.save(path, exif=exif.tobytes())
    d = decode(path, 10**8)
    assert d.first.pixels.shape == (6, 4, 3)
    expected = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(d.first.pixels, expected)
    data, _ = encode(d.first.pixels, "jpg", meta=d.meta)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 1


def test_palette_and_cmyk_are_converted(tmp_path):
    p = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P")
    p.save(tmp_path / "p.png")
    assert decode(tmp_path / "p.png", 10**8).first.pixels.shape == (8, 8, 3)
    Image.new("CMYK", (5, 5), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    d = decode(tmp_path / "c.jpg", 10**8)
    assert d.first.pixels.shape == (5, 5, 3) and d.first.pixels[..., 1].mean() < 50  # magenta: little green


def test_bmp_and_still_gif_default_to_png(tmp_path):
    Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp_path / "a.bmp")
    Image.new("P", (3, 2)).save(tmp_path / "a.gif")
    assert decode(tmp_path / "a.bmp", 100).format == "png"
    assert decode(tmp_path / "a.gif", 100).format == "png"


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
        decode_bytes(b"hello, I am text\n" * 10, 10**8, name="t.png")
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


def test_links_and_fifos_are_not_read(tmp_path):
    import os

    target = tmp_path / "real.png"
    Image.new("RGB", (2, 2)).save(target)
    (tmp_path / "link.png").symlink_to(target)
    with pytest.raises(UnsupportedImageError, match="symbolic link"):
        decode(tmp_path / "link.png", 100)
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(UnsupportedImageError, match="not a regular file"):  # and does not block on the open
        decode(tmp_path / "fifo.png", 100)


def _bomb(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageTooLargeError, match="900000000 pixels"):
        decode_bytes(_bomb(30000, 30000), 100_000_000)


def test_probe_reads_the_header_only(tmp_path):
    p = probe(io.BytesIO(_bomb(30000, 20000)), 10**9, name="bomb.png")  # its pixels would be 1.8 GB
    assert (p.format, p.width, p.height, p.frames, p.animated) == ("png", 30000, 20000, 1, False)
    with pytest.raises(ImageTooLargeError, match="max_pixels limit of 1000"):
        probe(io.BytesIO(_bomb(100, 100)), 1000, name="x.png")
    # A 2 GB sparse file of zeros: refused from its first bytes, without reading the rest.
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as fh:
        fh.truncate(2 * 1024**3)
    with open(sparse, "rb") as fh:
        with pytest.raises(DecodeError, match="not an image"):
            probe(fh, 10**8)
        assert fh.tell() < 1024**2  # Pillow looked at the first bytes only


def test_assemble_keeps_uint8_and_quantises_floats():
    colour = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    out = assemble(colour, alpha, 8, grey=False)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 4)
    np.testing.assert_array_equal(out[:, :, :3], colour)
    np.testing.assert_array_equal(out[:, :, 3], alpha)
    f = assemble(colour / 255.0, alpha.astype(np.float32) / 255, 16, grey=False)  # float path to 16 bits
    assert f.dtype == np.uint16
    np.testing.assert_array_equal(f[:, :, :3], colour.astype(np.uint16) * 257)
    grey = assemble(np.repeat(colour[:, :, :1], 3, axis=2), None, 8, grey=True)
    assert grey.shape == (4, 5, 1)
    np.testing.assert_array_equal(grey[:, :, 0], colour[:, :, 0])  # equal channels: luma is the value itself
    np.testing.assert_array_equal(to_output_array(colour / 255.0, None, 8, False), colour)
    with pytest.raises(UnsupportedImageError, match="same size"):
        assemble(colour, alpha[:2], 8, grey=False)
    with pytest.raises(UnsupportedImageError, match=r"\(H, W, 3\)"):
        assemble(colour[:, :, :2], None, 8, grey=False)


@pytest.mark.parametrize(
    ("fmt", "size", "limit"),
    [("webp", (16384, 1), "16383"), ("jpg", (65501, 1), "65500"), ("avif", (1, 32769), "32768")],
)
def test_encoder_limits_are_checked_before_encoding(fmt, size, limit):
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    with pytest.raises(OutputError, match=f"{size[0]}x{size[1]} image is over the {fmt} encoder's limit of {limit}"):
        encode(arr, fmt)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(OutputError, match="expected one of png"):
        encode(np.zeros((2, 2, 3), np.uint8), "bmp")
    with pytest.raises(OutputError, match="uint8 or uint16"):
        encode(np.zeros((2, 2, 3), np.float32), "png")
    with pytest.raises(OutputError, match="compression must be 0-9, got 12"):
        encode(np.zeros((2, 2, 3), np.uint8), "png", compression=12)
    with pytest.raises(OutputError, match="metadata policy must be one of keep, strip, basic"):
        encode(np.zeros((2, 2, 3), np.uint8), "png", policy="all")


def test_a_missing_extra_names_the_package_to_install(monkeypatch):
    # pillow-heif is installed here; stand in for a machine without it (the one thing that cannot run for real).
    monkeypatch.setattr(formats, "register_plugins", lambda: {"heif": "No module named 'pillow_heif'"})
    with pytest.raises(OutputError, match=r"pip install 'upscaled\[heif\]'"):
        encode(np.zeros((2, 2, 3), np.uint8), "heic")
    head = b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20
    assert formats.missing_input_codec(head) == "heif"
