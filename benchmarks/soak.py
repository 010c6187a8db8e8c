"""Memory over many jobs: a real daemon fed batch after batch, its RSS and its resources sampled after each one.

    python benchmarks/soak.py [--jobs 50000] [--batch 1000] [--model bicubic] [--scale 2] [--metrics default|off]
                              [--size 64x48] [--wait measured|done] [--warmup 1000] [--tracemalloc 1000,5000]
                              [--tree PATH] [--json PATH]

The daemon is a real ``upscaled run`` subprocess (:class:`throughput.Service`: a temp folder, the shipped defaults,
one rule with the model, the scale, ``format = "png"`` and the default metrics or ``metrics = []``). Each batch is
``--batch`` different PNGs of ``--size`` (one image with the job's number written into its first pixels: every file
is a new content, so a new job), renamed into the inbox at once. Once every job of the batch is done (``--wait
done``), or done with its metrics recorded too (``--wait measured``, the default: the daemon is idle then), the
script samples, from ``/proc/<pid>``:

- **RSS** (``VmRSS``) and its anonymous part (``RssAnon``: the heap, without the mapped libraries' pages), and the
  RSS of the daemon's child processes together (the sandbox's decoders);
- **threads** and **open file descriptors**;
- the **SQLite file** and its **WAL** (``-wal``) sizes, and the done jobs whose metrics are still to come.

Then it deletes the archived inputs and the outputs of the jobs whose metrics are recorded (a soak of a million jobs
would fill the disk otherwise; the daemon never reads them again). The slope of each quantity is a least-squares
line through the samples after ``--warmup`` jobs (the caches, the allocator's arenas and SQLite's page caches fill
during the first ones), given per 1,000 jobs. ``--wait done`` is a steady stream: the metrics trail the outputs (at
nice 10) and, on a busy machine, fall further behind with every batch.

``--tracemalloc A,B`` starts the daemon with :mod:`tracemalloc` (25 frames) and takes a snapshot after A and after B
jobs (a signal to the daemon, which dumps it; the daemon code is untouched). The report lists the biggest
differences by traceback, with tracemalloc's total beside the RSS at each snapshot: when RSS grows and the Python
total does not, the growth is native (a C library's allocations), and the traceback diff cannot see it. Tracing
slows the daemon several times over (and taking a snapshot adds to its RSS): use it on a few thousand jobs, not for
the slope.

``--tree PATH`` runs the daemon of another checkout (an earlier commit, for a before-and-after).

The figures go to benchmarks/results/soak-<date>-<model>-<metrics>.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.throughput import SHARED, Service, _wait  # noqa: E402

# The daemon under tracemalloc: SIGUSR2 dumps a snapshot to $SOAK_SNAPSHOT.<n> (written whole, then renamed), with
# the traced total beside it. The handler runs on the main thread between two of its bytecodes, as Python's do.
# $SOAK_FRAMES = 0 traces one frame and dumps the total alone: a snapshot of every trace would add its own pages to
# the RSS that is being measured (about 17 MB at 1,500 jobs).
# Tracing starts once the daemon's modules are imported: their imports under 25 frames take a minute here, and what
# they allocate is there before the first snapshot anyway.
TRACED_DAEMON = """
import os, pickle, signal, tracemalloc
import daemon.cli, daemon.metrics, daemon.service, daemon.store, daemon.worker, models.resize
tracemalloc.start(max(1, int(os.environ["SOAK_FRAMES"])))
taken = [0]
def dump(signum, frame):
    taken[0] += 1
    path = f"{os.environ['SOAK_SNAPSHOT']}.{taken[0]}"
    snapshot = tracemalloc.take_snapshot() if os.environ["SOAK_FRAMES"] != "0" else None
    with open(path + ".tmp", "wb") as f:
        pickle.dump((snapshot, tracemalloc.get_traced_memory()[0]), f)
    os.rename(path + ".tmp", path)
signal.signal(signal.SIGUSR2, dump)
from daemon.cli import main
main(["run"], prog_name="upscaled")
"""


@dataclass
class Sample:
    """The daemon's resources after ``jobs`` jobs, all done and measured."""

    jobs: int
    seconds: float  # since the first batch was dropped
    rss_kb: int
    rss_anon_kb: int
    children_rss_kb: int  # the daemon's child processes (the sandbox's decoders), together
    threads: int
    fds: int
    db_bytes: int
    wal_bytes: int
    metrics_pending: int  # done jobs whose metrics are still to come (0 when the feed waits for them)


def proc_status(pid: int) -> dict[str, int]:
    """The ``kB`` lines of /proc/<pid>/status (VmRSS, RssAnon, VmHWM, ...), in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            out[key] = int(value.split()[0])
    return out


def children_rss(pid: int) -> int:
    """The RSS of the child processes of ``pid`` (of all its threads) together, in kB."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for child in (task / "children").read_text().split():
                total += proc_status(int(child)).get("VmRSS", 0)
        except OSError:  # the thread or the child ended meanwhile
            continue
    return total


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ys over xs (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


class Soak:
    """A daemon (see the module docstring) and its feeder: ``feed(n)`` drops ``n`` new files, waits until they are
    done and measured, clears the outputs away and returns a :class:`Sample`."""

    def __init__(
        self,
        work: Path,
        weights: Path,
        model: str,
        scale: int,
        metrics: bool,
        size: tuple[int, int],
        traced: bool = False,
        tree: Path = ROOT,
        frames: int = 25,  # of each trace; 0: one, and no snapshot, the traced total alone
    ) -> None:
        self.work, self.metrics = work, metrics
        self.snapshots = work / "snapshot"
        command = ("-c", TRACED_DAEMON) if traced else ("-m", "daemon", "run")
        env = {"SOAK_SNAPSHOT": str(self.snapshots), "SOAK_FRAMES": str(frames)} if traced else {}
        # SIGTERM gives the metrics still to come 10 s (the rest are measured at the next start), not 120.
        self.service = Service(
            work,
            weights,
            model,
            scale,
            metrics,
            extra="stop_timeout = 10\n",
            tree=tree,
            command=command,
            log=work.parent / "daemon.log",
            env=env,
        )
        w, h = size
        # A smooth picture with some texture, so that the metrics see an image rather than noise or a flat field.
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        rng = np.random.default_rng(0)
        base = np.stack([128 + 90 * np.sin(xx / (5 + 3 * c) + yy / (7 + c)) for c in range(3)], axis=2)
        self.base = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        self.jobs = 0
        self._cleared = 0  # the jobs up to this id have had their files deleted
        self.t0: float | None = None
        self.taken = 0

    @property
    def pid(self) -> int:
        return self.service.proc.pid

    def _image(self, n: int) -> bytes:
        img = self.base.copy()
        img[0, :4, 0] = np.frombuffer(n.to_bytes(4, "little"), np.uint8)  # a new content for every job
        ok, data = cv2.imencode(".png", img)
        assert ok
        return data.tobytes()

    def feed(self, n: int, measured: bool = True, timeout: float = 3600) -> Sample:
        """Drop ``n`` new files at once; when every one is done (and, if ``measured``, its metrics recorded), clear
        away the files the daemon is finished with and sample it.

        Raises:
            RuntimeError: the daemon exited, or a job failed (a soak counts done jobs only).
            TimeoutError: they were not all done within ``timeout`` seconds.
        """
        staging, inbox = self.service.staging, self.work / "inbox"
        names = []
        for i in range(self.jobs, self.jobs + n):
            name = f"s{i:07d}.png"
            (staging / name).write_bytes(self._image(i))
            names.append(name)
        if self.t0 is None:
            self.t0 = time.monotonic()
        for name in names:
            os.rename(staging / name, inbox / name)
        self.jobs += n

        def finished() -> bool:
            if self.service.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.service.proc.returncode}")
            return self._count("state IN ('done', 'failed')") >= self.jobs and (
                not measured or self._count("metrics_state = 'pending'") == 0
            )

        _wait(finished, timeout, poll=0.1)
        failed = self._count("state = 'failed'")
        if failed:
            raise RuntimeError(f"{failed} jobs failed; see {self.work.parent / 'daemon.log'}")
        self._clear()
        return self.sample()

    def _count(self, where: str) -> int:
        return self.service._row(f"SELECT count(*) FROM jobs WHERE {where}")[0]

    def _clear(self) -> None:
        """Delete the outputs and archived inputs of the jobs whose metrics are recorded (a soak of a million jobs
        would fill the disk otherwise): the daemon never reads them again. A job whose metrics are still to come
        keeps its files, and so does every later one (cleared by a later call)."""
        pending = self.service._row("SELECT min(id) FROM jobs WHERE metrics_state = 'pending'")[0]
        upto = pending - 1 if pending is not None else self.service._row("SELECT max(id) FROM jobs")[0]
        rows = self.service._con.execute(
            "SELECT output_path, input_moved_to FROM jobs WHERE id > ? AND id <= ?", (self._cleared, upto)
        ).fetchall()
        for paths in rows:
            for path in filter(None, paths):
                Path(path).unlink(missing_ok=True)
        self._cleared = max(self._cleared, upto)

    def sample(self) -> Sample:
        status = proc_status(self.pid)
        db = self.service.db
        return Sample(
            jobs=self.jobs,
            seconds=round(time.monotonic() - (self.t0 or time.monotonic()), 1),
            rss_kb=status["VmRSS"],
            rss_anon_kb=status.get("RssAnon", 0),
            children_rss_kb=children_rss(self.pid),
            threads=len(os.listdir(f"/proc/{self.pid}/task")),
            fds=len(os.listdir(f"/proc/{self.pid}/fd")),
            db_bytes=file_size(db),
            wal_bytes=file_size(db.with_name(db.name + "-wal")),
            metrics_pending=self._count("metrics_state = 'pending'"),
        )

    def snapshot(self) -> tuple[tracemalloc.Snapshot | None, int]:
        """A tracemalloc snapshot of the (traced) daemon now (None when it traces with ``frames=0``), with its traced
        total in bytes."""
        self.taken += 1
        path = Path(f"{self.snapshots}.{self.taken}")
        os.kill(self.pid, signal.SIGUSR2)
        _wait(path.exists, 600, poll=0.2)
        with open(path, "rb") as f:
            return pickle.load(f)

    def stop(self) -> None:
        self.service.stop()


def slopes(samples: list[Sample], warmup: int) -> dict[str, float]:
    """Per 1,000 jobs, of every sampled quantity, over the samples at or after ``warmup`` jobs."""
    after = [s for s in samples if s.jobs >= warmup]
    xs = [s.jobs / 1000 for s in after]
    fields = ("rss_kb", "rss_anon_kb", "children_rss_kb", "threads", "fds", "db_bytes", "wal_bytes")
    return {f: round(slope(xs, [getattr(s, f) for s in after]), 3) for f in fields}


def diff(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int, jobs: int) -> list[dict]:
    """The ``top`` biggest growths between two snapshots, by traceback (the innermost frames first), per job."""
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    ]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    out = []
    for st in sorted(stats, key=lambda st: -st.size_diff)[:top]:
        frames = [f"{f.filename.replace(str(ROOT) + '/', '')}:{f.lineno}" for f in reversed(st.traceback)]
        out.append(
            dict(
                bytes=st.size_diff,
                blocks=st.count_diff,
                bytes_per_job=round(st.size_diff / jobs, 1),
                traceback=frames[:8],
            )
        )
    return out


def compare(
    first: tuple[Sample, tracemalloc.Snapshot, int], second: tuple[Sample, tracemalloc.Snapshot, int], top: int
) -> dict:
    """Two snapshots side by side: tracemalloc's total and the RSS at each (sampled just before the snapshot: taking
    one allocates), per job, and the biggest growths by traceback."""
    (a, snap_a, traced_a), (b, snap_b, traced_b) = first, second
    jobs = b.jobs - a.jobs
    return dict(
        jobs=[a.jobs, b.jobs],
        metrics_pending=[a.metrics_pending, b.metrics_pending],
        traced_mb=[round(traced_a / 2**20, 2), round(traced_b / 2**20, 2)],
        rss_mb=[round(a.rss_kb / 1024, 1), round(b.rss_kb / 1024, 1)],
        traced_bytes_per_job=round((traced_b - traced_a) / jobs, 1),
        rss_bytes_per_job=round((b.rss_kb - a.rss_kb) * 1024 / jobs, 1),
        top=diff(snap_a, snap_b, top, jobs),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50_000, help="jobs in all")
    ap.add_argument("--batch", type=int, default=1000, help="files dropped at once; one sample after each batch")
    ap.add_argument("--model", default="bicubic")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--metrics", choices=("default", "off"), default="default")
    ap.add_argument("--size", default="64x48", help="WxH of the inputs")
    ap.add_argument(
        "--wait",
        choices=("measured", "done"),
        default="measured",
        help="drop the next batch when the last one's metrics are recorded (the daemon idle at each sample), or as "
        "soon as its jobs are done (the metrics trail, as under a steady stream of files)",
    )
    ap.add_argument("--warmup", type=int, default=1000, help="jobs left out of the slope")
    ap.add_argument("--tracemalloc", default="", help="A,B: snapshots after A and B jobs, diffed by traceback")
    ap.add_argument("--top", type=int, default=15, help="tracebacks listed by --tracemalloc")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose daemon runs (default: this one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    marks = sorted(int(v) for v in args.tracemalloc.split(",") if v)
    if marks and len(marks) != 2:
        ap.error("--tracemalloc takes two job counts, A,B")

    from models.weights import fetch

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights"
        fetch(weights, [args.model, "brisque"], mirror=str(SHARED / "weights"))
        soak = Soak(
            tmp / "svc",
            weights,
            args.model,
            args.scale,
            args.metrics == "default",
            (w, h),
            traced=bool(marks),
            tree=args.tree.resolve(),
        )
        samples: list[Sample] = []
        taken: list[tuple[Sample, tracemalloc.Snapshot, int]] = []  # the sample, its snapshot, the traced bytes
        traced: dict = {}
        try:
            _wait(lambda: soak.service.done() >= 0, 60)
            while soak.jobs < args.jobs:
                s = soak.feed(min(args.batch, args.jobs - soak.jobs), measured=args.wait == "measured")
                samples.append(s)
                print(json.dumps(asdict(s)), flush=True)
                if marks and s.jobs in marks:
                    taken.append((s, *soak.snapshot()))
                if len(taken) == 2 and not traced:  # compared now: a failure later must not lose it
                    traced = compare(taken[0], taken[1], args.top)
                    taken.clear()
        finally:
            soak.stop()
            log = tmp / "daemon.log"
            if log.stat().st_size:
                kept = ROOT / "benchmarks" / "results" / "soak-daemon.log"
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, kept)
    first = next((s for s in samples if s.jobs >= args.warmup), samples[0])
    result: dict = dict(
        date=dt.date.today().isoformat(),
        command="python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        tree=str(args.tree.resolve()),
        model=args.model,
        scale=args.scale,
        metrics=args.metrics,
        wait=args.wait,
        size=args.size,
        jobs=soak.jobs,
        warmup=args.warmup,
        jobs_per_second=round(samples[-1].jobs / max(samples[-1].seconds, 1e-9), 1),
        rss_mb_after_warmup=round(first.rss_kb / 1024, 1),
        rss_mb_at_end=round(samples[-1].rss_kb / 1024, 1),
        slope_per_1000_jobs=slopes(samples, args.warmup),
        samples=[asdict(s) for s in samples],
    )
    if traced:
        result["tracemalloc"] = traced
    name = f"soak-{result['date']}-{args.model}-{args.metrics}.json"
    path = args.json or ROOT / "benchmarks" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    sl = result["slope_per_1000_jobs"]
    print(
        f"{args.model} x{args.scale}, metrics {args.metrics}, {soak.jobs} jobs of {args.size}, "
        f"{result['jobs_per_second']} jobs/s"
    )
    print(f"RSS {result['rss_mb_after_warmup']} MB after {first.jobs} jobs -> {result['rss_mb_at_end']} MB at the end")
    print("slope per 1,000 jobs after the warm-up:")
    print(f"  RSS {sl['rss_kb']} kB (anonymous {sl['rss_anon_kb']} kB); threads {sl['threads']}; fds {sl['fds']}")
    print(f"  SQLite file {sl['db_bytes']} bytes; WAL {sl['wal_bytes']} bytes")
    if "tracemalloc" in result:
        tm = result["tracemalloc"]
        print(
            f"tracemalloc {tm['jobs'][0]} -> {tm['jobs'][1]} jobs: traced {tm['traced_mb'][0]} -> {tm['traced_mb'][1]}"
            f" MB ({tm['traced_bytes_per_job']} B/job), RSS {tm['rss_mb'][0]} -> {tm['rss_mb'][1]} MB"
            f" ({tm['rss_bytes_per_job']} B/job)"
        )
        for t in tm["top"]:
            print(f"  {t['bytes_per_job']:+8.1f} B/job  {t['blocks']:+6d} blocks  " + " <- ".join(t["traceback"][:4]))
    print(f"(written to {path})")


if __name__ == "__main__":
    main()
