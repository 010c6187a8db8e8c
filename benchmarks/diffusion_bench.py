"""Diffusion backend: seconds per megapixel of output and peak RSS, tiled and untiled, for the tiny pipeline.

    python benchmarks/diffusion_bench.py [--steps 2] [--sizes 128,512]

The real Stable Diffusion x4 weights are several GB and not reachable here, so this measures the tiny, randomly
initialised pipeline the tests build (same code path, same pipeline class), at 128->512 and 512->2048, with tiling
on (the default 128 px windows) and off (one window). Each case runs in a fresh subprocess so that its peak RSS
(``ru_maxrss``) is its own. The point to read: with tiling on, peak RSS must not grow with the input size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_case(folder: Path, size: int, tile: int, steps: int) -> dict:
    import numpy as np

    from models.registry import LoadContext, ModelCache

    up, _ = ModelCache().get(f"diffusers:{folder}", 4, LoadContext(folder.parent, "cpu", tile))
    rng = np.random.default_rng(0)
    img = np.clip(np.cumsum(rng.normal(0, 0.02, (size, size, 3)), axis=1) % 1.0, 0, 1).astype(np.float32)
    params = {"num_inference_steps": steps, "guidance_scale": 0.0, "seed": 1}
    up(img[:32, :32], params)  # warm-up
    t0 = time.perf_counter()
    out = up(img, params)
    seconds = time.perf_counter() - t0
    mp = out.shape[0] * out.shape[1] / 1e6
    return dict(
        size=size,
        out=out.shape[0],
        tile=tile,
        steps=steps,
        seconds=round(seconds, 2),
        s_per_mp=round(seconds / mp, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sizes", default="128,512")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--case", nargs=4, metavar=("FOLDER", "SIZE", "TILE", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "diffusion.json")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.case:
        folder, size, tile, steps = args.case
        print(json.dumps(one_case(Path(folder), int(size), int(tile), int(steps))))
        return
    from models.testing import build_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_pipeline(Path(tmp) / "tiny")
        for size in (int(s) for s in args.sizes.split(",")):
            for label, tile in (("tiled", 128), ("untiled", 100_000)):
                cmd = [sys.executable, __file__, "--case", str(folder), str(size), str(tile), str(args.steps)]
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    row = (
                        json.loads(res.stdout.strip().splitlines()[-1])
                        if res.returncode == 0
                        else dict(size=size, tile=tile, error=res.stderr.strip().splitlines()[-1][:200])
                    )
                except subprocess.TimeoutExpired:
                    row = dict(size=size, tile=tile, error=f"timed out after {args.timeout:.0f} s")
                row["mode"] = label
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    tiled = [r for r in rows if r["mode"] == "tiled" and "peak_rss_mb" in r]
    if len(tiled) >= 2:
        small, big = tiled[0], tiled[-1]
        print(
            f"tiled peak RSS {small['peak_rss_mb']} MB at {small['size']} px -> {big['peak_rss_mb']} MB at "
            f"{big['size']} px ({big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x for "
            f"{(big['size'] / small['size']) ** 2:.0f}x the pixels)"
        )


if __name__ == "__main__":
    main()
