"""fsops.display: the one printable form of a stranger's file name (logs, STATUS=, the job row, the CLI)."""

from __future__ import annotations

import os

from daemon.cli import printable
from daemon.fsops import display


def test_every_character_a_terminal_acts_on_is_escaped():
    name = os.fsdecode(b"a\x1b[2Jb\n\t\xe2\x80\xaec\xff.png")  # an escape, a newline, a tab, U+202E, a bad byte
    assert display(name) == "a\\x1b[2Jb\\n\\t\\u202ec\\xff.png"
    assert display("plain name.png") == "plain name.png"


def test_our_own_line_breaks_can_be_kept_and_nothing_makes_it_raise():
    assert display("line one\nline \x07two", keep_newlines=True) == "line one\nline \\x07two"
    assert display("\ud800") == "\\ud800"  # a lone surrogate that no file name holds: escaped, not an error


def test_the_cli_prints_with_the_same_function():
    assert printable is display
