"""OpenCV ``dnn_superres`` networks: FSRCNN, FSRCNN-small, ESPCN, LapSRN and EDSR.

The ``.pb`` graphs are the ones ``cv2.dnn_superres.DnnSuperResImpl`` reads, and we feed them the way it does:
FSRCNN, ESPCN and LapSRN see the Y channel of YCrCb (the chroma is upscaled with bicubic), EDSR sees BGR in
0..255 minus the DIV2K mean. We call ``cv2.dnn`` on float32 ourselves instead of going through ``upsample()``,
which takes 8-bit images only, so that 16-bit inputs keep their precision and large images can be tiled.
"""

from __future__ import annotations

import threading

import numpy as np

from models.base import SizeRequirements, Tiling, Upscaler
from models.catalog import ModelEntry
from models.errors import BackendUnavailableError
from models.registry import LoadContext
from models.weights import check, locate

_EDSR_MEAN_BGR = (103.1545782, 111.561547, 114.35629928)
# Context each tile needs so that tiled output equals one pass: the receptive-field radius in input pixels,
# rounded up generously (LapSRN has 10 3x3 convolutions per level).
_TILE_PAD = {"fsrcnn": 8, "espcn": 6, "lapsrn": 24, "edsr": 40}
_DEFAULT_TILE = 384  # input pixels per tile side on the CPU: bounds FSRCNN's 56-channel maps to ~130 MB


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - cv2 is a core dependency
        raise BackendUnavailableError("OpenCV is missing: pip install 'opencv-contrib-python>=4.8,<5'") from exc
    return cv2


def load(entry: ModelEntry, scale: float, ctx: LoadContext) -> Upscaler:
    cv2 = _cv2()
    key = int(scale)
    path = locate(ctx.weights_dir, entry, key)
    check(ctx.weights_dir, entry.files[key])
    # Creating a DnnSuperResImpl registers its custom DepthToSpace layer, which these graphs need; without it
    # cv2.dnn's own DepthToSpace refuses them ("blocksize is required").
    cv2.dnn_superres.DnnSuperResImpl_create()
    net = cv2.dnn.readNetFromTensorflow(str(path))
    device = "cpu"
    if ctx.device.startswith("cuda") and cv2.cuda.getCudaEnabledDeviceCount() > 0:  # only custom CUDA builds
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
        device = ctx.device
    lock = threading.Lock()  # a cv2.dnn.Net is not safe to call from two threads at once

    def forward(blob: np.ndarray) -> np.ndarray:
        with lock:
            net.setInput(blob)
            return net.forward()

    if entry.arch == "edsr":

        def run(rgb: np.ndarray) -> np.ndarray:
            bgr = np.ascontiguousarray(rgb[:, :, ::-1]) * 255.0
            blob = cv2.dnn.blobFromImage(bgr, 1.0, None, _EDSR_MEAN_BGR, swapRB=False, crop=False)
            out = forward(blob)[0].transpose(1, 2, 0) + np.asarray(_EDSR_MEAN_BGR, np.float32)
            return (out[:, :, ::-1] / 255.0).astype(np.float32)

    else:

        def run(rgb: np.ndarray) -> np.ndarray:
            ycrcb = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
            h, w = rgb.shape[:2]
            y = forward(cv2.dnn.blobFromImage(np.ascontiguousarray(ycrcb[:, :, 0]), 1.0))[0, 0]
            crcb = cv2.resize(ycrcb[:, :, 1:], (y.shape[1], y.shape[0]), interpolation=cv2.INTER_CUBIC)
            merged = np.dstack([np.clip(y, 0.0, 1.0), crcb]).astype(np.float32)
            return cv2.cvtColor(merged, cv2.COLOR_YCrCb2RGB)

    return Upscaler(
        model_id=entry.id,
        backend="opencv",
        scale=float(key),
        run=run,
        device=device,
        precision="fp32",
        tiling=Tiling.SUPPORTED,
        size=SizeRequirements(minimum=3 if entry.arch != "lapsrn" else 4),
        tile=ctx.tile or _DEFAULT_TILE,
        tile_pad=_TILE_PAD[entry.arch],
    )
