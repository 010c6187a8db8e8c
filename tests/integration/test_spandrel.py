"""The spandrel backend on the real thing: real weights from the shared mirror, and RRDBNet (Real-ESRGAN) state dicts
built here with random weights in the layouts the published files use. What a CPU cannot show is stood in for, and the
test says so: an out-of-memory error on cue, a GPU's auto fp16, free GPU memory that changes between calls.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import statistics
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import MIRROR, ROOT, SET5, image, write_config

torch = pytest.importorskip("torch")
spandrel = pytest.importorskip("spandrel")

from daemon import imageio  # noqa: E402
from daemon.config import Rule, load_settings  # noqa: E402
from daemon.errors import ConfigError  # noqa: E402
from daemon.media import decode  # noqa: E402
from daemon.oneshot import process as process_once  # noqa: E402
from daemon.service import Service  # noqa: E402
from models import runtime, spandrel_sr  # noqa: E402
from models.catalog import CATALOG, get_entry, model_label  # noqa: E402
from models.errors import (  # noqa: E402
    DeviceUnavailableError,
    OutOfMemoryError,
    Retry,
    UnsafeWeightsError,
    UnsupportedModelError,
    UnsupportedScaleError,
    WeightsMissingError,
)
from models.pixels import to_uint8, to_unit_float  # noqa: E402
from models.registry import REGISTRY, LoadContext, ModelCache, check_scale  # noqa: E402
from models.resize import resize  # noqa: E402
from models.runtime import resolve_device  # noqa: E402
from models.spandrel_sr import FEATHER, MARGIN, combine_measurements, load_descriptor  # noqa: E402
from models.testing import compact_state  # noqa: E402
from models.tiling import plan_axis, smallest_tile  # noqa: E402
from models.weights import fetch  # noqa: E402

OVERLAP = 2 * MARGIN + FEATHER

XSX4, DITN = "realesrgan-animevideo-xsx4", "ditn-real-x4"
BUTTERFLY = SET5 / "HR" / "butterfly.png"  # 256 x 256
BABY = SET5 / "HR" / "baby.png"  # 512 x 512


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder filled by the project's own fetch code from the shared mirror (hashes checked)."""
    if not (MIRROR / "spandrel").is_dir():
        pytest.skip(f"no spandrel weights at {MIRROR / 'spandrel'}")
    d = tmp_path_factory.mktemp("weights")
    reports = fetch(d, [XSX4, DITN, "realesrgan-animevideo-xsx2", "ditn-real-gan-x4"], mirror=str(MIRROR))
    assert [r.status for r in reports] == ["fetched"] * 4, reports
    return d


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache()


def load(cache: ModelCache, weights: Path, model: str, scale: int = 4, **ctx):
    up, _ = cache.get(model, scale, LoadContext(weights, ctx.pop("device", "cpu"), **ctx))
    return up


def crop(h: int, w: int, y: int = 40, x: int = 60, src: Path = BUTTERFLY) -> np.ndarray:
    if not src.exists():
        pytest.skip(f"Set5 is not at {SET5}")
    arr = np.asarray(Image.open(src).convert("RGB"), np.float32)[y : y + h, x : x + w] / 255.0
    assert arr.shape == (h, w, 3)
    return np.ascontiguousarray(arr)


def settings_in(folder: Path, weights: Path, rules: list[dict] | None = None):
    return load_settings(write_config(folder, weights, rules))


# --- RRDBNet (Real-ESRGAN) state dicts, built the way xinntao's basicsr names them --------------------------------
def rrdb_state(scale: int, blocks: int = 1, nf: int = 16, seed: int = 0) -> OrderedDict:
    """A new-arch RRDBNet state dict with random weights: conv_first, body.N.rdbK.convJ, conv_body, conv_upN,
    conv_hr, conv_last. x2 uses Real-ESRGAN's pixel-unshuffle input (12 channels into conv_first), x8 a third
    upsampling conv, as in RealESRGAN_x2plus.pth and ai-forever's RealESRGAN_x8.pth. spandrel fixes the growth
    channels at 32."""
    g = torch.Generator().manual_seed(seed)
    gc = 32

    def conv(out_c: int, in_c: int, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(out_c, in_c, 3, 3, generator=g) * (gain * (2.0 / (in_c * 9)) ** 0.5)
        return w, torch.zeros(out_c)

    sd: OrderedDict = OrderedDict()

    def put(name: str, wb: tuple[torch.Tensor, torch.Tensor]) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = wb

    put("conv_first", conv(nf, 12 if scale == 2 else 3))
    for b in range(blocks):
        for r in (1, 2, 3):
            for j in range(1, 5):
                put(f"body.{b}.rdb{r}.conv{j}", conv(gc, nf + (j - 1) * gc, 0.1))
            put(f"body.{b}.rdb{r}.conv5", conv(nf, nf + 4 * gc, 0.1))
    put("conv_body", conv(nf, nf))
    for u in range(1, (3 if scale == 8 else 2) + 1):
        put(f"conv_up{u}", conv(nf, nf))
    put("conv_hr", conv(nf, nf))
    w, b = conv(3, nf, 0.5)
    put("conv_last", (w, b + 0.5))  # centre the random output in [0, 1] so that clamping leaves texture
    return sd


def direct(sd: dict, rgb: np.ndarray) -> np.ndarray:
    """A plain spandrel call, independent of our backend: the reference our upscaler must reproduce."""
    d = spandrel.ModelLoader().load_from_state_dict(sd).eval()
    with torch.inference_mode():
        y = d(torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous())
    return y[0].permute(1, 2, 0).numpy()


# --- the catalogue -------------------------------------------------------------------------------------------------
def test_catalogue_and_registry_list_the_spandrel_models():
    assert REGISTRY.get("spandrel").module == "models.spandrel_sr" and REGISTRY.get("spandrel").extra == "gan"
    with open(MIRROR / "MANIFEST.tsv", newline="") as fh:
        manifest = {r["path"]: r for r in csv.DictReader(fh, delimiter="\t")}
    mirrored = {XSX4: 4, "realesrgan-animevideo-xsx2": 2, DITN: 4, "ditn-real-gan-x4": 4}
    for mid, scale in mirrored.items():
        e = CATALOG[mid]
        wf = e.files[scale]
        row = manifest[wf.path]
        assert e.backend == "spandrel" and e.scales == (scale,)
        assert (wf.sha256, wf.size, e.license) == (row["sha256"], int(row["size_bytes"]), row["license"])
        assert row["commit"] in wf.url and row["source_path"] in wf.url
    for mid in (
        "realesrgan-x2",
        "realesrgan-x4",
        "realesrgan-x8",
        "realesrgan-x4plus",
        "realesrgan-x4plus-anime-6b",
        "realesrgan-x2plus",
        "realesr-general-x4v3",
        "realesr-animevideov3",
    ):
        e = CATALOG[mid]
        (wf,) = e.weight_files()
        assert e.backend == "spandrel" and wf.path.startswith("spandrel/") and wf.url.startswith("https://")
        assert wf.url.rsplit("/", 1)[1] == wf.path.rsplit("/", 1)[1]
    assert CATALOG["realesrgan-x8"].scales == (8,) and "huggingface.co/ai-forever" in CATALOG["realesrgan-x8"].source


# --- real weights -------------------------------------------------------------------------------------------------
def test_ditn_benchmark_on_set5_reaches_the_published_psnr(tmp_path, weights):
    hr = sorted((SET5 / "HR").glob("*.png"))
    if len(hr) != 5:
        pytest.skip(f"Set5 is not at {SET5}")
    settings = settings_in(tmp_path, weights)
    rule = Rule(mode="benchmark", model=DITN, scale=4, compare=False, metrics=["psnr_y"])
    reports = process_once(settings, hr, rule, tmp_path / "out")
    assert [r["state"] for r in reports] == ["done"] * 5, reports
    mean = statistics.mean(r["psnr_y"] for r in reports)
    assert mean >= 31.9, [round(r["psnr_y"], 3) for r in reports]


def test_xsx4_runs_end_to_end_through_the_service(tmp_path, weights):
    cfg = write_config(tmp_path, weights, [{"folder": "", "model": XSX4, "scale": 4, "format": "png"}])
    svc = Service(load_settings(cfg))
    svc.start()
    try:
        image(svc.settings.inbox / "photo.png", (40, 32))
        svc.admit([PurePosixPath("photo.png")])
        assert svc.step()
        job = svc.store.row(1)
    finally:
        svc.shutdown()
    assert job["state"] == "done", job
    assert (job["backend"], job["device"], job["precision"]) == ("spandrel", "cpu", "fp32")
    out = Path(job["output_path"])
    assert out.name == f"photo.{XSX4}.x4.png" and Image.open(out).size == (160, 128)
    assert not (tmp_path / "inbox" / "photo.png").exists() and (tmp_path / "archive" / "photo.png").exists()


def test_tiled_and_untiled_agree_away_from_the_borders(cache, weights):
    img = crop(150, 170)
    whole = load(cache, weights, XSX4)
    tiled = load(cache, weights, XSX4, tile=smallest_tile(OVERLAP))
    assert len(plan_axis(150, tiled.tile, OVERLAP)) > 1 and len(plan_axis(170, tiled.tile, OVERLAP)) > 1
    a, b = whole(img), tiled(img)
    assert a.shape == b.shape == (600, 680, 3)
    inner = np.abs(a - b)[8:-8, 8:-8]
    assert inner.max() < 1 / 255, inner.max() * 255
    assert a.std() > 0.05  # real texture, not a flat field that would agree trivially


def test_ditn_tiles_on_its_patch_grid(cache, weights):
    """DITN needs multiples of 8, and its windows must sit on the same 8 px grid as a single pass."""
    img = crop(131, 157)  # neither side a multiple of 8
    whole = load(cache, weights, DITN)
    tiled = load(cache, weights, DITN, tile=smallest_tile(OVERLAP, 8))
    a, b = whole(img), tiled(img)
    assert a.shape == b.shape == (524, 628, 3)
    # DITN's ISA blocks attend over a window's channel statistics, so tiles cannot match a pass exactly;
    # off the patch grid they differ by 10+ levels, on it by under one.
    assert np.abs(a - b)[8:-8, 8:-8].max() < 2 / 255


def test_out_of_memory_splits_the_window_and_retries(cache, weights):
    """Stand-in for a GPU with little free memory: the window function fails on windows over 200 px."""
    img = crop(260, 300, y=100, x=100, src=BABY)
    up = load(ModelCache(), weights, XSX4, tile=None, precision="fp32")
    reference = up(img)
    model = up.model
    real_run, seen = model.run_window, []

    def tight_memory(window: np.ndarray, origin) -> np.ndarray:
        seen.append(window.shape[:2])
        if max(window.shape[:2]) > 200:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")
        return real_run(window, origin)

    model.run_window = tight_memory
    try:
        out = up(img)
        assert up.splits == 1 and max(seen[0]) > 200 and all(max(s) <= 200 for s in seen[1:])
        assert np.abs(out - reference)[8:-8, 8:-8].max() < 1 / 255
        assert model.splitter.cap is not None and up.window_side() == model.splitter.cap  # later calls start small
        seen.clear()
        up(img)
        assert all(max(s) <= 200 for s in seen)
        model.run_window = lambda w, o: (_ for _ in ()).throw(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED (stand-in)"))
        with pytest.raises(OutOfMemoryError, match="cannot be split further") as err:
            up(img)
        assert err.value.retry is Retry.BACKOFF
    finally:
        model.run_window = real_run


def test_uint8_in_uint8_out_on_the_device_equals_the_quantised_float_path(cache, weights):
    up = load(cache, weights, XSX4)
    u8 = to_uint8(crop(48, 56))
    out = up(u8)
    assert out.dtype == np.uint8 and out.shape == (192, 224, 3)
    np.testing.assert_array_equal(out, to_uint8(up(to_unit_float(u8))))
    # A plain spandrel loop (x / 255 in fp32, rint(y * 255)) gives the same bytes, but for the convolution's
    # memory layout: channels_last sums in another order, which can move a value across a rounding boundary.
    plain = np.rint(_plain_spandrel(weights, XSX4, to_unit_float(u8)) * 255).astype(np.uint8)
    diff = np.abs(out.astype(int) - plain)
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
    if not up.channels_last:
        np.testing.assert_array_equal(out, plain)


def test_issue_17_item_7_window_sizes_are_fixed_at_load_and_not_probed_per_call(weights, monkeypatch):
    """Stand-in for a GPU whose free memory changes with other workers: a probe during a call would fail the test."""
    up = load(ModelCache(), weights, XSX4)
    img = crop(40, 50)
    first = up(img)
    side = up.window_side()

    def no_probe(*_a, **_k):
        raise AssertionError("memory probed during a call")

    monkeypatch.setattr(runtime, "free_memory", no_probe)
    monkeypatch.setattr(spandrel_sr, "free_memory", no_probe)
    assert up.window_side() == side
    assert up(img).tobytes() == first.tobytes()  # same input, same rule, same device: same bytes


def test_issue_17_item_8_a_racing_memory_reading_never_undercuts_the_estimate():
    """Device-wide counters read while another thread frees memory can come out near zero or negative."""
    assert combine_measurements(-5e6, 3e6) == 3e6 and combine_measurements(0, 3e6) == 3e6
    assert combine_measurements(8e6, 3e6) == 8e6


def _overflowing_model(tmp_path: Path) -> Path:
    path = tmp_path / "2x-Overflow.pth"
    torch.save(compact_state(2, overflow_fp16=True), path)
    return path


def test_issue_17_item_6_after_the_fp32_fallback_windows_are_sized_for_fp32(tmp_path):
    """fp16 on the CPU stands in for fp16 on a GPU: the same overflow, the same fallback."""
    path = _overflowing_model(tmp_path)
    up = ModelCache().get(f"file:{path}", 2, LoadContext(tmp_path, "cpu", precision="fp16"))[0]
    bpp16, side16 = up.bytes_per_px, up.window_side()
    up(crop(20, 24))
    assert up.precision == "fp16->fp32" and up.fallbacks == 1
    assert up.bytes_per_px == 2 * bpp16
    assert up.window_side() < side16 or side16 == spandrel_sr.MAX_TILE
    assert up.window_side() == up.model.memory_side("fp32") and up.splits == 0


def test_issue_17_item_11_under_auto_a_float32_input_runs_in_fp32(tmp_path, weights):
    """Stand-in for CUDA, where auto is fp16: the model is loaded fp16 and marked auto. A float32 (16-bit) input then
    runs on an fp32 copy of the file's weights; a uint8 input stays fp16."""
    up = ModelCache().get(XSX4, 4, LoadContext(weights, "cpu", precision="fp16"))[0]
    up.model.auto = True
    fp32 = ModelCache().get(XSX4, 4, LoadContext(weights, "cpu", precision="fp32"))[0]
    img = crop(32, 40)
    out = up(img)
    assert up.precision == "fp32" and out.dtype == np.float32
    # fp32's result (to torch's run-to-run float noise, ~1e-6), not fp16's ~11 bits (errors ~1e-3).
    np.testing.assert_allclose(out, fp32(img), rtol=0, atol=2e-5)
    up(to_uint8(img))
    assert up.precision == "fp16" and up.model.precision.loaded == "fp16"


# --- the Real-ESRGAN layouts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [2, 4, 8])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "params_ema"])
def test_rrdbnet_layouts_load_through_the_catalogue(tmp_path, scale, wrapped):
    sd = rrdb_state(scale, seed=scale)
    weights = tmp_path / "weights"
    path = weights / get_entry(f"realesrgan-x{scale}").files[scale].path
    path.parent.mkdir(parents=True)
    torch.save({"params_ema": sd} if wrapped else sd, path)
    up, loaded = ModelCache().get(f"realesrgan-x{scale}", scale, LoadContext(weights, "cpu"))
    assert loaded and (up.arch, up.scale, up.backend) == ("ESRGAN", scale, "spandrel")
    rgb = crop(32, 36)  # not under SMALL_SIDE, where the upscaler pads on purpose and a plain call would not
    out = up(rgb)
    assert out.shape == (32 * scale, 36 * scale, 3)
    ref = direct(sd, rgb)
    assert out.std() > 0.01 and np.abs(out - ref).max() < 1e-4


def test_full_23_block_rrdbnet_layout(tmp_path):
    sd = rrdb_state(4, blocks=23, nf=64)
    path = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": sd}, path)
    d = load_descriptor(path, torch, spandrel)
    assert (d.architecture.id, d.scale, d.purpose) == ("ESRGAN", 4, "SR")
    assert "64nf" in d.tags and "23nb" in d.tags
    assert sum(p.numel() for p in d.model.parameters()) == sum(t.numel() for t in sd.values())


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".safetensors"])
def test_file_models_in_every_format_through_a_rule(tmp_path, monkeypatch, suffix):
    sd = rrdb_state(2, seed=7)
    weights = tmp_path / "weights"
    weights.mkdir()
    name = f"2x-Something{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(dict(sd), weights / name)
    else:
        torch.save({"state_dict": sd} if suffix == ".ckpt" else sd, weights / name)
    monkeypatch.chdir(tmp_path)  # relative file: paths resolve against the current folder...
    settings = settings_in(tmp_path, weights, [{"folder": "", "model": f"file:weights/{name}", "scale": 2}])
    rule = settings.rules[0]
    src = image(tmp_path / "in" / "x.png", (20, 16))
    (report,) = process_once(settings, [src], rule.model_copy(update={"metrics": []}), tmp_path / "out")
    assert report["state"] == "done", report
    out = Path(report["output"])
    assert out.name == "x.2x-Something.x2.png" and Image.open(out).size == (40, 32)
    # ...and against weights_dir when the daemon loads; the wrong scale is a clear error, not a silent resize.
    monkeypatch.chdir(weights.parent.parent)
    ctx = LoadContext(weights, "cpu")
    assert ModelCache().get(f"file:{name}", 2, ctx)[0].scale == 2
    with pytest.raises(UnsupportedScaleError, match="x2 model"):
        ModelCache().get(f"file:{name}", 4, ctx)


def test_file_model_rules_need_an_existing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        settings_in(tmp_path, tmp_path, [{"folder": "", "model": "file:/nonexistent/4x-Foo.pth", "scale": 4}])
    with pytest.raises(ConfigError, match="expected a model file"):
        settings_in(tmp_path, tmp_path, [{"folder": "", "model": f"file:{write_config(tmp_path)}", "scale": 4}])
    with pytest.raises(WeightsMissingError):
        check_scale("file:4x-Foo.pth", 4, tmp_path)
    assert model_label("file:weights/4x Foo.pth") == "4x_Foo"


# --- safety and refusals --------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this would create ``marker``: code running at load time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle", "torchscript"])
def test_code_in_a_weight_file_is_refused_and_never_runs(tmp_path, how):
    marker, path = tmp_path / "pwned", tmp_path / "4x-Evil.pth"
    if how == "torch.save":
        torch.save({"params_ema": {"conv_first.weight": Payload(marker)}}, path)
    elif how == "pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 3)), path)
    with pytest.raises(UnsafeWeightsError, match=str(path)):
        ModelCache().get(f"file:{path}", 4, LoadContext(tmp_path, "cpu"))
    assert not marker.exists()


def test_models_that_are_not_super_resolution_are_refused(tmp_path):
    from spandrel.architectures.Compact import Compact

    denoiser = tmp_path / "1x-Denoise.pth"  # same family, scale 1: spandrel calls it Restoration
    torch.save(Compact(num_feat=8, num_conv=2, upscale=1).state_dict(), denoiser)
    with pytest.raises(UnsupportedModelError, match="Restoration"):
        ModelCache().get(f"file:{denoiser}", 1, LoadContext(tmp_path, "cpu"))
    unknown = tmp_path / "4x-Unknown.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(4, 4)}, unknown)
    with pytest.raises(UnsupportedModelError, match="does not recognise"):
        ModelCache().get(f"file:{unknown}", 4, LoadContext(tmp_path, "cpu"))


def test_devices_and_the_fp16_overflow_fallback(tmp_path):
    """fp16 on the CPU stands in for a GPU's fp16: a model whose middle layers overflow 65504 gives Inf there."""
    if torch.cuda.is_available():
        pytest.skip("these device checks assume a machine without CUDA")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceUnavailableError):
            resolve_device(name, torch)
    assert resolve_device("auto", torch) == "cpu"
    path = _overflowing_model(tmp_path)
    rgb = crop(20, 24)
    fp32 = ModelCache().get(f"file:{path}", 2, LoadContext(tmp_path, "cpu", precision="fp32"))[0](rgb)
    cache = ModelCache()
    up = cache.get(f"file:{path}", 2, LoadContext(tmp_path, "cpu", precision="fp16"))[0]
    view = cache.get(f"file:{path}", 2, LoadContext(tmp_path, "cpu", tile=64, precision="fp16"))[0]
    assert up.precision == "fp16" and view.model is up.model and view is not up
    out = up(rgb)
    assert (up.precision, up.fallbacks) == ("fp16->fp32", 1)
    # The fallback runs the file's own fp32 weights: casting the fp16 ones back up would be off by far more (the
    # 1e-7 weights are fp16 subnormals). What is left is fp32 rounding, amplified by this ill-conditioned network.
    assert np.isfinite(out).all() and out.std() > 0.01 and np.abs(out - fp32).max() < 1e-3
    # A view with another tile shares the model, and so its fallback.
    assert view.fallbacks == 1 and view.model.precision.label == "fp16->fp32"


def test_missing_torch_is_a_clear_error_and_the_daemon_never_imports_it():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import daemon.service, daemon.cli, models.spandrel_sr\n"
        "from pathlib import Path\n"
        "from models.catalog import get_entry\n"
        "from models.registry import LoadContext\n"
        "from models.errors import BackendUnavailableError\n"
        "try:\n"
        "    models.spandrel_sr.load(get_entry('ditn-real-x4'), 4.0, LoadContext(Path('.')))\n"
        "except BackendUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'upscaled[gan]'" in out.stdout
    check = (
        "import daemon.service, daemon.cli, daemon.pipeline, models.spandrel_sr, models.diffusion_sd, sys\n"
        "from models import devices\n"
        "info, used = devices.build_info(), devices.memory_used()\n"
        "print('torch' in sys.modules, info['torch'] != '', used)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60
        ).stdout.strip()
        == "False True {}"
    )
    # build_info() without torch imported reads the same versions as with it (torch/version.py, not a guess).
    check = (
        "import sys, models.devices as d; before = d.build_info(); assert 'torch' not in sys.modules\n"
        "import torch, cv2; print(before == d.build_info(), before['torch'] == torch.__version__)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60
        ).stdout.strip()
        == "True True"
    )


# --- pixel formats through the pipeline -------------------------------------------------------------------------------
def _decode(path: Path) -> imageio.Decoded:
    return decode.decode(path, 10**8)


def _shift(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-channel mean difference between the input and the output brought back to the input's size."""
    back = resize(out, (src.shape[1], src.shape[0]), "area")
    return np.abs(back.reshape(-1, 3).mean(0) - src.reshape(-1, 3).mean(0))


def _plain_spandrel(weights: Path, model: str, rgb: np.ndarray) -> np.ndarray:
    """The model's own output for ``rgb``, from a plain spandrel call on the catalogued file."""
    wf = get_entry(model).weight_files()[0]
    d = spandrel.ModelLoader().load_from_file(weights / wf.path).eval()
    with torch.inference_mode():
        y = d(torch.from_numpy(np.ascontiguousarray(rgb, np.float32)).permute(2, 0, 1)[None].contiguous())
    return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("alpha_mode", ["resize", "model"])
def test_alpha_is_kept_and_colour_does_not_shift(tmp_path, weights, alpha_mode):
    rgb = (crop(32, 40) * 255).round().astype(np.uint8)
    alpha = np.tile(np.linspace(0, 255, 40, dtype=np.float32), (32, 1)).round().astype(np.uint8)
    src = tmp_path / "in" / "rgba.png"
    src.parent.mkdir()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src)
    settings = settings_in(tmp_path, weights)
    rule = Rule(model=XSX4, scale=4, alpha=alpha_mode, metrics=[])
    (report,) = process_once(settings, [src], rule, tmp_path / "out")
    assert report["state"] == "done", report
    dec = _decode(Path(report["output"]))
    assert dec.alpha is not None and dec.rgb.shape == (128, 160, 3) and dec.bits == 8
    # Colour: exactly the model's own output (to the 8-bit step), so nothing in between shifted it.
    assert np.abs(dec.rgb - _plain_spandrel(weights, XSX4, rgb / 255.0)).max() <= 1.01 / 255
    assert _shift(rgb / 255.0, dec.rgb).max() < 6 / 255
    a = alpha.astype(np.float32) / 255.0
    if alpha_mode == "model":  # the model upscales alpha as a grey picture
        want = _plain_spandrel(weights, XSX4, np.repeat(a[:, :, None], 3, axis=2)).mean(axis=2)
    else:  # the classical filter
        want = resize(a[:, :, None], (160, 128), "bicubic")[:, :, 0]
    assert np.abs(dec.alpha - want).max() <= 1.01 / 255
    back = resize(dec.alpha[:, :, None], (40, 32), "area")[:, :, 0]
    assert np.corrcoef(back.ravel(), a.ravel())[0, 1] > 0.95  # still the same gradient (the anime model darkens it)


def test_16_bit_in_gives_16_bit_out(tmp_path, weights):
    rgb16 = (crop(32, 36) * 65535).round().astype(np.uint16)
    src16, src8 = tmp_path / "in" / "deep.png", tmp_path / "in" / "flat.png"
    src16.parent.mkdir()
    cv2.imwrite(str(src16), rgb16[:, :, ::-1])
    Image.fromarray((rgb16 // 257).astype(np.uint8)).save(src8)
    settings = settings_in(tmp_path, weights)
    reports = process_once(settings, [src16, src8], Rule(model=XSX4, scale=4, metrics=[]), tmp_path / "out")
    assert [r["state"] for r in reports] == ["done", "done"], reports
    deep, flat = (_decode(Path(r["output"])) for r in reports)
    assert deep.bits == 16 and flat.bits == 8 and not deep.grey
    assert np.abs(deep.rgb - _plain_spandrel(weights, XSX4, rgb16 / 65535.0)).max() < 1 / 255
    assert len(np.unique(np.rint(deep.rgb * 65535) % 257)) > 16  # 16 real bits, not 8 bits scaled by 257
    assert np.abs(deep.rgb - flat.rgb).mean() < 2 / 255  # the same picture, not a 256x brighter one


def test_grey_stays_grey(tmp_path, weights):
    src = image(tmp_path / "in" / "grey.png", (40, 32), mode="L")
    settings = settings_in(tmp_path, weights)
    (report,) = process_once(settings, [src], Rule(model=XSX4, scale=4, metrics=[]), tmp_path / "out")
    assert report["state"] == "done", report
    out = Image.open(report["output"])
    assert out.mode == "L" and out.size == (160, 128)
    grey_in = np.asarray(Image.open(src), np.float32) / 255.0
    model_rgb = _plain_spandrel(weights, XSX4, np.repeat(grey_in[:, :, None], 3, axis=2))
    luma = model_rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.abs(np.asarray(out, np.float32) / 255.0 - luma).max() <= 1.01 / 255


@pytest.mark.parametrize("model", [XSX4, DITN])
@pytest.mark.parametrize("size", [(1, 1), (13, 7), (21, 11)], ids=["1x1", "7x13", "11x21"])
def test_odd_sizes(tmp_path, weights, model, size):
    value = np.array([200, 120, 40], np.uint8)
    src = tmp_path / "in" / "odd.png"
    src.parent.mkdir()
    Image.fromarray(np.tile(value, (size[1], size[0], 1))).save(src)
    settings = settings_in(tmp_path, weights)
    (report,) = process_once(settings, [src], Rule(model=model, scale=4, metrics=[]), tmp_path / "out")
    assert report["state"] == "done", report
    out = _decode(Path(report["output"]))
    assert (out.width, out.height) == (size[0] * 4, size[1] * 4)
    # A flat colour must come out as the colour the model gives the middle of a large flat field of it (the
    # anime model itself lifts (200, 120, 40) to about (207, 123, 38)): no channel swap, no tint from padding.
    field = _plain_spandrel(weights, model, np.tile(value / 255.0, (64, 64, 1)))[128, 128] * 255
    assert np.abs(out.rgb.reshape(-1, 3) * 255 - field).max() < 3, (out.rgb.reshape(-1, 3).mean(0) * 255, field)


def test_outscale_finishes_with_a_resize(tmp_path, weights):
    src = image(tmp_path / "in" / "x.png", (30, 20))
    settings = settings_in(tmp_path, weights)
    rule = Rule(model="realesrgan-animevideo-xsx2", scale=2, outscale=3.3, metrics=[])
    (report,) = process_once(settings, [src], rule, tmp_path / "out")
    assert report["state"] == "done", report
    assert Image.open(report["output"]).size == (99, 66)


# --- the GPU check script, in its CPU mode --------------------------------------------------------------------------
def test_the_gpu_check_script_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --cpu-smoke: every check runs (the GPU-only ones say skip), none fails, and the table
    names the issue-17 items each check exercises."""
    pytest.importorskip("diffusers")
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--cpu-smoke",
            "--json",
            str(out),
            "--weights",
            str(MIRROR),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| check | items | status | s | detail |" in res.stdout
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert {n for n, c in checks.items() if c["status"] == "skip"} == {
        "oom split (spandrel)",
        "diffusion oom split",
        "diffusion syncs",
    }
    assert all(c["status"] in ("ok", "skip") for c in checks.values())
    assert checks["fp16 fallback"]["data"]["bytes_per_px"][1] == 2 * checks["fp16 fallback"]["data"]["bytes_per_px"][0]
    covered = {int(i) for c in checks.values() for i in c["items"].replace("-", "").split(",") if i.strip()}
    assert covered >= {1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}
