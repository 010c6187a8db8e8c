"""A real daemon's /metrics, /livez and /readyz: counters that move with real jobs, and a hung worker seen."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon, image, wait_for, write_config

RULES = [{"folder": "", "model": "fsrcnn", "scale": 2, "metrics": []}]


def address(d: Daemon) -> str:
    ev = wait_for(lambda: next((e for e in d.events() if e.get("event") == "telemetry.listening"), None), 30)
    return "http://" + ev["address"]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(base: str) -> dict[tuple[str, tuple], float]:
    status, body = get(base + "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_move_with_real_jobs_and_the_scrape_parses(tmp_path, weights_dir, daemon):
    cfg = write_config(tmp_path, weights=weights_dir, rules=RULES, settle_seconds=0.1, http_listen="127.0.0.1:0")
    d = daemon(cfg)
    base = address(d)
    before = samples(base)
    done_key = ("upscaled_jobs_total", (("model", "fsrcnn"), ("rule", "(default)"), ("status", "done")))
    failed_key = ("upscaled_jobs_total", (("model", "fsrcnn"), ("rule", "(default)"), ("status", "failed")))
    assert before[done_key] == 0 and before[failed_key] == 0  # declared at start, before any job
    image(tmp_path / "inbox" / "a.png", (40, 30))
    image(tmp_path / "inbox" / "b.png", (40, 30), seed=2)
    (tmp_path / "inbox" / "bad.png").write_text("not an image")
    wait_for(
        lambda: samples(base).get(done_key) == 2 and samples(base).get(failed_key) == 1,
        60,
        what="2 done and 1 failed on /metrics",
    )
    after = samples(base)
    assert after[("upscaled_pixels_total", (("direction", "in"),))] == 2 * 40 * 30
    assert after[("upscaled_pixels_total", (("direction", "out"),))] == 2 * 80 * 60
    hist = ("upscaled_job_duration_seconds_count", (("model", "fsrcnn"), ("rule", "(default)"), ("stage", "infer")))
    assert after[hist] == 2
    assert (
        after[("upscaled_last_success_timestamp_seconds", ())]
        >= before[("upscaled_last_success_timestamp_seconds", ())]
    )
    assert any(k[0] == "upscaled_build_info" for k in after)
    status, body = get(base + "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["status"] == "ok" and ready["queue"] == {"pending": 0, "running": 0}
    assert set(ready["checks"]) >= {"database", "inbox", "outbox", "weights", "devices", "config"}
    assert get(base + "/nothing-here")[0] == 404
    assert d.stop() == 0


def test_livez_turns_503_while_a_worker_hangs_and_200_when_it_moves_again(tmp_path, weights_dir):
    cfg = write_config(
        tmp_path, weights=weights_dir, rules=RULES, settle_seconds=0.1, http_listen="127.0.0.1:0", hung_seconds=1.0
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    d = Daemon(
        cfg,
        {
            "UPSCALED_FAILPOINTS_TEST": "1",
            "UPSCALED_FAILPOINTS": "in-infer=pause",
            "UPSCALED_FAILPOINT_DIR": str(marks),
        },
    )
    try:
        d.wait_started()
        base = address(d)
        assert get(base + "/livez")[0] == 200
        image(tmp_path / "inbox" / "stuck.png", (40, 30))
        wait_for(lambda: (marks / "in-infer.hit").exists(), 30, what="a worker inside the model")
        status, body = wait_for(lambda: (r := get(base + "/livez"))[0] == 503 and r, 10, what="/livez 503")
        info = json.loads(body)
        hung = {k: v for k, v in info["checks"].items() if not v["ok"]}
        assert len(hung) == 1 and "stuck.png" in next(iter(hung.values()))["reason"]
        (marks / "in-infer.release").touch()
        wait_for(lambda: (Path(tmp_path) / "outbox" / "stuck.fsrcnn.x2.png").exists(), 30)
        wait_for(lambda: get(base + "/livez")[0] == 200, 10, what="/livez 200 again")
        assert d.stop() == 0
    finally:
        d.kill()
