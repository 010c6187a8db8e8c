"""The service driven one step at a time, on real inotify, real files and a real SQLite file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image, ImageCms

from daemon.config import Rule, load_settings
from daemon.jobs import worker_id
from daemon.service import Service
from tests.conftest import image, rows, started_services, write_config

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture
def make_service(tmp_path, weights_dir):
    with started_services(tmp_path, weights=weights_dir, settle_seconds=0.1) as make:
        yield make


def run_until(svc: Service, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; jobs: {svc.store.counts()}")
        svc.step(wait=0.05)


def settled(svc: Service, n: int):
    """All n inputs have ended (done or failed) and nothing waits."""

    def check() -> bool:
        c = svc.store.counts()
        return c["done"] + c["failed"] >= n and not c["pending"] and not c["running"] and not svc.watcher.candidates

    return check


def db(svc: Service) -> Path:
    return svc.settings.sqlite_path()


def test_bad_inputs_fail_their_own_job_and_nothing_is_lost(make_service, tmp_path):
    svc = make_service(rules=[{"folder": "in", "model": "fsrcnn", "scale": 2}], max_pixels=50_000)
    d = svc.settings.inbox / "in"
    assert d.is_dir()  # the service made its rule folder at start
    good = image(tmp_path / "src" / "good.png", (40, 32))
    png = good.read_bytes()
    jpg = image(tmp_path / "src" / "j.jpg", (40, 32)).read_bytes()
    bad = {
        "empty.png": (b"", "empty-file"),
        "truncated.png": (png[: len(png) // 2], "decode"),
        "truncated.jpg": (jpg[: len(jpg) // 3], "decode"),
        "text.png": (b"just some text, renamed\n" * 20, "decode"),
        "float.tif": (None, "unsupported-image"),
        "tiny.png": (None, "too-small"),
        "bomb.png": (None, "too-large"),
    }
    Image.new("F", (8, 8)).save(tmp_path / "src" / "float.tif")
    image(tmp_path / "src" / "tiny.png", (2, 2))
    image(tmp_path / "src" / "bomb.png", (300, 200))  # 60 000 px > max_pixels
    for name, (data, _) in bad.items():
        src = tmp_path / "src" / name
        if data is not None:
            src.write_bytes(data)
        os.rename(src, d / name)
    os.rename(good, d / "good.png")
    run_until(svc, settled(svc, len(bad) + 1))
    failed = {r["rel_path"]: r for r in rows(db(svc), "SELECT * FROM jobs WHERE state = 'failed'")}
    assert set(failed) == {f"in/{n}" for n in bad}
    for name, (_, kind) in bad.items():
        assert failed[f"in/{name}"]["error_kind"] == kind, (name, failed[f"in/{name}"]["error"])
        assert (svc.settings.failed / "in" / name).is_file(), f"{name} must be kept in failed/"
        info = json.loads((svc.settings.failed / "in" / f"{name}.error.json").read_text())
        assert info["kind"] == kind and info["error"] and info["file"] == f"in/{name}"
    assert (svc.settings.outbox / "in" / "good.fsrcnn.x2.png").is_file()
    assert list(svc.settings.inbox.rglob("*.*")) == []  # everything left the inbox, to one place or the other


def test_duplicates_and_reappearing_files_are_never_processed_twice(make_service, tmp_path):
    svc = make_service()
    src = image(tmp_path / "a.png", (30, 20))
    data = src.read_bytes()
    (svc.settings.inbox / "a.png").write_bytes(data)
    (svc.settings.inbox / "copy-of-a.png").write_bytes(data)
    run_until(svc, lambda: len(list(svc.settings.archive.glob("*.png"))) == 2)
    assert len(rows(db(svc), "SELECT * FROM jobs")) == 1
    assert [p.name for p in svc.settings.outbox.iterdir()] == ["a.bicubic.x2.png"]
    (svc.settings.inbox / "a.png").write_bytes(data)  # the same file shows up again
    run_until(svc, lambda: len(list(svc.settings.archive.glob("*.png"))) == 3)
    assert len(rows(db(svc), "SELECT * FROM jobs")) == 1 and len(list(svc.settings.outbox.iterdir())) == 1


def test_an_existing_output_is_never_overwritten(make_service, tmp_path):
    svc = make_service()
    svc.settings.outbox.mkdir(exist_ok=True)
    precious = svc.settings.outbox / "b.bicubic.x2.png"
    precious.write_bytes(b"someone else's file")
    image(svc.settings.inbox / "b.png", (30, 20))
    run_until(svc, settled(svc, 1))
    assert precious.read_bytes() == b"someone else's file"
    assert (svc.settings.outbox / "b.bicubic.x2-1.png").is_file()
    assert rows(db(svc), "SELECT output_path FROM jobs")[0]["output_path"].endswith("b.bicubic.x2-1.png")


def test_interrupted_jobs_resume_into_the_same_output(make_service, tmp_path, weights_dir):
    cfg = write_config(tmp_path, weights=weights_dir, settle_seconds=0.1)
    first = Service(load_settings(cfg))
    first.start()
    image(first.settings.inbox / "c.png", (30, 20))
    first.admit([PurePosixPath("c.png")])
    (task,) = first.stages.claim(worker_id(), 1)  # a worker took it, its output reserved in the same commit ...
    out = Path(task.job.output_path)
    out.write_bytes(b"half")  # ... wrote something, and died
    first.shutdown()
    second = make_service()
    run_until(second, settled(second, 1))
    (row,) = rows(db(second), "SELECT * FROM jobs")
    assert row["state"] == "done" and row["attempts"] == 2 and row["output_path"] == str(out)
    assert Image.open(out).size == (60, 40) and list(second.settings.outbox.iterdir()) == [out]


def test_files_that_arrived_while_down_and_crash_leftovers_are_handled(make_service, tmp_path):
    cfg_dir = tmp_path
    (cfg_dir / "inbox").mkdir()
    (cfg_dir / "outbox").mkdir()
    image(cfg_dir / "inbox" / "early.png", (30, 20))
    stale = cfg_dir / "outbox" / ".x.png.123.upscaled-tmp"
    stale.write_bytes(b"partial")
    svc = make_service()
    assert not stale.exists()
    run_until(svc, settled(svc, 1))
    assert (svc.settings.outbox / "early.bicubic.x2.png").is_file()


def test_pixels_and_metadata_survive_the_service(make_service, tmp_path):
    svc = make_service(rules=[{"folder": "keep", "model": "fsrcnn", "scale": 2, "outscale": 1.5}])
    d = svc.settings.inbox / "keep"
    assert d.is_dir()  # the service made its rule folder at start
    rng = np.random.default_rng(3)
    a16 = (rng.random((20, 30, 3)) * 65535).astype(np.uint16)
    import cv2

    cv2.imwrite(str(tmp_path / "deep.png"), a16)
    os.rename(tmp_path / "deep.png", d / "deep.png")
    image(d / "grey.png", (30, 20), mode="L")
    image(d / "alpha.png", (30, 20), mode="RGBA")
    image(d / "icc.jpg", (30, 20), icc_profile=SRGB, quality=95)
    run_until(svc, settled(svc, 4))
    out = svc.settings.outbox / "keep"
    deep = cv2.imread(str(out / "deep.fsrcnn.x1.5.png"), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16 and deep.shape == (30, 45, 3)
    assert Image.open(out / "grey.fsrcnn.x1.5.png").mode == "L"
    alpha = Image.open(out / "alpha.fsrcnn.x1.5.png")
    assert alpha.mode == "RGBA" and alpha.size == (45, 30)
    icc = Image.open(out / "icc.fsrcnn.x1.5.jpg")
    assert icc.info.get("icc_profile") == SRGB
    times = rows(
        db(svc),
        "SELECT t_decode, t_load, t_infer, t_encode, t_write, t_metrics, t_total, t_queue, "
        "device, precision, backend FROM jobs",
    )
    for t in times:
        assert all(t[k] is not None and t[k] >= 0 for k in ("t_decode", "t_infer", "t_encode", "t_write", "t_total"))
        assert (t["device"], t["precision"], t["backend"]) == ("cpu", "fp32", "opencv")
    names = {r["name"] for r in rows(db(svc), "SELECT DISTINCT name FROM metrics")}
    assert names == {"brisque", "lr_psnr_y", "lr_ssim_y"}


def test_missing_weights_fail_the_job_with_the_fetch_command_and_the_service_goes_on(make_service, tmp_path):
    svc = make_service(rules=[{"folder": "e", "model": "edsr", "scale": 2}])
    assert (svc.settings.inbox / "e").is_dir()  # the service made its rule folder at start
    image(svc.settings.inbox / "e" / "x.png", (30, 20))
    image(svc.settings.inbox / "y.png", (30, 20), seed=4)
    run_until(svc, settled(svc, 2))
    (failed,) = rows(db(svc), "SELECT * FROM jobs WHERE state = 'failed'")
    assert failed["error_kind"] == "weights-missing" and "upscaled weights fetch edsr" in failed["error"]
    assert (svc.settings.failed / "e" / "x.png").is_file()
    assert rows(db(svc), "SELECT count(*) AS n FROM jobs WHERE state = 'done'")[0]["n"] == 1
    # dropping the failed file in again is an explicit retry (it fails again, but it is tried)
    before = failed["finished_at"]
    os.rename(svc.settings.failed / "e" / "x.png", svc.settings.inbox / "e" / "x.png")
    again = "SELECT finished_at, attempts FROM jobs WHERE state = 'failed'"
    run_until(
        svc, lambda: (svc.settings.failed / "e" / "x.png").exists() and rows(db(svc), again)[0]["finished_at"] != before
    )
    assert rows(db(svc), again)[0]["attempts"] == 1 and len(rows(db(svc), "SELECT id FROM jobs")) == 2


def test_delete_inputs_and_symlinks(make_service, tmp_path):
    svc = make_service(delete_inputs=True)
    image(svc.settings.inbox / "gone.png", (30, 20))
    secret = image(tmp_path / "secret.png", (30, 20), seed=9)
    (svc.settings.inbox / "link.png").symlink_to(secret)
    run_until(svc, settled(svc, 2))
    assert not (svc.settings.inbox / "gone.png").exists() and not list(svc.settings.archive.iterdir())
    assert (svc.settings.outbox / "gone.bicubic.x2.png").is_file()
    assert secret.is_file() and not (svc.settings.outbox / "link.bicubic.x2.png").exists()
    link_row = rows(db(svc), "SELECT * FROM jobs WHERE rel_path = 'link.png'")[0]
    assert link_row["state"] == "failed" and "symbolic link" in link_row["error"]
    assert (svc.settings.failed / "link.png").is_symlink()


def test_benchmark_rule_writes_comparison_and_full_reference_metrics(make_service, tmp_path):
    svc = make_service(
        rules=[
            {
                "folder": "bench",
                "model": "bicubic",
                "scale": 2,
                "mode": "benchmark",
                "downscale": "area",
                "format": "png",
            }
        ]
    )
    assert (svc.settings.inbox / "bench").is_dir()  # the service made its rule folder at start
    image(svc.settings.inbox / "bench" / "hr.png", (64, 48))
    run_until(svc, settled(svc, 1))
    out = svc.settings.outbox / "bench"
    assert Image.open(out / "hr.bicubic.x2.png").size == (64, 48)
    assert Image.open(out / "hr.bicubic.x2.compare.png").size == (64 * 3 + 8, 48)
    m = {r["name"]: r for r in rows(db(svc), "SELECT * FROM metrics")}
    assert set(m) == {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "mse_rgb"}
    assert m["psnr_y"]["shave"] == 2 and m["psnr_y"]["reference"] == "hr" and "BT.601" in m["psnr_y"]["protocol"]
    assert 15 < m["psnr_y"]["value"] < 60


def test_a_prompt_sidecar_travels_with_its_image(make_service, tmp_path):
    svc = make_service()
    (svc.settings.inbox / "s.png.prompt.txt").write_text("a sharp photo")
    image(svc.settings.inbox / "s.png", (30, 20))
    run_until(svc, settled(svc, 1))
    assert (svc.settings.archive / "s.png").is_file()
    assert (svc.settings.archive / "s.png.prompt.txt").read_text() == "a sharp photo"
    assert list(svc.settings.inbox.iterdir()) == []


def test_the_daemon_neither_runs_nor_steals_the_jobs_of_process_and_bench(make_service, tmp_path, weights_dir):
    """`upscaled process` promises not to touch its inputs, and holds no lease: a daemon must not claim its jobs
    (that would archive the user's file), and must not take back one that a live process is running."""
    from daemon.jobs import JobSpec
    from daemon.store import SqlStore

    cfg = write_config(tmp_path, weights=weights_dir, settle_seconds=0.1)
    store = SqlStore(load_settings(cfg).database)
    own = tmp_path / "mine"
    own.mkdir()
    made = {}
    for name, state, worker in (
        ("waiting", "pending", None),
        ("live", "running", worker_id()),
        ("dead", "running", f"{os.uname().nodename}:999999999"),
        ("remote", "running", "other-host:12"),
    ):
        src = image(own / f"{name}.png", seed=len(name))
        (reg,) = store.register(
            [
                JobSpec(
                    sha=name.ljust(64, "0"),
                    rule=Rule(model="bicubic"),
                    rel=PurePosixPath(src.name),
                    input_path=str(src),
                    source="cli",
                    folder="(cli)",
                    fingerprint="cli-fp",
                )
            ]
        )
        if state == "running":
            assert store.claim(worker, job_id=reg.job.id)
        made[name] = reg.job.id
    store.close()
    svc = make_service()
    for _ in range(10):
        svc.step(wait=0.05)
    states = {name: svc.store.get(j).state for name, j in made.items()}
    assert states == {"waiting": "pending", "live": "running", "dead": "pending", "remote": "running"}
    assert sorted(p.name for p in own.iterdir()) == ["dead.png", "live.png", "remote.png", "waiting.png"]
    assert not list(svc.settings.archive.iterdir()) and not list(svc.settings.outbox.iterdir())


def test_a_burst_is_registered_in_growing_commits_and_a_copy_across_them_is_one_job(make_service, tmp_path):
    """30 files and a copy of the first, admitted at once: registered in commits of 4, 8, 16 and the 3 left (the
    workers start on the first four while the rest are hashed), one job for the copy's content, every input
    archived once its output is recorded."""
    svc = make_service()
    sizes: list[int] = []
    register = svc.store.register

    def counting(specs, node):  # the real store, its commits counted
        sizes.append(len(specs))
        return register(specs, node=node)

    svc.store.register = counting
    names = [f"b{i:02d}.png" for i in range(30)]
    for i, name in enumerate(names):
        image(svc.settings.inbox / name, (24, 16), seed=i + 1)
    (svc.settings.inbox / "zz-copy.png").write_bytes((svc.settings.inbox / names[0]).read_bytes())
    svc.admit([PurePosixPath(n) for n in [*names, "zz-copy.png"]])
    assert sizes == [4, 8, 16, 3]
    run_until(svc, lambda: len(list(svc.settings.archive.glob("*.png"))) == 31)
    assert len(rows(db(svc), "SELECT * FROM jobs WHERE state = 'done'")) == 30
    assert sorted(p.name for p in svc.settings.outbox.iterdir()) == sorted(n[:-4] + ".bicubic.x2.png" for n in names)
