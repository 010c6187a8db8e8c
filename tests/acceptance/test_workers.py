"""Several worker threads in one daemon: `workers` per device, one shared model copy per device, and the
guarantees (once per file, stop deadline, watchdog) with all of them busy."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from daemon.config import load_settings
from daemon.errors import ConfigError
from daemon.notify import Notifier
from daemon.service import Service
from models.devices import resolve_auto
from models.registry import LoadContext, ModelCache
from models.weights import fetch
from tests.acceptance.test_systemd import Listener
from tests.conftest import MIRROR, image, rows, wait_for, write_config


def test_device_list_and_workers_make_one_inference_thread_per_device_and_slot(tmp_path):
    s = load_settings(write_config(tmp_path, device=["cpu", "cuda:1"], workers=2))
    svc = Service(s)
    try:
        assert svc.runner.infer_names == ["cpu.0", "cpu.1", "cuda1.0", "cuda1.1"]
        assert set(svc.runner.infer_names) <= set(svc.runner.beats)  # each one's heartbeat counts for the watchdog
        # two jobs per inference thread (one in the model, one decoded and waiting), one being written, one settled
        assert svc.runner.depth == 2 * 4 + 2
    finally:
        svc.shutdown()
    assert s.default_device == "cpu"
    assert load_settings(write_config(tmp_path)).devices() == ["auto"]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"workers": 0}, 'workers: must be "auto" or a whole number from 1 to 64, got 0'),
        ({"workers": "many"}, "workers: must be \"auto\" or a whole number from 1 to 64, got 'many'"),
        ({"device": []}, "device: must name at least one device"),
        ({"device": ["cpu", "cpu"]}, "device: names a device twice"),
        ({"device": ["cpu", "gpu1"]}, "must be auto, cpu, cuda or cuda:N, got 'gpu1'"),
    ],
)
def test_bad_device_lists_and_worker_counts_are_refused_by_name(tmp_path, keys, message):
    with pytest.raises(ConfigError) as err:
        load_settings(write_config(tmp_path, **keys))
    assert message in str(err.value) and "settings.toml" in str(err.value)


def test_device_list_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UPSCALED_DEVICE", '["cpu", "cuda:0"]')
    monkeypatch.setenv("UPSCALED_WORKERS", "3")
    s = load_settings(write_config(tmp_path))
    assert s.devices() == ["cpu", "cuda:0"] and s.workers == 3


def test_a_gpu_this_machine_lacks_stops_the_node_before_it_claims_anything(tmp_path, weights_dir):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test needs a device index past the last one")
    cfg = write_config(tmp_path, weights=weights_dir, device=["cpu", "cuda:3"], workers=2)
    image(tmp_path / "inbox" / "waiting.png")
    env = dict(os.environ, UPSCALED_CONFIG=str(cfg))
    res = subprocess.run([sys.executable, "-m", "daemon", "run"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode != 0
    assert "device 'cuda:3' was asked for, but PyTorch sees no CUDA GPU" in res.stdout + res.stderr
    assert (tmp_path / "inbox" / "waiting.png").exists() and not list((tmp_path / "outbox").glob("*"))
    check = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config"], capture_output=True, text=True, timeout=60, env=env
    )
    assert check.returncode != 0 and "cuda:3" in check.stderr
    # A rule on a GPU counts only on the nodes that serve its folder.
    cfg = write_config(
        tmp_path,
        weights=weights_dir,
        device="cpu",
        serve_folders=[""],
        workers=1,
        rules=[{"folder": "gpu", "model": "bicubic", "scale": 2, "device": "cuda:3"}],
    )
    ok = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config"], capture_output=True, text=True, timeout=60, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert "1 worker(s) on each of cpu; serves (default)" in ok.stdout


def _overlaps(jobs: list[dict]) -> int:
    """How many pairs of jobs ran at the same time (by their recorded start and finish)."""
    spans = sorted(
        (dt.datetime.fromisoformat(j["started_at"]), dt.datetime.fromisoformat(j["finished_at"])) for j in jobs
    )
    return sum(1 for i, (_, end) in enumerate(spans) for start, _ in spans[i + 1 :] if start < end)


def test_three_workers_share_the_queue_and_each_file_is_done_once(tmp_path, weights_dir, daemon):
    total = 15
    cfg = write_config(
        tmp_path,
        weights=weights_dir,
        workers=3,
        device="cpu",
        settle_seconds=0.1,
        rules=[{"folder": "", "model": "fsrcnn", "scale": 4}],
    )  # metrics on: BRISQUE is CPU time
    d = daemon(cfg)
    db = tmp_path / "var" / "upscaled.db"
    staging = tmp_path / "staging"
    for i in range(total):
        image(staging / f"f{i:02d}.png", (160, 120), seed=i)
    for p in sorted(staging.iterdir()):
        os.rename(p, tmp_path / "inbox" / p.name)
    wait_for(
        lambda: len(rows(db, "SELECT id FROM jobs WHERE state = 'done'")) == total,
        120,
        interval=0.2,
        what=f"{total} done jobs",
    )
    wait_for(lambda: not list((tmp_path / "inbox").glob("*.png")), 20, what="the inbox to empty")
    # The metrics are measured after the done commit, in a commit of their own.
    wait_for(
        lambda: len(rows(db, "SELECT id FROM jobs WHERE metrics_state = 'done'")) == total,
        240,
        interval=0.2,
        what="every job's metrics",
    )
    jobs = rows(db, "SELECT * FROM jobs")
    assert len(jobs) == total and {j["state"] for j in jobs} == {"done"} and {j["attempts"] for j in jobs} == {1}
    outputs = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert outputs == sorted(f"f{i:02d}.fsrcnn.x4.png" for i in range(total))
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == sorted(f"f{i:02d}.png" for i in range(total))
    metric_rows = rows(db, "SELECT job_id, name FROM metrics")
    assert len(metric_rows) == len({(r["job_id"], r["name"]) for r in metric_rows}) == 3 * total
    assert {j["worker"] for j in jobs} == {f"{os.uname().nodename}:{d.proc.pid}"}  # the daemon's claims
    assert _overlaps(jobs) >= 1, "the workers never ran two jobs at once"
    (node,) = rows(db, "SELECT device, workers FROM nodes")
    assert node == {"device": "cpu", "workers": 3}
    assert d.stop() == 0


def test_sigterm_gives_back_every_busy_workers_job(tmp_path, weights_dir, daemon):
    rule = [{"folder": "", "model": "lapsrn", "scale": 8, "metrics": []}]
    cfg = write_config(tmp_path, weights=weights_dir, stop_timeout=0.3, workers=2, rules=rule)
    d = daemon(cfg)
    db = tmp_path / "var" / "upscaled.db"
    staging = tmp_path / "staging"
    for name in ("a.png", "b.png"):
        image(staging / name, (160, 160), seed=len(name) + ord(name[0]))
        os.rename(staging / name, tmp_path / "inbox" / name)
    wait_for(
        lambda: len(rows(db, "SELECT id FROM jobs WHERE state = 'running'")) == 2,
        30,
        interval=0.01,
        what="both workers to hold a job",
    )
    assert d.stop() == 0
    # LapSRN x8 to 1280 x 1280 takes seconds on a CPU, far past 0.3 s: both jobs go back, their attempts uncounted.
    assert rows(db, "SELECT state, attempts, node FROM jobs") == [{"state": "pending", "attempts": 0, "node": None}] * 2
    (stopped,) = [e for e in d.events() if e.get("event") == "service.stop_deadline"]
    assert len(stopped["released_jobs"]) == 2
    d2 = daemon(write_config(tmp_path, weights=weights_dir, workers=2, rules=rule))
    wait_for(lambda: {r["state"] for r in rows(db, "SELECT state FROM jobs")} == {"done"}, 180, interval=0.2)
    assert d2.stop() == 0
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == ["a.lapsrn.x8.png", "b.lapsrn.x8.png"]


def test_one_hung_worker_of_two_stops_the_watchdog_pings(tmp_path, weights_dir):
    listener = Listener(tmp_path, abstract=False)
    now = [1000.0]
    notifier = Notifier({"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": "4000000"})
    svc = Service(
        load_settings(write_config(tmp_path, weights=weights_dir, workers=2)), clock=lambda: now[0], notifier=notifier
    )
    try:
        beats = svc.runner.beats
        assert [n for n in beats if n.startswith("cpu")] or [n for n in beats if n.startswith("auto")]
        for b in beats.values():
            b.at = now[0]
        svc._tell_systemd()
        assert "WATCHDOG=1" in listener.collect(0.2)
        now[0] += 10.0
        for b in beats.values():
            b.at = now[0]
        beats[svc.runner.infer_names[1]].at = now[0] - 10.0  # the second inference thread has not moved for 10 s
        listener.messages.clear()
        svc._tell_systemd()
        got = listener.collect(0.2)
        assert any(m.startswith("STATUS=") for m in got) and "WATCHDOG=1" not in got
    finally:
        svc.shutdown()
        listener.sock.close()


def test_the_model_cache_loads_once_for_racing_workers_and_a_slow_load_blocks_no_one_else(tmp_path, weights_dir):
    ditn_dir = tmp_path / "w"
    reports = fetch(ditn_dir, ["ditn-real-x4"], mirror=str(MIRROR))
    assert all(r.status in ("fetched", "present") for r in reports), reports
    cache = ModelCache()
    ctx = LoadContext(weights_dir, "cpu")
    got: list[tuple] = []
    barrier = threading.Barrier(4)

    def get() -> None:
        barrier.wait()
        got.append(cache.get("lapsrn", 8, ctx))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 4 and len({id(up) for up, _ in got}) == 1
    assert sorted(now for _, now in got) == [False, False, False, True]  # loaded by exactly one of them

    # A spandrel load takes a while (weights, the channels-last probe); a worker whose model is loaded goes on.
    slow = threading.Thread(target=cache.get, args=("ditn-real-x4", 4, LoadContext(ditn_dir, "cpu")))
    slow.start()
    wait_for(lambda: cache._loading, 10, interval=0.001, what="the DITN load to begin")
    t0 = time.monotonic()
    up, loaded_now = cache.get("lapsrn", 8, ctx)
    waited = time.monotonic() - t0
    still_loading = slow.is_alive()
    slow.join(120)
    assert up is got[0][0] and not loaded_now
    assert still_loading, f"the DITN load ended within {waited:.3f} s; the test could not tell"


def test_nodes_lists_the_worker_count(tmp_path, weights_dir, daemon):
    cfg = write_config(tmp_path, weights=weights_dir, workers=2, device=["cpu", "auto"], node_name="box")
    d = daemon(cfg)
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "nodes", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, UPSCALED_CONFIG=str(cfg)),
    )
    assert res.returncode == 0, res.stderr
    (node,) = json.loads(res.stdout)
    # "auto" is resolved at start to the device it is: the CPU here (cuda:0 with a GPU), named once, never "auto".
    devices = list(dict.fromkeys(["cpu", resolve_auto("auto")]))
    want = (",".join(devices), 2 * len(devices))
    assert (node["node"], node["device"], node["workers"], node["state"]) == ("box", *want, "live")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
