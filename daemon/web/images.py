"""The images of the web view: a job's input, output, benchmark LR and thumbnail, read safely and shown by a browser.

Only files named by a job row are ever opened (the caller passes the row's path, never a path from a request). A
file is opened without following a symbolic link in its last component, without blocking on a FIFO, and only if it
is a regular file. Nothing is sent unless Pillow recognises it as an image:

- a file a browser shows as it is (8-bit PNG, JPEG, WebP, GIF, BMP) is sent unchanged, with its own content type;
- anything else (TIFF, 16-bit, HEIF, ...) is decoded the way the service decodes it (:mod:`daemon.imageio`: EXIF
  orientation, 16 bits kept until the last step) and sent as an 8-bit PNG, at most :data:`DISPLAY_MAX_SIDE` pixels
  on its long side;
- thumbnails are WebP, :data:`THUMB_SIDE` pixels on the long side.

Conversions and thumbnails go to a :class:`DiskCache` keyed by the file's identity (device, inode, size, mtime) and
the variant, so a file that is replaced gets a new entry and a deleted one is never served from the cache.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon import imageio
from daemon.errors import DecodeError, ImageTooLargeError, UnreadableFileError
from models.errors import UnsupportedImageError, UpscaledError

THUMB_SIDE = 160  # the list shows thumbnails at 80 CSS px: twice that is sharp on a HiDPI screen
DISPLAY_MAX_SIDE = 8192  # converted images (TIFF, 16-bit) are reduced to this long side
PREVIEW_MAX_PIXELS = 150_000_000  # 8-bit decode for a thumbnail: ~600 MB at most; larger is "too large to preview"
FLOAT_MAX_PIXELS = 40_000_000  # decodes through float32 (16-bit, benchmark LR): ~0.5 GB at most
MAX_FILE_BYTES = 2 << 30
HEAD_BYTES = 1 << 16  # enough for Pillow to open a PNG, JPEG (with its EXIF), WebP or most TIFFs
CACHE_VERSION = "1"  # part of every cache key: bump it when a variant's pixels change
BROWSER_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
_BROWSER_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}
# Pillow warns of "corrupt EXIF data" on TIFFs that libtiff wrote (the service's own compressed TIFF outputs): the
# web view only reads the orientation tag, and the warning would be noise in its log. (A filter, not
# catch_warnings: that one is not thread-safe, and the image routes run in threads.)
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning, module="PIL.TiffImagePlugin")


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


class _File:
    """An open image file of a job row: its bytes on demand and a key that changes when the file does."""

    def __init__(self, path: str) -> None:
        # O_NOFOLLOW: a link put where an output was must not make us read what it points at; O_NONBLOCK: a FIFO
        # put there must not hang the request.
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsupportedImageError(f"{path} is a symbolic link; links are not followed") from None
            raise UnreadableFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise UnsupportedImageError(f"{path} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            os.close(self.fd)
            raise ImageTooLargeError(
                f"{path} is {st.st_size} bytes, over the {MAX_FILE_BYTES} bytes the web view reads"
            )
        self.path = path
        self.stat = st

    def key(self, variant: str) -> str:
        st = self.stat
        ident = f"{CACHE_VERSION}\0{variant}\0{self.path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
        return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()  # a name may not be UTF-8

    def read(self) -> bytes:
        with os.fdopen(os.dup(self.fd), "rb") as fh:
            fh.seek(0)
            return fh.read()

    def header(self) -> tuple[Image.Image, bytes]:
        """The file opened by Pillow (size, format, mode; no pixels) and the bytes that took: the first 64 KiB,
        or the whole file where the header is not there (a TIFF may keep its directory at the end).

        Raises:
            DecodeError: not an image. ImageTooLargeError: over :data:`PREVIEW_MAX_PIXELS`.
        """
        name = Path(self.path).name
        head = os.pread(self.fd, HEAD_BYTES, 0)
        if len(head) < self.stat.st_size:
            try:
                return _open_header(head, name), head
            except DecodeError:
                pass
        data = head if len(head) >= self.stat.st_size else self.read()
        return _open_header(data, name), data

    def close(self) -> None:
        os.close(self.fd)

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


def _png_bit_depth(data: bytes) -> int:
    """The bit depth byte of a PNG's IHDR (Pillow reports a 16-bit RGB PNG as mode RGB)."""
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def _open_header(data: bytes, name: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # Not the first bytes, as the service's decoder says: here they would go to a browser (a row naming
        # /etc/passwd must not show "root:x:0").
        raise DecodeError(f"{name} is not an image (no known image format)") from None
    except Exception as exc:  # Pillow raises many types on bad headers
        raise DecodeError(f"{name}: bad image header: {exc}") from None
    w, h = im.size
    if w * h > PREVIEW_MAX_PIXELS:
        raise ImageTooLargeError(f"{name} is {w}x{h}, over the {PREVIEW_MAX_PIXELS} pixels the web view previews")
    return im


def _deep(im: Image.Image, data: bytes) -> bool:
    """More than 8 bits per sample (Pillow opens a 16-bit RGB PNG or TIFF as mode RGB, so the mode does not say)."""
    if im.mode.startswith("I") or im.mode == "F":
        return True
    if im.format == "PNG":
        return _png_bit_depth(data) > 8
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258, 8)  # BitsPerSample, one value per channel
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def _shown_as_is(im: Image.Image, data: bytes) -> bool:
    return im.format in BROWSER_FORMATS and im.mode in _BROWSER_MODES and not _deep(im, data)


def _to_8bit_image(data: bytes, name: str, side: int) -> Image.Image:
    """Decode for display: upright, 8-bit, at most ``side`` pixels on the long side.

    Raises:
        DecodeError, ImageTooLargeError, UnsupportedImageError: it cannot be shown.
    """
    im = _open_header(data, name)
    try:
        if _deep(im, data):
            # 16 bits: the service's own decoder keeps them (Pillow would clip I;16 to 8 bits).
            w, h = im.size
            if w * h > FLOAT_MAX_PIXELS:
                raise ImageTooLargeError(
                    f"{name} is {w}x{h} at 16 bits, over the {FLOAT_MAX_PIXELS} pixels the web view converts"
                )
            dec = imageio.decode_bytes(data, FLOAT_MAX_PIXELS, name=name)
            arr = imageio.to_output_array(dec.rgb, dec.alpha, 8, dec.grey)
            out = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
        else:
            if im.format == "JPEG":
                im.draft("RGB", (side, side))  # the JPEG decoder scales by 1/2, 1/4, 1/8 for free
            im.load()
            out = ImageOps.exif_transpose(im)
            if out.mode not in ("L", "LA", "RGB", "RGBA"):
                has_alpha = "A" in out.mode or "transparency" in out.info
                out = out.convert("RGBA" if has_alpha else "RGB")
    except UpscaledError:
        raise
    except Exception as exc:
        raise DecodeError(f"{name} is damaged or truncated: {exc}") from None
    if max(out.size) > side:
        out.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return out


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        im.save(buf, "WEBP", quality=80, method=4)
    else:
        im.save(buf, "PNG", compress_level=1)  # fast: it is cached, and local bandwidth is cheap
    return buf.getvalue()


@dataclass(frozen=True)
class Served:
    """Bytes for the browser, their content type, and an ETag."""

    data: bytes
    media_type: str
    etag: str


class Images:
    """Reads, converts and caches the images of job rows. Thread-safe; conversions are limited to a few at once
    (``workers``), so fifty thumbnails asked for together do not take every core and a few GB of memory."""

    def __init__(self, cache: DiskCache, workers: int | None = None) -> None:
        self.cache = cache
        self._slots = threading.BoundedSemaphore(workers or min(4, os.cpu_count() or 1))

    def probe(self, path: str | None, missing_reason: str = "not kept", verify: bool = False) -> Probe:
        """Whether ``path`` (from a job row) can be shown, and its size and format; never raises.

        The header is enough for what the service wrote or decoded. ``verify`` decodes the pixels too: for the
        input of a failed job, which may well be truncated, and would otherwise be a broken image in the page.
        """
        if not path:
            return Probe(False, missing_reason, missing=True)
        try:
            with _File(path) as f:
                im, data = f.header()
                if verify and len(data) < f.stat.st_size:
                    data = f.read()
            w, h = self._upright_size(im)  # browsers and our decoder both apply the EXIF orientation
            if verify:
                with self._slots:
                    _to_8bit_image(data, Path(path).name, THUMB_SIDE)
            return Probe(True, width=w, height=h, format=im.format or "", converted=not _shown_as_is(im, data))
        except FileNotFoundError:
            return Probe(False, missing_reason, missing=True)
        except UpscaledError as exc:
            return Probe(False, str(exc))

    @staticmethod
    def _upright_size(im: Image.Image) -> tuple[int, int]:
        w, h = im.size
        try:
            turned = int(im.getexif().get(0x0112, 1) or 1) in (5, 6, 7, 8)
        except Exception:  # a broken EXIF block: the decoder ignores it too
            turned = False
        return (h, w) if turned else (w, h)

    def display(self, path: str) -> Served:
        """The image at ``path`` as a browser can show it: the file itself, or a PNG made from it.

        Raises:
            FileNotFoundError: the file is gone.
            DecodeError, ImageTooLargeError, UnreadableFileError, UnsupportedImageError: it cannot be shown.
        """
        with _File(path) as f:
            key = f.key("display")
            cached = self.cache.get(key)
            if cached is not None:
                return Served(cached, "image/png", key[:32])
            im, head = f.header()  # a file that is not an image, or too large, is refused before it is read
            data = f.read() if len(head) < f.stat.st_size else head
        name = Path(path).name
        if _shown_as_is(im, data):
            return Served(data, BROWSER_FORMATS[im.format or ""], key[:32])
        with self._slots:
            png = _encode(_to_8bit_image(data, name, DISPLAY_MAX_SIDE), "png")
        self.cache.put(key, png)
        return Served(png, "image/png", key[:32])

    def thumbnail(self, path: str) -> Served:
        """A WebP of at most :data:`THUMB_SIDE` pixels on the long side, from the cache when it can.

        Raises:
            FileNotFoundError, and the errors of :meth:`display`.
        """
        with _File(path) as f:
            key = f.key(f"thumb{THUMB_SIDE}")
            cached = self.cache.get(key)
            if cached is not None:
                return Served(cached, "image/webp", key[:32])
            _, head = f.header()
            data = f.read() if len(head) < f.stat.st_size else head
        with self._slots:
            webp = _encode(_to_8bit_image(data, Path(path).name, THUMB_SIDE), "webp")
        self.cache.put(key, webp)
        return Served(webp, "image/webp", key[:32])

    def benchmark_lr(self, hr_path: str, rule_json: str | None, scale: float) -> Served:
        """The LR image a benchmark-mode job fed its model, made again from the HR input exactly as the pipeline
        makes it (crop to a multiple of the scale, the rule's ``downscale`` kernel, rounded to the input's depth).

        Raises:
            FileNotFoundError, and the errors of :meth:`display`.
        """
        from daemon.pipeline import modcrop, quantise
        from models.resize import resize

        rule = json.loads(rule_json) if rule_json else {}
        s = int(rule.get("scale") or scale)
        kernel = str(rule.get("downscale") or "matlab-bicubic")
        with _File(hr_path) as f:
            key = f.key(f"lr\0{s}\0{kernel}")
            cached = self.cache.get(key)
            if cached is not None:
                return Served(cached, "image/png", key[:32])
            _, head = f.header()
            data = f.read() if len(head) < f.stat.st_size else head
        with self._slots:
            dec = imageio.decode_bytes(data, FLOAT_MAX_PIXELS, name=Path(hr_path).name)
            hr = modcrop(dec.rgb, s)
            lr_size = (hr.shape[1] // s, hr.shape[0] // s)
            if min(lr_size) < 1:
                raise DecodeError(f"{Path(hr_path).name} is {dec.width}x{dec.height}, too small for x{s}")
            lr = quantise(resize(hr, lr_size, kernel, levels=65535 if dec.bits == 16 else 255), dec.bits)
            arr = imageio.to_output_array(lr, None, 8, dec.grey)
            png = _encode(Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)), "png")
        self.cache.put(key, png)
        return Served(png, "image/png", key[:32])
