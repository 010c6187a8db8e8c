"""The CLI's one output path (daemon/cli.py ``render``): table, CSV and JSON of rows that hold strangers' names.

File names come from whoever writes into the inbox; ``upscaled history`` prints them. A name must never drive the
terminal (an escape sequence can retitle or clear it) nor break a row in two: table and CSV escape every control
character and show bytes that are not UTF-8 as ``\\xNN``; JSON escapes them itself.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from daemon.cli import render

HOSTILE = "a\nWATCHDOG=trigger\x1b]0;pwned\x07\r\t\u202egnp." + os.fsdecode(b"\xff") + ".png"
ROWS = [{"id": 1, "file": HOSTILE, "state": "done"}, {"id": 2, "file": "plain.png", "state": "failed"}]


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_table_and_csv_escape_every_control_character_one_row_per_line(fmt):
    out = render(ROWS, fmt)
    for raw in ("\x1b", "\x07", "\r", "\t", "\u202e"):
        assert raw not in out, f"{fmt} printed {raw!r} raw"
    lines = out.splitlines()
    assert len(lines) == (4 if fmt == "table" else 3), lines  # header (+ rule), one line per row
    shown = "a\\nWATCHDOG=trigger\\x1b]0;pwned\\x07\\r\\t\\u202egnp.\\xff.png"
    if fmt == "csv":
        assert list(csv.reader(io.StringIO(out)))[1] == ["1", shown, "done"]
    else:
        assert shown[:40] in lines[2], lines[2]  # a table cell is cut at 60 characters


def test_json_keeps_the_name_and_escapes_it_itself():
    out = render(ROWS, "json")
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert json.loads(out) == ROWS  # the exact name, escaped by JSON (\u001b, \n, \udcff), read back whole
