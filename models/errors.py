"""The errors of the pixel side: models, weights, devices, and the arrays handed to a model.

Every error raised on purpose by upscaled derives from :class:`UpscaledError`. Each class carries a short
machine-readable ``kind`` (it ends up in the job row and in the ``<name>.error.json`` beside a failed input) and a
:class:`Retry` policy that tells the worker what a second try can do. Messages say what was expected and what was
given. The file, queue and configuration errors of the service live in :mod:`daemon.errors`, on this base: which
errors live where, and why, is said once in docs/development.md ("Where errors live").
"""

from __future__ import annotations

import enum


class Retry(enum.Enum):
    """What the worker does when a job fails with an error of this class."""

    NEVER = "never"  # the input or the configuration is at fault: a second try gives the same answer
    BACKOFF = "backoff"  # transient (out of memory): retried with a doubling delay, at most `max_attempts` times
    UNTIL_FIXED = "until-fixed"  # the environment is at fault (disk full): retried with capped backoff, forever


class UpscaledError(Exception):
    """Base of every error raised on purpose by upscaled."""

    kind = "error"
    retry = Retry.NEVER


# --- models and weights --------------------------------------------------------------------------------------------
class ModelError(UpscaledError):
    """A model cannot be found, loaded or run."""

    kind = "model"


class UnknownModelError(ModelError):
    """No catalogue entry, ``file:`` or ``diffusers:`` model by that id."""

    kind = "unknown-model"


class UnsupportedScaleError(ModelError):
    """The model has no weights for the scale asked for."""

    kind = "unsupported-scale"


class WeightsMissingError(ModelError):
    """The weight file (or hub snapshot) is not there; the message names the fetch command."""

    kind = "weights-missing"


class WeightsCorruptError(ModelError):
    """The weight file fails its sha256, cannot be read, or holds another architecture than catalogued."""

    kind = "weights-corrupt"


class BackendUnavailableError(ModelError):
    """A backend's optional dependencies are not installed (``pip install 'upscaled[gan]'`` and so on)."""

    kind = "backend-unavailable"


class RegistryError(ModelError):
    """An unknown or duplicate backend name in the registry."""

    kind = "registry"


class UnsupportedModelError(ModelError):
    """The weights load, but not as a model this service can run (an inpainting or face-restoration model, an
    architecture spandrel does not know, an input layout other than RGB or grey)."""

    kind = "unsupported-model"


class UnsafeWeightsError(ModelError):
    """A weight file that would run code when loaded (a pickle with foreign globals, a TorchScript program)."""

    kind = "unsafe-weights"


class DeviceUnavailableError(ModelError):
    """The configured device does not exist here (``cuda`` without a GPU, ``cuda:3`` on a two-GPU machine)."""

    kind = "device-unavailable"


class UnsupportedPrecisionError(ModelError):
    """The configured precision is not one the model or the device supports."""

    kind = "unsupported-precision"


class InvalidParamsError(ModelError):
    """A backend parameter is unknown or out of range (a ``noise_level`` above the pipeline's maximum)."""

    kind = "invalid-params"


class NonFiniteOutputError(ModelError):
    """The model gave NaN or Inf even in fp32: the weights are broken, retrying cannot help."""

    kind = "non-finite-output"


class FetchError(ModelError):
    """A weight file could not be downloaded or copied from a mirror."""

    kind = "fetch"


# --- the pixels handed to a model ----------------------------------------------------------------------------------
class ImageError(UpscaledError):
    """The input itself is bad. Retrying cannot help. The file-level cases are in :mod:`daemon.errors`."""

    kind = "bad-image"


class ImageTooSmallError(ImageError):
    """A side is below what the model (or the benchmark protocol) needs."""

    kind = "too-small"


class UnsupportedImageError(ImageError):
    """Pixels or a file of a kind the service does not handle (float samples, a symlink, a FIFO)."""

    kind = "unsupported-image"


# --- resources: retried ----------------------------------------------------------------------------------------------
class ResourceError(UpscaledError):
    """The input is fine; the machine ran short of something. Retried."""

    kind = "resource"
    retry = Retry.BACKOFF


class OutOfMemoryError(ResourceError):
    """Host or device memory ran out, even on the smallest tile."""

    kind = "out-of-memory"
