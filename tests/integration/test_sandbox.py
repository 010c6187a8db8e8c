"""The sandbox (daemon/sandbox): real child processes, real confinement, real bombs.

Each test checks one promise of docs/security.md's sandbox section: what a child may not do once confined, that a
child past its memory budget, its deadline, or dead fails the call with an error that names the limit (and is
replaced), that the daemon's side believes nothing a child says that breaks the protocol, and that the pixels come
back mapped, not copied.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.errors import (
    DecodeError,
    DecodeLimitError,
    DecoderCrashError,
    DecodeTimeoutError,
    ImageTooLargeError,
    InputChangedError,
)
from daemon.media import metadata as md
from daemon.media.decode import decode_bytes, jxl_size, probe
from daemon.sandbox import Sandbox, wire
from daemon.sandbox.pool import decoded_from
from tests.conftest import ROOT, wait_for


def _fd(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return fd, os.fstat(fd).st_size


def _png(path: Path, size: tuple[int, int], seed: int = 0, **save) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, **save)
    return path


@pytest.fixture
def pool():
    """A pool of its own, for tests that kill or starve its children."""
    with Sandbox(processes=1, timeout=20.0, memory_limit=64 << 20, max_pixels=50_000_000) as sb:
        wait_for(lambda: sb.pids(), 60, what="a sandbox child")
        yield sb


def test_a_confined_child_can_open_no_path_make_no_socket_and_run_no_program(tmp_path):
    """After confine.apply: open() by path is refused (Landlock), socket() and execve() answer EPERM (seccomp), and
    the descriptors held before still work."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the daemon's database password")
    code = textwrap.dedent(
        f"""
        import os, socket, json
        from daemon.sandbox import confine
        held = os.open({str(secret)!r}, os.O_RDONLY)
        got = confine.apply(4 << 30, 600)
        out = {{"confinement": got.describe()}}
        for what, fn in (
            ("open", lambda: open({str(secret)!r}).read()),
            ("socket", lambda: socket.socket()),
            ("exec", lambda: os.execv("/bin/true", ["/bin/true"])),
        ):
            try:
                fn()
                out[what] = "allowed"
            except OSError as exc:
                out[what] = exc.errno
        out["held"] = os.pread(held, 100, 0).decode()
        print(json.dumps(out))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "landlock" in out["confinement"] and "seccomp" in out["confinement"], out
    assert out["open"] == 13, f"a confined child opened a file by its path: {out}"  # EACCES from Landlock
    assert out["socket"] == 1 and out["exec"] == 1, f"a confined child made a socket or ran a program: {out}"
    assert out["held"] == "the daemon's database password"  # descriptors it already holds still work


def test_the_children_report_every_layer_of_their_confinement(sandbox):
    wait_for(lambda: sandbox.confinement, 60, what="a child's confinement")
    for layer in ("rlimits", "no_new_privs", "landlock ABI", "seccomp"):
        assert layer in sandbox.confinement, sandbox.confinement


def test_a_decode_comes_back_mapped_from_a_sealed_memfd_and_equal(tmp_path, sandbox):
    path = _png(tmp_path / "a.png", (97, 61))
    fd, size = _fd(path)
    try:
        d, sha = sandbox.decode(fd, size, "a.png", 10**7, 10)
    finally:
        os.close(fd)
    want = np.asarray(Image.open(path))
    assert np.array_equal(d.first.pixels, want)
    base = d.first.pixels
    while isinstance(base, np.ndarray):
        base = base.base
    base = base.obj if isinstance(base, memoryview) else base
    assert isinstance(base, mmap.mmap), f"the pixels were copied, not mapped: {type(base)}"
    assert sha == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    d.first.pixels[0, 0] = 7  # copy-on-write: the daemon may change its pixels in place


def test_a_file_that_grew_or_shrank_since_registration_is_refused_without_reading_its_tail(tmp_path, sandbox):
    """Finding 5: a file extended after registration was read whole by the worker. The child reads at most the
    registered size and one byte more, and says the file changed."""
    path = _png(tmp_path / "g.png", (40, 30))
    fd, size = _fd(path)
    with open(path, "ab") as fh:
        fh.truncate(size + (1 << 30))  # a sparse gigabyte after the registered bytes
    try:
        with pytest.raises(InputChangedError, match="changed size after it was registered"):
            sandbox.decode(fd, size, "g.png", 10**7, 10)
    finally:
        os.close(fd)
    shrunk = _png(tmp_path / "s.png", (40, 30))
    fd, size = _fd(shrunk)
    try:
        with pytest.raises(InputChangedError, match="fewer now"):
            sandbox.decode(fd, size + 100, "s.png", 10**7, 10)  # registered 100 bytes longer than it is now
    finally:
        os.close(fd)


def test_a_decode_over_its_memory_budget_fails_as_decode_limit_and_the_child_is_replaced(tmp_path, pool):
    """A 6000x6000 PNG (36 MP, within max_pixels, a few KB of file) against a 64 MiB budget: "decode-limit", naming
    the budget; the child exits and a new one decodes the next file."""
    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 6000), (9, 9, 9)).save(big)
    small = _png(tmp_path / "small.png", (30, 20))
    first = pool.pids()
    fd, size = _fd(big)
    try:
        with pytest.raises(DecodeLimitError, match=r"decode-limit: .*needed more than .*decode_memory_limit"):
            pool.decode(fd, size, "big.png", 50_000_000, 1)
    finally:
        os.close(fd)
    fd, size = _fd(small)
    try:
        d, _ = pool.decode(fd, size, "small.png", 50_000_000, 1)
    finally:
        os.close(fd)
    assert d.first.pixels.shape == (20, 30, 3)
    assert pool.replaced == 1 and pool.pids() != first


def test_each_call_is_budgeted_from_the_header_it_read_well_under_the_hard_limit(tmp_path):
    """A child's hard limit is the most any call may get (3.2 GiB for 100 MP); each decode gets only what its own
    header declares: the file, and three copies of every pixel at the format's widest layout. A decoder that
    allocates far more than its image needs hits that, not the hard limit."""
    path = _png(tmp_path / "p.png", (100, 80))
    code = textwrap.dedent(
        f"""
        import json, os, resource, socket
        from daemon.sandbox import child, confine
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c = child.Child(b, 0, 600)
        c.hard_memory = c.vm() + (4 << 30)
        confine.set_hard_limits(c.hard_memory, 600)
        data = open({str(path)!r}, "rb").read()
        req = {{"name": "p.png", "max_pixels": 10**8, "max_frames": 10, "seconds": 30}}
        c.header_budget(data, req)
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        refused = False
        try:
            bytearray(soft - c.vm() + (64 << 20))
        except MemoryError:
            refused = True
        print(json.dumps({{"budget": soft - c.vm(), "refused": refused, "size": len(data)}}))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    want = out["size"] + 3 * 100 * 80 * 8  # PNG's widest layout: 16-bit RGBA
    from daemon.sandbox.child import SLACK

    assert abs(out["budget"] - (want + SLACK)) < 8 << 20, f"a 100x80 PNG's budget is {out['budget']} bytes"
    assert out["refused"], "an allocation past the call's budget was allowed"


def test_a_decode_past_its_deadline_fails_as_decode_timeout_and_the_pool_goes_on(tmp_path):
    """A child that stops answering (frozen here with SIGSTOP, as a decoder stuck in a loop would be) is killed at
    decode_timeout; the caller is told which limit, beats while it waits, and the next call works."""
    small = _png(tmp_path / "small.png", (30, 20))
    with Sandbox(processes=1, timeout=1.5, max_pixels=50_000_000) as sb:
        wait_for(lambda: sb.pids(), 60, what="a sandbox child")
        (pid,) = sb.pids()
        os.kill(pid, signal.SIGSTOP)
        beats: list[float] = []
        fd, size = _fd(small)
        t0 = time.monotonic()
        try:
            with pytest.raises(DecodeTimeoutError, match=r"decode-timeout: .*1\.5 s \(decode_timeout\)"):
                sb.decode(fd, size, "small.png", 50_000_000, 1, beat=lambda: beats.append(time.monotonic()))
            t1 = time.monotonic()
            assert 1.4 < t1 - t0 < 5, f"the call took {t1 - t0:.1f} s against a deadline of 1.5 s"
            marks = [t0, *beats, t1]
            assert max(b - a for a, b in zip(marks, marks[1:], strict=False)) < 0.8, marks
            wait_for(lambda: sb.pids() and sb.pids() != [pid], 60, what="the replacement child")
            assert sb.decode(fd, size, "small.png", 50_000_000, 1)[0].first.pixels.shape == (20, 30, 3)
        finally:
            os.close(fd)


def test_a_child_that_crashes_fails_the_call_naming_its_signal_and_is_replaced(tmp_path, pool):
    """A child that dies under a call (SIGSEGV here, delivered while it holds the request) fails that call as
    decode-crash, naming the signal; the next call goes to its replacement."""
    small = _png(tmp_path / "small.png", (30, 20))
    (pid,) = pool.pids()
    os.kill(pid, signal.SIGSTOP)  # it will hold the request when the signal lands
    fd, size = _fd(small)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            pool.decode(fd, size, "small.png", 50_000_000, 1)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    os.kill(pid, signal.SIGSEGV)
    os.kill(pid, signal.SIGCONT)
    t.join(30)
    try:
        assert len(errors) == 1 and isinstance(errors[0], DecoderCrashError), errors
        assert "decode-crash" in str(errors[0]) and "SIGSEGV" in str(errors[0]), errors
        wait_for(lambda: pool.pids() and pool.pids() != [pid], 60, what="a new child")
        assert pool.decode(fd, size, "small.png", 50_000_000, 1)[0].first.pixels.shape == (20, 30, 3)
    finally:
        os.close(fd)


def test_a_child_that_retires_or_died_idle_costs_no_job(tmp_path):
    """A child retires after its share of calls (saying so in its last reply), and one killed while idle (the
    OOM killer's pick, say) is found dead before it is given a job: every call succeeds, none is blamed."""
    small = _png(tmp_path / "small.png", (30, 20))
    with Sandbox(processes=2, timeout=30.0, max_pixels=10**6, recycle_calls=3) as sb:
        wait_for(lambda: len(sb.pids()) == 2, 60, what="two sandbox children")
        fd, size = _fd(small)
        try:
            for i in range(10):
                if i == 4:
                    wait_for(lambda: sb.pids(), 60, what="an idle child")
                    os.kill(sb.pids()[0], signal.SIGKILL)
                    time.sleep(0.2)
                assert sb.decode(fd, size, "small.png", 10**6, 1)[0].first.pixels.shape == (20, 30, 3), i
        finally:
            os.close(fd)
        assert sb.replaced >= 3, sb.replaced


def test_calls_wait_for_a_free_child_beating_and_each_gets_its_own(tmp_path):
    """Four threads, one child: each call waits its turn (beating while it waits), none gets another's reply."""
    paths = [_png(tmp_path / f"{i}.png", (10 + i, 10), seed=i) for i in range(4)]
    with Sandbox(processes=1, timeout=30.0, max_pixels=10**6) as sb:
        wait_for(lambda: sb.pids(), 60, what="a sandbox child")
        got: dict[int, tuple[int, ...]] = {}

        def one(i: int) -> None:
            fd, size = _fd(paths[i])
            try:
                got[i] = sb.decode(fd, size, paths[i].name, 10**6, 1)[0].first.pixels.shape
            finally:
                os.close(fd)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == {i: (10, 10 + i, 3) for i in range(4)}


# --- the daemon believes nothing a child says that breaks the protocol ------------------------------------------------
def _payload(data: bytes) -> wire.Payload:
    w = wire.PayloadWriter(len(data))
    w.put(data)
    fd = w.seal()
    try:
        return wire.Payload(fd)
    finally:
        os.close(fd)


def _frame(shape: list[int], at: list[int], dtype: str = "|u1") -> dict:
    return {"at": at, "shape": shape, "dtype": dtype, "duration_ms": 0, "disposal": 0, "blend": 0}


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([_frame([4, 4, 3], [0, 48])], None),
        ([_frame([4, 4, 3], [0, 47])], "section"),  # the section is not the shape's size
        ([_frame([4, 4, 3], [240, 48])], "past the payload"),  # past the end of the memfd
        ([_frame([4, 4, 3], [0, 48], "<f8")], "shape or type"),  # a dtype we never send
        ([_frame([4, 4, 5], [0, 80])], "shape or type"),  # five channels
        ([_frame([4, 4, 3], [0, 48]), _frame([2, 2, 3], [0, 12])], "not the size of frame 1"),
        ([_frame([400, 400, 3], [0, 48])], "max_pixels"),  # more pixels than the limit it was given
        ([], "frame count"),
    ],
)
def test_a_reply_that_breaks_the_protocol_is_a_decode_crash(frames, why):
    payload = _payload(bytes(range(48)) + bytes(200))
    header = {"ok": True, "format": "png", "mode": "RGB", "frames": frames, "loop": None, "notes": [], "meta": {}}
    if why is None:
        d = decoded_from(header, payload, 100_000, 10)
        assert d.first.pixels.shape == (4, 4, 3) and d.first.pixels.reshape(-1)[5] == 5
        return
    with pytest.raises(DecoderCrashError, match=why):
        decoded_from(header, payload, 100_000, 10)


def test_a_payload_that_is_not_sealed_is_refused():
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 64)
    try:
        with pytest.raises(wire.WireError, match="not sealed"):
            wire.Payload(fd)
    finally:
        os.close(fd)


# --- the findings of the attack review, on the decoders themselves ---------------------------------------------------
def _gif_with_a_frame_larger_than_its_screen(tmp_path: Path) -> bytes:
    """A 16x16 logical screen whose second frame is 600x600 (finding 3, scaled down)."""
    first, second = Image.new("P", (16, 16), 1), Image.new("P", (16, 16), 0)
    for im in (first, second):
        im.putpalette([0, 0, 0, 255, 255, 255] * 128)
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[second], duration=50)
    data = bytearray(buf.getvalue())
    # The second image descriptor (0x2C, x, y, w, h): make its size 600x600.
    second = data.index(b"\x2c", data.index(b"\x2c") + 1)
    data[second + 5 : second + 9] = (600).to_bytes(2, "little") * 2
    return bytes(data)


def test_a_gif_frame_larger_than_its_logical_screen_is_refused_before_it_is_decoded(tmp_path, sandbox):
    """Finding 3: the probe counted screen x frames, and a frame of 6000x6000 in a 16x16 GIF was decoded and
    upscaled to 144 MP under a 1 MP limit. Every frame must fit the canvas its header declares."""
    data = _gif_with_a_frame_larger_than_its_screen(tmp_path)
    with pytest.raises(ImageTooLargeError, match="larger than the 16x16 canvas"):
        decode_bytes(data, 1_000_000)
    path = tmp_path / "bomb.gif"
    path.write_bytes(data)
    fd, size = _fd(path)
    try:
        with pytest.raises(ImageTooLargeError, match="canvas"):
            sandbox.probe(fd, size, "bomb.gif", 1_000_000, 100)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [(1920, 1080), (1, 1), (333, 17), (17, 333), (64, 48), (12345, 3), (3, 70001)])
def test_the_jpeg_xl_size_header_is_read_without_decoding(size):
    """Finding 7: the JXL plugin decodes the whole image just to open it (8000x8000: 5.2 s, 930 MB). The size header
    gives the dimensions: checked against the real encoder, and on a file cut right after its header (which a
    decoder could not open at all). The sizes cover both header forms (multiples of 8 up to 256, or not), each
    field width, and an aspect-ratio code (1920x1080 is 16:9)."""
    pytest.importorskip("pillow_jxl")
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "JXL", quality=50)
    data = buf.getvalue()
    assert jxl_size(data) == size
    p = probe(io.BytesIO(data[:64]), 10**9)
    assert (p.format, p.width, p.height) == ("jxl", *size)


def _xmp_bomb(n: int) -> bytes:
    props = "".join(f"<x{i % 97}:p{i}>v</x{i % 97}:p{i}>" for i in range(n))
    ns = " ".join(f'xmlns:x{i}="http://example.com/{i}/"' for i in range(97))
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" {ns}>{props}</rdf:Description></rdf:RDF></x:xmpmeta>'
    ).encode()


def test_an_xmp_packet_with_thousands_of_properties_is_dropped_before_exiv2_sees_it():
    """Finding 6: exiv2's time grows with the square of the property count (12k properties: over 10 s with the GIL
    held). A packet over MAX_XMP_ITEMS is dropped, with a note naming the limit; a real-sized one is kept."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=_pnginfo_xmp(_xmp_bomb(12_000)))
    t0 = time.monotonic()
    d = decode_bytes(buf.getvalue(), 10**6)
    assert time.monotonic() - t0 < 5
    assert d.meta.xmp is None and any(f"{md.MAX_XMP_ITEMS} properties" in n for n in d.notes), d.notes
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=_pnginfo_xmp(_xmp_bomb(300)))
    assert decode_bytes(buf.getvalue(), 10**6).meta.xmp is not None


def _pnginfo_xmp(xmp: bytes):  # noqa: ANN202 - PIL.PngImagePlugin.PngInfo
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode(), zip=True)
    return info


def test_exif_and_xmp_too_large_for_one_jpeg_segment_are_dropped_with_a_note_not_failed():
    """A JPEG's APP1 holds 65,533 bytes: EXIF over it, or an XMP packet of 100 KB, failed the job. Now the block is
    dropped and a note says so; the image is written."""
    from daemon.imageio import encode

    exif = Image.Exif()
    exif[0x010E] = "x" * 70_000  # ImageDescription
    meta = md.Metadata(exif=exif.tobytes(), xmp=_xmp_bomb(3000)[:100_000])
    data, notes = encode(np.zeros((8, 8, 3), np.uint8), "jpg", meta=meta, policy="keep")
    assert Image.open(io.BytesIO(data)).size == (8, 8)
    assert any("EXIF block" in n and "65533" in n for n in notes), notes
    assert any("XMP packet" in n and "dropped" in n for n in notes), notes


def test_a_sidecar_prompt_is_decoded_in_the_sandbox_with_its_limits(tmp_path, sandbox):
    from daemon.errors import BadSidecarError

    ok, long, bad = tmp_path / "ok.txt", tmp_path / "long.txt", tmp_path / "bad.txt"
    ok.write_bytes("\ufeff  a red barn\n".encode())
    long.write_bytes(b"x" * 5000)
    bad.write_bytes(b"\xff\xfe no")
    for path, check in ((ok, "a red barn"), (long, "over 4096 bytes"), (bad, "not UTF-8")):
        fd = os.open(path, os.O_RDONLY)
        try:
            if check == "a red barn":
                assert sandbox.read_text(fd, 4096, path.name) == check
            else:
                with pytest.raises(BadSidecarError, match=check):
                    sandbox.read_text(fd, 4096, path.name)
        finally:
            os.close(fd)


def test_metadata_is_fitted_to_the_output_in_the_sandbox(tmp_path, sandbox):
    """EXIF and XMP are rewritten for the output (orientation 1, its pixel size) by a child; the daemon writes what
    comes back as it is."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8769)[0xA002] = 10
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:ImageWidth="10" '
        b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    prep, notes = sandbox.prepare(md.Metadata(exif=exif.tobytes(), xmp=xmp), "keep", "png", (640, 480))
    back = Image.Exif()
    back.load(prep.exif)
    assert back[0x0112] == 1 and back.get_ifd(0x8769)[0xA002] == 640
    assert b'tiff:ImageWidth="640"' in prep.xmp and b'tiff:Orientation="1"' in prep.xmp


def test_the_same_bytes_decode_the_same_in_the_sandbox_and_in_process(tmp_path, sandbox):
    """The sandbox changes where the parser runs, not what it gives: every frame, its timing, the metadata."""
    frames = [Image.new("RGBA", (20, 10), (i * 40, 0, 0, 255 - i * 30)) for i in range(4)]
    path = tmp_path / "anim.png"
    frames[0].save(path, "PNG", save_all=True, append_images=frames[1:], duration=[10, 20, 30, 40], loop=3)
    here = decode_bytes(path.read_bytes(), 10**6)
    fd, size = _fd(path)
    try:
        there, _ = sandbox.decode(fd, size, "anim.png", 10**6, 10)
    finally:
        os.close(fd)
    a, b = [here.first, *here.rest()], [there.first, *there.rest()]
    assert len(a) == len(b) == 4 and there.loop == here.loop == 3
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.pixels, y.pixels) and x.duration_ms == y.duration_ms


def test_the_daemon_process_never_imports_the_decoder_module():
    """Structural: daemon/media/decode.py is imported by the sandbox child (and tools), never by the service's
    modules. (The acceptance test runs a daemon with it made unimportable.)"""
    code = (
        "import sys, daemon.service, daemon.cli, daemon.oneshot, daemon.web.app; "
        "print('daemon.media.decode' in sys.modules, 'PIL.PngImagePlugin' in sys.modules)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "False", "a module of the daemon imports the decoder"


def test_an_unknown_error_kind_from_a_child_is_a_plain_decode_error(sandbox):
    with pytest.raises(DecodeError, match="unknown sandbox operation"):
        sandbox.call({"op": "nonsense", "name": "x"})
