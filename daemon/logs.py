"""structlog set-up: JSON lines when stdout is not a terminal (systemd, pipes), readable text when it is, unless
``log_format`` says which."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Log at ``level`` to ``stream`` (default stdout: the service's journal); ``fmt`` is ``json`` (journald,
    pipes), ``console`` (a person), or ``auto`` (console on a terminal, JSON otherwise). Commands whose stdout is
    their result (``process``) log to stderr."""
    stream = stream or sys.stdout
    json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
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


def get(name: str = "upscaled") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
