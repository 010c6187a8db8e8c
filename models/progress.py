"""Progress reporting from inside a model call, without threading a callback through every backend.

The caller (the worker) sets a sink with :func:`reporting`; tiled backends call :func:`report` after each tile.
A context variable keeps it per thread, so several workers never see each other's progress.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Sink = Callable[[int, int, str], None]  # (done, total, unit): unit is "tile", "step", ...

_sink: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("upscaled_progress", default=None)


@contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def report(done: int, total: int, unit: str = "tile") -> None:
    """Tell the caller that ``done`` of ``total`` ``unit``s are finished (a no-op when nobody listens)."""
    sink = _sink.get()
    if sink is not None:
        sink(done, total, unit)
