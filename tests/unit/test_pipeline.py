"""One image through one rule as the worker runs it (daemon/pipeline.py): prepare, run, encode, measure.

Real encoders and decoders, real classical models (nearest-neighbour: exact, so where each output pixel came from
is known), the real BRISQUE model files from the shared weights; textured images, so that a shift, a crop from the
wrong place or a channel swap shows. No files, no threads, no subprocess.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from daemon import pipeline
from daemon.config import Rule, Settings, load_settings
from daemon.media.decode import decode_bytes
from daemon.metrics import Brisque
from models.registry import LoadContext, ModelCache
from tests.conftest import MIRROR, write_config


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(write_config(tmp_path))


def texture(w: int, h: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Noise with a gradient under it: every pixel differs from its neighbours, and each region has its own mean."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    return np.clip(ramp + rng.integers(0, 96, (h, w, channels)), 0, 255).astype(np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def through(
    rule: Rule, data: bytes, settings: Settings, brisque: Brisque | None = None
) -> tuple[pipeline.Work, bytes, str]:
    """``data`` through the pipeline's four steps under ``rule``, as the worker calls them."""
    decoded = decode_bytes(data, settings.max_pixels, settings.max_frames, name="in")  # in process: test input
    work = pipeline.prepare(rule, decoded, settings)
    backend = rule.backend()
    ctx = LoadContext(settings.weights_dir)
    if backend.any_scale:
        from models.catalog import get_entry

        up = backend.load(get_entry(rule.model), work.native, ctx)
    else:
        up, _ = ModelCache().get(rule.model, work.native, ctx)
    pipeline.run(rule, work, up, rule.model_params(), lambda: brisque)
    fmt = pipeline.output_format(rule, decoded.format)
    return work, pipeline.encode(rule, work, fmt), fmt


# --- sizes and passes ---------------------------------------------------------------------------------------------
def test_a_chainable_model_runs_as_many_native_passes_as_the_scale_needs():
    """Issue 21, row 11: outscale 16 with a x4 model is two model passes, not one pass and a x4 Lanczos (the right
    size, blurry); a model that cannot take its own output runs once."""
    plan, native = pipeline.size_plan(Rule(model="fsrcnn", scale=4, outscale=16), 10, 8)
    assert (plan.passes, native, plan.model_size, plan.filter) == (2, 4.0, (160, 128), "none"), (
        f"x16 with a x4 model must be two x4 passes and no final resize, got {plan}"
    )
    plan, _ = pipeline.size_plan(Rule(model="fsrcnn", scale=4, width=3840), 100, 80)
    assert plan.passes == 2 and plan.filter == "lanczos" and plan.output[0] == 3840, plan  # x38.4: 2 passes, max 2
    plan, _ = pipeline.size_plan(Rule(model="fsrcnn", scale=4, width=3840, max_passes=3), 100, 80)
    assert plan.passes == 3 and plan.filter == "area", plan  # x64 past x38.4: reduced at the end
    plan, _ = pipeline.size_plan(Rule(model="sd-x4-upscaler", scale=4), 10, 8)
    assert plan.passes == 1, plan


def test_alpha_is_cropped_like_the_colour_under_fit_cover(settings):
    """Issue 21, row 10: an RGBA image under a cover rule is scaled and cropped, its alpha exactly as its colour."""
    rgba = texture(40, 30, 4, seed=1)
    cover = Rule(model="nearest", scale=2, width=60, height=60, fit="cover", format="png", metrics=[])
    work, data, _ = through(cover, png(rgba), settings)
    out = np.asarray(Image.open(io.BytesIO(data)))
    assert out.shape == (60, 60, 4), f"cover 60x60 of a 40x30 RGBA image must be 60x60 RGBA, got {out.shape}"
    # The same image scaled to 80x60 without a crop: cover takes its middle 60 columns, alpha and colour alike.
    inside = Rule(model="nearest", scale=2, width=80, height=60, format="png", metrics=[])
    _, whole, _ = through(inside, png(rgba), settings)
    full = np.asarray(Image.open(io.BytesIO(whole)))
    assert full.shape == (60, 80, 4)
    np.testing.assert_array_equal(out[:, :, :3], full[:, 10:70, :3], err_msg="the colour is not the middle crop")
    np.testing.assert_array_equal(out[:, :, 3], full[:, 10:70, 3], err_msg="the alpha is not cropped as the colour")


def test_the_output_is_the_input_enlarged_in_place_at_odd_sizes(settings):
    """A textured odd-sized image: nearest x3 puts every input pixel at 3x3 output pixels, with no shift or crop."""
    src = texture(17, 13, seed=2)
    work, data, _ = through(Rule(model="nearest", scale=3, format="png", metrics=[]), png(src), settings)
    out = np.asarray(Image.open(io.BytesIO(data)))
    assert out.shape == (39, 51, 3)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(src, 3, axis=0), 3, axis=1))


# --- animations -----------------------------------------------------------------------------------------------------
def animation(fmt: str, loop: int | None, exif: bytes | None = None, xmp: bytes | None = None) -> bytes:
    frames = [Image.fromarray(texture(24, 16, seed=s)) for s in range(3)]
    buf = io.BytesIO()
    keys: dict = {"save_all": True, "append_images": frames[1:], "duration": [100, 200, 300]}
    if loop is not None:
        keys["loop"] = loop
    if exif is not None:
        keys["exif"] = exif
    if xmp is not None and fmt == "PNG":  # Pillow's PNG writer takes XMP as an iTXt chunk only
        keys["pnginfo"] = PngImagePlugin.PngInfo()
        keys["pnginfo"].add_itxt("XML:com.adobe.xmp", xmp.decode())
    elif xmp is not None:
        keys["xmp"] = xmp
    if fmt == "WEBP":
        keys["lossless"] = True
    frames[0].save(buf, fmt, **keys)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "loop", "expect"), [("GIF", None, None), ("GIF", 3, 3), ("WEBP", 1, 1)])
def test_an_animation_keeps_its_loop_count(settings, fmt, loop, expect):
    """Issue 21, row 7: a GIF set to play once (no loop block) must not come out looping forever (loop 0); nor a
    WebP set to play once (loop 1: its writer's default is 0, forever)."""
    rule = Rule(model="nearest", scale=2, metrics=[])
    work, data, out_fmt = through(rule, animation(fmt, loop), settings)
    assert out_fmt == fmt.lower() and work.animated
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 3
        got = im.info.get("loop")
    assert got == expect, f"{fmt} input with loop {loop}: the output's loop is {got}, expected {expect}"


GPS_EXIF = Image.Exif()
GPS_EXIF[0x010F] = "CameraMaker"  # Make
GPS_EXIF.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)  # GPSLatitude
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:title="PrivateTitle"/></rdf:RDF></x:xmpmeta>'
)


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_metadata_strip_drops_exif_and_xmp_from_an_animation(settings, fmt):
    """Issue 21, row 8: animated WebP and APNG outputs kept the camera, GPS and XMP under ``metadata = "strip"``."""
    data = animation(fmt, 0, exif=GPS_EXIF.tobytes(), xmp=XMP)
    kept = through(Rule(model="nearest", scale=2, metrics=[]), data, settings)[1]
    assert b"CameraMaker" in kept and b"PrivateTitle" in kept, "the input's metadata must reach a 'keep' output"
    stripped = through(Rule(model="nearest", scale=2, metrics=[], metadata="strip"), data, settings)[1]
    with Image.open(io.BytesIO(stripped)) as im:
        assert im.n_frames == 3
    for secret in (b"CameraMaker", b"PrivateTitle"):
        assert secret not in stripped, f"metadata = 'strip' left {secret!r} in the animated {fmt} output"


# --- metrics --------------------------------------------------------------------------------------------------------
def test_brisque_scores_the_output_not_the_input(settings):
    """Issue 21, row 9: BRISQUE on the input gives every model the input's score, so the metric compares nothing."""
    model, ranges = MIRROR / "quality" / "brisque_model_live.yml", MIRROR / "quality" / "brisque_range_live.yml"
    if not model.exists():
        pytest.skip(f"no BRISQUE model files in {MIRROR / 'quality'}")
    scorer = Brisque(model, ranges)
    src = np.asarray(Image.open(io.BytesIO(png(texture(64, 48, seed=3)))))
    rule = Rule(model="nearest", scale=2, format="png", metrics=["brisque"])
    work, data, fmt = through(rule, png(src), settings, scorer)
    (got,) = pipeline.measure(rule, work, fmt, lambda: scorer, lambda: np.asarray(Image.open(io.BytesIO(data))))
    written = np.asarray(Image.open(io.BytesIO(data)))
    of_output, of_input = scorer(written).value, scorer(src).value
    assert abs(of_output - of_input) > 1, (of_output, of_input)  # else this test could not tell them apart
    assert got.name == "brisque" and got.value == pytest.approx(of_output, abs=1e-6), (
        f"brisque recorded {got.value:.3f}; the output scores {of_output:.3f}, the input {of_input:.3f}"
    )


def test_benchmark_mode_crops_the_ground_truth_to_a_multiple_of_the_scale(settings):
    """The papers' protocol (docs/protocol.md): the HR image is cropped at the bottom and right to a multiple of the
    scale, the LR image made from that, and the output compared with that crop."""
    src = texture(50, 45, seed=4)
    rule = Rule(model="bicubic", scale=4, mode="benchmark", format="png", metrics=["psnr_y", "ssim_y"])
    work, data, fmt = through(rule, png(src), settings)
    assert work.hr is not None and work.hr.shape == (44, 48, 3), f"HR not cropped to x4: {work.hr.shape}"
    np.testing.assert_array_equal(np.rint(work.hr * 255).astype(np.uint8), src[:44, :48])
    assert work.src.shape == (11, 12, 3) and work.size == (48, 44)
    metrics = {m.name: m for m in pipeline.measure(rule, work, fmt, lambda: None, lambda: np.zeros(0))}
    assert set(metrics) == {"psnr_y", "ssim_y"} and all(m.shave == 4 for m in metrics.values())
    assert 10 < metrics["psnr_y"].value < 60, metrics["psnr_y"]
