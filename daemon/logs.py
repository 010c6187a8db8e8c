"""structlog set-up: JSON lines when stdout is not a terminal (systemd, pipes), readable text when it is, unless
``log_format`` says which."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Log at ``level``; ``fmt`` is ``json`` (journald, pipes), ``console`` (a person), or ``auto`` (console on a
    terminal, JSON otherwise)."""
    json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(name: str = "upscaled") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
