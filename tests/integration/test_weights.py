"""Fetching weights from a folder mirror and an HTTP mirror, with sha256 checks and trust on first use."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from models.catalog import CATALOG, WeightFile
from models.errors import WeightsCorruptError
from models.registry import LoadContext, ModelCache
from models.weights import RECORDED, fetch, fetch_file, sha256_file, verify
from tests.conftest import MIRROR, ROOT


@pytest.fixture
def http_mirror(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a copy of the mirror."""
    root = tmp_path / "served"
    shutil.copytree(MIRROR, root)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_from_a_folder_mirror_checks_sha_and_is_idempotent(tmp_path):
    reports = fetch(tmp_path, ["espcn"], mirror=str(MIRROR))
    assert [r.status for r in reports] == ["fetched"] * 3
    for wf in CATALOG["espcn"].weight_files():
        assert sha256_file(tmp_path / wf.path) == wf.sha256
    assert [r.status for r in fetch(tmp_path, ["espcn"], mirror=str(MIRROR))] == ["present"] * 3
    assert not list(tmp_path.rglob("*.part"))


def test_fetch_over_http_and_a_tampered_mirror_is_refused(tmp_path, http_mirror):
    root, url = http_mirror
    dest = tmp_path / "w"
    assert {r.status for r in fetch(dest, ["fsrcnn-small"], mirror=url)} == {"fetched"}
    # Tamper with one file on the server: the download must be refused and leave nothing behind.
    (root / "opencv" / "LapSRN_x2.pb").write_bytes(b"not the real weights")
    reports = fetch(dest, ["lapsrn"], mirror=url)
    by_path = {r.path: r for r in reports}
    bad = by_path["opencv/LapSRN_x2.pb"]
    assert bad.status == "failed" and "does not match" in bad.detail
    assert not (dest / "opencv" / "LapSRN_x2.pb").exists() and not list(dest.rglob("*.part"))
    assert by_path["opencv/LapSRN_x4.pb"].status == "fetched"
    missing = fetch(dest, ["edsr"], mirror=url)  # not on the mirror: a clear failure, no crash
    assert all(r.status == "failed" and "404" in r.detail for r in missing)


def test_unknown_hash_is_recorded_on_first_download_then_enforced(tmp_path):
    src = tmp_path / "mirror" / "opencv"
    src.mkdir(parents=True)
    (src / "thing.pb").write_bytes(b"first version")
    wf = WeightFile(path="opencv/thing.pb", url="https://example.invalid/thing.pb", sha256=None)
    dest = tmp_path / "w"
    r = fetch_file(dest, "thing", wf, str(tmp_path / "mirror"))
    assert r.status == "recorded" and "recorded" in r.detail
    assert RECORDED in {p.name for p in dest.iterdir()}
    (src / "thing.pb").write_bytes(b"changed upstream")
    r2 = fetch_file(dest, "thing", wf, str(tmp_path / "mirror"), force=True)
    assert r2.status == "failed" and "does not match" in r2.detail
    assert (dest / "opencv" / "thing.pb").read_bytes() == b"first version"


def test_verify_and_load_refuse_corrupted_weights(tmp_path):
    fetch(tmp_path, ["fsrcnn"], mirror=str(MIRROR))
    (tmp_path / "opencv" / "FSRCNN_x3.pb").write_bytes(b"garbage")
    status = {r.path: r.status for r in verify(tmp_path, ["fsrcnn", "espcn"])}
    assert status["opencv/FSRCNN_x2.pb"] == "present"
    assert status["opencv/FSRCNN_x3.pb"] == "mismatch"
    assert status["opencv/ESPCN_x2.pb"] == "missing"
    with pytest.raises(WeightsCorruptError, match="expected efd38655"):
        ModelCache().get("fsrcnn", 3, LoadContext(tmp_path))


def test_weights_cli_fetch_and_verify(tmp_path):
    cfg = tmp_path / "settings.toml"
    cfg.write_text('weights_dir = "w"\n')
    run = functools.partial(subprocess.run, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    res = run([sys.executable, "-m", "daemon", "--config", str(cfg), "weights", "fetch", "espcn", "brisque",
               "--mirror", str(MIRROR), "--format", "json"])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "w" / "quality" / "brisque_model_live.yml").is_file()
    res = run([sys.executable, "-m", "daemon", "--config", str(cfg), "weights", "fetch", "--all",
               "--mirror", str(MIRROR)])
    assert res.returncode == 1 and "edsr" in res.stdout  # EDSR is not on the mirror: reported, exit 1
    res = run([sys.executable, "-m", "daemon", "--config", str(cfg), "weights", "verify"])
    assert res.returncode == 0 and "missing" in res.stdout
    (tmp_path / "w" / "opencv" / "ESPCN_x2.pb").write_bytes(b"x")
    res = run([sys.executable, "-m", "daemon", "--config", str(cfg), "weights", "verify"])
    assert res.returncode == 1 and "mismatch" in res.stdout
    assert not any(p.suffix in (".pb", ".pth") for p in ROOT.joinpath("weights").glob("**/*") if p.is_file()
                   and p.stat().st_size and _tracked(p)), "weight files must never be committed"


def _tracked(path: Path) -> bool:
    res = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT, capture_output=True)
    return res.returncode == 0
