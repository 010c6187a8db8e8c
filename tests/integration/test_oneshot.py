"""``upscaled process`` (daemon/oneshot.py) in process, over a real SQLite history: what makes a run a new job.

The same file under the same rule into the same ``--out`` is done once ("skipped" after), unless ``--force``; into
another ``--out`` it is another job, since the output folder is part of what the run means. The input stays where it
is either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Rule, load_settings
from daemon.oneshot import process
from tests.conftest import image, write_config

RULE = Rule(model="nearest", scale=2, metrics=[])


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings(write_config(tmp_path))


def test_the_same_file_is_skipped_then_forced_and_another_out_folder_is_another_job(settings, tmp_path):
    src = image(tmp_path / "mine" / "a.png", (12, 10))
    before = src.read_bytes()
    (first,) = process(settings, [src], RULE, tmp_path / "out1")
    assert first["state"] == "done" and Path(first["output"]).parent == tmp_path / "out1", first
    (again,) = process(settings, [src], RULE, tmp_path / "out1")
    assert again["state"] == "skipped" and again["job"] == first["job"], again
    assert "use --force to redo" in again["error"]
    (forced,) = process(settings, [src], RULE, tmp_path / "out1", force=True)
    assert forced["state"] == "done" and forced["job"] == first["job"], (
        f"--force must redo the job, not skip it: {forced}"
    )
    (other,) = process(settings, [src], RULE, tmp_path / "out2")
    assert other["state"] == "done" and other["job"] != first["job"], (
        f"the same file into another --out folder is another job, not a skip of the first: {other}"
    )
    assert Path(other["output"]).parent == tmp_path / "out2" and Path(other["output"]).exists()
    assert src.read_bytes() == before  # the input never moves
