r"""structlog set-up: JSON lines when stdout is not a terminal (systemd, pipes), readable text when it is, unless
``log_format`` says which.

The JSON lines are for journald and log shippers: every key, as logged. The console form is for a person
(:class:`ConsoleRenderer`): the time, the level (coloured on a terminal), the event, then the job's file and the job,
then the other keys in the order they were logged; empty values left out; paths under the service's folders shown
relative to them (``outbox/photos/cat.fsrcnn.x4.png``); a multi-line message of ours (a configuration error, a
traceback) on indented lines of its own. Values may hold a stranger's file name, so every control character is
escaped (``\x1b``, ``\r``, a byte that is not UTF-8 as ``\xff``): a name cannot colour, move or fake a line of the
console.

structlog is imported only when logging is configured or first used: the CLI's quick commands (``--version``,
``history``) never pay for it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from daemon.fsops import display as printable  # the one printable form (fsops.display)

if TYPE_CHECKING:
    import structlog

# Keys the console shows before the others, in this order (the JSON keeps them all, as logged).
FIRST_KEYS = ("file", "job")
# A (key, value) the console leaves out because a later line says it better: `metrics="to come"` on job.done is
# followed by job.measured with the values.
CONSOLE_HIDES = {("metrics", "to come")}
# The keys whose line breaks the console keeps (our own messages: a configuration error, a traceback), on indented
# lines that no log line starts with; every other value (a file name above all) has its line breaks escaped.
MULTILINE_KEYS = ("error", "traceback", "note", "detail")
_LEVEL_COLOURS = {"debug": "2", "info": "32", "warning": "33", "error": "31", "critical": "1;31", "exception": "31"}


class ConsoleRenderer:
    """One event as the console shows it (see the module docstring); a structlog processor that returns a str.

    ``colours``: ANSI colour for the level (on a terminal, unless ``NO_COLOR`` is set). ``folders``: absolute
    folders (the inbox, outbox, archive, failed); a value that is a path below their common parent is shown relative
    to that parent.
    """

    def __init__(self, colours: bool = False, folders: Iterable[Path] = ()) -> None:
        self.colours = colours
        paths = [str(Path(f)) for f in folders]
        base = os.path.commonpath(paths) if paths else ""
        if base in paths:  # one folder, or one inside another: shown from its parent, so its name stays
            base = str(Path(base).parent)
        self.base = "" if base in ("", "/") else base + "/"

    def _value(self, v: Any, multiline: bool = False) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
            return ", ".join(self._value(x) for x in v) if v else "[]"
        text = str(v)
        if self.base and text.startswith(self.base):
            text = text[len(self.base) :]
        text = printable(text, keep_newlines=multiline)
        if "\n" in text:
            return "\n" + "\n".join("    " + line for line in text.splitlines())
        if text == "" or any(c in text for c in " =\"'"):
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return text

    def __call__(self, _logger: object, _name: str, event: MutableMapping[str, Any]) -> str:
        event = dict(event)
        stamp = str(event.pop("timestamp", ""))[:19].replace("T", " ")
        level = str(event.pop("level", "info"))
        name = printable(str(event.pop("event", "")))
        trace = event.pop("exception", None)
        padded = f"{level:<7}"
        if self.colours:
            padded = f"\x1b[{_LEVEL_COLOURS.get(level, '0')}m{padded}\x1b[0m"
        head = f"{stamp} {padded} {name}" if stamp else f"{padded} {name}"
        keys = [k for k in FIRST_KEYS if k in event] + [k for k in event if k not in FIRST_KEYS]
        parts: list[str] = []
        tail: list[str] = []
        for k in keys:
            v = event[k]
            if v is None or (isinstance(v, str | list | tuple | dict) and not v):
                continue
            if isinstance(v, str) and (k, v) in CONSOLE_HIDES:
                continue
            try:
                shown = self._value(v, multiline=k in MULTILINE_KEYS)
            except Exception:  # noqa: BLE001 - a value that will not format must not cost the log line
                shown = printable(repr(v))
            (tail if shown.startswith("\n") else parts).append(f"{printable(str(k))}={shown}")
        line = "  ".join([head, " ".join(parts)]) if parts else head
        if tail:
            line += "".join("\n  " + t for t in tail)
        if trace:
            line += "\n" + "\n".join("    " + printable(x) for x in str(trace).splitlines())
        return line


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, folders: Iterable[Path] = ()
) -> None:
    """Log at ``level`` to ``stream`` (default stdout: the service's journal); ``fmt`` is ``json`` (journald,
    pipes), ``console`` (a person), or ``auto`` (console on a terminal, JSON otherwise). Commands whose stdout is
    their result (``process``) log to stderr. ``folders``: the service's folders, which the console shows paths
    relative to (see :class:`ConsoleRenderer`)."""
    import structlog

    stream = stream or sys.stdout
    tty = stream.isatty()
    json = fmt == "json" or (fmt == "auto" and not tty)
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else ConsoleRenderer(colours=tty and not os.environ.get("NO_COLOR"), folders=folders)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


class _Logger:
    """``structlog.get_logger(name)``, made on first use: modules take their logger when they are imported, and the
    CLI's quick commands import them without logging anything."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._log: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._log is None:
            import structlog

            self._log = structlog.get_logger(self._name)
        return getattr(self._log, attr)


def get(name: str = "upscaled") -> structlog.typing.FilteringBoundLogger:
    """The logger ``name`` (it follows :func:`configure`, whenever that is called)."""
    return _Logger(name)  # type: ignore[return-value]
