"""The Stable Diffusion x4 upscaler (diffusers' ``StableDiffusionUpscalePipeline``), run window by window.

The pipeline comes from the Hugging Face cache (catalogue id ``sd-x4-upscaler``, hub repository
``stabilityai/stable-diffusion-x4-upscaler``) or from a folder written by ``save_pretrained``
(``model = "diffusers:/path/to/folder"``). It is always loaded offline and from safetensors only: the service never
downloads by itself (``upscaled weights fetch sd-x4-upscaler`` does, on a machine with network), and never unpickles.

A :class:`DiffusionUpscaler` call

1. pads the low-resolution input on the bottom and right to the pipeline's size requirement (the UNet's downsampling
   and the VAE's scale factor; the diffusers image processor would otherwise *resize* it), and crops the result back;
2. encodes the prompt once for the whole image, then runs overlapping windows of ``tile`` input pixels (128 by
   default: the model was trained on 128 px crops) through the pipeline's own components, cross-faded by
   :mod:`models.tiling`, one window on the device at a time, so memory is bounded whatever the image size. A window
   that runs out of memory is redone as windows half its size, each with the overlap its own size needs;
3. draws *all* its noise by position: the initial latents and the noise added to the low-resolution input
   (``noise_level``) come from a fixed grid of noise blocks, each seeded from (seed, block row, block column), so
   overlapping windows see the same noise where they overlap (which keeps the cross-fade invisible, at any
   noise level), and the same input and rule give the same bytes;
4. denoises with the pipeline's scheduler and UNet (this module's loop is the pipeline's ``__call__`` without its
   image resizing, with the noise above, and without a host/GPU sync per step: NaN watching is asynchronous,
   :class:`~models.runtime.FiniteWatch`), then decodes with the VAE in fp32, whole unless the window is larger than
   :data:`VAE_WHOLE_MAX`, and clamps in fp32;
5. runs the UNet and text encoder in fp16 on CUDA (``auto``) or fp32 (bf16 on request); NaN or Inf latents, or a
   black window, in reduced precision reload the pipeline in fp32 for good (the reduced one stays in use if that
   reload fails) and redo the window;
6. reports progress through :func:`models.progress.report`: ``step`` after each denoising step (counted over the
   whole image) and ``tile`` after each window.

torch and diffusers are imported inside :func:`load`; without them the load raises
:class:`~models.errors.BackendUnavailableError` naming ``upscaled[diffusion]``.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from models.backends import (  # noqa: F401 - the generation defaults, re-exported for existing importers
    DEFAULT_GUIDANCE,
    DEFAULT_NOISE_LEVEL,
    DEFAULT_STEPS,
    MAX_NOISE_LEVEL,
    MAX_STEPS,
    DiffusionParams,
)
from models.base import SizeRequirements, Tiling, Upscaler, pad_to_multiple
from models.catalog import DIFFUSERS_INDEX, ModelEntry, is_diffusers_model, resolve_diffusers_folder
from models.errors import (
    InvalidParamsError,
    NonFiniteOutputError,
    UnsupportedModelError,
    UnsupportedScaleError,
    WeightsCorruptError,
    WeightsMissingError,
)
from models.pixels import to_uint8, to_unit_float
from models.progress import report
from models.registry import LoadContext
from models.runtime import (
    FiniteWatch,
    Precision,
    choose_precision,
    configure_threads,
    device_lock,
    dtype_of,
    empty_cache,
    first_line,
    import_torch,
    is_oom,
    resolve_device,
)
from models.tiling import Geometry, OomSplitter, Origin, plan_axis, run_tiled

PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
DEFAULT_TILE = 128  # input pixels: the model was trained on 128 px crops, and a 128 px window fits any GPU
NOISE_BLOCK = 64  # side of the position-keyed noise blocks, in input (= latent) pixels
LATENT_STREAM, LOW_RES_STREAM, STEP_STREAM = 0, 1, 2  # the noise fields drawn from one seed, keyed by position
# Windows up to this side (input pixels, which are latent pixels for this model) decode whole; larger ones decode in
# the VAE's own tiles. A VAE tile changes the image (2.2 levels mean, 42 max against a whole decode), so only
# windows that would otherwise take too much memory pay that.
VAE_WHOLE_MAX = DEFAULT_TILE
# A decoded window is "black" when nothing in it reaches half an 8-bit level although its input does reach a few.
BLACK_OUT, BLACK_IN = 0.5 / 255, 8 / 255

_load_lock = threading.Lock()


class DiffusionModel:
    """What every view (tile) of one loaded pipeline shares: the pipeline, its precision and fallback, the lock and
    the out-of-memory splitter."""

    def __init__(
        self,
        model_id: str,
        pipe: Any,
        device: str,
        precision: Precision,
        source: str,
        revision: str | None,
        multiple_of: int,
        torch: Any,
    ) -> None:
        self.model_id = model_id
        self.pipe = pipe
        self.device = device
        self.precision = precision
        self.source = source
        self.revision = revision
        self.multiple_of = multiple_of
        self.max_noise_level = int(pipe.config.get("max_noise_level", MAX_NOISE_LEVEL))
        self.torch = torch
        self.displaced = False  # a failed fallback could not put the reduced pipeline back on the device
        self.lock = threading.Lock()  # one window at a time through this pipeline (its scheduler holds state)
        self.splitter = OomSplitter(
            self.geometry_for, lambda exc: is_oom(exc, torch), lambda: empty_cache(device, torch)
        )

    def geometry_for(self, side: int) -> Geometry:
        return window_geometry(side, self.multiple_of)

    def fall_back(self) -> None:
        """Reduced precision failed: load the pipeline in fp32 for good (see :class:`~models.runtime.Precision`).

        The fp32 weights come from the source again (casting the fp16 ones up would keep their rounding), first to
        the host; the reduced pipeline leaves the GPU only while the fp32 one moves there, and comes back if that
        fails, so the model always has a working pipeline.
        """
        torch = self.torch

        def install() -> None:
            fresh = _load_pipeline(self.model_id, self.source, self.revision, torch.float32, torch)
            old = self.pipe
            old.to("cpu")
            empty_cache(self.device, torch)
            try:
                _to_device(fresh, self.device, torch)
            except Exception:
                del fresh
                empty_cache(self.device, torch)
                try:
                    _to_device(old, self.device, torch)
                except Exception:  # noqa: BLE001 - the next window moves it back (displaced), the first error counts
                    self.displaced = True
                raise
            self.pipe = fresh

        self.precision.fall_back(self.model_id, self.device, install)


class DiffusionUpscaler(Upscaler):
    """An :class:`~models.base.Upscaler` over a ``StableDiffusionUpscalePipeline``: ``up(pixels, params)`` with
    ``params`` a :class:`~models.backends.DiffusionParams` (or a mapping of its fields, or None for the defaults).

    ``tile`` is the rule's window side in input pixels, or None for :data:`DEFAULT_TILE`. ``precision`` reads
    ``fp16->fp32`` (or ``bf16->fp32``) once a non-finite or black window forced the fallback; ``fallbacks`` and
    ``splits`` count those and out-of-memory splits over the model's life.
    """

    params_type = DiffusionParams

    def __init__(self, model: DiffusionModel, tile: int | None, threads: int, scale: float) -> None:
        super().__init__(
            model.model_id,
            "diffusion",
            scale,
            device=model.device,
            precision=model.precision.loaded,
            tiling=Tiling.INTERNAL,
            size=SizeRequirements(minimum=1, multiple_of=model.multiple_of),
            tile=tile,
        )
        self.model = model
        self.threads = threads

    @property
    def precision(self) -> str:
        return self.model.precision.label

    @property
    def pipe(self) -> Any:
        return self.model.pipe

    @property
    def source(self) -> str:
        return self.model.source

    @property
    def revision(self) -> str | None:
        return self.model.revision

    @property
    def max_noise_level(self) -> int:
        return self.model.max_noise_level

    @property
    def fallbacks(self) -> int:
        return self.model.precision.fallbacks

    @property
    def splits(self) -> int:
        return self.model.splitter.splits

    def window_side(self) -> int:
        """The window side in input pixels: the rule's tile (else :data:`DEFAULT_TILE`), lowered by out-of-memory
        splits, on the size grid."""
        m = self.size.multiple_of
        side = self.tile or DEFAULT_TILE
        if self.model.splitter.cap is not None:
            side = min(side, self.model.splitter.cap)
        return max(m, side // m * m)

    # --- the call ------------------------------------------------------------------------------------------------
    def upscale(self, pixels: np.ndarray, params: BaseModel) -> np.ndarray:
        """Upscale ``pixels`` (uint8, or float32 in [0, 1]) generated with ``params`` (see the class docstring).

        The same image, parameters and tile side give the same bytes on the same device and precision.

        Raises:
            InvalidParamsError: ``noise_level`` above the pipeline's ``max_noise_level``.
            OutOfMemoryError: even the smallest window ran out of memory (retryable).
            NonFiniteOutputError: the pipeline gave NaN, Inf or a black window in fp32.
        """
        assert isinstance(params, DiffusionParams)
        model = self.model
        if params.noise_level > model.max_noise_level:
            raise InvalidParamsError(
                f"noise_level {params.noise_level} is above {self.model_id}'s max_noise_level {model.max_noise_level}"
            )
        h, w = pixels.shape[:2]
        uint8 = pixels.dtype == np.uint8
        rgb = to_unit_float(pixels)
        # 1. Pad once for the whole image (never resize).
        padded = pad_to_multiple(rgb, self.size.multiple_of)
        geometry = model.geometry_for(self.window_side())
        windows = len(plan_axis(padded.shape[0], geometry.tile, geometry.overlap, geometry.multiple_of)) * len(
            plan_axis(padded.shape[1], geometry.tile, geometry.overlap, geometry.multiple_of)
        )
        job = _Job(params, _Steps(windows, params.num_inference_steps), model.torch)

        def one(window: np.ndarray, origin: Origin) -> np.ndarray:
            return model.splitter.run(lambda win, org: self._run_window(win, org, job), window, origin, self.scale)

        # 2. Windows one at a time, cross-faded; a window that runs out of memory is redone as smaller ones.
        out = run_tiled(one, padded, self.scale, geometry)
        out = out[: round(h * self.scale), : round(w * self.scale)]
        # Every window is clamped to [0, 1] in fp32 and the cross-fade is a convex blend: no clip needed.
        if uint8:
            return to_uint8(out)
        return out if out.flags.c_contiguous else np.ascontiguousarray(out)

    # --- one window ----------------------------------------------------------------------------------------------
    def _run_window(self, window: np.ndarray, origin: Origin, job: _Job) -> np.ndarray:
        """The pipeline on one window at ``origin``: float32 RGB (h, w, 3) in, float32 RGB (h*4, w*4, 3) out."""
        model = self.model
        torch = model.torch
        h, w = window.shape[:2]
        y0, x0 = origin
        with device_lock(model.device), model.lock, torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1).unsqueeze(0)
            channels = model.pipe.vae.config.latent_channels
            seed = job.params.seed
            latents = position_noise(seed, y0, x0, h, w, channels, torch, LATENT_STREAM)
            low_res_noise = position_noise(seed, y0, x0, h, w, x.shape[1], torch, LOW_RES_STREAM)
            y = self._denoise(x, latents, low_res_noise, origin, job)
            if y is None:  # reduced precision failed on this window: fp32 for good, and the window again
                model.fall_back()
                y = self._denoise(x, latents, low_res_noise, origin, job)
                if y is None:
                    raise NonFiniteOutputError(
                        f"{self.model_id} gave NaN, Inf or a black image even in fp32 on {self.device}"
                    )
            out = y[0].permute(1, 2, 0).cpu().numpy()
        # The tiler scales the window in place: it needs a writeable array of its own.
        return out if out.flags.writeable and out.flags.c_contiguous else np.ascontiguousarray(out)

    def _denoise(self, x: Any, latents: Any, low_res_noise: Any, origin: Origin, job: _Job) -> Any | None:
        """The pipeline's ``__call__`` on one window, with our noise; float32 (1, 3, 4h, 4w) in [0, 1], or None if
        the latents or the decoded window came out NaN, Inf or black in reduced precision."""
        model = self.model
        torch = model.torch
        pipe = model.pipe
        gp = job.params
        device = torch.device(model.device)
        dtype = model.precision.dtype
        if model.displaced:  # a failed fallback left it on the host: back to its device first
            _to_device(pipe, model.device, torch)
            model.displaced = False
        # Equal prompts make the guided and unguided predictions identical, so classifier-free guidance would only
        # double the work: guidance 1 gives the same image with one UNet pass per step.
        guidance = gp.guidance_scale if gp.prompt != gp.negative_prompt else 1.0
        cfg = guidance > 1.0
        embeds = job.embeddings(pipe, device, cfg)
        # The low-resolution image, in [-1, 1], with noise_level's noise added (ours, keyed by position).
        image = (x.to(device, torch.float32) * 2.0 - 1.0).to(dtype)
        noise_level = torch.tensor([gp.noise_level], dtype=torch.long, device=device)
        image = pipe.low_res_scheduler.add_noise(image, low_res_noise.to(device, dtype), noise_level)
        if cfg:
            image, noise_level = torch.cat([image] * 2), torch.cat([noise_level] * 2)
        # Timesteps on the host: the scheduler indexes its tables with them, which with a GPU tensor is a
        # host/GPU sync on every step; a host scalar goes to the UNet as an ordinary argument.
        pipe.scheduler.set_timesteps(gp.num_inference_steps, device="cpu")
        lat = latents.to(device, dtype) * pipe.scheduler.init_noise_sigma
        # The per-step noise of a stochastic scheduler (DDIM at eta 0 draws none) comes from the window's place.
        generator = torch.Generator("cpu").manual_seed(derived_seed(gp.seed, *origin, STEP_STREAM))
        extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        watch = FiniteWatch(model.device, torch)
        job.steps.start_window()
        for i, t in enumerate(pipe.scheduler.timesteps):
            inp = torch.cat([lat] * 2) if cfg else lat
            inp = torch.cat([pipe.scheduler.scale_model_input(inp, t), image], dim=1)
            pred = pipe.unet(inp, t, encoder_hidden_states=embeds, class_labels=noise_level, return_dict=False)[0]
            if cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance * (text - uncond)
            lat = pipe.scheduler.step(pred, t, lat, **extra, return_dict=False)[0]
            job.steps.step(i)
            if not watch.check(lat):
                return None  # stop now: the remaining steps cannot recover
        if not watch.finish():
            return None
        # Decode in the VAE's dtype (fp32, see _load_pipeline), in VAE tiles only where the window is large.
        vae = pipe.vae
        lat = lat.to(next(iter(vae.post_quant_conv.parameters())).dtype) / vae.config.scaling_factor
        if max(lat.shape[-2:]) > VAE_WHOLE_MAX:
            decoded = vae.tiled_decode(lat, return_dict=False)[0]
        else:
            decoded = vae.decode(lat, return_dict=False)[0]
        if pipe.safety_checker is not None:
            decoded, _nsfw, _watermark = pipe.run_safety_checker(decoded, device, embeds.dtype)
        y = (decoded.float() / 2 + 0.5).clamp_(0.0, 1.0)  # denormalise and clamp in fp32, whatever the model's dtype
        if not bool(torch.isfinite(decoded).all()):
            return None
        if float(y.amax()) < BLACK_OUT and float(x.amax()) > BLACK_IN:
            return None
        job.steps.end_window()
        return y


class _Job:
    """One call's state: its parameters, its progress, and the prompt's embeddings (encoded once per image and
    pipeline; a fallback brings a new pipeline, which encodes again)."""

    def __init__(self, params: DiffusionParams, steps: _Steps, torch: Any) -> None:
        self.params = params
        self.steps = steps
        self._torch = torch
        self._embeds: tuple[int, bool, Any] | None = None

    def embeddings(self, pipe: Any, device: Any, cfg: bool) -> Any:
        """The prompt's text embeddings for ``pipe`` (negative then positive when ``cfg``)."""
        if self._embeds is None or self._embeds[0] != id(pipe) or self._embeds[1] != cfg:
            gp = self.params
            pos, neg = pipe.encode_prompt(gp.prompt, device, 1, cfg, gp.negative_prompt or None)
            self._embeds = (id(pipe), cfg, self._torch.cat([neg, pos]) if cfg else pos)
        return self._embeds[2]


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


def window_geometry(side: int, multiple_of: int) -> Geometry:
    """The windows for a side of ``side`` input pixels: a quarter of the window overlaps its neighbour (the UNet
    attends across its whole window, so the context it needs grows with it), on the size grid; a quarter of the
    overlap next to each window's edge gets no weight (the margin), and the rest is the cross-fade."""
    m = max(1, multiple_of)
    overlap = max(m, -(-(side // 4) // m) * m)
    margin = overlap // 4
    return Geometry(side, margin, overlap - 2 * margin, m)


def derived_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for ``keys`` under ``seed``: independent streams that do not depend on the call order."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0])


def position_noise(
    seed: int, y0: int, x0: int, h: int, w: int, channels: int, torch: Any, stream: int = LATENT_STREAM
) -> Any:
    """Standard normal noise (1, channels, h, w) for the window at (y0, x0), cut from an endless grid of
    :data:`NOISE_BLOCK`-sized blocks, each drawn from its own seed (``seed``, block row, block column, ``stream``). A
    pixel's noise depends only on the seed, the stream and its position, so overlapping windows agree where they
    overlap, and memory stays one window's worth. Drawn on the CPU, so it is the same on every device."""
    out = torch.empty((1, channels, h, w), dtype=torch.float32)
    b = NOISE_BLOCK
    for by in range(y0 // b, (y0 + h - 1) // b + 1):
        for bx in range(x0 // b, (x0 + w - 1) // b + 1):
            gen = torch.Generator("cpu").manual_seed(derived_seed(seed, by, bx, stream))
            block = torch.randn((channels, b, b), generator=gen, dtype=torch.float32)
            ys, ye = max(y0, by * b), min(y0 + h, (by + 1) * b)
            xs, xe = max(x0, bx * b), min(x0 + w, (bx + 1) * b)
            out[0, :, ys - y0 : ye - y0, xs - x0 : xe - x0] = block[
                :, ys - by * b : ye - by * b, xs - bx * b : xe - bx * b
            ]
    return out


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
    torch = import_torch("diffusion", "diffusion", "diffusers", "transformers")
    threads = configure_threads(torch)
    # 1. Where the pipeline is: a save_pretrained folder, or the hub repository's snapshot in the HF cache.
    if is_diffusers_model(entry.id):
        source, revision = str(resolve_diffusers_folder(entry.id, ctx.weights_dir)), None
    else:
        source, revision = entry.hub_repo, entry.hub_revision
    # 2. Device and precision, then the pipeline itself.
    device = resolve_device(ctx.device, torch)
    precision = choose_precision(ctx.precision, device, torch, model=entry.id, half_on_cpu=False)
    pipe = _load_pipeline(entry.id, source, revision, dtype_of(precision, torch), torch)
    # 3. What it can do: the VAE gives the scale; the UNet's downsampling and the image processor's VAE grid give
    #    the size requirement.
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if vae_factor != scale:
        raise UnsupportedScaleError(
            f"{entry.id} is a x{vae_factor} pipeline and cannot upscale x{scale:g} natively; "
            f"set scale = {vae_factor} (and outscale for another final size)"
        )
    _to_device(pipe, device, torch)
    multiple = math.lcm(vae_factor, 2 ** int(pipe.unet.num_upsamplers))
    model = DiffusionModel(entry.id, pipe, device, Precision(precision, torch), source, revision, multiple, torch)
    return DiffusionUpscaler(model, ctx.tile, threads, float(vae_factor))


def missing_weights_message(model_id: str, repo: str, revision: str | None) -> str:
    """How to get a hub pipeline into the cache, or what to use instead."""
    try:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except ImportError:
        cache = "~/.cache/huggingface/hub"
    rev = f" --revision {revision}" if revision and revision != "main" else ""
    return (
        f"weights for {model_id} ({repo}) are not in the Hugging Face cache at {cache}, and the service never "
        f"downloads by itself. On a machine with network run `upscaled weights fetch {model_id}` (or "
        f"`huggingface-cli download {repo}{rev}`, `hf download` in newer huggingface_hub) with the same "
        f"HF_HOME, and copy the cache here if needed; or save the pipeline with save_pretrained() and set "
        f'model = "diffusers:/path/to/folder" in the rule'
    )


def dtype_keyword(diffusers: Any) -> str:
    """The ``from_pretrained`` keyword for the weights' dtype: ``dtype`` where the installed diffusers reads it (it
    deprecated ``torch_dtype`` for it), else ``torch_dtype`` (older versions silently ignore ``dtype``)."""
    deprecation = getattr(getattr(diffusers, "utils", None), "deprecation_utils", None)
    return "dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype"


def load_dtypes(diffusers: Any, dtype: Any, torch: Any) -> dict[str, Any]:
    """The ``from_pretrained`` keyword argument that loads the UNet and text encoder in ``dtype`` and the VAE in fp32,
    each straight from the file's weights. A diffusers that reads ``dtype`` takes a per-component dict; an older one
    gets fp32 for everything, and :func:`ensure_dtype` casts the UNet and text encoder down (the same values a
    reduced-precision load gives), never the VAE up from rounded weights."""
    keyword = dtype_keyword(diffusers)
    if keyword == "dtype":
        return {"dtype": {"default": dtype, "vae": torch.float32}}
    return {"torch_dtype": torch.float32}


def ensure_dtype(pipe: Any, dtype: Any, torch: Any) -> Any:
    """Make the pipeline's UNet and text encoder ``dtype`` (whatever ``from_pretrained`` did with the keyword), and
    keep the VAE in fp32: the job row then says what really runs, and the decoded pixels are clamped in fp32 (fp16 is
    coarser than a 16-bit output; the x4 VAE overflows in fp16 anyway)."""
    for name in ("unet", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None and module.dtype != dtype:
            module.to(dtype)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    return pipe


def _load_pipeline(model_id: str, source: str, revision: str | None, dtype: Any, torch: Any) -> Any:
    """Read the pipeline offline from safetensors, in ``dtype``, on the host.

    Raises:
        WeightsMissingError, WeightsCorruptError, UnsupportedModelError: as for :func:`load`.
    """
    import diffusers
    import diffusers.utils.logging

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
                source,
                revision=revision,
                local_files_only=True,
                use_safetensors=True,
                **load_dtypes(diffusers, dtype, torch),
            )
        except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError is an OSError too
            if not folder:
                raise WeightsMissingError(missing_weights_message(model_id, source, revision)) from None
            raise WeightsCorruptError(
                f"{source} is not a complete save_pretrained folder of a {PIPELINE_CLASS} in "
                f"safetensors: {first_line(exc)}"
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            where = source if folder else f"the cached snapshot of {source}"
            raise WeightsCorruptError(
                f"cannot build a {PIPELINE_CLASS} from {where}: {type(exc).__name__}: {first_line(exc)}"
            ) from None
    pipe.set_progress_bar_config(disable=True)
    ensure_dtype(pipe, dtype, torch)
    pipe.vae.disable_tiling()  # decided per window (VAE_WHOLE_MAX)
    # Attention slicing bounds attention memory where the score matrices are built whole. torch's
    # scaled_dot_product_attention (diffusers' default processor whenever torch has it) never builds them, and
    # slicing would replace it with the explicit path: measured on the tiny test pipeline at 128 px on the CPU,
    # 4.5 s and +570 MB peak sliced against 1.2 s and +70 MB with SDPA. So slice only where SDPA is missing.
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        pipe.enable_attention_slicing()
    return pipe


def _to_device(pipe: Any, device: str, torch: Any) -> None:
    pipe.to(torch.device(device))
