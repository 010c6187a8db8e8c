"""The paper protocol: MATLAB bicubic, BT.601 Y, border shave, and the published Set5 figures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from daemon.config import Rule, load_settings
from daemon.metrics import full_reference, lr_consistency, y_bt601
from daemon.oneshot import process as process_once
from models.resize import imresize, resize
from tests.conftest import SET5, rows, write_config

HR = sorted((SET5 / "HR").glob("*.png"))
pytestmark = pytest.mark.skipif(not HR, reason=f"Set5 is not at {SET5}")


def _load(p) -> np.ndarray:
    return np.asarray(Image.open(p).convert("RGB"), np.float32) / 255.0


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_reproduces_matlab_lr_images(scale):
    """Our MATLAB-bicubic downscale gives the shipped LR_bicubic images (made by MATLAB) to within 1 level."""
    for i, hr_path in enumerate(HR, start=1):
        hr = _load(hr_path)
        hr = hr[: hr.shape[0] - hr.shape[0] % scale, : hr.shape[1] - hr.shape[1] % scale]
        ours = np.rint(imresize(hr, (hr.shape[1] // scale, hr.shape[0] // scale), levels=255) * 255)
        theirs = np.asarray(Image.open(SET5 / "LR_bicubic" / f"X{scale}" / f"img_00{i}_SRF_{scale}_LR.png"))
        assert ours.shape == theirs.shape
        diff = np.abs(ours - theirs[..., :3].astype(np.float64))
        # Nearly every pixel is identical; a few at saturated edges differ by a few levels.
        psnr = 10 * np.log10(255**2 / np.mean(diff**2))
        assert diff.mean() < 0.05 and (diff == 0).mean() > 0.97 and psnr > 55, (diff.mean(), psnr)


def test_imresize_basic_properties():
    flat = np.full((10, 14, 3), 0.25, np.float32)
    np.testing.assert_allclose(imresize(flat, (21, 15)), 0.25, atol=1e-6)  # partition of unity
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (8, 1))
    up = imresize(ramp, (32, 16))
    assert np.all(np.diff(up[4, 4:-4]) > 0)  # monotone inside
    assert resize(ramp[:, :, None], (5, 3), "area").shape == (3, 5, 1)


def test_y_channel_and_psnr_follow_the_papers():
    rgb = np.array([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(y_bt601(rgb), [[235.0, 16.0]], atol=1e-3)
    rng = np.random.default_rng(0)
    a = rng.random((20, 20, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1).astype(np.float32)
    m = {x.name: x for x in full_reference(b, a, 2, ("psnr_rgb", "psnr_y", "mse_rgb", "ssim_y", "ssim_rgb"))}
    ref = peak_signal_noise_ratio(
        a[2:-2, 2:-2].astype(np.float64) * 255, b[2:-2, 2:-2].astype(np.float64) * 255, data_range=255
    )
    assert m["psnr_rgb"].value == pytest.approx(ref, abs=1e-6)
    assert m["psnr_y"].shave == 2 and m["psnr_y"].space == "y-bt601" and m["psnr_y"].reference == "hr"
    assert 0 < m["ssim_y"].value < 1 and 0 < m["ssim_rgb"].value < 1
    assert m["mse_rgb"].value == pytest.approx(np.mean((a[2:-2, 2:-2] * 255.0 - b[2:-2, 2:-2] * 255.0) ** 2), rel=1e-4)
    smooth = np.clip(imresize(a[:5, :5], (20, 20)), 0, 1)
    lr = lr_consistency(imresize(smooth, (40, 40)), smooth, ("lr_psnr_y", "lr_ssim_y"))
    assert lr[0].reference == "lr-input" and lr[0].value > 35 and lr[1].value > 0.95
    noisy = lr_consistency(
        imresize(smooth, (40, 40)) + rng.normal(0, 0.1, (40, 40, 3)).astype(np.float32), smooth, ("lr_psnr_y",)
    )
    assert noisy[0].value < lr[0].value - 3


# Published bicubic figures (33.66 / 30.39 / 28.42) and the shared README's FSRCNN x4 (28.41).
EXPECTED = [
    ("bicubic", 2, 33.66, 0.05),
    ("bicubic", 3, 30.39, 0.05),
    ("bicubic", 4, 28.42, 0.05),
    ("fsrcnn", 4, 28.41, 0.1),
]


@pytest.mark.parametrize(("model", "scale", "published", "tol"), EXPECTED)
def test_benchmark_mode_on_set5_matches_published_figures(tmp_path, weights_dir, model, scale, published, tol):
    """Benchmark mode end to end (the service's pipeline and store): mean psnr_y over Set5 HR."""
    cfg = write_config(tmp_path, weights=weights_dir)
    settings = load_settings(cfg)
    rule = Rule(model=model, scale=scale, mode="benchmark")
    reports = process_once(settings, HR, rule, tmp_path / "out")
    assert [r["state"] for r in reports] == ["done"] * 5, reports
    db = settings.sqlite_path()
    vals = rows(
        db,
        "SELECT m.value, m.shave, m.space FROM metrics m JOIN jobs j ON j.id = m.job_id "
        "WHERE m.name = 'psnr_y' AND j.model_id = ?",
        model,
    )
    assert len(vals) == 5 and all(v["shave"] == scale and v["space"] == "y-bt601" for v in vals)
    mean = float(np.mean([v["value"] for v in vals]))
    assert abs(mean - published) <= tol, f"{model} x{scale}: mean psnr_y {mean:.3f}, published {published}"
    # the side-by-side comparison image is written beside each output
    assert len(list((tmp_path / "out").glob("*.compare.png"))) == 5
