"""Several daemons on one database: nodes, heartbeats, leases and recovery.

Each daemon is a *node* (``node_name``, by default the host name) with a row in ``nodes``. A heartbeat thread
renews that row and the lease of every job the node runs (``jobs.heartbeat_at``) every ``heartbeat_seconds``; a
running job whose lease is older than ``stale_seconds`` belongs to a dead node, and any live node takes it back
to pending. At start a node first takes back its own previous life's jobs and unowned ones, before it claims
anything. Whether a process may still be running is decided the same way everywhere (:func:`may_live`): on another
host it cannot be checked, so it may; on this host, its pid says.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable

from daemon import logs
from daemon.config import LiveSettings, Settings, UsesSettings
from daemon.jobs import Beat, DaemonStore, Job, NodeInfo, NodeRow, NodeStatus, worker_host, worker_pid


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def may_live(host: str | None, pid: int | None) -> bool:
    """Whether process ``pid`` on ``host`` may still run: on another host it cannot be checked, so it may."""
    if host != socket.gethostname():
        return True
    return pid is not None and pid_alive(pid)


def worker_may_live(worker: str | None) -> bool:
    """:func:`may_live` for a ``jobs.worker`` value (``host:pid`` or ``host:pid/name``)."""
    return may_live(worker_host(worker), worker_pid(worker))


def spare(job: Job) -> bool:
    """A running job with no node that an ``upscaled process`` or ``bench`` may still be working on: those runs hold
    no lease, so one on this host whose process is gone is recovered, and one elsewhere is left alone."""
    return job.node is None and job.source != "watch" and worker_may_live(job.worker)


class Cluster(UsesSettings):
    """This node's membership: join, heartbeat, recover, leave."""

    def __init__(
        self,
        settings: Settings | LiveSettings,
        store: DaemonStore,
        workers: int,
        on_recovered: Callable[[list[Job]], None] | None = None,
    ) -> None:
        self.live = LiveSettings.of(settings)
        self.store = store
        self.node = self.settings.node()
        self.workers = workers
        self.on_recovered = on_recovered or (lambda jobs: None)
        self.log = logs.get()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_beat = 0.0

    def info(self) -> NodeInfo:
        s = self.settings
        rules = hashlib.sha256(",".join(sorted(f"{r.folder}={r.fingerprint()}" for r in s.all_rules())).encode())
        return NodeInfo(
            host=socket.gethostname(),
            pid=os.getpid(),
            device=",".join(s.devices()),
            workers=self.workers,
            folders=None if s.serve_folders is None else json.dumps(s.serve_folders),
            rules_fingerprint=rules.hexdigest()[:16],
        )

    def join(self) -> None:
        """Enter this node in the ``nodes`` table; refuse to start under the name of a node that is alive.

        Raises:
            daemon.errors.NodeInUseError: another live daemon (see :meth:`in_use`) has this node name. Two daemons
                with one name would take over each other's jobs.
        """
        info = self.info()
        self.store.join(self.node, info, self.in_use)
        fingerprint = info.rules_fingerprint
        differ = [n.row.name for n in self.others() if n.row.info.rules_fingerprint not in (None, fingerprint)]
        if differ:  # same file, other rules: two jobs and two outputs, so say it loudly
            self.log.warning("nodes.rules_differ", nodes=differ, note="all nodes on one inbox need the same rules")

    def in_use(self, row: NodeRow) -> bool:
        """Whether the daemon of a node's row may still be alive: not stopped, a lease younger than
        ``stale_seconds``, not this very process, and :func:`may_live`."""
        if row.stopped_at is not None or row.lease_age_s >= self.settings.stale_seconds:
            return False
        if (row.info.host, row.info.pid) == (socket.gethostname(), os.getpid()):
            return False
        return may_live(row.info.host, row.info.pid)

    def others(self) -> list[NodeStatus]:
        """The other live nodes on this database."""
        return [n for n in self.store.nodes(self.settings.stale_seconds) if n.row.name != self.node]

    def recover(self, at_start: bool = False) -> list[Job]:
        """Take back the jobs of dead nodes (and, at start, this node's own and unowned ones)."""
        found = self.store.recover(
            self.settings.stale_seconds,
            own_node=self.node if at_start else None,
            unowned=at_start,
            spare=spare,
            max_recoveries=self.settings.max_recoveries,
        )
        for job in found:
            self.log.warning(
                "job.recovered",
                job=job.id,
                file=job.name,
                from_node=job.node,
                from_worker=job.worker,
                recoveries=job.recoveries,
                alone_deaths=job.alone_deaths,
                poison=job.state == "failed" or None,
            )
        if found:
            self.on_recovered(found)
        return found

    def beat(self) -> Beat:
        """Renew this node's row and its running jobs' leases, then take over the jobs of dead nodes."""
        beat = self.store.heartbeat(self.node)
        self.recover()
        return beat

    def start(self, clock: Callable[[], float]) -> None:
        """The heartbeat on its own thread: a long hash or a slow share in the main loop must not let leases lapse."""

        def loop() -> None:
            while not self._stop.wait(self.settings.heartbeat_seconds):
                try:
                    self.beat()
                    self.last_beat = clock()
                except Exception as exc:  # the database is away: keep trying; leases lapse only after stale_seconds
                    self.log.error("heartbeat.error", error=repr(exc))

        self.last_beat = clock()
        self._thread = threading.Thread(target=loop, name="upscaled-heartbeat", daemon=True)
        self._thread.start()

    def leave(self) -> None:
        """A clean shutdown: stop the heartbeat and mark the node stopped (its row just goes stale if the database
        is away)."""
        self._stop.set()
        try:
            self.store.leave(self.node)
        except Exception as exc:  # noqa: BLE001 - shutting down with the database away
            self.log.warning("node.stop_unrecorded", error=repr(exc))
