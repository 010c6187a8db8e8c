"""The log format of daemon/logs.py: JSON lines for journald and pipes, readable text on a terminal (a real pty)."""

from __future__ import annotations

import io
import json
import os

import pytest

from daemon import logs


@pytest.fixture(autouse=True)
def restored():
    yield
    logs.configure("info", "console", io.StringIO())


def test_auto_is_json_lines_off_a_terminal_with_names_escaped():
    out = io.StringIO()
    logs.configure("info", "auto", out)
    logs.get().info("job.done", file="a\n\x1b]0;pwned\x07.png", job=3)
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)  # one record per line, control characters escaped by JSON itself
    assert record["event"] == "job.done" and record["file"] == "a\n\x1b]0;pwned\x07.png" and record["job"] == 3
    assert record["level"] == "info" and record["timestamp"].endswith("Z")


def test_auto_is_readable_text_on_a_terminal():
    main, side = os.openpty()
    with os.fdopen(side, "w") as tty:
        logs.configure("info", "auto", tty)
        logs.get().info("service.started", rules=2)
        tty.flush()
        text = os.read(main, 4096).decode()
    os.close(main)
    assert "service.started" in text and "rules=2" in text and not text.lstrip().startswith("{"), text


def test_the_level_filters_and_json_can_be_forced():
    out = io.StringIO()
    logs.configure("warning", "json", out)
    logs.get().info("quiet")
    logs.get().warning("loud")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["loud"]
