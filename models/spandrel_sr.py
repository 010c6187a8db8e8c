"""Real-ESRGAN and its family (RRDBNet, SRVGG compact, DITN, SwinIR, HAT, SPAN, ...) through spandrel.

spandrel detects the architecture and its hyperparameters from the state dict and hands back an
``ImageModelDescriptor`` with the scale, fp16/bf16 support, size requirements and a tiling hint. This module never
re-detects anything: it reads the weights safely (:func:`load_descriptor`), asks ``spandrel.ModelLoader`` for the
descriptor, and wraps it in a :class:`SpandrelUpscaler`:

1. device, precision, threads and out-of-memory detection come from :mod:`models.runtime`. ``auto`` precision is
   fp16 on CUDA for 8-bit inputs and fp32 for float32 (16-bit) inputs, whose output fp16 could not carry; a
   non-finite output in reduced precision switches the model to fp32 for good, from the file's own fp32 weights;
2. the window side is sized *once, at load*: from a CPU budget, or from the GPU memory free at load (measured under
   the GPU's lock, see :func:`models.runtime.device_lock`), and the memory one input pixel costs in the precision
   that runs. An image that fits runs as one window; a larger one is cut by :mod:`models.tiling` (16 px margin,
   8 px cross-fade), and a window that runs out of memory is split;
3. uint8 pixels go to the device as uint8 and come back as uint8: ``x / 255`` and ``rint(y * 255)`` in fp32 on the
   device, as a plain loop writes them;
4. ``channels_last`` is kept only where a timed probe at load shows it is faster.

torch and spandrel are imported inside :func:`load`, so the service starts, lists models and checks configurations
without them; a missing install is a :class:`~models.errors.BackendUnavailableError` naming ``upscaled[gan]``.
"""

from __future__ import annotations

import copy
import math
import pickle
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from models.base import SizeRequirements, Tiling, Upscaler, pad_to_multiple
from models.catalog import MODEL_FILE_SUFFIXES, ModelEntry, is_file_model, resolve_model_file
from models.errors import (
    NonFiniteOutputError,
    OutOfMemoryError,
    UnsafeWeightsError,
    UnsupportedModelError,
    UnsupportedScaleError,
    WeightsCorruptError,
)
from models.registry import LoadContext
from models.runtime import (
    Precision,
    choose_precision,
    configure_threads,
    device_lock,
    dtype_of,
    empty_cache,
    first_line,
    free_memory,
    import_torch,
    is_cuda,
    is_oom,
    resolve_device,
    sync,
)
from models.tiling import Geometry, OomSplitter, Origin, run_tiled
from models.weights import check, locate

# Tiling geometry, in input pixels. Measured on the shipped models (tiled against one pass, max difference in 8-bit
# levels): SRVGG compact xsx4 0.30 with a 12 px margin and 0.013 with 16; DITN 0.71 with 16, where it cannot reach
# zero because its ISA blocks attend over a whole window's channel statistics. 16 px also covers Real-ESRGAN's
# own default tile_pad of 10.
MARGIN = 16  # context next to a window's inner edge, where zero padding spoils the output: never weighted
FEATHER = 8  # the cross-fade between neighbours
SMALL_SIDE = 2 * MARGIN  # images narrower than this get their edge pixels repeated around them first

CPU_ACTIVATION_BUDGET = 1 << 30  # bytes of activations one window may take on the CPU
CUDA_FREE_FRACTION = 0.6  # of the GPU memory free at load that one window may take, leaving room for cuDNN
MAX_TILE = 2048  # windows larger than this gain nothing and make one out-of-memory split expensive
PROBE_SIDE = 64  # input side of the probes that measure memory per pixel and the channels_last speed
CHANNELS_LAST_GAIN = 0.95  # keep channels_last only if it takes at most this fraction of the contiguous time
LAYOUT_ROUNDS = 3
GREY = (0.299, 0.587, 0.114)  # BT.601 luma, for models that take one channel

# (arch, tags, scale, device, precision) -> channels_last decision: probe once per process per kind of model.
_LAYOUT_DECISIONS: dict[tuple, tuple[bool, dict[str, float]]] = {}


class SpandrelModel:
    """What every view (tile) of one loaded model shares: the weights on the device, the precision and its fallback,
    the lock, the memory budget and the out-of-memory splitter. Built by :func:`load`."""

    def __init__(
        self,
        model_id: str,
        descriptor: Any,
        device: str,
        precision: Precision,
        auto: bool,
        cpu_fp32: Any | None,
        channels_last: bool,
        budget: float,
        bytes_per_px: dict[str, float],
        torch: Any,
    ) -> None:
        self.model_id = model_id
        self.device = device
        self.precision = precision
        self.auto = auto  # precision "auto": float32 inputs run in fp32
        self.channels_last = channels_last
        self.budget = budget  # bytes one window may use, fixed at load (item: outputs must not depend on others)
        self.bytes_per_px = bytes_per_px  # per precision name, measured at load (fp32 derived or measured later)
        self.scale = float(descriptor.scale)
        self.multiple_of = max(1, descriptor.size_requirements.multiple_of)
        self.tiling = Tiling[descriptor.tiling.name]  # same three hints, same names
        self.input_channels = descriptor.input_channels
        self.arch = descriptor.architecture.id
        self.descriptor = descriptor  # in precision.current
        self._cpu_fp32 = cpu_fp32  # the file's fp32 weights on the host, for the fallback and float32 inputs
        self._fp32: Any | None = None  # an fp32 copy on the device, for float32 inputs while the main one is fp16
        self.torch = torch
        self._finite: list[Any] = [None]
        self.lock = threading.Lock()  # one window at a time through this model (a torch module is not reentrant)
        self.last = threading.local()  # the precision of each thread's last call
        self.splitter = OomSplitter(
            self.geometry_for, lambda exc: is_oom(exc, torch), lambda: empty_cache(device, torch)
        )
        self._watch(descriptor)

    # --- geometry ---------------------------------------------------------------------------------------------------
    def geometry_for(self, side: int) -> Geometry:
        return Geometry(side, MARGIN, FEATHER, self.multiple_of)

    def memory_side(self, precision: str) -> int:
        """The largest window side whose activations fit the budget fixed at load, in ``precision``."""
        bpp = self.bytes_per_px.get(precision) or 2 * self.bytes_per_px.get("fp16", 1.0)
        side = int(math.sqrt(self.budget / max(bpp, 1.0)))
        m = self.multiple_of
        return max(self.geometry_for(m).smallest, min(MAX_TILE, side) // m * m)

    # --- which weights run a call ----------------------------------------------------------------------------------
    def runner(self, uint8: bool) -> tuple[Any, str]:
        """(descriptor, precision name) for a call with uint8 or float32 pixels. Call under :attr:`lock`.

        Under ``auto`` a float32 input (a 16-bit source) runs in fp32: an fp16 output has about 11 bits, fewer than
        the 16 the output keeps.
        """
        current = self.precision.current
        if uint8 or current == "fp32" or not self.auto:
            return self.descriptor, current
        if self._fp32 is None:
            self._fp32 = self._device_fp32()
            if "fp32" not in self.bytes_per_px:
                self.bytes_per_px["fp32"] = 2 * self.bytes_per_px[current]
        return self._fp32, "fp32"

    def _device_fp32(self) -> Any:
        torch = self.torch
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        assert self._cpu_fp32 is not None  # given up only once the main copy is fp32 itself
        fp32 = copy.deepcopy(self._cpu_fp32).to(torch.device(self.device)).eval()
        fp32.model.to(memory_format=fmt)
        self._watch(fp32)
        return fp32

    def _watch(self, descriptor: Any) -> None:
        """Record whether the raw network output was finite: spandrel clamps it, and a clamp turns Inf into 1.0."""

        def hook(_module: Any, _args: Any, output: Any) -> None:
            if self.torch.is_tensor(output):
                self._finite[0] = self.torch.isfinite(output).all()  # a device tensor: no sync here

        descriptor.model.register_forward_hook(hook)

    def fall_back(self) -> None:
        """Reduced precision gave NaN or Inf: run the file's fp32 weights from now on (see :class:`Precision`)."""

        def install() -> None:
            fp32 = self._fp32 if self._fp32 is not None else self._device_fp32()
            empty_cache(self.device, self.torch)
            self.descriptor, self._fp32, self._cpu_fp32 = fp32, None, None
            # fp32 activations take twice the memory: the windows shrink, instead of a split after an OOM.
            self.bytes_per_px.setdefault("fp32", 2 * self.bytes_per_px[self.precision.current])

        self.precision.fall_back(self.model_id, self.device, install)

    # --- one window on the device ----------------------------------------------------------------------------------
    def run_window(self, window: np.ndarray, _origin: Origin) -> np.ndarray:
        """The network on one window, no tiling: uint8 in, uint8 out (converted on the device), or float32 in [0, 1]
        in and out. Runs under the model's lock and the GPU's lock.

        Raises:
            NonFiniteOutputError: NaN or Inf in fp32.
            Whatever torch raises (out-of-memory errors are the splitter's to catch).
        """
        torch = self.torch
        uint8 = window.dtype == np.uint8
        with device_lock(self.device), self.lock, torch.inference_mode():
            descriptor, precision = self.runner(uint8)
            y = self._forward(descriptor, precision, window)
            if y is None and precision != "fp32":  # reduced precision overflowed: fp32 for good, this window again
                self.fall_back()
                descriptor, precision = self.runner(uint8)
                y = self._forward(descriptor, precision, window)
            if y is None:
                raise NonFiniteOutputError(
                    f"{self.model_id} gave NaN or Inf in fp32 on {self.device}; its weights are broken"
                )
            self.last.label = self.precision.label if precision == self.precision.current else precision
            y = y[0]
            if y.shape[0] == 1:
                y = y.expand(3, -1, -1)
            y = y.permute(1, 2, 0)  # HWC; a channels_last output is already laid out so: no copy
            if uint8:
                y = y.float().mul_(255.0).round_().to(torch.uint8)
            else:
                y = y.float()
            out = y.cpu().numpy()
        # A CPU result shares memory with the output tensor; the tiler may scale it in place, so it must own it.
        return out if out.flags.writeable and out.flags.c_contiguous else np.ascontiguousarray(out)

    def _forward(self, descriptor: Any, precision: str, window: np.ndarray) -> Any | None:
        """The descriptor on ``window`` (padded to its size requirements, clamped to [0, 1]); None if the raw output
        was not finite."""
        torch = self.torch
        x = torch.from_numpy(window).to(torch.device(self.device)).permute(2, 0, 1).unsqueeze(0)
        x = x.float()
        if window.dtype == np.uint8:
            x = x.div_(255.0)  # in fp32 first, as a plain loop does, then to the model's dtype
        if self.input_channels == 1:
            x = (x * x.new_tensor(GREY).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(dtype_of(precision, torch)).contiguous(memory_format=fmt)
        self._finite[0] = None
        y = descriptor(x)
        finite = self._finite[0]
        if finite is not None and not bool(finite):  # one sync per window, where the result is read anyway
            return None
        return y


class SpandrelUpscaler(Upscaler):
    """An :class:`~models.base.Upscaler` over a spandrel model: ``up(pixels)`` as every upscaler.

    ``tile`` is the rule's window side (None: the side sized at load); views made by :meth:`with_tile` share the
    :class:`SpandrelModel`. ``precision`` is the precision of this thread's last call (``fp16``; ``fp32`` for a
    float32 input under ``auto``; ``fp16->fp32`` after a fallback).
    """

    def __init__(
        self, model: SpandrelModel, entry_id: str, tile: int | None, threads: int, layout_probe: dict[str, float]
    ) -> None:
        super().__init__(
            entry_id,
            "spandrel",
            model.scale,
            device=model.device,
            precision=model.precision.loaded,
            tiling=model.tiling,
            size=SizeRequirements(minimum=1, multiple_of=model.multiple_of),
            tile=tile,
        )
        self.model = model
        self.threads = threads  # torch intra-op threads in this process
        self.layout_probe = layout_probe  # seconds per probe run in each layout, for the record

    # --- what callers and benchmarks read ---------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return getattr(self.model.last, "label", self.model.precision.label)

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def channels_last(self) -> bool:
        return self.model.channels_last

    @property
    def fallbacks(self) -> int:
        return self.model.precision.fallbacks

    @property
    def splits(self) -> int:
        return self.model.splitter.splits

    @property
    def bytes_per_px(self) -> float:
        return self.model.bytes_per_px.get(self.model.precision.current, 0.0)

    def window_side(self, uint8: bool = True) -> int:
        """The window side for a call: the rule's tile, else what the budget fixed at load allows, lowered by
        out-of-memory splits. A model whose hint is DISCOURAGED is tiled only when memory demands it."""
        model = self.model
        precision = model.precision.current if uint8 or not model.auto else "fp32"
        if self.tile and self.tiling is Tiling.SUPPORTED:
            side = self.tile
        else:
            side = model.memory_side(precision)
        if model.splitter.cap is not None:
            side = min(side, model.splitter.cap)
        return max(model.geometry_for(side).smallest, side)

    # --- the call -----------------------------------------------------------------------------------------------------
    def upscale(self, pixels: np.ndarray, params: BaseModel) -> np.ndarray:
        model = self.model
        h, w = pixels.shape[:2]
        # 1. A tiny image is all border: the network's zero padding would show it a black frame and darken or tint
        #    it. Repeat its edge pixels around it instead, up to SMALL_SIDE, and cut the result back out.
        pad_h, pad_w = max(0, SMALL_SIDE - h), max(0, SMALL_SIDE - w)
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            pixels = np.pad(pixels, ((top, pad_h - top), (left, pad_w - left), (0, 0)), mode="edge")
        # 2. Pad once for the whole image, so that every window sits on the model's patch grid exactly as a single
        #    pass would (spandrel would otherwise pad each window on its own, at different places).
        padded = pad_to_multiple(pixels, model.multiple_of)

        def guarded(window: np.ndarray, origin: Origin) -> np.ndarray:
            return model.splitter.run(model.run_window, window, origin, model.scale)

        # 3. One window when it fits (no tiling cost for ordinary images), else windows cross-faded by the tiler.
        if self.tiling is Tiling.INTERNAL:
            out = self._unsplittable(padded)
        else:
            side = self.window_side(padded.dtype == np.uint8)
            out = run_tiled(guarded, padded, model.scale, model.geometry_for(side))
        oy, ox = round(top * model.scale), round(left * model.scale)
        out = out[oy : oy + round(h * model.scale), ox : ox + round(w * model.scale)]
        # Every window is clamped to [0, 1] by spandrel and the cross-fade is a convex blend: no clip needed.
        return out if out.flags.c_contiguous else np.ascontiguousarray(out)

    def _unsplittable(self, img: np.ndarray) -> np.ndarray:
        """A model that tiles internally runs whole; running out of memory is the worker's to handle."""
        try:
            return self.model.run_window(img, (0, 0))
        except Exception as exc:  # noqa: BLE001 - filtered by is_oom
            if not is_oom(exc, self.model.torch):
                raise
            message = first_line(exc)
        empty_cache(self.device, self.model.torch)
        raise OutOfMemoryError(
            f"{self.model_id} ran out of memory on a {img.shape[1]}x{img.shape[0]} image on "
            f"{self.device}, and it cannot be tiled from outside: {message}"
        )


# --- loading ---------------------------------------------------------------------------------------------------
def load(entry: ModelEntry, scale: float, ctx: LoadContext) -> SpandrelUpscaler:
    """Load ``entry`` at ``scale`` on ``ctx.device`` in ``ctx.precision``.

    Raises:
        BackendUnavailableError: torch or spandrel is not installed.
        WeightsMissingError: the weight file is absent (the message names the fetch command), or a ``file:`` model's
            file does not exist.
        WeightsCorruptError: the file fails its sha256, cannot be read, or holds another architecture than catalogued.
        UnsafeWeightsError: the file would run code when unpickled, or is a TorchScript program.
        UnsupportedModelError: spandrel does not know the architecture, or it is not a super-resolution model.
        UnsupportedScaleError: the model's scale is not ``scale``.
        DeviceUnavailableError: ``ctx.device`` names a GPU that is not there.
        UnsupportedPrecisionError: ``ctx.precision`` is unknown, or the model or device cannot run it.
    """
    torch = import_torch("spandrel", "gan", "spandrel")
    import spandrel

    _install_extra_arches(spandrel)
    threads = configure_threads(torch)
    # 1. Find and verify the file, then let spandrel recognise it.
    if is_file_model(entry.id):
        path = resolve_model_file(entry.id, ctx.weights_dir)
    else:
        key = int(scale)
        path = locate(ctx.weights_dir, entry, key)
        check(ctx.weights_dir, entry.files[key])
    descriptor = load_descriptor(path, torch, spandrel)
    arch = descriptor.architecture.id
    if entry.arch and arch != entry.arch:
        raise WeightsCorruptError(f"{path} should hold a {entry.arch} model for {entry.id}, but spandrel finds {arch}")
    if descriptor.scale != scale:
        raise UnsupportedScaleError(
            f"{entry.id} is a x{descriptor.scale} model and cannot upscale x{scale:g} "
            f"natively; set scale = {descriptor.scale} (and outscale for another final size)"
        )
    # 2. Device and precision. The file's fp32 weights stay on the host where a reduced-precision model may need
    #    them: for the fp32 fallback, and for float32 inputs under auto.
    device = resolve_device(ctx.device, torch)
    name = choose_precision(
        ctx.precision,
        device,
        torch,
        model=f"{entry.id} ({descriptor.architecture.name})",
        supports_half=descriptor.supports_half,
        supports_bf16=descriptor.supports_bfloat16,
    )
    descriptor.eval()
    cpu_fp32 = copy.deepcopy(descriptor) if name != "fp32" else None
    descriptor.to(torch.device(device))
    if name != "fp32":
        descriptor.to(dtype_of(name, torch))
    multiple = max(1, descriptor.size_requirements.multiple_of)
    # 3. Measure, under the GPU's lock: whether channels_last is faster here, the memory one input pixel costs, and
    #    the memory a window may use, once, so that outputs never depend on what other workers hold at the time.
    probe_side = -(-max(PROBE_SIDE, descriptor.size_requirements.minimum) // multiple) * multiple
    with device_lock(device):
        channels_last, timings = _choose_layout(descriptor, device, dtype_of(name, torch), name, probe_side, torch)
        descriptor.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        bpp = {name: bytes_per_pixel(descriptor, device, dtype_of(name, torch), probe_side, channels_last, torch)}
        budget = free_memory(device, torch) * CUDA_FREE_FRACTION if is_cuda(device) else CPU_ACTIVATION_BUDGET
    model = SpandrelModel(
        entry.id,
        descriptor,
        device,
        Precision(name, torch),
        ctx.precision == "auto",
        cpu_fp32,
        channels_last,
        budget,
        bpp,
        torch,
    )
    return SpandrelUpscaler(model, entry.id, ctx.tile, threads, timings)


def _install_extra_arches(spandrel: Any) -> None:
    """Add spandrel_extra_arches' architectures (SRFormer and others) to spandrel's registry when that package is
    installed: a user who installed it means to load them. Idempotent."""
    try:
        import spandrel_extra_arches
    except ImportError:
        return
    spandrel_extra_arches.install(ignore_duplicates=True)


def supported_architectures() -> tuple[set[str], str]:
    """(the architecture ids the installed spandrel loads, its version), spandrel_extra_arches' included when it
    is installed. Imports torch and spandrel.

    Raises:
        BackendUnavailableError: torch or spandrel is not installed, or torch is below the floor.
    """
    import_torch("spandrel", "gan", "spandrel")
    import spandrel

    _install_extra_arches(spandrel)
    return {a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures()}, spandrel.__version__


def load_descriptor(path: Path, torch: Any, spandrel: Any) -> Any:
    """Read ``path`` without running code in it, and let spandrel turn the state dict into an SR descriptor.

    ``.safetensors`` holds data only. Every pickle format (``.pth``, ``.pt``, ``.ckpt``) goes through torch's
    weights-only unpickler: spandrel's own loader would hand a ``.pt`` (and a TorchScript archive renamed ``.pth``) to
    ``torch.jit.load``, and a TorchScript archive is a program. spandrel then canonicalises the wrappers
    (``params_ema``, ``state_dict``, ``module.`` prefixes) and detects the architecture.

    Raises:
        UnsafeWeightsError, WeightsCorruptError, UnsupportedModelError: as for :func:`load`.
    """
    suffix = path.suffix.lower()
    if suffix not in MODEL_FILE_SUFFIXES:
        raise UnsupportedModelError(f"{path.name}: expected a {', '.join(MODEL_FILE_SUFFIXES)} file, got {suffix!r}")
    try:
        if suffix == ".safetensors":
            state = spandrel.ModelLoader().load_state_dict_from_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "forbidden content"
        raise UnsafeWeightsError(
            f"{path} was refused by the weights-only unpickler, so nothing in it ran; it is not a "
            f"plain state dict ({first})"
        ) from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise UnsafeWeightsError(
                f"{path} is a TorchScript archive, which is code, not weights; export its "
                f"state_dict() to .safetensors or .pth"
            ) from None
        raise WeightsCorruptError(f"cannot read {path}: {first_line(exc)}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightsCorruptError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
        if type(exc).__name__ == "SafetensorError":
            raise WeightsCorruptError(f"cannot read {path}: {exc}") from None
        raise
    if not isinstance(state, dict) or not state:
        raise UnsupportedModelError(f"{path.name} holds a {type(state).__name__}, not a state dict of tensors")
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UnsupportedModelError(
            f"{path.name}: spandrel {spandrel.__version__} does not recognise this "
            f"architecture ({len(state)} tensors, first key {next(iter(state))!r})"
        ) from None
    except (KeyError, RuntimeError, ValueError, TypeError, AssertionError, AttributeError) as exc:
        raise UnsupportedModelError(
            f"{path.name}: spandrel recognised the keys but could not build the model: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise UnsupportedModelError(
            f"{path.name} is a {descriptor.architecture.name} model for {descriptor.purpose} "
            f"({type(descriptor).__name__}); this backend runs super-resolution (SR) models "
            "only"
        )
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels not in (1, 3):
        raise UnsupportedModelError(
            f"{path.name}: {descriptor.input_channels} input and {descriptor.output_channels} "
            f"output channels; expected RGB (3) or grey (1)"
        )
    return descriptor


def _choose_layout(
    descriptor: Any, device: str, dtype: Any, precision: str, side: int, torch: Any
) -> tuple[bool, dict[str, float]]:
    """Time the model on a probe in both memory layouts; keep channels_last only if clearly faster.

    The answer depends on the device and the kernels (docs/performance.md has two CPU figures), so it is measured
    here rather than assumed, once per kind of model per process.
    """
    key = (descriptor.architecture.id, tuple(descriptor.tags), descriptor.scale, device, precision)
    if key in _LAYOUT_DECISIONS:
        return _LAYOUT_DECISIONS[key]
    x = torch.rand(1, descriptor.input_channels, side, side, device=torch.device(device), dtype=dtype)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    timings = {name: math.inf for name in layouts}
    with torch.inference_mode():
        # Interleaved rounds, best of each: a CPU shared with other work slows both layouts alike, instead of
        # whichever happened to run while it was busy.
        for rnd in range(LAYOUT_ROUNDS + 1):
            for name, fmt in layouts.items():
                descriptor.model.to(memory_format=fmt)
                xi = x.contiguous(memory_format=fmt)
                sync(device, torch)
                t0 = time.perf_counter()
                descriptor(xi)
                sync(device, torch)
                if rnd:  # round 0 is the warm-up: kernel selection, allocator
                    timings[name] = min(timings[name], time.perf_counter() - t0)
    decision = (timings["channels_last"] <= CHANNELS_LAST_GAIN * timings["contiguous"], timings)
    _LAYOUT_DECISIONS[key] = decision
    return decision


def activation_estimate(descriptor: Any, x: Any, torch: Any) -> float:
    """Bytes a run on ``x`` takes, estimated from its largest layer output: four times that (an input, an output
    and a block's temporaries can be alive at once) plus the window's own input and output."""
    largest = [0]

    def hook(_m: Any, _a: Any, out: Any) -> None:
        if torch.is_tensor(out):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in descriptor.model.modules() if not list(m.children())]
    try:
        y = descriptor(x)
    finally:
        for h in handles:
            h.remove()
    return float(4 * largest[0] + x.numel() * x.element_size() + y.numel() * y.element_size())


def combine_measurements(measured: float, estimate: float) -> float:
    """The bytes a probe took: what the allocator measured, but never less than the layer-size estimate.

    A measurement of device-wide counters can come out near zero or negative (memory another thread freed during
    the probe); taken alone it would size windows for almost no memory per pixel, that is, as large as allowed.
    """
    return max(measured, estimate)


def bytes_per_pixel(descriptor: Any, device: str, dtype: Any, side: int, channels_last: bool, torch: Any) -> float:
    """Device memory one input pixel costs, measured on a ``side`` x ``side`` probe. Call under the GPU's lock.

    On CUDA the allocator's peak over the probe, never below :func:`activation_estimate`; on the CPU the estimate.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(1, descriptor.input_channels, side, side, device=torch.device(device), dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    with torch.inference_mode():
        estimate = activation_estimate(descriptor, x, torch)
        if is_cuda(device):
            dev = torch.device(device)
            sync(device, torch)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            descriptor(x)
            sync(device, torch)
            used = combine_measurements(torch.cuda.max_memory_allocated(dev) - before, estimate)
        else:
            used = estimate
    return max(1.0, used / (side * side))
