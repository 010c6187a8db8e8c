"""The cluster (join, beat, recover, leave) over the in-memory store, with a fake clock: no database, no threads.

The liveness checks are real: a pid on this host is alive or not as the kernel says.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import structlog

from daemon.cluster import Cluster
from daemon.config import Rule, load_settings
from daemon.errors import NodeInUseError
from daemon.jobs import Beat, JobSpec, MemoryStore, NodeInfo
from tests.conftest import FakeClock, write_config

T0 = FakeClock().start


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.clock = FakeClock(T0)
        self.store = MemoryStore(self.clock)
        self.recovered: list[int] = []
        self.settings = load_settings(
            write_config(tmp, node_name="n1", heartbeat_seconds=5, stale_seconds=30, workers=2)
        )
        self.cluster = Cluster(
            self.settings, self.store, 2, on_recovered=lambda js: self.recovered.extend(j.id for j in js)
        )

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_join_refuses_the_name_of_a_live_node_and_takes_it_once_its_holder_is_gone(rig: Rig) -> None:
    rig.store.join("n1", NodeInfo("other-host", 4242), lambda row: False)  # a daemon on another host
    rig.advance(29)
    with pytest.raises(NodeInUseError, match="node name 'n1' is in use by pid 4242 on other-host"):
        rig.cluster.join()
    rig.advance(2)  # its lease is 31 s old: it is gone
    rig.cluster.join()
    (me,) = rig.store.nodes(30)
    assert (me.row.info.host, me.row.info.pid, me.row.info.workers) == (socket.gethostname(), os.getpid(), 2)


def test_join_takes_a_fresh_name_whose_process_here_is_dead_or_stopped_or_this_one(rig: Rig) -> None:
    here = socket.gethostname()
    rig.store.join("n1", NodeInfo(here, _dead_pid()), lambda row: False)
    rig.cluster.join()  # fresh lease, but its pid is gone from this host
    rig.store.join("n1", NodeInfo(here, os.getppid()), lambda row: False)
    with pytest.raises(NodeInUseError):  # a live process here (this one's parent)
        rig.cluster.join()
    rig.store.leave("n1")
    rig.cluster.join()  # stopped cleanly: free at once
    rig.cluster.join()  # this very process joining again
    assert [n.row.info.pid for n in rig.store.nodes(30)] == [os.getpid()]


def test_a_beat_renews_this_nodes_leases_and_takes_over_a_dead_nodes_jobs(rig: Rig) -> None:
    rig.cluster.join()
    rig.store.join("n2", NodeInfo("other-host", 7), lambda row: False)
    rule = Rule(model="bicubic")
    rig.store.register([JobSpec(f"{i:064x}", rule, PurePosixPath(f"{i}.png"), f"/in/{i}.png") for i in (1, 2)])
    (mine,) = rig.store.claim("w1", node="n1", source="watch")
    (theirs,) = rig.store.claim("w2", node="n2", source="watch")
    for _ in range(7):  # 35 s of beats from n1, none from n2
        rig.advance(5)
        beat = rig.cluster.beat()
    assert beat.at == rig.clock.now and beat.skew_s == 0.0
    assert rig.recovered == [theirs.id] and rig.store.get(theirs.id).state == "pending"
    assert rig.store.get(mine.id).state == "running"
    assert [n.row.name for n in rig.cluster.others()] == []  # n2 is stale
    rig.cluster.leave()
    assert rig.store.nodes(30, include_gone=True)[0].state == "stopped"


def test_a_host_clock_surely_off_the_databases_is_warned_once_and_its_return_said(rig: Rig) -> None:
    limit = rig.settings.max_clock_skew_seconds
    with structlog.testing.capture_logs() as logs:
        for skew, uncertainty in ((limit - 0.1, 0.0), (limit + 0.5, 0.6), (-limit - 1, 0.1), (limit + 3, 0), (0.2, 0)):
            rig.cluster.check_skew(Beat(T0, skew, uncertainty))
    said = [(e["event"], e["skew_s"]) for e in logs if e["event"].startswith("node.clock_skew")]
    # Within the limit, or within it give or take the measurement: nothing. Off: one warning, however long it lasts.
    assert said == [("node.clock_skew", -limit - 1), ("node.clock_skew_ok", 0.2)]
    assert [e["log_level"] for e in logs if e["event"] == "node.clock_skew"] == ["warning"]
