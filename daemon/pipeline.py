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

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import cv2
import numpy as np

from daemon import imageio, sizing
from daemon.config import Rule, Settings
from daemon.errors import ImageTooLargeError
from daemon.fsops import NAME_MAX
from daemon.media.formats import FORMATS
from daemon.metrics import Brisque, Metric, full_reference, lr_consistency
from daemon.protocol import check_size, make_lr, modcrop, quantise
from daemon.sizing import SizePlan
from models.base import Upscaler
from models.catalog import model_label
from models.pixels import alpha_of, colour_of, to_unit_float
from models.resize import resize

# Output names leave room for a "-NN" de-duplication suffix and for ".compare.png" beside them.
_OUTPUT_NAME_MAX = NAME_MAX - 16
LOSSY = tuple(name for name, info in FORMATS.items() if info.lossy)


def output_name(rule: Rule, rel: PurePosixPath, fmt: str, plan: SizePlan | None = None, date: str = "") -> str:
    """The rule's naming template filled in, with the input's stem shortened if the name would be too long.

    ``plan`` gives ``{width}``, ``{height}`` (and ``{scale}`` for a target size: the factor reached); ``date`` is
    ``{date}``."""
    stem = rel.stem
    scale = f"{plan.factor:.3g}" if plan is not None and rule.has_target else f"{rule.final_scale:g}"
    width, height = plan.output if plan is not None else (0, 0)
    while True:
        name = rule.naming.format(
            stem=stem,
            model=model_label(rule.model),
            scale=scale,
            ext=fmt,
            folder=rule.folder.replace("/", "_") or "root",
            rule=rule.fingerprint(),
            width=width,
            height=height,
            date=date,
        )
        excess = len(name.encode("utf-8", "surrogateescape")) - _OUTPUT_NAME_MAX
        if excess <= 0 or not stem:
            return name
        raw = stem.encode("utf-8", "surrogateescape")
        stem = raw[: max(0, len(raw) - excess)].decode("utf-8", "ignore")


def output_format(rule: Rule, input_format: str | None) -> str:
    """The rule's format, else the input's (a BMP becomes PNG, as :mod:`daemon.imageio` decodes it)."""
    return rule.format or input_format or "png"


def size_plan(rule: Rule, width: int, height: int) -> tuple[SizePlan, float]:
    """How an input of ``width`` x ``height`` reaches the rule's output size: the model's native passes (two for
    x16 with a x4 model, up to ``max_passes``), then a final resize (and a crop for ``fit = "cover"``).

    In benchmark mode the size is the LR image's (the HR image cropped to the scale, divided by it). A resampling
    filter (classical) goes to the exact size in one pass; a model that cannot take its own output runs once.
    Returns the plan and the native scale the model is loaded at."""
    backend = rule.backend()
    if rule.mode == "benchmark":
        s = int(rule.scale)
        return sizing.plan((width // s, height // s), rule.scale), rule.scale
    target = rule if rule.has_target else None
    if backend.any_scale:
        factor = rule.final_scale
        if target is not None:
            scaled, _ = sizing.target_size((width, height), target)
            factor = max(scaled[0] / width, scaled[1] / height)
        # A reduction (a cover crop of a large input, outscale < 1) resamples at x1 and lets the final resize reduce.
        native = max(1.0, factor)
        outscale = factor if target is None else None
        return sizing.plan((width, height), native, target=target, outscale=outscale, max_passes=1), native
    return sizing.plan(
        (width, height),
        rule.scale,
        target=target,
        outscale=rule.outscale,
        max_passes=rule.max_passes if backend.chainable else 1,
    ), rule.scale


def to_model(a: np.ndarray) -> np.ndarray:
    """What the model gets: uint8 as it is, 16-bit as float32 in [0, 1]."""
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    return (a.astype(np.float32) / 65535.0) if a.dtype == np.uint16 else a.astype(np.float32, copy=False)


@dataclass
class Work:
    """The pixels of one job between stages, and what is recorded about them."""

    decoded: imageio.Decoded
    src: np.ndarray  # the model's input: uint8, or float32 for 16-bit; the LR image in benchmark mode
    alpha: np.ndarray | None
    plan: SizePlan
    native: float  # the scale the model is loaded at
    bits: int
    grey: bool
    hr: np.ndarray | None = None  # benchmark mode: the float ground truth
    fields: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    colour: np.ndarray | None = None  # the model's output at the final size (src's dtype)
    out: np.ndarray | None = None  # the integer array that was encoded
    frames_out: list[imageio.Frame] = field(default_factory=list)  # an animation's output frames
    frame_metrics: list[list[Metric]] = field(default_factory=list)  # an animation's metrics, frame by frame

    @property
    def size(self) -> tuple[int, int]:
        """The output (width, height)."""
        return self.plan.output

    @property
    def animated(self) -> bool:
        return bool(self.frames_out)

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
    fields: dict[str, Any] = dict(
        input_width=decoded.width,
        input_height=decoded.height,
        input_format=decoded.format,
        input_mode=decoded.mode,
        bits=decoded.bits,
        frames=decoded.frames,
    )
    pixels = decoded.first.pixels
    colour, alpha = colour_of(pixels), alpha_of(pixels)
    hr = None
    if rule.mode == "benchmark":
        s = int(rule.scale)
        check_size(decoded.width, decoded.height, s)
        hr = modcrop(to_unit_float(colour), s)
        lr = make_lr(hr, s, rule.downscale, decoded.bits)  # on the file's sample grid
        peak = 65535 if decoded.bits == 16 else 255
        src = np.rint(lr * peak).astype(np.uint8 if decoded.bits == 8 else np.uint16)
        lr_size = (lr.shape[1], lr.shape[0])
        if alpha is not None:
            a = resize(to_unit_float(modcrop(alpha[:, :, None], s)), lr_size, "area")[:, :, 0]
            alpha = np.rint(a * peak).astype(src.dtype)
        colour = src
    plan, native = size_plan(rule, decoded.width, decoded.height)
    size = plan.output
    frames = decoded.frames if animates(rule, decoded) else 1
    total = size[0] * size[1] * frames
    each = f" x {frames} frames" if frames > 1 else ""
    if total > settings.max_output_pixels:
        raise ImageTooLargeError(
            f"the output would be {size[0]}x{size[1]}{each} = {total} pixels, "
            f"over the max_output_pixels limit of {settings.max_output_pixels}"
        )
    # Every image on the way counts, not only the one written: fit = "cover" crops a far larger one.
    inner = max((plan.model_size, plan.scaled), key=lambda s: s[0] * s[1])
    if inner[0] * inner[1] * frames > settings.max_output_pixels:
        raise ImageTooLargeError(
            f"on its way to {size[0]}x{size[1]}, the image would be {inner[0]}x{inner[1]}{each} = "
            f"{inner[0] * inner[1] * frames} pixels (before the crop), over the max_output_pixels limit of "
            f"{settings.max_output_pixels}"
        )
    if rule.params:  # a diffusion job's prompt, seed, steps...: what produced this output, with the job
        fields["gen_params"] = json.dumps(rule.params, sort_keys=True, ensure_ascii=False)
    notes = list(decoded.notes) + plan.notes
    if decoded.frames > 1 and frames == 1 and rule.mode != "benchmark":
        notes.append(
            f"the input has {decoded.frames} frames and {output_format(rule, decoded.format)} holds one; "
            "only the first frame was upscaled"
        )
    return Work(
        decoded=decoded,
        src=to_model(colour),
        alpha=alpha,
        plan=plan,
        native=native,
        bits=decoded.bits,
        grey=decoded.grey,
        hr=hr,
        fields=fields,
        notes=notes,
    )


def animates(rule: Rule, decoded: imageio.Decoded) -> bool:
    """Whether every frame is upscaled: an animated input, and an output format that holds an animation."""
    return (
        decoded.frames > 1
        and rule.mode != "benchmark"
        and output_format(rule, decoded.format) in imageio.ANIMATED_FORMATS
    )


def _model(up: Upscaler, params: Any, img: np.ndarray, plan: SizePlan) -> np.ndarray:
    """The model's passes, then the final resize (and crop) of the plan."""
    for _ in range(plan.passes):
        img = up(img, params)
    return sizing.apply_final(img, plan)


def _enlarge(
    rule: Rule, up: Upscaler, params: Any, colour: np.ndarray, alpha: np.ndarray | None, plan: SizePlan
) -> tuple[np.ndarray, np.ndarray | None]:
    """One frame: the model, the finishing resize, and the alpha channel (by the model, or resized)."""
    out = _model(up, params, colour, plan)
    alpha_out = None
    if alpha is not None:
        if rule.alpha == "model":
            a = _model(up, params, to_model(np.repeat(alpha[:, :, None], 3, axis=2)), plan)
            mean = a.astype(np.float32).mean(axis=2)
            alpha_out = np.rint(mean).astype(np.uint8) if a.dtype == np.uint8 else mean
        else:  # a plain resize to the plan's size (then the same crop)
            direct = sizing.SizePlan(
                plan.source,
                1,
                plan.source,
                plan.scaled,
                plan.output,
                plan.crop,
                sizing.final_filter(plan.source, plan.scaled),
            )
            a = sizing.apply_final(to_unit_float(alpha), direct)
            alpha_out = a if alpha.dtype != np.uint8 else np.rint(a * 255.0).astype(np.uint8)
    return out, alpha_out


def run(
    rule: Rule, work: Work, up: Upscaler, params: Any = None, brisque: Callable[[], Brisque | None] | None = None
) -> None:
    """Run the model on ``work`` (every frame of an animation), leaving the result in ``work``.

    An animation's frames are decoded, upscaled and assembled one at a time (the input never held whole), and their
    metrics are measured as each frame goes by (``brisque`` gives the no-reference scorer).

    Raises:
        Whatever the model raises (OutOfMemoryError, NonFiniteOutputError, ImageTooSmallError, ...).
    """
    colour, alpha = _enlarge(rule, up, params, work.src, work.alpha, work.plan)
    work.colour = colour
    if animates(rule, work.decoded):
        first = work.decoded.first
        frames = [(first, colour, alpha, work.src)]
        for frame in work.decoded.rest():
            src = to_model(colour_of(frame.pixels))
            c, a = _enlarge(rule, up, params, src, alpha_of(frame.pixels), work.plan)
            frames.append((frame, c, a, src))
            if len(frames) > 1:
                _keep_frame(rule, work, *frames.pop(0), brisque)
        for f in frames:
            _keep_frame(rule, work, *f, brisque)
    else:
        work.out = imageio.assemble(colour, alpha, work.bits, work.grey)
    work.fields.update(backend=up.backend, device=up.device, precision=up.precision)


def _keep_frame(
    rule: Rule,
    work: Work,
    frame: imageio.Frame,
    colour: np.ndarray,
    alpha: np.ndarray | None,
    src: np.ndarray,
    brisque: Callable[[], Brisque | None] | None,
) -> None:
    """One output frame of an animation: assembled at output size (the only copy kept), and measured now."""
    work.frames_out.append(
        imageio.Frame(
            imageio.assemble(colour, alpha, work.bits, work.grey), frame.duration_ms, frame.disposal, frame.blend
        )
    )
    if rule.metric_names and brisque is not None:
        work.frame_metrics.append(
            _upscale_metrics(rule.metric_names, _written(colour, work.bits), to_unit_float(src), brisque, work.notes)
        )


def encode(rule: Rule, work: Work, fmt: str, prepared: imageio.Prepared | None = None) -> bytes:
    """The bytes of the output file, with ``prepared`` metadata (the input's, already fitted to this output in the
    sandbox: :func:`daemon.media.metadata.parses`) or, where nothing needs parsing, the input's prepared here.

    Raises:
        OutputError: the format cannot hold the image (over an encoder's limits).
    """
    meta = prepared if prepared is not None else work.decoded.meta
    if work.frames_out:
        data, notes = imageio.encode_animation(
            work.frames_out,
            fmt,
            loop=work.decoded.loop,
            quality=rule.quality,
            compression=rule.compression,
            meta=meta,
            policy=rule.metadata,
        )
    else:
        assert work.out is not None
        data, notes = imageio.encode(
            work.out, fmt, quality=rule.quality, compression=rule.compression, meta=meta, policy=rule.metadata
        )
    work.notes += notes
    work.fields.update(output_width=work.size[0], output_height=work.size[1], output_format=fmt, output_size=len(data))
    return data


def measure(
    rule: Rule,
    work: Work,
    fmt: str,
    brisque: Callable[[], Brisque | None],
    written: Callable[[], np.ndarray],
) -> list[Metric]:
    """The rule's metrics on the pixels as written: ``written()`` gives a lossy output's pixels decoded again (the
    worker decodes the file it wrote, in the sandbox like any file). An animation's metrics were measured frame by
    frame in :func:`run`: their means. Never raises for a metric that cannot be computed: it is left out and a note
    says why."""
    names = rule.metric_names
    if not names or work.colour is None:
        return []
    if work.animated:
        return _summarise(work.frame_metrics, len(work.frames_out))
    pixels = to_unit_float(colour_of(written())) if fmt in LOSSY else _written(work.colour, work.bits)
    if rule.mode == "benchmark":
        assert work.hr is not None
        return full_reference(pixels, work.hr, int(rule.scale), names)
    return _upscale_metrics(names, pixels, to_unit_float(work.src), brisque, work.notes)


def _written(colour: np.ndarray, bits: int) -> np.ndarray:
    """The model's output as the file holds it (float in [0, 1] on the file's sample grid)."""
    return to_unit_float(colour) if colour.dtype != np.float32 else quantise(colour, bits)


def _upscale_metrics(
    names: tuple[str, ...],
    written: np.ndarray,
    src: np.ndarray,
    brisque: Callable[[], Brisque | None],
    notes: list[str],
) -> list[Metric]:
    results = lr_consistency(written, src, names)
    if "brisque" in names:
        scorer = brisque()
        if scorer is None:
            if not any(n.startswith("brisque skipped") for n in notes):
                notes.append(
                    "brisque skipped: its model files are missing or damaged in weights_dir (upscaled "
                    "weights fetch brisque)"
                )
        else:
            results.append(scorer(written))
    return results


def _summarise(per_frame: list[list[Metric]], frames: int) -> list[Metric]:
    """One row per metric over an animation's frames: the mean, with the frame count in its protocol."""
    by_name: dict[str, list[Metric]] = {}
    for metrics in per_frame:
        for m in metrics:
            by_name.setdefault(m.name, []).append(m)
    return [
        Metric(
            name,
            float(np.mean([m.value for m in ms])),
            ms[0].space,
            ms[0].shave,
            ms[0].reference,
            f"mean over {len(ms)} of {frames} frames; " + ms[0].protocol,
        )
        for name, ms in by_name.items()
    ]


def comparison_image(work: Work) -> np.ndarray:
    """HR | LR (nearest-neighbour enlarged, so its pixels show) | SR, side by side with 4 px white gaps (uint8)."""
    assert work.hr is not None and work.colour is not None
    hr = np.rint(work.hr * 255.0).astype(np.uint8)
    h, w = hr.shape[:2]
    lr = work.src if work.src.dtype == np.uint8 else np.rint(to_unit_float(work.src) * 255.0).astype(np.uint8)
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
