"""`upscaled bench`: the published Set5 figures, skipped pairs, the history, the dataset layouts, the JSON schema."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from bench.run import BenchError, BenchSettings, Progress, downscale, read_dataset, run_bench
from daemon import migrations
from daemon.config import Rule
from daemon.history import history, stats
from daemon.jobs import JobSpec
from daemon.store import SqlStore
from tests.conftest import ROOT, SET5, rows, write_config

SCHEMA = ROOT / "docs" / "bench-json-schema.json"
pytestmark = pytest.mark.skipif(not (SET5 / "HR").is_dir(), reason=f"Set5 is not at {SET5}")

# Mean PSNR-Y on Set5. Bicubic: the papers' figures. The OpenCV models: ../shared/README.md, LR from LR_bicubic.
PAPERS_BICUBIC = {2: 33.66, 3: 30.39, 4: 28.42}
SHARED_README = {
    ("fsrcnn", 2): 34.85,
    ("fsrcnn", 3): 30.59,
    ("fsrcnn", 4): 28.41,
    ("espcn", 2): 34.76,
    ("espcn", 3): 30.53,
    ("espcn", 4): 28.38,
    ("lapsrn", 2): 34.48,
    ("lapsrn", 4): 28.75,
}
# The same README, on LR made with cv2.resize(INTER_CUBIC), the kernel these .pb models were trained on.
SHARED_README_CV2 = {
    ("fsrcnn", 2): 35.73,
    ("fsrcnn", 3): 30.60,
    ("fsrcnn", 4): 28.48,
    ("espcn", 2): 35.91,
    ("espcn", 3): 30.62,
    ("espcn", 4): 28.54,
}
MODELS = ("bicubic", "fsrcnn", "espcn", "lapsrn")


def quiet() -> Progress:
    return Progress(1, stream=io.StringIO())


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, weights_dir):
    """Set5 with its shipped LR_bicubic images, recorded in a real store, with two pairs that cannot run."""
    db = tmp_path_factory.mktemp("bench") / "h.db"
    store = SqlStore(f"sqlite:///{db}")
    try:
        result = run_bench(
            BenchSettings(
                dataset=SET5,
                models=(*MODELS, "edsr", "no-such-model"),
                scales=(2, 3, 4),
                weights_dir=weights_dir,
                downscale="shipped",
            ),
            store,
            quiet(),
        )
    finally:
        store.close()
    return result, db


def by_pair(result) -> dict[tuple[str, int], dict]:
    return {(r["model"], r["scale"]): r for r in result.summary}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_matches_the_papers_on_shipped_lr(shipped, scale):
    row = by_pair(shipped[0])[("bicubic", scale)]
    assert row["status"] == "ok" and row["images"] == 5 and row["lr"] == f"shipped:LR_bicubic/X{scale}"
    assert abs(row["psnr_y"] - PAPERS_BICUBIC[scale]) <= 0.05, row["psnr_y"]


@pytest.mark.parametrize(("model", "scale"), list(SHARED_README))
def test_opencv_models_match_the_shared_readme_on_shipped_lr(shipped, model, scale):
    row = by_pair(shipped[0])[(model, scale)]
    assert row["status"] == "ok" and row["images"] == 5
    assert abs(row["psnr_y"] - SHARED_README[(model, scale)]) <= 0.05, row["psnr_y"]


def test_every_metric_and_time_is_there(shipped):
    result, _ = shipped
    for r in (r for r in result.summary if r["status"] == "ok"):
        assert 0.5 < r["ssim_y"] < 1 and 0.5 < r["ssim_rgb"] < 1 and r["psnr_rgb"] < r["psnr_y"]
        assert r["mse_rgb"] > 0 and r["brisque"] is not None and r["load_s"] > 0
        assert 0 < r["s_per_image"] and 0 < r["s_per_mp"] and r["device"] == "cpu"
    # MSE and PSNR on RGB are one measurement: each image's pair must agree
    for img in result.images:
        assert img["psnr_rgb"] == pytest.approx(10 * np.log10(255**2 / img["mse_rgb"]), abs=1e-9)
    # one summary row per model and scale, in the order asked for
    assert [(r["model"], r["scale"]) for r in result.summary] == [
        (m, s) for m in (*MODELS, "edsr", "no-such-model") for s in (2, 3, 4)
    ]


def test_pairs_that_cannot_run_are_skipped_with_the_reason(shipped):
    pairs = by_pair(shipped[0])
    assert pairs[("lapsrn", 3)]["status"] == "skipped"
    assert pairs[("lapsrn", 3)]["reason"].startswith("unsupported-scale: lapsrn cannot upscale x3")
    for s in (2, 3, 4):
        assert pairs[("edsr", s)]["status"] == "skipped" and pairs[("edsr", s)]["reason"].startswith("weights-missing")
        assert pairs[("no-such-model", s)]["reason"].startswith("unknown-model: unknown model 'no-such-model'")
        assert pairs[("no-such-model", s)]["psnr_y"] is None and pairs[("no-such-model", s)]["images"] == 0


def test_the_run_is_in_the_history(shipped):
    result, db = shipped
    runs = rows(db, "SELECT * FROM bench_runs")
    assert len(runs) == 1 and runs[0]["id"] == result.run_id
    settings = json.loads(runs[0]["settings"])
    assert settings["downscale"] == "shipped" and settings["scales"] == [2, 3, 4] and len(settings["images"]) == 5
    jobs = rows(db, "SELECT * FROM jobs")
    ran = sum(r["images"] for r in result.summary)
    assert len(jobs) == ran == 5 * 11
    assert all(j["source"] == "bench" and j["bench_run_id"] == result.run_id and j["state"] == "done" for j in jobs)
    # the stored metrics are the reported ones, with their protocol
    m = rows(
        db,
        "SELECT j.model_id, j.scale, m.value, m.shave, m.space FROM metrics m JOIN jobs j ON j.id = m.job_id "
        "WHERE m.name = 'psnr_y'",
    )
    fsrcnn2 = [r for r in m if r["model_id"] == "fsrcnn" and r["scale"] == 2]
    assert all(r["shave"] == 2 and r["space"] == "y-bt601" for r in fsrcnn2)
    assert np.mean([r["value"] for r in fsrcnn2]) == pytest.approx(by_pair(result)[("fsrcnn", 2)]["psnr_y"])
    # what `upscaled history` and `upscaled stats` read
    store = SqlStore(f"sqlite:///{db}")
    try:
        assert len(history(store.engine, model="espcn", limit=100)) == 15
        st = {(r["model"], r["scale"]): r for r in stats(store.engine)}
        assert st[("lapsrn", 4.0)]["done"] == 5 and st[("lapsrn", 4.0)]["mean_psnr_y"] == pytest.approx(
            by_pair(result)[("lapsrn", 4)]["psnr_y"]
        )
    finally:
        store.close()


def test_json_document_validates_against_the_schema(shipped):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = json.loads(json.dumps(shipped[0].to_json()))
    jsonschema.validate(doc, schema)
    # the schema is not a rubber stamp: a skipped row without its reason, or a bad status, is refused
    broken = json.loads(json.dumps(doc))
    next(r for r in broken["results"] if r["status"] == "skipped")["reason"] = None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(doc))
    broken["results"][0]["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.fixture(scope="module")
def own_lr(weights_dir):
    """Set5 with LR images made by our MATLAB-style downscale instead of the shipped ones."""
    return run_bench(
        BenchSettings(
            dataset=SET5,
            models=MODELS,
            scales=(2, 3, 4),
            weights_dir=weights_dir,
            downscale="matlab-bicubic",
            brisque=False,
        ),
        None,
        quiet(),
    )


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_matches_the_papers_with_our_downscale(own_lr, scale):
    row = by_pair(own_lr)[("bicubic", scale)]
    assert row["lr"] == "matlab-bicubic" and row["brisque"] is None
    assert abs(row["psnr_y"] - PAPERS_BICUBIC[scale]) <= 0.05, row["psnr_y"]


@pytest.mark.parametrize(("model", "scale"), list(SHARED_README))
def test_opencv_models_match_the_shared_readme_with_our_downscale(own_lr, model, scale):
    row = by_pair(own_lr)[(model, scale)]
    assert abs(row["psnr_y"] - SHARED_README[(model, scale)]) <= 0.1, row["psnr_y"]


def test_cv2_cubic_lr_changes_the_figures_as_the_shared_readme_says(weights_dir):
    result = run_bench(
        BenchSettings(
            dataset=SET5,
            models=("fsrcnn", "espcn"),
            scales=(2, 3, 4),
            weights_dir=weights_dir,
            downscale="cv2-cubic",
            brisque=False,
        ),
        None,
        quiet(),
    )
    for (model, scale), published in SHARED_README_CV2.items():
        row = by_pair(result)[(model, scale)]
        assert row["lr"] == "cv2-cubic" and abs(row["psnr_y"] - published) <= 0.1, (model, scale, row["psnr_y"])


# --- the command line -----------------------------------------------------------------------------------------------
def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cfg.parent,
    )


@pytest.fixture(scope="module")
def hr_only(tmp_path_factory, weights_dir) -> tuple[Path, Path]:
    """An HR-only dataset folder (two Set5 images, no LR) and a configuration with its own database."""
    tmp = tmp_path_factory.mktemp("cli-bench")
    data = tmp / "photos"
    data.mkdir()
    for name in ("bird.png", "head.png"):
        (data / name).write_bytes((SET5 / "HR" / name).read_bytes())
    return data, write_config(tmp, weights=weights_dir)


def test_cli_json_validates_and_lands_in_the_history(hr_only):
    jsonschema = pytest.importorskip("jsonschema")
    data, cfg = hr_only
    res = cli(
        cfg,
        "bench",
        "--dataset",
        str(data),
        "--models",
        "bicubic,fsrcnn,ditn-real-x9",
        "--scales",
        "2,3",
        "--format",
        "json",
        "--no-brisque",
        "--repeat",
        "2",
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # progress went to stderr: stdout is the document alone
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert doc["settings"]["lr_sources"] == {"2": "matlab-bicubic", "3": "matlab-bicubic"}
    assert [(r["model"], r["scale"], r["status"]) for r in doc["results"]] == [
        ("bicubic", 2, "ok"),
        ("bicubic", 3, "ok"),
        ("fsrcnn", 2, "ok"),
        ("fsrcnn", 3, "ok"),
        ("ditn-real-x9", 2, "skipped"),
        ("ditn-real-x9", 3, "skipped"),
    ]
    assert len(doc["images"]) == 8 and all(i["brisque"] is None for i in doc["images"])
    assert "bench 8/8:" in res.stderr and "skipping ditn-real-x9 x2: unknown-model" in res.stderr  # not a TTY: lines
    hist = json.loads(cli(cfg, "history", "--model", "fsrcnn", "--format", "json").stdout)
    assert len(hist) == 4 and {h["folder"] for h in hist} == {"(bench)"} and all(h["psnr_y"] for h in hist)
    q = json.loads(
        cli(
            cfg,
            "query",
            "SELECT r.id, COUNT(j.id) AS n FROM bench_runs r JOIN jobs j ON j.bench_run_id = r.id GROUP BY r.id",
            "--format",
            "json",
        ).stdout
    )
    assert q == [{"id": doc["run_id"], "n": 8}]


def test_cli_table_and_csv_have_one_row_per_model_and_scale(hr_only):
    data, cfg = hr_only
    table = cli(cfg, "bench", "--dataset", str(data), "--models", "bicubic,lapsrn", "--scales", "3,4", "--no-brisque")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "scale", "lr", "status"] and len(lines) == 2 + 4
    assert "unsupported-scale" in next(line for line in lines if line.startswith("lapsrn") and " 3 " in line)
    res = cli(
        cfg,
        "bench",
        "--dataset",
        str(data),
        "--models",
        "bicubic",
        "--scales",
        "2",
        "--format",
        "csv",
        "--downscale",
        "area",
        "--no-brisque",
    )
    parsed = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(parsed) == 1 and parsed[0]["lr"] == "area" and float(parsed[0]["psnr_y"]) > 20


def test_cli_refuses_bad_options_clearly(hr_only):
    data, cfg = hr_only
    res = cli(cfg, "bench", "--dataset", str(data), "--scales", "2,x")
    assert res.returncode == 2 and "comma-separated integers" in res.stderr
    res = cli(cfg, "bench", "--dataset", str(data), "--scales", "1")
    assert res.returncode == 1 and "at least 2" in res.stderr
    res = cli(cfg, "bench", "--dataset", str(data), "--downscale", "shipped")
    assert res.returncode == 1 and "LR_bicubic/X2 lacks an LR image" in res.stderr


def test_a_schema_1_database_gets_the_bench_column(tmp_path):
    """A database made before bench runs existed: opening the store adds jobs.bench_run_id and bench_runs."""
    import sqlite3

    # The jobs table as schema 2 made it (frozen: the live `jobs` Table has grown since), less bench_run_id.
    frozen = (Path(__file__).parents[1] / "data" / "schema_v2_sqlite.sql").read_text()
    ddl = re.search(r"CREATE TABLE jobs \(.*?\n\);", frozen, re.S).group(0).rstrip(";")
    old = re.sub(
        r",\s*FOREIGN KEY\(bench_run_id\) REFERENCES bench_runs \(id\)",
        "",
        re.sub(r"\n\s*bench_run_id INTEGER,", "", ddl),
    )
    assert "bench_run_id" not in old
    db = tmp_path / "v1.db"
    con = sqlite3.connect(db)
    con.execute(old)
    con.execute("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.commit()
    con.close()
    store = SqlStore(f"sqlite:///{db}")
    try:
        (reg,) = store.register(
            [
                JobSpec(
                    sha="a" * 64,
                    rule=Rule(model="bicubic", mode="benchmark"),
                    rel=PurePosixPath("x.png"),
                    input_path="/x.png",
                    source="bench",
                    folder="(bench)",
                    fingerprint="f" * 16,
                )
            ]
        )
        assert store.get(reg.job.id).bench_run_id is None
    finally:
        store.close()
    newest = str(int(migrations.head()))
    assert rows(db, "SELECT value FROM meta WHERE key = 'schema_version'") == [{"value": newest}]
    assert rows(db, "SELECT COUNT(*) AS n FROM bench_runs") == [{"n": 0}]


# --- datasets, kernels, progress ------------------------------------------------------------------------------------
def test_set5_layout_pairs_img_00n_with_the_nth_hr_file():
    ds = read_dataset(SET5)
    assert [im.name for im in ds.images] == [f"HR/{n}.png" for n in ("baby", "bird", "butterfly", "head", "woman")]
    assert ds.images[3].lr_paths[3].name == "img_004_SRF_3_LR.png"
    assert ds.shipped(2) and ds.shipped(4) and not ds.shipped(8)


def _png(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_lr_files_are_found_by_name_and_checked_for_size(tmp_path, weights_dir):
    _png(tmp_path / "HR" / "0801.png", 41, 30)
    _png(tmp_path / "HR" / "0802.png", 40, 30, 1)
    _png(tmp_path / "LR_bicubic" / "X2" / "0801x2.png", 20, 15)
    _png(tmp_path / "LR_bicubic" / "X2" / "0802x2.png", 20, 14)  # wrong: 40x30 / 2 is 20x15
    ds = read_dataset(tmp_path)
    assert ds.images[0].lr_paths[2].name == "0801x2.png" and ds.images[1].lr_paths[2].name == "0802x2.png"
    with pytest.raises(BenchError, match=r"0802x2.png is 20x14, expected 20x15"):
        run_bench(
            BenchSettings(dataset=tmp_path, models=("bicubic",), scales=(2,), weights_dir=weights_dir, brisque=False),
            None,
            quiet(),
        )


def test_empty_or_missing_dataset_is_an_error(tmp_path):
    with pytest.raises(BenchError, match="no images"):
        read_dataset(tmp_path)
    with pytest.raises(BenchError, match="is not a folder"):
        read_dataset(tmp_path / "nope")


def test_downscale_kernels_differ_and_matlab_reproduces_the_shipped_lr():
    hr = np.asarray(Image.open(SET5 / "HR" / "bird.png").convert("RGB"), np.float32) / 255.0
    shipped = np.asarray(Image.open(SET5 / "LR_bicubic" / "X3" / "img_002_SRF_3_LR.png").convert("RGB"))
    ours = {k: np.rint(downscale(hr[:288, :288], 3, k, 8) * 255) for k in ("matlab-bicubic", "cv2-cubic", "area")}
    assert np.mean(np.abs(ours["matlab-bicubic"] - shipped)) < 0.05
    assert np.mean(np.abs(ours["cv2-cubic"] - shipped)) > 0.5 and np.mean(np.abs(ours["area"] - shipped)) > 0.5
    with pytest.raises(BenchError, match="must be one of"):
        downscale(hr, 2, "lanczos", 8)


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    tty, plain = io.StringIO(), io.StringIO()
    bar, lines = Progress(4, stream=tty, tty=True, width=8), Progress(4, stream=plain, tty=False)
    for p in (bar, lines):
        p.step("a x2 one.png")
        p.step("a x2 two.png")
        p.close()
    assert "\r[####....] 2/4" in tty.getvalue() and tty.getvalue().count("\n") == 1
    assert plain.getvalue().splitlines() == ["bench 1/4: a x2 one.png", "bench 2/4: a x2 two.png"]


def test_an_image_too_small_to_measure_fails_its_own_jobs_only(tmp_path, weights_dir):
    """At x4 the metrics need 19 HR pixels per side (a 4 px shave on each border, then SSIM's 11x11 window): a
    40x16 image fails its jobs with the reason, the other image runs, and the run goes on."""
    _png(tmp_path / "data" / "a.png", 64, 48)
    _png(tmp_path / "data" / "b.png", 40, 16, 1)
    store = SqlStore(f"sqlite:///{tmp_path / 'h.db'}")
    try:
        result = run_bench(
            BenchSettings(
                dataset=tmp_path / "data",
                models=("bicubic", "fsrcnn"),
                scales=(4,),
                weights_dir=weights_dir,
                brisque=False,
            ),
            store,
            quiet(),
        )
    finally:
        store.close()
    for model in ("bicubic", "fsrcnn"):
        row = by_pair(result)[(model, 4)]
        assert (row["status"], row["images"], row["failed"]) == ("partial", 1, 1) and row["psnr_y"] is not None
    assert [cs.image for cs in result.crops] == ["a.png"] and len(result.crops[0].tiles) == 4
    failed = rows(
        tmp_path / "h.db",
        "SELECT model_id, rel_path, error_kind, error FROM jobs WHERE state = 'failed' ORDER BY model_id",
    )
    assert [(f["model_id"], f["rel_path"], f["error_kind"]) for f in failed] == [
        ("bicubic", "b.png", "too-small"),
        ("fsrcnn", "b.png", "too-small"),
    ]
    assert "at x4 the metrics need at least 19 px per side" in failed[0]["error"]
