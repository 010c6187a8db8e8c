"""`upscaled process` on files in folders whose names hold a newline or a byte that is not UTF-8: the job reads its
input through the folder it opened, whatever the name's printable form says, and ends done (it stayed `running`
forever when the worker rebuilt the folder from that printable form)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, image, rows, write_config


@pytest.mark.parametrize("folder", [b"two\nlines", b"latin\xe9-1", b"tab\there"], ids=["newline", "not-utf8", "tab"])
def test_process_runs_a_file_in_a_folder_with_an_odd_name_to_done(tmp_path, folder):
    cfg = write_config(tmp_path)
    where = Path(os.fsdecode(bytes(tmp_path) + b"/" + folder))
    src = image(where / "in.png", (24, 16))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "--config",
            str(cfg),
            "process",
            str(src),
            "--model",
            "bicubic",
            "--scale",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--format",
            "json",
        ],
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    (report,) = json.loads(res.stdout)
    assert report["state"] == "done", report
    (job,) = rows(tmp_path / "var" / "upscaled.db", "SELECT state, output_path FROM jobs")
    assert job["state"] == "done" and Path(job["output_path"]).is_file(), job
