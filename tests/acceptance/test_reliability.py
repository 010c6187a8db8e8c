"""Reliability acceptance tests: bursts, slow writers, crashes, dropped events, bad inputs, write faults, readers.

Each test runs the real `upscaled run` (or the real Service) on temp folders and a real SQLite file, and ends by
checking the invariants of DESIGN.md: every input has exactly one output and one done row, or sits in failed/ with
its reason; no duplicates and no partial files in the outbox.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from tests.conftest import image, ready_rows, rows, wait_for, write_config


def check_invariants(root: Path, inputs: set[str]) -> dict:
    """Assert the invariants for the relative input paths ``inputs``; return the job rows by input."""
    db = root / "var" / "upscaled.db"
    jobs = rows(db, "SELECT * FROM jobs")
    by_input: dict[str, list[dict]] = {}
    for j in jobs:
        by_input.setdefault(j["rel_path"], []).append(j)
    outbox = [p for p in (root / "outbox").rglob("*") if p.is_file()]
    assert not [p for p in outbox if p.name.endswith(".upscaled-tmp")], "partial files in the outbox"
    outputs = {str(p) for p in outbox if not p.name.endswith(".compare.png")}
    done_outputs = [j["output_path"] for j in jobs if j["state"] == "done"]
    assert len(done_outputs) == len(set(done_outputs)), "two jobs share an output"
    assert outputs == set(done_outputs), "outputs without a done row, or done rows without an output"
    for rel in inputs:
        js = by_input.get(rel)
        assert js and len(js) == 1, f"{rel}: {len(js or [])} jobs"
        j = js[0]
        if j["state"] == "done":
            assert Path(j["output_path"]).is_file() and Path(j["input_moved_to"]).is_file(), rel
            assert not (root / "inbox" / rel).exists(), rel
        else:
            assert j["state"] == "failed", f"{rel} is {j['state']}"
            moved = Path(j["input_moved_to"])
            assert moved.parent.is_relative_to(root / "failed") and os.path.lexists(moved), rel
            err = moved.with_name(moved.name + ".error.json")
            assert json.loads(err.read_text())["error"], rel
    return {rel: by_input[rel][0] for rel in inputs}


def _png(seed: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_a_burst_of_500_files_arriving_every_way_at_once(tmp_path, weights_dir, daemon):
    cfg = write_config(
        tmp_path,
        weights=weights_dir,
        settle_seconds=0.5,
        rules=[{"folder": "", "model": "bicubic", "scale": 2, "metrics": [], "compression": 1}],
    )
    d = daemon(cfg)
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    outside.mkdir()
    (inbox / "deep" / "er").mkdir(parents=True)
    names = set()
    for i in range(500):
        data = _png(i)
        sub = ["", "deep/", "deep/er/"][i % 3]
        name = f"{sub}f{i:03d}.png"
        names.add(name)
        way = i % 4
        if way == 0:  # a copy
            (outside / f"c{i}.png").write_bytes(data)
            shutil.copyfile(outside / f"c{i}.png", inbox / name)
        elif way == 1:  # written in place, in two pieces
            with open(inbox / name, "wb") as fh:
                fh.write(data[:50])
                fh.flush()
                fh.write(data[50:])
        elif way == 2:  # a download finishing with a rename
            (inbox / (name + ".part")).write_bytes(data)
            os.rename(inbox / (name + ".part"), inbox / name)
        else:  # moved in from outside the tree
            (outside / f"m{i}.png").write_bytes(data)
            shutil.move(outside / f"m{i}.png", inbox / name)
    db = tmp_path / "var" / "upscaled.db"
    wait_for(
        lambda: len(rows(db, "SELECT id FROM jobs WHERE state = 'done'")) == 500, 300, interval=0.5, what="500 done"
    )
    assert d.stop() == 0
    jobs = check_invariants(tmp_path, names)
    assert all(j["state"] == "done" for j in jobs.values())  # nothing lost


def test_a_slow_writer_is_processed_once_after_its_last_chunk(tmp_path, weights_dir, daemon):
    cfg = write_config(tmp_path, weights=weights_dir, settle_seconds=0.3)
    d = daemon(cfg)
    data = _png(7, 64)
    path = tmp_path / "inbox" / "slow.png"
    chunks = [data[i : i + len(data) // 6 + 1] for i in range(0, len(data), len(data) // 6 + 1)]
    with open(path, "wb") as fh:  # six chunks over ~3 s, the file open all along
        for c in chunks:
            fh.write(c)
            fh.flush()
            time.sleep(0.5)
            assert not (tmp_path / "outbox" / "slow.bicubic.x2.png").exists()
    wait_for(lambda: (tmp_path / "outbox" / "slow.bicubic.x2.png").exists(), 30)
    assert d.stop() == 0
    jobs = check_invariants(tmp_path, {"slow.png"})
    assert jobs["slow.png"]["state"] == "done" and jobs["slow.png"]["input_size"] == len(data)


@pytest.mark.parametrize("workers", [1, 3])
def test_ten_sigkills_at_random_moments_lose_and_repeat_nothing(tmp_path, weights_dir, daemon, workers):
    rules = [{"folder": "", "model": "fsrcnn", "scale": 2, "metrics": ["lr_psnr_y"]}]
    # Random kills land on jobs running alone after a restart as often as on a crowd; no file is at fault, so the
    # poison cap (tests/acceptance/test_sandbox_daemon.py) is set out of reach: this is about nothing lost or twice.
    cfg = write_config(
        tmp_path, weights=weights_dir, rules=rules, settle_seconds=0.1, workers=workers, max_recoveries=100
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = set()
    for i in range(40):
        image(inbox / f"k{i:02d}.png", (96, 80), seed=i)
        names.add(f"k{i:02d}.png")
    db = tmp_path / "var" / "upscaled.db"
    rng = random.Random(1)
    kills = 0
    while kills < 10:
        d = daemon(cfg)
        time.sleep(rng.uniform(0.05, 0.8))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        kills += 1
        d.kill()
    d = daemon(cfg)
    wait_for(lambda: len(rows(db, "SELECT id FROM jobs WHERE state = 'done'")) == 40, 120, what="40 done")
    assert d.stop() == 0
    jobs = check_invariants(tmp_path, names)
    assert all(j["state"] == "done" for j in jobs.values())
    metrics = rows(db, "SELECT job_id, count(*) AS n FROM metrics GROUP BY job_id")
    assert len(metrics) == 40 and all(m["n"] == 1 for m in metrics)


def test_files_that_made_no_events_are_found_by_the_rescan(tmp_path, weights_dir):
    from daemon.config import load_settings
    from daemon.service import Service

    svc = Service(load_settings(write_config(tmp_path, weights=weights_dir, rescan_seconds=0.5, settle_seconds=0.1)))
    svc.start()
    try:
        svc.watcher.stop()  # the kernel drops our events from here on
        for i in range(5):
            image(tmp_path / "inbox" / f"quiet{i}.png", (20, 20), seed=i)
        assert svc.watcher.events.empty()
        deadline = time.monotonic() + 20
        while svc.store.counts()["done"] < 5:
            assert time.monotonic() < deadline, svc.store.counts()
            svc.step(wait=0.05)
    finally:
        svc.shutdown()
    check_invariants(tmp_path, {f"quiet{i}.png" for i in range(5)})


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bad_inputs(tmp: Path) -> dict[str, tuple[bytes | None, str]]:
    """name -> (bytes, expected): "done", or the error kind of the failure."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    png, jpg = _save(rgb, "PNG"), _save(rgb, "JPEG")
    webp = _save(rgb, "WEBP", quality=80)
    gif = _save(rgb.convert("P"), "GIF")
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    anim = io.BytesIO()
    frames[0].save(anim, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    tiff = io.BytesIO()
    rgb.save(tiff, "TIFF", save_all=True, append_images=[rgb.rotate(90, expand=True)])
    rotated = rgb.copy()
    exif = rotated.getexif()
    exif[0x0112] = 8
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + _chunk(b"IEND", b"")
    )
    huge_text = png[:33] + _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"x" * 20_000_000)) + png[33:]
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    g16 = io.BytesIO()
    Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16)).save(g16, "TIFF")
    import cv2

    ok, rgb16 = cv2.imencode(".png", rng.integers(0, 65536, (10, 12, 3), dtype=np.uint16))
    assert ok
    return {
        # broken files
        "zero.png": (b"", "empty-file"),
        "truncated.png": (png[: len(png) // 2], "decode"),
        "truncated.jpg": (jpg[: len(jpg) // 3], "decode"),
        "truncated.webp": (webp[: len(webp) // 2], "decode"),
        "truncated.gif": (gif[: len(gif) // 2], "decode"),
        "text.png": (b"this is text, renamed\n" * 30, "decode"),
        "page.jpg": (b"<!doctype html><html><body>404 not found</body></html>\n", "decode"),
        "random.jpg": (rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "decode"),
        "bomb.png": (bomb, "too-large"),
        "huge-text-chunk.png": (huge_text, "decode"),
        "bad-crc.png": (bytes(bad_crc), "decode"),
        "float.tif": (_save(Image.new("F", (8, 8)), "TIFF"), "unsupported-image"),
        "tiny-for-fsrcnn.png": (None, "too-small"),  # in the fsrcnn folder, below
        # unusual but valid
        "one-pixel.png": (_save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "done"),
        "cmyk.jpg": (_save(rgb.convert("CMYK"), "JPEG"), "done"),
        "deep16.png": (rgb16.tobytes(), "done"),
        "grey16.tif": (g16.getvalue(), "done"),
        "palette-transparent.png": (_save(pal, "PNG", transparency=0), "done"),
        "grey-alpha.png": (_save(rgb.convert("LA"), "PNG"), "done"),
        "one-bit.png": (_save(rgb.convert("1"), "PNG"), "done"),
        "animated.gif": (anim.getvalue(), "done"),
        "multipage.tif": (tiff.getvalue(), "done"),
        "rotated.jpg": (_save(rotated, "JPEG", exif=exif.tobytes()), "done"),
        "with-icc.jpg": (_save(rgb, "JPEG", icc_profile=SRGB), "done"),
        "lossless-alpha.webp": (_save(rgb.convert("RGBA"), "WEBP", lossless=True), "done"),
        "picture.bmp": (_save(rgb, "BMP"), "done"),
        "png-named.jpg": (png, "done"),
        # awkward names
        "with spaces in it.png": (png[:-1] + b"\x82", None),  # replaced below by a distinct valid image
        "ünïcødé 画像.png": (None, "done"),
        "new\nline.png": (None, "done"),
        ("L" * 245) + ".png": (None, "done"),
    }


def test_more_than_30_kinds_of_bad_and_odd_input(tmp_path, weights_dir):
    from tests.acceptance.test_acceptance import _without_read_override

    cfg = write_config(
        tmp_path,
        weights=weights_dir,
        max_pixels=1_000_000,
        settle_seconds=0.2,
        rules=[
            {"folder": "", "model": "bicubic", "scale": 2, "metrics": ["lr_psnr_y"]},
            {"folder": "fs", "model": "fsrcnn", "scale": 2},
        ],
    )
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    (inbox / "fs").mkdir()
    staging.mkdir()
    cases = _bad_inputs(tmp_path)
    expected: dict[str, str] = {}
    for i, (name, (data, outcome)) in enumerate(cases.items()):
        if data is None or outcome is None:  # a distinct valid image for the name cases
            data, outcome = _png(1000 + i, 16), outcome or "done"
        rel = f"fs/{name}" if name.startswith("tiny-for") else name
        if name.startswith("tiny-for"):
            data = _png(5, 2)
        (staging / "x").write_bytes(data)
        os.rename(staging / "x", inbox / rel)
        expected[rel] = outcome
    # not regular files, and no permission
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(99))
    os.symlink(secret, inbox / "link-outside.png")
    expected["link-outside.png"] = "unsafe-path"
    os.mkfifo(inbox / "pipe.png")
    expected["pipe.png"] = "unsafe-path"
    (inbox / "folder.png").mkdir()  # a directory with an image name is just a folder
    (inbox / "locked.png").write_bytes(_png(77))
    os.chmod(inbox / "locked.png", 0)
    expected["locked.png"] = "unreadable"
    assert len(expected) >= 30
    env = dict(os.environ, UPSCALED_CONFIG=str(cfg))
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(
        [*_without_read_override(), sys.executable, "-m", "daemon", "run"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    db = tmp_path / "var" / "upscaled.db"
    try:
        wait_for(
            lambda: len(ready_rows(db, "SELECT id FROM jobs WHERE state IN ('done', 'failed')")) >= len(expected),
            120,
            interval=0.3,
            what="every input handled",
        )
        image(inbox / "after.png", (20, 20), seed=123)  # the service is still up and working
        wait_for(lambda: (tmp_path / "outbox" / "after.bicubic.x2.png").exists(), 30)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    jobs = check_invariants(tmp_path, set(expected) | {"after.png"})
    got = {rel: ("done" if j["state"] == "done" else j["error_kind"]) for rel, j in jobs.items() if rel in expected}
    assert got == expected
    assert secret.read_bytes() == _png(99)  # the link's target was never touched
    notes = (tmp_path / "daemon.log").read_text()
    assert "only the first page was upscaled" in notes  # a multi-page TIFF: pages are not an animation
    with Image.open(jobs["animated.gif"]["output_path"]) as gif:  # every frame of an animation is upscaled
        assert getattr(gif, "n_frames", 1) == jobs["animated.gif"]["frames"] > 1
    assert Image.open(jobs["rotated.jpg"]["output_path"]).size == (48, 64)  # EXIF rotation applied
    assert len(list((tmp_path / "failed").rglob("*.error.json"))) == sum(v != "done" for v in expected.values())


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def test_write_faults_keep_the_input_and_retry_until_space_returns(tmp_path, weights_dir, daemon):
    outbox = tmp_path / "outbox"
    if os.geteuid() != 0 or not _mount_tmpfs(outbox, "300k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        filler = outbox / "filler.bin"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass  # the disk is full now
        cfg = write_config(
            tmp_path,
            weights=weights_dir,
            retry_seconds=0.2,
            retry_max_seconds=0.5,
            rules=[{"folder": "", "model": "bicubic", "scale": 2, "metrics": []}],
        )
        d = daemon(cfg)
        image(tmp_path / "inbox" / "big.png", (120, 120))
        db = tmp_path / "var" / "upscaled.db"
        wait_for(
            lambda: ready_rows(db, "SELECT attempts FROM jobs WHERE error_kind = 'disk-full' AND attempts >= 3"),
            60,
            what="retries on a full disk",
        )
        assert (tmp_path / "inbox" / "big.png").exists()  # the input is kept
        assert not [p for p in outbox.iterdir() if p.name != "filler.bin"]  # no partial output
        filler.unlink()  # space returns
        wait_for(lambda: rows(db, "SELECT state FROM jobs")[0]["state"] == "done", 30)
        assert d.stop() == 0
        (job,) = rows(db, "SELECT * FROM jobs")
        assert Image.open(job["output_path"]).size == (240, 240)
    finally:
        subprocess.run(["umount", "-l", str(outbox)], capture_output=True)


def test_an_unwritable_outbox_is_retried_not_failed(tmp_path, weights_dir):
    from tests.acceptance.test_acceptance import _without_read_override

    cfg = write_config(tmp_path, weights=weights_dir, retry_seconds=0.2, retry_max_seconds=0.5)
    env = dict(os.environ, UPSCALED_CONFIG=str(cfg))
    proc = subprocess.Popen(
        [*_without_read_override(), sys.executable, "-m", "daemon", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    db = tmp_path / "var" / "upscaled.db"
    try:
        wait_for(lambda: db.exists() and (tmp_path / "outbox").is_dir(), 30)
        os.chmod(tmp_path / "outbox", 0o555)  # someone breaks the mount's permissions while it runs
        image(tmp_path / "inbox" / "w.png", (30, 20))
        wait_for(
            lambda: ready_rows(db, "SELECT id FROM jobs WHERE error_kind = 'output-unavailable' AND attempts >= 3"), 60
        )
        assert (tmp_path / "inbox" / "w.png").exists() and not list((tmp_path / "failed").iterdir())
        os.chmod(tmp_path / "outbox", 0o755)
        wait_for(lambda: rows(db, "SELECT state FROM jobs")[0]["state"] == "done", 30)
    finally:
        os.chmod(tmp_path / "outbox", 0o755)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    check_invariants(tmp_path, {"w.png"})


def test_readers_never_see_database_is_locked_and_sigterm_exits_cleanly(tmp_path, weights_dir, daemon):
    cfg = write_config(
        tmp_path, weights=weights_dir, rules=[{"folder": "", "model": "fsrcnn", "scale": 4, "metrics": ["lr_psnr_y"]}]
    )
    d = daemon(cfg)
    for i in range(25):
        image(tmp_path / "staging" / f"r{i}.png", (80, 64), seed=i)
        os.rename(tmp_path / "staging" / f"r{i}.png", tmp_path / "inbox" / f"r{i}.png")
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            res = subprocess.run(
                [sys.executable, "-m", "daemon", "--config", str(cfg), "history", "--format", "json", "--limit", "100"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if res.returncode != 0 or "locked" in res.stderr:
                errors.append(res.stderr)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    db = tmp_path / "var" / "upscaled.db"
    wait_for(lambda: len(rows(db, "SELECT id FROM jobs WHERE state = 'done'")) >= 8, 120)
    assert d.stop() == 0  # mid-queue: the current job finishes, the rest stays pending
    stop.set()
    for t in threads:
        t.join(90)
    assert not errors, errors[:2]
    states = {r["state"] for r in rows(db, "SELECT state FROM jobs")}
    assert states <= {"done", "pending"} and "running" not in states


def test_umask_applies_to_outputs_and_the_database(tmp_path, weights_dir, daemon):
    cfg = write_config(tmp_path, weights=weights_dir, umask="077")
    d = daemon(cfg)
    image(tmp_path / "inbox" / "u.png", (20, 20))
    wait_for(lambda: (tmp_path / "outbox" / "u.bicubic.x2.png").exists(), 30)
    assert d.stop() == 0
    assert (tmp_path / "outbox" / "u.bicubic.x2.png").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "var" / "upscaled.db").stat().st_mode & 0o777 == 0o600
