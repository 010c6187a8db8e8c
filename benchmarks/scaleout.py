"""Scaling out: throughput with 1, 2 and 3 daemon processes on one inbox, on SQLite and on PostgreSQL, and with
one daemon running 1, 2 and 3 worker threads (the `workers` setting).

    python benchmarks/scaleout.py [--images 200] [--size 64] [--model fsrcnn --scale 2] [--workers 1,2,3]
                                  [--threads 1,2,3]

Each run starts N real `upscaled run` processes (node_name w1..wN) on one temp inbox and one database (a SQLite
file, or a fresh database on a throw-away PostgreSQL server started like the tests start it); the thread runs
start one process with `workers = T`. Every figure is also given as a ratio to one process with one worker, run
against the same database in the same invocation. Warm-up images go
first, so every process has loaded the model; then the images are renamed into the inbox at once and the clock
stops when all their job rows are `done`. Metrics are off: this measures the service and the database, not BRISQUE.

It also times the store calls a worker makes per job (claim, record the output path, finish), in one process
against each database: the claim-and-commit overhead per job in milliseconds. Results go to
benchmarks/results/scaleout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import SHARED, make_images  # noqa: E402


def _count(url: str, sql: str) -> int:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return int(c.execute(text(sql)).scalar() or 0)
    except Exception:  # noqa: BLE001 - not created yet
        return 0
    finally:
        eng.dispose()


def _wait(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def service_run(
    paths: list[Path], work: Path, url: str, weights: Path, model: str, scale: int, n: int, threads: int = 1
) -> float:
    """Seconds for ``n`` daemon processes of ``threads`` workers each to finish ``paths`` dropped into their shared
    inbox at once."""
    for d in ("inbox", "outbox", "archive", "failed", "staging"):
        (work / d).mkdir(parents=True)
    procs = []
    try:
        for i in range(1, n + 1):
            cfg = work / f"w{i}.toml"
            cfg.write_text(
                f'inbox = "inbox"\noutbox = "outbox"\narchive = "archive"\nfailed = "failed"\n'
                f'database = "{url}"\nweights_dir = "{weights}"\nnode_name = "w{i}"\nsettle_seconds = 0.2\n'
                f'rescan_seconds = 600\nlog_level = "warning"\nheartbeat_seconds = 1\nstale_seconds = 10\n'
                f'device = "cpu"\nworkers = {threads}\n'
                f'[[rules]]\nfolder = ""\nmodel = "{model}"\nscale = {scale}\nformat = "png"\n'
                f"metrics = []\ncompression = 1\n"
            )
            env = dict(os.environ, UPSCALED_CONFIG=str(cfg))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "daemon", "run"],
                    cwd=work,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        _wait(lambda: _count(url, "SELECT COUNT(*) FROM nodes WHERE stopped_at IS NULL") == n, 120, "the nodes")
        from PIL import Image

        warm = 3 * n * threads  # enough that every process gets at least one and has its model loaded
        for i in range(warm):
            Image.open(paths[i % len(paths)]).rotate(90 * (1 + i % 3)).resize((40 + i, 40)).save(
                work / "staging" / f"warm{i}.png"
            )
            os.rename(work / "staging" / f"warm{i}.png", work / "inbox" / f"warm{i}.png")
        _wait(lambda: _count(url, "SELECT COUNT(*) FROM jobs WHERE state = 'done'") == warm, 300, "warm-up")
        for p in paths:
            shutil.copy(p, work / "staging" / p.name)
        t0 = time.perf_counter()
        for p in paths:
            os.rename(work / "staging" / p.name, work / "inbox" / p.name)
        _wait(
            lambda: _count(url, "SELECT COUNT(*) FROM jobs WHERE state = 'done'") == warm + len(paths),
            1800,
            "the images",
        )
        return time.perf_counter() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)


def store_overhead(url: str, jobs: int = 200) -> dict[str, float]:
    """Milliseconds per job for the store calls: registering (in commits of 8, as a burst is admitted), then the
    worker's claim with the output path reserved and the done commit with its metrics (wall median and p95, and
    this process's CPU per job: what the service's threads spend, the database server's work left out)."""
    from pathlib import PurePosixPath

    from daemon.config import Rule
    from daemon.jobs import Finished, JobSpec
    from daemon.metrics import Metric
    from daemon.store import SqlStore

    store = SqlStore(url)
    rule = Rule(model="fsrcnn", scale=2)
    try:
        specs = [
            JobSpec(
                sha=f"{i:064x}",
                rule=rule,
                rel=PurePosixPath(f"{i}.png"),
                input_path=f"/x/{i}.png",
                source="cli",
                folder="(overhead)",
            )
            for i in range(jobs)
        ]
        c0 = time.process_time()
        for i in range(0, jobs, 8):
            store.register(specs[i : i + 8])
        register_cpu = (time.process_time() - c0) * 1000 / jobs
        times = []
        c0 = time.process_time()
        for _ in range(jobs):
            t0 = time.perf_counter()
            (job,) = store.claim("overhead", folders=["(overhead)"], plan=lambda j, taken: f"/out/{j.id}.png")
            store.finish(
                [
                    Finished(
                        job.id,
                        job.worker,
                        {"t_total": 0.01},
                        [Metric("lr_psnr_y", 30.0, "y-bt601", 0, "lr", "overhead")],
                    )
                ]
            )
            times.append((time.perf_counter() - t0) * 1000)
        claim_finish_cpu = (time.process_time() - c0) * 1000 / jobs
    finally:
        store.close()
    return dict(
        median_ms=round(statistics.median(times), 2),
        p95_ms=round(statistics.quantiles(times, n=20)[-1], 2),
        register_cpu_ms=round(register_cpu, 2),
        claim_finish_cpu_ms=round(claim_finish_cpu, 2),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="fsrcnn")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--workers", default="1,2,3", help="daemon processes, one worker thread each")
    ap.add_argument("--threads", default="1,2,3", help="worker threads in one daemon process")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scaleout.json")
    args = ap.parse_args()
    counts = [int(v) for v in args.workers.split(",")]
    thread_counts = [int(v) for v in args.threads.split(",") if int(v) > 1]

    from models.weights import fetch
    from tests.postgres import create_database, running_server

    results: dict = dict(
        images=args.images,
        size=args.size,
        model=args.model,
        scale=args.scale,
        cpus=os.cpu_count(),
        runs=[],
        overhead={},
    )
    with tempfile.TemporaryDirectory() as tmp, running_server() as pg:
        tmp = Path(tmp)
        weights = tmp / "weights"
        fetch(weights, [args.model], mirror=str(SHARED / "weights"))
        paths = make_images(tmp / "src", args.images, args.size)
        for backend in ("sqlite", "postgresql"):
            url = f"sqlite:///{tmp / backend / 'overhead.db'}" if backend == "sqlite" else create_database(pg)
            results["overhead"][backend] = store_overhead(url)
            plan = [(1, 1)] + [(n, 1) for n in counts if n != 1] + [(1, t) for t in thread_counts]
            base = None
            for n, t in plan:
                work = tmp / backend / f"n{n}t{t}"
                url = f"sqlite:///{work / 'var' / 'u.db'}" if backend == "sqlite" else create_database(pg)
                secs = service_run(paths, work, url, weights, args.model, args.scale, n, t)
                base = base or secs
                results["runs"].append(
                    dict(
                        backend=backend,
                        processes=n,
                        threads=t,
                        seconds=round(secs, 2),
                        images_per_s=round(args.images / secs, 1),
                        ratio_to_1x1=round(base / secs, 2),
                    )
                )
                print(
                    f"{backend:10s} {n} process(es) x {t} worker(s): {secs:6.2f} s  {args.images / secs:6.1f} img/s"
                    f"  ratio {base / secs:.2f}",
                    flush=True,
                )
            o = results["overhead"][backend]
            print(f"{backend:10s} claim+output+finish: median {o['median_ms']} ms, p95 {o['p95_ms']} ms", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
