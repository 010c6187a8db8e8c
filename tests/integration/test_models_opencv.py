"""The OpenCV dnn_superres backend on the real mirrored weights, against OpenCV's own ``upsample()``."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from models.catalog import CATALOG
from models.errors import ImageTooSmallError, UnknownModelError, UnsupportedScaleError, WeightsMissingError
from models.opencv_sr import DEFAULT_TILE, MARGIN
from models.pixels import to_uint8, to_unit_float
from models.progress import reporting
from models.registry import LoadContext, ModelCache, check_scale
from models.resize import imresize
from models.tiling import plan_axis
from tests.conftest import SET5

LR4 = sorted((SET5 / "LR_bicubic" / "X4").glob("*.png"))
MODELS = [(m, s) for m in ("fsrcnn", "fsrcnn-small", "espcn", "lapsrn") for s in CATALOG[m].scales]
STEMS = {
    "fsrcnn": ("FSRCNN", "fsrcnn"),
    "fsrcnn-small": ("FSRCNN-small", "fsrcnn"),
    "espcn": ("ESPCN", "espcn"),
    "lapsrn": ("LapSRN", "lapsrn"),
}


def _img(h: int, w: int, name: str = "butterfly.png") -> np.ndarray:
    if not (SET5 / "HR").is_dir():
        pytest.skip(f"Set5 is not at {SET5}")
    big = np.asarray(Image.open(SET5 / "HR" / name).convert("RGB"))
    if big.shape[0] < h or big.shape[1] < w:
        big = cv2.resize(big, (max(w, big.shape[1]), max(h, big.shape[0])), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(big[:h, :w])


def upsample(weights_dir, model: str, scale: int, rgb: np.ndarray) -> np.ndarray:
    """What a user's ten-line loop gets: OpenCV's own DnnSuperResImpl.upsample on BGR, back to RGB."""
    stem, algo = STEMS[model]
    sr = cv2.dnn_superres.DnnSuperResImpl_create()
    sr.readModel(str(weights_dir / "opencv" / f"{stem}_x{scale}.pb"))
    sr.setModel(algo, scale)
    return np.ascontiguousarray(sr.upsample(np.ascontiguousarray(rgb[:, :, ::-1]))[:, :, ::-1])


@pytest.mark.parametrize(("model", "scale"), MODELS)
def test_every_mirrored_opencv_model_loads_and_upscales(weights_dir, model, scale):
    up, fresh = ModelCache().get(model, scale, LoadContext(weights_dir))
    assert fresh and up.backend == "opencv" and up.device == "cpu" and up.scale == scale
    hr = to_unit_float(_img(24 * scale, 32 * scale))
    lr = imresize(hr, (32, 24))
    out = up(lr)
    assert out.shape == hr.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # It is a real super-resolution network: closer to the ground truth than nearest-neighbour enlargement.
    nearest = np.repeat(np.repeat(lr, scale, 0), scale, 1)
    assert np.mean((out - hr) ** 2) < 0.9 * np.mean((nearest - hr) ** 2)


@pytest.mark.parametrize(("model", "scale"), MODELS)
def test_uint8_gives_the_same_bytes_as_opencvs_own_upsample(weights_dir, model, scale):
    up, _ = ModelCache().get(model, scale, LoadContext(weights_dir))
    for name in ("baby.png", "bird.png", "head.png"):
        rgb = _img(61, 83, name)  # one window
        out = up(rgb)
        assert out.dtype == np.uint8 and out.shape == (61 * scale, 83 * scale, 3)
        np.testing.assert_array_equal(out, upsample(weights_dir, model, scale, rgb))


def test_tiled_uint8_differs_from_upsample_by_one_level_in_a_few_values(weights_dir):
    """Windows make the network faster, and its float sums depend slightly on the window's size: a rounding
    boundary is crossed in a handful of values, never by more than one level."""
    up, _ = ModelCache().get("fsrcnn", 4, LoadContext(weights_dir))
    rgb = _img(320, 480, "baby.png")
    assert len(plan_axis(320, DEFAULT_TILE, 2 * MARGIN["fsrcnn"])) > 1
    ours, theirs = up(rgb), upsample(weights_dir, "fsrcnn", 4, rgb)
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-4, (diff.max(), np.mean(diff > 0))
    np.testing.assert_array_equal(up.with_tile(512)(rgb), theirs)  # one window: the same bytes


def test_the_cache_loads_once(weights_dir):
    cache = ModelCache()
    a, first = cache.get("fsrcnn", 2, LoadContext(weights_dir))
    b, second = cache.get("fsrcnn", 2, LoadContext(weights_dir, "auto"))
    c, third = cache.get("fsrcnn", 2, LoadContext(weights_dir, tile=64))
    assert first and not second and not third and a is b and c.tile == 64 and c.run_u8 is a.run_u8


@pytest.mark.parametrize("model", ["fsrcnn", "espcn", "lapsrn"])
def test_tiled_equals_one_pass(weights_dir, model):
    """The margin covers the receptive field, and windows are cut hard: no seams, float sums aside."""
    up, _ = ModelCache().get(model, 2, LoadContext(weights_dir))
    img = to_unit_float(_img(150, 170))
    whole = up.with_tile(1000)(img)
    smallest = 3 * 2 * MARGIN[model]
    tiled = up.with_tile(max(48, smallest))(img)
    assert np.abs(whole - tiled).max() < 1e-4


def test_16_bit_input_keeps_its_precision(weights_dir):
    """The float path never rounds to 8 bits on the way: a 16-bit picture comes out with more than 256 levels."""
    up, _ = ModelCache().get("fsrcnn", 2, LoadContext(weights_dir))
    ramp = np.linspace(0.2, 0.8, 64 * 80 * 3, dtype=np.float32).reshape(64, 80, 3)
    deep = np.rint(ramp * 65535) / np.float32(65535)
    out = up(deep.astype(np.float32))
    assert out.dtype == np.float32
    assert len(np.unique(np.rint(out * 65535))) > 4 * 256
    # And the 8-bit path of the same picture is the same picture, within the 8-bit YCrCb rounding upsample() does.
    assert np.abs(to_unit_float(up(to_uint8(deep))) - out).mean() < 1.0 / 255


def test_memory_stays_bounded_by_windows_on_a_large_image(weights_dir):
    up, _ = ModelCache().get("fsrcnn", 2, LoadContext(weights_dir))
    rgb = _img(700, 900, "baby.png")
    tiles: list[tuple[int, int]] = []
    with reporting(lambda done, total, unit: tiles.append((done, total))):
        out = up(rgb)
    rows, cols = (plan_axis(n, DEFAULT_TILE, 2 * MARGIN["fsrcnn"]) for n in (700, 900))
    assert out.shape == (1400, 1800, 3) and tiles[-1] == (len(rows) * len(cols),) * 2 and len(tiles) > 4
    assert max(e - s for s, e in rows + cols) <= DEFAULT_TILE


@pytest.mark.skipif(not LR4, reason="Set5 missing")
@pytest.mark.parametrize(("model", "published"), [("fsrcnn", 28.41), ("espcn", 28.38), ("lapsrn", 28.75)])
def test_opencv_models_reach_the_reference_psnr_on_shipped_lr(weights_dir, model, published):
    from daemon.metrics import full_reference

    up, _ = ModelCache().get(model, 4, LoadContext(weights_dir))
    vals = []
    for i, hr_path in enumerate(sorted((SET5 / "HR").glob("*.png")), start=1):
        hr = np.asarray(Image.open(hr_path).convert("RGB"), np.float32) / 255
        hr = hr[: hr.shape[0] - hr.shape[0] % 4, : hr.shape[1] - hr.shape[1] % 4]
        lr = np.asarray(Image.open(SET5 / "LR_bicubic" / "X4" / f"img_00{i}_SRF_4_LR.png").convert("RGB"))
        sr = to_unit_float(up(lr))  # the 8-bit path: what upsample() gives
        vals.append(full_reference(sr, hr, 4, ("psnr_y",))[0].value)
    assert abs(np.mean(vals) - published) <= 0.05


def test_errors_are_typed_and_say_what_to_do(tmp_path, weights_dir):
    with pytest.raises(UnknownModelError, match="known models: .*fsrcnn"):
        check_scale("superduper", 2)
    with pytest.raises(UnsupportedScaleError, match="it has x2, x4, x8"):
        check_scale("lapsrn", 3)
    with pytest.raises(WeightsMissingError, match="upscaled weights fetch edsr"):
        ModelCache().get("edsr", 2, LoadContext(tmp_path))
    up, _ = ModelCache().get("fsrcnn", 2, LoadContext(weights_dir))
    with pytest.raises(ImageTooSmallError, match="at least 3 px"):
        up(np.zeros((2, 9, 3), np.float32))
