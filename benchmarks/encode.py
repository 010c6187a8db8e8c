"""PNG encoders, timed and sized on photo-like images, against ``cv2.imencode('.png')`` with OpenCV's defaults.

The baseline is what a user who doubts the service writes: ``cv2.imwrite(path, img)`` with no parameters. Every
other row is a ratio against that baseline, measured in the same run on the same arrays. The images are
built from Set5's HR pictures (``../shared/datasets/Set5/HR``):

- ``upscaled``: each HR picture enlarged x4 with Lanczos and cut to 1280x1920: smooth, like a model's output,
  which is what the service actually encodes;
- ``tiled``: 1280x1920 mosaics of mirrored HR crops at their native sharpness, like a camera photo;
- ``rgba`` and ``rgb16``: the ``upscaled`` image with an alpha gradient, and at 16 bits.

Encoders: the service's own (``daemon.media.png``: numpy row filters, zlib-ng) at several levels, OpenCV (libpng)
at each level with zlib's default strategy and with OpenCV's own default (level 1, RLE strategy, SUB filter),
Pillow, imagecodecs' libpng and libspng, and fpng (8-bit only, no metadata). Optional encoders that are not
installed are skipped with a line that says so.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/encode.py [--repeat 3] [--images upscaled,tiled] [--json out.json]

and, to time the encoder the service ships (``daemon.imageio.encode``) at its default level::

    PYTHONPATH=. .venv/bin/python benchmarks/encode.py --service
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SET5_HR = ROOT.parent / "shared" / "datasets" / "Set5" / "HR"
SIZE = (1280, 1920)  # width, height: a 320x480 input at x4, a typical photo job


def _set5() -> list[np.ndarray]:
    files = sorted(SET5_HR.glob("*.png"))
    if not files:
        sys.exit(f"no Set5 HR pictures under {SET5_HR}")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def upscaled_image(index: int = 0) -> np.ndarray:
    """A Set5 picture enlarged x4 (Lanczos), mirrored to fill and cut to 1280x1920: smooth like a model output."""
    hr = _set5()[index % 5]
    big = cv2.resize(hr, (hr.shape[1] * 4, hr.shape[0] * 4), interpolation=cv2.INTER_LANCZOS4)
    reps = (-(-SIZE[1] // big.shape[0]), -(-SIZE[0] // big.shape[1]))
    tiles = [[big if (r + c) % 2 == 0 else big[:, ::-1] for c in range(reps[1])] for r in range(reps[0])]
    return np.ascontiguousarray(
        np.block([[t] for t in [np.concatenate(row, axis=1) for row in tiles]])[: SIZE[1], : SIZE[0]]
    )


def tiled_image(seed: int = 0) -> np.ndarray:
    """A 1280x1920 mosaic of 128x128 crops of the Set5 pictures at their own sharpness (a camera-like photo)."""
    rng = np.random.default_rng(seed)
    pics = _set5()
    out = np.empty((SIZE[1], SIZE[0], 3), np.uint8)
    for y in range(0, SIZE[1], 128):
        for x in range(0, SIZE[0], 128):
            p = pics[int(rng.integers(len(pics)))]
            oy, ox = int(rng.integers(0, p.shape[0] - 128)), int(rng.integers(0, p.shape[1] - 128))
            out[y : y + 128, x : x + 128] = p[oy : oy + 128, ox : ox + 128]
    return out


def images(names: list[str]) -> dict[str, np.ndarray]:
    base = upscaled_image()
    made = {
        "upscaled": lambda: base,
        "tiled": tiled_image,
        "rgba": lambda: np.dstack([base, np.tile(np.linspace(0, 255, SIZE[0]).astype(np.uint8), (SIZE[1], 1))]),
        "rgb16": lambda: (
            base.astype(np.uint16) * 257 + np.random.default_rng(1).integers(0, 257, base.shape, np.uint16)
        ),
    }
    return {n: made[n]() for n in names}


# --- encoders: each takes an RGB(A) array and returns PNG bytes ------------------------------------------------------
def _bgr(a: np.ndarray) -> np.ndarray:
    return a[:, :, [2, 1, 0, 3][: a.shape[2]]]


def cv2_default(a: np.ndarray) -> bytes:
    return cv2.imencode(".png", _bgr(a))[1].tobytes()


def cv2_level(level: int, strategy: int | None = None) -> Callable[[np.ndarray], bytes]:
    def enc(a: np.ndarray) -> bytes:
        params = [cv2.IMWRITE_PNG_COMPRESSION, level]
        if strategy is not None:
            params += [cv2.IMWRITE_PNG_STRATEGY, strategy]
        return cv2.imencode(".png", _bgr(a), params)[1].tobytes()

    return enc


def pillow_level(level: int) -> Callable[[np.ndarray], bytes]:
    def enc(a: np.ndarray) -> bytes:
        if a.dtype == np.uint16:
            raise TypeError("Pillow cannot write 16-bit colour PNG")
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG", compress_level=level)
        return buf.getvalue()

    return enc


def imagecodecs_png(level: int, fast: bool = False) -> Callable[[np.ndarray], bytes]:
    import imagecodecs

    def enc(a: np.ndarray) -> bytes:
        if fast:
            return imagecodecs.png_encode(a, level=level, strategy=3, filter=16)
        return imagecodecs.png_encode(a, level=level)

    return enc


def imagecodecs_spng(level: int) -> Callable[[np.ndarray], bytes]:
    import imagecodecs

    return lambda a: imagecodecs.spng_encode(a, level=level)


def fpng_encode(a: np.ndarray) -> bytes:
    import fpng

    if a.dtype != np.uint8:
        raise TypeError("fpng writes 8-bit RGB and RGBA only")
    return (
        fpng.from_ndarray(a)
        if hasattr(fpng, "from_ndarray")
        else fpng.from_bytes(a.tobytes(), a.shape[1], a.shape[0], a.shape[2])
    )


def service(level: int | None, with_meta: bool = False) -> Callable[[np.ndarray], bytes]:
    """daemon.imageio.encode as the worker calls it; ``with_meta`` adds an sRGB profile and a camera EXIF block."""
    from PIL import ImageCms

    from daemon import imageio

    meta = None
    if with_meta:
        exif = Image.Exif()
        exif[0x010F], exif[0x0110] = "Camera", "Model"
        exif.get_ifd(0x8769)[0x9003] = "2024:01:02 03:04:05"
        meta = imageio.Metadata(
            icc=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(), exif=exif.tobytes()
        )

    def enc(a: np.ndarray) -> bytes:
        kw = {} if level is None else {"compression": level}
        return imageio.encode(a, "png", meta=meta, **kw)[0]

    return enc


def encoders(service_only: bool, levels: tuple[int, ...] = (0, 2, 3, 6)) -> dict[str, Callable[[np.ndarray], bytes]]:
    rle = cv2.IMWRITE_PNG_STRATEGY_RLE
    out: dict[str, Callable[[np.ndarray], bytes]] = {"cv2 defaults (baseline)": cv2_default}
    if service_only:
        from daemon.imageio import DEFAULT_PNG_COMPRESSION

        out[f"upscaled encode, default ({DEFAULT_PNG_COMPRESSION})"] = service(None)
        out["upscaled encode, default, ICC+EXIF"] = service(None, with_meta=True)
        for level in levels:
            out[f"upscaled encode, compression={level}"] = service(level)
        return out
    for level in (0, 1, 2, 6):
        out[f"upscaled encode, compression={level}"] = service(level)
    for level in (0, 1, 2, 3, 4, 6, 9):
        out[f"cv2 level {level}"] = cv2_level(level)
    for level in (1, 2, 3):
        out[f"cv2 level {level} RLE"] = cv2_level(level, rle)
    for level in (1, 6, 9):
        out[f"Pillow level {level}"] = pillow_level(level)
    optional: list[tuple[str, Callable[[], Callable[[np.ndarray], bytes]]]] = [
        ("imagecodecs libpng level 1 RLE+SUB", lambda: imagecodecs_png(1, fast=True)),
        ("imagecodecs libpng level 6", lambda: imagecodecs_png(6)),
        ("imagecodecs libspng level 1", lambda: imagecodecs_spng(1)),
        ("imagecodecs libspng level 6", lambda: imagecodecs_spng(6)),
        ("fpng", lambda: fpng_encode),
    ]
    for name, make in optional:
        try:
            out[name] = make()
        except ImportError as exc:
            print(f"skipped {name}: {exc}", file=sys.stderr)
    return out


def check(a: np.ndarray, png: bytes) -> None:
    """Every encoder must give back the same pixels (decoded by OpenCV, a reader none of them uses for writing)."""
    back = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    back = back[:, :, None] if back.ndim == 2 else back
    if back.shape[2] >= 3:
        back = back[:, :, [2, 1, 0, 3][: back.shape[2]]]
    if not np.array_equal(back, a):
        raise AssertionError("the PNG does not decode to the encoded pixels")


def run(names: list[str], repeat: int, service_only: bool, levels: tuple[int, ...] = (0, 2, 3, 6)) -> list[dict]:
    """Time every encoder on every image. The encoders take turns, round after round (in a shuffled order each
    round), so that a slow moment of this shared machine lands on all of them alike; each figure is a median."""
    rows = []
    rng = random.Random(0)
    for img_name, arr in images(names).items():
        encs = encoders(service_only, levels)
        sizes: dict[str, int] = {}
        for enc_name, enc in list(encs.items()):
            try:
                png = enc(arr)  # warm-up, and the pixel check
            except TypeError as exc:
                print(f"  {img_name:9} {enc_name:40} n/a: {exc}")
                del encs[enc_name]
                continue
            check(arr, png)
            sizes[enc_name] = len(png)
        times: dict[str, list[float]] = {name: [] for name in encs}
        for _ in range(repeat):
            order = list(encs)
            rng.shuffle(order)
            for enc_name in order:
                t0 = time.perf_counter()
                encs[enc_name](arr)
                times[enc_name].append(time.perf_counter() - t0)
        base = "cv2 defaults (baseline)"
        base_t, base_size = statistics.median(times[base]), sizes[base]
        for enc_name in encs:
            t = statistics.median(times[enc_name])
            row = dict(
                image=img_name,
                encoder=enc_name,
                ms=round(t * 1000, 1),
                kib=round(sizes[enc_name] / 1024),
                speed_vs_baseline=round(base_t / t, 2),
                size_vs_baseline=round(sizes[enc_name] / base_size, 3),
            )
            rows.append(row)
            print(
                f"  {img_name:9} {enc_name:40} {row['ms']:8.1f} ms {row['kib']:7d} KiB "
                f"speed x{row['speed_vs_baseline']:<5} size x{row['size_vs_baseline']}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="upscaled,tiled,rgba,rgb16")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--service", action="store_true", help="time daemon.imageio.encode instead of the encoders")
    p.add_argument("--levels", default="0,2,3,6", help="with --service: the other levels to time (comma-separated)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    print(
        f"PNG encode of {SIZE[0]}x{SIZE[1]} images, median of {args.repeat}; ratios against cv2.imencode('.png') "
        f"with OpenCV {cv2.__version__}'s defaults, same run"
    )
    levels = tuple(int(v) for v in args.levels.split(",") if v != "")
    rows = run(args.images.split(","), args.repeat, args.service, levels)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
