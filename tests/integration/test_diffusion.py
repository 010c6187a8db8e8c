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
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image, rows, write_config

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from structlog.testing import capture_logs  # noqa: E402

from daemon import imageio  # noqa: E402
from daemon.config import Rule, load_settings  # noqa: E402
from daemon.errors import BadSidecarError, ConfigError  # noqa: E402
from daemon.pipeline import with_sidecar_prompt  # noqa: E402
from daemon.service import Service  # noqa: E402
from models import diffusion_sd  # noqa: E402
from models.base import Tiling, pad_to_multiple, run_tiled  # noqa: E402
from models.catalog import CATALOG, model_label  # noqa: E402
from models.diffusion_sd import DiffusionUpscaler, GenerationParams, window_geometry  # noqa: E402
from models.errors import (  # noqa: E402
    NonFiniteOutputError,
    UnsupportedModelError,
    UnsupportedScaleError,
    WeightsMissingError,
)
from models.progress import reporting  # noqa: E402
from models.registry import LoadContext, ModelCache  # noqa: E402
from models.tiling import plan_axis  # noqa: E402
from models.weights import fetch, fetch_hub, present  # noqa: E402

FAST = {"num_inference_steps": 3}
HUB_REPO = "upscaled-tests/tiny-sd-x4"


# --- the tiny pipeline --------------------------------------------------------------------------------------------
def build_tiny_pipeline(folder: Path) -> Path:
    """Write a tiny random StableDiffusionUpscalePipeline (about 1.5 MB) to ``folder/pipe`` with save_pretrained."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    # transformers 5 ignores CLIPTokenizer(vocab_file=..., merges_file=...): load it from a folder instead.
    tok_dir = folder / "tokenizer-src"
    tok_dir.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for merged in ("th", "the</w>", "an", "and</w>"):
        vocab[merged] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\na n\nan d</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    assert len(tokenizer) == len(vocab)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        num_class_embeds=400)  # noise_level indexes the class embeddings: more than max_noise_level (350)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
        sample_size=128, scaling_factor=0.08333)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1, prediction_type="v_prediction"),
        max_noise_level=350)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


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
    rgb = np.stack([0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0), 0.3 + 0.4 * x / w,
                    0.5 + 0.25 * np.sin((x + 2 * y) / 17.0)], axis=2)
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
    assert up.pipe.vae.use_tiling  # bounded decode memory for large windows
    with pytest.raises(UnsupportedScaleError, match="x4 pipeline"):
        load(ModelCache(), tiny, scale=2)
    assert model_label(f"diffusers:{tiny}/") == "pipe"


def test_the_hub_id_loads_from_the_hugging_face_cache_and_fetch_verifies_it(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, whatever happens
    snapshot = hf_cache(tmp_path / "hub", HUB_REPO, tiny)
    entry = dataclasses.replace(CATALOG["sd-x4-upscaler"], hub_repo=HUB_REPO)
    up = diffusion_sd.load(entry, 4, LoadContext(tmp_path, "cpu", tile=32))
    assert (up.model_id, up.source, up.revision) == ("sd-x4-upscaler", HUB_REPO, "main")
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
    for part in ("not in the Hugging Face cache", str(tmp_path / "empty-hub"), "upscaled weights fetch sd-x4-upscaler",
                 "huggingface-cli download stabilityai/stable-diffusion-x4-upscaler", 'model = "diffusers:'):
        assert part in text, text
    # The fetch command reports the failure instead of raising (no network here: offline mode).
    (report,) = fetch(tmp_path / "weights", ["sd-x4-upscaler"])
    assert report.status == "failed" and report.path == "hf:stabilityai/stable-diffusion-x4-upscaler@main", report
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
    with pytest.raises(ConfigError, match="unknown generation parameter"):
        up(img, {"steps": 3})
    with pytest.raises(ConfigError, match="max_noise_level"):
        up(img, dict(FAST, noise_level=351))


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
    overlap, _ = window_geometry(tile, m)
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
    gp = GenerationParams(**params)
    hard = run_tiled(lambda w: tiled._run_window(w, gp, diffusion_sd._Steps(99, 3)),
                     diffusion_sd._with_coords(img), 4, 32, 0)
    assert max(_seam_score(hard, img.shape[axis], axis, 32, m) for axis in (0, 1)) > 1.8


def test_progress_is_reported_per_denoising_step_and_per_tile(cache, tiny):
    up = load(cache, tiny, tile=32)
    img = scene(40, 72)
    overlap, _ = window_geometry(32, up.size.multiple_of)
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
    img = scene(24, 28)
    reference = load(ModelCache(), tiny, precision="fp32")(img, FAST)
    up = load(ModelCache(), tiny, precision="bf16")
    assert up.precision == "bf16" and up.pipe.unet.dtype == torch.bfloat16
    reduced_calls: list[int] = []

    def poison(_module, _args, output):  # what an overflowing fp16 GPU does, on the reduced-precision modules only
        if failure == "nan-latents":
            if output[0].dtype == torch.float32:
                return None
            reduced_calls.append(1)
            return (torch.full_like(output[0], float("nan")),)
        if output.dtype == torch.float32:
            return None
        reduced_calls.append(1)
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


def test_nan_in_fp32_is_an_error(tiny):
    up = load(ModelCache(), tiny, precision="fp32")
    up.pipe.unet.register_forward_hook(lambda _m, _a, out: (torch.full_like(out[0], float("nan")),))
    with pytest.raises(NonFiniteOutputError, match="in fp32"):
        up(scene(16, 16), FAST)


# --- rules, sidecars and the service ------------------------------------------------------------------------------
def test_generation_options_are_rule_options_in_the_fingerprint(tiny):
    model = f"diffusers:{tiny}"
    base = Rule(model=model, scale=4)
    assert base.generation() == {"prompt": "", "negative_prompt": "", "num_inference_steps": 25,
                                 "guidance_scale": 9.0, "noise_level": 20, "seed": 0}
    for change in ({"seed": 1}, {"prompt": "a barn"}, {"negative_prompt": "blur"}, {"num_inference_steps": 30},
                   {"guidance_scale": 7.5}, {"noise_level": 40}):
        assert Rule(model=model, scale=4, **change).fingerprint() != base.fingerprint(), change
    assert Rule(model=model, scale=4, device="cpu", precision="bf16").fingerprint() == base.fingerprint()
    # Other models take none of them, and their fingerprints are the ones from before the options existed.
    assert Rule().generation() is None
    assert Rule().fingerprint() == "edbd0ab18e22e1cb"
    with pytest.raises(ValueError, match="only diffusion models"):
        Rule(model="bicubic", prompt="a barn")
    for bad in ({"noise_level": 351}, {"num_inference_steps": 0}, {"seed": -1}, {"guidance_scale": -1}):
        with pytest.raises(ValueError):
            Rule(model=model, scale=4, **bad)
    with pytest.raises(ValueError, match="not found"):
        Rule(model="diffusers:/nonexistent/pipe", scale=4)


def test_a_sidecar_file_overrides_the_prompt(tmp_path, tiny):
    rule = Rule(model=f"diffusers:{tiny}", scale=4, prompt="from the rule")
    img = image(tmp_path / "a.png")
    assert with_sidecar_prompt(rule, img) is rule
    side = tmp_path / "a.png.prompt.txt"
    side.write_text("\ufeff  a red barn\n", encoding="utf-8")
    assert with_sidecar_prompt(rule, img).prompt == "a red barn"
    assert with_sidecar_prompt(Rule(model="bicubic"), img).model == "bicubic"  # no prompt to override
    side.write_bytes(b"\xff\xfe bad")
    with pytest.raises(BadSidecarError, match="not UTF-8"):
        with_sidecar_prompt(rule, img)
    side.write_text("x" * 5000)
    with pytest.raises(BadSidecarError, match="over 4096 bytes"):
        with_sidecar_prompt(rule, img)
    side.unlink()
    side.symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(BadSidecarError, match="cannot read"):
        with_sidecar_prompt(rule, img)


def test_the_service_runs_a_diffusion_rule_end_to_end(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rules = [
        {"folder": "tiny", "model": f"diffusers:{tiny}", "scale": 4, "tile": 32, "num_inference_steps": 3,
         "seed": 7, "prompt": "a photo", "metrics": []},
        {"folder": "sd", "model": "sd-x4-upscaler", "scale": 4, "metrics": []},  # weights not here
    ]
    cfg = write_config(tmp_path, weights=tmp_path / "weights", rules=rules, settle_seconds=0.1, device="cpu")
    svc = Service(load_settings(cfg))
    with capture_logs() as logs:
        svc.start()
    try:
        warned = {e["folder"] for e in logs if e["event"] == "diffusion.on_cpu"}
        assert warned == {"tiny", "sd"}
        assert "15 s per denoising step" in next(e["cost"] for e in logs if e["event"] == "diffusion.on_cpu")
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
        assert json.loads(a["gen_params"]) == {"prompt": "the sand", "negative_prompt": "", "seed": 7,
                                               "num_inference_steps": 3, "guidance_scale": 9.0, "noise_level": 20}
        assert json.loads(b["gen_params"])["prompt"] == "a photo"
        assert json.loads(a["rule_json"])["prompt"] == "the sand" and a["rule_fingerprint"] != b["rule_fingerprint"]
        assert re.fullmatch(r"tile (\d+)/\1", a["progress"]), a["progress"]
        assert (a["backend"], a["device"], a["precision"]) == ("diffusion", "cpu", "fp32")
        # The output is what the backend gives for that image and the sidecar's prompt, as an 8-bit PNG.
        out_a = np.asarray(Image.open(a["output_path"]))
        assert out_a.shape == (128, 160, 3)
        src = imageio.decode(Path(a["input_moved_to"]), svc.settings.max_pixels).rgb
        up, _ = svc.pipeline.cache.get(f"diffusers:{tiny}", 4, LoadContext(svc.settings.weights_dir, "cpu", 32))
        gen = dict(Rule.model_validate_json(a["rule_json"]).generation())
        assert gen["prompt"] == "the sand"
        assert np.array_equal(out_a, np.rint(up(src, gen) * 255).astype(np.uint8))
        assert not np.array_equal(out_a, np.asarray(Image.open(b["output_path"])))
    finally:
        svc.shutdown()
