"""One image through one rule: decode, model, encode, write, metrics. No queue, no database.

:func:`Pipeline.run` is called by the worker (for the watch folders) and by ``upscaled process`` alike, so both
produce the same pixels and the same metrics. It returns the job's fields and metric rows; the caller commits them.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon import imageio
from daemon.config import Rule, Settings
from daemon.errors import BadSidecarError
from daemon.fsops import NAME_MAX, atomic_write
from daemon.metrics import Brisque, Metric, full_reference, lr_consistency
from models.catalog import get_entry, model_label
from models.errors import ImageTooSmallError, WeightsMissingError
from models.registry import LoadContext, ModelCache
from models.resize import finish_resize, resize
from models.weights import locate


@dataclass
class Result:
    fields: dict[str, Any]  # job-row columns: sizes, dimensions, device, precision, stage times
    metrics: list[Metric]
    notes: list[str] = field(default_factory=list)  # things a person should know (lossy format, skipped metric)


class Timer:
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


SIDECAR_SUFFIX = ".prompt.txt"  # `photo.jpg.prompt.txt` beside `photo.jpg` holds that image's prompt
SIDECAR_MAX_BYTES = 4096  # the text encoder reads 77 tokens; anything this long is a mistake, not a prompt


def sidecar_path(input_path: Path) -> Path:
    return input_path.with_name(input_path.name + SIDECAR_SUFFIX)


def with_sidecar_prompt(rule: Rule, input_path: Path) -> Rule:
    """``rule`` with its prompt replaced by the text of ``<input name>.prompt.txt`` beside the input, if there is
    one and the rule's model takes a prompt; otherwise ``rule`` itself.

    The text is UTF-8 (a BOM is dropped) with surrounding whitespace stripped; an empty file means an empty prompt.
    The new prompt is part of the rule, so it is part of the job's fingerprint and its recorded rule.

    Raises:
        BadSidecarError: the sidecar is a link or not a regular file, unreadable, not UTF-8, or over 4 KiB.
    """
    if rule.generation() is None:
        return rule
    side = sidecar_path(input_path)
    try:
        # No following links out of the inbox, and no blocking on a FIFO put there.
        fd = os.open(side, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return rule
    except OSError as exc:
        raise BadSidecarError(f"cannot read the prompt file {side.name}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BadSidecarError(f"the prompt file {side.name} is not a regular file")
        data = fh.read(SIDECAR_MAX_BYTES + 1)
    if len(data) > SIDECAR_MAX_BYTES:
        raise BadSidecarError(f"the prompt file {side.name} is over {SIDECAR_MAX_BYTES} bytes; "
                              "a prompt is a line of text")
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise BadSidecarError(f"the prompt file {side.name} is not UTF-8 text "
                              f"({exc.reason} at byte {exc.start})") from None
    return rule.model_copy(update={"prompt": text})


# Output names leave room for a "-NN" de-duplication suffix and for ".compare.png" beside them.
_OUTPUT_NAME_MAX = NAME_MAX - 16


def output_name(rule: Rule, input_path: Path, fmt: str) -> str:
    """The rule's naming template filled in, with the input's stem shortened if the name would be too long."""
    stem = input_path.stem
    while True:
        name = rule.naming.format(stem=stem, model=model_label(rule.model), scale=f"{rule.final_scale:g}",
                                  ext=fmt, folder=rule.folder.replace("/", "_") or "root", rule=rule.fingerprint())
        excess = len(name.encode()) - _OUTPUT_NAME_MAX
        if excess <= 0 or not stem:
            return name
        stem = stem.encode()[: max(0, len(stem.encode()) - excess)].decode(errors="ignore")


def output_format(rule: Rule, source_format: str) -> str:
    return rule.format or source_format


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def quantise(img: np.ndarray, bits: int) -> np.ndarray:
    """Round to the sample grid of a ``bits``-deep file, as saving and reloading would."""
    peak = 65535.0 if bits == 16 else 255.0
    return (np.rint(np.clip(img, 0.0, 1.0) * peak) / peak).astype(np.float32)


class Pipeline:
    def __init__(self, settings: Settings, cache: ModelCache | None = None) -> None:
        self.settings = settings
        self.cache = cache or ModelCache()
        self._brisque: Brisque | None = None
        self._brisque_lock = threading.Lock()

    def brisque(self) -> Brisque:
        with self._brisque_lock:  # several workers may ask at once: load it once
            if self._brisque is None:
                entry = get_entry("brisque")
                self._brisque = Brisque(locate(self.settings.weights_dir, entry, 0),
                                        locate(self.settings.weights_dir, entry, 1))
            return self._brisque

    def run(self, rule: Rule, input_path: Path, output: Path | Callable[[str], Path],
            decoded: imageio.Decoded | None = None, device: str | None = None,
            on_stage: Callable[[str], None] | None = None) -> Result:
        """Upscale ``input_path`` by ``rule`` into ``output`` (written atomically).

        ``output`` is a path, or a function from the output format to a path: the service uses it to choose and
        record the path only once the format is known, before anything is written. The model runs on the rule's
        ``device`` if it names one, else on ``device`` (the calling worker's), else on the settings' first device.
        ``on_stage`` is told the name of each stage as it starts. Safe to call from several threads at once.

        Raises:
            ImageError subclasses for bad input, ModelError subclasses for missing or bad weights,
            ResourceError subclasses (retryable) for memory and disk, OutputError for unwritable outputs.
        """
        timer = Timer(on_stage)
        notes: list[str] = []
        # 1. Decode: orientation applied, ICC/alpha/depth/grey remembered.
        with timer.stage("decode"):
            img = decoded or imageio.decode(input_path, self.settings.max_pixels)
        fields: dict[str, Any] = dict(input_width=img.width, input_height=img.height, input_format=img.format,
                                      input_mode=img.mode, bits=img.bits)
        notes += img.notes
        # 2. In benchmark mode the input is the ground truth: make the LR image the way the papers do.
        hr = None
        src, alpha = img.rgb, img.alpha
        if rule.mode == "benchmark":
            s = int(rule.scale)
            hr = modcrop(img.rgb, s)
            # SSIM's 11 px window must fit after the border shave, and the LR image needs a few pixels.
            need = max(11 + 2 * s, 3 * s)
            if min(hr.shape[:2]) < need:
                raise ImageTooSmallError(f"benchmark x{s} needs at least {need} px per side, "
                                         f"got {img.width}x{img.height}")
            lr_size = (hr.shape[1] // s, hr.shape[0] // s)
            # MATLAB rounds integer images between its two passes; so do we, to make the papers' LR images.
            levels = 65535 if img.bits == 16 else 255
            src = quantise(resize(hr, lr_size, rule.downscale, levels=levels), img.bits)
            alpha = None if alpha is None else quantise(resize(modcrop(alpha[:, :, None], s), lr_size, "area")[:, :, 0],
                                                         img.bits)
        # 3. Model: loaded once per process, then cached.
        native = rule.final_scale if get_entry(rule.model).backend == "classical" else rule.scale
        ctx = LoadContext(self.settings.weights_dir, rule.device or device or self.settings.default_device, rule.tile,
                          rule.precision)
        with timer.stage("load"):
            up, _loaded_now = self.cache.get(rule.model, native, ctx)
        h, w = src.shape[:2]
        size = (round(w * rule.final_scale), round(h * rule.final_scale))
        # A diffusion model also takes the rule's generation options (prompt, seed, ...); they go with the job.
        gen = rule.generation()
        model: Callable[[np.ndarray], np.ndarray] = up if gen is None else functools.partial(up, params=gen)
        if gen is not None:
            fields["gen_params"] = json.dumps(gen, sort_keys=True, ensure_ascii=False)
        # 4. Inference, then the finishing resize to outscale, and the alpha channel on its own.
        with timer.stage("infer"):
            out = finish_resize(model(src), size)
            if alpha is not None:
                if rule.alpha == "model":
                    a = model(np.repeat(alpha[:, :, None], 3, axis=2)).mean(axis=2)
                    alpha_out = np.clip(finish_resize(a[:, :, None], size)[:, :, 0], 0.0, 1.0)
                else:
                    alpha_out = resize(alpha[:, :, None], size, "bicubic")[:, :, 0]
            else:
                alpha_out = None
        # After inference: a backend may have fallen back to fp32 on this very image.
        fields.update(backend=up.backend, device=up.device, precision=up.precision)
        # 5. Encode: format and quality from the rule; ICC and EXIF written back.
        fmt = output_format(rule, img.format)
        with timer.stage("encode"):
            arr = imageio.to_output_array(out, alpha_out, img.bits, img.grey)
            data, enc_notes = imageio.encode(arr, fmt, rule.quality, img.icc, img.exif, rule.compression)
            notes += enc_notes
        # 6. Write: temp file, fsync, rename. Never a half file in the outbox.
        output_path = output(fmt) if callable(output) else output
        with timer.stage("write"):
            atomic_write(output_path, data)
        fields.update(output_width=size[0], output_height=size[1], output_format=fmt, output_size=len(data))
        # 7. Metrics, on the pixels as written (quantised), never failing the job.
        results: list[Metric] = []
        names = rule.metric_names
        with timer.stage("metrics"):
            if names:
                written = imageio.decode_bytes(data, self.settings.max_pixels).rgb if fmt in ("jpg", "webp") \
                    else quantise(out, 16 if arr.dtype == np.uint16 else 8)
                results, metric_notes = self._metrics(rule, names, written, src, hr)
                notes += metric_notes
            if rule.mode == "benchmark" and rule.compare and hr is not None:
                compare = comparison_image(hr, src, out)
                cmp_path = output_path.with_name(output_path.stem + ".compare.png")
                atomic_write(cmp_path, imageio.encode(imageio.to_output_array(compare, None, 8, False), "png")[0])
        times = timer.times
        times["total"] = sum(times.values())
        fields.update({f"t_{k}": v for k, v in times.items()})
        return Result(fields=fields, metrics=results, notes=notes)

    def _metrics(self, rule: Rule, names: tuple[str, ...], sr: np.ndarray, src: np.ndarray,
                 hr: np.ndarray | None) -> tuple[list[Metric], list[str]]:
        notes: list[str] = []
        if rule.mode == "benchmark":
            assert hr is not None
            return full_reference(sr, hr, int(rule.scale), names), notes
        results = lr_consistency(sr, src, names)
        if "brisque" in names:
            try:
                results.append(self.brisque()(sr))
            except WeightsMissingError as exc:
                notes.append(f"brisque skipped: {exc}")
        return results, notes


def comparison_image(hr: np.ndarray, lr: np.ndarray, sr: np.ndarray) -> np.ndarray:
    """HR | LR (nearest-neighbour enlarged, so its pixels show) | SR, side by side with 4 px white gaps."""
    h, w = hr.shape[:2]
    lr_big = resize(lr, (w, h), "nearest")
    gap = np.ones((h, 4, 3), np.float32)
    return np.concatenate([hr, gap, lr_big, gap, sr[:h, :w]], axis=1)
