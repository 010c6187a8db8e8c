"""The torch runtime (models/runtime.py): precision choice, out-of-memory detection, the fp32 fallback, threads.

Where a question is about a GPU (compute capability of cuda:1, cuBLAS running out of memory), a small stand-in object
plays the GPU and says so in its name; everything else runs on the real torch.
"""

from __future__ import annotations

import threading

import pytest

from models.errors import (
    BackendUnavailableError,
    DeviceUnavailableError,
    NonFiniteOutputError,
    UnsupportedPrecisionError,
)
from models.runtime import (
    PRECISIONS,
    FiniteWatch,
    Precision,
    choose_precision,
    device_lock,
    import_torch,
    is_oom,
    resolve_device,
    usable_cpus,
)

torch = pytest.importorskip("torch")


class TwoGpuStandIn:
    """Stands in for torch on a machine with two GPUs (there is none here): cuda:0 an Ampere (8.0), cuda:1 a T4
    (7.5), and cuda:0 current. Only what the runtime asks is answered."""

    __version__ = "stand-in"
    float32, float16, bfloat16 = torch.float32, torch.float16, torch.bfloat16

    class version:
        cuda = "12.4"

    class cuda:
        capabilities = {0: (8, 0), 1: (7, 5)}

        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def current_device() -> int:
            return 0

        @staticmethod
        def device_count() -> int:
            return 2

        @staticmethod
        def get_device_capability(index: int) -> tuple[int, int]:
            return TwoGpuStandIn.cuda.capabilities[index]

        @staticmethod
        def get_device_name(index) -> str:
            i = int(str(index).rsplit(":", 1)[-1])
            return {0: "A100 (stand-in)", 1: "T4 (stand-in)"}[i]

        @staticmethod
        def is_bf16_supported() -> bool:  # what torch says for emulated bf16 too: the runtime must not ask it
            raise AssertionError("is_bf16_supported() asks about the current device and counts emulation")


def test_auto_is_fp16_on_cuda_fp32_on_the_cpu_and_never_bf16():
    for device, half, want in [("cpu", True, "fp32"), ("cuda:0", True, "fp16"), ("cuda:0", False, "fp32")]:
        assert choose_precision("auto", device, TwoGpuStandIn, model="m", supports_half=half) == want
    assert "bf16" not in {choose_precision("auto", d, TwoGpuStandIn, model="m") for d in ("cpu", "cuda:0", "cuda:1")}


def test_issue_17_item_5_bf16_is_checked_on_the_requested_gpu_by_compute_capability():
    """Stand-in for two GPUs: bf16 is native on the current cuda:0 (8.0), emulated on cuda:1 (7.5)."""
    assert choose_precision("bf16", "cuda:0", TwoGpuStandIn, model="m") == "bf16"
    with pytest.raises(
        UnsupportedPrecisionError, match=r"cuda:1 \(T4 \(stand-in\), compute capability 7\.5\).*use fp16"
    ):
        choose_precision("bf16", "cuda:1", TwoGpuStandIn, model="m")


def test_explicit_precisions_are_checked_against_the_model_and_the_device():
    with pytest.raises(UnsupportedPrecisionError, match="unknown precision 'fp8'; expected one of auto, fp32"):
        choose_precision("fp8", "cpu", torch, model="m")
    with pytest.raises(UnsupportedPrecisionError, match="m does not support fp16"):
        choose_precision("fp16", "cpu", torch, model="m", supports_half=False)
    with pytest.raises(UnsupportedPrecisionError, match="cannot run fp16 on the CPU"):
        choose_precision("fp16", "cpu", torch, model="m", half_on_cpu=False)
    with pytest.raises(UnsupportedPrecisionError, match="does not support bf16"):
        choose_precision("bf16", "cpu", torch, model="m", supports_bf16=False)
    assert choose_precision("bf16", "cpu", torch, model="m") == "bf16"
    assert PRECISIONS == ("auto", "fp32", "fp16", "bf16")


def test_devices_resolve_or_say_what_torch_sees():
    assert resolve_device("cpu", torch) == "cpu"
    assert resolve_device("auto", TwoGpuStandIn) == "cuda:0" and resolve_device("cuda", TwoGpuStandIn) == "cuda:0"
    assert resolve_device("cuda:1", TwoGpuStandIn) == "cuda:1"
    with pytest.raises(
        DeviceUnavailableError,
        match=r"'cuda:2' does not exist; PyTorch sees 2 CUDA GPU\(s\): "
        r"cuda:0 \(A100 \(stand-in\)\), cuda:1",
    ):
        resolve_device("cuda:2", TwoGpuStandIn)
    with pytest.raises(DeviceUnavailableError, match="unknown device 'gpu'; expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu", torch)
    if not torch.cuda.is_available():
        assert resolve_device("auto", torch) == "cpu"
        with pytest.raises(DeviceUnavailableError, match="PyTorch sees no CUDA GPU"):
            resolve_device("cuda:0", torch)


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "CUDA error: out of memory",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1",
    ],
)
def test_issue_17_item_12_out_of_memory_includes_cublas_and_cudnn_allocation_failures(message):
    """The messages are the libraries' own (stand-ins for a GPU that ran out: none here)."""
    assert is_oom(RuntimeError(message), torch)
    assert is_oom(
        torch.AcceleratorError(message) if hasattr(torch, "AcceleratorError") else RuntimeError(message), torch
    )


def test_oom_types_and_what_is_not_oom():
    assert is_oom(MemoryError(), None) and is_oom(torch.OutOfMemoryError("x"), torch)
    assert not is_oom(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"), torch)
    assert not is_oom(ValueError("out of memory"), torch)  # not an error torch raises for memory
    assert not is_oom(RuntimeError("shape mismatch"), torch)


def test_issue_17_item_3_a_failed_fallback_changes_nothing_and_a_later_one_succeeds():
    precision = Precision("fp16", torch)
    installed = []

    def failing() -> None:
        raise MemoryError("no room for the fp32 copy")

    with pytest.raises(MemoryError):
        precision.fall_back("m", "cuda:0", failing)
    assert (precision.current, precision.label, precision.fallbacks) == ("fp16", "fp16", 0)
    assert precision.dtype == torch.float16
    precision.fall_back("m", "cuda:0", lambda: installed.append(1))
    assert (precision.label, precision.fallbacks, installed, precision.dtype) == ("fp16->fp32", 1, [1], torch.float32)
    with pytest.raises(NonFiniteOutputError, match="in fp32 on cuda:0; its weights are broken"):
        precision.fall_back("m", "cuda:0", lambda: installed.append(2))
    assert installed == [1]


def test_finite_watch_on_the_cpu_sees_nan_at_once():
    watch = FiniteWatch("cpu", torch)
    assert watch.check(torch.ones(4)) and watch.finish()
    assert not watch.check(torch.tensor([1.0, float("nan")]))
    assert not watch.check(torch.tensor([float("inf")]))


def test_a_gpu_lock_is_one_per_device_and_reentrant_and_the_cpu_has_none():
    from models import runtime

    got: dict[str, bool] = {}

    def try_from_another_thread(device: str) -> None:
        lock = runtime._device_locks[device]
        got[device] = lock.acquire(blocking=False)
        if got[device]:
            lock.release()

    with device_lock("cuda:0"), device_lock("cuda:0"):  # re-entrant: a window may measure inside it
        with device_lock("cuda:1"):
            pass
        for device in ("cuda:0", "cuda:1"):
            t = threading.Thread(target=try_from_another_thread, args=(device,))
            t.start()
            t.join()
    assert got == {"cuda:0": False, "cuda:1": True}  # cuda:0 held by this thread, cuda:1 free
    with device_lock("cpu"):  # no lock at all on the CPU
        assert "cpu" not in runtime._device_locks


def test_threads_and_missing_packages():
    assert 1 <= usable_cpus() <= (len(__import__("os").sched_getaffinity(0)))
    assert import_torch("spandrel", "gan") is torch
    with pytest.raises(
        BackendUnavailableError,
        match=r"needs torch, no_such_package_here, and "
        r"no_such_package_here is not installed: "
        r"pip install 'upscaled\[gan\]'",
    ):
        import_torch("spandrel", "gan", "no_such_package_here")
