"""The systemd notify protocol, spoken directly: one datagram per message to ``$NOTIFY_SOCKET``.

``READY=1`` once the service can work, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` while the worker
makes progress, ``STOPPING=1`` on SIGTERM. An address starting with ``@`` is in the abstract namespace. Without
``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket


def clean(text: str) -> str:
    """``text`` as one printable line for a ``STATUS=`` value.

    A file name is written by whoever drops it: a newline in it would start a second notify command
    (``WATCHDOG=trigger``, ``STOPPING=1``), so control characters are escaped (``\\n``), and bytes that are not
    UTF-8 are shown as ``\\xNN``.
    """
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if addr.startswith("@"):
            self.address = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_seconds: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1_000_000
        self._sock: socket.socket | None = None
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram. Returns False (and counts) when it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:
            self.failures += 1
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={clean(status)}"] if status else []), f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={clean(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={clean(status)}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
