"""The backend registry and the per-process model cache.

The backends are :class:`~models.backends.Backend` objects in one visible list (:data:`models.backends.BACKENDS`);
:data:`REGISTRY` is that list behind a strict name -> backend map. A backend's heavy imports happen inside its
``load``, so that listing models or checking a configuration never imports torch. Loaded upscalers are cached per
(model, scale, device, tile, precision).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.backends import BACKENDS, Backend
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


@dataclass(frozen=True)
class LoadContext:
    weights_dir: Path
    device: str = "cpu"  # "auto", "cpu", "cuda" or "cuda:N"; a backend resolves "auto" and records what it used
    tile: int | None = None  # input tile side; None lets the backend choose
    precision: str = "auto"  # "auto", "fp32", "fp16" or "bf16"; backends without a choice run their own


class Registry:
    """A strict name -> :class:`Backend` map: unknown and duplicate names raise, a failed add changes nothing."""

    def __init__(self, backends: Iterable[Backend]) -> None:
        self._backends: dict[str, Backend] = {}
        for backend in backends:
            self.add(backend)

    def add(self, backend: Backend) -> None:
        if backend.id in self._backends:
            taken = self._backends[backend.id]
            raise RegistryError(f"backend {backend.id!r} is already registered (by {taken.module})")
        self._backends[backend.id] = backend

    def names(self) -> list[str]:
        return list(self._backends)

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise RegistryError(f"no backend named {name!r}; registered: {', '.join(self._backends)}") from None


REGISTRY = Registry(BACKENDS)


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
            up = self._registry.get(entry.backend).load(entry, float(scale), ctx)
            with self._lock:
                self._loaded[key] = up
                self._loading.pop(key, None)
            return up, True

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()
