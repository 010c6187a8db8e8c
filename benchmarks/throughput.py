"""Service throughput against a plain decode -> upscale -> encode loop, on the same images, in the same run.

    python benchmarks/throughput.py [--images 100] [--size 256] [--model fsrcnn --scale 4] [--settle 0.5]

The plain loop is the floor any service pays: Pillow decode, the same loaded model, Pillow PNG encode, one file
after another. The service run is a real `upscaled run` subprocess: the files are moved into its inbox at once
and the clock stops when the last output exists and its job row is `done`. The model is warmed up in both before
the clock starts. Prints the ratio (plain time / service time; 1.0 = no overhead), with metrics off and on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("UPSCALED_SHARED", ROOT.parent / "shared"))


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` different crops of the Set5 pictures (each enlarged to twice ``size`` first where it is smaller)."""
    rng = np.random.default_rng(0)
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((SHARED / "datasets/Set5/HR").glob("*.png"))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        if min(src.shape[:2]) < size * 2:  # room for many different crops: equal bytes would be one job
            src = np.asarray(Image.fromarray(src).resize((size * 2, size * 2), Image.Resampling.BICUBIC))
        y, x = rng.integers(0, src.shape[0] - size + 1), rng.integers(0, src.shape[1] - size + 1)
        p = folder / f"img{i:04d}.png"
        Image.fromarray(np.ascontiguousarray(src[y : y + size, x : x + size])).save(p)
        paths.append(p)
    return paths


def plain_loop(paths: list[Path], out: Path, weights: Path, model: str, scale: int) -> float:
    from models.registry import LoadContext, ModelCache

    up, _ = ModelCache().get(model, scale, LoadContext(weights, "cpu"))
    up(np.asarray(Image.open(paths[0]).convert("RGB"), np.float32) / 255)  # warm-up
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for p in paths:
        rgb = np.asarray(Image.open(p).convert("RGB"), np.float32) / 255
        sr = up(rgb)
        Image.fromarray(np.clip(np.rint(sr * 255), 0, 255).astype(np.uint8)).save(out / p.name)
    return time.perf_counter() - t0


def service_run(paths: list[Path], work: Path, weights: Path, model: str, scale: int, settle: float,
                metrics: bool) -> float:
    work.mkdir(parents=True)
    cfg = work / "settings.toml"
    cfg.write_text(
        f'weights_dir = "{weights}"\nsettle_seconds = {settle}\nrescan_seconds = 600\nlog_level = "warning"\n'
        f'[[rules]]\nfolder = ""\nmodel = "{model}"\nscale = {scale}\nformat = "png"\n'
        + ("" if metrics else "metrics = []\n")
    )
    staging = work / "staging"  # same filesystem as the inbox, so the drop is a rename
    staging.mkdir()
    for p in paths:
        shutil.copy(p, staging / p.name)
    # Different content from every timed image: the same bytes would be a duplicate, not a job.
    Image.open(paths[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(staging / "warmup.png")
    env = dict(os.environ, UPSCALED_CONFIG=str(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    db = work / "var" / "upscaled.db"
    try:
        _wait(lambda: (work / "inbox").is_dir() and db.exists(), 60)
        os.rename(staging / "warmup.png", work / "inbox" / "warmup.png")
        _wait(lambda: _done(db) == 1, 120)
        t0 = time.perf_counter()
        for p in paths:
            os.rename(staging / p.name, work / "inbox" / p.name)
        _wait(lambda: _done(db) == len(paths) + 1, 1800)
        return time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _done(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def _wait(pred, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("the service did not finish in time")
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--model", default="fsrcnn")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    args = ap.parse_args()

    from models.weights import fetch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights"
        fetch(weights, [args.model, "brisque"], mirror=str(SHARED / "weights"))
        paths = make_images(tmp / "src", args.images, args.size)
        plain = plain_loop(paths, tmp / "plain", weights, args.model, args.scale)
        off = service_run(paths, tmp / "svc-off", weights, args.model, args.scale, args.settle, metrics=False)
        on = service_run(paths, tmp / "svc-on", weights, args.model, args.scale, args.settle, metrics=True)
    result = dict(images=args.images, size=args.size, model=args.model, scale=args.scale, settle_seconds=args.settle,
                  plain_s=round(plain, 2), service_metrics_off_s=round(off, 2), service_metrics_on_s=round(on, 2),
                  ratio_metrics_off=round(plain / off, 3), ratio_metrics_on=round(plain / on, 3))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.images} images {args.size}x{args.size}, {args.model} x{args.scale}, settle {args.settle}s")
    print(f"  plain loop            {plain:7.2f} s  ({args.images / plain:.2f} img/s)")
    print(f"  service, metrics off  {off:7.2f} s  ratio {plain / off:.3f}  (target >= 0.9)")
    print(f"  service, metrics on   {on:7.2f} s  ratio {plain / on:.3f}")


if __name__ == "__main__":
    main()
