"""Benchmarks for the spandrel backend, on the CPU.

1. Tiling overhead: throughput of our upscaler on one 512x512 image divided by a plain, untiled spandrel call on the
   same image (target >= 0.85). Measured with the default window size (the CPU budget covers 512x512 in one window)
   and with windows forced to a 2x2 and a 3x3 grid, each with the layout the backend chose and with channels_last
   off, so that the tiling's own cost shows apart from the layout's gain.
2. Peak RSS upscaling a 2048x2048 uint8 image x4 with realesrgan-animevideo-xsx4, in a fresh subprocess, read from
   ru_maxrss (target <= 2.5 GB; the uint8 output alone is 201 MB). The figure includes importing torch.
3. Images per second of each shipped spandrel model on Set5 (LR_bicubic at the model's scale, load time excluded).

Usage (from the repository root; weights are fetched into a temporary folder from the mirror):

    python benchmarks/spandrel_bench.py --mirror ../shared/weights --set5 ../shared/datasets/Set5

Writes benchmarks/results/spandrel.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.registry import LoadContext, ModelCache  # noqa: E402
from models.tiling import plan_axis  # noqa: E402
from models.weights import fetch  # noqa: E402

SHIPPED = {"realesrgan-animevideo-xsx2": 2, "realesrgan-animevideo-xsx4": 4, "ditn-real-x4": 4, "ditn-real-gan-x4": 4}
XSX4 = "realesrgan-animevideo-xsx4"


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0)


def tiling_overhead(weights: Path, img: np.ndarray, model: str, repeats: int) -> list[dict]:
    import spandrel
    import torch

    cache = ModelCache()
    cache.get(model, SHIPPED[model], LoadContext(weights, "cpu"))  # loading sets torch's threads, for both runs
    plain = spandrel.ModelLoader().load_from_file(weights / "spandrel" / _file(model)).eval()
    x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    t_plain = best_of(lambda: plain(x), repeats)
    rows = []
    for label, tile in (("default", None), ("2x2 grid", 288), ("3x3 grid", 200)):
        up = cache.get(model, SHIPPED[model], LoadContext(weights, "cpu", tile=tile))[0]
        side = up.window_side(uint8=False)
        windows = len(plan_axis(512, side, up.model.geometry_for(side).overlap, up.size.multiple_of)) ** 2
        t_ours = best_of(lambda up=up: up(img), repeats)
        chosen = up.channels_last
        up.model.channels_last = False  # the same run with the plain call's memory layout: tiling cost alone
        up.model.descriptor.model.to(memory_format=torch.contiguous_format)
        t_contig = best_of(lambda up=up: up(img), repeats)
        up.model.channels_last = chosen
        up.model.descriptor.model.to(memory_format=torch.channels_last if chosen else torch.contiguous_format)
        rows.append(
            dict(
                model=model,
                setting=label,
                windows=windows,
                channels_last=chosen,
                plain_s=t_plain,
                ours_s=t_ours,
                ratio=t_plain / t_ours,
                ours_contiguous_s=t_contig,
                ratio_contiguous=t_plain / t_contig,
            )
        )
    return rows


def _file(model: str) -> str:
    from models.catalog import get_entry

    return Path(get_entry(model).weight_files()[0].path).name


RSS_CHILD = r"""
import resource, sys, time, json
import numpy as np
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from PIL import Image
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def hwm():  # this process image's own peak; ru_maxrss also keeps the parent's size at the fork
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from models.registry import LoadContext, ModelCache
side = int(sys.argv[3])
src = Image.open(sys.argv[4]).convert("RGB").resize((side, side), Image.BICUBIC)
img = np.asarray(src)  # uint8: what the service hands the model for an 8-bit file
del src
up = ModelCache().get("realesrgan-animevideo-xsx4", 4, LoadContext(Path(sys.argv[2]), "cpu"))[0]
after_load = hwm()
t0 = time.perf_counter()
u8 = up(img)  # uint8 out: windows are blended into one 201 MB array, no float copy of the whole result
seconds = time.perf_counter() - t0
report = dict(side=side, out_shape=list(u8.shape), uint8_mb=u8.nbytes / 1e6, rss_after_load_mb=after_load / 1e6,
              peak_rss_mb=rss() / 1e6, peak_vmhwm_mb=hwm() / 1e6, seconds=seconds)
report.update(window=up.window_side(), bytes_per_px=up.bytes_per_px)
print(json.dumps(report))
"""


def peak_rss(weights: Path, set5: Path, side: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(ROOT), str(weights), str(side), str(set5 / "HR" / "baby.png")],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def set5_speed(weights: Path, set5: Path, repeats: int) -> list[dict]:
    cache = ModelCache()
    rows = []
    for model, scale in SHIPPED.items():
        lrs = [read_rgb(p) for p in sorted((set5 / "LR_bicubic" / f"X{scale}").glob("*.png"))]
        up = cache.get(model, scale, LoadContext(weights, "cpu"))[0]
        for lr in lrs:  # warm-up at every size
            up(lr)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for lr in lrs:
                up(lr)
            runs.append(time.perf_counter() - t0)
        best = min(runs)
        rows.append(
            dict(
                model=model,
                scale=scale,
                images=len(lrs),
                seconds=best,
                images_per_s=len(lrs) / best,
                lr_pixels=sum(a.shape[0] * a.shape[1] for a in lrs),
                channels_last=up.channels_last,
                arch=up.arch,
                threads=up.threads,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mirror", type=Path, default=ROOT.parent / "shared" / "weights")
    ap.add_argument("--set5", type=Path, default=ROOT.parent / "shared" / "datasets" / "Set5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-side", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "spandrel.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp)
        reports = fetch(weights, list(SHIPPED), mirror=str(args.mirror))
        bad = [r for r in reports if r.status not in ("fetched", "present")]
        if bad:
            sys.exit(f"could not fetch weights: {bad}")
        # First, while this process is small: Linux carries a parent's RSS at the fork into the child's ru_maxrss.
        rss = peak_rss(weights, args.set5, args.rss_side)
        import torch

        img = read_rgb(args.set5 / "HR" / "baby.png")[:512, :512]
        result = dict(
            machine=dict(cpus=os.cpu_count(), usable=len(os.sched_getaffinity(0)), torch=torch.__version__),
            tiling=tiling_overhead(weights, img, XSX4, args.repeats)
            + tiling_overhead(weights, img, "ditn-real-x4", args.repeats),
            rss=rss,
            set5=set5_speed(weights, args.set5, args.repeats),
        )
        result["machine"]["threads"] = torch.get_num_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {result['machine']}")
    print("tiling overhead on a 512x512 image (ratio = plain spandrel time / ours; >= 0.85 wanted):")
    for r in result["tiling"]:
        print(
            f"  {r['model']:28s} {r['setting']:9s} {r['windows']} window(s)  plain {r['plain_s']:.3f}s  "
            f"ours {r['ours_s']:.3f}s ratio {r['ratio']:.2f} (channels_last={r['channels_last']})  "
            f"contiguous {r['ours_contiguous_s']:.3f}s ratio {r['ratio_contiguous']:.2f}"
        )
    r = result["rss"]
    print(
        f"peak RSS, {r['side']}x{r['side']} x4 xsx4 on the CPU: ru_maxrss {r['peak_rss_mb']:.0f} MB, VmHWM "
        f"{r['peak_vmhwm_mb']:.0f} MB (after torch import and load: {r['rss_after_load_mb']:.0f} MB; uint8 output "
        f"{r['uint8_mb']:.0f} MB; window {r['window']} px; {r['seconds']:.1f} s)"
    )
    print("Set5, images per second (LR_bicubic at the model's scale):")
    for r in result["set5"]:
        print(
            f"  {r['model']:28s} x{r['scale']} {r['arch']:8s} {r['images_per_s']:.2f} img/s "
            f"({r['seconds']:.2f} s for {r['images']}, {r['threads']} threads)"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
