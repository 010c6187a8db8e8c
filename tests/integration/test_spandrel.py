"""The spandrel backend on the real thing: real weights from the shared mirror, and RRDBNet (Real-ESRGAN) state dicts
built here with random weights in the layouts the published files use. The only thing simulated is an
out-of-memory error, which a CPU cannot be made to raise on cue.
"""

from __future__ import annotations

import csv
import pickle
import statistics
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

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
from daemon.service import Service, process_once  # noqa: E402
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
from models.registry import REGISTRY, LoadContext, ModelCache, check_scale  # noqa: E402
from models.resize import resize  # noqa: E402
from models.spandrel_sr import OVERLAP, load_descriptor, resolve_device  # noqa: E402
from models.tiling import blend_profile, plan_axis, run_blended, smallest_tile, split_on_oom  # noqa: E402
from models.weights import fetch  # noqa: E402

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
    for mid in ("realesrgan-x2", "realesrgan-x4", "realesrgan-x8", "realesrgan-x4plus", "realesrgan-x4plus-anime-6b",
                "realesrgan-x2plus", "realesr-general-x4v3", "realesr-animevideov3"):
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
        src = image(svc.settings.inbox / "photo.png", (40, 32))
        reg = svc.admit(src)
        assert reg is not None and svc.step()
        job = svc.store.get(reg.job_id)
    finally:
        svc.shutdown()
    assert job["state"] == "done", job
    assert (job["backend"], job["device"], job["precision"]) == ("spandrel", "cpu", "fp32")
    out = Path(job["output_path"])
    assert out.name == f"photo.{XSX4}.x4.png" and Image.open(out).size == (160, 128)
    assert not src.exists()  # archived


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


def test_out_of_memory_splits_the_tile_and_retries(cache, weights):
    img = crop(260, 300, y=100, x=100, src=BABY)
    up = load(cache, weights, XSX4, tile=None, precision="fp32")
    reference = up(img)
    real_run, seen = up.run, []

    def tight_memory(window: np.ndarray) -> np.ndarray:
        seen.append(window.shape[:2])
        if max(window.shape[:2]) > 200:  # what a GPU with little free memory does
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(window)

    up.run = tight_memory
    try:
        out = up(img)
        assert up.splits >= 1 and max(seen[0]) > 200
        assert all(max(s) <= 200 for s in seen[1:])
        assert np.abs(out - reference)[8:-8, 8:-8].max() < 1 / 255
        up.run = lambda w: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
        with pytest.raises(OutOfMemoryError) as err:
            up(img)
        assert err.value.retry is Retry.BACKOFF
    finally:
        up.run, up._tile_cap = real_run, None


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
    from spandrel.architectures.Compact import Compact

    if torch.cuda.is_available():
        pytest.skip("these device checks assume a machine without CUDA")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceUnavailableError):
            resolve_device(name, torch)
    assert resolve_device("auto", torch) == "cpu"
    # A model whose second layer overflows fp16 (65504) while fp32 is fine: fp16 gives Inf/NaN, the window is
    # rerun in fp32 and the upscaler says so.
    sd = Compact(num_feat=8, num_conv=2, upscale=2).state_dict()
    g = torch.Generator().manual_seed(1)
    sd["body.0.weight"] = torch.rand(sd["body.0.weight"].shape, generator=g) * 100
    sd["body.2.weight"] = torch.rand(sd["body.2.weight"].shape, generator=g) * 100
    sd["body.4.weight"] = torch.randn(sd["body.4.weight"].shape, generator=g) * 1e-7
    path = tmp_path / "2x-Overflow.pth"
    torch.save(sd, path)
    rgb = crop(20, 24)
    fp32 = ModelCache().get(f"file:{path}", 2, LoadContext(tmp_path, "cpu", precision="fp32"))[0](rgb)
    up = ModelCache().get(f"file:{path}", 2, LoadContext(tmp_path, "cpu", precision="fp16"))[0]
    assert up.precision == "fp16"
    out = up(rgb)
    assert (up.precision, up.fallbacks) == ("fp16->fp32", 1)
    # The fallback runs the file's own fp32 weights: casting the fp16 ones back up would be off by far more (the
    # 1e-7 weights are fp16 subnormals). What is left is fp32 rounding, amplified by this ill-conditioned network.
    assert np.isfinite(out).all() and out.std() > 0.01 and np.abs(out - fp32).max() < 1e-3


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
    check = "import daemon.service, daemon.cli, daemon.pipeline, models.spandrel_sr, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout.strip() == "False"


# --- pixel formats through the pipeline -------------------------------------------------------------------------------
def _decode(path: Path) -> imageio.Decoded:
    return imageio.decode(path, 10**8)


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


# --- tiling, as pure functions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("multiple", [1, 8])
def test_tile_plans_cover_overlap_and_cross_fade_to_one(multiple):
    rng = np.random.default_rng(0)
    for _ in range(200):
        overlap = int(rng.integers(0, 48))
        tile = smallest_tile(overlap, multiple) + int(rng.integers(0, 300))
        length = int(rng.integers(1, 3000))
        spans = plan_axis(length, tile, overlap, multiple)
        assert spans[0][0] == 0 and spans[-1][1] == length
        for (s0, e0), (s1, e1) in zip(spans, spans[1:], strict=False):
            assert s1 % multiple == 0 and e0 - s1 >= overlap and s1 > s0 and e1 > e0
        assert len({e - s for s, e in spans}) == 1 or spans[-1][1] % multiple
        assert all(e - s <= max(tile, length if len(spans) == 1 else 0) + multiple for s, e in spans)
        scale = int(rng.integers(1, 5))
        total = np.zeros(length * scale)
        for i, (s, e) in enumerate(spans):
            total[s * scale : e * scale] += blend_profile(spans, i, scale, 16)
        np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_blended_tiling_of_a_pixelwise_network_is_exact():
    img = np.random.default_rng(1).random((157, 203, 3), dtype=np.float32)

    def nearest_x3(window: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(window, 3, axis=0), 3, axis=1)

    calls = []
    out = run_blended(lambda w: calls.append(w.shape) or nearest_x3(w), img, 3, 96, 24, 8)
    assert len(calls) > 4 and all(max(s[:2]) <= 96 for s in calls)
    np.testing.assert_allclose(out, nearest_x3(img), atol=1e-6)
    oom = split_on_oom(lambda w: nearest_x3(w) if max(w.shape[:2]) <= 110 else (_ for _ in ()).throw(MemoryError()),
                       3, 24, 8, 72, lambda e: isinstance(e, MemoryError))
    np.testing.assert_allclose(oom(img), nearest_x3(img), atol=1e-6)

