"""One image through one rule, as pixels: prepare, run the model, encode, measure. No files, queues or database.

The worker (:mod:`daemon.worker`) calls these in its stages, for the watch folders and for ``upscaled process``
alike, so both give the same pixels and the same metrics:

1. :func:`prepare`: the decoded input as the model's input. 8-bit images stay **uint8** end to end (the models take
   uint8 or float32 and give back the same dtype); 16-bit ones go as float32. In benchmark mode the input is the
   ground truth, and the LR image is made from it the way the papers do (:mod:`daemon.protocol`). The output size is
   checked against ``max_output_pixels`` here, before any inference.
2. :func:`run`: the model (at its native scale), the finishing resize to the final size (Lanczos up, area down), and
   the alpha channel on its own; frame by frame for an animation, which never holds more than one input frame.
3. :func:`encode`: the integer array in the output format, with the input's metadata as the rule says.
4. :func:`measure`: the metrics, on the pixels as written (a lossy output is decoded again).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import cv2
import numpy as np

from daemon import imageio
from daemon.config import Rule, Settings
from daemon.errors import ImageTooLargeError
from daemon.fsops import NAME_MAX
from daemon.metrics import Brisque, Metric, full_reference, lr_consistency
from daemon.protocol import check_size, make_lr, modcrop, quantise
from models.base import Upscaler
from models.catalog import model_label
from models.resize import finish_resize, resize

# Output names leave room for a "-NN" de-duplication suffix and for ".compare.png" beside them.
_OUTPUT_NAME_MAX = NAME_MAX - 16
LOSSY = ("jpg", "webp", "avif", "heic", "jxl")


def output_name(rule: Rule, rel: PurePosixPath, fmt: str) -> str:
    """The rule's naming template filled in, with the input's stem shortened if the name would be too long."""
    stem = rel.stem
    while True:
        name = rule.naming.format(stem=stem, model=model_label(rule.model), scale=f"{rule.final_scale:g}",
                                  ext=fmt, folder=rule.folder.replace("/", "_") or "root", rule=rule.fingerprint())
        excess = len(name.encode("utf-8", "surrogateescape")) - _OUTPUT_NAME_MAX
        if excess <= 0 or not stem:
            return name
        raw = stem.encode("utf-8", "surrogateescape")
        stem = raw[: max(0, len(raw) - excess)].decode("utf-8", "ignore")


def output_format(rule: Rule, input_format: str | None) -> str:
    """The rule's format, else the input's (a BMP or GIF still becomes PNG, as :mod:`daemon.imageio` decodes)."""
    return rule.format or input_format or "png"


def colour_of(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in the pixels' own dtype: grey repeated, alpha left out."""
    c = pixels.shape[2]
    return np.repeat(pixels[:, :, :1], 3, axis=2) if c in (1, 2) else pixels[:, :, :3]


def alpha_of(pixels: np.ndarray) -> np.ndarray | None:
    return pixels[:, :, -1] if pixels.shape[2] in (2, 4) else None


def to_model(a: np.ndarray) -> np.ndarray:
    """What the model gets: uint8 as it is, 16-bit as float32 in [0, 1]."""
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    return (a.astype(np.float32) / 65535.0) if a.dtype == np.uint16 else a.astype(np.float32, copy=False)


def to_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    return a


def fit(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The finishing resize to ``size`` = (w, h): Lanczos when enlarging, area when reducing; any dtype."""
    h, w = img.shape[:2]
    if (w, h) == tuple(size):
        return img
    if img.dtype == np.uint8:
        flag = cv2.INTER_LANCZOS4 if size[0] * size[1] > w * h else cv2.INTER_AREA
        out = cv2.resize(img, size, interpolation=flag)
        return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out
    return finish_resize(img, size)


@dataclass
class Work:
    """The pixels of one job between stages, and what is recorded about them."""

    decoded: imageio.Decoded
    src: np.ndarray  # the model's input: uint8, or float32 for 16-bit; the LR image in benchmark mode
    alpha: np.ndarray | None
    size: tuple[int, int]  # output (width, height)
    bits: int
    grey: bool
    hr: np.ndarray | None = None  # benchmark mode: the float ground truth
    fields: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    colour: np.ndarray | None = None  # the model's output at the final size (src's dtype)
    out: np.ndarray | None = None  # the integer array that was encoded
    frames_out: list[imageio.Frame] = field(default_factory=list)  # an animation's output frames

    @property
    def pixels_in(self) -> int:
        return self.decoded.width * self.decoded.height * max(1, self.decoded.frames)

    @property
    def pixels_out(self) -> int:
        return self.size[0] * self.size[1] * max(1, self.decoded.frames)


def prepare(rule: Rule, decoded: imageio.Decoded, settings: Settings) -> Work:
    """The model's input for ``decoded`` under ``rule``.

    Raises:
        ImageTooSmallError: benchmark mode, and the image is too small to be measured at the scale.
        ImageTooLargeError: the output would be over ``max_output_pixels`` (all frames).
    """
    fields: dict[str, Any] = dict(input_width=decoded.width, input_height=decoded.height,
                                  input_format=decoded.format, input_mode=decoded.mode, bits=decoded.bits,
                                  frames=decoded.frames)
    pixels = decoded.first.pixels
    colour, alpha = colour_of(pixels), alpha_of(pixels)
    hr = None
    if rule.mode == "benchmark":
        s = int(rule.scale)
        check_size(decoded.width, decoded.height, s)
        hr = modcrop(to_float(colour), s)
        lr = make_lr(hr, s, rule.downscale, decoded.bits)  # on the file's sample grid
        peak = 65535 if decoded.bits == 16 else 255
        src = np.rint(lr * peak).astype(np.uint8 if decoded.bits == 8 else np.uint16)
        lr_size = (lr.shape[1], lr.shape[0])
        if alpha is not None:
            a = resize(to_float(modcrop(alpha[:, :, None], s)), lr_size, "area")[:, :, 0]
            alpha = np.rint(a * peak).astype(src.dtype)
        colour = src
    h, w = colour.shape[:2]
    size = (round(w * rule.final_scale), round(h * rule.final_scale))
    total = size[0] * size[1] * max(1, decoded.frames)
    if total > settings.max_output_pixels:
        raise ImageTooLargeError(f"the output would be {size[0]}x{size[1]}"
                                 f"{f' x {decoded.frames} frames' if decoded.frames > 1 else ''} = {total} pixels, "
                                 f"over the max_output_pixels limit of {settings.max_output_pixels}")
    return Work(decoded=decoded, src=to_model(colour), alpha=alpha, size=size, bits=decoded.bits,
                grey=decoded.grey, hr=hr, fields=fields, notes=list(decoded.notes))


def _interim_call(up: Upscaler, pixels: np.ndarray, params: Any) -> np.ndarray:  # until the models branch lands
    x = pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels
    y = up(x, params=params.model_dump()) if up.backend == "diffusion" else up(x)
    return np.rint(np.clip(y, 0, 1) * 255.0).astype(np.uint8) if pixels.dtype == np.uint8 else y


def _enlarge(rule: Rule, up: Upscaler, params: Any, colour: np.ndarray, alpha: np.ndarray | None,
             size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """One frame: the model, the finishing resize, and the alpha channel."""
    out = fit(_interim_call(up, colour, params), size)
    alpha_out = None
    if alpha is not None:
        if rule.alpha == "model":
            a = _interim_call(up, to_model(np.repeat(alpha[:, :, None], 3, axis=2)), params)
            alpha_out = fit(a, size).mean(axis=2).astype(a.dtype) if a.dtype != np.uint8 else \
                np.rint(fit(a, size).mean(axis=2)).astype(np.uint8)
        else:
            a = resize(to_float(alpha)[:, :, None], size, "bicubic")[:, :, 0]
            alpha_out = a if alpha.dtype != np.uint8 else np.rint(a * 255.0).astype(np.uint8)
    return out, alpha_out


def run(rule: Rule, work: Work, up: Upscaler, params: Any = None) -> None:
    """Run the model on ``work`` (every frame of an animation), leaving the result in ``work``.

    Raises:
        Whatever the model raises (OutOfMemoryError, NonFiniteOutputError, ImageTooSmallError, ...).
    """
    colour, alpha = _enlarge(rule, up, params, work.src, work.alpha, work.size)
    work.colour = colour
    if work.decoded.frames > 1 and rule.mode != "benchmark":
        first = work.decoded.first
        work.frames_out = [imageio.Frame(imageio.assemble(colour, alpha, work.bits, work.grey),
                                         first.duration_ms, first.disposal)]
        for frame in work.decoded.rest():
            c, a = _enlarge(rule, up, params, to_model(colour_of(frame.pixels)), alpha_of(frame.pixels), work.size)
            work.frames_out.append(imageio.Frame(imageio.assemble(c, a, work.bits, work.grey), frame.duration_ms,
                                                 frame.disposal))
    else:
        work.out = imageio.assemble(colour, alpha, work.bits, work.grey)
    work.fields.update(backend=up.backend, device=up.device, precision=up.precision)


def encode(rule: Rule, work: Work, fmt: str) -> bytes:
    """The bytes of the output file.

    Raises:
        OutputError: the format cannot hold the image (over an encoder's limits).
    """
    meta = work.decoded.meta
    if work.frames_out:
        data, notes = imageio.encode_animation(work.frames_out, fmt, loop=work.decoded.loop, quality=rule.quality,
                                               compression=rule.compression, meta=meta)
    else:
        assert work.out is not None
        data, notes = imageio.encode(work.out, fmt, quality=rule.quality, compression=rule.compression, meta=meta)
    work.notes += notes
    work.fields.update(output_width=work.size[0], output_height=work.size[1], output_format=fmt,
                       output_size=len(data))
    return data


def measure(rule: Rule, work: Work, data: bytes, fmt: str, brisque: Callable[[], Brisque | None]) -> list[Metric]:
    """The rule's metrics on the pixels as written. Never raises for a metric that cannot be computed: it is left
    out and a note says why."""
    names = rule.metric_names
    if not names or work.colour is None:
        return []
    if fmt in LOSSY:  # our own output: its size is known, so decode it under exactly that limit
        written8 = colour_of(imageio.decode_bytes(data, work.size[0] * work.size[1], name="the output").first.pixels)
        written = to_float(written8)
    elif work.colour.dtype == np.uint8:
        written8, written = work.colour, to_float(work.colour)
    else:  # 16-bit: the float output on the grid of the file
        written = quantise(work.colour, work.bits)
        written8 = np.rint(written * 255.0).astype(np.uint8)
    if rule.mode == "benchmark":
        assert work.hr is not None
        return full_reference(written, work.hr, int(rule.scale), names)
    results = lr_consistency(written, to_float(work.src), names)
    if "brisque" in names:
        scorer = brisque()
        if scorer is None:
            work.notes.append("brisque skipped: its model files are not in weights_dir (upscaled weights fetch "
                              "brisque)")
        else:
            results.append(scorer(written8))
    return results


def comparison_image(work: Work) -> np.ndarray:
    """HR | LR (nearest-neighbour enlarged, so its pixels show) | SR, side by side with 4 px white gaps (uint8)."""
    assert work.hr is not None and work.colour is not None
    hr = np.rint(work.hr * 255.0).astype(np.uint8)
    h, w = hr.shape[:2]
    lr = work.src if work.src.dtype == np.uint8 else np.rint(to_float(work.src) * 255.0).astype(np.uint8)
    lr_big = cv2.resize(lr, (w, h), interpolation=cv2.INTER_NEAREST)
    sr = work.colour if work.colour.dtype == np.uint8 else np.rint(np.clip(work.colour, 0, 1) * 255).astype(np.uint8)
    gap = np.full((h, 4, 3), 255, np.uint8)
    return np.concatenate([hr, gap, lr_big, gap, sr[:h, :w]], axis=1)


class Timer:
    """Stage times of one job; ``on_stage`` hears each stage's name as it starts (STATUS=, the watchdog)."""

    def __init__(self, on_stage: Callable[[str], None] | None = None) -> None:
        self.times: dict[str, float] = {}
        self.on_stage = on_stage

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        if self.timer.on_stage is not None:
            self.timer.on_stage(self.name)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.times[self.name] = self.timer.times.get(self.name, 0.0) + time.perf_counter() - self.t0
