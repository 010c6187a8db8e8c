"""One file must never stop the service: the sandbox, the poison-job cap and the bomb matrix, on the real daemon.

- The bomb matrix: for each input format, a pixel bomb, a frame bomb (where the format animates), a frame larger
  than its canvas (where it has frames), a truncated file, a file grown after it was registered, and a metadata bomb,
  all dropped beside a good file into one daemon that systemd's watchdog would be watching. Each bomb fails its own
  job with a reason that names its limit (the metadata bomb loses its metadata, with a note, and is upscaled); the
  good file comes out; the daemon's peak memory stays within a bound of its idle memory; WATCHDOG=1 keeps coming.
- The daemon parses nothing itself: with its decoder module made unimportable and Pillow's and OpenCV's readers made
  to raise in its process, every job still completes (metadata, animations, lossy outputs and their metrics).
- Poison: a failpoint kills the daemon whenever one file is being decoded. Restarted each time (as systemd would),
  it fails that file as ``poison`` after ``max_recoveries`` deaths while it was alone in flight, and every other file
  comes out; a storm of SIGKILLs while several jobs are in flight makes no innocent job poison.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from daemon.media import formats
from tests.acceptance.test_hostile_inbox import Notify, jobs, proc_status, settled
from tests.conftest import ROOT, Daemon, image, wait_for, write_config

formats.register_plugins()  # HEIF and JPEG XL, to make the bombs
MAX_PIXELS = 1_000_000
MAX_FRAMES = 50
RULE = {"folder": "", "model": "bicubic", "scale": 2, "format": "png", "metrics": []}
RSS_BOUND = 160 << 20  # the daemon's peak RSS over its idle RSS, with every bomb of the matrix through it


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A textured picture (a Set5 crop, through the suite's image helper), in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        with Image.open(image(Path(tmp) / "p.png", size, seed=seed)) as im:
            return im.convert("RGB")


def _frames(n: int, size: tuple[int, int]) -> list[Image.Image]:
    return [Image.new("RGB", size, (i * 5 % 256, 255 - i * 5 % 256, 40)) for i in range(n)]


def _xmp(n: int) -> bytes:
    props = "".join(f"<x{i % 97}:p{i}>v</x{i % 97}:p{i}>" for i in range(n))
    ns = " ".join(f'xmlns:x{i}="http://example.com/{i}/"' for i in range(97))
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" {ns}>{props}</rdf:Description></rdf:RDF></x:xmpmeta>'
    ).encode()


# --- the bombs -------------------------------------------------------------------------------------------------------
def pixel_bomb(fmt: str) -> bytes:
    """A small file whose header declares more pixels than max_pixels."""
    if fmt == "png":  # 30000x30000 declared, one row of data: the classic
        raw = zlib.compress(b"\x00" + b"\x00" * 3 * 30000)
        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")
    if fmt == "gif":  # a 30000x30000 logical screen and image
        data = bytearray(_encode(Image.new("P", (8, 8)), "GIF"))
        data[6:10] = (30000).to_bytes(2, "little") * 2
        desc = data.index(b"\x2c")
        data[desc + 5 : desc + 9] = (30000).to_bytes(2, "little") * 2
        return bytes(data)
    if fmt == "jpg":  # the frame header (SOF0) says 30000x30000
        data = bytearray(_encode(Image.new("RGB", (16, 16)), "JPEG"))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
        return bytes(data)
    pil = {"webp": "WEBP", "tiff": "TIFF", "heic": "HEIF", "avif": "AVIF", "jxl": "JXL", "apng": "PNG"}[fmt]
    big = Image.new("RGB", (1100, 1000), (30, 60, 90))  # 1.1 MP of one colour: a few hundred bytes to a few KB
    if fmt == "apng":
        return _encode(big, "PNG", save_all=True, append_images=[Image.new("RGB", (1100, 1000))], duration=40)
    return _encode(big, pil, **({"compression": "tiff_deflate"} if fmt == "tiff" else {}))


def frame_bomb(fmt: str) -> bytes:
    """More frames than max_frames."""
    frames = _frames(MAX_FRAMES + 10, (24, 16))
    pil = {"gif": "GIF", "webp": "WEBP", "apng": "PNG"}[fmt]
    return _encode(frames[0], pil, save_all=True, append_images=frames[1:], duration=40)


def larger_than_canvas(fmt: str) -> bytes:
    """A 16x16 canvas whose second frame claims 600x600."""
    a, b = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    if fmt == "gif":
        data = bytearray(_encode(a.quantize(), "GIF", save_all=True, append_images=[b.quantize()], duration=40))
        second = data.index(b"\x2c", data.index(b"\x2c") + 1)
        data[second + 5 : second + 9] = (600).to_bytes(2, "little") * 2
        return bytes(data)
    if fmt == "apng":
        data = _encode(a, "PNG", save_all=True, append_images=[b], duration=40)
        out, pos, seen = bytearray(data[:8]), 8, 0
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 4], "big")
            kind, body = data[pos + 4 : pos + 8], bytearray(data[pos + 8 : pos + 8 + length])
            if kind == b"fcTL":
                seen += 1
                if seen == 2:
                    body[4:12] = struct.pack(">II", 600, 600)
            out += _png_chunk(kind, bytes(body))
            pos += 12 + length
        return bytes(out)
    if fmt == "webp":  # the second ANMF frame's size fields: width-1 and height-1, 24 bits each
        data = bytearray(_encode(a, "WEBP", save_all=True, append_images=[b], duration=40, lossless=True))
        second = data.index(b"ANMF", data.index(b"ANMF") + 4)
        data[second + 8 + 6 : second + 8 + 12] = (599).to_bytes(3, "little") * 2
        return bytes(data)
    raise ValueError(fmt)


def truncated(fmt: str) -> bytes:
    pil = {"png": "PNG", "jpg": "JPEG", "gif": "GIF", "webp": "WEBP", "tiff": "TIFF", "heic": "HEIF"}
    pil |= {"avif": "AVIF", "jxl": "JXL", "apng": "PNG"}
    im = _photo((120, 90), seed=3)
    if fmt in ("gif", "apng"):
        data = _encode(im, pil[fmt], save_all=True, append_images=[im.rotate(180)], duration=40)
    else:
        data = _encode(im, pil[fmt])
    return data[: len(data) // 2]


def good(fmt: str, seed: int = 1) -> bytes:
    pil = {"png": "PNG", "jpg": "JPEG", "gif": "GIF", "webp": "WEBP", "tiff": "TIFF", "heic": "HEIF"}
    pil |= {"avif": "AVIF", "jxl": "JXL", "apng": "PNG"}
    im = _photo((48, 36), seed=seed)
    if fmt in ("gif", "apng"):
        return _encode(im, pil[fmt], save_all=True, append_images=[im.rotate(180)], duration=40)
    return _encode(im, pil[fmt])


def metadata_bomb(fmt: str) -> bytes | None:
    """A small good image carrying an XMP packet of 12,000 properties (JPEG: as many as one segment holds). None
    where the encoder cannot embed XMP."""
    im = _photo((48, 36), seed=5)
    xmp = _xmp(12_000)
    if fmt == "png":
        info = PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode(), zip=True)
        return _encode(im, "PNG", pnginfo=info)
    if fmt == "jpg":  # one APP1 segment: 4,500 properties as attributes fit in its 64 KB
        attrs = " ".join(f'x{i % 9}:a{i}="1"' for i in range(4500))
        dense = _xmp(0).replace(b'rdf:about=""', f'rdf:about="" {attrs}'.encode())
        return _encode(im, "JPEG", xmp=dense)
    if fmt == "tiff":
        from PIL.TiffImagePlugin import ImageFileDirectory_v2

        ifd = ImageFileDirectory_v2()
        ifd[700] = xmp
        ifd.tagtype[700] = 1
        return _encode(im, "TIFF", tiffinfo=ifd)
    if fmt in ("webp", "avif", "heic"):
        return _encode(im, {"webp": "WEBP", "avif": "AVIF", "heic": "HEIF"}[fmt], xmp=xmp)
    return None


FORMATS = ["png", "jpg", "gif", "webp", "apng", "tiff", "heic", "avif", "jxl"]
ANIMATED = ["gif", "webp", "apng"]
EXT = {"apng": "png", "jpg": "jpg"}


def _matrix() -> list[tuple[str, str, bytes]]:
    """(name, expected kind, bytes) for every bomb of the matrix (the grown files are made good, then grown)."""
    cases = []
    for fmt in FORMATS:
        ext = EXT.get(fmt, fmt)
        cases.append((f"pixel-{fmt}.{ext}", "too-large", pixel_bomb(fmt)))
        cases.append((f"truncated-{fmt}.{ext}", "decode", truncated(fmt)))
        cases.append((f"grown-{fmt}.{ext}", "input-changed", good(fmt, seed=7)))
        meta = metadata_bomb(fmt)
        if meta is not None:
            cases.append((f"meta-{fmt}.{ext}", "done", meta))
        if fmt in ANIMATED:
            cases.append((f"frames-{fmt}.{ext}", "too-large", frame_bomb(fmt)))
            cases.append((f"canvas-{fmt}.{ext}", "too-large", larger_than_canvas(fmt)))
    return cases


WHY = {  # what each kind's reason must say: the limit it hit
    "pixel": ("max_pixels",),
    "frames": ("max_frames",),
    "canvas": ("larger than the 16x16 canvas",),
    "truncated": ("truncated", "damaged", "not an image", "cannot", "broken", "failed"),
    "grown": ("changed size after it was registered",),
}


def test_the_bomb_matrix_fails_each_bomb_alone_and_keeps_the_daemon_flat_and_watched(tmp_path):
    cases = _matrix()
    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = write_config(
        tmp_path, rules=[RULE], settle_seconds=0.1, max_pixels=MAX_PIXELS, max_frames=MAX_FRAMES, decode_timeout=60
    )
    notify = Notify(tmp_path / "notify.sock")
    env = dict(
        notify.env,
        WATCHDOG_USEC="2000000",
        UPSCALED_FAILPOINTS_TEST="1",
        UPSCALED_FAILPOINTS="in-decode=pause@grown-",
        UPSCALED_FAILPOINT_DIR=str(marks),
    )
    d = Daemon(cfg, env)
    db = tmp_path / "var" / "upscaled.db"
    staging, inbox = tmp_path / "staging", tmp_path / "inbox"
    staging.mkdir()
    try:
        d.wait_started()
        time.sleep(1.0)
        pid = d.proc.pid
        idle = proc_status(pid, "VmRSS")
        t0 = time.monotonic()
        for name, _, data in [*cases, ("good.png", "done", good("png", seed=9))]:
            (staging / name).write_bytes(data)
            os.rename(staging / name, inbox / name)
        grown = 0
        deadline = time.monotonic() + 300
        while not settled(db, len(cases) + 1):
            assert time.monotonic() < deadline, "the matrix did not settle in 5 minutes"
            assert d.proc.poll() is None, d.log_path.read_text()[-3000:]
            hit = marks / "in-decode.hit"
            if hit.exists() and not (marks / "in-decode.release").exists():
                subject = hit.read_text()
                with open(inbox / subject, "ab") as fh:  # grown after registration, before the worker reads it
                    fh.write(b"\0" * (1 << 20))
                grown += 1
                (marks / "in-decode.release").touch()
                wait_for(lambda: not (marks / "in-decode.release").exists(), 30, what="the failpoint going on")
            time.sleep(0.02)
        t1 = time.monotonic()
        time.sleep(1.5)  # the pings go on while idle too: the window holds at least two whatever the matrix took
        t2 = time.monotonic()
        peak = proc_status(pid, "VmHWM")
        assert d.stop() == 0, d.log_path.read_text()[-3000:]
    finally:
        d.kill()
        notify.close()
    by_name: dict[str, dict] = {}
    for j in jobs(db):  # the first job of each name: a grown file's new content is a job of its own, after it
        by_name.setdefault(j["rel_path"], j)
    notes = {e.get("file"): " ".join(e.get("notes") or []) for e in d.events() if e.get("event") == "job.done"}
    assert by_name["good.png"]["state"] == "done", by_name["good.png"]
    assert grown == len(FORMATS)
    problems = []
    for name, kind, _ in cases:
        job = by_name[name]
        if kind == "done":
            if job["state"] != "done" or "properties kept; it was dropped" not in notes.get(name, ""):
                problems.append(f"{name}: expected done with its XMP dropped, got {job['state']} {notes.get(name)!r}")
            continue
        why = WHY[name.split("-")[0]]
        if job["state"] != "failed" or job["error_kind"] != kind or not any(w in job["error"] for w in why):
            problems.append(f"{name}: expected {kind} naming {why}, got {job['error_kind']}: {job['error']}")
    assert not problems, "\n".join(problems)
    grew = peak - idle
    gaps = [b - a for a, b in zip([t0, *notify.pings(t0, t2), t2], [*notify.pings(t0, t2), t2], strict=False)]
    print(
        f"bomb matrix: {len(cases)} bombs and a good file in {t1 - t0:.1f} s; the daemon's peak RSS "
        f"{peak >> 20} MiB, {grew >> 20} MiB over idle; the longest watchdog gap {max(gaps):.2f} s"
    )
    assert grew < RSS_BOUND, f"the daemon's peak RSS grew {grew >> 20} MiB over idle ({idle >> 20} MiB)"
    assert len(gaps) >= 3 and max(gaps) < 2.0, f"WATCHDOG=1 stopped for {max(gaps):.1f} s (WatchdogSec 2)"


SITECUSTOMIZE = """
import os
if os.environ.get("UPSCALED_TEST_BLOCK_DECODERS") == "1":
    import importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "daemon.media.decode":
                raise ImportError("the daemon's process must never import the decoder")
            return None

    sys.meta_path.insert(0, _Block())
    import cv2
    import PIL.Image

    def _refuse(*args, **kwargs):
        raise RuntimeError("the daemon's process parsed an image file")

    PIL.Image.open = _refuse
    PIL.Image.Exif.load = _refuse
    cv2.imdecode = cv2.imread = _refuse
    import pyexiv2

    pyexiv2.ImageData = _refuse
"""


def test_the_daemon_completes_every_job_with_its_own_decoders_made_to_fail(tmp_path):
    """The sandbox is the only place that parses an untrusted file: with daemon.media.decode unimportable and
    Pillow's, OpenCV's and exiv2's readers raising in the daemon's process (its sandbox children are untouched), a
    still image with EXIF and XMP kept (and fitted to the output), an animation, and a lossy output measured as
    written all complete."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    rules = [
        {"folder": "", "model": "bicubic", "scale": 2, "format": "png", "metadata": "keep"},
        {"folder": "lossy", "model": "bicubic", "scale": 2, "format": "jpg", "metrics": ["lr_psnr_y"]},
    ]
    cfg = write_config(tmp_path, rules=rules, settle_seconds=0.1)
    env = {"UPSCALED_TEST_BLOCK_DECODERS": "1", "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    exif = Image.Exif()
    exif[0x0112] = 6
    inbox = tmp_path / "inbox"
    (inbox / "lossy").mkdir(parents=True)
    d = Daemon(cfg, env)
    db = tmp_path / "var" / "upscaled.db"
    try:
        d.wait_started()
        photo = _photo((40, 30), seed=2)
        (inbox / "tagged.jpg").write_bytes(_encode(photo, "JPEG", exif=exif.tobytes(), xmp=_xmp(20)))
        (inbox / "anim.gif").write_bytes(good("gif"))
        (inbox / "lossy" / "plain.png").write_bytes(good("png"))
        wait_for(lambda: settled(db, 3), 120, what="three jobs")
        wait_for(
            lambda: all(j["metrics_state"] in (None, "done") for j in jobs(db)), 60, what="the lossy job's metrics"
        )
        assert d.stop() == 0, d.log_path.read_text()[-3000:]
    finally:
        d.kill()
    log = d.log_path.read_text()
    assert "parsed an image file" not in log and "must never import the decoder" not in log, log[-3000:]
    by_name = {j["rel_path"]: j for j in jobs(db)}
    assert all(j["state"] == "done" for j in by_name.values()), by_name
    out = Image.open(by_name["tagged.jpg"]["output_path"])
    assert out.size == (60, 80)  # upright: the EXIF orientation was applied in the sandbox
    assert out.getexif().get(0x0112) == 1 and b"p19" in (out.info.get("xmp") or b"")
    assert by_name["anim.gif"]["frames"] == 2 and Image.open(by_name["anim.gif"]["output_path"]).n_frames == 2
    query = "SELECT name, value FROM metrics WHERE job_id = :j"
    job_id = str(by_name["lossy/plain.png"]["id"])
    lossy = json.loads(
        subprocess.check_output(
            [
                sys.executable,
                "-m",
                "daemon",
                "--config",
                str(cfg),
                "query",
                "--format",
                "json",
                query,
                "-p",
                "j",
                job_id,
            ],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
    )
    assert [m["name"] for m in lossy] == ["lr_psnr_y"] and lossy[0]["value"] > 15, lossy


# --- poison ----------------------------------------------------------------------------------------------------------
def _started(d: Daemon) -> bool:
    return any(e.get("event") == "service.started" for e in d.events())


def _run_until_settled(cfg: Path, env: dict, db: Path, n: int, restarts: int, timeout: float = 180) -> int:
    """Run the daemon, restarting it each time it dies (as systemd's Restart= would), until ``n`` jobs settled.
    Returns how many times it died."""
    deaths = 0
    deadline = time.monotonic() + timeout
    while True:
        d = Daemon(cfg, env)
        try:
            # Started, though it may die on the job alone at once: the death is what is counted here.
            wait_for(lambda: _started(d) or d.proc.poll() is not None, 60, what="service.started")  # noqa: B023
            assert _started(d), d.log_path.read_text()[-3000:]
            while d.proc.poll() is None and not settled(db, n):
                assert time.monotonic() < deadline, d.log_path.read_text()[-3000:]
                time.sleep(0.05)
            if d.proc.poll() is None:
                assert d.stop() == 0, d.log_path.read_text()[-3000:]
                return deaths
        finally:
            d.kill()
        deaths += 1
        assert deaths <= restarts, f"still dying after {deaths} restarts"


def test_a_file_that_kills_the_daemon_ends_as_poison_and_every_other_file_comes_out(tmp_path):
    """A failpoint kills the daemon (os._exit) whenever killer.png is being decoded. The jobs in flight are taken
    back at each start and run alone; the killer dies alone ``max_recoveries`` (2) times and fails as poison, its
    input in failed/ beside its reason; the innocent files, in flight with it at the first death, are done and were
    never blamed."""
    cfg = write_config(tmp_path, rules=[RULE], settle_seconds=0.1, max_recoveries=2)
    env = {"UPSCALED_FAILPOINTS_TEST": "1", "UPSCALED_FAILPOINTS": "in-decode=exit@killer"}
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    staging.mkdir()
    inbox.mkdir()
    names = [f"a{i}.png" for i in range(3)] + ["killer.png"] + [f"b{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        (staging / name).write_bytes(good("png", seed=20 + i))
    for name in names:
        os.rename(staging / name, inbox / name)
    db = tmp_path / "var" / "upscaled.db"
    deaths = _run_until_settled(cfg, env, db, len(names), restarts=8)
    by_name = {j["rel_path"]: j for j in jobs(db)}
    killer = by_name.pop("killer.png")
    assert killer["state"] == "failed" and killer["error_kind"] == "poison", killer
    assert killer["alone_deaths"] == 2 and "max_recoveries = 2" in killer["error"], killer
    assert deaths == killer["recoveries"] >= 2
    reason = json.loads((tmp_path / "failed" / "killer.png.error.json").read_text())
    assert reason["kind"] == "poison" and (tmp_path / "failed" / "killer.png").exists()
    assert all(j["state"] == "done" and j["alone_deaths"] == 0 for j in by_name.values()), by_name
    assert not list(inbox.glob("*.png"))


def test_a_storm_of_sigkills_while_jobs_overlap_makes_no_innocent_job_poison(tmp_path, weights_dir):
    """SIGKILL the real daemon three times, each while two or more jobs are running at once. Every job is done once
    (nothing lost, nothing twice), and none became poison: deaths in a crowd never count against a job."""
    rule = {"folder": "", "model": "fsrcnn", "scale": 2, "format": "png", "metrics": []}
    cfg = write_config(tmp_path, weights=weights_dir, rules=[rule], settle_seconds=0.1, max_recoveries=1)
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    staging.mkdir()
    inbox.mkdir()
    n = 24
    for i in range(n):
        image(staging / f"s{i:02d}.png", (240, 180), seed=100 + i)
    for i in range(n):
        os.rename(staging / f"s{i:02d}.png", inbox / f"s{i:02d}.png")
    db = tmp_path / "var" / "upscaled.db"
    kills = 0
    deadline = time.monotonic() + 300
    while True:
        d = Daemon(cfg)
        try:
            d.wait_started(60)
            while not settled(db, n):
                assert time.monotonic() < deadline, d.log_path.read_text()[-3000:]
                running = sum(j["state"] == "running" for j in jobs(db))
                if kills < 3 and running >= 2:
                    d.proc.send_signal(signal.SIGKILL)
                    d.proc.wait()
                    kills += 1
                    break
                time.sleep(0.01)
            else:
                assert d.stop() == 0, d.log_path.read_text()[-3000:]
                break
        finally:
            d.kill()
    assert kills == 3
    rows = jobs(db)
    assert len(rows) == n and all(j["state"] == "done" for j in rows), [
        (j["rel_path"], j["state"], j["error"]) for j in rows if j["state"] != "done"
    ]
    assert sum(j["recoveries"] for j in rows) >= 3 and all(j["alone_deaths"] == 0 for j in rows)
    outputs = sorted(p.name for p in (tmp_path / "outbox").glob("*.png"))
    assert len(outputs) == n and not any("-1." in o for o in outputs), outputs


pytestmark = pytest.mark.timeout(600)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_a_stuck_sandbox_child_leaves_the_watchdog_pings_coming(tmp_path):
    """The sandbox's only child is frozen (SIGSTOP, as a decoder stuck in a loop would be) while the main thread
    waits on it for a file's header: the main thread beats while it waits, and WATCHDOG=1 keeps coming; the child
    thawed, the file is done."""
    cfg = write_config(tmp_path, rules=[RULE], settle_seconds=0.1, sandbox_processes=1, decode_timeout=60)
    notify = Notify(tmp_path / "notify.sock")
    d = Daemon(cfg, dict(notify.env, WATCHDOG_USEC="1000000"))
    db = tmp_path / "var" / "upscaled.db"
    try:
        d.wait_started()
        wait_for(lambda: _children(d.proc.pid), 60, what="the sandbox child")
        (child,) = _children(d.proc.pid)
        os.kill(child, signal.SIGSTOP)
        (tmp_path / "inbox" / "a.png").write_bytes(good("png"))
        t0 = time.monotonic()
        time.sleep(3.0)
        t1 = time.monotonic()
        assert not jobs(db), "the header was read while the only child was frozen"
        os.kill(child, signal.SIGCONT)
        wait_for(lambda: settled(db, 1), 60, what="the file done once the child moves")
        assert d.stop() == 0, d.log_path.read_text()[-3000:]
    finally:
        d.kill()
        notify.close()
    pings = [t0, *notify.pings(t0, t1), t1]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 1.0, f"WATCHDOG=1 stopped for {max(gaps):.1f} s while the main thread waited on the sandbox"
    assert [j["state"] for j in jobs(db)] == ["done"]


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for its reaper (it holds no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_no_sandbox_child_outlives_a_killed_daemon(tmp_path):
    """A daemon killed with SIGKILL leaves no sandbox child behind: not even one frozen (SIGSTOP, as a decoder stuck
    in a loop would be), which would never read the end of its socket and would hold its memory for good."""
    cfg = write_config(tmp_path, rules=[RULE], settle_seconds=0.1, sandbox_processes=2)
    d = Daemon(cfg, {})
    kids: list[int] = []
    try:
        d.wait_started()
        wait_for(lambda: len(_children(d.proc.pid)) == 2, 60, what="the two sandbox children")
        kids = _children(d.proc.pid)
        os.kill(kids[0], signal.SIGSTOP)
        d.proc.kill()
        d.proc.wait()
        wait_for(lambda: all(_gone(k) for k in kids), 10, what="the sandbox children gone with the daemon")
    finally:
        d.kill()
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
