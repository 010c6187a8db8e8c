"""The torch runtime shared by the torch backends (spandrel, diffusion): one place for every device question.

- :func:`import_torch`: torch (and the backend's other packages), or a :class:`~models.errors.BackendUnavailableError`
  that names the pip extra to install, also for a torch below :data:`TORCH_FLOOR`;
- :func:`resolve_device`: ``auto``, ``cuda`` and ``cuda:N`` to the device a model really runs on;
- :func:`choose_precision`: ``auto`` to fp16 on CUDA where the model supports it, fp32 on the CPU, never bf16 by
  default; an explicit bf16 is checked against the compute capability of the *requested* GPU;
- :func:`configure_threads`: torch's intra-op threads from the CPUs this process may really use (affinity and cgroup
  quota);
- :func:`is_oom`: out-of-memory from torch, the CUDA caching allocator, cuBLAS, cuDNN or the host;
- :class:`Precision`: the one-way fp16/bf16 -> fp32 fallback after a non-finite output, switched only once the
  backend's fp32 model is in place;
- :func:`device_lock`: one lock per GPU, held while a window runs there and while memory is measured, so that
  several models and workers on one GPU never read each other's allocations as free memory, nor budget the same
  free memory twice;
- :class:`FiniteWatch`: NaN/Inf watching over a denoising loop without a host/GPU sync on every step.

Nothing here imports torch at import time: every function takes the ``torch`` module (from :func:`import_torch`) as an
argument, so that :mod:`models.devices` can answer questions without importing it.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from models.errors import (
    BackendUnavailableError,
    DeviceUnavailableError,
    NonFiniteOutputError,
    UnsupportedPrecisionError,
)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# Up to torch 2.5.1, torch.load(weights_only=True), the only way weights are unpickled here, could still be made to
# run code by a crafted file (CVE-2025-32434). The extras require 2.6, but an older torch installed otherwise would
# be used all the same: it is refused at load.
TORCH_FLOOR = (2, 6)
# Compute capability from which a GPU runs bf16 natively (Ampere). torch.cuda.is_bf16_supported() also says True on
# older GPUs (T4, V100) where bf16 is emulated, and it asks about the current device, not the one requested.
BF16_MIN_CAPABILITY = (8, 0)

# What out-of-memory looks like besides torch.OutOfMemoryError: the CPU allocator, and the CUDA libraries that
# allocate their own workspaces and report failure as a status code inside a RuntimeError.
OOM_MARKERS = (
    "out of memory",  # CUDA caching allocator, and "CUDA error: out of memory" from a kernel launch
    "can't allocate memory",  # torch's CPU allocator
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "CUFFT_ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
)


def install_hint(extra: str) -> str:
    """The command that installs a backend's packages."""
    return f"pip install 'upscaled[{extra}]'"


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: ``"2.5.1+cu121"`` -> (2, 5, 1), ``"2.6.0a0+git"`` ->
    (2, 6, 0), ``"2.10"`` -> (2, 10); () when it starts with no number."""
    release = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(p) for p in release.group().split(".")) if release else ()


def torch_too_old(version: str) -> str | None:
    """Why a torch of ``version`` is refused (below :data:`TORCH_FLOOR`, or a version that says nothing), or None."""
    have = version_tuple(version)
    if have and have >= TORCH_FLOOR:
        return None
    floor = ".".join(map(str, TORCH_FLOOR))
    return (
        f"torch {version} is installed, and upscaled needs torch {floor} or later: before {floor}, "
        "torch.load(weights_only=True), which reads every weight file here, could be made to run code by a "
        "crafted file (CVE-2025-32434)"
    )


def import_torch(backend: str, extra: str, *others: str) -> Any:
    """Import torch and ``others`` (the backend's other top-level packages, e.g. ``spandrel``); return torch.

    Raises:
        BackendUnavailableError: one of them is not installed, or torch is older than :data:`TORCH_FLOOR`; the
            message names what and the pip extra.
    """
    names = ("torch", *others)
    try:
        for name in names:
            importlib.import_module(name)
    except ImportError as exc:
        missing = exc.name or "one of them"
        raise BackendUnavailableError(
            f"the {backend} backend needs {', '.join(names)}, and {missing} is not installed: {install_hint(extra)}"
        ) from exc
    import torch

    old = torch_too_old(str(torch.__version__))
    if old:
        raise BackendUnavailableError(f"the {backend} backend cannot run: {old}; upgrade it: {install_hint(extra)}")
    return torch


# --- devices ------------------------------------------------------------------------------------------------------
def resolve_device(requested: str, torch: Any) -> str:
    """``auto`` -> ``cuda:<current>`` if CUDA is there, else ``cpu``; ``cuda`` -> ``cuda:<current>``; ``cuda:N`` and
    ``cpu`` as given, once checked.

    Raises:
        DeviceUnavailableError: a CUDA device that is not there (the message names the GPUs torch sees), or a name
            that is none of these.
    """
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" or (requested.startswith("cuda:") and requested[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {requested!r} was asked for, but PyTorch sees no CUDA GPU (torch "
                f"{torch.__version__}, CUDA {torch.version.cuda or 'not built'}); use cpu or "
                "auto"
            )
        index = torch.cuda.current_device() if requested == "cuda" else int(requested[5:])
        count = torch.cuda.device_count()
        if index >= count:
            seen = ", ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
            raise DeviceUnavailableError(
                f"device {requested!r} does not exist; PyTorch sees {count} CUDA GPU(s): {seen}"
            )
        return f"cuda:{index}"
    raise DeviceUnavailableError(f"unknown device {requested!r}; expected auto, cpu, cuda or cuda:N")


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def bf16_native(device: str, torch: Any) -> bool:
    """Whether ``device`` runs bf16 natively: compute capability 8.0 or later for a GPU (of *that* GPU, not the
    current one); the CPU computes bf16 correctly everywhere (slowly without AVX-512 BF16 or AMX)."""
    if not is_cuda(device):
        return True
    index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= BF16_MIN_CAPABILITY


def choose_precision(
    requested: str,
    device: str,
    torch: Any,
    *,
    model: str,
    supports_half: bool = True,
    supports_bf16: bool = True,
    half_on_cpu: bool = True,
) -> str:
    """The precision a model runs in on ``device`` (already resolved).

    ``auto`` is fp16 on CUDA when the model supports half precision, fp32 otherwise, and never bf16: bf16 keeps 8
    bits of mantissa, which costs about one 8-bit level on a decoded image. Explicit choices are checked.

    Raises:
        UnsupportedPrecisionError: an unknown name; fp16 or bf16 that the model does not support; fp16 on the CPU for
            a model whose CPU kernels lack it (``half_on_cpu`` False); bf16 on a GPU below compute capability 8.0.
    """
    if requested not in PRECISIONS:
        raise UnsupportedPrecisionError(f"unknown precision {requested!r}; expected one of {', '.join(PRECISIONS)}")
    cuda = is_cuda(device)
    if requested == "auto":
        return "fp16" if cuda and supports_half else "fp32"
    if requested == "fp16":
        if not supports_half:
            raise UnsupportedPrecisionError(f"{model} does not support fp16; use fp32")
        if not cuda and not half_on_cpu:
            raise UnsupportedPrecisionError(
                f"{model} cannot run fp16 on the CPU (many CPU kernels lack half precision); use fp32 or bf16"
            )
    if requested == "bf16":
        if not supports_bf16:
            raise UnsupportedPrecisionError(f"{model} does not support bf16; use fp32")
        if cuda and not bf16_native(device, torch):
            major, minor = torch.cuda.get_device_capability(int(device.split(":", 1)[1]))
            raise UnsupportedPrecisionError(
                f"{device} ({torch.cuda.get_device_name(device)}, compute capability "
                f"{major}.{minor}) has no native bf16 (needs 8.0 or later); use fp16"
            )
    return requested


def dtype_of(precision: str, torch: Any) -> Any:
    """The torch dtype of a resolved precision name (``fp32``, ``fp16``, ``bf16``)."""
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


# --- threads --------------------------------------------------------------------------------------------------------
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


_threads_lock = threading.Lock()
_threads_set = False


def configure_threads(torch: Any) -> int:
    """Set torch's intra-op threads once per process to the CPUs we may really use; return the count in force.

    torch counts the machine's cores and ignores the affinity mask and the cgroup quota, so in a container it
    oversubscribes and its threads thrash. An explicit ``OMP_NUM_THREADS`` is the operator's choice and wins.
    """
    global _threads_set
    with _threads_lock:
        if not _threads_set and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(usable_cpus())
        _threads_set = True
    return torch.get_num_threads()


def share_cpus(cpu_workers: int) -> int:
    """Give OpenCV ``usable_cpus() // cpu_workers`` threads per call (at least one) when ``cpu_workers`` inference
    threads share this process's CPUs; returns the count.

    OpenCV's threads spin while they wait for work: on a small image, two of them cost twice the CPU of one for
    about a third less time, CPU that the decode, encode and commits of the other jobs need. Workers that each run
    single-threaded use every core on different images instead (docs/performance.md).
    """
    import cv2

    n = max(1, usable_cpus() // max(1, cpu_workers))
    cv2.setNumThreads(n)
    return n


# --- memory -----------------------------------------------------------------------------------------------------------
def is_oom(exc: BaseException, torch: Any | None = None) -> bool:
    """True when ``exc`` means that host or device memory ran out.

    Covers ``MemoryError``, ``torch.OutOfMemoryError`` (the CUDA caching allocator), and the RuntimeErrors in which
    the CPU allocator, a failed kernel launch, cuBLAS, cuDNN or cuFFT report an allocation failure
    (``CUBLAS_STATUS_ALLOC_FAILED`` and the like, see :data:`OOM_MARKERS`).
    """
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(marker in text for marker in OOM_MARKERS)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_device_locks: dict[str, threading.RLock] = {}
_device_locks_guard = threading.Lock()


@contextmanager
def device_lock(device: str) -> Iterator[None]:
    """Hold ``device``'s lock (a GPU's; the CPU has none, a no-op there).

    Held by every window that runs on a GPU and by every memory measurement there: a measurement then never sees
    another model's transient allocations, and two models never each budget the same free memory for windows that
    would run at the same time. Re-entrant, so a window may measure inside it.
    """
    if not is_cuda(device):
        with nullcontext():
            yield
        return
    with _device_locks_guard:
        lock = _device_locks.setdefault(device, threading.RLock())
    with lock:
        yield


def free_memory(device: str, torch: Any) -> int:
    """Bytes a new allocation on ``device`` may use: free device memory plus what torch's cache holds unused.

    Call it under :func:`device_lock`, where no window of another model allocates at the same time.
    """
    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return int(free + max(0, cached))


def empty_cache(device: str, torch: Any) -> None:
    """Give torch's cached, unused blocks on ``device`` back, before a smaller retry or another load allocates."""
    if is_cuda(device):
        torch.cuda.empty_cache()


def sync(device: str, torch: Any) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


# --- precision and its fallback -------------------------------------------------------------------------------------
class Precision:
    """The precision a loaded model runs in, and its one-way fallback to fp32.

    ``label`` is what the job row records: the loaded precision (``fp16``), or ``fp16->fp32`` once a non-finite output
    forced the fallback. :meth:`fall_back` switches only once the backend's fp32 model is in place: if that fails
    (out of memory, say), the model stays as it was and keeps working, and the error goes to the caller.
    """

    def __init__(self, loaded: str, torch: Any) -> None:
        self.loaded = loaded
        self.current = loaded
        self.fallbacks = 0
        self._torch = torch

    @property
    def dtype(self) -> Any:
        return dtype_of(self.current, self._torch)

    @property
    def label(self) -> str:
        return self.loaded if self.current == self.loaded else f"{self.loaded}->{self.current}"

    @property
    def reduced(self) -> bool:
        return self.current != "fp32"

    def fall_back(self, model: str, device: str, install_fp32: Callable[[], None]) -> None:
        """Switch to fp32 for good after a non-finite output in reduced precision.

        ``install_fp32`` puts the fp32 model in place (from the exact fp32 weights: casting fp16 ones up would keep
        their rounding); the precision changes only once it returned.

        Raises:
            NonFiniteOutputError: the model already runs fp32: its weights are broken, and retrying cannot help.
            Whatever ``install_fp32`` raises; nothing has changed then.
        """
        if not self.reduced:
            raise NonFiniteOutputError(
                f"{model} gave NaN, Inf or a black image in fp32 on {device}; its weights are broken"
            )
        install_fp32()
        self.current = "fp32"
        self.fallbacks += 1


class FiniteWatch:
    """Watch a sequence of tensors (a denoising loop's latents) for NaN or Inf without stalling the GPU.

    On the CPU each check is immediate. On CUDA, :meth:`check` queues the reduction and a non-blocking copy of its
    result into pinned host memory, and reads only the results whose copies have already completed: the loop never
    waits for the GPU, and a NaN is seen a step or two late. :meth:`finish` waits for the rest.
    """

    def __init__(self, device: str, torch: Any, slots: int = 8) -> None:
        self._torch = torch
        self._cuda = is_cuda(device)
        self._pending: deque[tuple[Any, Any]] = deque()
        self._free: list[Any] = []
        if self._cuda:
            self._free = [torch.empty((), dtype=torch.bool, pin_memory=True) for _ in range(slots)]

    def check(self, tensor: Any) -> bool:
        """False once a finished check found NaN or Inf (on CUDA possibly one from an earlier call)."""
        torch = self._torch
        ok = torch.isfinite(tensor).all()
        if not self._cuda:
            return bool(ok)
        if not self._free:  # every slot in flight: wait for the oldest, which frees one
            if not self._collect(block=True):
                return False
        host = self._free.pop()
        host.copy_(ok, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host))
        return self._collect(block=False)

    def finish(self) -> bool:
        """Wait for every queued check; False if any found NaN or Inf."""
        return self._collect(block=True, drain=True) if self._cuda else True

    def _collect(self, block: bool, drain: bool = False) -> bool:
        ok = True
        first = True
        while self._pending:
            event, host = self._pending[0]
            if not event.query():
                if not (block and (first or drain)):
                    break
                event.synchronize()
            self._pending.popleft()
            ok = ok and bool(host.item())
            self._free.append(host)
            first = False
        return ok
