"""The CLI: process, history, stats, query, models, in every output format; and the docs cover every command."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from daemon.cli import main
from tests.conftest import ROOT, image, rows, write_config


def cli(cfg: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cfg.parent,
    )
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def populated(tmp_path_factory, weights_dir):
    """A history made by `upscaled process`: two models, one bad file."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_config(tmp, weights=weights_dir)
    a = image(tmp / "in" / "a.png", (40, 30))
    b = image(tmp / "in" / "b.jpg", (40, 30), seed=1)
    (tmp / "in" / "bad.png").write_text("not an image")
    out = cli(
        cfg, "process", str(a), str(b), "--model", "fsrcnn", "--scale", "2", "--out", str(tmp / "o"), "--format", "json"
    )
    reports = json.loads(out.stdout)
    assert [r["state"] for r in reports] == ["done", "done"] and all("brisque" in r for r in reports)
    bad = cli(cfg, "process", str(tmp / "in" / "bad.png"), "--model", "bicubic", "--out", str(tmp / "o"), ok=False)
    assert bad.returncode == 1 and "decode" in bad.stdout
    cli(cfg, "process", str(a), "--model", "bicubic", "--scale", "3", "--mode", "benchmark", "--out", str(tmp / "o"))
    return tmp, cfg


def test_process_writes_outputs_and_leaves_inputs(populated):
    tmp, cfg = populated
    assert (tmp / "in" / "a.png").exists() and (tmp / "o" / "a.fsrcnn.x2.png").exists()
    assert (tmp / "o" / "b.fsrcnn.x2.jpg").exists()
    again = cli(
        cfg,
        "process",
        str(tmp / "in" / "a.png"),
        "--model",
        "fsrcnn",
        "--scale",
        "2",
        "--out",
        str(tmp / "o"),
        "--format",
        "json",
    )
    assert json.loads(again.stdout)[0]["state"] == "skipped"  # recorded already: not done twice
    assert not (tmp / "o" / "a.fsrcnn.x2-1.png").exists()


def test_history_in_three_formats_and_filters(populated):
    _, cfg = populated
    data = json.loads(cli(cfg, "history", "--format", "json").stdout)
    assert len(data) == 4 and {d["state"] for d in data} == {"done", "failed"}
    assert {"id", "file", "model", "total_s", "psnr_y", "brisque", "created_at", "error"} <= set(data[0])
    table = cli(cfg, "history").stdout
    assert table.splitlines()[0].split()[:3] == ["id", "state", "folder"] and "fsrcnn" in table
    parsed = list(csv.DictReader(io.StringIO(cli(cfg, "history", "--format", "csv", "--model", "fsrcnn").stdout)))
    assert len(parsed) == 2 and all(r["model"] == "fsrcnn" for r in parsed)
    failed = json.loads(cli(cfg, "history", "--status", "failed", "--format", "json").stdout)
    assert len(failed) == 1 and failed[0]["error_kind"] == "decode"
    assert json.loads(cli(cfg, "history", "--since", "1h", "--format", "json", "--limit", "1").stdout)[0]["id"] == 4
    bad = cli(cfg, "history", "--since", "yesterday-ish", ok=False)
    assert bad.returncode != 0 and "--since expects" in bad.stderr


def test_stats_groups_and_percentiles(populated):
    _, cfg = populated
    data = json.loads(cli(cfg, "stats", "--format", "json").stdout)
    fsrcnn = next(d for d in data if d["model"] == "fsrcnn")
    assert fsrcnn["jobs"] == 2 and fsrcnn["done"] == 2 and fsrcnn["failed"] == 0
    assert 0 < fsrcnn["p50_s"] <= fsrcnn["p95_s"] and fsrcnn["mean_brisque"] is not None
    bench = next(d for d in data if d["mode"] == "benchmark")
    assert bench["mean_psnr_y"] > 15


def test_query_is_read_only_and_takes_parameters(populated):
    tmp, cfg = populated
    out = json.loads(
        cli(
            cfg,
            "query",
            "SELECT model_id, count(*) AS n FROM jobs WHERE state = :s GROUP BY 1 ORDER BY 1",
            "-p",
            "s",
            "done",
            "--format",
            "json",
        ).stdout
    )
    assert out == [{"model_id": "bicubic", "n": 1}, {"model_id": "fsrcnn", "n": 2}]
    views = json.loads(cli(cfg, "query", "SELECT * FROM model_summary", "--format", "json").stdout)
    assert {v["model_id"] for v in views} == {"fsrcnn", "bicubic"}
    for sql in ("DELETE FROM jobs", "DROP TABLE metrics", "UPDATE jobs SET state = 'x'"):
        res = cli(cfg, "query", sql, ok=False)
        assert res.returncode != 0 and "readonly" in res.stderr.replace("read-only", "readonly")
    assert len(rows(tmp / "var" / "upscaled.db", "SELECT id FROM jobs")) == 4


def test_models_lists_the_catalogue_with_weights_status(populated):
    _, cfg = populated
    data = {m["id"]: m for m in json.loads(cli(cfg, "models", "--format", "json").stdout)}
    assert data["fsrcnn"]["weights"] == "present" and data["edsr"]["weights"] == "missing"
    assert data["bicubic"]["scales"] == "any" and data["lapsrn"]["scales"] == "x2,x4,x8"


def _commands(group: click.Group, prefix: str = "") -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        out += _commands(cmd, full + " ") if isinstance(cmd, click.Group) else [full]
    return out


def test_every_command_is_documented_with_an_example():
    commands = (ROOT / "docs" / "commands.md").read_text()
    for name in _commands(main):
        assert re.search(rf"upscaled {re.escape(name)}\b", commands), f"docs/commands.md lacks `upscaled {name}`"
        cmd = main
        for part in name.split():
            cmd = cmd.commands[part]
        assert "Example:" in (cmd.help or ""), f"`{name}` help has no Example:"
