"""Fetching and verifying weight files.

Files land in ``weights_dir`` under the same relative path as in the catalogue (``opencv/FSRCNN_x4.pb``). A
download goes to an exclusively created ``.part`` file with a random name beside the target, is hashed while it
streams, stopped as soon as it passes the file's size limit (:func:`download_limit`), checked against the catalogue's
sha256, fsynced, and only then renamed into place, so a half download never looks like a weight file.

Every download has an overall deadline besides the per-read timeout (:func:`download_deadline`): a source that
trickles a byte now and then never holds a fetch for ever.

``omdb:<id>`` models (:mod:`models.omdb`) are fetched the same way: their file is the entry's first direct
resource in a format spandrel loads, at ``omdb/<sha256>.<ext>`` (in ``weights_dir`` and on a mirror), held to the
entry's size and sha256. A file whose only link needs a browser is reported with where to put it by hand.

A mirror is either a folder laid out like ``weights_dir`` or a base URL with the same layout. A mirror is not trusted:
what it serves must match the catalogue's sha256. A catalogue file with no published hash is refused unless the user
says ``trust_unhashed`` (``upscaled weights fetch --trust-unhashed``); then the hash seen is recorded in
``recorded-sha256.json`` with where it came from and that it was trusted on the user's word, and later loads and
verifications hold the file to it. :func:`verify` calls a file ``present`` only when it matches a published hash;
one that matches a hash recorded with ``--trust-unhashed`` is ``trusted``, anything else ``unverified`` or
``mismatch``.

The weights folder itself is trusted (it is the operator's; the unit mounts it read-only): :func:`check` and
:func:`locate` hold every catalogue file to its published or recorded hash each time it is loaded.

Diffusion entries name a Hugging Face hub repository instead of files (``ModelEntry.hub_repo``), pinned to a commit
(``hub_revision``): :func:`fetch` downloads the snapshot into the Hugging Face cache (``HF_HOME``, where the backend
loads it from, offline), only the parts the pipeline reads in safetensors form, and checks every large file against
the sha256 the hub names it by.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from models.catalog import CATALOG, ModelEntry, WeightFile, get_entry, is_omdb_model
from models.errors import FetchError, UpscaledError, WeightsCorruptError, WeightsMissingError

RECORDED = "recorded-sha256.json"
_CHUNK = 1 << 20
# No catalogue file is near this (the largest is 67 MB): whatever a mirror says, a download stops here.
ABSOLUTE_MAX_BYTES = 1 << 30
# A file of known size may come a little larger from a mirror that re-packs it (it then fails its hash); more than
# this is not that file, and the download stops before it fills the disk.
SIZE_MARGIN = 1.10
# The overall deadline of one download: at least this long, and long enough for the file at the slowest rate we
# wait for. 67 MB (RRDBNet) gets about 4.5 minutes; a mirror that sends one byte every two seconds is stopped.
DEADLINE_MIN_S = 120.0
DEADLINE_MIN_RATE = 256 << 10  # bytes per second


# The parts of a diffusers pipeline snapshot that loading reads: the index, every component's config and tokenizer
# files, and the safetensors weights. Left out: the fp16 variants, pickled .bin/.ckpt copies, and the single-file
# checkpoint at the top of the repository (several GB that diffusers does not use).
HUB_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
HUB_IGNORE = ["*.fp16.*", "*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx*"]


@dataclass
class FileReport:
    model_id: str
    path: str
    status: str  # present, trusted, fetched, recorded, missing, mismatch, unverified, failed
    detail: str = ""


@dataclass(frozen=True)
class Recorded:
    """A hash recorded for a file the catalogue publishes none for.

    ``trusted``: recorded by a fetch with ``--trust-unhashed``, the user's explicit word. A record of an older
    version (trust on first use, nobody asked) is held to at load, but never makes a file ``trusted``.
    """

    sha256: str
    trusted: bool
    source: str = ""
    at: str = ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _records(weights_dir: Path) -> dict[str, object]:
    try:
        data = json.loads((weights_dir / RECORDED).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise WeightsCorruptError(
            f"cannot read {weights_dir / RECORDED}: {exc}; expected a JSON object of "
            "recorded hashes (delete it and fetch those files again)"
        ) from None
    return data if isinstance(data, dict) else {}


def recorded(weights_dir: Path, path: str) -> Recorded | None:
    """The hash recorded for the catalogue path ``path``, or None."""
    item = _records(weights_dir).get(path)
    if isinstance(item, str):  # an older version's trust on first use: no one said to trust it
        return Recorded(item, trusted=False)
    if isinstance(item, dict) and isinstance(item.get("sha256"), str):
        return Recorded(
            item["sha256"],
            bool(item.get("trusted_unhashed")),
            str(item.get("source", "")),
            str(item.get("recorded_at", "")),
        )
    return None


def _record(weights_dir: Path, path: str, sha: str, source: str) -> None:
    data = _records(weights_dir)
    data[path] = {
        "sha256": sha,
        "source": source,
        "trusted_unhashed": True,
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    tmp = weights_dir / f".{RECORDED}.{secrets.token_hex(8)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, weights_dir / RECORDED)


def expected_sha(weights_dir: Path, wf: WeightFile) -> str | None:
    """The sha256 ``wf`` must have: the published one, else one recorded for it, else None."""
    if wf.sha256:
        return wf.sha256
    rec = recorded(weights_dir, wf.path)
    return rec.sha256 if rec else None


def download_limit(wf: WeightFile) -> int:
    """The most bytes a download of ``wf`` may bring: its catalogued size with a margin, else its ``max_size``,
    and never more than :data:`ABSOLUTE_MAX_BYTES`."""
    if wf.size:
        return min(ABSOLUTE_MAX_BYTES, int(wf.size * SIZE_MARGIN) + (64 << 10))
    return min(ABSOLUTE_MAX_BYTES, wf.max_size or ABSOLUTE_MAX_BYTES)


def download_deadline(wf: WeightFile) -> float:
    """Seconds one download of ``wf`` may take in all: :data:`DEADLINE_MIN_S`, or its size limit at
    :data:`DEADLINE_MIN_RATE` if that is longer."""
    return max(DEADLINE_MIN_S, download_limit(wf) / DEADLINE_MIN_RATE)


def fetch_command(model_id: str) -> str:
    return f"upscaled weights fetch {model_id}"


def entry_for(model_id: str, weights_dir: Path) -> ModelEntry:
    """The full entry of ``model_id``: the catalogue's (or an ad-hoc ``file:``/``diffusers:`` one), or for an
    ``omdb:<id>`` id the one built from the cached OpenModelDB index (:func:`models.omdb.resolve`).

    Raises:
        UnknownModelError: no such model (or no such entry in the cached index).
        WeightsMissingError: an ``omdb:`` id and no cached index yet; the message names the fetch command.
        WeightsCorruptError: the cached index cannot be read.
    """
    if is_omdb_model(model_id):
        from models import omdb  # omdb downloads its index with this module's downloader

        return omdb.resolve(model_id, weights_dir)
    return get_entry(model_id)


def locate(weights_dir: Path, entry: ModelEntry, key: int, verify: bool = True) -> Path:
    """Path of a present weight file, checked against its sha256 (unless ``verify`` is False) each time.

    Raises:
        WeightsMissingError: the file is absent; the message names the fetch command.
        WeightsCorruptError: ``verify`` and the file does not match its published or recorded sha256.
    """
    wf = entry.files[key]
    path = weights_dir / wf.path
    if not path.is_file():
        raise WeightsMissingError(
            f"weights for {entry.id} are missing: {path} does not exist; run `{fetch_command(entry.id)}` "
            f"(add --mirror DIR_OR_URL on a machine without internet access)"
        )
    if verify:
        check(weights_dir, wf)
    return path


def check(weights_dir: Path, wf: WeightFile) -> None:
    """Hash a present file against the catalogue (or the hash recorded for it).

    A file with neither is loaded as it is: the weights folder is the operator's (a file put there by hand is
    trusted as any configuration is); :func:`verify` reports it ``unverified``.

    Raises:
        WeightsCorruptError: the hash differs, or the file cannot be read.
    """
    want = expected_sha(weights_dir, wf)
    if want is None:
        return
    try:
        got = sha256_file(weights_dir / wf.path)
    except OSError as exc:
        raise WeightsCorruptError(f"cannot read {weights_dir / wf.path}: {exc.strerror or exc}") from None
    if got != want:
        raise WeightsCorruptError(
            f"{weights_dir / wf.path} has sha256 {got}, expected {want}; delete it and run `upscaled weights fetch`"
        )


def _source(wf: WeightFile, mirror: str | None) -> str:
    if not mirror:
        return wf.url
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(wf.path)
    return str(Path(mirror) / wf.path)


class NotModified(FetchError):
    """A conditional request (``If-None-Match``) answered 304: what the caller holds is current."""

    kind = "not-modified"


@dataclass(frozen=True)
class Download:
    """A finished download: the ``.part`` file beside its destination, what was written, and the response's
    headers (empty for a local file)."""

    part: Path
    sha256: str
    size: int
    headers: Mapping[str, str]


def _open_source(
    src: str, limit: int, timeout: float, headers: Mapping[str, str] | None = None
) -> tuple[io.BufferedIOBase, Mapping[str, str]]:
    """Open ``src`` (a URL or a local path) for reading; a declared size over ``limit`` is refused before any byte.
    Returns the reader and the response's headers. ``headers`` go with an HTTP request.

    Raises:
        NotModified: a conditional request answered 304.
        FetchError: it cannot be opened, or says it is larger than ``limit``.
    """
    try:
        if "://" in src:
            request = urllib.request.Request(src, headers=dict(headers or {}))
            reader = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) and file URLs only
            got: Mapping[str, str] = reader.headers
            declared = got.get("Content-Length")
            size = int(declared) if declared and declared.isdigit() else None
        else:
            reader, got = open(src, "rb"), {}
            size = os.fstat(reader.fileno()).st_size
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            raise NotModified(f"{src}: not modified") from None
        raise FetchError(f"could not download {src}: {exc}") from exc
    except OSError as exc:  # URLError is an OSError
        raise FetchError(f"could not download {src}: {exc}") from exc
    if size is not None and size > limit:
        reader.close()
        raise FetchError(
            f"{src} is {size} bytes, over the {limit}-byte limit for this file; it is not the catalogued file"
        )
    return reader, got


def download(
    src: str,
    dest: Path,
    limit: int,
    timeout: float,
    deadline: float,
    headers: Mapping[str, str] | None = None,
) -> Download:
    """Copy ``src`` into a new ``.part`` file beside ``dest``: at most ``limit`` bytes, within ``deadline`` seconds
    in all (each read also times out after ``timeout`` seconds of silence). Nothing is left behind on an error.

    Raises:
        NotModified: ``headers`` made the request conditional and the source answered 304.
        FetchError: the source cannot be read, brings more than ``limit`` bytes, or is not done by the deadline.
    """
    digest = hashlib.sha256()
    part = dest.with_name(f".{dest.name}.{secrets.token_hex(8)}.part")
    stop = time.monotonic() + deadline
    reader, got = _open_source(src, limit, min(timeout, deadline), headers)
    try:
        # Exclusive and not through a link: a random name no one else holds (0666 & ~umask, as any file we write).
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with reader as r, os.fdopen(fd, "wb") as w:
            n = 0
            # read1: what one read of the socket brings, so that a trickle still comes back here to the deadline
            # (read(n) would wait for n bytes, and a byte every few seconds keeps each read under the timeout).
            while chunk := r.read1(_CHUNK):
                n += len(chunk)
                if n > limit:  # a server that lies about its length, or streams forever
                    raise FetchError(f"{src} sent more than {limit} bytes, over the limit for this file; stopped")
                if time.monotonic() > stop:
                    raise FetchError(
                        f"{src} was not done after {deadline:.0f} s ({n} bytes in), the deadline for this file; "
                        "stopped (a stalled or very slow source: try again, or use --mirror)"
                    )
                digest.update(chunk)
                w.write(chunk)
            w.flush()
            os.fsync(w.fileno())
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise FetchError(f"could not download {src}: {exc}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return Download(part, digest.hexdigest(), n, got)


def fetch_file(
    weights_dir: Path,
    model_id: str,
    wf: WeightFile,
    mirror: str | None,
    timeout: float = 60.0,
    force: bool = False,
    trust_unhashed: bool = False,
    deadline: float | None = None,
) -> FileReport:
    """Fetch one weight file from ``mirror`` (or its source URL). Never raises: a failure is a ``failed`` report.

    A file with a published sha256 must match it, and a file of known size must have that size. A file without a
    hash is refused unless ``trust_unhashed``, or a hash was recorded for it with ``trust_unhashed`` before (then the
    download must match that). A file whose source needs a browser (``wf.direct`` False) comes only from a mirror,
    or is put in place by hand; either way it is held to its hash. ``deadline``: seconds the download may take in
    all (default :func:`download_deadline`).
    """
    dest = weights_dir / wf.path
    rec = None if wf.sha256 else recorded(weights_dir, wf.path)
    want = wf.sha256 or (rec.sha256 if rec and rec.trusted else None)
    if want is None and not trust_unhashed:
        return FileReport(
            model_id,
            wf.path,
            "failed",
            f"no sha256 is published for {wf.path} ({wf.url}), so nothing could tell a good copy from "
            "a bad one; pass --trust-unhashed to accept what the source serves (its hash is then "
            "recorded and enforced)",
        )
    if dest.is_file() and not force and want and sha256_file(dest) == want:
        return FileReport(model_id, wf.path, "present" if wf.sha256 else "trusted")
    if not wf.direct and not mirror:
        size = f"{wf.size} bytes, " if wf.size else ""
        return FileReport(
            model_id,
            wf.path,
            "failed",
            f"no direct download: the file ({size}sha256 {want}) is only at {wf.url}, which needs a browser; "
            f"download it there and save it as {dest} (or as {wf.path} in a --mirror folder), then run "
            f"`{fetch_command(model_id)}` again to check it",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = _source(wf, mirror)
    limit = download_limit(wf)
    try:
        got = download(src, dest, limit, timeout, deadline if deadline is not None else download_deadline(wf))
    except FetchError as exc:
        return FileReport(model_id, wf.path, "failed", str(exc))
    problem = None
    if want and got.sha256 != want:
        problem = f"{src}: sha256 {got.sha256} does not match the expected {want}"
    elif wf.size and got.size != wf.size:  # the right bytes, and a source that states another size: it is wrong
        problem = f"{src}: {got.size} bytes, but {wf.size} bytes are stated for this file; refused"
    if problem:
        got.part.unlink(missing_ok=True)
        return FileReport(model_id, wf.path, "failed", problem)
    os.replace(got.part, dest)
    if want is None:
        _record(weights_dir, wf.path, got.sha256, src)
        return FileReport(
            model_id,
            wf.path,
            "recorded",
            f"no published sha256; trusted on --trust-unhashed and recorded {got.sha256} from {src}",
        )
    return FileReport(model_id, wf.path, "fetched", src)


def fetch_hub(entry: ModelEntry, force: bool = False, timeout: float = 60.0) -> FileReport:
    """Download ``entry.hub_repo`` at ``entry.hub_revision`` into the Hugging Face cache and verify it.

    An intact snapshot already in the cache is reported ``present`` without touching the network (unless
    ``force``). Never raises: a failure is a ``failed`` report that says why.
    """
    label = f"hf:{entry.hub_repo}@{entry.hub_revision}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return FileReport(
            entry.id, label, "failed", "huggingface_hub is not installed: pip install 'upscaled[diffusion]'"
        )
    kwargs = dict(
        repo_id=entry.hub_repo, revision=entry.hub_revision, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE
    )
    if not force:
        try:
            folder = Path(snapshot_download(local_files_only=True, **kwargs))
            if not verify_snapshot(folder):
                return FileReport(entry.id, label, "present", str(folder))
        except Exception:  # noqa: BLE001 - not (or not wholly) in the cache: download below
            pass
    try:
        folder = Path(snapshot_download(force_download=force, etag_timeout=timeout, **kwargs))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises HTTP, OS and value errors of its own
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return FileReport(entry.id, label, "failed", f"could not download {entry.hub_repo}: {first}")
    bad = verify_snapshot(folder)
    if bad:
        return FileReport(entry.id, label, "failed", "sha256 mismatch, delete them and fetch again: " + "; ".join(bad))
    return FileReport(entry.id, label, "fetched", str(folder))


def verify_snapshot(folder: Path) -> list[str]:
    """Check every large (LFS) file of a hub snapshot against the sha256 the cache names its blob by.

    In the Hugging Face cache a snapshot's files link to ``blobs/<etag>``, and the etag of a file stored in LFS
    (every weight file) is its sha256. Returns one line per mismatch; an empty list means all good.
    """
    bad = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        blob = path.resolve().name
        if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
            got = sha256_file(path)
            if got != blob:
                bad.append(f"{path.relative_to(folder)}: sha256 {got}, expected {blob}")
    return bad


def fetch(
    weights_dir: Path,
    model_ids: Iterable[str],
    mirror: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
    trust_unhashed: bool = False,
    index_url: str | None = None,
    deadline: float | None = None,
) -> list[FileReport]:
    """Fetch every weight file of ``model_ids``. Never raises for a single failed file: see the reports.

    ``trust_unhashed``: accept (and record) files the catalogue publishes no sha256 for; without it they fail.
    A diffusion entry's hub snapshot goes to the Hugging Face cache instead (:func:`fetch_hub`); ``mirror`` does
    not apply to it (set ``HF_ENDPOINT`` for a hub mirror). ``omdb:<id>`` ids first refresh the cached OpenModelDB
    index from ``index_url`` (once per call; a refresh that fails keeps the cache, and says so), then fetch the
    entry's file (:mod:`models.omdb`). ``deadline``: seconds each download may take in all.

    Raises:
        UnknownModelError: an unknown model id (a malformed ``omdb:`` id included).
    """
    weights_dir.mkdir(parents=True, exist_ok=True)
    ids = list(model_ids)
    for mid in ids:
        get_entry(mid)  # every id checked before anything is downloaded
    note = _refresh_index(weights_dir, index_url, timeout, deadline) if any(map(is_omdb_model, ids)) else ""
    reports = []
    for mid in ids:
        try:
            entry = entry_for(mid, weights_dir)
        except UpscaledError as exc:
            reports.append(FileReport(mid, "-", "failed", "; ".join(x for x in (str(exc), note) if x)))
            continue
        if entry.hub_repo:
            reports.append(fetch_hub(entry, force, timeout))
            continue
        for wf in entry.weight_files():
            report = fetch_file(weights_dir, mid, wf, mirror, timeout, force, trust_unhashed, deadline)
            if note and is_omdb_model(mid):
                report.detail = "; ".join(x for x in (report.detail, note) if x)
            reports.append(report)
    return reports


def _refresh_index(weights_dir: Path, index_url: str | None, timeout: float, deadline: float | None) -> str:
    """Refresh the cached OpenModelDB index; on failure keep the cache. Returns what the reports should say ("" when
    the refresh went through)."""
    from models import omdb

    if not index_url:
        return "no model_index_url is set: the cached OpenModelDB index is used as it is"
    try:
        omdb.refresh(weights_dir, index_url, timeout=timeout, deadline=deadline)
    except UpscaledError as exc:
        cached = omdb.load_index(weights_dir)
        using = f"the cached index of {cached.fetched_at}" if cached else "no cached index"
        return f"could not refresh the OpenModelDB index ({exc}); using {using}"
    return ""


def verify(weights_dir: Path, model_ids: Iterable[str] | None = None) -> list[FileReport]:
    """Report on every catalogued weight file.

    ``present``: it matches its published sha256. ``trusted``: it matches the hash recorded when it was fetched with
    ``--trust-unhashed`` (no published hash exists). ``unverified``: nothing to check it against (put there by
    hand, or recorded on first use by an older version without anyone's say). ``mismatch``: it differs from its
    published or recorded hash. ``missing``: not there.
    """
    ids = list(model_ids) if model_ids else [e for e in CATALOG if CATALOG[e].files]
    reports = []
    for mid in ids:
        try:
            entry = entry_for(mid, weights_dir)
        except (WeightsMissingError, WeightsCorruptError) as exc:  # an omdb: id whose index is not cached
            reports.append(FileReport(mid, "-", "missing", str(exc)))
            continue
        for wf in entry.weight_files():
            path = weights_dir / wf.path
            if not path.is_file():
                reports.append(FileReport(mid, wf.path, "missing", f"run `{fetch_command(mid)}`"))
                continue
            rec = None if wf.sha256 else recorded(weights_dir, wf.path)
            want = wf.sha256 or (rec.sha256 if rec else None)
            if want is None:
                reports.append(
                    FileReport(
                        mid,
                        wf.path,
                        "unverified",
                        "no published sha256 and none recorded; "
                        f"run `{fetch_command(mid)} --force --trust-unhashed` to record one",
                    )
                )
                continue
            got = sha256_file(path)
            if got != want:
                reports.append(FileReport(mid, wf.path, "mismatch", f"sha256 {got} != {want}"))
            elif wf.sha256:
                reports.append(FileReport(mid, wf.path, "present"))
            elif rec is not None and rec.trusted:
                reports.append(
                    FileReport(
                        mid,
                        wf.path,
                        "trusted",
                        f"no published sha256; matches the one recorded "
                        f"with --trust-unhashed from {rec.source or 'its source'}",
                    )
                )
            else:
                reports.append(
                    FileReport(
                        mid,
                        wf.path,
                        "unverified",
                        "matches a hash recorded on first use without --trust-unhashed; run "
                        f"`{fetch_command(mid)} --force --trust-unhashed` to fetch and trust it",
                    )
                )
    return reports


def present(weights_dir: Path, entry: ModelEntry) -> bool:
    """True when every weight file of ``entry`` exists (no hashing: for listings). For a hub entry: when its
    snapshot's ``model_index.json`` is in the Hugging Face cache (no network). For an ``omdb:`` entry: when the
    cached index has it and its file is there."""
    if is_omdb_model(entry.id) and not entry.files:
        try:
            entry = entry_for(entry.id, weights_dir)
        except UpscaledError:
            return False
    if entry.hub_repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        found = try_to_load_from_cache(entry.hub_repo, "model_index.json", revision=entry.hub_revision)
        return isinstance(found, str)
    return all((weights_dir / wf.path).is_file() for wf in entry.weight_files())


def needs_weights(entry: ModelEntry) -> bool:
    """Whether ``entry`` loads anything: weight files, a hub snapshot, or an OpenModelDB entry's file."""
    return bool(entry.files or entry.hub_repo or is_omdb_model(entry.id))
