"""The web view meets hostile files: through the sandbox, with limits, streamed, never through a link.

Finding 9 of the second attack review: the web view read failed inputs whole (a 1.5 GB sparse file cost 1.7 GB per
job page, 4.7 GB to stream, 10.7 GB for 8 concurrent views), and it followed a folder symlink for an input still in
the inbox. Each test runs the real `upscaled web` and measures the real process.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from daemon.config import load_settings
from daemon.store import SqlStore
from tests.acceptance.test_hostile_inbox import proc_status
from tests.conftest import image, write_config
from tests.integration.test_web import WebServer, add_job


def _sparse_png(path: Path, size: int, dims: tuple[int, int] = (4000, 4000)) -> Path:
    """A valid PNG header (``dims``) followed by a sparse tail: ``size`` bytes on paper, a few KB on disk."""
    ihdr = struct.pack(">IIBBBBB", *dims, 8, 2, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    head += struct.pack(">I", size - len(head) - 12) + b"IDAT"  # the pixels: the rest of the file, on paper
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


def _server(tmp: Path, jobs: list[dict]) -> tuple[WebServer, dict[str, int]]:
    cfg = write_config(tmp)
    settings = load_settings(cfg)
    store = SqlStore(settings.database)
    try:
        ids = {j["name"]: add_job(store, **j) for j in jobs}
    finally:
        store.close()
    return WebServer(cfg), ids


def test_a_huge_sparse_failed_input_costs_the_web_view_nothing(tmp_path):
    """A 1.5 GB file with a valid 4000x4000 PNG header, as a failed job's input: the job page, the image and the
    thumbnail answer at once (the file is far larger than its pixels can need, said before it is read), and the web
    process's peak memory does not move."""
    bomb = _sparse_png(tmp_path / "failed" / "bomb.png", 1536 << 20)
    web, ids = _server(
        tmp_path,
        [dict(name="bomb.png", folder="", input_path=bomb, state="failed", moved_to=bomb, error=("decode", "x"))],
    )
    try:
        assert web.get("/")[0] == 200
        hwm0 = proc_status(web.proc.pid, "VmHWM")
        job = web.page(f"/jobs/{ids['bomb.png']}")
        status, _, body = web.get(f"/jobs/{ids['bomb.png']}/input")
        thumb = web.get(f"/jobs/{ids['bomb.png']}/thumb")[0]
        hwm1 = proc_status(web.proc.pid, "VmHWM")
    finally:
        web.stop()
    assert status == 415 and b"far more than a 4000x4000 image can need" in body, (status, body[:300])
    assert "far more than" in job and thumb == 200
    assert hwm1 - hwm0 < 64 << 20, f"the web view's peak RSS grew {(hwm1 - hwm0) >> 20} MiB"


def test_an_original_the_browser_shows_as_it_is_is_streamed_not_held(tmp_path):
    """A 36 MB uncompressed PNG output is sent as it is, byte for byte, without the web process holding it."""
    arr = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    out = tmp_path / "outbox" / "big.png"
    out.parent.mkdir(parents=True)
    Image.fromarray(arr).save(out, compress_level=0)
    src = image(tmp_path / "archive" / "big-in.png", (40, 30))
    web, ids = _server(tmp_path, [dict(name="big-in.png", folder="", input_path=src, output=out, moved_to=src)])
    try:
        assert web.get(f"/jobs/{ids['big-in.png']}")[0] == 200
        hwm0 = proc_status(web.proc.pid, "VmHWM")
        status, headers, body = web.get(f"/jobs/{ids['big-in.png']}/output")
        hwm1 = proc_status(web.proc.pid, "VmHWM")
    finally:
        web.stop()
    assert status == 200 and headers["content-type"] == "image/png"
    assert hashlib.sha256(body).digest() == hashlib.sha256(out.read_bytes()).digest()
    size = out.stat().st_size
    assert hwm1 - hwm0 < size // 4, f"serving {size >> 20} MiB grew the web view's peak RSS {(hwm1 - hwm0) >> 20} MiB"


def test_an_input_behind_a_folder_symlink_is_not_served(tmp_path):
    """A job's input still in the inbox, where its folder was swapped for a link to a folder elsewhere: the web view
    walks every folder without following links, as the daemon does, and shows nothing of what the link points at."""
    outside = image(tmp_path / "elsewhere" / "x.png", (40, 30), seed=3)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.symlink(tmp_path / "elsewhere", inbox / "photos")
    web, ids = _server(
        tmp_path,
        [dict(name="x.png", folder="photos", input_path=inbox / "photos" / "x.png", state="pending")],
    )
    try:
        status, _, body = web.get(f"/jobs/{ids['x.png']}/input")
        thumb_status, thumb_headers, thumb = web.get(f"/jobs/{ids['x.png']}/thumb")
    finally:
        web.stop()
    assert status in (404, 415) and b"symbolic link" in body, (status, body[:300])
    assert outside.read_bytes() not in thumb and thumb_headers["content-type"] != "image/webp", thumb_headers
