"""Every input format against every output format, checked by a second reader.

Each case builds a real input file with a real encoder, decodes it with :func:`daemon.media.decode.decode_bytes`,
enlarges it x2 (nearest neighbour: a stand-in for a model that keeps the test exact), assembles and encodes it with
:func:`daemon.imageio.encode`, and reads the result back with a reader that is not the one we decode with: tifffile
for TIFF (whose tags are checked too: the bug wrote the input's ``ImageWidth`` into the output), OpenCV for PNG,
JPEG, WebP and AVIF, pillow-heif's own reader for HEIC and the JXL plugin for JPEG XL. The size must be the
output's, and the pixels must be what was encoded: exactly for lossless outputs, within a PSNR bound for lossy ones.

``python tests/integration/test_formats.py`` prints the whole table (size, PSNR, notes) for the report.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daemon import imageio  # noqa: E402
from daemon.media import decode, formats  # noqa: E402
from models.pixels import alpha_of, colour_of  # noqa: E402
from tests.conftest import SET5  # noqa: E402

BABY = SET5 / "HR" / "baby.png"
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
W, H = 60, 40  # the size in the bug report
OUTPUTS = ["png", "jpg", "webp", "tiff", "avif", "heic", "jxl"]
LOSSLESS = {"png", "tiff", "jxl", "webp"}  # webp and jxl at quality 100
# PSNR floors (dB) for lossy outputs at quality 90, measured on these crops with a margin of several dB.
PSNR_FLOOR = {"jpg": 35.0, "avif": 35.0, "heic": 35.0, "jxl": 35.0}


@dataclass(frozen=True)
class Case:
    fmt: str  # input format
    layout: str  # grey8, rgb8, rgba8, grey16, rgb16, rgba16

    @property
    def id(self) -> str:
        return f"{self.fmt}-{self.layout}"

    @property
    def deep(self) -> bool:
        return self.layout.endswith("16")


INPUTS = [
    Case(f, layout)
    for f, layouts in {
        "png": ["grey8", "rgb8", "rgba8", "grey16", "rgb16", "rgba16"],
        "jpg": ["grey8", "rgb8"],
        "webp": ["rgb8", "rgba8"],
        "tiff": ["grey8", "rgb8", "rgba8", "grey16", "rgb16", "rgba16"],
        "bmp": ["rgb8"],
        "gif": ["rgb8", "rgba8"],
        "heic": ["rgb8", "rgba8", "rgb16"],
        "avif": ["rgb8", "rgba8"],
        "jxl": ["grey8", "rgb8", "rgba8", "grey16"],
    }.items()
    for layout in layouts
]


def photo(layout: str) -> np.ndarray:
    """A W x H crop of a real photograph in ``layout`` (smooth alpha gradient where there is alpha)."""
    if BABY.exists():
        rgb = np.asarray(Image.open(BABY).convert("RGB"))[200 : 200 + H, 220 : 220 + W]
    else:  # a smooth synthetic picture, so lossy bounds still hold
        y, x = np.mgrid[0:H, 0:W]
        rgb = np.dstack([x * 4, y * 6, (x + y) * 2]).astype(np.uint8)
    deep = layout.endswith("16")
    # 16 real bits: the 8-bit picture times 256 plus a ramp in the low byte (never above 65535)
    arr = rgb.astype(np.uint16) * 256 + (np.arange(W) % 200)[None, :, None].astype(np.uint16) if deep else rgb
    if layout.startswith("grey"):
        arr = np.rint(arr @ np.array([0.299, 0.587, 0.114])).astype(arr.dtype)[:, :, None]
    if layout.startswith("rgba"):
        peak = 65535 if deep else 255
        alpha = np.tile(np.linspace(0, peak, W), (H, 1)).round().astype(arr.dtype)
        alpha[:, :3] = 0  # fully transparent edge: lossless writers must keep the colour under it (WebP exact)
        arr = np.dstack([arr, alpha])
    return np.ascontiguousarray(arr)


def make_input(case: Case) -> tuple[bytes, np.ndarray]:
    """The input file's bytes and the pixels a correct decoder must give (exact for lossless inputs)."""
    arr = photo(case.layout)
    fmt, buf = case.fmt, io.BytesIO()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif.get_ifd(0x8769)[0x9003] = "2021:06:07 08:09:10"
    exif.get_ifd(0x8769)[0xA002], exif.get_ifd(0x8769)[0xA003] = W, H
    if case.deep and fmt in ("png", "tiff") and arr.shape[2] >= 3:
        bgr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR if arr.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
        if fmt == "png":
            return cv2.imencode(".png", bgr)[1].tobytes(), arr
        import tifffile

        tifffile.imwrite(
            buf, arr, photometric="rgb", extrasamples=("unassalpha",) if arr.shape[2] == 4 else None, metadata=None
        )
        return buf.getvalue(), arr
    if case.deep and fmt == "heic":
        import pillow_heif

        pillow_heif.from_bytes(mode="RGB;16", size=(W, H), data=arr.tobytes()).save(buf, quality=-1)
        return buf.getvalue(), arr
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if fmt == "gif":
        if arr.shape[2] == 4:  # one transparent palette entry
            im = Image.fromarray(arr[:, :, :3]).quantize(255)
            p = np.asarray(im).copy()
            p[:, :3] = 255
            im = Image.fromarray(p, "P")
            im.putpalette(Image.fromarray(arr[:, :, :3]).quantize(255).getpalette() + [0, 0, 0])
            im.info["transparency"] = 255
            im.save(buf, "GIF", transparency=255)
        else:
            im = im.quantize(256)
            im.save(buf, "GIF")
        return buf.getvalue(), decode._pil_to_array(Image.open(io.BytesIO(buf.getvalue())))[0]
    formats.register_plugins()
    icc = None if case.layout.startswith("grey") else SRGB  # an RGB profile cannot describe a grey image
    params = {
        "png": dict(icc_profile=icc, exif=exif.tobytes()),
        "bmp": {},
        "jpg": dict(quality=95, icc_profile=icc, exif=exif.tobytes()),
        "webp": dict(lossless=True, exact=True, icc_profile=icc, exif=exif.tobytes()),
        "tiff": dict(icc_profile=icc, exif=exif.tobytes()),
        "heic": dict(quality=95, icc_profile=icc, exif=exif.tobytes()),
        "avif": dict(quality=95, icc_profile=icc, exif=exif.tobytes()),
        "jxl": dict(lossless=True, icc_profile=icc, exif=exif.tobytes()[6:]),
    }[fmt]
    pil = {
        "png": "PNG",
        "jpg": "JPEG",
        "webp": "WEBP",
        "tiff": "TIFF",
        "bmp": "BMP",
        "heic": "HEIF",
        "avif": "AVIF",
        "jxl": "JXL",
    }[fmt]
    im.save(buf, pil, **params)
    return buf.getvalue(), arr


def second_reader(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """The output decoded by a reader other than ours, as (H, W, C) RGB(A)/grey, and its bits per sample."""
    if fmt == "tiff":
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            arr = page.asarray()
            # The bug: the input's tags overwrote the output's size. The tags must agree with the pixels.
            assert (page.imagewidth, page.imagelength) == (arr.shape[1], arr.shape[0])
            assert page.tags["ImageWidth"].value == arr.shape[1] and page.tags["ImageLength"].value == arr.shape[0]
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return arr, arr.dtype.itemsize * 8
    if fmt == "heic":
        import pillow_heif

        heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False)
        arr = np.asarray(heif)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return arr, 16 if arr.dtype == np.uint16 else 8
    if fmt == "jxl":
        formats.register_plugins()
        im = Image.open(io.BytesIO(data))
        arr = np.asarray(im)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return arr.astype(np.uint16) if im.mode == "I;16" else arr, 16 if im.mode == "I;16" else 8
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None, f"OpenCV cannot read the {fmt} output"
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    else:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    bits = 8 if arr.dtype == np.uint8 else 16
    if fmt == "avif" and arr.dtype == np.uint16:  # OpenCV gives 12-bit AVIF samples as 0..4095
        arr = np.rint(arr.astype(np.float64) * 65535 / 4095).astype(np.uint16)
    return arr, bits


def canonical(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(colour RGB float [0, 1], alpha float [0, 1]) of any layout, to compare across layouts and depths."""
    f = arr.astype(np.float64) / (65535.0 if arr.dtype == np.uint16 else 255.0)
    colour = np.repeat(f[:, :, :1], 3, axis=2) if arr.shape[2] in (1, 2) else f[:, :, :3]
    alpha = f[:, :, -1] if arr.shape[2] in (2, 4) else np.ones(arr.shape[:2])
    return colour, alpha


def flatten(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return colour * alpha[:, :, None] + (1 - alpha[:, :, None])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(1.0 / mse)


def run_case(case: Case, out: str) -> dict:
    """One pair; returns what it measured. Raises AssertionError where a check fails."""
    data, want_in = make_input(case)
    d = decode.decode_bytes(data, 10**8, name=case.id)
    got_in = d.first.pixels
    assert got_in.shape[:2] == (H, W)
    if case.fmt in ("png", "tiff", "bmp", "gif", "webp", "jxl"):  # lossless inputs decode exactly
        assert got_in.dtype == want_in.dtype and np.array_equal(got_in, want_in), case
    else:
        assert psnr(flatten(*canonical(got_in)), flatten(*canonical(want_in))) > 30
    # x2, nearest neighbour: exactly predictable output pixels; then the worker's own assemble and encode.
    up = np.repeat(np.repeat(got_in, 2, axis=0), 2, axis=1)
    arr = imageio.assemble(colour_of(up), alpha_of(up), d.bits, d.grey)
    quality = 100 if out in ("webp", "jxl") else 90
    enc, notes = imageio.encode(arr, out, quality=quality, meta=d.meta)
    back, bits = second_reader(enc, out)
    assert back.shape[:2] == (2 * H, 2 * W), (back.shape, notes)
    want_c, want_a = canonical(arr)
    got_c, got_a = canonical(back)
    if out == "jpg":  # no alpha: we flatten onto white, and say so
        want_c, want_a = flatten(want_c, want_a), np.ones_like(want_a)
        assert (arr.shape[2] in (2, 4)) == any("alpha" in n for n in notes)
    assert (got_a != 1).any() == (want_a != 1).any(), "alpha kept where the format holds it, and only then"
    exact = out in LOSSLESS and not (out == "jxl" and arr.dtype == np.uint16 and arr.shape[2] > 1)
    if arr.dtype == np.uint16 and bits == 8:
        assert any("8 bits" in n for n in notes), notes
        tol = 0.5 / 255 + 1e-9  # rounded to 8 bits, once
    else:
        tol = 0.5 / (65535.0 if bits == 16 else 255.0) + 1e-9
    # Compare colour where it is visible (and everywhere for lossless writers, which must keep it all).
    mask = want_a > 0 if not exact else np.ones_like(want_a, bool)
    err_c = np.abs(got_c - want_c)[mask]
    value = psnr(np.where(mask[:, :, None], got_c, 0), np.where(mask[:, :, None], want_c, 0))
    if exact:
        assert err_c.max() <= tol, f"{case.id} -> {out}: max error {err_c.max() * 255:.2f}/255, {notes}"
        assert np.abs(got_a - want_a).max() <= tol
    else:
        assert value > PSNR_FLOOR[out], f"{case.id} -> {out}: PSNR {value:.1f} dB, {notes}"
        assert np.abs(got_a - want_a).max() < 0.1
    return dict(
        pair=f"{case.id} -> {out}",
        size=f"{back.shape[1]}x{back.shape[0]}",
        channels=back.shape[2],
        bits=bits,
        result="exact" if exact else f"PSNR {value:.1f} dB",
        notes="; ".join(notes),
    )


@pytest.mark.parametrize("out", OUTPUTS)
@pytest.mark.parametrize("case", INPUTS, ids=[c.id for c in INPUTS])
def test_every_pair_decodes_with_a_second_reader(case: Case, out: str) -> None:
    run_case(case, out)


def test_the_8bit_tiff_keeps_its_own_size_and_the_inputs_other_tags() -> None:
    """The regression itself: a 60x40 8-bit TIFF at x2 is 120x80 in its tags, and Make/DateTimeOriginal carry."""
    import tifffile

    data, _ = make_input(Case("tiff", "rgb8"))
    d = decode.decode_bytes(data, 10**8)
    up = np.repeat(np.repeat(d.first.pixels, 2, axis=0), 2, axis=1)
    out, _ = imageio.encode(up, "tiff", meta=d.meta)
    with tifffile.TiffFile(io.BytesIO(out)) as tif:
        page = tif.pages[0]
        assert (page.imagewidth, page.imagelength) == (120, 80)
        assert page.tags["Make"].value == "TestCam"
        assert page.tags["InterColorProfile"].value == SRGB
        exif = page.tags["ExifTag"].value
        assert exif["DateTimeOriginal"] == "2021:06:07 08:09:10"
        assert (exif["PixelXDimension"], exif["PixelYDimension"]) == (120, 80)
    pil = Image.open(io.BytesIO(out))
    assert pil.size == (120, 80) and np.array_equal(np.asarray(pil), up)


def main() -> None:
    print("| pair | output | channels | bits | result | notes |\n| --- | --- | --- | --- | --- | --- |")
    for case in INPUTS:
        for out in OUTPUTS:
            try:
                r = run_case(case, out)
                print(f"| {r['pair']} | {r['size']} | {r['channels']} | {r['bits']} | {r['result']} | {r['notes']} |")
            except AssertionError as exc:
                print(f"| {case.id} -> {out} | FAILED: {exc} |||||")


if __name__ == "__main__":
    main()
