"""OpenModelDB in the catalogue: ``model = "omdb:<id>"``, fetched by name and held to the entry's sha256.

OpenModelDB (https://openmodeldb.info) is the community's catalogue of upscaling models. Its repository
(OpenModelDB/open-model-database) holds one JSON document per model in ``data/models/<id>.json``: the architecture
(OpenModelDB's own ids: ``esrgan``, ``compact``, ``span``, ``realplksr``...), the scale, the licence, tags, a
description, and per resource its format (``pth``, ``safetensors``, ``onnx``...), size, sha256 and URLs.

1. **The index.** ``model_index_url`` says where the entries come from, in one of two forms:

   - a gzip'd tar archive of the repository (the default: GitHub's archive of its ``main`` branch). Its
     ``data/models/<id>.json`` members are read in memory (nothing is extracted) and its commit is recorded (the
     archive's pax ``comment``, which ``git archive`` sets to the commit id);
   - a ``.json`` document mapping each id to its entry: the form OpenModelDB's site publishes the same files in
     (https://openmodeldb.info/api/v1/models.json), and the form of a one-file mirror.

   Either is a URL or a local path, downloaded within a size cap and a deadline (:func:`models.weights.download`)
   and cached in ``weights_dir/omdb/index.json`` with its source, commit, ETag and time (:func:`refresh`). A refresh
   sends the ETag back, and a 304 keeps the cache. Rules, loads and searches read only the cache, never the network.
2. **The file.** Of an entry's resources, the first in a format spandrel loads here (``pth``, ``safetensors``) with a
   direct HTTP(S) link is used (:meth:`OmdbModel.download_choice`). A link that needs a browser (Mega, Google Drive)
   is reported, never followed. The file's place is ``omdb/<sha256>.<ext>`` in ``weights_dir`` and on a mirror, and
   :mod:`models.weights` holds it to the entry's size and sha256 like every catalogue file.
3. **The checks before a job runs**: the licence (:func:`is_noncommercial`), the architecture (:func:`arch_problem`:
   one the installed spandrel loads), and the scale (the rule's check, in :mod:`daemon.config`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import tarfile
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.catalog import OMDB_ID, OMDB_PREFIX, ModelEntry, WeightFile, get_entry, is_omdb_model
from models.errors import (
    BackendUnavailableError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsCorruptError,
    WeightsMissingError,
)
from models.weights import NotModified, download, fetch_command

DEFAULT_INDEX_URL = "https://github.com/OpenModelDB/open-model-database/archive/refs/heads/main.tar.gz"
CACHE = Path("omdb") / "index.json"  # under weights_dir
FOLDER = "omdb"  # the entries' files: omdb/<sha256>.<ext> in weights_dir and on a mirror
# The repository's archive is a few MB (site code and the ~700 entries); a JSON index about as much.
INDEX_MAX_BYTES = 64 << 20
INDEX_DEADLINE_S = 300.0
ENTRY_MAX_BYTES = 1 << 20  # one entry's JSON; the largest real ones are a few kB
ARCHIVE_MAX_WALK = 1 << 30  # member bytes walked through in an archive before it is refused as a bomb
# Resource types spandrel reads here, with the suffix the file keeps (spandrel picks its reader by suffix).
LOADABLE = {"pth": ".pth", "safetensors": ".safetensors"}
# Hosts whose links are pages for a browser (a click-through, a script, a folder view), not the file.
BROWSER_HOSTS = (
    "mega.nz",
    "mega.co.nz",
    "mega.io",
    "drive.google.com",
    "docs.google.com",
    "mediafire.com",
    "icedrive.net",
    "icedrive.io",
    "onedrive.live.com",
    "1drv.ms",
    "pixeldrain.com",
    "openmodeldb.info",
)
_MEMBER = re.compile(r"(?:[^/]+/)?data/models/([^/]+)\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_NONCOMMERCIAL = re.compile(r"(?:^|[^a-z])nc(?:[^a-z]|$)|non[- ]?commercial", re.IGNORECASE)

# spandrel 0.4.2's architecture ids (MAIN_REGISTRY), and what spandrel_extra_arches 0.2.0 adds. An OpenModelDB id
# that is one of these once case and punctuation are ignored ("swinir", "swift-srgan") needs no alias.
SPANDREL_ARCHES = (
    "ATD", "AuraSR", "Compact", "CRAFT", "DAT", "DCTLSA", "DITN", "DnCNN", "DRCT", "DRUNet", "ESRGAN", "FBCNN",
    "FDAT", "FFTformer", "GFPGAN", "GRL", "HAT", "HVICIDNet", "IPT", "KBNet", "LaMa", "MixDehazeNet", "MMRealSR",
    "MoESR", "MoSR", "NAFNet", "OmniSR", "PLKSR", "RCAN", "RealCUGAN", "RestoreFormer", "RetinexFormer", "RGT",
    "SAFMN", "SAFMNBCIE", "SCUNet", "SeemoRe", "SPAN", "Swin2SR", "SwinIR", "SwiftSRGAN", "Uformer",
)  # fmt: skip
EXTRA_ARCHES = (
    "AdaCode", "CodeFormer", "DDColor", "FeMaSR", "M3SNet", "MAT", "MIRNet2", "MPRNet", "Restormer", "SRFormer",
)  # fmt: skip
# OpenModelDB ids whose spandrel architecture has another name (variants spandrel detects from the weights).
ARCH_ALIASES = {
    "esrgan-2c2": "ESRGAN",
    "esrgan-lite": "ESRGAN",
    "realplksr": "PLKSR",
    "cugan": "RealCUGAN",
    "rgt-s": "RGT",
    "dat-2": "DAT",
    "dat-s": "DAT",
    "dat-light": "DAT",
}


# --- entries ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resource:
    """One downloadable form of a model: ``type`` is OpenModelDB's (``pth``, ``safetensors``, ``onnx``...)."""

    type: str
    platform: str
    size: int | None
    sha256: str | None
    urls: tuple[str, ...]


@dataclass(frozen=True)
class OmdbModel:
    """One OpenModelDB entry, as far as this service uses it."""

    id: str
    name: str
    author: str
    license: str  # "" when the entry states none
    tags: tuple[str, ...]
    description: str
    architecture: str  # OpenModelDB's id, lower case
    scale: int
    resources: tuple[Resource, ...]
    date: str

    def download_choice(self) -> tuple[Resource, str | None] | None:
        """(resource, link) of the first resource in a format spandrel loads that has a direct link; when none has
        one, the first such resource and None (its file can only come from a mirror or by hand). None when the entry
        has no resource spandrel loads (ONNX or NCNN only)."""
        loadable = [r for r in self.resources if r.type in LOADABLE]
        for r in loadable:
            for url in r.urls:
                if is_direct(url, LOADABLE[r.type]):
                    return r, url
        return (loadable[0], None) if loadable else None


def is_direct(url: str, suffix: str) -> bool:
    """Whether ``url`` is a plain download of a ``suffix`` file: HTTP(S), not on a host whose links need a browser
    (:data:`BROWSER_HOSTS`), not a GitHub page view (``/blob/``), and its path ends in ``suffix``."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        return False
    if any(host == h or host.endswith("." + h) for h in BROWSER_HOSTS):
        return False
    if host == "github.com" and "/blob/" in parts.path:
        return False
    return urllib.parse.unquote(parts.path).lower().endswith(suffix)


def parse_model(omdb_id: str, raw: Mapping[str, Any]) -> OmdbModel:
    """An entry from its JSON document (``data/models/<id>.json``).

    Raises:
        ValueError: the document lacks what a model needs here (an architecture, a positive whole scale, a list of
            resources); the message says which.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    arch, scale, resources = raw.get("architecture"), raw.get("scale"), raw.get("resources")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"no architecture (got {arch!r})")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a whole number of at least 1, got {scale!r}")
    if not isinstance(resources, list):
        raise ValueError(f"resources must be a list, got {type(resources).__name__}")
    author = raw.get("author", "")
    tags = raw.get("tags") or []
    return OmdbModel(
        id=omdb_id,
        name=str(raw.get("name") or omdb_id),
        author=", ".join(map(str, author)) if isinstance(author, list) else str(author or ""),
        license=str(raw.get("license") or ""),
        tags=tuple(str(t) for t in tags) if isinstance(tags, list) else (),
        description=str(raw.get("description") or ""),
        architecture=arch.lower(),
        scale=scale,
        resources=tuple(_resource(r) for r in resources if isinstance(r, Mapping)),
        date=str(raw.get("date") or ""),
    )


def _resource(raw: Mapping[str, Any]) -> Resource:
    size, sha, urls = raw.get("size"), str(raw.get("sha256") or "").lower(), raw.get("urls") or []
    return Resource(
        type=str(raw.get("type") or "").lower(),
        platform=str(raw.get("platform") or ""),
        size=size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None,
        sha256=sha if _SHA256.fullmatch(sha) else None,
        urls=tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (),
    )


# --- the cached index -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Index:
    """The cached index: every entry's document by id, and where and when it came from."""

    source: str
    commit: str  # the repository commit the entries are from, where known ("")
    etag: str  # the server's ETag for what was downloaded ("")
    fetched_at: str
    entries: Mapping[str, Mapping[str, Any]]

    @property
    def revision(self) -> str:
        """What pins these entries: the commit, else the ETag, else the time they were fetched."""
        if self.commit:
            return self.commit
        return f"etag {self.etag}" if self.etag else f"fetched {self.fetched_at}"

    def model(self, omdb_id: str) -> OmdbModel:
        """The entry ``omdb_id``.

        Raises:
            UnknownModelError: no such entry in this index (the message says which index).
            WeightsCorruptError: the entry is there but cannot be used as a model; the message says why.
        """
        raw = self.entries.get(omdb_id)
        if raw is None:
            fix = fetch_command(OMDB_PREFIX + omdb_id)
            raise UnknownModelError(
                f"OpenModelDB has no model {omdb_id!r} in the cached index ({self.source}, {self.revision}); check "
                f"the id on https://openmodeldb.info, and refresh the index with `{fix}`"
            )
        try:
            return parse_model(omdb_id, raw)
        except ValueError as exc:
            raise WeightsCorruptError(f"OpenModelDB entry {omdb_id!r} ({self.source}) is not usable: {exc}") from None

    def models(self) -> list[OmdbModel]:
        """Every entry that parses, by id (the others are left out)."""
        out = []
        for omdb_id in sorted(self.entries):
            try:
                out.append(parse_model(omdb_id, self.entries[omdb_id]))
            except ValueError:
                continue
        return out


_memo: dict[Path, tuple[tuple[int, int], Index]] = {}
_memo_lock = threading.Lock()


def load_index(weights_dir: Path) -> Index | None:
    """The cached index in ``weights_dir``, or None when nothing is cached. Read once per change of the file.

    Raises:
        WeightsCorruptError: the cache file cannot be read or is not what :func:`refresh` writes.
    """
    path = weights_dir / CACHE
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    with _memo_lock:
        hit = _memo.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    try:
        data = json.loads(path.read_text())
        index = Index(
            source=str(data["source"]),
            commit=str(data.get("commit", "")),
            etag=str(data.get("etag", "")),
            fetched_at=str(data["fetched_at"]),
            entries=dict(data["entries"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsCorruptError(
            f"cannot read the cached OpenModelDB index {path}: {exc}; delete it and refresh it with "
            "`upscaled models search --update`"
        ) from None
    with _memo_lock:
        _memo[path] = (stamp, index)
    return index


def refresh(weights_dir: Path, index_url: str, timeout: float = 60.0, deadline: float | None = None) -> Index:
    """Download the index from ``index_url`` (see the module docstring for its two forms) and cache it.

    The cached index's ETag goes with the request when it came from the same source: a 304 keeps it as it is.

    Raises:
        FetchError: the download failed, or was over :data:`INDEX_MAX_BYTES` or the deadline.
        WeightsCorruptError: what came is neither form, or holds no entry; the cache is left as it was.
    """
    cached = load_index(weights_dir)
    headers = {"If-None-Match": cached.etag} if cached and cached.source == index_url and cached.etag else {}
    path = weights_dir / CACHE
    path.parent.mkdir(parents=True, exist_ok=True)
    src = index_url if "://" in index_url else str(Path(index_url).expanduser())
    try:
        got = download(src, path, INDEX_MAX_BYTES, timeout, deadline or INDEX_DEADLINE_S, headers)
    except NotModified:
        assert cached is not None  # a conditional request is only sent with a cached ETag
        return cached
    try:
        if urllib.parse.urlsplit(index_url).path.lower().endswith(".json"):
            entries, commit = _read_json(got.part), ""
        else:
            entries, commit = _read_archive(got.part)
    finally:
        got.part.unlink(missing_ok=True)
    if not entries:
        raise WeightsCorruptError(f"{index_url} holds no OpenModelDB entry (no data/models/<id>.json)")
    if not commit:  # a URL that names a commit (raw.githubusercontent.com/<owner>/<repo>/<commit>/...)
        commit = next((p for p in urllib.parse.urlsplit(index_url).path.split("/") if _COMMIT.fullmatch(p)), "")
    index = Index(
        source=index_url,
        commit=commit,
        etag=got.headers.get("ETag", "") or "",
        fetched_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        entries=entries,
    )
    doc = dict(
        source=index.source,
        commit=index.commit,
        etag=index.etag,
        fetched_at=index.fetched_at,
        entries=index.entries,
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return index


def _read_json(path: Path) -> dict[str, Mapping[str, Any]]:
    """A ``{id: entry}`` document (the site's ``models.json``).

    Raises:
        WeightsCorruptError: not JSON, or not an object of objects.
    """
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:
        raise WeightsCorruptError(f"the OpenModelDB index is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WeightsCorruptError(f"the OpenModelDB index is a JSON {type(data).__name__}, not an object of entries")
    return {k: v for k, v in data.items() if isinstance(v, dict) and OMDB_ID.fullmatch(k)}


def _read_archive(path: Path) -> tuple[dict[str, Mapping[str, Any]], str]:
    """The entries of a repository archive (``data/models/<id>.json`` members, read in memory) and its commit.

    Raises:
        WeightsCorruptError: not a gzip'd tar, or one that walks past :data:`ARCHIVE_MAX_WALK` bytes.
    """
    entries: dict[str, Mapping[str, Any]] = {}
    walked = 0
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            commit = str(tar.pax_headers.get("comment", ""))
            for member in tar:
                walked += member.size
                if walked > ARCHIVE_MAX_WALK:
                    raise WeightsCorruptError(f"the OpenModelDB archive unpacks past {ARCHIVE_MAX_WALK} bytes")
                match = _MEMBER.fullmatch(member.name)
                if not (match and member.isfile() and member.size <= ENTRY_MAX_BYTES):
                    continue
                if not OMDB_ID.fullmatch(match.group(1)):
                    continue
                fh = tar.extractfile(member)
                try:
                    data = json.loads(fh.read()) if fh is not None else None
                except ValueError:
                    continue  # one broken entry does not hide the others; resolving it says it is missing
                if isinstance(data, dict):
                    entries[match.group(1)] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise WeightsCorruptError(f"the OpenModelDB index is not a gzip'd tar archive: {exc}") from None
    return entries, commit if _COMMIT.fullmatch(commit) else ""


# --- model ids -> entries ---------------------------------------------------------------------------------------------
def omdb_id(model_id: str) -> str:
    """The OpenModelDB id of an ``omdb:<id>`` model id, checked (:func:`models.catalog.omdb_entry`).

    Raises:
        UnknownModelError: not an ``omdb:`` id, or a malformed one.
    """
    if not is_omdb_model(model_id):
        raise UnknownModelError(f"{model_id!r} is not an OpenModelDB model; write omdb:<id>, e.g. omdb:4x-Nomos8kSC")
    get_entry(model_id)
    return model_id[len(OMDB_PREFIX) :]


def model_for(model_id: str, weights_dir: Path) -> tuple[OmdbModel, Index]:
    """The cached entry of an ``omdb:<id>`` model id, and the index it is from.

    Raises:
        UnknownModelError: a malformed id, or no such entry in the cached index.
        WeightsMissingError: nothing is cached yet; the message names the command that fetches it.
        WeightsCorruptError: the cache or the entry cannot be used.
    """
    name = omdb_id(model_id)
    index = load_index(weights_dir)
    if index is None:
        raise WeightsMissingError(
            f"{model_id}: no OpenModelDB index is cached in {weights_dir / CACHE.parent}; run "
            f"`{fetch_command(model_id)}` (it reads model_index_url, then fetches the model's file)"
        )
    return index.model(name), index


def resolve(model_id: str, weights_dir: Path) -> ModelEntry:
    """The catalogue-style entry of an ``omdb:<id>`` model: one spandrel file at the entry's scale, with its sha256,
    size and link (see :meth:`OmdbModel.download_choice`), pinned to the index's commit or ETag.

    Raises:
        UnknownModelError, WeightsMissingError, WeightsCorruptError: as :func:`model_for`.
        UnsupportedModelError: the entry has no file in a format spandrel loads (ONNX or NCNN only).
    """
    model, index = model_for(model_id, weights_dir)
    choice = model.download_choice()
    if choice is None:
        kinds = ", ".join(sorted({r.type or "?" for r in model.resources})) or "none"
        raise UnsupportedModelError(
            f"{model_id} has no {' or '.join(LOADABLE)} file (its resources: {kinds}); this service loads PyTorch "
            "weights through spandrel"
        )
    res, link = choice
    suffix = LOADABLE[res.type]
    wf = WeightFile(
        path=f"{FOLDER}/{res.sha256 or model.id}{suffix}",
        url=link or (res.urls[0] if res.urls else f"https://openmodeldb.info/models/{model.id}"),
        sha256=res.sha256,
        size=res.size,
        revision=index.revision,
        direct=link is not None,
    )
    return ModelEntry(
        id=model_id,
        backend="spandrel",
        arch=spandrel_arch(model.architecture) or "",
        scales=(model.scale,),
        files={model.scale: wf},
        description=f"{model.name} by {model.author or 'unknown'} ({model.architecture}, x{model.scale})",
        license=model.license or "not stated by the entry",
        source=f"https://openmodeldb.info/models/{model.id}",
    )


# --- licences and architectures ---------------------------------------------------------------------------------------
def is_noncommercial(license: str) -> bool:
    """Whether a licence forbids commercial use: an ``NC`` element (CC-BY-NC-4.0, CC-BY-NC-SA-4.0...) or the words
    non-commercial."""
    return bool(_NONCOMMERCIAL.search(license))


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(a): a for a in (*SPANDREL_ARCHES, *EXTRA_ARCHES)}


def spandrel_arch(architecture: str, known: tuple[str, ...] | set[str] = ()) -> str | None:
    """The spandrel architecture id of an OpenModelDB architecture id: an alias (:data:`ARCH_ALIASES`), else the id
    it equals once case and punctuation are ignored, among spandrel's (:data:`SPANDREL_ARCHES`,
    :data:`EXTRA_ARCHES`) and ``known`` (a newer spandrel's). None when there is none."""
    arch = architecture.lower()
    if arch in ARCH_ALIASES:
        return ARCH_ALIASES[arch]
    return {**_BY_KEY, **{_key(a): a for a in known}}.get(_key(arch))


def arch_problem(architecture: str) -> str | None:
    """Why the installed spandrel cannot load an OpenModelDB architecture, or None when it can (or when torch and
    spandrel are not installed: the backend's own start-up warning says that). Imports spandrel (and torch).

    The message names ``spandrel_extra_arches`` where installing it would help.
    """
    from models.spandrel_sr import supported_architectures

    try:
        supported, version = supported_architectures()
    except BackendUnavailableError:
        return None
    arch = spandrel_arch(architecture, tuple(supported))
    if arch in supported:
        return None
    if arch in EXTRA_ARCHES:
        return (
            f"architecture {architecture!r} ({arch}) is not in spandrel {version} itself but in its companion "
            f"package: pip install spandrel_extra_arches (mind the licences of its architectures), and it loads"
        )
    return (
        f"architecture {architecture!r} is not one that spandrel {version} loads; it loads "
        f"{', '.join(sorted(supported, key=str.lower))}"
    )


# --- search -----------------------------------------------------------------------------------------------------------
def search(
    index: Index, text: str = "", tag: str | None = None, arch: str | None = None, scale: int | None = None
) -> list[OmdbModel]:
    """The entries that match every filter, by id. ``text``: each of its words appears in the id, name, author,
    tags or description (any case); ``tag``: one of the entry's tags; ``arch``: its OpenModelDB or spandrel
    architecture (any case, punctuation ignored); ``scale``: its scale."""
    words = text.casefold().split()
    found = []
    for m in index.models():
        hay = " ".join((m.id, m.name, m.author, " ".join(m.tags), m.description)).casefold()
        if any(w not in hay for w in words):
            continue
        if tag is not None and tag.casefold() not in (t.casefold() for t in m.tags):
            continue
        if arch is not None and _key(arch) not in {_key(m.architecture), _key(spandrel_arch(m.architecture) or "")}:
            continue
        if scale is not None and m.scale != scale:
            continue
        found.append(m)
    return found


def row(model: OmdbModel) -> dict[str, Any]:
    """One line of ``upscaled models search``: id, architecture, scale, licence, size and how its file comes."""
    choice = model.download_choice()
    res = choice[0] if choice else None
    return dict(
        id=OMDB_PREFIX + model.id,
        architecture=model.architecture,
        scale=model.scale,
        license=model.license or "-",
        size_mb=round(res.size / 1e6, 2) if res and res.size else None,
        download=("direct" if choice[1] else "browser only") if choice else f"no {'/'.join(LOADABLE)} file",
    )


def details(model: OmdbModel, index: Index, weights_dir: Path) -> dict[str, Any]:
    """Everything ``upscaled models show omdb:<id>`` prints about one entry."""
    choice = model.download_choice()
    res, link = choice if choice else (None, None)
    entry = resolve(OMDB_PREFIX + model.id, weights_dir) if choice else None
    wf = entry.files[model.scale] if entry else None
    return dict(
        id=OMDB_PREFIX + model.id,
        name=model.name,
        author=model.author,
        license=model.license or "not stated",
        noncommercial=is_noncommercial(model.license),
        architecture=model.architecture,
        spandrel_architecture=spandrel_arch(model.architecture),
        scale=model.scale,
        tags=", ".join(model.tags),
        date=model.date,
        format=res.type if res else None,
        size=res.size if res else None,
        sha256=res.sha256 if res else None,
        link=link or (f"browser only: {res.urls[0]}" if res and res.urls else None),
        file=str(weights_dir / wf.path) if wf else None,
        present=bool(wf and (weights_dir / wf.path).is_file()),
        index=index.source,
        index_commit=index.commit or None,
        index_etag=index.etag or None,
        index_fetched_at=index.fetched_at,
        page=f"https://openmodeldb.info/models/{model.id}",
        description=model.description,
    )
