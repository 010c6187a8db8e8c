"""An animated GIF through the media layer at x2: time and peak memory (the figure in docs/formats.md).

The input is a 100-frame 320x240 GIF made here from Set5 pictures (a slow pan across them, so that frames differ
the way video does), written by Pillow. The "model" is a stand-in: ``cv2.resize`` x2 with INTER_CUBIC on the uint8
frame (about 1 ms a frame), so the figure is the media layer's own cost: streaming decode, the per-frame assemble,
and the encode. Each run is a fresh process (``--child``) so that its peak RSS (``ru_maxrss``) is its own; the
table gives the RSS after imports, the peak, and what the frames alone are at output size.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/animation.py [--frames 100] [--formats gif,webp,png]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SET5_HR = ROOT.parent / "shared" / "datasets" / "Set5" / "HR"


def make_gif(frames: int, size: tuple[int, int] = (320, 240)) -> bytes:
    files = sorted(SET5_HR.glob("*.png"))
    pics = [np.asarray(Image.open(f).convert("RGB")) for f in files] or [
        np.random.default_rng(0).integers(0, 256, (512, 512, 3), np.uint8)
    ]
    strip = np.concatenate(
        [np.asarray(Image.fromarray(p).resize((size[1] * p.shape[1] // p.shape[0], size[1]))) for p in pics], axis=1
    )
    step = max(1, (strip.shape[1] - size[0]) // frames)
    ims = [Image.fromarray(np.ascontiguousarray(strip[:, i * step : i * step + size[0]])) for i in range(frames)]
    buf = io.BytesIO()
    ims[0].save(buf, "GIF", save_all=True, append_images=ims[1:], duration=40, loop=0)
    return buf.getvalue()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, fmt: str) -> dict:
    import cv2

    from daemon.imageio import Frame, assemble, encode_animation
    from daemon.media.decode import decode_bytes

    data = Path(path).read_bytes()
    base = rss_mib()
    t0 = time.perf_counter()
    d = decode_bytes(data, 10**9, max_frames=10_000)

    def upscaled():
        for frame in _chain(d.first, d.rest()):
            px = frame.pixels
            colour = cv2.resize(
                np.ascontiguousarray(px[:, :, :3]), (px.shape[1] * 2, px.shape[0] * 2), interpolation=cv2.INTER_CUBIC
            )
            alpha = None
            if px.shape[2] == 4:
                alpha = cv2.resize(px[:, :, 3], (px.shape[1] * 2, px.shape[0] * 2), interpolation=cv2.INTER_CUBIC)
            yield Frame(assemble(colour, alpha, 8, False), frame.duration_ms, frame.disposal, frame.blend)

    out, notes = encode_animation(upscaled(), fmt, loop=d.loop, meta=d.meta)
    seconds = time.perf_counter() - t0
    back = decode_bytes(out, 10**9, max_frames=10_000)
    return dict(
        format=fmt,
        frames=back.frames,
        size=f"{back.width}x{back.height}",
        seconds=round(seconds, 2),
        ms_per_frame=round(1000 * seconds / d.frames, 1),
        rss_after_imports_mib=round(base),
        peak_rss_mib=round(rss_mib()),
        out_kib=len(out) // 1024,
        frames_at_output_mib=round(d.frames * back.width * back.height * 3 / 2**20),
        notes=notes,
    )


def _chain(first, rest):
    yield first
    yield from rest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--formats", default="gif,webp,png")
    p.add_argument("--child", nargs=2, metavar=("GIF", "FORMAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    gif = Path("/tmp") / f"upscaled-bench-{args.frames}.gif"
    gif.write_bytes(make_gif(args.frames))
    print(
        f"input: {args.frames} frames of 320x240, {gif.stat().st_size // 1024} KiB GIF; x2 by cv2.resize "
        "(INTER_CUBIC) as the model stand-in"
    )
    print(
        "| output | frames | size | seconds | ms/frame | RSS after imports | peak RSS | frames at output size |"
        "\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for fmt in args.formats.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(gif), fmt], capture_output=True, text=True, check=True, cwd=ROOT
        )
        r = json.loads(proc.stdout)
        print(
            f"| {fmt} | {r['frames']} | {r['size']} | {r['seconds']} | {r['ms_per_frame']} | "
            f"{r['rss_after_imports_mib']} MiB | {r['peak_rss_mib']} MiB | {r['frames_at_output_mib']} MiB (RGB) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
