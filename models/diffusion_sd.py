"""The Stable Diffusion x4 upscaler through diffusers' ``StableDiffusionUpscalePipeline``.

The pipeline comes from the Hugging Face cache (catalogue id ``sd-x4-upscaler``, hub repository
``stabilityai/stable-diffusion-x4-upscaler``) or from a folder written by ``save_pretrained``
(``model = "diffusers:/path/to/folder"``). It is always loaded offline and from safetensors only: the service never
downloads by itself (``upscaled weights fetch sd-x4-upscaler`` does, on a machine with network), and never unpickles.

A :class:`DiffusionUpscaler` call

1. pads the low-resolution input on the bottom and right to the pipeline's size requirement (the UNet's downsampling
   and the VAE's scale factor; the diffusers image processor would otherwise *resize* it), and crops the result back;
2. runs it in overlapping windows of ``tile`` input pixels (128 by default: the model was trained on 128 px crops),
   cross-faded with :func:`models.tiling.run_blended`, one window on the device at a time, so memory is bounded
   whatever the image size; the VAE decodes in tiles (``vae.enable_tiling()``), and attention runs through torch's
   memory-efficient scaled_dot_product_attention (sliced attention where a torch lacks it);
3. draws its noise from ``seed`` *by position*: the initial latents come from a fixed grid of noise blocks, each
   seeded from (seed, block row, block column), so overlapping windows start from the same noise where they overlap
   (which keeps the cross-fade invisible), and the same input and rule give the same bytes;
4. runs in fp16 on CUDA (``auto``), fp32 or bf16 on the CPU; NaN/Inf latents or a NaN or black decoded window in
   reduced precision (a known failure of this model in fp16) reload the pipeline in fp32 for good and redo the window;
5. reports progress through :func:`models.progress.report`: ``step`` after each denoising step (counted over the
   whole image) and ``tile`` after each window.

Cost, measured with the real model on this project's 2-core CPU: about 15 s per denoising step of a 128 px window,
so 75 steps (the pipeline's default) take about 20 minutes. Diffusion is a GPU rule; the service warns at start-up
when a rule would run it on the CPU (:func:`runs_on_cpu`, :data:`CPU_SECONDS_PER_STEP_128PX`).

torch and diffusers are imported inside :func:`load`; without them the load raises
:class:`~models.errors.BackendUnavailableError` naming ``upscaled[diffusion]``.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from models.base import SizeRequirements, Tiling, Upscaler, pad_to_multiple
from models.catalog import DIFFUSERS_INDEX, ModelEntry, is_diffusers_model, resolve_diffusers_folder
from models.errors import (
    BackendUnavailableError,
    InvalidParamsError,
    NonFiniteOutputError,
    UnsupportedModelError,
    UnsupportedPrecisionError,
    UnsupportedScaleError,
    WeightsCorruptError,
    WeightsMissingError,
)
from models.progress import report
from models.registry import LoadContext
from models.spandrel_sr import _configure_threads as configure_threads
from models.spandrel_sr import resolve_device
from models.tiling import OomSplitting, plan_axis, run_blended, smallest_tile, split_on_oom

INSTALL_HINT = "pip install 'upscaled[diffusion]'"
PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# Generation defaults. 25 steps, not the pipeline's 75: with the DDIM scheduler the model ships with, the image is
# essentially settled after 20-30 steps, and a daemon pays for every step of every tile (three times the time for
# little visible gain). guidance 9.0 and noise level 20 are the pipeline's own defaults.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 9.0
DEFAULT_NOISE_LEVEL = 20
MAX_NOISE_LEVEL = 350  # the real model's max_noise_level; a saved pipeline may declare another, checked per call
MAX_STEPS = 1000  # the schedulers' training timesteps

DEFAULT_TILE = 128  # input pixels: the model was trained on 128 px crops, and a 128 px window fits any GPU
NOISE_BLOCK = 64  # side of the position-keyed noise blocks, in input (= latent) pixels
# A decoded window is "black" when nothing in it reaches half an 8-bit level although its input does reach a few.
BLACK_OUT, BLACK_IN = 0.5 / 255, 8 / 255

# Measured with the real model on this project's 2-core CPU (one denoising step of a 128 px window); used for the
# start-up warning only.
CPU_SECONDS_PER_STEP_128PX = 15.0

_load_lock = threading.Lock()


@dataclass(frozen=True)
class GenerationParams:
    """What a diffusion call generates with: every field changes the output.

    ``guidance_scale`` above 1 turns on classifier-free guidance (two UNet passes per step).
    """

    prompt: str = ""
    negative_prompt: str = ""
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    noise_level: int = DEFAULT_NOISE_LEVEL
    seed: int = 0

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None) -> GenerationParams:
        """Build from a rule's options; missing keys take the defaults.

        Raises:
            InvalidParamsError: an unknown key, or a value out of range.
        """
        params = dict(params or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise InvalidParamsError(f"unknown generation parameter(s) {unknown}; expected some of {sorted(names)}")
        gp = cls(**params)
        if not 1 <= gp.num_inference_steps <= MAX_STEPS:
            raise InvalidParamsError(f"num_inference_steps must be 1 to {MAX_STEPS}, got {gp.num_inference_steps}")
        if gp.noise_level < 0 or gp.seed < 0 or gp.guidance_scale < 0:
            raise InvalidParamsError(f"noise_level, seed and guidance_scale must not be negative, got {gp}")
        return gp


@dataclass(eq=False)
class DiffusionUpscaler(OomSplitting, Upscaler):
    """An :class:`Upscaler` over a ``StableDiffusionUpscalePipeline``. Call it with an image and, optionally, the
    generation parameters (see :meth:`__call__`).

    ``tile`` is the rule's window side in input pixels, or None for :data:`DEFAULT_TILE`. ``precision`` reads
    ``"fp16->fp32"`` (or ``"bf16->fp32"``) once a non-finite or black window forced the fallback; ``fallbacks`` and
    ``splits`` count those and out-of-memory splits over the upscaler's life.
    """

    run: Callable[[np.ndarray], np.ndarray] | None = None  # one window with the default parameters, no tiling
    source: str = ""  # the folder or hub repository the pipeline was loaded from
    revision: str | None = None  # the hub revision (None for a folder)
    max_noise_level: int = MAX_NOISE_LEVEL
    threads: int = 0
    fallbacks: int = 0
    splits: int = 0
    pipe: Any = field(default=None, repr=False)
    _torch: Any = field(default=None, repr=False)
    _dtype: Any = field(default=None, repr=False)
    _tile_cap: int | None = field(default=None, repr=False)  # lowered by out-of-memory splits
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.run = lambda rgb: self._run_window(_with_coords(rgb), GenerationParams(), _Steps(1, DEFAULT_STEPS))

    # --- the call contract ---------------------------------------------------------------------------------------
    def __call__(self, rgb: np.ndarray, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Upscale ``rgb`` (float32, (H, W, 3), [0, 1]) to (H * scale, W * scale, 3), generated with ``params``.

        ``params`` holds :class:`GenerationParams` fields (prompt, negative_prompt, num_inference_steps,
        guidance_scale, noise_level, seed); missing ones take the defaults. The same image, parameters and tile
        side give the same bytes on the same device and precision.

        Raises:
            UnsupportedImageError: the array is not float32 RGB.
            ImageTooSmallError: a side is 0.
            InvalidParamsError: an unknown or out-of-range parameter (``noise_level`` above the pipeline's maximum).
            OutOfMemoryError: even the smallest window ran out of memory (retryable).
            NonFiniteOutputError: the pipeline gave NaN or Inf in fp32.
        """
        h, w = self.check_input(rgb)
        gp = GenerationParams.from_mapping(params)
        if gp.noise_level > self.max_noise_level:
            raise InvalidParamsError(f"noise_level {gp.noise_level} is above {self.model_id}'s max_noise_level "
                              f"{self.max_noise_level}")
        m = self.size.multiple_of
        # 1. Pad once for the whole image (never resize), and carry each pixel's coordinates in two extra channels:
        #    the windows run_blended cuts (and the halves an out-of-memory split cuts from them) then know where they
        #    are, which the position-keyed noise needs.
        padded = _with_coords(pad_to_multiple(rgb, m))
        side = self.window_side()
        overlap, margin = window_geometry(side, m)
        windows = _count_windows(padded.shape[0], side, overlap, m) * _count_windows(padded.shape[1], side, overlap, m)
        steps = _Steps(windows, gp.num_inference_steps)

        def one(window: np.ndarray) -> np.ndarray:
            return self._run_window(window, gp, steps)

        # 2. Windows one at a time, cross-faded; a window that runs out of memory is redone as smaller ones.
        runner = split_on_oom(one, self.scale, overlap, margin, smallest_tile(overlap, m), self._is_oom, m,
                              self._on_split)
        out = run_blended(runner, padded, self.scale, side, overlap, margin, m)
        out = out[: round(h * self.scale), : round(w * self.scale)]
        # Every window is clamped to [0, 1] by the pipeline and the cross-fade is a convex blend: no clip needed.
        return out if out.flags.c_contiguous else np.ascontiguousarray(out)

    def window_side(self) -> int:
        """The window side in input pixels: the rule's tile (else :data:`DEFAULT_TILE`), lowered by out-of-memory
        splits, on the size grid."""
        m = self.size.multiple_of
        side = self.tile or DEFAULT_TILE
        if self._tile_cap is not None:
            side = min(side, self._tile_cap)
        return max(m, side // m * m)

    # --- one window ----------------------------------------------------------------------------------------------
    def _run_window(self, window: np.ndarray, gp: GenerationParams, steps: _Steps) -> np.ndarray:
        """The pipeline on one window: (h, w, 5) float32 (RGB and the y, x coordinates of each pixel) in, float32
        RGB (h * scale, w * scale, 3) out."""
        torch = self._torch
        y0, x0 = int(window[0, 0, 3]), int(window[0, 0, 4])
        rgb = np.ascontiguousarray(window[:, :, :3])
        h, w = rgb.shape[:2]
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
            channels = self.pipe.vae.config.latent_channels
            latents = position_noise(gp.seed, y0, x0, h, w, channels, torch)
            y = self._generate(x, latents, gp, y0, x0, steps)
            if y is None:
                y = self._fall_back(x, latents, gp, y0, x0, steps)
            out = y[0].permute(1, 2, 0).to("cpu", torch.float32).numpy()
        # The tiler scales the window in place: it needs a writeable array of its own.
        return out if out.flags.writeable else out.copy()

    def _generate(self, x: Any, latents: Any, gp: GenerationParams, y0: int, x0: int, steps: _Steps) -> Any | None:
        """One pipeline call; None if the latents or the decoded window came out NaN, Inf or black."""
        torch = self._torch
        device = torch.device(self.device)
        # The low-resolution image's own noise comes from the pipeline's generator: seed it from the window's place,
        # so a window always gets the same noise, whatever else the image holds. A CPU generator draws the same
        # numbers on every device.
        generator = torch.Generator("cpu").manual_seed(derived_seed(gp.seed, y0, x0, 1))
        # Equal prompts make the guided and unguided predictions identical, so classifier-free guidance would
        # only double the work: guidance 1 gives the same image with one UNet pass per step.
        guidance = gp.guidance_scale if gp.prompt != gp.negative_prompt else 1.0
        steps.start_window()

        def on_step(i: int, _t: Any, lat: Any) -> None:
            steps.step(i)
            if not bool(torch.isfinite(lat).all()):
                raise _NonFinite  # stop now: the remaining steps cannot recover

        try:
            result = self.pipe(
                prompt=gp.prompt,
                negative_prompt=gp.negative_prompt or None,
                image=x.to(device, self._dtype),
                num_inference_steps=gp.num_inference_steps,
                guidance_scale=guidance,
                noise_level=gp.noise_level,
                generator=generator,
                latents=latents.to(device, self._dtype),
                output_type="pt",
                callback=on_step,
                callback_steps=1,
            )
        except _NonFinite:
            return None
        y = result.images
        if not bool(torch.isfinite(y).all()):
            return None
        if float(y.amax()) < BLACK_OUT and float(x.amax()) > BLACK_IN:
            return None
        steps.end_window()
        return y

    def _fall_back(self, x: Any, latents: Any, gp: GenerationParams, y0: int, x0: int, steps: _Steps) -> Any:
        """Reduced precision failed on this window: reload the pipeline in fp32 for good and redo it.

        The fp32 weights come from the source again: casting the fp16 ones up would keep their rounding.

        Raises:
            NonFiniteOutputError: already fp32, or fp32 fails too.
        """
        torch = self._torch
        if self._dtype == torch.float32:
            raise NonFiniteOutputError(f"{self.model_id} gave NaN, Inf or a black image in fp32 on {self.device}; its "
                                  f"weights are broken")
        self.pipe = None  # drop the reduced-precision copy before the fp32 one is read
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.pipe = _load_pipeline(self.model_id, self.source, self.revision, torch.float32, self.device, torch)
        self._dtype = torch.float32
        self.precision = f"{self.precision}->fp32"
        self.fallbacks += 1
        y = self._generate(x, latents, gp, y0, x0, steps)
        if y is None:
            raise NonFiniteOutputError(f"{self.model_id} gave NaN, Inf or a black image even in fp32 on {self.device}")
        return y


class _NonFinite(Exception):
    """Raised from the step callback to stop a denoising loop whose latents went NaN or Inf."""


class _Steps:
    """Denoising-step progress over the whole image: ``step k/N`` with N = windows x steps per window.

    A window redone after the fp32 fallback counts its steps again from where it started; an out-of-memory split
    makes more windows than planned, and the total grows to match.
    """

    def __init__(self, windows: int, per_window: int) -> None:
        self.per_window = per_window
        self.total = windows * per_window
        self.done = 0
        self._base = 0

    def start_window(self) -> None:
        self.done = self._base

    def step(self, i: int) -> None:
        self.done = self._base + i + 1
        self.total = max(self.total, self.done)
        report(self.done, self.total, "step")

    def end_window(self) -> None:
        self._base += self.per_window
        self.done = self._base


def window_geometry(side: int, multiple_of: int) -> tuple[int, int]:
    """(overlap, margin) in input pixels for windows of ``side``: a quarter of the window overlaps its neighbour
    (the UNet attends across its whole window, so the context it needs grows with it), on the size grid, and the
    quarter of the overlap next to each window's edge gets no weight in the cross-fade."""
    m = max(1, multiple_of)
    overlap = max(m, -(-(side // 4) // m) * m)
    return overlap, overlap // 4


def derived_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for ``keys`` under ``seed``: independent streams that do not depend on the call order."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0])


def position_noise(seed: int, y0: int, x0: int, h: int, w: int, channels: int, torch: Any) -> Any:
    """Standard normal noise (1, channels, h, w) for the window at (y0, x0), cut from an endless grid of
    :data:`NOISE_BLOCK`-sized blocks, each drawn from its own seed. A pixel's noise depends only on ``seed`` and
    its position, so overlapping windows agree where they overlap, and memory stays one window's worth."""
    out = torch.empty((1, channels, h, w), dtype=torch.float32)
    b = NOISE_BLOCK
    for by in range(y0 // b, (y0 + h - 1) // b + 1):
        for bx in range(x0 // b, (x0 + w - 1) // b + 1):
            gen = torch.Generator("cpu").manual_seed(derived_seed(seed, by, bx, 0))
            block = torch.randn((channels, b, b), generator=gen, dtype=torch.float32)
            ys, ye = max(y0, by * b), min(y0 + h, (by + 1) * b)
            xs, xe = max(x0, bx * b), min(x0 + w, (bx + 1) * b)
            out[0, :, ys - y0 : ye - y0, xs - x0 : xe - x0] = block[:, ys - by * b : ye - by * b,
                                                                    xs - bx * b : xe - bx * b]
    return out


def _with_coords(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W, 5): RGB, then each pixel's row and column (exact in float32 up to 16 million)."""
    h, w = rgb.shape[:2]
    out = np.empty((h, w, 5), np.float32)
    out[:, :, :3] = rgb
    out[:, :, 3] = np.arange(h, dtype=np.float32)[:, None]
    out[:, :, 4] = np.arange(w, dtype=np.float32)[None, :]
    return out


def _count_windows(length: int, side: int, overlap: int, m: int) -> int:
    return len(plan_axis(length, side, overlap, m))


# --- start-up checks -------------------------------------------------------------------------------------------
def runs_on_cpu(device: str) -> bool:
    """Whether a diffusion rule on ``device`` would run on the CPU. Imports torch only to resolve ``auto``; without
    torch nothing runs on a GPU, so the answer is yes."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def cpu_cost_note(steps: int) -> str:
    """What one 128 px window costs on a CPU at ``steps`` denoising steps, for the start-up warning."""
    minutes = steps * CPU_SECONDS_PER_STEP_128PX / 60
    return (f"about {CPU_SECONDS_PER_STEP_128PX:g} s per denoising step of a 128 px tile on a 2-core CPU, so "
            f"{steps} steps take about {minutes:.0f} min per tile (a 512x512 input is 25 tiles); diffusion is a GPU "
            f"rule: set device = \"cuda\" on a machine with a GPU, or use a GAN model on the CPU")


# --- loading ---------------------------------------------------------------------------------------------------
def load(entry: ModelEntry, scale: float, ctx: LoadContext) -> DiffusionUpscaler:
    """Load ``entry`` (``sd-x4-upscaler`` or a ``diffusers:`` folder) at ``scale`` on ``ctx.device``.

    Raises:
        BackendUnavailableError: torch, diffusers or transformers is not installed.
        WeightsMissingError: the hub snapshot is not in the Hugging Face cache (the message says how to fetch it or
            where to point a folder), or a ``diffusers:`` folder does not exist.
        WeightsCorruptError: the folder or snapshot is incomplete or unreadable (a component or its safetensors
            missing).
        UnsupportedModelError: the folder holds another pipeline than ``StableDiffusionUpscalePipeline``.
        UnsupportedScaleError: the pipeline's VAE does not upscale by ``scale``.
        DeviceUnavailableError: ``ctx.device`` names a GPU that is not there.
        UnsupportedPrecisionError: ``ctx.precision`` is unknown, or the device cannot run it.
    """
    torch = _import_torch()
    threads = configure_threads(torch)
    # 1. Where the pipeline is: a save_pretrained folder, or the hub repository's snapshot in the HF cache.
    if is_diffusers_model(entry.id):
        source, revision = str(resolve_diffusers_folder(entry.id, ctx.weights_dir)), None
    else:
        source, revision = entry.hub_repo, entry.hub_revision
    # 2. Device and precision, then the pipeline itself.
    device = resolve_device(ctx.device, torch)
    precision = choose_precision(ctx.precision, device, torch)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    pipe = _load_pipeline(entry.id, source, revision, dtype, device, torch)
    # 3. What it can do: the VAE gives the scale; the UNet's downsampling and the image processor's VAE grid give
    #    the size requirement.
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if vae_factor != scale:
        raise UnsupportedScaleError(f"{entry.id} is a x{vae_factor} pipeline and cannot upscale x{scale:g} natively; "
                                    "set "
                               f"scale = {vae_factor} (and outscale for another final size)")
    multiple = math.lcm(vae_factor, 2 ** int(pipe.unet.num_upsamplers))
    return DiffusionUpscaler(
        model_id=entry.id,
        backend="diffusion",
        scale=float(vae_factor),
        device=device,
        precision=precision,
        tiling=Tiling.INTERNAL,  # it tiles and cross-fades by itself; never tile from outside
        size=SizeRequirements(minimum=1, multiple_of=multiple),
        tile=ctx.tile,
        tile_pad=window_geometry(ctx.tile or DEFAULT_TILE, multiple)[0],
        source=source,
        revision=revision,
        max_noise_level=int(pipe.config.get("max_noise_level", MAX_NOISE_LEVEL)),
        threads=threads,
        pipe=pipe,
        _torch=torch,
        _dtype=dtype,
    )


def choose_precision(requested: str, device: str, torch: Any) -> str:
    """``auto`` -> fp16 on CUDA, fp32 on the CPU; explicit choices are checked.

    Raises:
        UnsupportedPrecisionError: an unknown name, fp16 on the CPU, or bf16 on a GPU without it.
    """
    if requested not in PRECISIONS:
        raise UnsupportedPrecisionError(f"unknown precision {requested!r}; expected one of {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if requested == "auto":
        return "fp16" if cuda else "fp32"
    if requested == "fp16" and not cuda:
        raise UnsupportedPrecisionError("fp16 diffusion on the CPU is not supported (many CPU kernels lack half "
                                   "precision); use fp32 or bf16")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UnsupportedPrecisionError(f"{device} ({torch.cuda.get_device_name(device)}) has no bf16; use fp16")
    return requested


def missing_weights_message(model_id: str, repo: str, revision: str | None) -> str:
    """How to get a hub pipeline into the cache, or what to use instead."""
    try:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except ImportError:
        cache = "~/.cache/huggingface/hub"
    rev = f" --revision {revision}" if revision and revision != "main" else ""
    return (f"weights for {model_id} ({repo}) are not in the Hugging Face cache at {cache}, and the service never "
            f"downloads by itself. On a machine with network run `upscaled weights fetch {model_id}` (or "
            f"`huggingface-cli download {repo}{rev}`, `hf download` in newer huggingface_hub) with the same "
            f"HF_HOME, and copy the cache here if needed; or save the pipeline with save_pretrained() and set "
            f"model = \"diffusers:/path/to/folder\" in the rule")


def _load_pipeline(model_id: str, source: str, revision: str | None, dtype: Any, device: str, torch: Any) -> Any:
    """Read the pipeline offline from safetensors, move it to ``device`` and set it up for bounded memory.

    Raises:
        WeightsMissingError, WeightsCorruptError, UnsupportedModelError: as for :func:`load`.
    """
    diffusers = _import_diffusers()
    folder = revision is None
    if folder:
        index = Path(source) / DIFFUSERS_INDEX
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError) as exc:
            raise WeightsCorruptError(f"cannot read {index}: {exc}") from None
        if cls != PIPELINE_CLASS:
            raise UnsupportedModelError(f"{source} holds a {cls} pipeline; this backend runs {PIPELINE_CLASS} only")
    with _load_lock:  # diffusers' logging switches are process-wide
        diffusers.utils.logging.disable_progress_bar()
        try:
            pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(
                source, revision=revision, dtype=dtype, local_files_only=True, use_safetensors=True)
        except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError is an OSError too
            if not folder:
                raise WeightsMissingError(missing_weights_message(model_id, source, revision)) from None
            raise WeightsCorruptError(f"{source} is not a complete save_pretrained folder of a {PIPELINE_CLASS} in "
                                 f"safetensors: {_first_line(exc)}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            where = source if folder else f"the cached snapshot of {source}"
            raise WeightsCorruptError(f"cannot build a {PIPELINE_CLASS} from {where}: {type(exc).__name__}: "
                                 f"{_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    # The VAE overflows in fp16 on this model. Where its config asks for an fp32 decode (force_upcast), keep it in
    # fp32 from the start instead of letting the pipeline cast it up and down again for every window.
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)
    pipe.to(torch.device(device))
    pipe.vae.enable_tiling()  # a large window decodes in VAE tiles: bounded memory for any rule tile
    # Attention slicing bounds attention memory where the score matrices are built whole. torch's
    # scaled_dot_product_attention (diffusers' default processor whenever torch has it) never builds them, and
    # slicing would replace it with the explicit path: measured on the tiny test pipeline at 128 px on the CPU,
    # 4.5 s and +570 MB peak sliced against 1.2 s and +70 MB with SDPA. So slice only where SDPA is missing.
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        pipe.enable_attention_slicing()
    return pipe


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unavailable(exc: ImportError, default: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"the diffusion backend needs PyTorch, diffusers and transformers, and "
                              f"{exc.name or default} is not installed: {INSTALL_HINT}")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise _unavailable(exc, "torch") from exc
    return torch


def _import_diffusers() -> Any:
    try:
        import diffusers
        import diffusers.utils.logging
        import transformers  # noqa: F401 - the pipeline's text encoder and tokenizer
    except ImportError as exc:
        raise _unavailable(exc, "one") from exc
    return diffusers
