"""OpenModelDB models (``omdb:<id>``) end to end, without the network: a local HTTP server serves an
OpenModelDB-shaped tree (``data/models/<id>.json`` entries written here, as a repository archive and as the site's
one-file ``models.json``) and a tiny spandrel model built here, saved as ``.pth`` and ``.safetensors``, whose real
sha256 and size are in the entries. Also the overall download deadline, against a server that trickles."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.conftest import SET5, image, write_config

torch = pytest.importorskip("torch")
spandrel = pytest.importorskip("spandrel")

from daemon.cli import main  # noqa: E402
from daemon.config import load_settings  # noqa: E402
from daemon.errors import ConfigError  # noqa: E402
from daemon.service import Service  # noqa: E402
from models import omdb  # noqa: E402
from models.catalog import WeightFile  # noqa: E402
from models.errors import UnknownModelError, UnsupportedModelError, WeightsMissingError  # noqa: E402
from models.registry import LoadContext, ModelCache  # noqa: E402
from models.testing import compact_state  # noqa: E402
from models.weights import fetch, fetch_file, sha256_file, verify  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- the served tree ------------------------------------------------------------------------------------------------
class Handler(http.server.SimpleHTTPRequestHandler):
    """Files with an ETag (a 304 for a matching If-None-Match); ``/slow/N`` trickles N bytes, one every 0.2 s."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.server.seen.append((self.path, self.headers.get("If-None-Match")))
        if self.path.startswith("/slow/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            try:
                for _ in range(n):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client gave up: what the deadline is for
                pass
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(body)


class Server:
    def __init__(self, root: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.seen = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def seen(self) -> list[tuple[str, str | None]]:
        return self.httpd.seen

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _entry(arch: str, scale: int, licence: str, resources: list[dict], tags: list[str], text: str) -> dict:
    return {
        "name": text.split(":")[0],
        "author": ["someone", "helper"],
        "license": licence,
        "tags": tags,
        "description": text,
        "date": "2026-01-01",
        "architecture": arch,
        "size": None,
        "scale": scale,
        "inputChannels": 3,
        "outputChannels": 3,
        "resources": resources,
    }


def _res(kind: str, path: Path | None, urls: list[str], sha: str | None = None, size: int | None = None) -> dict:
    return {
        "platform": "onnx" if kind == "onnx" else "pytorch",
        "type": kind,
        "size": size if size is not None else (path.stat().st_size if path else 1000),
        "sha256": sha or (sha256_file(path) if path else "f" * 64),
        "urls": urls,
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    """The served folder: a tiny Compact x2 model (.pth, .safetensors), entries, their archive and models.json."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("omdb")
    files = root / "files"
    files.mkdir()
    sd = compact_state(scale=2, num_feat=8, num_conv=2)
    torch.save(sd, files / "2x-tiny.pth")
    save_file(dict(sd), files / "2x-tiny.safetensors")
    (files / "2x-tiny.onnx").write_bytes(b"not a model spandrel reads")
    server = Server(root)
    f = f"{server.url}/files"
    pth, st = files / "2x-tiny.pth", files / "2x-tiny.safetensors"
    mega = "https://mega.nz/folder/abcdEFGH#someKey"
    entries = {
        # An ONNX resource first, and a Mega link before the direct one: the first direct pth is used.
        "2x-TinyCompact": _entry(
            "compact",
            2,
            "CC-BY-4.0",
            [_res("onnx", files / "2x-tiny.onnx", [f"{f}/2x-tiny.onnx"]), _res("pth", pth, [mega, f"{f}/2x-tiny.pth"])],
            ["photo", "general-upscaler"],
            "TinyCompact: a tiny compact model for photos",
        ),
        "2x-TinyCompact-ST": _entry(
            "compact", 2, "MIT", [_res("safetensors", st, [f"{f}/2x-tiny.safetensors"])], ["anime"], "TinyST: anime"
        ),
        "2x-WrongHash": _entry(
            "compact", 2, "MIT", [_res("pth", pth, [f"{f}/2x-tiny.pth"], sha="0" * 64)], ["photo"], "WrongHash: bad"
        ),
        "2x-SizeLie": _entry(
            "compact", 2, "MIT", [_res("pth", pth, [f"{f}/2x-tiny.pth"], size=1000)], ["photo"], "SizeLie: bad"
        ),
        "2x-MegaOnly": _entry("compact", 2, "CC0-1.0", [_res("pth", pth, [mega])], ["photo"], "MegaOnly: browser"),
        "2x-NonCommercial": _entry(
            "compact", 2, "CC-BY-NC-SA-4.0", [_res("pth", pth, [f"{f}/2x-tiny.pth"])], ["photo"], "NC: licence"
        ),
        "2x-SRFormerThing": _entry(
            "srformer", 2, "MIT", [_res("pth", pth, [f"{f}/2x-tiny.pth"])], ["photo"], "SRFormer: extra arches"
        ),
        "2x-VideoThing": _entry("rife", 2, "MIT", [_res("pth", pth, [f"{f}/2x-tiny.pth"])], ["video"], "RIFE: video"),
        "4x-OnnxOnly": _entry(
            "span", 4, "MIT", [_res("onnx", files / "2x-tiny.onnx", [f"{f}/2x-tiny.onnx"])], ["photo"], "Onnx: only"
        ),
    }
    data = root / "repo" / "data" / "models"
    data.mkdir(parents=True)
    for name, doc in entries.items():
        (data / f"{name}.json").write_text(json.dumps(doc, indent=4))
    (data / "broken.json").write_text("{ not json")  # one broken entry hides no other
    # GitHub's archive: a top folder, the commit in the pax header, the site's code beside the data.
    with tarfile.open(root / "main.tar.gz", "w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": COMMIT}) as tar:
        tar.add(root / "repo" / "data", arcname="open-model-database-main/data")
        readme = b"# the site's code would be here\n"
        info = tarfile.TarInfo("open-model-database-main/README.md")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    (root / "api" / "v1").mkdir(parents=True)
    (root / "api" / "v1" / "models.json").write_text(json.dumps(entries))
    yield dict(
        server=server,
        archive=f"{server.url}/main.tar.gz",
        site=f"{server.url}/api/v1/models.json",
        pth=pth,
        st=st,
        root=root,
    )
    server.stop()


def config(folder: Path, weights: Path, tree: dict, rules: list[dict]) -> Path:
    return write_config(folder, weights, rules, model_index_url=tree["archive"])


# --- fetch and verify -----------------------------------------------------------------------------------------------
def test_fetch_verifies_the_first_direct_file_in_each_format_and_both_load(tmp_path, tree):
    w = tmp_path / "w"
    ids = ["omdb:2x-TinyCompact", "omdb:2x-TinyCompact-ST"]
    reports = fetch(w, ids, index_url=tree["archive"])
    assert [r.status for r in reports] == ["fetched", "fetched"], reports
    pth = w / "omdb" / f"{sha256_file(tree['pth'])}.pth"
    st = w / "omdb" / f"{sha256_file(tree['st'])}.safetensors"
    assert [r.path for r in reports] == [f"omdb/{pth.name}", f"omdb/{st.name}"]
    assert pth.read_bytes() == tree["pth"].read_bytes() and st.read_bytes() == tree["st"].read_bytes()
    assert reports[0].detail.endswith("/files/2x-tiny.pth")  # not the ONNX file, not the Mega link before it
    index = omdb.load_index(w)
    assert index.commit == COMMIT and index.source == tree["archive"] and "broken" not in index.entries
    assert {r.status for r in verify(w, ids)} == {"present"}
    assert [r.status for r in fetch(w, ids, index_url=tree["archive"])] == ["present", "present"]
    entry = omdb.resolve("omdb:2x-TinyCompact", w)
    assert (entry.arch, entry.scales, entry.license) == ("Compact", (2,), "CC-BY-4.0")
    assert entry.files[2].revision == COMMIT and entry.files[2].size == tree["pth"].stat().st_size
    # Both formats hold the same weights: the same pixels through the service's loader.
    rgb = np.random.default_rng(0).random((24, 20, 3), dtype=np.float32)
    outs = [ModelCache().get(mid, 2, LoadContext(w, "cpu"))[0](rgb) for mid in ids]
    assert outs[0].shape == (48, 40, 3) and np.array_equal(outs[0], outs[1])
    with pytest.raises(UnsupportedModelError, match="no pth or safetensors file"):
        omdb.resolve("omdb:4x-OnnxOnly", w)
    with pytest.raises(UnknownModelError, match="no model 'Nope'.*" + COMMIT):
        omdb.resolve("omdb:Nope", w)
    with pytest.raises(UnknownModelError, match="not an OpenModelDB id"):
        fetch(w, ["omdb:../etc/passwd"], index_url=tree["archive"])


def test_a_wrong_sha256_and_a_size_lie_are_refused_and_leave_nothing(tmp_path, tree):
    w = tmp_path / "w"
    wrong, lie = fetch(w, ["omdb:2x-WrongHash", "omdb:2x-SizeLie"], index_url=tree["archive"])
    assert wrong.status == "failed" and "does not match the expected " + "0" * 64 in wrong.detail
    assert lie.status == "failed" and "but 1000 bytes are stated" in lie.detail
    assert not list((w / "omdb").glob("*.pth")) and not list(w.rglob("*.part"))


def test_a_browser_only_entry_is_reported_then_taken_from_a_hand_placed_file_or_a_mirror(tmp_path, tree):
    w = tmp_path / "w"
    (report,) = fetch(w, ["omdb:2x-MegaOnly"], index_url=tree["archive"])
    name = f"{sha256_file(tree['pth'])}.pth"
    assert report.status == "failed" and "needs a browser" in report.detail and "https://mega.nz/" in report.detail
    assert str(w / "omdb" / name) in report.detail and not (w / "omdb" / name).exists()
    # Put where the report says, by hand: checked, and present.
    (w / "omdb" / name).write_bytes(tree["pth"].read_bytes())
    assert [r.status for r in fetch(w, ["omdb:2x-MegaOnly"], index_url=tree["archive"])] == ["present"]
    # A mirror laid out by sha256 serves it too, and is held to the hash like any source.
    mirror = tmp_path / "mirror" / "omdb"
    mirror.mkdir(parents=True)
    (mirror / name).write_bytes(tree["pth"].read_bytes())
    w2 = tmp_path / "w2"
    (got,) = fetch(w2, ["omdb:2x-MegaOnly"], mirror=str(mirror.parent), index_url=tree["archive"])
    assert got.status == "fetched" and got.detail == str(mirror / name)
    (mirror / name).write_bytes(b"a mirror's junk")
    (bad,) = fetch(tmp_path / "w3", ["omdb:2x-MegaOnly"], mirror=str(mirror.parent), index_url=tree["archive"])
    assert bad.status == "failed" and "does not match" in bad.detail


# --- start-up checks: licence, architecture, scale --------------------------------------------------------------------
def test_a_noncommercial_licence_stops_start_up_without_the_rule_flag(tmp_path, tree):
    w = tmp_path / "w"
    fetch(w, ["omdb:2x-NonCommercial"], index_url=tree["archive"])
    rule = {"folder": "", "model": "omdb:2x-NonCommercial", "scale": 2}
    with pytest.raises(ConfigError, match=r"rules\[0\].model: .*CC-BY-NC-SA-4.0.*allow_noncommercial = true"):
        load_settings(config(tmp_path, w, tree, [rule]))
    s = load_settings(config(tmp_path, w, tree, [{**rule, "allow_noncommercial": True}]))
    assert s.rules[0].allow_noncommercial
    # Consent is not an output setting: it leaves the fingerprint (and the finished jobs) as they were.
    assert s.rules[0].fingerprint() == s.rules[0].model_copy(update={"allow_noncommercial": False}).fingerprint()
    # The readers (and `weights fetch`) still load a configuration start-up would refuse.
    assert load_settings(config(tmp_path, w, tree, [rule]), check_paths=False).rules[0].model == rule["model"]


def test_check_config_reports_an_unsupported_architecture_and_names_spandrel_extra_arches(tmp_path, tree):
    w = tmp_path / "w"
    fetch(w, ["omdb:2x-SRFormerThing", "omdb:2x-VideoThing", "omdb:2x-TinyCompact"], index_url=tree["archive"])
    rules = [
        {"folder": "a", "model": "omdb:2x-SRFormerThing", "scale": 2},
        {"folder": "b", "model": "omdb:2x-VideoThing", "scale": 2},
    ]
    res = CliRunner().invoke(main, ["--config", str(config(tmp_path, w, tree, rules)), "check-config"])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    (srformer,) = [x for x in lines if "rules[0].model" in x]
    (video,) = [x for x in lines if "rules[1].model" in x]
    assert "'srformer' (SRFormer)" in srformer and "pip install spandrel_extra_arches" in srformer
    assert "'rife' is not one that spandrel" in video and "spandrel_extra_arches" not in video
    ok = [{"folder": "", "model": "omdb:2x-TinyCompact", "scale": 2}]
    res = CliRunner().invoke(main, ["--config", str(config(tmp_path, w, tree, ok)), "check-config"])
    assert res.exit_code == 0, res.output
    assert "(default): omdb:2x-TinyCompact x2 upscale" in res.output and "licence CC-BY-4.0" in res.output
    assert "weights present" in res.output


def test_the_rule_scale_must_be_the_model_scale_or_outscale_takes_the_rest(tmp_path, tree):
    w = tmp_path / "w"
    fetch(w, ["omdb:2x-TinyCompact"], index_url=tree["archive"])
    rule = {"folder": "", "model": "omdb:2x-TinyCompact", "scale": 4}
    with pytest.raises(ConfigError, match=r"is a x2 model.*scale = 4; set scale = 2 \(and outscale = 4"):
        load_settings(config(tmp_path, w, tree, [rule]))
    s = load_settings(config(tmp_path, w, tree, [{**rule, "scale": 2, "outscale": 4}]))
    assert s.rules[0].final_scale == 4
    with pytest.raises(ConfigError, match="no OpenModelDB index is cached.*weights fetch omdb:2x-TinyCompact`"):
        load_settings(config(tmp_path, tmp_path / "empty", tree, [{**rule, "scale": 2}]))
    with pytest.raises(WeightsMissingError, match="no OpenModelDB index is cached"):  # and a job says the same
        ModelCache().get("omdb:2x-TinyCompact", 2, LoadContext(tmp_path / "empty"))


# --- offline, and one job through the daemon ------------------------------------------------------------------------
def test_the_cache_is_used_offline_and_a_job_runs_through_the_daemon(tmp_path, tree):
    w = tmp_path / "w"
    stale = Server(tree["root"])  # a server of its own, to take down
    url = f"{stale.url}/main.tar.gz"
    assert [r.status for r in fetch(w, ["omdb:2x-TinyCompact"], index_url=url)] == ["fetched"]
    assert [r.status for r in fetch(w, ["omdb:2x-TinyCompact"], index_url=url)] == ["present"]
    assert stale.seen[-1] == ("/main.tar.gz", omdb.load_index(w).etag)  # the refresh was conditional: a 304
    stale.stop()
    (again,) = fetch(w, ["omdb:2x-TinyCompact"], index_url=url)
    assert again.status == "present" and "could not refresh the OpenModelDB index" in again.detail
    assert "using the cached index of " in again.detail
    cfg = write_config(tmp_path, w, [{"folder": "", "model": "omdb:2x-TinyCompact", "scale": 2}], model_index_url=url)
    svc = Service(load_settings(cfg))
    svc.start()
    try:
        image(svc.settings.inbox / "photo.png", (40, 32))
        svc.admit([PurePosixPath("photo.png")])
        assert svc.step()
        job = svc.store.row(1)
    finally:
        svc.shutdown()
    assert job["state"] == "done", job
    assert (job["model_id"], job["backend"]) == ("omdb:2x-TinyCompact", "spandrel")
    out = Path(job["output_path"])
    assert out.name == "photo.2x-TinyCompact.x2.png" and Image.open(out).size == (80, 64)


# --- the index: both forms, and search -----------------------------------------------------------------------------
def test_the_site_form_index_gives_the_same_entries_with_its_etag(tmp_path, tree):
    w = tmp_path / "w"
    site = omdb.refresh(w, tree["site"])
    assert site.commit == "" and site.etag and site.revision == f"etag {site.etag}"
    archive = omdb.refresh(tmp_path / "w2", tree["archive"])
    assert set(site.entries) == set(archive.entries)
    assert omdb.refresh(w, tree["site"]) == site  # not modified: the cache stands


def test_models_search_filters_and_show(tmp_path, tree):
    w = tmp_path / "w"
    cfg = config(tmp_path, w, tree, [])
    runner = CliRunner()

    def search(*args: str) -> list[str]:
        res = runner.invoke(main, ["--config", str(cfg), "models", "search", *args, "--format", "json"])
        assert res.exit_code == 0, res.output
        return [r["id"] for r in json.loads(res.output)]

    assert search("tiny") == ["omdb:2x-TinyCompact", "omdb:2x-TinyCompact-ST"]  # no index yet: fetched first
    assert search("--tag", "anime") == ["omdb:2x-TinyCompact-ST"]
    assert search("--arch", "rife") == ["omdb:2x-VideoThing"]
    assert search("--scale", "4") == ["omdb:4x-OnnxOnly"]
    assert search("tiny", "--arch", "Compact", "--tag", "photo") == ["omdb:2x-TinyCompact"]
    assert search("no-such-words") == []
    res = runner.invoke(main, ["--config", str(cfg), "models", "search", "mega", "--format", "json"])
    (row,) = json.loads(res.output)
    assert row["download"] == "browser only" and row["license"] == "CC0-1.0" and row["architecture"] == "compact"
    res = runner.invoke(main, ["--config", str(cfg), "models", "show", "omdb:2x-NonCommercial", "--format", "json"])
    (shown,) = json.loads(res.output)
    assert shown["noncommercial"] is True and shown["sha256"] == sha256_file(tree["pth"]) and not shown["present"]
    assert shown["index_commit"] == COMMIT and shown["link"].endswith("/files/2x-tiny.pth")
    res = runner.invoke(main, ["--config", str(cfg), "models", "show", "fsrcnn"])
    assert res.exit_code == 1 and "'fsrcnn' is not an OpenModelDB model" in res.output


# --- the frontier -----------------------------------------------------------------------------------------------------
def test_bench_frontier_runs_an_omdb_entry_beside_bicubic(tmp_path, tree):
    w = tmp_path / "w"
    fetch(w, ["omdb:2x-TinyCompact"], index_url=tree["archive"])
    data = tmp_path / "set"
    data.mkdir()
    src = SET5 / "HR" / "baby.png"
    if not src.exists():
        pytest.skip(f"Set5 is not at {SET5}")
    Image.open(src).convert("RGB").crop((200, 200, 264, 264)).save(data / "crop.png")
    cfg = config(tmp_path, w, tree, [])
    args = ["--config", str(cfg), "bench", "--dataset", str(data), "--models", "bicubic,omdb:2x-TinyCompact"]
    res = CliRunner().invoke(main, [*args, "--scales", "2", "--no-brisque", "--frontier", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["model"]: r for r in json.loads(res.output[res.output.index("[") :])}
    assert set(rows) == {"bicubic", "omdb:2x-TinyCompact"}
    tiny, bicubic = rows["omdb:2x-TinyCompact"], rows["bicubic"]
    assert bicubic["frontier"] and bicubic["gain_db"] == 0.0
    # Random weights: worse than bicubic and slower, so bicubic beats it on both.
    assert tiny["psnr_y"] < bicubic["psnr_y"] and not tiny["frontier"] and tiny["beaten_by"] == "bicubic"


# --- the download deadline -------------------------------------------------------------------------------------------
def test_a_source_that_trickles_is_stopped_at_the_overall_deadline(tmp_path, tree):
    """40 bytes at one every 0.2 s: each read comes well within the socket timeout, so only the deadline stops it."""
    wf = WeightFile(path="opencv/slow.pb", url=f"{tree['server'].url}/slow/40", sha256="0" * 64, size=40)
    t0 = time.monotonic()
    r = fetch_file(tmp_path, "slow", wf, None, timeout=5.0, deadline=1.0)
    took = time.monotonic() - t0
    assert r.status == "failed" and "not done after 1 s" in r.detail, r
    assert took < 3.0, took
    assert not list(tmp_path.rglob("*.part")) and not (tmp_path / wf.path).exists()
