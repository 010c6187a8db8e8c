"""Devices, as the service sees them: resolved, checked at start-up, described for the build info and the gauges.

torch is imported only where a question needs it (a ``cuda`` device, ``auto``); without torch every model runs on
the CPU, and a GPU named in the configuration is not checked (the classical and OpenCV backends ignore it).
:func:`build_info` and :func:`memory_used` never import torch: ``daemon/`` asks them for its Prometheus gauges, and
a service without torch must not pay seconds and hundreds of MB for a gauge.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from models.errors import DeviceUnavailableError


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def resolve(device: str) -> str:
    """``auto`` -> ``cuda:<current>`` when torch sees a GPU, else ``cpu``; ``cuda`` -> ``cuda:<current>``; others as
    given once checked.

    Raises:
        DeviceUnavailableError: a GPU that torch does not see, or an unknown name (only checked where torch is
            installed).
    """
    if device == "cpu":
        return device
    if not torch_installed():
        return "cpu" if device == "auto" else device
    import torch

    from models.runtime import resolve_device

    return resolve_device(device, torch)


def check(devices: Iterable[str]) -> list[str]:
    """The GPUs among ``devices``, resolved; a node checks these at start-up so that no worker fails every job.

    Raises:
        DeviceUnavailableError: one of them is not there; the message names it and the GPUs torch sees.
    """
    gpus = [d for d in dict.fromkeys(devices) if d.startswith("cuda")]
    if not gpus or not torch_installed():
        return []
    return list(dict.fromkeys(resolve(d) for d in gpus))


def gpu_visible() -> bool:
    """Whether this process can see an NVIDIA GPU, from the device files alone (no torch import, which costs seconds
    and hundreds of MB): a ``/dev/nvidiaN`` exists and ``CUDA_VISIBLE_DEVICES`` does not hide them all."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    return torch_installed() and any(p.name[len("nvidia") :].isdigit() for p in Path("/dev").glob("nvidia*"))


def cpu_without_torch(device: str) -> bool:
    """Whether ``device`` runs on the CPU, judged without importing torch: ``cpu``, or ``auto`` with no GPU visible."""
    return device == "cpu" or (device == "auto" and not gpu_visible())


def resolve_auto(device: str) -> str:
    """``auto`` as this host runs it: ``cpu`` when no GPU is visible (told from the device files, without importing
    torch), else the GPU PyTorch picks (``cuda:0``), or ``cpu`` if PyTorch sees none after all; any other name as
    given."""
    if device != "auto":
        return device
    return "cpu" if cpu_without_torch(device) else resolve(device)


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


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _torch_version_file() -> tuple[str, str]:
    """(torch version, CUDA version) read from the installed ``torch/version.py`` without importing torch: it is a
    file of plain assignments (``__version__ = '2.14.1+cu130'``, ``cuda = '13.0'``); ("", "") without torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "", ""
    values: dict[str, str] = {}
    try:
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text())
    except (OSError, SyntaxError, StopIteration):
        return _version("torch"), ""
    for node in tree.body:
        target = (
            node.targets[0]
            if isinstance(node, ast.Assign) and len(node.targets) == 1
            else node.target
            if isinstance(node, ast.AnnAssign)
            else None
        )  # `cuda: Optional[str] = '13.0'`
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
            values[target.id] = value.value
    return str(values.get("__version__") or _version("torch")), str(values.get("cuda") or "")


def build_info() -> dict[str, str]:
    """Versions for a build-info gauge: ``torch`` ("" when not installed), ``cuda`` (the CUDA torch was built with, ""
    for a CPU build or no torch), ``opencv``. Imports neither torch nor cv2 when they are not imported yet: the
    versions come from torch's ``version.py`` and the installed packages' metadata."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch_version, cuda = str(torch.__version__), str(torch.version.cuda or "")
    else:
        torch_version, cuda = _torch_version_file()
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        opencv = str(cv2.__version__)
    else:  # the wheel's version adds its build number (4.14.0.94) to OpenCV's (4.14.0)
        wheel = _version("opencv-contrib-python") or _version("opencv-python-headless") or _version("opencv-python")
        opencv = ".".join(wheel.split(".")[:3])
    return {"torch": torch_version, "cuda": cuda, "opencv": opencv}


def memory_used() -> dict[str, int]:
    """Bytes torch has allocated on each visible CUDA device (``{"cuda:0": ...}``); {} when torch is not imported in
    this process or sees no GPU. Never imports torch, and never initialises CUDA where no model did."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "cuda") or not torch.cuda.is_initialized():
        return {}
    return {f"cuda:{i}": int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}


__all__ = [
    "DeviceUnavailableError",
    "build_info",
    "check",
    "cpu_without_torch",
    "memory_used",
    "resolve",
    "runs_on_cpu",
    "torch_installed",
]
