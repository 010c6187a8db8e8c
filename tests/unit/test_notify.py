"""The systemd notify protocol (daemon/notify.py) over a real datagram socket, read back as systemd reads it.

A file name is written by whoever drops it into the inbox, and it goes into ``STATUS=``: a newline in it must not
start a second command (``WATCHDOG=trigger``, ``STOPPING=1``) in the datagram.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from daemon.notify import Notifier


@pytest.fixture
def systemd(tmp_path: Path):
    """A socket where systemd would listen, and a notifier pointed at it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    yield notifier, sock
    notifier.close()
    sock.close()


def commands(sock: socket.socket) -> list[str]:
    """One datagram as systemd parses it: one ``KEY=value`` command per line."""
    return sock.recv(65536).decode().split("\n")


def test_a_name_with_a_newline_is_one_status_line_not_three_commands(systemd):
    notifier, sock = systemd
    name = "a\nWATCHDOG=trigger\nSTOPPING=1\x1b]0;pwned\x07" + os.fsdecode(b"\xff") + ".png"
    assert notifier.status(f"working on {name}")
    got = commands(sock)
    assert got == ["STATUS=working on a\\nWATCHDOG=trigger\\nSTOPPING=1\\x1b]0;pwned\\x07\\xff.png"], got
    assert notifier.stopping(f"stopping; finishing {name}")
    got = commands(sock)
    assert got[0] == "STOPPING=1" and len(got) == 2 and got[1].startswith("STATUS=stopping"), got


def test_ready_watchdog_and_the_abstract_namespace(systemd, tmp_path):
    notifier, sock = systemd
    assert notifier.watchdog_seconds == 2.0 and notifier.enabled
    assert notifier.ready("idle")
    assert commands(sock) == ["READY=1", "STATUS=idle", f"MAINPID={os.getpid()}"]
    assert notifier.watchdog() and commands(sock) == ["WATCHDOG=1"]
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(b"\0upscaled-test-" + str(os.getpid()).encode())
    abstract.settimeout(5)
    try:
        other = Notifier({"NOTIFY_SOCKET": "@upscaled-test-" + str(os.getpid())})
        assert other.status("x") and commands(abstract) == ["STATUS=x"]
        other.close()
    finally:
        abstract.close()
    assert not Notifier({}).enabled and not Notifier({}).status("x")  # not under systemd: nothing to do
    assert Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_seconds is None  # another process's
