"""``upscaled bench``: every model at every scale on a dataset, measured with the papers' protocol.

The library behind the command (the CLI only parses options and prints). One run:

1. reads a dataset (:func:`read_dataset`): HR images in ``DIR/HR`` (or directly in ``DIR``), and where present the
   shipped low-resolution images of the ``LR_bicubic/X{s}`` layout (``img_00N`` is the Nth HR file alphabetically);
2. makes each HR image's LR counterpart per scale: the shipped file, or a downscale of the HR image cropped to a
   multiple of the scale with a named kernel (:data:`DOWNSCALES`), rounded to the file's bit depth between passes
   the way MATLAB does (so ``matlab-bicubic`` reproduces the shipped ``LR_bicubic`` images);
3. upscales every LR image with every model that supports the scale, loading each model once (timed apart), warming
   it up on a small crop, then timing each image on its own;
4. measures ``psnr_y``, ``ssim_y``, ``psnr_rgb``, ``ssim_rgb``, ``mse_rgb`` against the HR image (BT.601 Y, border
   shaved by the scale: :func:`daemon.metrics.full_reference`) on the output rounded to the file's bit depth, and
   BRISQUE on the output;
5. records the run in the store: one ``bench_runs`` row with the settings, one job row (``source = "bench"``) per
   model, scale and image with its metric rows, so that ``upscaled history``, ``stats`` and ``query`` see them.

:func:`frontier` reads a run's summary as quality against cost: per scale, which models no other beats on both
PSNR-Y and seconds per megapixel (``upscaled bench --frontier``).

Models that cannot run a scale (unknown id, no weights for that scale, weights missing, backend not installed, a
device that is not there) are *skipped*, never fatal: the summary has a row that says so and why.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import numpy as np

from daemon.config import Rule
from daemon.jobs import BenchStore, Finished, JobSpec, utcnow, worker_id
from daemon.media import decode
from daemon.metrics import Brisque, Metric, full_reference, y_bt601
from daemon.protocol import BENCHMARK_METRICS, DOWNSCALES, METRICS, SSIM_WINDOW, make_lr, min_side, modcrop, quantise
from models.catalog import get_entry
from models.errors import (
    ImageError,
    ImageTooSmallError,
    ModelError,
    OutOfMemoryError,
    UpscaledError,
    WeightsMissingError,
)
from models.registry import LoadContext, ModelCache, check_scale
from models.weights import locate

LR_CHOICES = ("auto", "shipped", *DOWNSCALES)  # auto: shipped LR_bicubic where complete, else matlab-bicubic
QUALITY_METRICS = BENCHMARK_METRICS  # psnr_y, ssim_y, psnr_rgb, ssim_rgb, mse_rgb
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Which way is better, per summary column: the report marks the best value of each.
HIGHER_IS_BETTER = {name: m.higher_is_better for name, m in METRICS.items()} | {
    "load_s": False,
    "s_per_image": False,
    "s_per_mp": False,
}
CROP_SIDE = 96  # HR pixels per side of the zoomed comparison crops (rounded to a multiple of every scale)
_WARMUP_SIDE = 48  # LR pixels per side of the warm-up crop


class BenchError(UpscaledError):
    """A dataset or a setting the bench cannot work with (no images, an LR image of the wrong size...)."""

    kind = "bench"


# --- the dataset ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchImage:
    name: str  # the HR file's path relative to the dataset root, e.g. "HR/baby.png"
    hr_path: Path
    lr_paths: dict[int, Path] = field(default_factory=dict)  # scale -> shipped LR file


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    images: tuple[BenchImage, ...]

    def shipped(self, scale: int) -> bool:
        """True when every image has a shipped LR file for ``scale``."""
        return bool(self.images) and all(scale in im.lr_paths for im in self.images)


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name
    )


def _match_lr(files: list[Path], hr: Path, index: int, scale: int) -> Path | None:
    """The LR file for the ``index``-th (1-based) HR file: by the HR stem (``baby.png``, ``0801x2.png``,
    ``baby_x2_LR.png``) first, else by position (``img_001_SRF_2_LR.png``)."""
    by_stem = re.compile(rf"{re.escape(hr.stem)}(?:[_-]?x{scale})?(?:[_-]LR)?", re.IGNORECASE)
    for f in files:
        if by_stem.fullmatch(f.stem):
            return f
    for f in files:
        m = re.fullmatch(r"img_(\d+)(?:_.*)?", f.stem)
        if m and int(m.group(1)) == index:
            return f
    return None


def read_dataset(root: Path) -> Dataset:
    """Read a dataset folder.

    HR images are the image files in ``root/HR`` if that folder exists, else those directly in ``root`` (an HR-only
    folder), in alphabetical order. Shipped LR images are looked for in ``root/LR_bicubic/X{s}`` (and ``x{s}``) for
    every ``s``; an HR image's LR file is found by its stem, else by the ``img_00N`` position convention.

    Raises:
        BenchError: ``root`` is not a folder, or holds no image files.
    """
    root = Path(root)
    if not root.is_dir():
        raise BenchError(f"dataset {root} is not a folder")
    hr_dir = root / "HR" if (root / "HR").is_dir() else root
    hrs = _images_in(hr_dir)
    if not hrs:
        raise BenchError(f"dataset {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in {hr_dir}")
    lr_sets: dict[int, list[Path]] = {}
    lr_root = root / "LR_bicubic"
    if lr_root.is_dir():
        for sub in sorted(lr_root.iterdir()):
            m = re.fullmatch(r"[xX](\d+)", sub.name)
            if m and sub.is_dir():
                lr_sets[int(m.group(1))] = _images_in(sub)
    images = []
    for i, hr in enumerate(hrs, start=1):
        lrs = {s: f for s, files in lr_sets.items() if (f := _match_lr(files, hr, i, s)) is not None}
        images.append(BenchImage(name=str(hr.relative_to(root)), hr_path=hr, lr_paths=lrs))
    return Dataset(root=root, name=root.resolve().name, images=tuple(images))


# --- settings and results -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSettings:
    """What to run. ``downscale`` is one of :data:`LR_CHOICES`; ``device`` as in the configuration."""

    dataset: Path
    models: tuple[str, ...]
    scales: tuple[int, ...]
    weights_dir: Path
    downscale: str = "auto"
    device: str = "cpu"
    repeat: int = 1  # timed runs per image; the median is kept
    brisque: bool = True
    max_pixels: int = 100_000_000

    def to_json(self) -> dict[str, Any]:
        return dict(
            dataset=str(Path(self.dataset).resolve()),
            models=list(self.models),
            scales=list(self.scales),
            downscale=self.downscale,
            device=self.device,
            repeat=self.repeat,
            brisque=self.brisque,
            weights_dir=str(self.weights_dir),
        )


@dataclass
class CropSet:
    """One image at one scale: the same HR region from the ground truth, the LR input and every model."""

    image: str
    scale: int
    box: tuple[int, int, int, int]  # x, y, width, height in HR pixels
    tiles: list[tuple[str, np.ndarray, float | None]] = field(default_factory=list)  # (label, uint8 RGB, psnr_y)


@dataclass
class BenchResult:
    run_id: int | None
    started_at: str
    settings: dict[str, Any]
    cpu: str
    summary: list[dict[str, Any]]  # one row per model and scale, skipped ones included
    images: list[dict[str, Any]]  # one row per model, scale and image that ran
    crops: list[CropSet]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [r for r in self.summary if r["status"] == "skipped"]

    def to_json(self) -> dict[str, Any]:
        """The ``--format json`` document (see docs/bench-json-schema.json)."""
        return dict(
            run_id=self.run_id,
            started_at=self.started_at,
            cpu=self.cpu,
            settings=self.settings,
            metrics_protocol=PROTOCOL,
            results=[_finite(r) for r in self.summary],
            images=[_finite(r) for r in self.images],
        )


PROTOCOL = {
    "psnr_y": "PSNR (peak 255) on BT.601 Y (16-235), border shaved by the scale, against the HR image",
    "ssim_y": "SSIM (Wang et al., 11x11 Gaussian sigma 1.5) on BT.601 Y, border shaved by the scale",
    "psnr_rgb": "PSNR (peak 255) on RGB 0-255, border shaved by the scale",
    "ssim_rgb": "SSIM per RGB channel, mean, border shaved by the scale",
    "mse_rgb": "mean squared error on RGB 0-255, border shaved by the scale",
    "brisque": "BRISQUE (LIVE model, cv2.quality) of the output, no reference, lower is better",
    "s_per_image": "median warm inference seconds per image (model load timed apart, in load_s)",
    "s_per_mp": "inference seconds per megapixel of output",
}


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def frontier(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quality against cost: per scale, the rows that ran, fastest first, each marked ``frontier`` True when no
    other model at that scale has at least its PSNR-Y at no more seconds per megapixel (and beats it on one of the
    two); otherwise ``beaten_by`` names one that does. ``gain_db`` is PSNR-Y above bicubic's at that scale, when
    bicubic ran. Skipped and failed rows are left out."""
    ran = [r for r in summary if r.get("psnr_y") is not None and r.get("s_per_mp") is not None]
    out = []
    for scale in sorted({r["scale"] for r in ran}):
        rows = sorted((r for r in ran if r["scale"] == scale), key=lambda r: (r["s_per_mp"], -r["psnr_y"]))
        bicubic = next((r["psnr_y"] for r in rows if r["model"] == "bicubic"), None)
        for r in rows:
            better = next(
                (
                    o
                    for o in rows
                    if o is not r
                    and o["psnr_y"] >= r["psnr_y"]
                    and o["s_per_mp"] <= r["s_per_mp"]
                    and (o["psnr_y"] > r["psnr_y"] or o["s_per_mp"] < r["s_per_mp"])
                ),
                None,
            )
            out.append(
                dict(
                    model=r["model"],
                    scale=scale,
                    psnr_y=r["psnr_y"],
                    ssim_y=r["ssim_y"],
                    brisque=r.get("brisque"),
                    s_per_mp=r["s_per_mp"],
                    gain_db=None if bicubic is None else r["psnr_y"] - bicubic,
                    frontier=better is None,
                    beaten_by=better["model"] if better else "",
                )
            )
    return out


# --- progress -------------------------------------------------------------------------------------------------------
class Progress:
    """A progress bar when ``stream`` is a terminal, plain log lines otherwise. Never writes to stdout by default,
    so that ``--format json`` output stays clean."""

    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.done, self.width = max(total, 1), 0, width
        self._t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if self.tty:
            filled = round(self.width * self.done / self.total)
            bar = "#" * filled + "." * (self.width - filled)
            line = f"\r[{bar}] {self.done}/{self.total} {time.perf_counter() - self._t0:5.0f}s {what}"
            self.stream.write(line[:160].ljust(100))
        else:
            self.stream.write(f"bench {self.done}/{self.total}: {what}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        self.stream.write(("\r" + " " * 110 + "\r" if self.tty else "") + f"bench: {message}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --- small pieces ---------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model as lscpu shows it (``model name`` in /proc/cpuinfo), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def downscale(hr: np.ndarray, scale: int, method: str, bits: int) -> np.ndarray:
    """The LR image of ``hr`` (already cropped to a multiple of ``scale``) with kernel ``method``, on the file's
    sample grid: :func:`daemon.protocol.make_lr`, the same as the service's benchmark mode.

    Raises:
        BenchError: an unknown kernel.
    """
    if method not in DOWNSCALES:
        raise BenchError(f"downscale kernel must be one of {', '.join(DOWNSCALES)}, got {method!r}")
    return make_lr(hr, scale, method, bits)


def detail_box(hr: np.ndarray, side: int, align: int) -> tuple[int, int, int, int]:
    """The ``side`` x ``side`` square of ``hr`` with the most detail (sum of Y gradient magnitudes), its corner on
    a multiple of ``align`` so that it maps onto whole LR pixels at every scale dividing ``align``."""
    h, w = hr.shape[:2]
    usable_h, usable_w = h - h % align, w - w % align
    side = max(align, min(side, usable_h, usable_w) // align * align)
    y = y_bt601(hr)
    grad = np.zeros_like(y)
    grad[:, 1:] += np.abs(np.diff(y, axis=1))
    grad[1:, :] += np.abs(np.diff(y, axis=0))
    integral = np.pad(grad.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, box = -1.0, (0, 0, side, side)
    for y0 in range(0, usable_h - side + 1, align):
        for x0 in range(0, usable_w - side + 1, align):
            total = (
                integral[y0 + side, x0 + side] - integral[y0, x0 + side] - integral[y0 + side, x0] + integral[y0, x0]
            )
            if total > best:
                best, box = float(total), (x0, y0, side, side)
    return box


def _u8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _crop(img: np.ndarray, box: tuple[int, int, int, int], scale: int = 1) -> np.ndarray:
    x, y, w, h = (v // scale for v in box)
    return img[y : y + h, x : x + w]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parse_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, UpscaledError):
        return exc.kind, str(exc)
    if isinstance(exc, MemoryError):
        return OutOfMemoryError.kind, "out of memory"
    return "error", f"{type(exc).__name__}: {exc}"


# --- the run --------------------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    image: BenchImage
    hr: np.ndarray  # cropped to a multiple of the scale
    lr: np.ndarray
    bits: int
    width: int  # the HR file's
    height: int
    fmt: str
    mode: str
    sha: str
    decode_s: float
    too_small: str | None = None  # why this image cannot be measured at this scale (its jobs fail with it)


def _plan(settings: BenchSettings) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """(model, scale) pairs to run, and summary rows for those that cannot run, in the order given."""
    runnable, skipped = [], []
    for model in settings.models:
        for scale in settings.scales:
            try:
                entry = check_scale(model, scale, settings.weights_dir)
                if entry.kind != "upscaler":
                    raise BenchError(f"{model} is a {entry.kind} model, not an upscaler")
            except UpscaledError as exc:
                skipped.append(_skip_row(model, scale, exc.kind, str(exc)))
                continue
            runnable.append((model, scale))
    return runnable, skipped


def _skip_row(model: str, scale: int, kind: str, reason: str, lr: str = "") -> dict[str, Any]:
    row: dict[str, Any] = dict(model=model, scale=scale, lr=lr, status="skipped", images=0, failed=0)
    row.update({m: None for m in (*QUALITY_METRICS, "brisque", "load_s", "s_per_image", "s_per_mp")})
    row.update(backend=None, device=None, reason=f"{kind}: {reason}")
    return row


def _lr_source(dataset: Dataset, scale: int, choice: str) -> str:
    if choice == "shipped":
        if not dataset.shipped(scale):
            missing = [im.name for im in dataset.images if scale not in im.lr_paths]
            raise BenchError(
                f"--downscale shipped: {dataset.root}/LR_bicubic/X{scale} lacks an LR image for "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        return f"shipped:LR_bicubic/X{scale}"
    if choice == "auto":
        return f"shipped:LR_bicubic/X{scale}" if dataset.shipped(scale) else "matlab-bicubic"
    return choice


def _prepare(dataset: Dataset, scale: int, source: str, max_pixels: int) -> list[_Prepared]:
    out = []
    for im in dataset.images:
        t0 = time.perf_counter()
        dec = decode.decode(im.hr_path, max_pixels)
        decode_s = time.perf_counter() - t0
        hr = modcrop(dec.rgb, scale)
        need = min_side(scale)
        if min(hr.shape[:2]) < need:
            why = (
                f"{im.name} is {dec.width}x{dec.height}: at x{scale} the metrics need at least {need} px per side "
                f"({scale} px shaved from each border, then SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window)"
            )
            out.append(
                _Prepared(
                    im,
                    hr,
                    np.zeros((0, 0, 3), np.float32),
                    dec.bits,
                    dec.width,
                    dec.height,
                    dec.format,
                    dec.mode,
                    _sha256(im.hr_path),
                    decode_s,
                    too_small=why,
                )
            )
            continue
        if source.startswith("shipped:"):
            lr_dec = decode.decode(im.lr_paths[scale], max_pixels)
            lr = lr_dec.rgb
            want = (hr.shape[0] // scale, hr.shape[1] // scale)
            if lr.shape[:2] != want:
                raise BenchError(
                    f"{im.lr_paths[scale]} is {lr.shape[1]}x{lr.shape[0]}, expected {want[1]}x{want[0]} "
                    f"(the HR image {im.name} cropped to a multiple of {scale}, divided by {scale})"
                )
        else:
            lr = downscale(hr, scale, source, dec.bits)
        out.append(
            _Prepared(im, hr, lr, dec.bits, dec.width, dec.height, dec.format, dec.mode, _sha256(im.hr_path), decode_s)
        )
    return out


def run_bench(
    settings: BenchSettings,
    store: BenchStore | None = None,
    progress: Progress | None = None,
    cache: ModelCache | None = None,
) -> BenchResult:
    """Run the benchmark described by ``settings``; record it in ``store`` when given.

    Per model and scale the summary row holds the mean of each metric over the images, the model load time
    (``load_s``), the median warm inference time per image (``s_per_image``) and per output megapixel
    (``s_per_mp``). A pair that cannot run gets ``status = "skipped"`` and a ``reason``; an image that fails gets a
    failed job row and counts in ``failed`` (``status = "partial"``, or ``"failed"`` when none ran).

    Raises:
        BenchError: no models or scales, a scale below 2, an unknown ``downscale``, a dataset that cannot be read,
            or a shipped LR image of the wrong size. (An image too small to measure at a scale is not an error of
            the run: its jobs fail with ``too-small``.)
        ImageError subclasses: an HR or LR file that cannot be decoded.
    """
    # 1. Check the settings and read the dataset.
    if not settings.models:
        raise BenchError("no models to bench: name at least one with --models")
    if not settings.scales or any(s < 2 for s in settings.scales):
        raise BenchError(f"scales must be integers of at least 2, got {list(settings.scales)}")
    if settings.downscale not in LR_CHOICES:
        raise BenchError(f"--downscale must be one of {', '.join(LR_CHOICES)}, got {settings.downscale!r}")
    if settings.repeat < 1:
        raise BenchError(f"--repeat must be at least 1, got {settings.repeat}")
    dataset = read_dataset(settings.dataset)
    runnable, skipped = _plan(settings)
    cache = cache or ModelCache()
    sources = {s: _lr_source(dataset, s, settings.downscale) for s in settings.scales}
    progress = progress or Progress(len(runnable) * len(dataset.images))
    brisque = _brisque(settings, progress) if settings.brisque else None
    for row in skipped:
        row["lr"] = sources[row["scale"]]
        progress.note(f"skipping {row['model']} x{row['scale']}: {row['reason']}")

    # 2. The run's record, so that its jobs can point at it.
    started = utcnow()
    run_settings = settings.to_json() | dict(
        dataset_name=dataset.name,
        images=[im.name for im in dataset.images],
        lr_sources={str(s): v for s, v in sources.items()},
        cpu=cpu_name(),
    )
    run_id = store.add_bench_run(json.dumps(run_settings)) if store is not None else None

    # 3. Per scale: the LR images once, then every model that runs at that scale.
    summary: dict[tuple[str, int], dict[str, Any]] = {(r["model"], r["scale"]): r for r in skipped}
    image_rows: list[dict[str, Any]] = []
    crops: list[CropSet] = []
    align = math.lcm(*settings.scales)
    for scale in settings.scales:
        models = [m for m, s in runnable if s == scale]
        if not models:
            continue
        prepared = _prepare(dataset, scale, sources[scale], settings.max_pixels)
        sets: list[CropSet | None] = []
        for p in prepared:
            if p.too_small:
                sets.append(None)
                continue
            # One region for every scale where the scales' common multiple allows it, else one per scale.
            box = detail_box(p.hr, CROP_SIDE, align if align <= min(CROP_SIDE, *p.hr.shape[:2]) else scale)
            cs = CropSet(p.image.name, scale, box)
            lr_crop = _crop(p.lr, box, scale)
            lr_big = np.repeat(np.repeat(lr_crop, scale, axis=0), scale, axis=1)  # nearest: LR pixels show
            cs.tiles += [("HR", _u8(_crop(p.hr, box)), None), (f"LR ({sources[scale]})", _u8(lr_big), None)]
            sets.append(cs)
        crops += [cs for cs in sets if cs is not None]
        for model in models:
            row, rows = _run_model(
                settings, model, scale, sources[scale], prepared, sets, cache, brisque, store, run_id, progress
            )
            summary[(model, scale)] = row
            image_rows += rows
    progress.close()
    order = [(m, s) for m in settings.models for s in settings.scales]
    return BenchResult(
        run_id=run_id,
        started_at=started.isoformat(timespec="seconds") + "Z",
        settings=run_settings,
        cpu=run_settings["cpu"],
        summary=[summary[k] for k in order if k in summary],
        images=image_rows,
        crops=crops,
    )


def _brisque(settings: BenchSettings, progress: Progress) -> Brisque | None:
    try:
        entry = get_entry("brisque")
        return Brisque(locate(settings.weights_dir, entry, 0), locate(settings.weights_dir, entry, 1))
    except WeightsMissingError as exc:
        progress.note(f"BRISQUE left out: {exc}")
        return None


def _run_model(
    settings: BenchSettings,
    model: str,
    scale: int,
    source: str,
    prepared: Sequence[_Prepared],
    sets: Sequence[CropSet | None],
    cache: ModelCache,
    brisque: Brisque | None,
    store: BenchStore | None,
    run_id: int | None,
    progress: Progress,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    # 1. Load, timed apart; a model that cannot load here is skipped with its reason.
    ctx = LoadContext(Path(settings.weights_dir), settings.device)
    t0 = time.perf_counter()
    try:
        up, _ = cache.get(model, scale, ctx)
        # Warm-up on a small crop: first-call costs (graph set-up, allocator, kernels) stay out of the timings.
        # A model that fails here for the model's sake (weights, device, precision) cannot run at all.
        first = next((p.lr for p in prepared if p.too_small is None), None)
        try:
            if first is not None:
                up(np.ascontiguousarray(first[:_WARMUP_SIDE, :_WARMUP_SIDE]))
        except ImageError:
            pass  # the crop is too small for this model: each image will say for itself whether it is too
    except (ModelError, ImportError) as exc:
        kind, msg = _parse_error(exc)
        progress.note(f"skipping {model} x{scale}: {kind}: {msg}")
        for _ in prepared:
            progress.step(f"{model} x{scale} skipped")
        return _skip_row(model, scale, kind, msg, source), []
    load_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    failures = 0
    load_left = load_s  # recorded on the first job that finishes, as the service records a cold start
    fingerprint_base = f"bench:{run_id}:{model}:x{scale}:{source}"
    # 2. Each image: timed inference, then the metrics on the output as an image file of that depth would hold it.
    for p, cs in zip(prepared, sets, strict=True):
        job_id = _register(store, run_id, p, model, scale, source, settings, fingerprint_base)
        try:
            if p.too_small:
                raise ImageTooSmallError(p.too_small)
            times = []
            for _ in range(settings.repeat):
                t1 = time.perf_counter()
                sr = up(p.lr)
                times.append(time.perf_counter() - t1)
            infer_s = statistics.median(times)
            t2 = time.perf_counter()
            sr = quantise(sr, p.bits)
            results: list[Metric] = full_reference(sr, p.hr, scale, QUALITY_METRICS)
            if brisque is not None:
                results.append(brisque(sr))
            metrics_s = time.perf_counter() - t2
        except Exception as exc:  # noqa: BLE001 - one image's failure is recorded on its job, never ends the run
            failures += 1
            kind, msg = _parse_error(exc)
            if store is not None and job_id is not None:
                store.fail(job_id, kind, msg)
            progress.step(f"{model} x{scale} {p.image.name} FAILED {kind}: {msg}")
            continue
        values = {m.name: m.value for m in results}
        out_h, out_w = sr.shape[:2]
        mp = out_w * out_h / 1e6
        row = dict(
            model=model,
            scale=scale,
            lr=source,
            image=p.image.name,
            width=out_w,
            height=out_h,
            **{m: values.get(m) for m in (*QUALITY_METRICS, "brisque")},
            s_per_image=infer_s,
            s_per_mp=infer_s / mp,
            job_id=job_id,
        )
        rows.append(row)
        if cs is not None:
            cs.tiles.append((model, _u8(_crop(sr, cs.box)), values.get("psnr_y")))
        if store is not None and job_id is not None:
            fields = dict(
                input_width=p.width,
                input_height=p.height,
                input_format=p.fmt,
                input_mode=p.mode,
                bits=p.bits,
                output_width=out_w,
                output_height=out_h,
                backend=up.backend,
                device=up.device,
                precision=up.precision,
                t_queue=0.0,
                t_decode=p.decode_s,
                t_load=load_left,
                t_infer=infer_s,
                t_metrics=metrics_s,
                t_total=p.decode_s + load_left + infer_s + metrics_s,
            )
            store.finish([Finished(job_id, None, fields, results)])
        load_left = 0.0
        progress.step(f"{model} x{scale} {p.image.name} psnr_y={values['psnr_y']:.2f} {infer_s:.3f}s")
    # 3. The summary row: means over the images that ran.
    summary: dict[str, Any] = dict(
        model=model,
        scale=scale,
        lr=source,
        status="ok" if not failures else ("partial" if rows else "failed"),
        images=len(rows),
        failed=failures,
    )
    for m in (*QUALITY_METRICS, "brisque"):
        vals = [r[m] for r in rows if r[m] is not None]
        summary[m] = statistics.fmean(vals) if vals else None
    summary["load_s"] = load_s
    summary["s_per_image"] = statistics.fmean(r["s_per_image"] for r in rows) if rows else None
    total_mp = sum(r["width"] * r["height"] for r in rows) / 1e6
    summary["s_per_mp"] = sum(r["s_per_image"] for r in rows) / total_mp if rows else None
    summary.update(backend=up.backend, device=up.device, reason=None)
    return summary, rows


def _register(
    store: BenchStore | None,
    run_id: int | None,
    p: _Prepared,
    model: str,
    scale: int,
    source: str,
    settings: BenchSettings,
    fingerprint_base: str,
) -> int | None:
    """A running job row for one image of one pair, or None without a store."""
    if store is None:
        return None
    fingerprint = hashlib.sha256(f"{fingerprint_base}:{p.image.name}".encode()).hexdigest()[:16]
    # The rule as far as a Rule can say it; the LR source of each scale (a shipped file, say) is in the run's row.
    rule = Rule(
        model=model,
        scale=scale,
        mode="benchmark",
        downscale=source if source in DOWNSCALES else "matlab-bicubic",
        device=settings.device,
        metrics=list(QUALITY_METRICS),
    )
    spec = JobSpec(
        sha=p.sha,
        rule=rule,
        rel=PurePosixPath(p.image.name),
        input_path=str(p.image.hr_path.resolve()),
        source="bench",
        folder="(bench)",
        input_size=p.image.hr_path.stat().st_size,
        fingerprint=fingerprint,
        bench_run_id=run_id,
    )
    (reg,) = store.register([spec])
    jobs = store.claim(worker_id(), job_id=reg.job.id)
    return jobs[0].id if jobs else None
