"""The backend registry and the per-process model cache.

The backends are :class:`~models.backends.Backend` objects in one visible list (:data:`models.backends.BACKENDS`);
:data:`REGISTRY` is that list behind a strict name -> backend map. A backend's heavy imports happen inside its
``load``, so that listing models or checking a configuration never imports torch. Loaded models are cached per
(model, scale, resolved device, precision), and handed out per rule tile as views that share them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models import omdb
from models.backends import BACKENDS, Backend
from models.catalog import (
    ModelEntry,
    get_entry,
    is_diffusers_model,
    is_file_model,
    is_omdb_model,
    resolve_diffusers_folder,
    resolve_model_file,
)
from models.errors import RegistryError, UnsupportedScaleError

if TYPE_CHECKING:
    from models.base import Upscaler


@dataclass(frozen=True)
class LoadContext:
    """Where and how to load a model: the weights folder, the device, the rule's tile and the precision."""

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
    ``diffusers:FOLDER`` model must name a folder holding a ``model_index.json``, found the same way. An
    ``omdb:<id>`` model is read from the OpenModelDB index cached in ``weights_dir`` when given (its scale is the
    entry's); without ``weights_dir`` only its id is checked.

    Raises:
        UnknownModelError: no such model (or no such entry in the cached index).
        UnsupportedScaleError: the model has no weights for that scale; the message lists the ones it has.
        WeightsMissingError: a ``file:`` model whose file does not exist, a ``diffusers:`` model whose folder
            does not, or an ``omdb:`` model and no cached index.
        WeightsCorruptError, UnsupportedModelError: an ``omdb:`` entry that cannot be used (see
            :func:`models.omdb.resolve`).
    """
    entry = get_entry(model_id)
    if is_omdb_model(model_id) and weights_dir is not None:
        entry = omdb.resolve(model_id, weights_dir)
    if is_file_model(model_id):
        resolve_model_file(model_id, weights_dir)
    if is_diffusers_model(model_id):
        resolve_diffusers_folder(model_id, weights_dir)
    if not entry.supports(scale):
        have = ", ".join(f"x{s}" for s in entry.scales) if isinstance(entry.scales, tuple) else "any"
        raise UnsupportedScaleError(f"{model_id} cannot upscale x{scale:g}; it has {have}")
    return entry


class ModelCache:
    """Loads each model once per process and hands out the same :class:`~models.base.Upscaler`.

    A model is loaded once per (model, scale, resolved device, precision): ``auto``, ``cuda`` and ``cuda:0`` name one
    GPU and share one copy. The rule's ``tile`` is not part of that: rules that differ only in ``tile`` get views of the
    same loaded model (:meth:`~models.base.Upscaler.with_tile`), and backends that ignore ``tile`` (classical filters)
    get the same upscaler.

    Safe for several worker threads: a model is loaded once even when two workers ask for it together, and a long
    load (a diffusion pipeline) holds up only the workers that wait for that model, not the others.
    """

    def __init__(self, registry: Registry = REGISTRY) -> None:
        self._registry = registry
        self._models: dict[tuple, Upscaler] = {}  # (model, scale, device, precision) -> the loaded model
        self._views: dict[tuple, Upscaler] = {}  # ... + (tile,) -> the upscaler handed out
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()  # guards the dicts, never held while loading

    def key(self, model_id: str, scale: float, ctx: LoadContext) -> tuple:
        """(model, scale, device, precision, tile) as this cache keys it: the device resolved where the backend runs on
        torch, ``tile`` left out (None) for backends that do not tile by it.

        Raises:
            UnknownModelError: no such model.
            DeviceUnavailableError: a GPU that torch does not see.
        """
        backend = self._registry.get(get_entry(model_id).backend)
        device = backend.device_for(ctx.device)
        return model_id, float(scale), device, ctx.precision, ctx.tile if backend.uses_tile else None

    def get(self, model_id: str, scale: float, ctx: LoadContext) -> tuple[Upscaler, bool]:
        """Return (upscaler, loaded_now) for ``model_id`` at native ``scale`` on ``ctx.device``.

        Raises:
            UnknownModelError, UnsupportedScaleError, WeightsMissingError: see :func:`check_scale`.
            DeviceUnavailableError: the device is not there.
            ModelError subclasses: as the backend's ``load`` documents.
        """
        key = self.key(model_id, scale, ctx)
        base = key[:4]
        with self._lock:
            if key in self._views:
                return self._views[key], False
            key_lock = self._loading.setdefault(base, threading.Lock())
        loaded_now = False
        with key_lock:
            with self._lock:
                model = self._models.get(base)  # another worker may have loaded it while we waited
            if model is None:
                entry = check_scale(model_id, scale, ctx.weights_dir)
                load_ctx = LoadContext(ctx.weights_dir, key[2], None, ctx.precision)
                model = self._registry.get(entry.backend).load(entry, float(scale), load_ctx)
                loaded_now = True
            view = model.with_tile(key[4])
            with self._lock:
                self._models[base] = model
                self._views.setdefault(key, view)
                self._loading.pop(base, None)
                return self._views[key], loaded_now

    def loaded(self) -> list[Upscaler]:
        """The models loaded so far, one per (model, scale, device, precision)."""
        with self._lock:
            return list(self._models.values())

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._views.clear()
