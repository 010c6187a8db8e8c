"""The one call contract every backend returns: an :class:`Upscaler`.

``up(pixels, params=None)``, for every upscaler of every backend:

- ``pixels`` is RGB of shape (H, W, 3), either ``uint8`` or ``float32`` in [0, 1] (a 16-bit source goes in as
  float32, so that no precision is lost on the way);
- ``params`` is an instance of the backend's parameter schema (:attr:`Upscaler.params_type`; ``NoParams`` for most),
  a mapping that validates against it, or None for its defaults;
- the result has the input's dtype and shape (round(H * scale), round(W * scale), 3), in [0, 1] for float32.

The call pads the input to the model's size requirements, runs it in windows where the model allows it (through
:mod:`models.tiling`), crops the result, and converts uint8 the same way everywhere: ``x / 255`` in float32 on the
way in, ``rint(clip(y, 0, 1) * 255)`` on the way out. So ``up(u8)`` equals the quantised ``up(u8 / 255)``, except
where a backend has an 8-bit path of its own that the plain library call uses (OpenCV's ``upsample()`` rounds its
YCrCb planes to 8 bits; ``cv2.resize`` has fixed-point 8-bit kernels): there ``up(u8)`` gives that call's bytes.
Callers never branch on the backend.

Attributes a caller reads: ``model_id``, ``backend``, ``scale``, ``device`` (resolved: ``cpu``, ``cuda:0``),
``precision`` (``fp16``; ``fp16->fp32`` after a fallback; for a torch model the precision of this thread's last
call), ``tiling``.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from models.errors import ImageTooSmallError, InvalidParamsError, UnsupportedImageError
from models.pixels import to_uint8, to_unit_float
from models.tiling import Geometry, Origin, run_tiled

PIXEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


class Tiling(enum.Enum):
    """How a backend feels about being run on tiles (spandrel's hint, same meaning)."""

    SUPPORTED = "supported"  # tiles with enough context give the same pixels as one pass
    DISCOURAGED = "discouraged"  # works, but the model uses global context; tile only when memory forces it
    INTERNAL = "internal"  # the backend tiles by itself (or needs no tiles); never tile from outside


@dataclass(frozen=True)
class SizeRequirements:
    minimum: int = 1  # smallest side the model accepts, in input pixels
    multiple_of: int = 1  # input sides are padded up to a multiple of this, and the output cropped back


class NoParams(BaseModel):
    """The parameters of a backend that takes none: an empty ``[rules.params]`` table, or none at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Upscaler:
    """A loaded model. Build one in a backend's ``load``; call it with an image (see the module docstring).

    A backend subclasses this and implements :meth:`upscale`. ``tile`` is the rule's window side (None: the backend
    chooses); :meth:`with_tile` gives a view with another one that shares the loaded model.
    """

    params_type: type[BaseModel] = NoParams

    def __init__(
        self,
        model_id: str,
        backend: str,
        scale: float,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        tiling: Tiling = Tiling.SUPPORTED,
        size: SizeRequirements | None = None,
        tile: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.backend = backend
        self.scale = float(scale)
        self.device = device
        self._precision = precision
        self.tiling = tiling
        self.size = size or SizeRequirements()
        self.tile = tile

    @property
    def precision(self) -> str:
        """The precision the model runs in (``fp32``, ``fp16``, ``fp16->fp32`` after a fallback)."""
        return self._precision

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.model_id!r}, backend={self.backend!r}, x{self.scale:g}, "
            f"device={self.device!r}, precision={self.precision!r}, tile={self.tile})"
        )

    # --- the call ----------------------------------------------------------------------------------------------------
    def __call__(self, pixels: np.ndarray, params: BaseModel | Mapping[str, Any] | None = None) -> np.ndarray:
        """Upscale ``pixels``; see the module docstring for the contract.

        Raises:
            UnsupportedImageError: not a uint8 or float32 array of shape (H, W, 3).
            ImageTooSmallError: a side is below the model's minimum.
            InvalidParamsError: ``params`` is not the backend's schema, or a mapping with an unknown key or a value
                out of range.
            OutOfMemoryError: even the smallest window ran out of memory (retryable).
            NonFiniteOutputError: the model gave NaN or Inf in fp32 (broken weights).
        """
        self.check_input(pixels)
        return self.upscale(pixels, self.parse_params(params))

    def upscale(self, pixels: np.ndarray, params: BaseModel) -> np.ndarray:
        """The backend's work, on checked pixels and parsed params; same contract as :meth:`__call__`."""
        raise NotImplementedError

    def check_input(self, pixels: np.ndarray) -> tuple[int, int]:
        """The checks every call starts with. Returns (H, W).

        Raises:
            UnsupportedImageError: the array is not uint8 or float32 RGB.
            ImageTooSmallError: a side is below the model's minimum.
        """
        if (
            not isinstance(pixels, np.ndarray)
            or pixels.dtype not in PIXEL_DTYPES
            or pixels.ndim != 3
            or pixels.shape[2] != 3
        ):
            got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise UnsupportedImageError(
                f"expected RGB pixels of shape (H, W, 3), uint8 or float32 in [0, 1]; got {got}"
            )
        h, w = pixels.shape[:2]
        if min(h, w) < self.size.minimum:
            raise ImageTooSmallError(
                f"{self.model_id} needs at least {self.size.minimum} px per side, the image is {w}x{h}"
            )
        return h, w

    def parse_params(self, params: BaseModel | Mapping[str, Any] | None) -> BaseModel:
        """``params`` as an instance of :attr:`params_type` (None gives its defaults).

        Raises:
            InvalidParamsError: another type, or a mapping that does not validate (unknown key, value out of range).
        """
        if params is None:
            return self.params_type()
        if isinstance(params, self.params_type):
            return params
        if isinstance(params, Mapping):
            try:
                return self.params_type.model_validate(dict(params))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
                raise InvalidParamsError(f"{self.backend} parameters for {self.model_id}: {problems}") from None
        raise InvalidParamsError(
            f"{self.model_id} takes {self.params_type.__name__} parameters, a mapping or None; "
            f"got {type(params).__name__}"
        )

    def with_tile(self, tile: int | None) -> Upscaler:
        """This upscaler with another window side; the loaded model (weights, locks, fallback state) is shared."""
        if tile == self.tile:
            return self
        view = copy.copy(self)
        view.tile = tile
        return view


class FunctionUpscaler(Upscaler):
    """An upscaler over plain array functions: the classical filters and the OpenCV networks.

    ``run_float`` maps a float32 RGB window in [0, 1] to its float32 output; ``run_u8``, where given, maps a uint8
    window to its uint8 output directly (OpenCV's own 8-bit path); without it uint8 goes through ``run_float`` and
    the shared conversion. Windows are cut by ``geometry`` (a hard cut: with a margin of at least the receptive
    field, tiled equals one pass, byte for byte) when the image is larger than ``tile`` (or the geometry's default
    side); ``Tiling.INTERNAL`` runs the whole image at once.
    """

    def __init__(
        self,
        model_id: str,
        backend: str,
        scale: float,
        run_float: Callable[[np.ndarray], np.ndarray],
        *,
        run_u8: Callable[[np.ndarray], np.ndarray] | None = None,
        geometry: Geometry | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_id, backend, scale, **kwargs)
        self.run_float = run_float
        self.run_u8 = run_u8
        self.geometry = geometry

    def window_geometry(self) -> Geometry | None:
        """The geometry of this call's windows (the rule's tile, else the backend's default, never below what the
        margin needs), or None: no tiling."""
        if self.tiling is Tiling.INTERNAL or self.geometry is None:
            return None
        if not self.tile:
            return self.geometry
        return self.geometry.with_tile(max(self.tile, self.geometry.smallest))

    def upscale(self, pixels: np.ndarray, params: BaseModel) -> np.ndarray:
        h, w = pixels.shape[:2]
        out_h, out_w = round(h * self.scale), round(w * self.scale)
        uint8 = pixels.dtype == np.uint8
        if uint8 and self.run_u8 is not None:
            fn, src = self.run_u8, pixels
        else:
            fn, src = self.run_float, to_unit_float(pixels)
        padded = pad_to_multiple(src, self.size.multiple_of)
        geometry = self.window_geometry()

        def window(win: np.ndarray, _origin: Origin) -> np.ndarray:
            return fn(win)

        out = run_tiled(window, padded, self.scale, geometry) if geometry else fn(padded)
        out = out[:out_h, :out_w]
        if out.dtype == np.uint8:
            return np.ascontiguousarray(out)
        return to_uint8(out) if uint8 else np.clip(out, 0.0, 1.0, out=np.ascontiguousarray(out, np.float32))


def pad_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the bottom and right edges so both sides are multiples of ``multiple``."""
    if multiple <= 1:
        return img
    h, w = img.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return img
    mode: Literal["reflect", "edge"] = "reflect" if ph < h and pw < w else "edge"
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode)
