"""Start-up time of the ``upscaled`` command line, against starting Python itself.

    python benchmarks/cli_start.py [--repeat 15] [--jobs 200]

Each command runs as a fresh process, as a person types it: ``upscaled --version``, ``--help``, ``history`` (over a
real SQLite history of ``--jobs`` jobs made by the store, 50 shown) and ``check-config`` (of a settings file whose
rule needs no weights). The baseline is ``python -c pass`` with the same interpreter, in the same run: what no
command line can go below. Reported per command: the median and the fastest wall time of ``--repeat`` runs, the
median CPU time (user + system of the child), the median's ratio to the baseline's, and the target it is held to
(``--version`` and ``--help`` under 0.3 s, ``history`` under 1 s). Wall time depends on the machine's load: the
load average is printed beside it; the CPU time of a single-threaded start barely does, and is what the wall time
comes to on an idle machine. The results also go to benchmarks/results/cli_start.json.

The commands run through ``python -m daemon`` with this checkout on PYTHONPATH, which is what the ``upscaled``
script of an install does (it imports ``daemon.cli`` and calls ``main``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = {"--version": 0.3, "--help": 0.3, "history": 1.0}


def timed(cmd: list[str], env: dict[str, str], cwd: Path, repeat: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of ``repeat`` runs of ``cmd``, after one untimed run that warms the disk
    cache; each must exit 0."""
    subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True)
    wall, cpu = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True)
        wall.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


def make_history(folder: Path, jobs: int) -> Path:
    """A settings file and a SQLite history of ``jobs`` done jobs (registered, claimed and finished by the store)."""
    from pathlib import PurePosixPath

    from daemon.config import Rule, load_settings
    from daemon.jobs import Finished, JobSpec, worker_id
    from daemon.store import SqlStore

    cfg = folder / "settings.toml"
    cfg.write_text(
        'inbox = "inbox"\noutbox = "outbox"\narchive = "archive"\nfailed = "failed"\n'
        'database = "sqlite:///var/upscaled.db"\n\n[[rules]]\nfolder = ""\nmodel = "bicubic"\nscale = 2\n'
    )
    settings = load_settings(cfg)
    store = SqlStore(settings.database)
    try:
        rule = Rule(model="bicubic", scale=2)
        specs = [
            JobSpec(
                sha=f"{i:064x}",
                rule=rule,
                fingerprint=rule.fingerprint(),
                rel=PurePosixPath(f"photo-{i}.png"),
                input_path=str(folder / "inbox" / f"photo-{i}.png"),
                input_width=320,
                input_height=240,
            )
            for i in range(jobs)
        ]
        for reg in store.register(specs):
            (claimed,) = store.claim(worker_id(), job_id=reg.job.id)
            fields = dict(output_width=640, output_height=480, t_infer=0.01, t_total=0.05)
            store.finish([Finished(claimed.id, claimed.worker, fields, [])])
    finally:
        store.close()
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=15, help="timed runs per command (default 15)")
    p.add_argument("--jobs", type=int, default=200, help="jobs in the history (default 200)")
    args = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")
    env.pop("UPSCALED_CONFIG", None)
    with tempfile.TemporaryDirectory(prefix="cli-start-") as tmp:
        folder = Path(tmp)
        cfg = make_history(folder, args.jobs)
        py = [sys.executable]
        up = [sys.executable, "-m", "daemon", "--config", str(cfg)]
        commands = {
            "python -c pass": py + ["-c", "pass"],
            "--version": [sys.executable, "-m", "daemon", "--version"],
            "--help": [sys.executable, "-m", "daemon", "--help"],
            "history": up + ["history"],
            "check-config": up + ["check-config"],
        }
        results = {}
        for name, cmd in commands.items():
            wall, cpu = timed(cmd, env, folder, args.repeat)
            results[name] = dict(median_s=statistics.median(wall), min_s=min(wall), cpu_median_s=statistics.median(cpu))
    base = results["python -c pass"]["median_s"]
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.repeat} runs each; {args.jobs} jobs")
    cpu_base = results["python -c pass"]["cpu_median_s"]
    print(
        f"{'command':<16} {'median':>8} {'fastest':>8} {'x python':>9} {'CPU':>8} {'x python':>9}  target (wall, CPU)"
    )
    for name, r in results.items():
        r["ratio"] = r["median_s"] / base
        r["cpu_ratio"] = r["cpu_median_s"] / cpu_base
        target = TARGETS.get(name)
        verdict = (
            ""
            if target is None
            else f"< {target:g} s: {'met' if r['median_s'] < target else 'MISSED'}, "
            f"{'met' if r['cpu_median_s'] < target else 'MISSED'}"
        )
        print(
            f"{name:<16} {r['median_s']:>7.3f}s {r['min_s']:>7.3f}s {r['ratio']:>8.1f}x "
            f"{r['cpu_median_s']:>7.3f}s {r['cpu_ratio']:>8.1f}x  {verdict}"
        )
    out = ROOT / "benchmarks" / "results" / "cli_start.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(load=load, repeat=args.repeat, jobs=args.jobs, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
