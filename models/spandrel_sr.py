"""Real-ESRGAN and its family (RRDBNet, SRVGG compact, DITN, SwinIR, HAT, SPAN, ...) through spandrel.

spandrel detects the architecture and its hyperparameters from the state dict and hands back an
``ImageModelDescriptor`` with the scale, fp16/bf16 support, size requirements and a tiling hint. This module never
re-detects anything: it reads the weights safely, asks ``spandrel.ModelLoader`` for the descriptor, and wraps it in
a :class:`SpandrelUpscaler` that

1. runs on the device asked for (``auto`` takes CUDA when there is one) in the precision asked for (``auto`` is fp16
   on CUDA where the model supports it, fp32 on the CPU), and reruns a tile in fp32 when reduced precision gives
   NaN or Inf (fp16 overflows into black or white images on some GPUs), staying in fp32 from then on;
2. tiles with overlapping, cross-faded windows (:mod:`models.tiling`), one window on the device at a time, sized from
   free CUDA memory or a CPU budget unless a rule sets ``tile``, splitting a window that runs out of memory;
3. keeps ``channels_last`` only where a timed probe at load shows that it is faster.

torch and spandrel are imported inside :func:`load`, so the service starts, lists models and checks configurations
without them; a missing install is a :class:`~models.errors.BackendUnavailableError` naming ``upscaled[gan]``.
"""

from __future__ import annotations

import math
import os
import pickle
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.base import RunFn, SizeRequirements, Tiling, Upscaler, pad_to_multiple
from models.catalog import MODEL_FILE_SUFFIXES, ModelEntry, is_file_model, resolve_model_file
from models.errors import (
    BackendUnavailableError,
    DeviceUnavailableError,
    NonFiniteOutputError,
    OutOfMemoryError,
    UnsafeWeightsError,
    UnsupportedModelError,
    UnsupportedPrecisionError,
    UnsupportedScaleError,
    WeightsCorruptError,
)
from models.registry import LoadContext
from models.tiling import OomSplitting, run_blended, smallest_tile, split_on_oom
from models.weights import check, locate

INSTALL_HINT = "pip install 'upscaled[gan]'"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# Tiling geometry, in input pixels. Measured on the shipped models (tiled vs one pass, max difference in 8-bit
# levels): SRVGG compact xsx4 0.30 with a 12 px margin and 0.013 with 16; DITN 0.71 with 16, where it cannot reach
# zero because its ISA blocks attend over a whole window's channel statistics. 16 px also covers Real-ESRGAN's
# own default tile_pad of 10.
MARGIN = 16  # next to a window's edge, where zero padding spoils the output: never weighted
FEATHER = 8  # the cross-fade between neighbours
OVERLAP = 2 * MARGIN + FEATHER

SMALL_SIDE = 2 * MARGIN  # images narrower than this get their edge pixels repeated around them first

CPU_ACTIVATION_BUDGET = 1 << 30  # bytes of activations one window may take on the CPU
CUDA_FREE_FRACTION = 0.6  # of the free (plus cached) GPU memory one window may take, leaving room for the cuDNN
MAX_TILE = 2048  # windows larger than this gain nothing and make one out-of-memory split expensive
PROBE_SIDE = 64  # input side of the probes that measure memory per pixel and the channels_last speed
CHANNELS_LAST_GAIN = 0.95  # keep channels_last only if it takes at most this fraction of the contiguous time
LAYOUT_ROUNDS = 3

# (arch, tags, scale, device type, precision) -> channels_last decision: probe once per process per kind of model.
_LAYOUT_DECISIONS: dict[tuple, tuple[bool, dict[str, float]]] = {}
_threads_lock = threading.Lock()
_threads_set = False


@dataclass(eq=False)
class SpandrelUpscaler(OomSplitting, Upscaler):
    """An :class:`Upscaler` over a spandrel descriptor. Call it like any upscaler.

    ``tile`` is the rule's tile side, or None to size windows from memory at each call. ``precision`` reads
    ``"fp16->fp32"`` (or ``"bf16->fp32"``) once a non-finite output forced the fallback; ``fallbacks`` and
    ``splits`` count NaN reruns and out-of-memory splits over the upscaler's life.
    """

    run: RunFn | None = None  # set to this upscaler's own single-window runner in __post_init__
    arch: str = ""
    threads: int = 0  # torch intra-op threads in this process
    channels_last: bool = False
    layout_probe: dict[str, float] = field(default_factory=dict)  # seconds per probe run, for the record
    bytes_per_px: float = 0.0  # device memory one input pixel costs, measured at load
    overlap: int = OVERLAP
    margin: int = MARGIN
    fallbacks: int = 0
    splits: int = 0
    descriptor: Any = field(default=None, repr=False)
    _torch: Any = field(default=None, repr=False)
    _dtype: Any = field(default=None, repr=False)
    _tile_cap: int | None = field(default=None, repr=False)  # lowered by out-of-memory splits
    _fp32_state: dict | None = field(default=None, repr=False)  # the file's weights, for the fp32 fallback
    _nonfinite: list[bool] = field(default_factory=lambda: [False], repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.run = self._run_window
        self.descriptor.model.register_forward_hook(self._check_finite)

    # --- the call contract ---------------------------------------------------------------------------------------
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Upscale ``rgb`` (float32, (H, W, 3), [0, 1]) to (round(H * scale), round(W * scale), 3).

        Raises:
            UnsupportedImageError: the array is not float32 RGB.
            ImageTooSmallError: a side is 0.
            OutOfMemoryError: even the smallest window ran out of memory (retryable).
            NonFiniteOutputError: the model gave NaN or Inf in fp32.
        """
        h, w = self.check_input(rgb)
        m = self.size.multiple_of
        # A tiny image is all border: the network's zero padding would show it a black frame and darken or tint
        # it. Repeat its edge pixels around it instead, up to SMALL_SIDE, and cut the result back out.
        pad_h, pad_w = max(0, SMALL_SIDE - h), max(0, SMALL_SIDE - w)
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            rgb = np.pad(rgb, ((top, pad_h - top), (left, pad_w - left), (0, 0)), mode="edge")
        # Pad once for the whole image, so that every window sits on the model's patch grid exactly as a single
        # pass would (spandrel would otherwise pad each window on its own, at different places).
        padded = pad_to_multiple(rgb, m)
        if self.tiling is Tiling.INTERNAL:
            out = self._unsplittable(padded)
        else:
            # `run` (this upscaler's single-window runner unless someone wrapped it) sees one window at a time.
            runner = split_on_oom(self.run, self.scale, self.overlap, self.margin,
                                  smallest_tile(self.overlap, m), self._is_oom, m, self._on_split)
            out = run_blended(runner, padded, self.scale, self.window_side(), self.overlap,
                              self.margin, m)
        oy, ox = round(top * self.scale), round(left * self.scale)
        out = out[oy : oy + round(h * self.scale), ox : ox + round(w * self.scale)]
        # Every window is clamped to [0, 1] by spandrel and the cross-fade is a convex blend: no clip (and no
        # second full-size copy) needed.
        return out if out.flags.c_contiguous else np.ascontiguousarray(out)

    def window_side(self) -> int:
        """The window side: the rule's tile, else what memory allows now.

        A model whose tiling hint is DISCOURAGED is tiled only when memory demands it, whatever the rule says.
        """
        m = self.size.multiple_of
        floor = smallest_tile(self.overlap, m)
        if self.tile and self.tiling is Tiling.SUPPORTED:
            side = self.tile
        else:
            side = self.memory_tile()
        if self._tile_cap is not None:
            side = min(side, self._tile_cap)
        return max(floor, side)

    def memory_tile(self) -> int:
        """The largest window side whose activations fit the memory budget (free CUDA memory, or the CPU budget)."""
        torch = self._torch
        if self.device.startswith("cuda"):
            dev = torch.device(self.device)
            free, _total = torch.cuda.mem_get_info(dev)
            cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # reusable by torch
            budget = (free + cached) * CUDA_FREE_FRACTION
        else:
            budget = CPU_ACTIVATION_BUDGET
        side = int(math.sqrt(budget / max(self.bytes_per_px, 1.0)))
        m = self.size.multiple_of
        return max(m, min(MAX_TILE, side) // m * m)

    # --- one window on the device --------------------------------------------------------------------------------
    def _run_window(self, window: np.ndarray) -> np.ndarray:
        """The raw network on one window: float32 RGB (h, w, 3) in, float32 RGB (h*s, w*s, 3) out, no tiling."""
        torch = self._torch
        with self._lock, torch.inference_mode():
            # numpy's HWC layout is NHWC strides after the permute: channels_last costs no copy on the CPU.
            x = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1).unsqueeze(0)
            if self.descriptor.input_channels == 1:
                x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
            y = self._infer(x)
            y = y[0].permute(1, 2, 0)
            if y.shape[2] == 1:
                y = y.repeat(1, 1, 3)
            out = y.to("cpu", torch.float32).numpy()
        # A fp32 CPU result shares memory with the output tensor; the tiler scales it in place, which is fine, but a
        # read-only or broadcast view would not be.
        return out if out.flags.writeable else out.copy()

    def _infer(self, x: Any) -> Any:
        torch = self._torch
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x_dev = x.to(self.descriptor.device, self._dtype, memory_format=fmt)
        y = self._forward(x_dev)
        if y is not None:
            return y
        if self._dtype == torch.float32:
            raise NonFiniteOutputError(f"{self.model_id} gave NaN or Inf in fp32 on {self.device}; "
                                       "its weights are broken")
        # Reduced precision overflowed. Switch this model to fp32 for good (the same inputs would overflow again)
        # and redo the window; the job row records the fallback through `precision`. The weights come back from
        # the fp32 copy taken at load: casting the fp16 ones up would keep their rounding.
        self.descriptor.float()
        if self._fp32_state is not None:
            self.descriptor.model.load_state_dict(self._fp32_state)
            self._fp32_state = None
        self._dtype = torch.float32
        self.precision = f"{self.precision}->fp32"
        self.fallbacks += 1
        y = self._forward(x_dev.float())
        if y is None:
            raise NonFiniteOutputError(f"{self.model_id} gave NaN or Inf even in fp32 on {self.device}")
        return y

    def _forward(self, x: Any) -> Any | None:
        """The descriptor's call (pads to the size requirements, clamps to [0, 1]); None if the raw output was
        not finite. The check sits in a forward hook because spandrel's clamp turns Inf into a plausible 1.0."""
        self._nonfinite[0] = False
        y = self.descriptor(x)
        if self._nonfinite[0] or not bool(self._torch.isfinite(y).all()):
            return None
        return y

    def _check_finite(self, _module: Any, _args: Any, output: Any) -> None:
        if self._torch.is_tensor(output) and not bool(self._torch.isfinite(output).all()):
            self._nonfinite[0] = True


    def _unsplittable(self, img: np.ndarray) -> np.ndarray:
        """A model that tiles internally runs whole; running out of memory is the worker's to handle."""
        try:
            return self.run(img)
        except Exception as exc:  # noqa: BLE001 - filtered by _is_oom
            if not self._is_oom(exc):
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
        raise OutOfMemoryError(f"{self.model_id} ran out of memory on a {img.shape[1]}x{img.shape[0]} image on "
                          f"{self.device}, and it cannot be tiled from outside: {message}")


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
    torch, spandrel = _import_torch()
    threads = _configure_threads(torch)
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
        raise UnsupportedScaleError(f"{entry.id} is a x{descriptor.scale} model and cannot upscale x{scale:g} "
                                    "natively; "
                               f"set scale = {descriptor.scale} (and outscale for another final size)")
    # 2. Device and precision.
    device = resolve_device(ctx.device, torch)
    precision = choose_precision(ctx.precision, device, descriptor, entry.id, torch)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    fp32_state = None
    if dtype != torch.float32:  # a CPU copy of the exact weights, kept for the fp32 fallback
        fp32_state = {k: v.detach().to("cpu", copy=True) for k, v in descriptor.model.state_dict().items()}
    descriptor.to(torch.device(device)).eval()
    if dtype != torch.float32:
        descriptor.to(dtype)
    req = descriptor.size_requirements
    multiple = max(1, req.multiple_of)
    # 3. Measure: the memory one input pixel costs, and whether channels_last is faster here.
    probe_side = -(-max(PROBE_SIDE, req.minimum) // multiple) * multiple
    channels_last, timings = _choose_layout(descriptor, device, dtype, precision, probe_side, torch)
    descriptor.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    bpp = _bytes_per_pixel(descriptor, device, dtype, probe_side, channels_last, torch)
    return SpandrelUpscaler(
        model_id=entry.id,
        backend="spandrel",
        scale=float(descriptor.scale),
        device=device,
        precision=precision,
        tiling=Tiling[descriptor.tiling.name],  # same three hints, same names
        size=SizeRequirements(minimum=1, multiple_of=multiple),  # spandrel pads anything smaller than its minimum
        tile=ctx.tile,
        tile_pad=OVERLAP,
        arch=arch,
        threads=threads,
        channels_last=channels_last,
        layout_probe=timings,
        bytes_per_px=bpp,
        descriptor=descriptor,
        _torch=torch,
        _dtype=dtype,
        _fp32_state=fp32_state,
    )


def _import_torch() -> tuple[Any, Any]:
    try:
        import spandrel
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(f"the spandrel backend needs PyTorch and spandrel, and {exc.name or 'one'} "
                                      "is not "
                                 f"installed: {INSTALL_HINT}") from exc
    return torch, spandrel


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
        raise UnsafeWeightsError(f"{path} was refused by the weights-only unpickler, so nothing in it ran; it is not a "
                            f"plain state dict ({first})") from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise UnsafeWeightsError(f"{path} is a TorchScript archive, which is code, not weights; export its "
                                f"state_dict() to .safetensors or .pth") from None
        raise WeightsCorruptError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
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
        raise UnsupportedModelError(f"{path.name}: spandrel {spandrel.__version__} does not recognise this "
                                    "architecture "
                               f"({len(state)} tensors, first key {next(iter(state))!r})") from None
    except (KeyError, RuntimeError, ValueError, TypeError, AssertionError, AttributeError) as exc:
        raise UnsupportedModelError(f"{path.name}: spandrel recognised the keys but could not build the model: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise UnsupportedModelError(f"{path.name} is a {descriptor.architecture.name} model for {descriptor.purpose} "
                               f"({type(descriptor).__name__}); this backend runs super-resolution (SR) models only")
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels not in (1, 3):
        raise UnsupportedModelError(f"{path.name}: {descriptor.input_channels} input and {descriptor.output_channels} "
                               f"output channels; expected RGB (3) or grey (1)")
    return descriptor


def resolve_device(requested: str, torch: Any) -> str:
    """``auto`` -> ``cuda:<current>`` if CUDA is there, else ``cpu``; ``cuda`` -> ``cuda:<current>``.

    Raises:
        DeviceUnavailableError: a CUDA device that is not there, or a device name that is none of these.
    """
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" or (requested.startswith("cuda:") and requested[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {requested!r} was asked for, but PyTorch sees no CUDA GPU (torch "
                                    f"{torch.__version__}, CUDA {torch.version.cuda or 'not built'}); use cpu or auto")
        index = torch.cuda.current_device() if requested == "cuda" else int(requested[5:])
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailableError(f"device {requested!r} does not exist; this machine has {count} CUDA GPU(s), "
                                    f"cuda:0 to cuda:{count - 1}")
        return f"cuda:{index}"
    raise DeviceUnavailableError(f"unknown device {requested!r}; expected auto, cpu, cuda or cuda:N")


def choose_precision(requested: str, device: str, descriptor: Any, model_id: str, torch: Any) -> str:
    """``auto`` -> fp16 on CUDA where the model supports half, else fp32; explicit choices are checked.

    Raises:
        UnsupportedPrecisionError: an unknown name, or fp16/bf16 that the model or the GPU cannot run.
    """
    if requested not in PRECISIONS:
        raise UnsupportedPrecisionError(f"unknown precision {requested!r}; expected one of {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if requested == "auto":
        return "fp16" if cuda and descriptor.supports_half else "fp32"
    if requested == "fp16" and not descriptor.supports_half:
        raise UnsupportedPrecisionError(f"{model_id} ({descriptor.architecture.name}) does not support fp16; use fp32")
    if requested == "bf16":
        if not descriptor.supports_bfloat16:
            raise UnsupportedPrecisionError(f"{model_id} ({descriptor.architecture.name}) does not support bf16; "
                                            "use fp32")
        if cuda and not torch.cuda.is_bf16_supported():
            raise UnsupportedPrecisionError(f"{device} ({torch.cuda.get_device_name(device)}) has no bf16; use fp16")
    return requested


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers, CPUQuota=)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def _configure_threads(torch: Any) -> int:
    """Set torch's intra-op threads once per process to the CPUs we may really use.

    torch counts the machine's physical cores and ignores the affinity mask and cgroup quota, so in a container
    it oversubscribes and threads thrash. An explicit OMP_NUM_THREADS is the operator's choice and wins.
    """
    global _threads_set
    with _threads_lock:
        if not _threads_set and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(usable_cpus())
        _threads_set = True
    return torch.get_num_threads()


def _sync(device: str, torch: Any) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _choose_layout(descriptor: Any, device: str, dtype: Any, precision: str, side: int,
                   torch: Any) -> tuple[bool, dict[str, float]]:
    """Time the model on a probe in both memory layouts; keep channels_last only if clearly faster.

    Measured on this project's 2-core CPU at 256x256: SRVGG compact xsx4 0.52 s -> 0.39 s, DITN 2.25 s -> 1.40 s.
    The answer depends on the device and the kernels, so it is measured here rather than assumed, once per kind of
    model per process.
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
                _sync(device, torch)
                t0 = time.perf_counter()
                descriptor(xi)
                _sync(device, torch)
                if rnd:  # round 0 is the warm-up: kernel selection, allocator
                    timings[name] = min(timings[name], time.perf_counter() - t0)
    decision = (timings["channels_last"] <= CHANNELS_LAST_GAIN * timings["contiguous"], timings)
    _LAYOUT_DECISIONS[key] = decision
    return decision


def _bytes_per_pixel(descriptor: Any, device: str, dtype: Any, side: int, channels_last: bool, torch: Any) -> float:
    """Device memory one input pixel costs: measured on CUDA; on the CPU, estimated from the largest layer output.

    The CPU estimate takes four times the largest single activation (an input, an output and the temporaries of a
    block can be alive at once) plus the window's own input and output.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(1, descriptor.input_channels, side, side, device=torch.device(device), dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    with torch.inference_mode():
        if device.startswith("cuda"):
            dev = torch.device(device)
            _sync(device, torch)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            descriptor(x)
            _sync(device, torch)
            used = torch.cuda.max_memory_allocated(dev) - before
        else:
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
            used = 4 * largest[0] + x.numel() * x.element_size() + y.numel() * y.element_size()
    return max(1.0, used / (side * side))
