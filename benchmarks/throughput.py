"""The service against the loop a user would write instead, on the same images, in the same run.

    python benchmarks/throughput.py [--small 100] [--large 30] [--gan 8] [--drops 20] [--quick]

The baseline is what a user runs without us, never our own code:

- **OpenCV**: ``cv2.imread`` -> ``cv2.dnn_superres.DnnSuperResImpl.upsample`` -> ``cv2.imwrite`` (PNG with
  OpenCV's default settings), one file after another;
- **spandrel**: ``cv2.imread`` -> ``spandrel.ModelLoader().load_from_file`` model on a torch tensor ->
  ``cv2.imwrite``, one file after another.

The service is a real ``upscaled run`` subprocess with the shipped defaults: a rule that sets only folder, model,
scale, ``format = "png"`` and ``metrics = []`` (one run with the default metrics too). The files are renamed into
its inbox at once and the clock stops when the last job row is ``done``; ``settle_seconds`` (0.2 s) is subtracted,
as a file must sit still that long before it is taken. Both sides load the model before the clock starts. The
ratio is plain seconds / service seconds (above 1: the service is faster than the loop).

Drop -> done: one file at a time into an idle service; the time from the rename to the job's ``finished_at``
(the same clock), less ``settle_seconds``, against the loop's time per image.

Images are crops and mirrored tiles of the Set5 pictures in ``../shared/datasets`` (every file different).
Results go to benchmarks/results/throughput-<date>.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("UPSCALED_SHARED", ROOT.parent / "shared"))
SETTLE = 0.2


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """``n`` different PNGs of ``size`` = (w, h): random crops of the Set5 pictures, mirror-tiled where smaller."""
    rng = np.random.default_rng(seed)
    sources = [cv2.imread(str(p)) for p in sorted((SHARED / "datasets" / "Set5" / "HR").glob("*.png"))]
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        mirrored = np.concatenate([src, src[:, ::-1]], axis=1)
        mirrored = np.concatenate([mirrored, mirrored[::-1]], axis=0)  # seamless when tiled
        big = np.tile(mirrored, (h // mirrored.shape[0] + 2, w // mirrored.shape[1] + 2, 1))
        y, x = rng.integers(0, big.shape[0] - h + 1), rng.integers(0, big.shape[1] - w + 1)
        crop = np.ascontiguousarray(big[y : y + h, x : x + w])
        p = folder / f"{folder.name}{i:04d}.png"
        cv2.imwrite(str(p), crop)
        out.append(p)
    return out


# --- the loops a user writes ----------------------------------------------------------------------------------------
def opencv_loop(paths: list[Path], out: Path, weights: Path, scale: int) -> float:
    sr = cv2.dnn_superres.DnnSuperResImpl_create()
    sr.readModel(str(weights / "opencv" / f"FSRCNN_x{scale}.pb"))
    sr.setModel("fsrcnn", scale)
    sr.upsample(cv2.imread(str(paths[0])))  # warm-up, outside the clock
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for p in paths:
        cv2.imwrite(str(out / p.name), sr.upsample(cv2.imread(str(p))))
    return time.perf_counter() - t0


def spandrel_loop(paths: list[Path], out: Path, model_file: Path) -> float:
    import spandrel
    import torch

    model = spandrel.ModelLoader().load_from_file(str(model_file)).eval()

    def run(p: Path) -> np.ndarray:
        img = cv2.imread(str(p))[:, :, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            y = model(x)
        return (y[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()[:, :, ::-1]

    run(paths[0])  # warm-up
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for p in paths:
        cv2.imwrite(str(out / p.name), run(p))
    return time.perf_counter() - t0


# --- the service ------------------------------------------------------------------------------------------------------
class Service:
    """A real `upscaled run` on a temp folder; files are renamed in from a staging folder on the same filesystem."""

    def __init__(self, work: Path, weights: Path, model: str, scale: int, metrics: bool, extra: str = "") -> None:
        work.mkdir(parents=True)
        self.work = work
        cfg = work / "settings.toml"
        cfg.write_text(
            f'weights_dir = "{weights}"\nsettle_seconds = {SETTLE}\nrescan_seconds = 600\nlog_level = "warning"\n'
            f'{extra}[[rules]]\nfolder = ""\nmodel = "{model}"\nscale = {scale}\nformat = "png"\n'
            + ("" if metrics else "metrics = []\n"))
        self.db = work / "var" / "upscaled.db"
        self.staging = work / "staging"
        self.staging.mkdir()
        env = dict(os.environ, UPSCALED_CONFIG=str(cfg))
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=work, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(lambda: (work / "inbox").is_dir() and self.done() >= 0, 60)

    def done(self) -> int:
        if not self.db.exists():
            return -1
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]
        except sqlite3.OperationalError:
            return -1
        finally:
            con.close()

    def finished_at(self, rel: str) -> dt.datetime | None:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            row = con.execute("SELECT finished_at FROM jobs WHERE rel_path = ? AND state = 'done'", (rel,)).fetchone()
        finally:
            con.close()
        return None if row is None else dt.datetime.fromisoformat(row[0])

    def warm_up(self, path: Path) -> None:
        """One job first, so that the model is loaded before the clock starts (as the loops load theirs)."""
        img = cv2.imread(str(path))[::-1]  # other bytes than every timed image
        cv2.imwrite(str(self.staging / "warmup.png"), img)
        before = self.done()
        os.rename(self.staging / "warmup.png", self.work / "inbox" / "warmup.png")
        _wait(lambda: self.done() == before + 1, 300)

    def batch(self, paths: list[Path]) -> float:
        for p in paths:
            shutil.copy(p, self.staging / p.name)
        before = self.done()
        t0 = time.perf_counter()
        for p in paths:
            os.rename(self.staging / p.name, self.work / "inbox" / p.name)
        _wait(lambda: self.done() == before + len(paths), 3600)
        return time.perf_counter() - t0 - SETTLE

    def drops(self, paths: list[Path]) -> list[float]:
        """Drop -> done for each file, one at a time, the service idle in between; settle excluded."""
        out = []
        for p in paths:
            shutil.copy(p, self.staging / p.name)
            time.sleep(0.3)  # idle: the last job's metrics and moves are over
            t_drop = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            os.rename(self.staging / p.name, self.work / "inbox" / p.name)
            _wait(lambda p=p: self.finished_at(p.name) is not None, 120, poll=0.005)
            out.append((self.finished_at(p.name) - t_drop).total_seconds() - SETTLE)
        return out

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def _wait(pred, timeout: float, poll: float = 0.02) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("the service did not finish in time")
        time.sleep(poll)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=100, help="inputs of 80x120 (x4 -> 320x480)")
    ap.add_argument("--large", type=int, default=30, help="inputs of 320x480 (x4 -> 1280x1920)")
    ap.add_argument("--gan", type=int, default=8, help="inputs of 320x480 for RealESRGANv2-animevideo-xsx4")
    ap.add_argument("--drops", type=int, default=20, help="single files dropped into an idle service")
    ap.add_argument("--quick", action="store_true", help="a few files of each, to try the script")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.small, args.large, args.gan, args.drops = 10, 3, 2, 3

    from models.weights import fetch

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights"
        fetch(weights, ["fsrcnn", "brisque", "realesrgan-animevideo-xsx4"], mirror=str(SHARED / "weights"))
        small = make_images(tmp / "small", args.small, (80, 120), 1)
        large = make_images(tmp / "large", args.large, (320, 480), 2)
        gan = make_images(tmp / "gan", args.gan, (320, 480), 3)
        drops = make_images(tmp / "drops", args.drops, (80, 120), 4)

        def row(work: str, plain: float, svc: float, n: int, **extra) -> None:  # noqa: ANN003
            rows.append(dict(work=work, images=n, plain_img_s=round(n / plain, 2), service_img_s=round(n / svc, 2),
                             ratio=round(plain / svc, 3), **extra))

        # FSRCNN x4, small and large, metrics off; then the large set with the default metrics on.
        svc = Service(tmp / "svc-fsrcnn", weights, "fsrcnn", 4, metrics=False)
        try:
            svc.warm_up(small[0])
            plain_small = opencv_loop(small, tmp / "plain-small", weights, 4)
            s_small = svc.batch(small)
            plain_large = opencv_loop(large, tmp / "plain-large", weights, 4)
            s_large = svc.batch(large)
            latencies = svc.drops(drops)
            rss = svc.peak_rss_mb()
        finally:
            svc.stop()
        row("FSRCNN x4, 80x120 -> 320x480", plain_small, s_small, len(small))
        row("FSRCNN x4, 320x480 -> 1280x1920", plain_large, s_large, len(large), service_peak_rss_mb=round(rss))
        on = Service(tmp / "svc-fsrcnn-metrics", weights, "fsrcnn", 4, metrics=True)
        try:
            on.warm_up(large[0])
            s_large_on = on.batch([p for p in large])
        finally:
            on.stop()
        rows.append(dict(work="FSRCNN x4 320x480, default metrics on vs off", images=len(large),
                         service_img_s=round(len(large) / s_large_on, 2),
                         ratio=round(s_large / s_large_on, 3), note="metrics on / metrics off (target >= 0.8)"))
        # RealESRGANv2-animevideo-xsx4 through spandrel.
        gsvc = Service(tmp / "svc-gan", weights, "realesrgan-animevideo-xsx4", 4, metrics=False)
        try:
            gsvc.warm_up(gan[0])
            plain_gan = spandrel_loop(gan, tmp / "plain-gan", weights / "spandrel" / "RealESRGANv2-animevideo-xsx4.pth")
            s_gan = gsvc.batch(gan)
        finally:
            gsvc.stop()
        row("RealESRGANv2-animevideo-xsx4, 320x480 -> 1280x1920", plain_gan, s_gan, len(gan))
        per_image = plain_small / len(small)
        p50 = statistics.median(latencies)
        rows.append(dict(work="drop -> done, one 80x120 file into an idle service, settle excluded",
                         images=len(latencies), loop_ms_per_image=round(per_image * 1000, 1),
                         service_p50_ms=round(p50 * 1000, 1), overhead_p50_ms=round((p50 - per_image) * 1000, 1),
                         note="target: overhead <= 20 ms"))
    result = dict(date=dt.date.today().isoformat(), cpu=cpu_name(), cores=os.cpu_count(), rows=rows,
                  command="python benchmarks/throughput.py" + (" --quick" if args.quick else ""))
    path = args.json or ROOT / "benchmarks" / "results" / f"throughput-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['date']}, {result['cpu']}, {result['cores']} cores")
    for r in rows:
        print("  " + "; ".join(f"{k} {v}" for k, v in r.items()))
    print(f"(written to {path})")


if __name__ == "__main__":
    main()
