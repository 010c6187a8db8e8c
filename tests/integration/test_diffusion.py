"""The diffusion backend on the real code path.

The real Stable Diffusion x4 upscaler (several GB) is not reachable here, so a tiny, randomly initialised
``StableDiffusionUpscalePipeline`` (a 7-channel UNet, a 3-block VAE, a CLIP text encoder and tokenizer, DDPM and DDIM
schedulers) is built from configs at test time, written with ``save_pretrained``, and loaded through the backend's
own loading path: from a ``diffusers:`` folder, and from a Hugging Face cache laid out by hand. Nothing in the
pipeline is mocked. Failures that a CPU cannot produce on cue (NaN in reduced precision, a black decode) are
injected with forward hooks on the real modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image, rows, shared_sandbox, write_config

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from structlog.testing import capture_logs  # noqa: E402

from daemon.config import Rule, load_settings  # noqa: E402
from daemon.errors import BadSidecarError  # noqa: E402
from daemon.fsops import Root  # noqa: E402
from daemon.intake import with_sidecar_prompt  # noqa: E402
from daemon.media import decode  # noqa: E402
from daemon.service import Service  # noqa: E402
from models import diffusion_sd  # noqa: E402
from models.backends import DiffusionParams  # noqa: E402
from models.base import Tiling, pad_to_multiple  # noqa: E402
from models.catalog import CATALOG, model_label  # noqa: E402
from models.diffusion_sd import DiffusionUpscaler, window_geometry  # noqa: E402
from models.errors import (  # noqa: E402
    InvalidParamsError,
    NonFiniteOutputError,
    UnsupportedModelError,
    UnsupportedScaleError,
    WeightsCorruptError,
    WeightsMissingError,
)
from models.pixels import to_uint8, to_unit_float  # noqa: E402
from models.progress import reporting  # noqa: E402
from models.registry import LoadContext, ModelCache  # noqa: E402
from models.testing import build_tiny_pipeline  # noqa: E402
from models.tiling import Geometry, plan_axis, run_tiled  # noqa: E402
from models.weights import fetch, fetch_hub, present  # noqa: E402

FAST = {"num_inference_steps": 3}
HUB_REPO = "upscaled-tests/tiny-sd-x4"


# --- the tiny pipeline (models/testing.py) --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache()


def load(cache: ModelCache, folder: Path, scale: int = 4, **ctx) -> DiffusionUpscaler:
    up, _ = cache.get(f"diffusers:{folder}", scale, LoadContext(folder.parent, ctx.pop("device", "cpu"), **ctx))
    assert isinstance(up, DiffusionUpscaler)
    return up


def scene(h: int, w: int) -> np.ndarray:
    """A smooth, structured picture: seams and tints show on it, and it is the same on every machine."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack(
        [0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0), 0.3 + 0.4 * x / w, 0.5 + 0.25 * np.sin((x + 2 * y) / 17.0)],
        axis=2,
    )
    return np.ascontiguousarray(rgb.astype(np.float32))


def hf_cache(root: Path, repo: str, pipe_folder: Path) -> Path:
    """Lay ``pipe_folder`` out as the Hugging Face cache does: blobs named by sha256, a snapshot of links, a ref."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    for src in sorted(p for p in pipe_folder.rglob("*") if p.is_file()):
        rel = src.relative_to(pipe_folder)
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copyfile(src, repo_dir / "blobs" / sha)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / sha, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


# --- loading ------------------------------------------------------------------------------------------------------
def test_a_saved_pipeline_loads_as_a_x4_upscaler(cache, tiny):
    up = load(cache, tiny, tile=32)
    assert (up.backend, up.scale, up.device, up.precision) == ("diffusion", 4.0, "cpu", "fp32")
    assert up.tiling is Tiling.INTERNAL  # it tiles and blends by itself
    # The 2-block UNet halves once and the 3-block VAE scales by 4: inputs go in on a 4 px grid.
    assert up.size.multiple_of == 4
    # The VAE decodes in fp32 (pixels clamped in fp32), whole for ordinary windows (tiled only above VAE_WHOLE_MAX).
    assert up.pipe.vae.dtype == torch.float32 and not up.pipe.vae.use_tiling
    with pytest.raises(UnsupportedScaleError, match="x4 pipeline"):
        load(ModelCache(), tiny, scale=2)
    assert model_label(f"diffusers:{tiny}/") == "pipe"


def test_the_hub_id_loads_from_the_hugging_face_cache_and_fetch_verifies_it(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, whatever happens
    snapshot = hf_cache(tmp_path / "hub", HUB_REPO, tiny)
    # The catalogue pins the hub repository to a commit: the fake cache's commit stands in for it here.
    entry = dataclasses.replace(CATALOG["sd-x4-upscaler"], hub_repo=HUB_REPO, hub_revision=snapshot.name)
    up = diffusion_sd.load(entry, 4, LoadContext(tmp_path, "cpu", tile=32))
    assert (up.model_id, up.source, up.revision) == ("sd-x4-upscaler", HUB_REPO, snapshot.name)
    assert up(scene(16, 16), FAST).shape == (64, 64, 3)
    assert present(tmp_path, entry)  # what `upscaled models` and `check-config` show
    # `upscaled weights fetch` finds an intact snapshot without the network...
    report = fetch_hub(entry)
    assert (report.status, report.detail) == ("present", str(snapshot)), report
    # ...and a damaged weight file fails the check that the blob's name is its sha256.
    blob = (snapshot / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    report = fetch_hub(entry)
    assert report.status == "failed" and "unet/diffusion_pytorch_model.safetensors: sha256" in report.detail, report


def test_missing_weights_fail_with_how_to_fetch_them(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsMissingError) as err:
        ModelCache().get("sd-x4-upscaler", 4, LoadContext(tmp_path, "cpu"))
    text = str(err.value)
    assert not present(tmp_path, CATALOG["sd-x4-upscaler"])
    for part in (
        "not in the Hugging Face cache",
        str(tmp_path / "empty-hub"),
        "upscaled weights fetch sd-x4-upscaler",
        "huggingface-cli download stabilityai/stable-diffusion-x4-upscaler",
        'model = "diffusers:',
    ):
        assert part in text, text
    # The fetch command reports the failure instead of raising (no network here: offline mode).
    (report,) = fetch(tmp_path / "weights", ["sd-x4-upscaler"])
    pinned = CATALOG["sd-x4-upscaler"].hub_revision  # a commit, never a branch that moves
    assert len(pinned) == 40 and report.status == "failed", report
    assert report.path == f"hf:stabilityai/stable-diffusion-x4-upscaler@{pinned}", report
    # A folder that is not there, or holds another pipeline, is said so.
    with pytest.raises(WeightsMissingError, match="holds a model_index.json"):
        ModelCache().get(f"diffusers:{tmp_path}/nothing-here", 4, LoadContext(tmp_path, "cpu"))
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionPipeline")))
    with pytest.raises(UnsupportedModelError, match="StableDiffusionPipeline pipeline"):
        ModelCache().get(f"diffusers:{other}", 4, LoadContext(tmp_path, "cpu"))


# --- the call contract --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(32, 32), (33, 45), (17, 50), (5, 7)])
def test_output_is_four_times_the_input_padded_and_cropped_never_resized(cache, tiny, h, w):
    up = load(cache, tiny, tile=32)
    img = scene(h, w)
    out = up(img, FAST)
    assert out.shape == (4 * h, 4 * w, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    # Padding (not resizing) to the 4 px grid: the result is exactly the crop of the explicitly padded input's.
    padded = pad_to_multiple(img, up.size.multiple_of)
    assert np.array_equal(out, up(padded, FAST)[: 4 * h, : 4 * w])


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not(cache, tiny):
    img = scene(40, 72)  # several windows
    up = load(cache, tiny, tile=32)
    a = up(img, dict(FAST, seed=11))
    fresh = load(ModelCache(), tiny, tile=32)  # another load: nothing carried over in the pipeline's state
    assert a.tobytes() == fresh(img, dict(FAST, seed=11)).tobytes()
    b = up(img, dict(FAST, seed=12))
    assert np.abs(a - b).mean() > 0.01
    # The prompt counts too (with guidance on), and an unknown parameter is an error, not ignored.
    assert np.abs(a - up(img, dict(FAST, seed=11, prompt="the sand"))).mean() > 0.001
    with pytest.raises(InvalidParamsError, match="steps: Extra inputs are not permitted"):
        up(img, {"steps": 3})
    with pytest.raises(InvalidParamsError, match="noise_level: Input should be less than or equal to 350"):
        up(img, dict(FAST, noise_level=351))
    # uint8 in, uint8 out: the float result, quantised.
    u8 = to_uint8(img)
    np.testing.assert_array_equal(up(u8, dict(FAST, seed=11)), to_uint8(up(to_unit_float(u8), dict(FAST, seed=11))))


def _seam_score(out: np.ndarray, in_len: int, axis: int, tile: int, m: int) -> float:
    """The worst normalised gradient energy next to a window boundary, over the median of all positions.

    Normalised gradient energy between neighbouring lines (columns for axis 1) is sum((b - a)^2) / (var-sums of a
    and b): about 2 (1 - correlation), so it compares content continuity independently of local contrast. Boundary
    positions are every line of each planned overlap and each hard cut of a non-overlapping stitch.
    """
    o = np.moveaxis(out, axis, 1)
    c = o - o.mean(axis=1, keepdims=True)
    num = ((o[:, 1:] - o[:, :-1]) ** 2).sum(axis=(0, 2))
    den = (c[:, 1:] ** 2).sum(axis=(0, 2)) + (c[:, :-1] ** 2).sum(axis=(0, 2))
    energy = num / den
    overlap = window_geometry(tile, m).overlap
    spans = plan_axis(in_len, tile, overlap, m)
    zones = [(spans[j + 1][0] * 4 - 1, spans[j][1] * 4) for j in range(len(spans) - 1)]
    zones += [(x * 4 - 1, x * 4) for x in range(tile, in_len, tile)]
    return max(float(energy[a:b].max()) for a, b in zones) / float(np.median(energy))


def test_tiles_are_blended_without_seams(cache, tiny):
    img = scene(64, 96)
    tiled, whole = load(cache, tiny, tile=32), load(cache, tiny, tile=128)
    assert tiled.window_side() == 32 and whole.window_side() == 128
    params = dict(FAST, seed=3)
    a, b = tiled(img, params), whole(img, params)
    m = tiled.size.multiple_of
    # The score of the untiled output at the same places is what "no seam" looks like (about 1.3 here).
    for axis in (0, 1):
        blended, untiled = _seam_score(a, img.shape[axis], axis, 32, m), _seam_score(b, img.shape[axis], axis, 32, m)
        assert blended < 1.6 and blended < 1.2 * untiled, (axis, blended, untiled)
    # Overlapping windows start from the same noise where they overlap: it is keyed on position, not on the window.
    left = diffusion_sd.position_noise(3, 8, 0, 40, 100, 4, torch)
    right = diffusion_sd.position_noise(3, 20, 70, 28, 90, 4, torch)
    assert torch.equal(left[:, :, 12:, 70:], right[:, :, :, :30])
    # The measure does see a seam where there is one: the same windows stitched edge to edge, without overlap.
    job = diffusion_sd._Job(DiffusionParams(**params), diffusion_sd._Steps(99, 3), torch)
    hard = run_tiled(lambda w, o: tiled._run_window(w, o, job), img, 4, Geometry(32, 0, 0, 4))
    assert max(_seam_score(hard, img.shape[axis], axis, 32, m) for axis in (0, 1)) > 1.8


def test_progress_is_reported_per_denoising_step_and_per_tile(cache, tiny):
    up = load(cache, tiny, tile=32)
    img = scene(40, 72)
    overlap = window_geometry(32, up.size.multiple_of).overlap
    windows = len(plan_axis(40, 32, overlap, 4)) * len(plan_axis(72, 32, overlap, 4))
    seen: list[tuple[int, int, str]] = []
    with reporting(lambda done, total, unit: seen.append((done, total, unit))):
        up(img, dict(FAST, num_inference_steps=4))
    steps = [(d, t) for d, t, u in seen if u == "step"]
    tiles = [(d, t) for d, t, u in seen if u == "tile"]
    assert windows > 1
    assert steps == [(i, windows * 4) for i in range(1, windows * 4 + 1)]  # counted over the whole image
    assert tiles == [(i, windows) for i in range(1, windows + 1)]
    assert seen[-1] == (windows, windows, "tile")


# --- precision ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["nan-latents", "black-decode"])
def test_a_bad_window_in_reduced_precision_is_redone_in_fp32(tiny, failure):
    """bf16 on the CPU stands in for a GPU's fp16; the NaN and the black decode are injected into its modules."""
    img = scene(24, 28)
    reference = load(ModelCache(), tiny, precision="fp32")(img, FAST)
    up = load(ModelCache(), tiny, precision="bf16")
    assert up.precision == "bf16" and up.pipe.unet.dtype == torch.bfloat16
    reduced_calls: list[int] = []

    def poison(_module, _args, output):  # what an overflowing fp16 GPU does; the fp32 reload has no hook
        reduced_calls.append(1)
        if failure == "nan-latents":
            return (torch.full_like(output[0], float("nan")),)
        return torch.full_like(output, -1.0)  # decodes to 0 after denormalising: a black window

    module = up.pipe.unet if failure == "nan-latents" else up.pipe.vae.decoder
    module.register_forward_hook(poison)
    seen: list[tuple[int, int, str]] = []
    with reporting(lambda d, t, u: seen.append((d, t, u))):
        out = up(img, FAST)
    assert up.precision == "bf16->fp32" and up.fallbacks == 1
    assert up.pipe.unet.dtype == torch.float32
    # Redone from the fp32 weights on disk: exactly what an fp32 load gives.
    assert np.array_equal(out, reference)
    # NaN latents stop the loop at the first step instead of running the rest for nothing.
    assert len(reduced_calls) == 1
    assert max(d for d, _, u in seen if u == "step") == 3 and all(d <= t for d, t, _ in seen)


def test_issue_17_item_3_a_failed_fp32_reload_keeps_the_working_pipeline(tmp_path, tiny):
    """bf16 on the CPU stands in for a GPU's fp16. The fp32 reload fails for real: its folder is gone."""
    folder = tmp_path / "pipe"
    shutil.copytree(tiny, folder)
    img = scene(24, 28)
    reference = load(ModelCache(), tiny, precision="fp32")(img, FAST)
    up = load(ModelCache(), folder, precision="bf16")
    reduced = up.pipe
    reduced.unet.register_forward_hook(lambda _m, _a, out: (torch.full_like(out[0], float("nan")),))
    folder.rename(tmp_path / "moved")
    with pytest.raises(WeightsCorruptError, match="cannot read"):
        up(img, FAST)
    assert up.pipe is reduced and up.precision == "bf16" and up.fallbacks == 0  # not None, not half switched
    (tmp_path / "moved").rename(folder)
    out = up(img, FAST)  # the next job falls back properly
    assert up.precision == "bf16->fp32" and up.fallbacks == 1 and np.array_equal(out, reference)


def test_our_denoising_loop_is_the_pipelines_own_call(cache, tiny):
    """Given the same initial latents and the same low-resolution noise, one window through this backend gives what
    diffusers' StableDiffusionUpscalePipeline.__call__ gives."""
    up = load(cache, tiny, tile=128)
    img = scene(32, 48)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    latents = torch.randn((1, 4, 32, 48), generator=torch.Generator().manual_seed(1))
    noise = torch.randn((1, 3, 32, 48), generator=torch.Generator().manual_seed(2))  # what the pipeline draws
    for params in (
        DiffusionParams(num_inference_steps=3, prompt="the sand", seed=5),
        DiffusionParams(num_inference_steps=2, noise_level=300, guidance_scale=1.0),
    ):
        job = diffusion_sd._Job(params, diffusion_sd._Steps(1, params.num_inference_steps), torch)
        with torch.inference_mode():
            ours = up._denoise(x, latents, noise, (0, 0), job)
            theirs = up.pipe(
                prompt=params.prompt,
                image=x,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                noise_level=params.noise_level,
                generator=torch.Generator().manual_seed(2),
                latents=latents,
                output_type="pt",
            ).images
        assert ours.shape == theirs.shape == (1, 3, 128, 192)
        assert torch.equal(ours, theirs), float((ours - theirs).abs().max())


def unet_oom_above(up: DiffusionUpscaler, side: int):
    """Stands in for a GPU that runs out of memory on latents larger than ``side`` (no GPU here)."""
    seen: list[int] = []

    def pre(_module, args):
        seen.append(max(args[0].shape[-2:]))
        if seen[-1] > side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (stand-in)")

    return up.pipe.unet.register_forward_pre_hook(pre), seen


def test_issue_17_item_1_a_window_that_runs_out_of_memory_is_split_with_its_own_geometry(tiny):
    up = load(ModelCache(), tiny, tile=32)
    img = scene(32, 32)
    handle, seen = unet_oom_above(up, 16)
    try:
        out = up(img, FAST)
    finally:
        handle.remove()
    assert up.splits == 1 and up.window_side() == 16 and seen[0] == 32 and max(seen[1:]) == 16
    # The halves are planned with a 16 px window's own overlap, exactly as a rule with tile = 16 plans them.
    assert window_geometry(32, 4).smallest > 16 >= window_geometry(16, 4).smallest
    np.testing.assert_array_equal(out, load(ModelCache(), tiny, tile=16)(img, FAST))


def test_issue_17_item_2_tiled_and_untiled_agree_at_the_highest_noise_level(cache, tiny):
    """The noise added to the input (noise_level) is keyed by position like the initial latents, so overlapping
    windows see the same noise; on a smooth image at noise_level 350 tiled stays within 4 levels of untiled."""
    img = scene(64, 96)
    params = dict(num_inference_steps=3, noise_level=350, seed=3)
    tiled, whole = load(cache, tiny, tile=32)(img, params), load(cache, tiny, tile=128)(img, params)
    mean_levels = float(np.abs(tiled - whole).mean() * 255)
    assert mean_levels <= 4.0, mean_levels
    a = diffusion_sd.position_noise(3, 8, 0, 40, 100, 3, torch, diffusion_sd.LOW_RES_STREAM)
    b = diffusion_sd.position_noise(3, 20, 70, 28, 90, 3, torch, diffusion_sd.LOW_RES_STREAM)
    assert torch.equal(a[:, :, 12:, 70:], b[:, :, :, :30])
    latent = diffusion_sd.position_noise(3, 8, 0, 40, 100, 3, torch, diffusion_sd.LATENT_STREAM)
    assert not torch.equal(a, latent)  # two independent fields from one seed


def test_issue_17_item_4_the_vae_decodes_whole_windows_and_tiles_only_large_ones(tiny, monkeypatch):
    up = load(ModelCache(), tiny, tile=64)
    calls: list[tuple[int, ...]] = []
    up.pipe.vae.decoder.register_forward_hook(lambda _m, args, _o: calls.append(tuple(args[0].shape[-2:])))
    up(scene(64, 64), FAST)
    assert calls == [(64, 64)]  # one whole decode (the VAE's own tiles are 32 latent px: it would have made 9)
    calls.clear()
    monkeypatch.setattr(diffusion_sd, "VAE_WHOLE_MAX", 32)  # the threshold lowered, to show the other branch
    up(scene(64, 64), FAST)
    assert len(calls) > 1 and max(max(c) for c in calls) <= 32


def test_issue_17_item_10_the_requested_dtype_is_what_runs(tiny):
    """Whatever from_pretrained did with the dtype keyword, the UNet and text encoder end up in it (and the job row
    says so), and the VAE in fp32."""
    import diffusers

    assert diffusion_sd.dtype_keyword(diffusers) == "dtype"  # the installed diffusers reads it
    assert diffusion_sd.load_dtypes(diffusers, torch.float16, torch) == {
        "dtype": {"default": torch.float16, "vae": torch.float32}
    }
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tiny, local_files_only=True)  # fp32: no keyword
    diffusion_sd.ensure_dtype(pipe, torch.bfloat16, torch)
    assert (pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    up = load(ModelCache(), tiny, precision="bf16")
    assert up.precision == "bf16" and up.pipe.unet.dtype == torch.bfloat16


def test_nan_in_fp32_is_an_error(tiny):
    up = load(ModelCache(), tiny, precision="fp32")
    up.pipe.unet.register_forward_hook(lambda _m, _a, out: (torch.full_like(out[0], float("nan")),))
    with pytest.raises(NonFiniteOutputError, match="in fp32"):
        up(scene(16, 16), FAST)


# --- rules, sidecars and the service ------------------------------------------------------------------------------
def test_generation_options_are_rule_options_in_the_fingerprint(tiny):
    model = f"diffusers:{tiny}"
    base = Rule(model=model, scale=4)
    assert base.params == {
        "prompt": "",
        "negative_prompt": "",
        "num_inference_steps": 25,
        "guidance_scale": 9.0,
        "noise_level": 20,
        "seed": 0,
    }
    assert base.model_params() == DiffusionParams()
    for change in (
        {"seed": 1},
        {"prompt": "a barn"},
        {"negative_prompt": "blur"},
        {"num_inference_steps": 30},
        {"guidance_scale": 7.5},
        {"noise_level": 40},
    ):
        assert Rule(model=model, scale=4, **change).fingerprint() != base.fingerprint(), change
    assert Rule(model=model, scale=4, device="cpu", precision="bf16").fingerprint() == base.fingerprint()
    # The same options written in a [rules.params] table, or at the rule's top level as before: one rule.
    assert Rule(model=model, scale=4, params={"seed": 1}) == Rule(model=model, scale=4, seed=1)
    # Other models take none of them; their fingerprint covers what changes pixels (not compression, since 0.2).
    assert Rule().params == {}
    assert Rule().fingerprint() == "5c38cf0cbfc6a410"
    with pytest.raises(ValueError, match="takes no parameters, got prompt"):
        Rule(model="bicubic", prompt="a barn")
    for bad in ({"noise_level": 351}, {"num_inference_steps": 0}, {"seed": -1}, {"guidance_scale": -1}):
        with pytest.raises(ValueError):
            Rule(model=model, scale=4, **bad)
    with pytest.raises(ValueError, match="not found"):
        Rule(model="diffusers:/nonexistent/pipe", scale=4)


def test_a_sidecar_file_overrides_the_prompt(tmp_path, tiny):
    rule = Rule(model=f"diffusers:{tiny}", scale=4, params={"prompt": "from the rule"})
    image(tmp_path / "a.png")
    folder, img = Root(tmp_path), PurePosixPath("a.png")
    assert with_sidecar_prompt(rule, folder, img, shared_sandbox()) is rule
    side = tmp_path / "a.png.prompt.txt"
    side.write_text("\ufeff  a red barn\n", encoding="utf-8")
    assert with_sidecar_prompt(rule, folder, img, shared_sandbox()).params["prompt"] == "a red barn"
    # no prompt to override
    assert with_sidecar_prompt(Rule(model="bicubic"), folder, img, shared_sandbox()).model == "bicubic"
    side.write_bytes(b"\xff\xfe bad")
    with pytest.raises(BadSidecarError, match="not UTF-8"):
        with_sidecar_prompt(rule, folder, img, shared_sandbox())
    side.write_text("x" * 5000)
    with pytest.raises(BadSidecarError, match="over 4096 bytes"):
        with_sidecar_prompt(rule, folder, img, shared_sandbox())
    side.unlink()
    side.symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(BadSidecarError, match="cannot read"):
        with_sidecar_prompt(rule, folder, img, shared_sandbox())
    folder.close()


def test_the_service_runs_a_diffusion_rule_end_to_end(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rules = [
        {
            "folder": "tiny",
            "model": f"diffusers:{tiny}",
            "scale": 4,
            "tile": 32,
            "num_inference_steps": 3,
            "seed": 7,
            "prompt": "a photo",
            "metrics": [],
        },
        {"folder": "sd", "model": "sd-x4-upscaler", "scale": 4, "metrics": []},  # weights not here
    ]
    cfg = write_config(tmp_path, weights=tmp_path / "weights", rules=rules, settle_seconds=0.1, device="cpu")
    svc = Service(load_settings(cfg))
    with capture_logs() as logs:
        svc.start()
    try:
        warned = {e["folder"] for e in logs if e["event"] == "rule.warning"}
        assert warned == {"tiny", "sd"}
        cost = next(e["note"] for e in logs if e["event"] == "rule.warning" and e["folder"] == "tiny")
        assert "runs 3 denoising steps" in cost and "minutes per tile" in cost
        inbox = svc.settings.inbox
        missing = image(inbox / "sd" / "c.png", (16, 16), seed=2)
        with_sidecar = image(inbox / "tiny" / "a.png", (40, 32), seed=1)
        (inbox / "tiny" / "a.png.prompt.txt").write_text("the sand\n")
        shutil.copyfile(with_sidecar, inbox / "tiny" / "b.png")  # same pixels, the rule's prompt
        deadline = time.monotonic() + 60
        while True:
            c = svc.store.counts()
            if c["done"] + c["failed"] >= 3 and not c["pending"] and not c["running"]:
                break
            assert time.monotonic() < deadline, c
            svc.step(wait=0.05)
        jobs = {Path(r["rel_path"]).name: r for r in rows(svc.settings.sqlite_path(), "SELECT * FROM jobs")}
        # The missing model fails its own job, says how to fix it, and the service goes on.
        assert jobs["c.png"]["state"] == "failed" and jobs["c.png"]["error_kind"] == "weights-missing"
        assert "upscaled weights fetch sd-x4-upscaler" in jobs["c.png"]["error"]
        assert (svc.settings.failed / "sd" / "c.png.error.json").is_file() and not missing.exists()
        a, b = jobs["a.png"], jobs["b.png"]
        assert a["state"] == b["state"] == "done", (a["error"], b["error"])
        assert json.loads(a["gen_params"]) == {
            "prompt": "the sand",
            "negative_prompt": "",
            "seed": 7,
            "num_inference_steps": 3,
            "guidance_scale": 9.0,
            "noise_level": 20,
        }
        assert json.loads(b["gen_params"])["prompt"] == "a photo"
        assert json.loads(a["rule_json"])["params"]["prompt"] == "the sand"
        assert a["rule_fingerprint"] != b["rule_fingerprint"]
        assert re.fullmatch(r"tile (\d+)/\1", a["progress"]), a["progress"]
        assert (a["backend"], a["device"], a["precision"]) == ("diffusion", "cpu", "fp32")
        # The output is what the backend gives for that image and the sidecar's prompt, as an 8-bit PNG.
        out_a = np.asarray(Image.open(a["output_path"]))
        assert out_a.shape == (128, 160, 3)
        src = decode.decode(Path(a["input_moved_to"]), svc.settings.max_pixels).colour()
        up, _ = svc.stages.cache.get(f"diffusers:{tiny}", 4, LoadContext(svc.settings.weights_dir, "cpu", 32))
        gen = Rule.model_validate_json(a["rule_json"]).model_params()
        assert gen.prompt == "the sand"
        assert np.array_equal(out_a, up(src, gen))  # 8-bit in, 8-bit out: the backend's own rounding
        assert not np.array_equal(out_a, np.asarray(Image.open(b["output_path"])))
    finally:
        svc.shutdown()
