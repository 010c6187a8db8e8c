"""``upscaled web``: the read-only web view of the history (see :mod:`daemon.web.app` and docs/web.md).

Nothing here is imported by the daemon itself: Starlette, Jinja2 and uvicorn load only for ``upscaled web``.
"""
