"""Fetching and verifying weight files.

Files land in ``weights_dir`` under the same relative path as in the catalogue (``opencv/FSRCNN_x4.pb``). A
download goes to a ``.part`` file beside the target, is hashed while it streams, checked against the catalogue's
sha256, fsynced, and only then renamed into place, so a half download never looks like a weight file.

A mirror is either a folder laid out like ``weights_dir`` or a base URL with the same layout. Where the catalogue
has no published hash, the first download records the one it saw in ``recorded-sha256.json`` and says so; later
verifications hold the file to it (trust on first use).

Diffusion entries name a Hugging Face hub repository instead of files (``ModelEntry.hub_repo``): :func:`fetch`
downloads the snapshot into the Hugging Face cache (``HF_HOME``, where the backend loads it from, offline), only the
parts the pipeline reads in safetensors form, and checks every large file against the sha256 the hub names it by.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from models.catalog import CATALOG, ModelEntry, WeightFile, get_entry
from models.errors import FetchError, WeightsCorruptError, WeightsMissingError

RECORDED = "recorded-sha256.json"
_CHUNK = 1 << 20


# The parts of a diffusers pipeline snapshot that loading reads: the index, every component's config and tokenizer
# files, and the safetensors weights. Left out: the fp16 variants, pickled .bin/.ckpt copies, and the single-file
# checkpoint at the top of the repository (several GB that diffusers does not use).
HUB_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
HUB_IGNORE = ["*.fp16.*", "*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx*"]


@dataclass
class FileReport:
    model_id: str
    path: str
    status: str  # present, fetched, recorded, missing, mismatch, unverified, failed
    detail: str = ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded(weights_dir: Path) -> dict[str, str]:
    try:
        return json.loads((weights_dir / RECORDED).read_text())
    except FileNotFoundError:
        return {}


def _record(weights_dir: Path, path: str, sha: str) -> None:
    data = _recorded(weights_dir)
    data[path] = sha
    tmp = weights_dir / (RECORDED + ".part")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, weights_dir / RECORDED)


def expected_sha(weights_dir: Path, wf: WeightFile) -> str | None:
    return wf.sha256 or _recorded(weights_dir).get(wf.path)


def fetch_command(model_id: str) -> str:
    return f"upscaled weights fetch {model_id}"


def locate(weights_dir: Path, entry: ModelEntry, key: int) -> Path:
    """Path of a present weight file.

    Raises:
        WeightsMissingError: the file is absent; the message names the fetch command.
    """
    wf = entry.files[key]
    path = weights_dir / wf.path
    if not path.is_file():
        raise WeightsMissingError(
            f"weights for {entry.id} are missing: {path} does not exist; run `{fetch_command(entry.id)}` "
            f"(add --mirror DIR_OR_URL on a machine without internet access)"
        )
    return path


def check(weights_dir: Path, wf: WeightFile) -> None:
    """Hash a present file against the catalogue (or the recorded hash).

    Raises:
        WeightsCorruptError: the hash differs.
    """
    want = expected_sha(weights_dir, wf)
    if want is None:
        return
    got = sha256_file(weights_dir / wf.path)
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


def _download(src: str, part: Path, timeout: float) -> str:
    """Copy ``src`` (a local path or a URL) into ``part``, return the sha256 of what was written."""
    digest = hashlib.sha256()
    try:
        if "://" in src:
            reader = urllib.request.urlopen(src, timeout=timeout)  # noqa: S310 - http(s) and file URLs only
        else:
            reader = open(src, "rb")
        with reader as r, open(part, "wb") as w:
            while chunk := r.read(_CHUNK):
                digest.update(chunk)
                w.write(chunk)
            w.flush()
            os.fsync(w.fileno())
    except OSError as exc:  # URLError and HTTPError are OSErrors
        part.unlink(missing_ok=True)
        raise FetchError(f"could not download {src}: {exc}") from exc
    return digest.hexdigest()


def fetch_file(weights_dir: Path, model_id: str, wf: WeightFile, mirror: str | None, timeout: float = 60.0,
               force: bool = False) -> FileReport:
    dest = weights_dir / wf.path
    want = expected_sha(weights_dir, wf)
    if dest.is_file() and not force and want and sha256_file(dest) == want:
        return FileReport(model_id, wf.path, "present")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    src = _source(wf, mirror)
    try:
        got = _download(src, part, timeout)
    except FetchError as exc:
        return FileReport(model_id, wf.path, "failed", str(exc))
    if want and got != want:
        part.unlink(missing_ok=True)
        return FileReport(model_id, wf.path, "failed", f"{src}: sha256 {got} does not match the expected {want}")
    os.replace(part, dest)
    if want is None:
        _record(weights_dir, wf.path, got)
        return FileReport(model_id, wf.path, "recorded", f"no published sha256; recorded {got} on first download")
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
        return FileReport(entry.id, label, "failed", "huggingface_hub is not installed: pip install "
                                                     "'upscaled[diffusion]'")
    kwargs = dict(repo_id=entry.hub_repo, revision=entry.hub_revision, allow_patterns=HUB_ALLOW,
                  ignore_patterns=HUB_IGNORE)
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


def fetch(weights_dir: Path, model_ids: Iterable[str], mirror: str | None = None, force: bool = False,
          timeout: float = 60.0) -> list[FileReport]:
    """Fetch every weight file of ``model_ids``. Never raises for a single failed file: see the reports.

    A diffusion entry's hub snapshot goes to the Hugging Face cache instead (:func:`fetch_hub`); ``mirror`` does
    not apply to it (set ``HF_ENDPOINT`` for a hub mirror).
    """
    weights_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for mid in model_ids:
        entry = get_entry(mid)
        if entry.hub_repo:
            reports.append(fetch_hub(entry, force, timeout))
            continue
        for wf in entry.weight_files():
            reports.append(fetch_file(weights_dir, mid, wf, mirror, timeout, force))
    return reports


def verify(weights_dir: Path, model_ids: Iterable[str] | None = None) -> list[FileReport]:
    """Report on every catalogued weight file: present and matching, mismatched, unverified or missing."""
    ids = list(model_ids) if model_ids else [e for e in CATALOG if CATALOG[e].files]
    reports = []
    for mid in ids:
        for wf in get_entry(mid).weight_files():
            path = weights_dir / wf.path
            if not path.is_file():
                reports.append(FileReport(mid, wf.path, "missing", f"run `{fetch_command(mid)}`"))
                continue
            want = expected_sha(weights_dir, wf)
            if want is None:
                reports.append(FileReport(mid, wf.path, "unverified", "no known sha256"))
                continue
            got = sha256_file(path)
            status = "present" if got == want else "mismatch"
            reports.append(FileReport(mid, wf.path, status, "" if got == want else f"sha256 {got} != {want}"))
    return reports


def present(weights_dir: Path, entry: ModelEntry) -> bool:
    """True when every weight file of ``entry`` exists (no hashing: for listings). For a hub entry: when its
    snapshot's ``model_index.json`` is in the Hugging Face cache (no network)."""
    if entry.hub_repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        found = try_to_load_from_cache(entry.hub_repo, "model_index.json", revision=entry.hub_revision)
        return isinstance(found, str)
    return all((weights_dir / wf.path).is_file() for wf in entry.weight_files())


def needs_weights(entry: ModelEntry) -> bool:
    """Whether ``entry`` loads anything: weight files, or a hub snapshot."""
    return bool(entry.files or entry.hub_repo)


