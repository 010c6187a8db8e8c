"""The command line a newcomer types in the first hour (issue 22), run as real subprocesses.

Tables that fit a real terminal (a pseudo-terminal of 100 columns), labelled sizes, UTC times, only the columns
the jobs have; the figures of `stats` and what they mean; `query`'s refusals in words; `process`'s reasons whole;
`report` into the state folder; unknown configuration keys with a suggestion and a line; and the imports each
command pays for.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, image, rows, write_config

WIDTH = 100


def cli(cfg: Path, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cfg.parent,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    if ok is not None:
        assert (res.returncode == 0) is ok, (args, res.stdout, res.stderr)
    return res


def on_terminal(cfg: Path, *args: str, columns: int = WIDTH) -> str:
    """The output of `upscaled ARGS` with stdout on a pseudo-terminal of ``columns`` columns."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(cfg), *args],
        stdout=slave,
        stderr=subprocess.PIPE,
        cwd=cfg.parent,
        env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS=str(columns), LINES="40"),
    )
    os.close(slave)
    out = b""
    while True:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(60)
    os.close(master)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return out.decode().replace("\r\n", "\n")


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A history of `upscaled process`: an upscale job with a final scale of 1.5, a benchmark job, a bad file."""
    tmp = tmp_path_factory.mktemp("first-hour-cli")
    cfg = write_config(tmp)
    a = image(tmp / "in" / "a-photo-with-a-rather-long-name-that-will-not-fit-a-terminal.png", (48, 40))
    b = image(tmp / "in" / "b.png", (48, 40), seed=1)
    (tmp / "in" / "broken.png").write_bytes(a.read_bytes()[:200])
    cli(cfg, "process", str(a), "--model", "bicubic", "--scale", "2", "--outscale", "1.5", "--out", str(tmp / "o"))
    cli(cfg, "process", str(b), "--model", "bicubic", "--scale", "3", "--mode", "benchmark", "--out", str(tmp / "o"))
    cli(cfg, "process", str(tmp / "in" / "broken.png"), "--model", "bicubic", "--out", str(tmp / "o"), ok=False)
    return tmp, cfg


def test_history_fits_the_terminal_and_shows_what_each_job_has(history):
    tmp, cfg = history
    table = on_terminal(cfg, "history")
    lines = table.rstrip("\n").split("\n")
    assert len(lines) == 5 and all(len(line) <= WIDTH for line in lines), [len(x) for x in lines]
    header = lines[0].split()
    assert header[:5] == ["id", "state", "folder", "file", "model"] and "result" in header
    assert "in -> out" in lines[0] and "created (UTC)" in lines[0]
    assert "psnr_y" not in lines[0] and "output_path" not in lines[0]  # a column per metric no more
    bench = next(line for line in lines if " b.png " in line)
    assert re.search(r"  psnr_y \d+\.\d", bench), table  # the benchmark job's main metric, in its result
    upscale = next(line for line in lines if " a-photo" in line)
    assert "lr_psnr_y" in upscale and "psnr_y" not in upscale.replace("lr_psnr_y", ""), table
    broken = next(line for line in lines if " broken.png " in line)
    assert re.search(r"  (decode|bad-image|too-small)", broken), table
    # Piped, the same table keeps whole lines: the long name is there in full.
    piped = cli(cfg, "history").stdout
    assert "a-photo-with-a-rather-long-name-that-will-not-fit-a-terminal.png" in piped and "…" not in piped
    assert "48x40 -> 72x60" in piped and "LR" not in piped  # in -> out, labelled (the x1.5 job)
    data = {r["state"]: r for r in json.loads(cli(cfg, "history", "--format", "json").stdout)}
    assert data["failed"]["output_path"] is None  # never written, so not shown
    assert Path(data["done"]["output_path"]).exists()
    assert data["done"]["created_at"].endswith("+00:00")  # UTC, said in the value
    assert data["failed"]["folder"] == "(cli)"


def test_models_fits_the_terminal(tmp_path):
    cfg = write_config(tmp_path)
    lines = on_terminal(cfg, "models").rstrip("\n").split("\n")
    assert len(lines) > 10 and all(len(line) <= WIDTH for line in lines), max(len(x) for x in lines)
    assert "…" in "".join(lines)  # the descriptions are cut, the ids are not
    assert any(line.startswith("realesrgan") or line.startswith("fsrcnn ") for line in lines)


def test_stats_figures_say_what_they_are(history):
    _, cfg = history
    helptext = cli(cfg, "stats", "--help").stdout
    assert re.search(r"--model TEXT\s+Only this model id", helptext)
    assert re.search(r"--folder TEXT\s+Only this rule folder", helptext)
    assert "p50_infer_s" in helptext and "s_per_image" in helptext and "lower is better" in helptext
    data = json.loads(cli(cfg, "stats", "--format", "json").stdout)
    up = next(r for r in data if r["mode"] == "upscale" and r["done"])
    assert (up["scale"], up["outscale"]) == (2.0, 1.5)
    assert 0 < up["p50_infer_s"] <= up["p50_s"]
    # model_summary's scale is the model's native scale too: the two agree.
    summary = json.loads(
        cli(cfg, "query", "SELECT * FROM model_summary WHERE mode = 'upscale'", "--format", "json").stdout
    )
    assert 2.0 in {r["scale"] for r in summary}


def test_query_says_it_is_read_only_and_names_a_missing_parameter(history):
    tmp, cfg = history
    res = cli(cfg, "query", "delete from jobs", ok=False)
    assert "query is read-only" in res.stderr and "Traceback" not in res.stderr
    res = cli(cfg, "query", "SELECT * FROM jobs WHERE id = :job", ok=False)
    assert "the query names :job: give a value with -p job VALUE" in res.stderr
    assert "sqlalche.me" not in res.stderr and "Background on this error" not in res.stderr
    res = cli(cfg, "query", "SELECT 1 AS one", "-p", "jbo", "3", ok=False)
    assert "-p jbo: the query has no such :parameter" in res.stderr
    assert len(rows(tmp / "var" / "upscaled.db", "SELECT id FROM jobs")) == 3


def test_process_says_why_whole(history):
    tmp, cfg = history
    b = next((tmp / "in").glob("b.png"))
    res = cli(
        cfg, "process", str(b), "--model", "bicubic", "--scale", "3", "--mode", "benchmark", "--out", str(tmp / "o")
    )
    assert f"{b}: skipped: already processed with this rule and --out (use --force to redo)" in res.stdout


def test_report_goes_to_the_state_folder_and_says_where(history):
    tmp, cfg = history
    res = cli(cfg, "report")
    path = tmp / "var" / "upscaled-report.html"
    assert res.stdout.startswith(f"{path}: 3 jobs") and path.stat().st_size > 1000
    assert not (tmp / "upscaled-report.html").exists()  # not into the folder it was run from


def test_an_unknown_key_gets_its_line_and_the_keys_it_is_close_to(tmp_path):
    cfg = write_config(tmp_path, rules=[{"folder": "p", "model": "bicubic", "scale": 2}])
    text = cfg.read_text().replace("settle_seconds", "settle_secnds").replace('model = "bicubic"', 'modle = "bicubic"')
    cfg.write_text(text)
    res = cli(cfg, "check-config", ok=False)
    lines = text.splitlines()
    settle = lines.index(next(x for x in lines if x.startswith("settle_secnds"))) + 1
    modle = lines.index(next(x for x in lines if x.startswith("modle"))) + 1
    assert f"{cfg}, line {settle}: settle_secnds: unknown key (did you mean `settle_seconds`" in res.stderr
    assert f"{cfg}, line {modle}: rules[0].modle: unknown key (did you mean `mode` or `model`?)" in res.stderr


def _imported(cfg: Path, *args: str) -> set[str]:
    """The modules `upscaled ARGS` imports, from Python's own -X importtime report."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "daemon", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cfg.parent,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}


def test_quick_commands_import_only_what_they_need(history):
    """What `benchmarks/cli_start.py` times, held here as the imports behind it: `--version` and `--help` load no
    configuration, database or image library; `history` no image library, no scipy and no migration tool."""
    _, cfg = history
    heavy = {"cv2", "numpy", "scipy", "skimage", "torch", "sqlalchemy", "pydantic", "structlog", "alembic"}
    for args in (["--version"], ["--help"]):
        found = _imported(cfg, *args)
        assert not heavy & found and "daemon.config" not in found, (args, sorted(heavy & found))
    found = _imported(cfg, "history")
    assert "daemon.history" in found and not {"cv2", "scipy", "skimage", "torch", "alembic", "PIL"} & found, sorted(
        {"cv2", "scipy", "skimage", "torch", "alembic", "PIL"} & found
    )


def test_bench_names_the_real_device_and_its_figures_agree_with_stats(tmp_path, weights_dir):
    """`bench` on `device = "auto"`: its run, jobs and report name the device it ran on. Its s_per_image is the
    model's own time, the same figure as `stats`' p50_infer_s of its jobs (one image, one run: equal), not their
    total. A model below bicubic is explained in the report."""
    from models.devices import resolve_auto
    from tests.conftest import SET5

    data = tmp_path / "set"
    data.mkdir()
    (data / "bird.png").write_bytes((SET5 / "HR" / "bird.png").read_bytes())
    cfg = write_config(tmp_path, weights=weights_dir)
    report = tmp_path / "bench.html"
    args = ("bench", "--dataset", str(data), "--models", "nearest,bicubic,fsrcnn", "--scales", "4", "--no-brisque")
    doc = json.loads(cli(cfg, *args, "--report", str(report), "--format", "json").stdout)
    device = resolve_auto("auto")
    assert doc["settings"]["device"] == device and {r["device"] for r in doc["results"]} == {device}
    html = report.read_text()
    assert f"device <code>{device}</code>" in html and '"device": "auto"' not in html
    assert "Below bicubic" in html and "nearest" in html and "a plainer interpolation than bicubic" in html
    fsrcnn = next(r for r in doc["results"] if r["model"] == "fsrcnn")
    bicubic = next(r for r in doc["results"] if r["model"] == "bicubic")
    if fsrcnn["psnr_y"] < bicubic["psnr_y"]:
        assert "were trained on LR images made with OpenCV" in html
    runs = json.loads(cli(cfg, "query", "SELECT settings FROM bench_runs", "--format", "json").stdout)
    assert json.loads(runs[0]["settings"])["device"] == device
    st = {r["model"]: r for r in json.loads(cli(cfg, "stats", "--source", "bench", "--format", "json").stdout)}
    for model in ("bicubic", "fsrcnn"):
        bench_row = next(r for r in doc["results"] if r["model"] == model)
        assert st[model]["p50_infer_s"] == pytest.approx(bench_row["s_per_image"], rel=1e-9)
        assert st[model]["p50_s"] > st[model]["p50_infer_s"]  # the job total holds more than the model
