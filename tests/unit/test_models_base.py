"""The call contract every upscaler shares (models/base.py), the model cache's keys (models/registry.py), the backend
objects (models/backends.py) and the device helpers the daemon calls (models/devices.py). No weights needed: the
classical filters and plain array functions are real upscalers."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import BaseModel

import models
from models import devices
from models.backends import BACKENDS, Backend, DiffusionParams, NoParams, backend_of, get_backend
from models.base import FunctionUpscaler, SizeRequirements, Tiling
from models.catalog import get_entry
from models.errors import ImageTooSmallError, InvalidParamsError, RegistryError, UnsupportedImageError
from models.pixels import to_uint8, to_unit_float
from models.registry import LoadContext, ModelCache, Registry
from models.tiling import Geometry


def nearest2(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)


def test_pixels_must_be_uint8_or_float32_rgb_and_the_error_says_what_came():
    up = FunctionUpscaler("t", "test", 2, nearest2, size=SizeRequirements(minimum=3))
    for bad, got in [
        (np.zeros((4, 4, 3)), "float64 (4, 4, 3)"),
        (np.zeros((4, 4), np.uint8), "uint8 (4, 4)"),
        (np.zeros((4, 4, 4), np.float32), "float32 (4, 4, 4)"),
        ([[0]], "list"),
    ]:
        with pytest.raises(UnsupportedImageError, match=re.escape(f"uint8 or float32 in [0, 1]; got {got}")):
            up(bad)
    with pytest.raises(ImageTooSmallError, match="t needs at least 3 px per side, the image is 9x2"):
        up(np.zeros((2, 9, 3), np.uint8))


def test_uint8_in_uint8_out_equal_to_the_quantised_float_path():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)

    def soft(a: np.ndarray) -> np.ndarray:  # not per-pixel exact in 8 bits: a real rounding decision per pixel
        return nearest2(a) * np.float32(0.9) + np.float32(0.03)

    up = FunctionUpscaler("t", "test", 2, soft)
    out = up(u8)
    assert out.dtype == np.uint8 and out.shape == (34, 46, 3)
    np.testing.assert_array_equal(out, to_uint8(up(to_unit_float(u8))))
    f = up(to_unit_float(u8))
    assert f.dtype == np.float32 and 0.0 <= f.min() and f.max() <= 1.0


def test_the_shared_conversion_is_a_float32_division_and_round_half_to_even():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    np.testing.assert_array_equal(to_unit_float(u8), u8.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(to_uint8(to_unit_float(u8)), u8)
    halves = np.array([0.5, 1.5, 2.5, 254.5], np.float32) / np.float32(255)
    assert to_uint8(halves).tolist() == [0, 2, 2, 254]
    assert to_uint8(np.array([-0.5, 1.7], np.float32)).tolist() == [0, 255]


def test_a_uint8_function_is_used_for_uint8_and_windows_are_cut_exactly():
    calls: list[str] = []

    def run_u8(a: np.ndarray) -> np.ndarray:
        calls.append("u8")
        return nearest2(a)

    up = FunctionUpscaler(
        "t", "test", 2, lambda a: calls.append("f") or nearest2(a), run_u8=run_u8, geometry=Geometry(32, 2)
    )
    img = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    np.testing.assert_array_equal(up(img), nearest2(img))
    assert set(calls) == {"u8"} and len(calls) > 4  # tiled, and only through the uint8 function
    calls.clear()
    np.testing.assert_array_equal(up.with_tile(1000)(img), nearest2(img))
    assert calls == ["u8"]  # one window
    calls.clear()
    np.testing.assert_array_equal(up.with_tile(4)(img), nearest2(img))  # a tile below what the margin needs
    assert up.with_tile(4).window_geometry().tile == Geometry(32, 2).smallest == 12
    assert up.with_tile(1000).run_u8 is up.run_u8 and up.tile is None  # a view: nothing reloaded, nothing changed


def test_size_requirements_pad_and_crop():
    shapes = []

    def run(a: np.ndarray) -> np.ndarray:
        shapes.append(a.shape)
        return nearest2(a)

    up = FunctionUpscaler("t", "test", 2.0, run, tiling=Tiling.INTERNAL, size=SizeRequirements(multiple_of=8))
    out = up(np.zeros((7, 13, 3), np.float32))
    assert shapes == [(8, 16, 3)] and out.shape == (14, 26, 3)


def test_params_are_the_backends_schema_a_mapping_of_it_or_none():
    class Up(FunctionUpscaler):
        params_type = DiffusionParams

        def upscale(self, pixels: np.ndarray, params: BaseModel) -> np.ndarray:
            self.seen = params
            return nearest2(pixels)

    up = Up("t", "diffusion", 2, nearest2)
    img = np.zeros((4, 4, 3), np.uint8)
    up(img)
    assert up.seen == DiffusionParams()
    up(img, {"seed": 3, "prompt": "a barn"})
    assert (up.seen.seed, up.seen.prompt) == (3, "a barn")
    up(img, DiffusionParams(seed=5))
    assert up.seen.seed == 5
    with pytest.raises(InvalidParamsError, match="steps: Extra inputs are not permitted"):
        up(img, {"steps": 3})
    with pytest.raises(InvalidParamsError, match="noise_level: Input should be less than or equal to 350"):
        up(img, {"noise_level": 351})
    with pytest.raises(InvalidParamsError, match="takes DiffusionParams parameters, a mapping or None; got int"):
        up(img, 3)
    plain = FunctionUpscaler("t", "opencv", 2, nearest2)
    assert plain(img, NoParams()).shape == (8, 8, 3) and plain(img, {}).shape == (8, 8, 3)
    with pytest.raises(InvalidParamsError, match="prompt: Extra inputs are not permitted"):
        plain(img, {"prompt": "x"})


# --- the cache ----------------------------------------------------------------------------------------------------
def one_gpu(device: str) -> str:
    """Stands in for torch's device resolution on a one-GPU machine (no GPU here)."""
    return "cuda:0" if device in ("auto", "cuda", "cuda:0") else device


def test_issue_17_item_9_device_aliases_load_one_model_and_tiles_share_it():
    classical = get_backend("classical")
    stand_in = Backend("classical", "models.classical", None, any_scale=True, uses_tile=True, resolve_device=one_gpu)
    cache = ModelCache(Registry([stand_in]))
    a, first = cache.get("bicubic", 2, LoadContext(Path("."), "auto"))
    b, second = cache.get("bicubic", 2, LoadContext(Path("."), "cuda"))
    c, third = cache.get("bicubic", 2, LoadContext(Path("."), "cuda:0", tile=64))
    assert (first, second, third) == (True, False, False) and a is b and len(cache.loaded()) == 1
    assert c is not a and c.tile == 64 and c.run_float is a.run_float  # a view sharing the model
    assert cache.key("bicubic", 2, LoadContext(Path("."), "cuda", tile=64))[2:] == ("cuda:0", "auto", 64)
    # A backend that ignores the tile keys without it: one upscaler for every tile.
    real = ModelCache()
    tiled = real.get("bicubic", 2, LoadContext(Path("."), tile=64))[0]
    assert tiled is real.get("bicubic", 2, LoadContext(Path(".")))[0]
    assert not classical.uses_tile and real.key("bicubic", 2, LoadContext(Path("."), "auto", tile=64))[2:] == (
        "cpu",
        "auto",
        None,
    )


def test_classical_filters_give_any_scale_in_both_dtypes():
    img = np.random.default_rng(2).random((10, 16, 3), dtype=np.float32)
    cache = ModelCache()
    for m in ("nearest", "bilinear", "bicubic", "lanczos", "area"):
        up, _ = cache.get(m, 2.5, LoadContext(Path(".")))
        out = up(img)
        assert out.shape == (25, 40, 3) and out.dtype == np.float32, m
        assert abs(float(out.mean()) - float(img.mean())) < 0.02, m  # no colour or brightness shift
        u8 = to_uint8(img)
        if m == "bicubic":  # MATLAB's kernel has no 8-bit version: the shared conversion
            np.testing.assert_array_equal(up(u8), to_uint8(up(to_unit_float(u8))))
        else:  # cv2.resize's own 8-bit kernels, as a plain call
            interp = {
                "nearest": cv2.INTER_NEAREST,
                "bilinear": cv2.INTER_LINEAR,
                "lanczos": cv2.INTER_LANCZOS4,
                "area": cv2.INTER_AREA,
            }[m]
            np.testing.assert_array_equal(up(u8), cv2.resize(u8, (40, 25), interpolation=interp))
            assert np.abs(up(u8).astype(int) - to_uint8(up(to_unit_float(u8)))).max() <= 1
    near, _ = cache.get("nearest", 3, LoadContext(Path(".")))
    np.testing.assert_array_equal(near(img), np.repeat(np.repeat(img, 3, 0), 3, 1))


def test_the_registry_is_strict():
    reg = Registry([Backend("a", "models.classical", None)])
    with pytest.raises(RegistryError, match="already registered"):
        reg.add(Backend("a", "models.opencv_sr", None))
    assert reg.names() == ["a"] and reg.get("a").module == "models.classical"  # a failed add changes nothing
    with pytest.raises(RegistryError, match="no backend named 'b'; registered: a"):
        reg.get("b")


# --- backends -----------------------------------------------------------------------------------------------------
def test_each_backend_declares_its_params_and_warnings():
    assert [b.id for b in BACKENDS] == ["classical", "opencv", "spandrel", "diffusion"]
    assert backend_of("fsrcnn").params is NoParams and backend_of("sd-x4-upscaler").params is DiffusionParams
    entry = get_entry("sd-x4-upscaler")
    (warning,) = backend_of("sd-x4-upscaler").warnings(entry, DiffusionParams(num_inference_steps=30), "cpu")
    assert "diffusion on the CPU (cpu) runs 30 denoising steps" in warning and 'device = "cuda"' in warning
    assert not re.search(r"\d+ s per", warning)  # no machine-specific seconds in a message
    assert backend_of("sd-x4-upscaler").warnings(entry, DiffusionParams(), "cuda:0") == []
    for model in ("fsrcnn", "bicubic", "realesrgan-animevideo-xsx4"):
        assert backend_of(model).warnings(get_entry(model), NoParams(), "cpu") == []
    assert get_backend("classical").device_for("cuda:3") == "cpu"  # the filters run on the CPU whatever is asked


def test_the_package_docstring_names_real_entry_points():
    names = re.findall(r":(?:data|func|class|mod):`(models\.[\w.]+)`", models.__doc__ or "")
    assert len(names) >= 8
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)  # AttributeError: a stale name
            break


# --- devices ------------------------------------------------------------------------------------------------------
def test_build_info_and_memory_used_answer_without_a_gpu():
    info = devices.build_info()
    assert set(info) == {"torch", "cuda", "opencv"} and info["opencv"].startswith("4.")
    torch = sys.modules.get("torch")
    if torch is not None:
        assert info["torch"] == torch.__version__
    used = devices.memory_used()
    assert used == {} or all(k.startswith("cuda:") and v >= 0 for k, v in used.items())
    assert devices.resolve("cpu") == "cpu" and devices.runs_on_cpu("cpu") and not devices.runs_on_cpu("cuda:0")
    assert devices.check(["cpu"]) == []
