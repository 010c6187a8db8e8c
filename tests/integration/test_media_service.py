"""The files people drop, through the service end to end: animations, HEIC/AVIF, metadata policies, target sizes
and hooks. Real files made with the real encoders, real inotify, a real SQLite file, a real local HTTP server."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.config import load_settings
from daemon.service import Service
from tests.conftest import image, rows, write_config
from tests.unit.test_media_animation import read_with_opencv
from tests.unit.test_media_metadata import TITLE, tagged_jpeg


@pytest.fixture
def make_service(tmp_path):
    made: list[Service] = []

    def make(rules, **keys) -> Service:
        svc = Service(load_settings(write_config(tmp_path, rules=rules, settle_seconds=0.1, **keys)))
        svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.shutdown()


def run_until(svc: Service, n: int, timeout: float = 60.0) -> None:
    """Step until n jobs ended and their metrics and hooks had their turn."""
    deadline = time.monotonic() + timeout
    while True:
        c = svc.store.counts()
        if c["done"] + c["failed"] >= n and not c["pending"] and not c["running"] and not svc.watcher.candidates:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; jobs: {c}")
        svc.step(wait=0.05)


def _animation(fmt: str, durations=(100, 200, 300), size=(24, 16)) -> bytes:
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in durations]
    buf = io.BytesIO()
    frames[0].save(
        buf,
        fmt,
        save_all=True,
        append_images=frames[1:],
        duration=list(durations),
        loop=0,
        **({"lossless": True} if fmt == "WEBP" else {}),
    )
    return buf.getvalue()


@pytest.mark.parametrize(("name", "fmt"), [("anim.gif", "GIF"), ("anim.webp", "WEBP")])
def test_an_animation_comes_out_whole_with_its_timing(make_service, tmp_path, name, fmt):
    svc = make_service([{"folder": "", "model": "nearest", "scale": 2}])
    (svc.settings.inbox / name).write_bytes(_animation(fmt))
    run_until(svc, 1)
    (job,) = rows(svc.settings.sqlite_path(), "SELECT * FROM jobs")
    assert job["state"] == "done" and job["frames"] == 3
    with Image.open(job["output_path"]) as out:
        assert out.format == fmt and out.size == (48, 32) and out.n_frames == 3
    frames, durations, loop = read_with_opencv(Path(job["output_path"]).read_bytes(), fmt.lower(), tmp_path)
    assert len(frames) == 3 and durations == [100, 200, 300] and loop == 0  # a second reader: OpenCV
    metrics = rows(svc.settings.sqlite_path(), "SELECT name, protocol FROM metrics")
    assert metrics and all("mean over 3 of 3 frames" in m["protocol"] for m in metrics)


def test_heic_and_avif_inputs_come_out_at_the_right_size(make_service, tmp_path):
    pytest.importorskip("pillow_heif", reason="the heif extra is not installed: pip install 'upscaled[heif]'")
    import pillow_heif

    pillow_heif.register_heif_opener()
    svc = make_service([{"folder": "", "model": "bicubic", "scale": 2, "metrics": []}])
    src = np.asarray(Image.open(image(tmp_path / "src.png", (40, 30))))
    Image.fromarray(src).save(svc.settings.inbox / "a.heic", quality=90)
    Image.fromarray(src).save(svc.settings.inbox / "b.avif", quality=90)
    run_until(svc, 2)
    got = {Path(r["output_path"]).suffix: r for r in rows(svc.settings.sqlite_path(), "SELECT * FROM jobs")}
    assert set(got) == {".heic", ".avif"} and all(r["state"] == "done" for r in got.values())
    for r in got.values():
        with Image.open(r["output_path"]) as out:
            assert out.size == (80, 60)


def test_xmp_survives_keep_and_is_gone_under_strip(make_service):
    svc = make_service(
        [
            {"folder": "keep", "model": "bicubic", "scale": 2, "format": "jpg", "metrics": []},
            {"folder": "strip", "model": "bicubic", "scale": 2, "format": "jpg", "metrics": [], "metadata": "strip"},
        ]
    )
    for folder in ("keep", "strip"):
        assert (svc.settings.inbox / folder).is_dir()  # the service made its rule folders at start
        (svc.settings.inbox / folder / "t.jpg").write_bytes(tagged_jpeg())
    run_until(svc, 2)
    kept = (svc.settings.outbox / "keep" / "t.bicubic.x2.jpg").read_bytes()
    stripped = (svc.settings.outbox / "strip" / "t.bicubic.x2.jpg").read_bytes()
    assert TITLE.encode() in kept and TITLE.encode() not in stripped
    with Image.open(io.BytesIO(kept)) as im:  # the EXIF states the output's size, not the input's
        assert im.size == (120, 80) and im.getexif().get_ifd(0x8769).get(0xA002) == 120


def test_a_target_width_gives_that_width_with_its_aspect(make_service):
    svc = make_service(
        [
            {
                "folder": "",
                "model": "bicubic",
                "scale": 2,
                "width": 200,
                "metrics": [],
                "naming": "{stem}.{width}x{height}.{ext}",
            }
        ]
    )
    image(svc.settings.inbox / "w.png", (64, 40))
    run_until(svc, 1)
    (job,) = rows(svc.settings.sqlite_path(), "SELECT * FROM jobs")
    assert job["state"] == "done" and Path(job["output_path"]).name == "w.200x125.png"
    with Image.open(job["output_path"]) as out:
        assert out.size == (200, 125)


class _Receiver(http.server.BaseHTTPRequestHandler):
    got: list[dict] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append(dict(json.loads(body), auth=self.headers.get("Authorization")))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_hooks_post_after_the_commit_and_a_failing_hook_leaves_the_job_done(tmp_path, monkeypatch):
    _Receiver.got = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    monkeypatch.setenv("UPSCALED_HOOK_TOKEN", "s3cret")
    made: list[Service] = []
    try:
        cfg = write_config(tmp_path, settle_seconds=0.1)
        cfg.write_text(
            cfg.read_text()
            + f"""
[[rules]]
folder = "ok"
model = "bicubic"
scale = 2
on_done = {{ url = "{url}", headers = {{ Authorization = "Bearer ${{UPSCALED_HOOK_TOKEN}}" }} }}
on_failed = {{ url = "{url}" }}

[[rules]]
folder = "broken"
model = "bicubic"
scale = 2
metrics = []
on_done = {{ url = "http://127.0.0.1:9/nothing-listens", retries = 0 }}
"""
        )
        svc = Service(load_settings(cfg))
        svc.start()
        made.append(svc)
        for folder in ("ok", "broken"):
            assert (svc.settings.inbox / folder).is_dir()  # the service made its rule folders at start
        image(svc.settings.inbox / "ok" / "good.png", (40, 30))
        (svc.settings.inbox / "ok" / "bad.png").write_text("not an image")
        image(svc.settings.inbox / "broken" / "fine.png", (40, 30), seed=3)
        run_until(svc, 3)
        deadline = time.monotonic() + 20
        while (
            len(_Receiver.got) < 2 or len(rows(svc.settings.sqlite_path(), "SELECT * FROM hook_runs")) < 3
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        by_event = {g["event"]: g for g in _Receiver.got}
        assert by_event["done"]["auth"] == "Bearer s3cret" and by_event["done"]["metrics"]  # after the metrics
        assert by_event["done"]["output"].endswith("good.bicubic.x2.png")
        assert by_event["failed"]["error_kind"] == "decode"
        runs = rows(
            svc.settings.sqlite_path(),
            "SELECT h.event, h.ok, h.detail, j.rel_path, j.state FROM hook_runs h JOIN jobs j ON j.id = h.job_id",
        )
        failing = [r for r in runs if r["rel_path"] == "broken/fine.png"]
        assert failing and not failing[0]["ok"] and failing[0]["state"] == "done"  # the job stays done
        assert sorted((r["rel_path"], r["event"]) for r in runs) == [
            ("broken/fine.png", "on_done"),
            ("ok/bad.png", "on_failed"),
            ("ok/good.png", "on_done"),
        ]  # once each
        assert all("s3cret" not in (r["detail"] or "") for r in runs)  # the secret is never recorded
    finally:
        for svc in made:
            svc.shutdown()
        server.shutdown()
