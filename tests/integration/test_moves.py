"""Moving inputs to the archive and to failed/: never an overwrite, never two copies, even with two movers racing
(two nodes on one share), on one filesystem and across two."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
import threading
from pathlib import Path, PurePosixPath

import pytest

from daemon.config import Rule, load_settings
from daemon.fsops import TMP_SUFFIX, Root, move
from daemon.jobs import Job, JobSpec
from daemon.service import Service
from daemon.store import SqlStore
from tests.conftest import FakeClock, write_config


def move_unique(src: Path, dest: Path, reserved: bool = False) -> Path:
    """fsops.move between the two files' own folders, as paths."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Root(src.parent, create=False) as a, Root(dest.parent, create=False) as b:
        return dest.parent / move(a, src.name, b, dest.name, reserved=reserved)


def _other_filesystem(tmp_path: Path) -> Path:
    """A folder on another filesystem than ``tmp_path`` (/dev/shm is a tmpfs on Linux)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to move across")
    d = Path(tempfile.mkdtemp(dir=shm, prefix="upscaled-test-"))
    return d


def _race(movers: list[tuple[Path, Path, bool]]) -> list[object]:
    """Run move_unique for each (src, dest, reserved) in its own thread, all released at once. Returns results or
    errors."""
    barrier = threading.Barrier(len(movers))
    out: list[object] = [None] * len(movers)

    def go(i: int, src: Path, dest: Path, reserved: bool) -> None:
        barrier.wait()
        try:
            out[i] = move_unique(src, dest, reserved)
        except OSError as exc:
            out[i] = exc

    threads = [threading.Thread(target=go, args=(i, *m)) for i, m in enumerate(movers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@pytest.mark.parametrize("across", [False, True], ids=["one-filesystem", "two-filesystems"])
def test_two_movers_of_one_file_leave_exactly_one_copy(tmp_path, across):
    """Two nodes archiving one input to the archive path committed with its job."""
    dest_root = _other_filesystem(tmp_path) if across else tmp_path / "archive"
    try:
        data = os.urandom(1 << 20)  # big enough that a copy takes a while, so the movers do overlap
        for i in range(60):
            src = tmp_path / "inbox" / f"f{i}.png"
            src.parent.mkdir(exist_ok=True)
            src.write_bytes(data[:-1] + bytes([i]))
            dest = dest_root / f"f{i}.png"
            results = _race([(src, dest, True)] * 3)
            placed = [r for r in results if isinstance(r, Path)]
            assert placed and all(r == dest for r in placed), results
            assert all(isinstance(r, FileNotFoundError) for r in results if not isinstance(r, Path)), results
            assert not src.exists()
            assert dest.read_bytes() == data[:-1] + bytes([i])
        left = sorted(p.name for p in dest_root.iterdir())
        assert left == sorted(f"f{i}.png" for i in range(60)), [n for n in left if TMP_SUFFIX in n or "-" in n]
    finally:
        if across:
            subprocess.run(["rm", "-rf", str(dest_root)], check=False)


@pytest.mark.parametrize("across", [False, True], ids=["one-filesystem", "two-filesystems"])
def test_two_files_racing_for_one_name_both_survive(tmp_path, across):
    dest_root = _other_filesystem(tmp_path) if across else tmp_path / "archive"
    try:
        for i in range(40):
            a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
            for p, tag in ((a, b"A"), (b, b"B")):
                p.parent.mkdir(exist_ok=True)
                p.write_bytes(tag * 100_000 + bytes([i]))
            dest = dest_root / f"r{i}" / "x.png"
            results = _race([(a, dest, False), (b, dest, False)])
            assert sorted(map(str, results)) == sorted([str(dest), str(dest.with_name("x-1.png"))]), results
            got = sorted(p.read_bytes()[:1] for p in dest.parent.iterdir())
            assert got == [b"A", b"B"]  # neither overwrote the other
    finally:
        if across:
            subprocess.run(["rm", "-rf", str(dest_root)], check=False)


def test_an_interrupted_move_is_finished_not_doubled(tmp_path):
    src = tmp_path / "inbox" / "a.png"
    src.parent.mkdir()
    src.write_bytes(b"x" * 1000)
    dest = tmp_path / "archive" / "a.png"
    dest.parent.mkdir()
    os.link(src, dest)  # a crash between the link and the unlink leaves both names
    assert move_unique(src, dest) == dest
    assert not src.exists() and [p.name for p in dest.parent.iterdir()] == ["a.png"]


def _as_nobody(moves: list[tuple[Path, Path]], go: Path) -> list[int]:
    """Each (src, dest) moved by its own forked child running as nobody, all starting when ``go`` appears.
    Returns the children's exit codes: 0 moved, 4 the source was gone (another mover took it), else a failure."""
    pids = []
    for src, dest in moves:
        pid = os.fork()
        if pid == 0:  # the child acts as the service user
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                while not go.exists():
                    pass
                move_unique(src, dest)
                code = 0
            except FileNotFoundError:
                code = 4
            except BaseException:  # noqa: BLE001 - any failure is the child's exit status
                code = 2
            finally:
                os._exit(code)
        pids.append(pid)
    go.touch()
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_files_the_service_user_may_not_link_are_still_moved_and_never_overwritten(request):
    """fs.protected_hardlinks refuses links to a file the caller does not own and cannot write: the usual case
    for an image dropped by another user. The move falls back to a rename over an O_EXCL placeholder, which is
    still exclusive: four files racing for one name all survive."""
    shared = Path(tempfile.mkdtemp(prefix="upscaled-share-"))  # pytest's own folders are closed to others
    request.addfinalizer(lambda: subprocess.run(["rm", "-rf", str(shared)], check=False))
    letters = b"ABCD"
    for d in ["archive", *(f"inbox/m{k}" for k in range(len(letters)))]:
        (shared / d).mkdir(parents=True, exist_ok=True)
    for p in [shared, shared / "inbox", *shared.glob("*/*"), shared / "archive"]:
        os.chmod(p, 0o777)
    src = shared / "inbox" / "m0" / "theirs.png"
    src.write_bytes(b"p" * 500)
    os.chmod(src, 0o644)  # root's file, read-only for the service user: link() is refused
    dest = shared / "archive" / "theirs.png"
    assert _as_nobody([(src, dest)], shared / "go0") == [0]
    assert not src.exists() and dest.read_bytes() == b"p" * 500
    for i in range(40):
        srcs = []
        for k, letter in enumerate(letters):
            p = shared / "inbox" / f"m{k}" / f"x{i}.png"
            p.write_bytes(bytes([letter]) * 50_000)
            os.chmod(p, 0o644)
            srcs.append(p)
        target = shared / "archive" / f"r{i}" / "x.png"
        target.parent.mkdir()
        os.chmod(target.parent, 0o777)
        assert _as_nobody([(p, target) for p in srcs], shared / f"go{i + 1}") == [0] * len(letters)
        got = sorted(p.read_bytes()[:1] for p in target.parent.iterdir())
        assert got == [bytes([c]) for c in letters], sorted(p.name for p in target.parent.iterdir())


def test_two_nodes_failing_one_file_leave_one_image_and_one_reason(tmp_path, weights_dir):
    """The owner quarantines the file while another node's reconcile (it saw the failed row first) does too."""
    cfg = write_config(tmp_path, weights=weights_dir)
    a, b = (Service(load_settings(cfg)) for _ in range(2))
    try:
        for i in range(30):
            src = tmp_path / "inbox" / f"bad{i}.png"
            src.parent.mkdir(exist_ok=True)
            src.write_bytes(b"not a png" + bytes([i]))
            job = Job(
                id=i,
                sha="0" * 64,
                fingerprint="f",
                state="failed",
                rule=Rule(),
                rel=PurePosixPath(src.name),
                input_path=str(src),
                attempts=1,
            )
            barrier = threading.Barrier(2)

            def quarantine(svc: Service, job: Job = job, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                svc.mover.quarantine(job, job.rel, "decode", "cannot decode")

            threads = [threading.Thread(target=quarantine, args=(svc,)) for svc in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        names = sorted(p.name for p in (tmp_path / "failed").iterdir())
        expected = sorted([f"bad{i}.png" for i in range(30)] + [f"bad{i}.png.error.json" for i in range(30)])
        assert names == expected
        assert not list((tmp_path / "inbox").iterdir())
    finally:
        a.shutdown()
        b.shutdown()


def test_a_failed_file_is_left_to_its_owner_for_a_moment_then_quarantined_by_any_node(tmp_path, weights_dir):
    """Node B sees a file whose job node A failed a moment ago: A is moving it, B must not race it. If A died
    between its commit and its move, a later look (past stale_seconds) finishes the move."""
    settings = load_settings(write_config(tmp_path, weights=weights_dir, stale_seconds=30))
    clock = FakeClock()
    svc = Service(settings, store=SqlStore(settings.database, clock=clock))
    svc.start()
    try:
        src = tmp_path / "inbox" / "broken.png"
        src.write_bytes(b"not an image")
        # Node A registered it as a good image (same key the intake would give it) and failed it just now.
        spec = svc.intake.spec(PurePosixPath("broken.png"))
        (reg,) = svc.store.register(
            [JobSpec(sha=spec.sha, rule=spec.rule, rel=spec.rel, input_path=spec.input_path, input_id=spec.input_id)]
        )
        svc.store.claim("node-a-host:4242", node="node-a", job_id=reg.job.id)
        assert svc.store.fail(reg.job.id, "decode", "cannot decode", owner="node-a-host:4242")
        svc.admit([PurePosixPath("broken.png")])
        assert src.exists() and not list((tmp_path / "failed").iterdir())
        clock.advance(31)
        svc.admit([PurePosixPath("broken.png")])
        assert not src.exists()
        assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == ["broken.png", "broken.png.error.json"]
        assert svc.store.get(reg.job.id).input_moved_to == str(tmp_path / "failed" / "broken.png")
    finally:
        svc.shutdown()


def test_across_filesystems_a_fifo_and_a_link_are_made_anew_and_never_opened(tmp_path):
    """Issue 20, finding 1: a FIFO quarantined to failed/ on another filesystem was opened to copy its bytes,
    without O_NONBLOCK: the open waited for a writer that never came, and the daemon's main thread with it. A FIFO
    or a link is made anew on the other side (``mkfifo``; ``symlink`` with the same target), as ``mv`` does; it is
    never opened, and keeps its mtime."""
    dest_root = _other_filesystem(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fifo, link = inbox / "pipe.png", inbox / "link.png"
    os.mkfifo(fifo, 0o640)
    os.symlink("/etc/passwd", link)
    os.utime(fifo, ns=(1_000_000_000, 1_500_000_000))
    os.utime(link, ns=(1_000_000_000, 1_600_000_000), follow_symlinks=False)
    results: dict[str, object] = {}

    def go() -> None:
        with Root(inbox, create=False) as a, Root(dest_root, create=False) as b:
            for name in ("pipe.png", "link.png"):
                try:
                    results[name] = move(a, name, b, name, special=True)
                except Exception as exc:  # noqa: BLE001 - the test reports it
                    results[name] = exc

    t = threading.Thread(target=go, daemon=True)
    try:
        t.start()
        t.join(10)
        if t.is_alive():  # let the blocked open go (it waits for a writer), then fail
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            t.join(10)
            pytest.fail("the move of a FIFO across filesystems blocked in open()")
        assert results == {"pipe.png": PurePosixPath("pipe.png"), "link.png": PurePosixPath("link.png")}, results
        assert not fifo.exists() and not link.is_symlink()
        pipe = os.lstat(dest_root / "pipe.png")
        assert stat.S_ISFIFO(pipe.st_mode) and stat.S_IMODE(pipe.st_mode) == 0o640 & ~_umask()
        assert pipe.st_mtime_ns == 1_500_000_000
        assert os.readlink(dest_root / "link.png") == "/etc/passwd"
        assert os.lstat(dest_root / "link.png").st_mtime_ns == 1_600_000_000
        assert sorted(p.name for p in dest_root.iterdir()) == ["link.png", "pipe.png"]  # no temp entry left
    finally:
        subprocess.run(["rm", "-rf", str(dest_root)], check=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_across_filesystems_a_sparse_file_keeps_its_holes_and_its_bytes(tmp_path):
    """Issue 20, finding 10: a copy across filesystems wrote every byte, so a 200 MB sparse file in the inbox took
    200 MB of disk in failed/. Only the extents that hold data are copied (SEEK_DATA / SEEK_HOLE): the bytes are
    the same, and the holes stay holes, whether the file ends in data or in a hole (64 MB files here)."""
    dest_root = _other_filesystem(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    size = 64 << 20
    ends = {"ends-in-data.png": size - 10, "ends-in-a-hole.png": 48 << 20}
    digests = {}
    for name, last in ends.items():
        with open(inbox / name, "wb") as fh:
            fh.write(b"\x89PNG\r\n\x1a\n head")  # data at the start,
            fh.seek(24 << 20)
            fh.write(os.urandom(8192))  # in the middle,
            fh.seek(last)
            fh.write(b"last bytes")  # and near (or at) the end
            fh.truncate(size)
        digests[name] = hashlib.sha256((inbox / name).read_bytes()).hexdigest()
    try:
        with Root(inbox, create=False) as a, Root(dest_root, create=False) as b:
            for name in ends:
                move(a, name, b, name)
        for name in ends:
            st = os.stat(dest_root / name)
            assert st.st_size == size, name
            assert st.st_blocks * 512 < 1 << 20, f"{name}: {st.st_blocks * 512} bytes allocated for 3 small extents"
            assert hashlib.sha256((dest_root / name).read_bytes()).hexdigest() == digests[name], name
    finally:
        subprocess.run(["rm", "-rf", str(dest_root)], check=False)
