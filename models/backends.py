"""The backends: one object per model family, in one visible list (:data:`BACKENDS`).

A :class:`Backend` says everything the service needs to know about a family before anything heavy is imported:

- its ``id`` and the pip ``extra`` that installs its packages, and :meth:`Backend.available` (None, or what is
  missing and the command that installs it);
- ``params``: the pydantic schema of the rule parameters it takes (a rule's ``[rules.params]`` table), checked when
  the configuration is read;
- :meth:`Backend.native_scale`: the scale its weights run at for a rule;
- :meth:`Backend.load`: the model, as an :class:`~models.base.Upscaler` (the module with the heavy imports is
  imported here, not before);
- :meth:`Backend.warnings`: what an operator should hear at start-up about a rule (diffusion on a CPU, say);
- :meth:`Backend.device_for`: the device a rule's ``device`` really means for this family (torch backends resolve
  ``auto`` and ``cuda`` to ``cuda:N`` or ``cpu``; the classical filters always run on the CPU), which the model cache
  keys on; and ``uses_tile``, whether the rule's ``tile`` changes anything.

Every :class:`~models.base.Upscaler` is then called the same way: ``up(pixels, params)``, with ``pixels`` uint8 or
float32 RGB of shape (H, W, 3) and ``params`` an instance of the backend's ``params`` schema (or None for its
defaults); the result has the input's dtype. To add a backend (ONNX, face restoration): write a module with a
``load(entry, scale, ctx)`` function that returns an :class:`~models.base.Upscaler` subclass, give it a ``Backend``
entry below (with its params schema and start-up warnings, if it has any) and catalogue entries in
:mod:`models.catalog`. See docs/models.md.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from models.base import NoParams
from models.errors import BackendUnavailableError

if TYPE_CHECKING:
    from models.base import Upscaler
    from models.catalog import ModelEntry
    from models.registry import LoadContext

# Diffusion generation defaults. 25 steps, not the pipeline's 75: with the DDIM scheduler the model ships with, the
# image is essentially settled after 20-30 steps, and a daemon pays for every step of every tile. guidance 9.0 and
# noise level 20 are the pipeline's own defaults.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 9.0
DEFAULT_NOISE_LEVEL = 20
MAX_NOISE_LEVEL = 350  # the real model's max_noise_level; a saved pipeline may declare another, checked per call
MAX_STEPS = 1000  # the schedulers' training timesteps


class DiffusionParams(BaseModel):
    """What a diffusion model generates with; every field changes the output, so all are in the fingerprint.

    A ``<image>.prompt.txt`` beside an input replaces ``prompt`` for that image. ``guidance_scale`` above 1 turns on
    classifier-free guidance (two UNet passes per step).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(
        default="",
        max_length=2000,
        description="What the image shows (the text encoder reads "
        "the first 77 tokens); a `<image>.prompt.txt` beside an input replaces it.",
    )
    negative_prompt: str = Field(default="", max_length=2000, description="What to steer away from.")
    num_inference_steps: int = Field(
        default=DEFAULT_STEPS,
        ge=1,
        le=MAX_STEPS,
        description="Denoising steps per tile (25: the image settles after 20-30 with the model's DDIM scheduler).",
    )
    guidance_scale: float = Field(
        default=DEFAULT_GUIDANCE,
        ge=0,
        le=50,
        description="Classifier-free guidance; above 1 it costs two UNet passes per step.",
    )
    noise_level: int = Field(
        default=DEFAULT_NOISE_LEVEL,
        ge=0,
        le=MAX_NOISE_LEVEL,
        description="Noise added to the low-resolution input (more: more invented detail).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**63 - 1,
        description="The noise's seed: same input and rule, same bytes on the same device.",
    )


Warn = Callable[["ModelEntry", BaseModel, str], list[str]]


def cpu_only(_device: str) -> str:
    """Backends that always run on the CPU (the classical filters)."""
    return "cpu"


def opencv_device(device: str) -> str:
    """OpenCV's dnn runs on CUDA only in a custom CUDA build, and only when a rule names ``cuda``."""
    if not device.startswith("cuda"):
        return "cpu"
    import cv2

    if cv2.cuda.getCudaEnabledDeviceCount() == 0:
        return "cpu"
    return device if ":" in device else "cuda:0"


def torch_device(device: str) -> str:
    """Torch backends: ``auto`` and ``cuda`` resolved to ``cuda:N`` or ``cpu`` (imports torch only for those).

    Raises:
        DeviceUnavailableError: a GPU that torch does not see.
    """
    from models.devices import resolve

    return resolve(device)


def diffusion_warnings(_entry: ModelEntry, params: BaseModel, device: str) -> list[str]:
    """Diffusion on a CPU works, but slowly enough that the operator must hear it at start-up."""
    from models.devices import runs_on_cpu

    if not runs_on_cpu(device):
        return []
    steps = getattr(params, "num_inference_steps", DEFAULT_STEPS)
    return [
        f"diffusion on the CPU ({device}) runs {steps} denoising steps of a large UNet for every 128 px tile, "
        'which takes minutes per tile; diffusion is a GPU rule: set device = "cuda" on a machine with a GPU, '
        "or use a GAN model on the CPU"
    ]


@dataclass(frozen=True)
class Backend:
    """One model family. See the module docstring for the contract."""

    id: str
    module: str  # the module whose load() builds an Upscaler; imported on the first load only
    extra: str | None  # the pip extra that installs its packages (None: part of the core install)
    requires: tuple[str, ...] = ()  # the top-level import names it needs, checked by available()
    params: type[BaseModel] = NoParams
    any_scale: bool = False  # resampling filters: the native scale is the rule's final scale
    takes_prompt: bool = False  # reads a `<image>.prompt.txt` sidecar into params.prompt
    chainable: bool = True  # can take its own output as input (a x16 target with a x4 model: two passes)
    uses_tile: bool = True  # whether the rule's `tile` changes what it does
    resolve_device: Callable[[str], str] = torch_device
    warn: Warn | None = None  # start-up warnings for a rule (None: never anything to say)

    def available(self) -> str | None:
        """None when the backend's packages are installed, else what is missing and how to install it.

        Looks the packages up without importing them (importing torch takes seconds).
        """
        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if not missing:
            return None
        hint = f"pip install 'upscaled[{self.extra}]'" if self.extra else "reinstall upscaled"
        return f"the {self.id} backend needs {', '.join(missing)}, which is not installed: {hint}"

    def native_scale(self, scale: float, final_scale: float) -> float:
        """The scale the weights run at, for a rule with ``scale`` (the native scale it names) and ``final_scale``
        (after ``outscale``): resampling filters go straight to the final scale, networks run at their own."""
        return final_scale if self.any_scale else scale

    def parse_params(self, raw: dict[str, Any] | BaseModel | None) -> BaseModel:
        """``raw`` (a rule's ``[rules.params]`` table) checked against :attr:`params`.

        Raises:
            pydantic.ValidationError: an unknown key or a value out of range (the config loader names the rule).
        """
        if isinstance(raw, self.params):
            return raw
        return self.params.model_validate(raw or {})

    def device_for(self, device: str) -> str:
        """The device a rule's ``device`` means for this backend, as the model cache keys it.

        Raises:
            DeviceUnavailableError: a GPU that is not there (torch backends, where torch is installed).
        """
        if self.requires and self.available() is not None:
            return device  # not installed: the load says so, with the install command
        return self.resolve_device(device)

    def load(self, entry: ModelEntry, scale: float, ctx: LoadContext) -> Upscaler:
        """Load ``entry`` at native ``scale``; the backend module is imported now.

        Raises:
            BackendUnavailableError: the backend's packages are not installed.
            ModelError subclasses: as the backend's own ``load`` documents.
        """
        problem = self.available()
        if problem is not None:
            raise BackendUnavailableError(problem)
        return importlib.import_module(self.module).load(entry, scale, ctx)

    def warnings(self, entry: ModelEntry, params: BaseModel, device: str) -> list[str]:
        """What an operator should know at start-up about a rule of this backend on ``device`` (empty: nothing).

        Never imports the backend's heavy packages (only torch, to resolve ``auto``, for a backend that warns).
        """
        return self.warn(entry, params, device) if self.warn is not None else []


# The one list of what is registered.
BACKENDS: tuple[Backend, ...] = (
    Backend("classical", "models.classical", None, any_scale=True, uses_tile=False, resolve_device=cpu_only),
    Backend("opencv", "models.opencv_sr", None, requires=("cv2",), resolve_device=opencv_device),
    Backend("spandrel", "models.spandrel_sr", "gan", requires=("torch", "spandrel")),
    Backend(
        "diffusion",
        "models.diffusion_sd",
        "diffusion",
        requires=("torch", "diffusers", "transformers"),
        params=DiffusionParams,
        takes_prompt=True,
        chainable=False,
        warn=diffusion_warnings,
    ),
)


def get_backend(backend_id: str) -> Backend:
    """The backend named ``backend_id``.

    Raises:
        RegistryError: no such backend; the message lists the registered ones.
    """
    from models.registry import REGISTRY

    return REGISTRY.get(backend_id)


def backend_of(model_id: str) -> Backend:
    """The backend of a model id (a catalogue id, ``file:PATH`` or ``diffusers:FOLDER``).

    Raises:
        UnknownModelError: no such model.
    """
    from models.catalog import get_entry

    return get_backend(get_entry(model_id).backend)


__all__ = ["BACKENDS", "Backend", "DiffusionParams", "NoParams", "backend_of", "get_backend"]
