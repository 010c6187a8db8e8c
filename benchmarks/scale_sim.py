"""How far one PostgreSQL carries the queue: K simulated nodes x W worker threads against one local server.

    python benchmarks/scale_sim.py [--nodes 1,4,16,64] [--workers 1,4] [--job-ms 100] [--seconds 8]
                                   [--via direct,pgbouncer] [--history N] [--json FILE]

Each simulated node is a process that does what a daemon does to the database, and nothing else: it joins as a node
(the real :class:`daemon.cluster.Cluster`, with its heartbeat thread renewing leases and taking over dead nodes'
jobs), and runs W worker threads. Each worker claims one job at a time through the real store (output path reserved
in the claim), reads the input from a tmpfs inbox, "runs" a null model that sleeps ``--job-ms``, writes the output
(temp file and rename), commits the job done with its archive path, and moves the input to the archive. So a job is
one claim and one finish transaction, the rows and leases are real, and the model costs no CPU.

For each K x W: a fresh database on a throw-away PostgreSQL server (tests/pgserver.py, ``fsync`` on,
``max_connections`` 600), jobs registered up front, the K processes started and joined, then a warm-up, then a
measured window of ``--seconds``:

- jobs/s: jobs committed done within the window (their ``finished_at``), and the ratio to K=1 x W=1 of this run,
  and to the null model's ceiling (K x W x 1000 / job_ms);
- claim latency p50 and p99 (the claims that got a job), from every surviving node;
- the database's CPU (all server processes, % of one core) and its connections (most seen in pg_stat_activity);
- the takeover time: when the window ends, node 0 is caught holding jobs (SIGSTOP until it does) and SIGKILLed, and
  the clock runs until the last of them is no longer running under it (taken back by a live node's heartbeat);
  stale + one heartbeat on a machine with time to spare;
- what ``store.counts()`` costs (every node's status line and /metrics scrape run it), before the nodes start.

The knee is the smallest K x W whose jobs/s is within 10 % of the best of the sweep: past it, more workers add no
claims. ``--via pgbouncer`` runs the nodes through pgbouncer in transaction mode (Debian's package; its pool is
``--pool`` server connections), the remedy for connection count; ``--history N`` first fills the table with N done
jobs, to see what a long history does to the claim.

This box has 2 cores shared by the nodes and the server (and other work): the figures are for the shape, not for
production. The load average is printed and recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")

# --history: done jobs as the daemon leaves them, made in the server (ids below the pending jobs', like older rows).
HISTORY = """
INSERT INTO jobs (content_sha256, rule_fingerprint, state, attempts, source, folder, rel_path, input_path,
  model_id, scale, outscale, mode, created_at, started_at, finished_at, updated_at, output_path, node, t_total)
SELECT md5(g::text) || md5((g + 1)::text), 'history', 'done', 1, 'watch', '', 'old/' || g || '.png',
  '/in/old/' || g || '.png', 'bicubic', 2, 2, 'upscale', now() - interval '30 days', now() - interval '30 days',
  now() - interval '30 days', now() - interval '30 days', '/out/old/' || g || '.png', 'gone', 0.1
FROM generate_series(1, :n) g
"""


# --- one simulated node (a subprocess) --------------------------------------------------------------------------
def node_main(args: argparse.Namespace) -> None:
    """Join, heartbeat, and run ``args.workers`` claim-sleep-finish loops until ``args.stop`` exists; then write
    this node's claim latencies to ``args.out``."""
    from sqlalchemy import event

    from daemon.cluster import Cluster
    from daemon.config import load_settings
    from daemon.jobs import Finished, worker_id
    from daemon.store import SqlStore

    settings = load_settings(args.config, check_paths=False)
    store = SqlStore(settings.database, upgrade=False)
    if args.no_prepare:  # pgbouncer before 1.21 in transaction mode: no server-side prepared statements

        @event.listens_for(store.engine, "connect")
        def _no_prepare(dbapi_conn, _record) -> None:  # noqa: ANN001
            dbapi_conn.prepare_threshold = None

    cluster = Cluster(settings, store, args.workers)
    cluster.join()
    cluster.recover(at_start=True)
    cluster.start(time.monotonic)
    inbox, outbox, archive = Path(settings.inbox), Path(settings.outbox), Path(settings.archive)
    go, stop = Path(args.go), Path(args.stop)
    claims: list[tuple[float, float]] = []  # (monotonic end, seconds) of each claim that got a job
    lock = threading.Lock()

    def plan(job, taken) -> str:  # noqa: ANN001 - an OutputPlanner, names as the daemon makes them
        path, n = str(outbox / f"{job.rel.stem}.out"), 0
        while taken(path):
            n += 1
            path = str(outbox / f"{job.rel.stem}-{n}.out")
        return path

    def work(i: int) -> None:
        me = worker_id(f"w{i}")
        while not stop.exists():
            t0 = time.monotonic()
            got = store.claim(me, node=cluster.node, source="watch", plan=plan)
            t1 = time.monotonic()
            if not got:
                time.sleep(0.05)
                continue
            with lock:
                claims.append((t1, t1 - t0))
            job = got[0]
            src = inbox / job.rel
            data = src.read_bytes() if src.exists() else b""  # a taken-over job's input may be moved already
            time.sleep(args.job_ms / 1000)  # the null model
            out = Path(job.output_path or plan(job, lambda p: False))
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out)
            dest = archive / job.rel.name
            if store.finish([Finished(job.id, me, {"t_total": args.job_ms / 1000}, archive_path=str(dest))])[0]:
                try:
                    os.replace(src, dest)
                except FileNotFoundError:
                    pass

    while not go.exists():
        time.sleep(0.02)
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(args.out).write_text(json.dumps(claims))
    cluster.leave()
    store.close()


# --- the driver ------------------------------------------------------------------------------------------------
def _query(url: str, sql: str, **params) -> list[dict]:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return [dict(r._mapping) for r in c.execute(text(sql), params)]
    finally:
        eng.dispose()


def _server_ticks(postmaster: int) -> int:
    """utime + stime of the PostgreSQL server: the postmaster and every process it started."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == postmaster or int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total


def _busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_config(server: str, via: str, postmaster: int, work: Path, k: int, w: int, args: argparse.Namespace) -> dict:
    """One K x W run; returns its figures."""
    from sqlalchemy import text

    from daemon.config import Rule
    from daemon.jobs import JobSpec, utcnow
    from daemon.store import SqlStore
    from tests.postgres import create_database

    direct = create_database(server)
    url = direct.replace(server, via, 1)  # the nodes' URL: straight, or through pgbouncer
    shm = Path(tempfile.mkdtemp(prefix=f"scale-sim-k{k}w{w}-", dir="/dev/shm"))
    try:
        for d in ("inbox", "outbox", "archive"):
            (shm / d).mkdir()
        ceiling = k * w * 1000 / args.job_ms
        n = int(min(args.max_jobs, ceiling * (args.seconds + args.warmup + 6) + 200))
        store = SqlStore(direct, statement_timeout_s=None)  # the set-up may write millions of rows
        if args.history:  # a long history of done jobs in the same table, as after months of 10 million a day
            with store.engine.begin() as c:
                c.execute(text(HISTORY), {"n": args.history})
            with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(text("VACUUM ANALYZE jobs"))
        rule = Rule(model="bicubic", scale=2)
        for start in range(0, n, 1000):
            specs = []
            for i in range(start, min(n, start + 1000)):
                (shm / "inbox" / f"f{i:06d}.png").write_bytes(b"x" * 256)
                rel = PurePosixPath(f"f{i:06d}.png")
                specs.append(JobSpec(f"{i:064x}", rule, rel, str(shm / "inbox" / rel)))
            store.register(specs)
        t0 = time.monotonic()
        for _ in range(3):  # what every node's status line and /metrics scrape cost: a count of the whole table
            store.counts()
        counts_ms = round((time.monotonic() - t0) / 3 * 1000, 1)
        store.close()
        go, stop = work / "go", work / "stop"
        for f in (go, stop):
            f.unlink(missing_ok=True)
        procs = []
        for i in range(k):
            cfg = work / f"node{i}.toml"
            cfg.write_text(
                f'database = "{url}"\ninbox = "{shm / "inbox"}"\noutbox = "{shm / "outbox"}"\n'
                f'archive = "{shm / "archive"}"\nfailed = "{shm / "failed"}"\nnode_name = "n{i}"\n'
                f"heartbeat_seconds = {args.heartbeat}\nstale_seconds = {args.stale}\n"
                'log_level = "warning"\n'
            )
            cmd = [
                sys.executable,
                __file__,
                "node",
                "--config",
                str(cfg),
                "--workers",
                str(w),
                "--job-ms",
                str(args.job_ms),
            ]
            cmd += ["--go", str(go), "--stop", str(stop), "--out", str(work / f"n{i}.json")]
            if via != server:
                cmd.append("--no-prepare")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"n{i}.log", "w")))
        deadline = time.monotonic() + 300
        while len(_query(direct, "SELECT name FROM nodes")) < k:  # every node joined (imports paid)
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"nodes did not start: see {work}/n*.log")
            time.sleep(0.2)
        go.touch()
        time.sleep(args.warmup)
        ticks_a, busy_a = _server_ticks(postmaster), _busy()  # first: reading /proc takes a while under load
        t_a, wall_a = time.monotonic(), utcnow()
        conns = 0
        while True:  # at least one sample, however slow the box
            q = "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
            conns = max(conns, _query(direct, q)[0]["n"] - 1)  # less this query's own
            if time.monotonic() >= t_a + args.seconds:
                break
            time.sleep(0.5)
        t_b, wall_b = time.monotonic(), utcnow()
        ticks_b, busy_b = _server_ticks(postmaster), _busy()
        done = _query(
            direct, "SELECT COUNT(*) AS n FROM jobs WHERE finished_at >= :a AND finished_at < :b", a=wall_a, b=wall_b
        )[0]["n"]
        pending = _query(direct, "SELECT COUNT(*) AS n FROM jobs WHERE state = 'pending'")[0]["n"]
        takeover: float | str | None = None
        held = 0
        if k > 1:  # node 0 dies holding jobs; its leases must run out, then a live node's heartbeat takes them
            mine = "SELECT COUNT(*) AS n FROM jobs WHERE state = 'running' AND node = 'n0'"
            for _ in range(200):  # frozen, it commits nothing: what it holds now is what it dies with
                procs[0].send_signal(signal.SIGSTOP)
                held = _query(direct, mine)[0]["n"]
                if held:
                    break
                procs[0].send_signal(signal.SIGCONT)
                time.sleep(0.01)
            procs[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            takeover = f"> {5 * args.stale:g}" if held else None
            while held and time.monotonic() < killed + 5 * args.stale:
                if _query(direct, mine)[0]["n"] == 0:
                    takeover = round(time.monotonic() - killed, 2)
                    break
                time.sleep(0.05)
        stop.touch()
        claims: list[float] = []
        for i, p in enumerate(procs):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            out = work / f"n{i}.json"
            if out.exists():
                claims += [lat for t, lat in json.loads(out.read_text()) if t_a <= t <= t_b]
        window = t_b - t_a
        server_cpu = (ticks_b - ticks_a) / CLK_TCK / window * 100
        machine = (busy_b[0] - busy_a[0]) / max(1, busy_b[1] - busy_a[1]) * 100
        return dict(
            nodes=k,
            workers=w,
            threads=k * w,
            jobs_per_s=round(done / window, 1),
            ceiling_per_s=round(ceiling, 1),
            p50_claim_ms=round(_pct(claims, 0.5) * 1000, 1),
            p99_claim_ms=round(_pct(claims, 0.99) * 1000, 1),
            db_cpu_pct=round(server_cpu, 0),
            db_cpu_ms_per_job=round(server_cpu * 10 / max(done / window, 1e-9), 2),
            machine_busy_pct=round(machine, 0),
            connections=conns,
            takeover_s=takeover,
            takeover_jobs=held,
            counts_ms=counts_ms,
            pool_left=pending,
        )
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        for f in work.glob("*"):
            f.unlink()


def _pgbouncer(server: str, work: Path, pool: int) -> tuple[subprocess.Popen, str]:
    """pgbouncer in transaction mode in front of ``server``; returns the process and its base URL."""
    from sqlalchemy import make_url

    from tests.pgserver import _free_port

    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(exe).exists():
        sys.exit("pgbouncer is not installed: apt-get install pgbouncer")
    u = make_url(server)
    port = _free_port()
    home = work.parent / "pgbouncer"
    home.mkdir()
    ini = home / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host={u.host} port={u.port} user={u.username}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\nauth_file = {home / 'users.txt'}\n"
        f"pool_mode = transaction\nmax_client_conn = 2000\ndefault_pool_size = {pool}\nunix_socket_dir =\n"
        # The store's session options (statement_timeout) cannot cross a transaction pool: set them on the role.
        "ignore_startup_parameters = options\n"
    )
    (home / "users.txt").write_text(f'"{u.username}" ""\n')
    user: list[str] = []
    if os.geteuid() == 0:  # pgbouncer refuses root, like the server
        user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        os.chmod(work.parent, 0o755)
        shutil.chown(home, "nobody", "nogroup")
    log = open(home / "out.log", "w")
    proc = subprocess.Popen([*user, exe, str(ini)], stdout=log, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    if proc.poll() is not None:
        sys.exit(f"pgbouncer did not start: {(home / 'out.log').read_text()}")
    return proc, u.set(port=port).render_as_string(hide_password=False)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        p = argparse.ArgumentParser()
        for name in ("--config", "--go", "--stop", "--out"):
            p.add_argument(name, required=True)
        p.add_argument("--workers", type=int, required=True)
        p.add_argument("--job-ms", type=float, required=True)
        p.add_argument("--no-prepare", action="store_true")
        node_main(p.parse_args(sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,4,16,64", help="K values, comma-separated")
    p.add_argument("--workers", default="1,4", help="W values, comma-separated")
    p.add_argument("--job-ms", type=float, default=100.0, help="the null model's time per job")
    p.add_argument("--seconds", type=float, default=8.0, help="the measured window")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--heartbeat", type=float, default=0.5)
    p.add_argument("--stale", type=float, default=2.0)
    p.add_argument("--max-jobs", type=int, default=12000, help="jobs registered per run at most")
    p.add_argument("--via", default="direct", help="direct, pgbouncer, or both (comma-separated)")
    p.add_argument("--history", type=int, default=0, help="done jobs already in the table")
    p.add_argument("--pool", type=int, default=20, help="pgbouncer's server connections")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale_sim.json")
    args = p.parse_args()

    from tests.pgserver import running_server

    ks = [int(v) for v in args.nodes.split(",")]
    ws = [int(v) for v in args.workers.split(",")]
    load_before = os.getloadavg()
    results: dict = dict(
        job_ms=args.job_ms, seconds=args.seconds, heartbeat=args.heartbeat, stale=args.stale, history=args.history
    )
    results["cpus"] = os.cpu_count()
    runs: list[dict] = []
    opts = "-c fsync=on -c max_connections=600"
    with tempfile.TemporaryDirectory() as tmp, running_server(opts) as server:
        work = Path(tmp) / "work"
        work.mkdir()
        data_dir = _query(f"{server}/postgres", "SHOW data_directory")[0]["data_directory"]
        postmaster = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
        modes = []
        bouncer = None
        for mode in args.via.split(","):
            if mode == "pgbouncer":
                bouncer, via = _pgbouncer(server, work, args.pool)
                modes.append((mode, via))
            else:
                modes.append((mode, server))
        try:
            for mode, via in modes:
                base = None
                for k in ks:
                    for w in ws:
                        r = run_config(server, via, postmaster, work, k, w, args)
                        r["via"] = mode
                        base = base or r["jobs_per_s"]
                        r["ratio_to_1x1"] = round(r["jobs_per_s"] / base, 2) if base else None
                        runs.append(r)
                        print(
                            f"{mode:9s} K={k:<3d} W={w}  {r['jobs_per_s']:7.1f} jobs/s (x{r['ratio_to_1x1']}, "
                            f"ceiling {r['ceiling_per_s']})  claim p50 {r['p50_claim_ms']} ms p99 "
                            f"{r['p99_claim_ms']} ms  db cpu {r['db_cpu_pct']}% ({r['db_cpu_ms_per_job']} ms/job)  "
                            f"machine {r['machine_busy_pct']}%  conns {r['connections']}  takeover {r['takeover_s']} s "
                            f"({r['takeover_jobs']} jobs)  counts() {r['counts_ms']} ms",
                            flush=True,
                        )
        finally:
            if bouncer is not None:
                bouncer.terminate()
                bouncer.wait(10)
    for mode in {r["via"] for r in runs}:
        mine = [r for r in runs if r["via"] == mode]
        best = max(r["jobs_per_s"] for r in mine)
        knee = min((r for r in mine if r["jobs_per_s"] >= 0.9 * best), key=lambda r: (r["threads"], r["nodes"]))
        results[f"knee_{mode}"] = dict(nodes=knee["nodes"], workers=knee["workers"], jobs_per_s=knee["jobs_per_s"])
        print(f"{mode}: knee at K={knee['nodes']} x W={knee['workers']} ({knee['jobs_per_s']} jobs/s; best {best})")
    results["runs"] = runs
    results["loadavg_before"] = [round(v, 2) for v in load_before]
    results["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(f"load average before {results['loadavg_before']}, after {results['loadavg_after']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
