"""OpenCV ``dnn_superres`` networks: FSRCNN, FSRCNN-small, ESPCN, LapSRN and EDSR.

The ``.pb`` graphs are the ones ``cv2.dnn_superres.DnnSuperResImpl`` reads, and we feed them the way its
``upsample()`` does: FSRCNN, ESPCN and LapSRN see the Y channel of YCrCb and the chroma is enlarged bilinearly; EDSR
sees BGR in 0..255 minus the DIV2K mean. Two paths:

- **uint8** (8-bit sources): ``upsample()``'s own steps (YCrCb in 8 bits, then ``/ 255`` as float32, the result
  rounded to 8 bits before the colour conversion back), so one window gives the same bytes as ``upsample()``;
- **float32** (16-bit sources): the same network on float YCrCb, nothing rounded on the way, which ``upsample()``
  cannot do (it takes 8-bit images only).

Both run in windows of :data:`TILE` input pixels, cut by :mod:`models.tiling` with a margin of the network's
receptive field and a hard cut, one window at a time: memory stays bounded for huge images, and windows that fit the
CPU's caches make the network faster than one pass over a large image (measured in docs/models.md). The convolutions'
float sums depend slightly on the window's size (about 5e-6), so a tiled 8-bit result differs from ``upsample()`` by
one level in about 0.002 % of its values; an image that fits one window is byte-identical.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from models.base import FunctionUpscaler, SizeRequirements, Tiling
from models.catalog import ModelEntry
from models.errors import BackendUnavailableError
from models.registry import LoadContext
from models.tiling import Geometry
from models.weights import check, locate

_EDSR_MEAN_BGR = (103.1545782, 111.561547, 114.35629928)
# Context each window carries so that tiled output equals one pass: the receptive-field radius in input pixels,
# rounded up generously (LapSRN has 10 3x3 convolutions per level).
MARGIN = {"fsrcnn": 8, "espcn": 6, "lapsrn": 24, "edsr": 40}
# Input pixels per window side: 256 px for the small networks, whose 56-channel maps of a whole image do not stay
# in cache while a window's do; 512 px for LapSRN and EDSR, compute-bound with wide margins that smaller windows pay
# for, which bounds LapSRN's x4 level (64 channels at four times the window's side) to about 1 GB per activation.
# The timings behind both are in docs/performance.md ("Constants from measurements").
TILE = {"fsrcnn": 256, "espcn": 256, "lapsrn": 512, "edsr": 512}
DEFAULT_TILE = TILE["fsrcnn"]


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - cv2 is a core dependency
        raise BackendUnavailableError("OpenCV is missing: pip install 'opencv-contrib-python>=4.8,<5'") from exc
    return cv2


def load(entry: ModelEntry, scale: float, ctx: LoadContext) -> FunctionUpscaler:
    """Load the ``.pb`` graph of ``entry`` at ``scale``.

    Raises:
        WeightsMissingError: the file is absent (the message names the fetch command).
        WeightsCorruptError: the file fails its sha256.
    """
    cv2 = _cv2()
    key = int(scale)
    path = locate(ctx.weights_dir, entry, key)
    check(ctx.weights_dir, entry.files[key])
    # Creating a DnnSuperResImpl registers its custom DepthToSpace layer, which these graphs need; without it
    # cv2.dnn's own DepthToSpace refuses them ("blocksize is required").
    cv2.dnn_superres.DnnSuperResImpl_create()
    on_gpu = ctx.device.startswith("cuda") and cv2.cuda.getCudaEnabledDeviceCount() > 0  # only custom CUDA builds
    device = ctx.device if on_gpu else "cpu"

    def make_net():  # noqa: ANN202 - a cv2.dnn.Net
        net = cv2.dnn.readNetFromTensorflow(str(path))
        if on_gpu:
            net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
            net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
        return net

    # A cv2.dnn.Net is not safe to call from two threads at once, and one lock would make the workers take turns:
    # each thread gets its own copy of the graph instead (FSRCNN's is 40 kB; EDSR's 150 MB, once per worker).
    nets = threading.local()
    nets.net = make_net()  # the loading thread's, and a check that the graph reads

    def forward(blob: np.ndarray) -> np.ndarray:
        net = getattr(nets, "net", None)
        if net is None:
            net = nets.net = make_net()
        net.setInput(blob)
        return net.forward()

    run_float, run_u8 = (_edsr if entry.arch == "edsr" else _luma)(cv2, forward, key)
    return FunctionUpscaler(
        entry.id,
        "opencv",
        float(key),
        run_float,
        run_u8=run_u8,
        geometry=Geometry(ctx.tile or TILE[entry.arch], MARGIN[entry.arch]),
        device=device,
        precision="fp32",
        tiling=Tiling.SUPPORTED,
        size=SizeRequirements(minimum=3 if entry.arch != "lapsrn" else 4),
        tile=ctx.tile,
    )


Run = Callable[[np.ndarray], np.ndarray]


def _luma(cv2, forward: Run, scale: int) -> tuple[Run, Run]:
    """FSRCNN, ESPCN, LapSRN: the network on Y, the chroma enlarged bilinearly (as ``cv::resize``'s default)."""

    def run_u8(rgb: np.ndarray) -> np.ndarray:
        # upsample(): cvtColor on 8 bits, convertTo(CV_32F, 1/255) (a float32 multiply, not a division), the
        # network on Y, each chroma plane resized on its own, convertTo(CV_8U, 255), cvtColor back.
        ycrcb = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb).astype(np.float32)
        ycrcb *= np.float32(1 / 255)
        y = forward(cv2.dnn.blobFromImage(np.ascontiguousarray(ycrcb[:, :, 0]), 1.0))[0, 0]
        planes = [_to_u8(cv2, y)]
        for c in (1, 2):
            plane = cv2.resize(np.ascontiguousarray(ycrcb[:, :, c]), (y.shape[1], y.shape[0]))
            planes.append(_to_u8(cv2, plane))
        return cv2.cvtColor(cv2.merge(planes), cv2.COLOR_YCrCb2RGB)

    def run_float(rgb: np.ndarray) -> np.ndarray:
        ycrcb = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
        y = forward(cv2.dnn.blobFromImage(np.ascontiguousarray(ycrcb[:, :, 0]), 1.0))[0, 0]
        crcb = [cv2.resize(np.ascontiguousarray(ycrcb[:, :, c]), (y.shape[1], y.shape[0])) for c in (1, 2)]
        merged = cv2.merge([np.clip(y, 0.0, 1.0), *crcb])
        return cv2.cvtColor(merged, cv2.COLOR_YCrCb2RGB)

    return run_float, run_u8


def _edsr(cv2, forward: Run, _scale: int) -> tuple[Run, Run]:
    """EDSR: BGR in 0..255 minus the DIV2K mean, and the mean added back."""
    mean = np.asarray(_EDSR_MEAN_BGR, np.float32)

    def run_u8(rgb: np.ndarray) -> np.ndarray:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1]).astype(np.float32)
        out = forward(cv2.dnn.blobFromImage(bgr, 1.0, None, _EDSR_MEAN_BGR, swapRB=False, crop=False))
        out = np.ascontiguousarray(out[0].transpose(1, 2, 0)) + mean
        return np.ascontiguousarray(_to_u8(cv2, out, 1.0)[:, :, ::-1])

    def run_float(rgb: np.ndarray) -> np.ndarray:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1]) * np.float32(255.0)
        out = forward(cv2.dnn.blobFromImage(bgr, 1.0, None, _EDSR_MEAN_BGR, swapRB=False, crop=False))
        out = out[0].transpose(1, 2, 0) + mean
        return np.ascontiguousarray(out[:, :, ::-1] / np.float32(255.0), np.float32)

    return run_float, run_u8


def _to_u8(cv2, values: np.ndarray, alpha: float = 255.0) -> np.ndarray:
    """``Mat::convertTo(CV_8U, alpha)``: a float32 multiply, rounding half to even, saturation. Python has no
    convertTo; convertScaleAbs computes the same once negatives are clamped to 0 (its abs would fold them up)."""
    return cv2.convertScaleAbs(cv2.max(values, 0.0), alpha=alpha)
