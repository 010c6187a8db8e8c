"""The service against the loop a user would write instead, on the same images, in the same run.

    python benchmarks/throughput.py [--small 100] [--large 30] [--gan 8] [--drops 20] [--quick]
                                    [--baseline-tree PATH]

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

``--baseline-tree PATH`` runs a second service from another checkout (an earlier commit, say, in a git worktree)
beside this one, in the same run: its small batches and its drops take turns with this tree's, and the table gives
both, and the difference of the drop -> done p50.

Images are crops and mirrored tiles of the Set5 pictures in ``../shared/datasets`` (every file different).
Results go to benchmarks/results/throughput-<date>.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
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

    def __init__(
        self,
        work: Path,
        weights: Path,
        model: str,
        scale: int,
        metrics: bool,
        extra: str = "",
        tree: Path | None = None,
        command: Sequence[str] = ("-m", "daemon", "run"),
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``tree``: another checkout whose code the daemon runs; ``command``: the interpreter's arguments that
        start the daemon; ``log``: where its output goes (else nowhere); ``env``: more of the daemon's environment."""
        work.mkdir(parents=True)
        self.work = work
        cfg = work / "settings.toml"
        cfg.write_text(
            f'weights_dir = "{weights}"\nsettle_seconds = {SETTLE}\nrescan_seconds = 600\nlog_level = "warning"\n'
            f'{extra}[[rules]]\nfolder = ""\nmodel = "{model}"\nscale = {scale}\nformat = "png"\n'
            + ("" if metrics else "metrics = []\n")
        )
        self.db = work / "var" / "upscaled.db"
        self._con: sqlite3.Connection | None = None
        self.staging = work / "staging"
        self.staging.mkdir()
        environ = dict(os.environ, **(env or {}), UPSCALED_CONFIG=str(cfg))
        if tree is not None:  # another checkout's code, first on the path
            environ["PYTHONPATH"] = str(tree)
        with open(log, "ab") if log else open(os.devnull, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, *command], cwd=work, env=environ, stdout=out, stderr=out)
        _wait(lambda: (work / "inbox").is_dir() and self.done() >= 0, 60)

    def _row(self, sql: str, *args: object) -> tuple | None:
        """One row of ``sql`` on one read-only connection kept open. The clock's polls (every 5 to 20 ms) opened a
        fresh connection each time, about 1 ms of this process's CPU per image, taken from the service's cores."""
        if self._con is None:
            self._con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        return self._con.execute(sql, args).fetchone()

    def done(self) -> int:
        """Jobs done; -1 before the service has made its database."""
        if not self.db.exists():
            return -1
        try:
            return self._row("SELECT count(*) FROM jobs WHERE state = 'done'")[0]
        except sqlite3.OperationalError:
            return -1

    def finished_at(self, rel: str) -> dt.datetime | None:
        row = self._row("SELECT finished_at FROM jobs WHERE rel_path = ? AND state = 'done'", rel)
        return None if row is None else dt.datetime.fromisoformat(row[0])

    def metrics_recorded(self, n: int) -> float:
        """Seconds from the start of the last batch until its ``n`` jobs' metrics are all recorded."""
        _wait(
            lambda: (
                self._count("SELECT count(*) FROM jobs WHERE state = 'done' AND metrics_state = 'done'")
                >= self._metrics_before + n
            ),
            3600,
        )
        return time.perf_counter() - self._batch_t0

    def _count(self, sql: str) -> int:
        return self._row(sql)[0]

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
        self._metrics_before = self._count("SELECT count(*) FROM jobs WHERE state = 'done' AND metrics_state = 'done'")
        t0 = self._batch_t0 = time.perf_counter()
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

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of each of the service's threads, by the name the kernel shows
        (the worker names its threads: upscaled-feed, upscaled-cpu.0, upscaled-write, ...)."""
        out: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self._con is not None:
            self._con.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def _wait(pred, timeout: float, poll: float = 0.02) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("the service did not finish in time")
        time.sleep(poll)


def process_cpu() -> float:
    """CPU seconds (user + system, every thread) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def paired(rounds: list[tuple[float, float]], n: int) -> dict:
    """Median and range of the per-round ratios plain / service, with the images per second of each side."""
    ratios = [p / s for p, s in rounds]
    return dict(
        images=n,
        rounds=len(rounds),
        plain_img_s=round(statistics.median(n / p for p, _ in rounds), 2),
        service_img_s=round(statistics.median(n / s for _, s in rounds), 2),
        ratio=round(statistics.median(ratios), 3),
        ratio_range=[round(min(ratios), 3), round(max(ratios), 3)],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=100, help="inputs of 80x120 (x4 -> 320x480) per round")
    ap.add_argument("--large", type=int, default=30, help="inputs of 320x480 (x4 -> 1280x1920) per round")
    ap.add_argument("--gan", type=int, default=8, help="inputs of 320x480 for RealESRGANv2-animevideo-xsx4 per round")
    ap.add_argument("--drops", type=int, default=20, help="single files dropped into an idle service")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="plain and service take turns this many times; the "
        "ratio is the median of the rounds' ratios (a shared machine's noise hits both sides alike)",
    )
    ap.add_argument("--quick", action="store_true", help="a few files of each, one round, to try the script")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="a second checkout whose service takes turns with this one's on the small batches and the drops",
    )
    args = ap.parse_args()
    if args.quick:
        args.small, args.large, args.gan, args.drops, args.rounds = 10, 3, 2, 3, 1
    if min(args.small, args.large, args.gan, args.drops, args.rounds) < 1:
        ap.error("--small, --large, --gan, --drops and --rounds take 1 or more (each part warms up on its first image)")

    from models.weights import fetch

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights"
        fetch(weights, ["fsrcnn", "brisque", "realesrgan-animevideo-xsx4"], mirror=str(SHARED / "weights"))
        # Fresh files every round: the service never redoes a content it has done (that is its point).
        small = [make_images(tmp / f"small{r}", args.small, (80, 120), 10 + r) for r in range(args.rounds)]
        large = [make_images(tmp / f"large{r}", args.large, (320, 480), 20 + r) for r in range(args.rounds)]
        gan = [make_images(tmp / f"gan{r}", args.gan, (320, 480), 30 + r) for r in range(args.rounds)]
        drops = make_images(tmp / "drops", args.drops, (80, 120), 4)

        # FSRCNN x4, small and large, metrics off, and the large set again with the default metrics on: both
        # services are up for all rounds (an idle one wakes four times a second), the clocks run one at a time.
        off = Service(tmp / "svc-fsrcnn", weights, "fsrcnn", 4, metrics=False)
        on = Service(tmp / "svc-fsrcnn-metrics", weights, "fsrcnn", 4, metrics=True)
        base = None
        if args.baseline_tree is not None:
            base = Service(tmp / "svc-base", weights, "fsrcnn", 4, metrics=False, tree=args.baseline_tree.resolve())
        r_small, r_large, r_metrics, all_metrics, r_base = [], [], [], [], []
        base_latencies: list[float] = []
        try:
            off.warm_up(small[0][0])
            on.warm_up(large[0][0])
            if base is not None:
                base.warm_up(small[0][0])
            cpu_small: dict[str, float] = {}  # the service's CPU seconds per thread during the small batches
            plain_cpu = 0.0
            for r in range(args.rounds):
                c0 = process_cpu()
                plain_small = opencv_loop(small[r], tmp / f"plain-small{r}", weights, 4)
                plain_cpu += process_cpu() - c0  # with the model's load and warm-up: a few ms in all
                before = off.thread_cpu()
                r_small.append((plain_small, off.batch(small[r])))
                for k, v in off.thread_cpu().items():
                    cpu_small[k] = cpu_small.get(k, 0.0) + v - before.get(k, 0.0)
                if base is not None:
                    r_base.append((plain_small, base.batch(small[r])))
                plain_large = opencv_loop(large[r], tmp / f"plain-large{r}", weights, 4)
                s_off = off.batch(large[r])
                r_large.append((plain_large, s_off))
                s_on = on.batch(large[r])
                r_metrics.append((s_off, s_on))
                all_metrics.append(on.metrics_recorded(len(large[r])) - SETTLE)
            if base is None:
                latencies = off.drops(drops)
            else:  # one file into each, in turns, so that both see the same machine
                latencies = []
                for d in drops:
                    latencies += off.drops([d])
                    base_latencies += base.drops([d])
            rss = off.peak_rss_mb()
        finally:
            off.stop()
            on.stop()
            if base is not None:
                base.stop()
        per_thread = {
            k: round(1000 * v / (args.small * args.rounds), 2)
            for k, v in sorted(cpu_small.items(), key=lambda kv: -kv[1])
        }
        rows.append(
            dict(
                work="FSRCNN x4, 80x120 -> 320x480",
                **paired(r_small, args.small),
                plain_cpu_ms_per_image=round(1000 * plain_cpu / (args.small * args.rounds), 2),
                service_cpu_ms_per_image=round(sum(per_thread.values()), 2),
                service_cpu_ms_per_image_by_thread={k: v for k, v in per_thread.items() if v >= 0.05},
            )
        )
        if base is not None:
            rows.append(
                dict(work=f"FSRCNN x4, 80x120, the baseline tree {args.baseline_tree}", **paired(r_base, args.small))
            )
        rows.append(
            dict(work="FSRCNN x4, 320x480 -> 1280x1920", **paired(r_large, args.large), service_peak_rss_mb=round(rss))
        )
        m = paired(r_metrics, args.large)
        rows.append(
            dict(
                work="FSRCNN x4 320x480, default metrics on vs off",
                images=args.large,
                rounds=args.rounds,
                service_img_s=m["service_img_s"],
                ratio=m["ratio"],
                ratio_range=m["ratio_range"],
                all_metrics_recorded_img_s=round(statistics.median(args.large / t for t in all_metrics), 2),
                note="outputs per second, metrics on / off (target >= 0.8); the metrics trail the outputs",
            )
        )
        # RealESRGANv2-animevideo-xsx4 through spandrel.
        gsvc = Service(tmp / "svc-gan", weights, "realesrgan-animevideo-xsx4", 4, metrics=False)
        model_file = weights / "spandrel" / "RealESRGANv2-animevideo-xsx4.pth"
        r_gan = []
        try:
            gsvc.warm_up(gan[0][0])
            for r in range(args.rounds):
                r_gan.append((spandrel_loop(gan[r], tmp / f"plain-gan{r}", model_file), gsvc.batch(gan[r])))
        finally:
            gsvc.stop()
        rows.append(dict(work="RealESRGANv2-animevideo-xsx4, 320x480 -> 1280x1920", **paired(r_gan, args.gan)))
        per_image = statistics.median(p for p, _ in r_small) / args.small
        p50 = statistics.median(latencies)
        rows.append(
            dict(
                work="drop -> done, one 80x120 file into an idle service, settle excluded",
                images=len(latencies),
                loop_ms_per_image=round(per_image * 1000, 1),
                service_p50_ms=round(p50 * 1000, 1),
                overhead_p50_ms=round((p50 - per_image) * 1000, 1),
                note="target: overhead <= 20 ms",
            )
        )
        if base_latencies:
            b50 = statistics.median(base_latencies)
            rows.append(
                dict(
                    work=f"drop -> done, the baseline tree {args.baseline_tree}, in turns with this one",
                    images=len(base_latencies),
                    service_p50_ms=round(b50 * 1000, 1),
                    overhead_p50_ms=round((b50 - per_image) * 1000, 1),
                    this_tree_minus_baseline_p50_ms=round((p50 - b50) * 1000, 1),
                )
            )
    result = dict(
        date=dt.date.today().isoformat(),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        rows=rows,
        command="python benchmarks/throughput.py"
        + (" --quick" if args.quick else "")
        + (f" --baseline-tree {args.baseline_tree}" if args.baseline_tree else ""),
    )
    path = args.json or ROOT / "benchmarks" / "results" / f"throughput-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['date']}, {result['cpu']}, {result['cores']} cores")
    for r in rows:
        print("  " + "; ".join(f"{k} {v}" for k, v in r.items()))
    print(f"(written to {path})")


if __name__ == "__main__":
    main()
