"""Memory stays flat over thousands of jobs (issue 26): a soak of the real daemon, with the default metrics on.

The metrics trail the outputs at nice 10. On a busy machine they fall behind, and every done job waits for them.
Before the fix, each waiting job was a task held in memory (about 2 KB), so a daemon under a steady stream grew by
about that much per job for as long as the stream lasted. Now at most ``Runner.backlog_max`` wait in memory, and the
rest wait in the database. The soak makes the machine busy on purpose: one CPU-bound process per core at the
daemon's own priority. The files are fed as soon as the jobs before them are done, without waiting for their
metrics. The soak is ``benchmarks/soak.py``'s; docs/performance.md has the long runs.

The first 1,500 jobs are a warm-up: SQLite's page caches (one per pooled connection, 512 kB each at most) fill as the
database grows, and the allocator's arenas settle; that growth stops (docs/performance.md, memory).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.soak import Soak, slopes

JOBS = 3000
BATCH = 250
WARMUP = 1500
BOUND_KB_PER_JOB = 0.3  # against 2.4 kB per job when the backlog held them all


@contextmanager
def busy_cores() -> Iterator[None]:
    """One CPU-bound process per core, at this process's priority, for as long as the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in hogs:
            p.kill()
            p.wait()


@pytest.mark.timeout(600)  # about 100 s on an idle 2-core machine; the hogs halve the daemon's share
def test_rss_stays_flat_while_the_metrics_trail_a_steady_stream(tmp_path: Path, weights_dir: Path) -> None:
    soak = Soak(tmp_path / "svc", weights_dir, "bicubic", 2, metrics=True, size=(32, 32))
    samples = []
    try:
        with busy_cores():
            while soak.jobs < JOBS:
                samples.append(soak.feed(BATCH, measured=False))
    finally:
        soak.stop()
    per_job = slopes(samples, WARMUP)["rss_kb"] / 1000
    table = "\n".join(f"  {s.jobs:5d} jobs: RSS {s.rss_kb} kB, metrics to come {s.metrics_pending}" for s in samples)
    print(f"RSS slope after {WARMUP} jobs: {per_job:.3f} kB per job\n{table}")  # shown by -rP
    assert per_job < BOUND_KB_PER_JOB, (
        f"RSS grew by {per_job:.2f} kB per job after the first {WARMUP} (bound {BOUND_KB_PER_JOB}); the done jobs "
        f"waiting for their metrics must not be held in memory beyond Runner.backlog_max:\n{table}"
    )
