"""Devices, as the service sees them: resolved, checked at start-up, described for the build info.

torch is imported only where a question needs it (a ``cuda`` device, ``auto``); without torch every model runs on
the CPU, and a GPU named in the configuration is not checked (the classical and OpenCV backends ignore it).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable

from models.errors import DeviceUnavailableError


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def resolve(device: str) -> str:
    """``auto`` -> ``cuda:0`` when torch sees a GPU, else ``cpu``; ``cuda`` -> ``cuda:0``; others as given.

    Raises:
        DeviceUnavailableError: a GPU that torch does not see (only checked where torch is installed).
    """
    if device == "cpu":
        return device
    if not torch_installed():
        return "cpu" if device == "auto" else device
    import torch

    from models.spandrel_sr import resolve_device

    return resolve_device(device, torch)


def check(devices: Iterable[str]) -> list[str]:
    """The GPUs among ``devices``, resolved; a node checks these at start-up so that no worker fails every job.

    Raises:
        DeviceUnavailableError: one of them is not there; the message names it and the GPUs torch sees.
    """
    gpus = [d for d in dict.fromkeys(devices) if d.startswith("cuda")]
    if not gpus or not torch_installed():
        return []
    return [resolve(d) for d in gpus]


def runs_on_cpu(device: str) -> bool:
    """Whether a torch model on ``device`` would run on the CPU (``auto`` without a GPU, or no torch at all)."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    if not torch_installed():
        return True
    import torch

    return not torch.cuda.is_available()


__all__ = ["DeviceUnavailableError", "check", "resolve", "runs_on_cpu", "torch_installed"]


def build_info() -> dict[str, str]:
    """Versions for ``upscaled_build_info``: torch and its CUDA ("" where not installed), and OpenCV. Reads package
    metadata: torch is not imported for it."""
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return ""

    torch = version("torch")
    cuda = ""
    if "torch" in sys.modules:  # already imported by a backend: ask it, for free
        cuda = sys.modules["torch"].version.cuda or ""
    return {"torch": torch, "cuda": cuda, "opencv": version("opencv-contrib-python")}


def memory_used() -> dict[str, int]:
    """Bytes allocated by torch on each visible CUDA device; {} when torch is not imported or sees no GPU. Never
    imports torch."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}
