"""One family of errors for the whole project.

Every error the service can meet derives from :class:`UpscaledError`. Each class says whether a retry can help
(``retryable``) and carries a short machine-readable ``kind`` that ends up in the job row and in the
``<name>.error.json`` file beside a failed input. Messages say what was expected and what was given.
"""

from __future__ import annotations


class UpscaledError(Exception):
    """Base of every error raised on purpose by upscaled."""

    kind = "error"
    retryable = False


# --- configuration -------------------------------------------------------------------------------------------------
class ConfigError(UpscaledError):
    kind = "config"


# --- models and weights --------------------------------------------------------------------------------------------
class ModelError(UpscaledError):
    kind = "model"


class UnknownModel(ModelError):
    kind = "unknown-model"


class UnsupportedScale(ModelError):
    kind = "unsupported-scale"


class WeightsMissing(ModelError):
    kind = "weights-missing"


class WeightsCorrupt(ModelError):
    kind = "weights-corrupt"


class BackendUnavailable(ModelError):
    """A backend's optional dependencies are not installed (``pip install 'upscaled[gan]'`` and so on)."""

    kind = "backend-unavailable"


class RegistryError(ModelError):
    kind = "registry"


class UnsupportedModel(ModelError):
    """The weights load, but not as a model this service can run (an inpainting or face-restoration model, an
    architecture spandrel does not know, an input layout other than RGB or grey)."""

    kind = "unsupported-model"


class UnsafeWeights(ModelError):
    """A weight file that would run code when loaded (a pickle with foreign globals, a TorchScript program)."""

    kind = "unsafe-weights"


class DeviceUnavailable(ModelError):
    """The configured device does not exist here (``cuda`` without a GPU, ``cuda:3`` on a two-GPU machine)."""

    kind = "device-unavailable"


class UnsupportedPrecision(ModelError):
    """The configured precision is not one the model or the device supports."""

    kind = "unsupported-precision"


class NonFiniteOutput(ModelError):
    """The model gave NaN or Inf even in fp32: the weights are broken, retrying cannot help."""

    kind = "non-finite-output"


class FetchError(ModelError):
    kind = "fetch"


# --- input images --------------------------------------------------------------------------------------------------
class ImageError(UpscaledError):
    """The input itself is bad. Retrying cannot help."""

    kind = "bad-image"


class EmptyFile(ImageError):
    kind = "empty-file"


class DecodeError(ImageError):
    kind = "decode"


class ImageTooLarge(ImageError):
    kind = "too-large"


class ImageTooSmall(ImageError):
    kind = "too-small"


class UnsupportedImage(ImageError):
    kind = "unsupported-image"


class UnreadableFile(ImageError):
    kind = "unreadable"


class BadSidecar(ImageError):
    """The ``<image>.prompt.txt`` beside an input cannot be used: unreadable, not UTF-8 text, too long, a link."""

    kind = "bad-sidecar"


# --- resources: retried with backoff -------------------------------------------------------------------------------
class ResourceError(UpscaledError):
    kind = "resource"
    retryable = True
    # The input is fine and the environment will be fixed (space freed, permissions repaired): retry with capped
    # backoff for as long as it takes, instead of giving up after max_attempts.
    retry_forever = False


class OutOfMemory(ResourceError):
    kind = "out-of-memory"


class DiskFull(ResourceError):
    kind = "disk-full"
    retry_forever = True


class OutputUnavailable(ResourceError):
    """The outbox (or the archive) cannot be written: permissions, a read-only or missing mount."""

    kind = "output-unavailable"
    retry_forever = True


class OutputError(UpscaledError):
    """The output could not be written for a reason that is not transient (a bad template, a confined path)."""

    kind = "output"
