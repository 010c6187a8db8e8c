"""The OpenCV dnn_superres backend and the classical filters, on the real mirrored weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.backends import Backend
from models.base import Tiling, Upscaler, plan_tiles, run_tiled
from models.catalog import CATALOG
from models.errors import (
    ImageTooSmallError,
    RegistryError,
    UnknownModelError,
    UnsupportedScaleError,
    WeightsMissingError,
)
from models.registry import LoadContext, ModelCache, Registry, check_scale
from models.resize import imresize
from tests.conftest import SET5

LR4 = sorted((SET5 / "LR_bicubic" / "X4").glob("*.png"))


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    src = Image.open(SET5 / "HR" / "butterfly.png").convert("RGB") if (SET5 / "HR").is_dir() else None
    if src is None:
        return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)
    return np.asarray(src, np.float32)[:h, :w] / 255.0


@pytest.mark.parametrize(
    ("model", "scale"),
    [(m, s) for m in ("fsrcnn", "fsrcnn-small", "espcn", "lapsrn") for s in CATALOG[m].scales],
)
def test_every_mirrored_opencv_model_loads_and_upscales(weights_dir, model, scale):
    up, fresh = ModelCache().get(model, scale, LoadContext(weights_dir))
    assert fresh and up.backend == "opencv" and up.device == "cpu" and up.scale == scale
    hr = _img(24 * scale, 32 * scale)
    lr = imresize(hr, (32, 24))
    out = up(lr)
    assert out.shape == hr.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # It is a real super-resolution network: closer to the ground truth than nearest-neighbour enlargement.
    nearest = np.repeat(np.repeat(lr, scale, 0), scale, 1)
    assert np.mean((out - hr) ** 2) < 0.9 * np.mean((nearest - hr) ** 2)


def test_cache_loads_once(weights_dir):
    cache = ModelCache()
    a, first = cache.get("fsrcnn", 2, LoadContext(weights_dir))
    b, second = cache.get("fsrcnn", 2, LoadContext(weights_dir))
    assert first and not second and a is b


@pytest.mark.parametrize("model", ["fsrcnn", "espcn", "lapsrn"])
def test_tiled_equals_one_pass(weights_dir, model):
    """The tile context covers the receptive field, so stitched tiles equal a single pass: no seams."""
    up, _ = ModelCache().get(model, 2, LoadContext(weights_dir))
    img = _img(150, 170)
    whole = replace(up, tile=None)(img)
    tiled = replace(up, tile=48)(img)
    assert np.abs(whole - tiled).max() < 1e-4


def test_tile_plan_covers_exactly_once():
    for length, tile, pad in [(100, 32, 8), (31, 32, 4), (1, 8, 2), (97, 10, 3)]:
        cover = np.zeros(length, int)
        for c0, c1, r0, r1 in plan_tiles(length, tile, pad):
            cover[c0:c1] += 1
            assert 0 <= r0 <= c0 < c1 <= r1 <= length and c1 - c0 <= tile
        assert (cover == 1).all()


def test_run_tiled_with_an_exact_per_pixel_function():
    img = np.random.default_rng(1).random((37, 53, 3)).astype(np.float32)
    out = run_tiled(lambda a: np.repeat(np.repeat(a, 3, 0), 3, 1), img, 3, 16, 2)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(img, 3, 0), 3, 1))


@pytest.mark.skipif(not LR4, reason="Set5 missing")
@pytest.mark.parametrize(("model", "published"), [("fsrcnn", 28.41), ("espcn", 28.38), ("lapsrn", 28.75)])
def test_opencv_models_reach_the_reference_psnr_on_shipped_lr(weights_dir, model, published):
    from daemon.metrics import full_reference

    up, _ = ModelCache().get(model, 4, LoadContext(weights_dir))
    vals = []
    for i, hr_path in enumerate(sorted((SET5 / "HR").glob("*.png")), start=1):
        hr = np.asarray(Image.open(hr_path).convert("RGB"), np.float32) / 255
        hr = hr[: hr.shape[0] - hr.shape[0] % 4, : hr.shape[1] - hr.shape[1] % 4]
        lr = np.asarray(Image.open(SET5 / "LR_bicubic" / "X4" / f"img_00{i}_SRF_4_LR.png").convert("RGB"),
                        np.float32) / 255
        sr = np.rint(up(lr) * 255) / 255
        vals.append(full_reference(sr.astype(np.float32), hr, 4, ("psnr_y",))[0].value)
    assert abs(np.mean(vals) - published) <= 0.05


def test_classical_filters_give_any_scale():
    img = _img(10, 16)
    cache = ModelCache()
    for m in ("nearest", "bilinear", "bicubic", "lanczos", "area"):
        up, _ = cache.get(m, 2.5, LoadContext(Path(".")))
        out = up(img)
        assert out.shape == (25, 40, 3), m
        assert abs(float(out.mean()) - float(img.mean())) < 0.02, m  # no colour or brightness shift
    near, _ = cache.get("nearest", 3, LoadContext(Path(".")))
    np.testing.assert_array_equal(near(img), np.repeat(np.repeat(img, 3, 0), 3, 1))


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
    reg = Registry([Backend("a", "models.classical", None)])
    with pytest.raises(RegistryError, match="already registered"):
        reg.add(Backend("a", "models.opencv_sr", None))
    assert reg.names() == ["a"] and reg.get("a").module == "models.classical"  # a failed add changes nothing
    with pytest.raises(RegistryError, match="no backend named 'b'"):
        reg.get("b")


def test_size_requirements_pad_and_crop():
    calls = []

    def run(a: np.ndarray) -> np.ndarray:
        calls.append(a.shape)
        return np.repeat(np.repeat(a, 2, 0), 2, 1)

    up = Upscaler("t", "test", 2.0, run, tiling=Tiling.INTERNAL)
    up.size = replace(up.size, multiple_of=8)
    out = up(np.zeros((7, 13, 3), np.float32))
    assert calls == [(8, 16, 3)] and out.shape == (14, 26, 3)
