"""The backend registry and the per-process model cache.

Backends register in one visible list (:data:`BACKEND_MODULES`). A backend is a module with a
``load(entry, scale, ctx) -> Upscaler`` function; its heavy imports happen inside ``load``, so that listing models
or checking a configuration never imports torch. Loaded upscalers are cached per (model, scale, device, tile).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.catalog import (
    ModelEntry,
    get_entry,
    is_diffusers_model,
    is_file_model,
    resolve_diffusers_folder,
    resolve_model_file,
)
from models.errors import RegistryError, UnsupportedScaleError

if TYPE_CHECKING:
    from models.base import Upscaler

# name -> module implementing load(). The one list of what is registered.
BACKEND_MODULES: dict[str, str] = {
    "classical": "models.classical",
    "opencv": "models.opencv_sr",
    "spandrel": "models.spandrel_sr",
    "diffusion": "models.diffusion_sd",
}


@dataclass(frozen=True)
class LoadContext:
    weights_dir: Path
    device: str = "cpu"  # "auto", "cpu", "cuda" or "cuda:N"; a backend resolves "auto" and records what it used
    tile: int | None = None  # input tile side; None lets the backend choose
    precision: str = "auto"  # "auto", "fp32", "fp16" or "bf16"; backends without a choice run their own


LoadFn = Callable[[ModelEntry, float, LoadContext], "Upscaler"]


class Registry:
    """A strict name -> backend map: unknown and duplicate names raise, a failed add changes nothing."""

    def __init__(self, modules: dict[str, str]) -> None:
        self._modules: dict[str, str] = {}
        for name, module in modules.items():
            self.add(name, module)

    def add(self, name: str, module: str) -> None:
        if name in self._modules:
            raise RegistryError(f"backend {name!r} is already registered (by {self._modules[name]})")
        self._modules[name] = module

    def names(self) -> list[str]:
        return list(self._modules)

    def loader(self, name: str) -> LoadFn:
        try:
            module = self._modules[name]
        except KeyError:
            raise RegistryError(f"no backend named {name!r}; registered: {', '.join(self._modules)}") from None
        return importlib.import_module(module).load


REGISTRY = Registry(BACKEND_MODULES)


def check_scale(model_id: str, scale: float, weights_dir: Path | None = None) -> ModelEntry:
    """The entry for ``model_id`` if it can give ``scale`` natively.

    A ``file:PATH`` model must name an existing file (absolute, or relative to the current folder or to
    ``weights_dir`` when given); its scale is only known once it is loaded, so the backend checks that. A
    ``diffusers:FOLDER`` model must name a folder holding a ``model_index.json``, found the same way.

    Raises:
        UnknownModelError: no such model.
        UnsupportedScaleError: the model has no weights for that scale; the message lists the ones it has.
        WeightsMissingError: a ``file:`` model whose file does not exist, or a ``diffusers:`` model whose folder
            does not.
    """
    entry = get_entry(model_id)
    if is_file_model(model_id):
        resolve_model_file(model_id, weights_dir)
    if is_diffusers_model(model_id):
        resolve_diffusers_folder(model_id, weights_dir)
    if not entry.supports(scale):
        have = ", ".join(f"x{s}" for s in entry.scales) if isinstance(entry.scales, tuple) else "any"
        raise UnsupportedScaleError(f"{model_id} cannot upscale x{scale:g}; it has {have}")
    return entry


class ModelCache:
    """Loads each (model, scale, device, tile) once per process and hands out the same :class:`Upscaler`.

    Safe for several worker threads: a model is loaded once even when two workers ask for it together, and a
    long load (a diffusion pipeline) holds up only the workers that wait for that model, not the others.
    """

    def __init__(self, registry: Registry = REGISTRY) -> None:
        self._registry = registry
        self._loaded: dict[tuple, Upscaler] = {}
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()  # guards the two dicts, never held while loading

    def get(self, model_id: str, scale: float, ctx: LoadContext) -> tuple[Upscaler, bool]:
        """Return (upscaler, loaded_now)."""
        key = (model_id, float(scale), ctx)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key], False
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._loaded:  # another worker loaded it while we waited
                    return self._loaded[key], False
            entry = check_scale(model_id, scale, ctx.weights_dir)
            up = self._registry.loader(entry.backend)(entry, float(scale), ctx)
            with self._lock:
                self._loaded[key] = up
                self._loading.pop(key, None)
            return up, True

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()
