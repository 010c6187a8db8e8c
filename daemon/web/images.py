"""The images of the web view: a job's input, output, benchmark LR and thumbnail, read safely and shown by a browser.

Only files named by a job row are ever opened (the caller passes the row's path, never a path from a request). A
file is opened without following a symbolic link in any component (each folder is walked from ``/`` through its
handle, the way the daemon reaches its inputs), without blocking on a FIFO, and only if it is a regular file. None
of it is parsed in this process: the open descriptor goes to a sandbox process (:mod:`daemon.sandbox`), under the
same kind of memory, CPU and time budget as the daemon's, which says what the file is and makes what is shown:

- a file a browser shows as it is (8-bit PNG, JPEG, WebP, GIF, BMP) is streamed unchanged from its descriptor, in
  chunks, with its own content type: never read whole into memory;
- anything else (TIFF, 16-bit, HEIF, ...) is decoded in the sandbox the way the service decodes it (EXIF
  orientation, 16 bits kept until the last step) and sent as an 8-bit PNG, at most :data:`DISPLAY_MAX_SIDE` pixels
  on its long side;
- thumbnails are WebP, :data:`THUMB_SIDE` pixels on the long side.

What the sandbox said and made goes to a :class:`DiskCache` keyed by the file's identity (device, inode, size,
mtime) and the variant, so a file that is replaced gets a new entry and a deleted one is never served from the cache.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from daemon.errors import ImageTooLargeError, UnreadableFileError, UnsafePathError
from daemon.fsops import display, parts
from daemon.sandbox import Sandbox
from models.errors import UnsupportedImageError, UpscaledError

THUMB_SIDE = 160  # the list shows thumbnails at 80 CSS px: twice that is sharp on a HiDPI screen
DISPLAY_MAX_SIDE = 8192  # converted images (TIFF, 16-bit) are reduced to this long side
PREVIEW_MAX_PIXELS = 150_000_000  # 8-bit decode for a thumbnail: ~600 MB at most; larger is "too large to preview"
FLOAT_MAX_PIXELS = 40_000_000  # decodes through float32 (16-bit, benchmark LR): ~0.5 GB at most
MAX_FILE_BYTES = 2 << 30
STREAM_CHUNK = 256 << 10
CACHE_VERSION = "2"  # part of every cache key: bump it when a variant's pixels change
BROWSER_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}


@dataclass(frozen=True)
class Probe:
    """What the job page needs to know about one image file before it shows it."""

    ok: bool
    reason: str | None = None  # why it cannot be shown ("input not kept", "not an image: ...")
    missing: bool = False  # the file is gone (deleted inputs, a cleaned archive)
    width: int = 0
    height: int = 0
    format: str = ""  # Pillow's name: PNG, JPEG, TIFF, ...
    converted: bool = False  # the browser gets a PNG made from it, not the file itself


def open_no_follow(path: str) -> int:
    """Open ``path`` for reading through a handle of each folder on its way from ``/``, following no symbolic link
    in any component (a folder swapped for a link cannot redirect it), without blocking on a FIFO.

    Raises:
        FileNotFoundError: it is gone. UnsafePathError: a component is a symbolic link. OSError: it cannot be opened.
    """
    p = PurePosixPath(path)
    if not p.is_absolute():
        raise UnsafePathError(f"{display(path)} is not an absolute path")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    here = os.open("/", flags | os.O_DIRECTORY)
    try:
        names = parts(p.relative_to("/"))
        for name in names[:-1]:
            try:
                nxt = os.open(name, flags | os.O_DIRECTORY, dir_fd=here)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    what = "a symbolic link or not a folder"
                    raise UnsafePathError(f"{display(path)}: {display(name)} is {what}") from None
                raise
            os.close(here)
            here = nxt
        try:
            return os.open(names[-1], flags | os.O_NONBLOCK, dir_fd=here)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"{display(path)} is a symbolic link; links are not followed") from None
            raise
    finally:
        os.close(here)


class _File:
    """An open image file of a job row: its descriptor and a key that changes when the file does."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = open_no_follow(path)
        except (FileNotFoundError, UnsafePathError):
            raise
        except OSError as exc:
            raise UnreadableFileError(f"cannot read {display(path)}: {exc.strerror or exc}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise UnsupportedImageError(f"{display(path)} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            os.close(self.fd)
            raise ImageTooLargeError(
                f"{display(path)} is {st.st_size} bytes, over the {MAX_FILE_BYTES} bytes the web view reads"
            )
        self.path = path
        self.name = display(Path(path).name)
        self.stat = st

    def key(self, variant: str) -> str:
        st = self.stat
        ident = f"{CACHE_VERSION}\0{variant}\0{self.path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
        return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes as it was opened (never more than its size then), a chunk at a time; closes it."""
        try:
            done = 0
            while done < self.stat.st_size:
                chunk = os.pread(self.fd, min(STREAM_CHUNK, self.stat.st_size - done), done)
                if not chunk:
                    break
                done += len(chunk)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DiskCache:
    """Bytes by key under ``root``, at most ``max_bytes`` in all; the least recently used go first.

    Written atomically (temp file, rename), so a reader never sees half an entry, and safe from several threads.
    """

    def __init__(self, root: Path, max_bytes: int = 512 << 20) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._size = sum(p.stat().st_size for p in self.root.glob("*/*") if p.is_file())

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # recently used: pruned last
        except OSError:
            pass
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        with self._lock:
            self._size += len(data)
            if self._size > self.max_bytes:
                self._prune()

    def _prune(self) -> None:
        entries = []
        for p in self.root.glob("*/*"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        entries.sort()
        total = sum(e[1] for e in entries)
        for _, size, p in entries:
            if total <= self.max_bytes * 0.8:  # down to 80 %, so that the next puts do not prune again at once
                break
            p.unlink(missing_ok=True)
            total -= size
        self._size = total


@dataclass(frozen=True)
class Served:
    """What goes to the browser: ``data``, or the file itself streamed from ``file`` (``size`` bytes); its content
    type and an ETag."""

    data: bytes | None
    media_type: str
    etag: str
    file: _File | None = None
    size: int = 0

    def chunks(self) -> Iterator[bytes]:
        if self.file is not None:
            yield from self.file.chunks()
        elif self.data is not None:
            yield self.data


class Images:
    """Asks the sandbox about, converts and caches the images of job rows. Thread-safe; the sandbox's processes
    (``sandbox``, or a pool of its own) bound how many conversions run at once, so fifty thumbnails asked for
    together do not take every core and a few GB of memory."""

    def __init__(self, cache: DiskCache, sandbox: Sandbox | None = None) -> None:
        self.cache = cache
        self.own_sandbox = sandbox is None
        self.sandbox = sandbox or Sandbox(processes=2, timeout=30.0, max_pixels=PREVIEW_MAX_PIXELS)
        self.sandbox.start()

    def close(self) -> None:
        if self.own_sandbox:
            self.sandbox.close()

    def _inspect(self, f: _File, verify: bool = False) -> dict:
        """What the sandbox says about ``f`` (cached by its identity; ``verify`` decodes it too, and is cached on
        its own)."""
        key = f.key("inspect+verify" if verify else "inspect")
        cached = self.cache.get(key)
        if cached is not None:
            return json.loads(cached)
        found = self.sandbox.inspect(f.fd, f.name, verify, PREVIEW_MAX_PIXELS, FLOAT_MAX_PIXELS)
        self.cache.put(key, json.dumps(found).encode())
        return found

    def probe(self, path: str | None, missing_reason: str = "not kept", verify: bool = False) -> Probe:
        """Whether ``path`` (from a job row) can be shown, and its size and format; never raises.

        The header is enough for what the service wrote or decoded. ``verify`` decodes the pixels too: for the
        input of a failed job, which may well be truncated, and would otherwise be a broken image in the page.
        """
        if not path:
            return Probe(False, missing_reason, missing=True)
        try:
            with _File(path) as f:
                found = self._inspect(f, verify)
            return Probe(
                True,
                width=found["width"],
                height=found["height"],
                format=found["format"],
                converted=not found["as_is"],
            )
        except FileNotFoundError:
            return Probe(False, missing_reason, missing=True)
        except UpscaledError as exc:
            return Probe(False, str(exc))

    def display(self, path: str) -> Served:
        """The image at ``path`` as a browser can show it: the file itself, streamed, or a PNG made from it.

        Raises:
            FileNotFoundError: the file is gone.
            DecodeError, ImageTooLargeError, UnreadableFileError, UnsupportedImageError, UnsafePathError, and the
            sandbox's errors: it cannot be shown.
        """
        f: _File | None = _File(path)
        try:
            assert f is not None
            key = f.key("display")
            found = self._inspect(f)  # a file that is not an image, or too large, is refused before it is sent
            if found["as_is"]:
                served = Served(None, BROWSER_FORMATS[found["format"]], key[:32], file=f, size=f.stat.st_size)
                f = None  # the response streams it, and closes it
                return served
            png = self.cache.get(key)
            if png is None:
                png = self.sandbox.render(
                    f.fd, f.name, DISPLAY_MAX_SIDE, "png", PREVIEW_MAX_PIXELS, FLOAT_MAX_PIXELS, MAX_FILE_BYTES
                )
                self.cache.put(key, png)
            return Served(png, "image/png", key[:32])
        finally:
            if f is not None:
                f.close()

    def thumbnail(self, path: str) -> Served:
        """A WebP of at most :data:`THUMB_SIDE` pixels on the long side, from the cache when it can.

        Raises:
            FileNotFoundError, and the errors of :meth:`display`.
        """
        with _File(path) as f:
            key = f.key(f"thumb{THUMB_SIDE}")
            webp = self.cache.get(key)
            if webp is None:
                webp = self.sandbox.render(
                    f.fd, f.name, THUMB_SIDE, "webp", PREVIEW_MAX_PIXELS, FLOAT_MAX_PIXELS, MAX_FILE_BYTES
                )
                self.cache.put(key, webp)
        return Served(webp, "image/webp", key[:32])

    def benchmark_lr(self, hr_path: str, rule_json: str | None, scale: float) -> Served:
        """The LR image a benchmark-mode job fed its model, made again from the HR input exactly as the pipeline
        makes it (crop to a multiple of the scale, the rule's ``downscale`` kernel, rounded to the input's depth).

        Raises:
            FileNotFoundError, and the errors of :meth:`display`.
        """
        rule = json.loads(rule_json) if rule_json else {}
        s = int(rule.get("scale") or scale)
        kernel = str(rule.get("downscale") or "matlab-bicubic")
        with _File(hr_path) as f:
            key = f.key(f"lr\0{s}\0{kernel}")
            png = self.cache.get(key)
            if png is None:
                png = self.sandbox.benchmark_lr(f.fd, f.name, s, kernel, FLOAT_MAX_PIXELS, MAX_FILE_BYTES)
                self.cache.put(key, png)
        return Served(png, "image/png", key[:32])
