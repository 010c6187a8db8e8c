"""Running the web view: bind the socket ourselves (so port 0 and IPv6 work and the real address is known), then hand
it to uvicorn."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.errors import ConfigError
from daemon.telemetry import allowed_hosts_for, parse_listen

if TYPE_CHECKING:
    from daemon.hints import Hints

DEFAULT_LISTEN = "127.0.0.1:8080"


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on ``listen`` (``host:port``, ``[::1]:port``; a port alone, ``8081``, is
    ``127.0.0.1:8081``: loopback, as by default; port 0: any free port).

    Raises:
        ConfigError: not ``host:port``, or the address cannot be bound; the message names ``--listen``.
    """
    if listen.isascii() and listen.isdigit():
        listen = f"127.0.0.1:{listen}"
    try:
        host, port = parse_listen(listen, key="--listen", default_port=8080)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # [::] means both families
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"--listen: cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    database_url: str,
    listen: str = DEFAULT_LISTEN,
    cache_dir: Path | None = None,
    allowed_hosts: tuple[str, ...] = (),
    root_path: str = "",
    log_level: str = "info",
    access_log: bool = False,
    hints: Hints | None = None,
) -> None:
    """Serve the web view on ``listen`` until SIGINT or SIGTERM. Prints ``upscaled web: http://HOST:PORT/`` (the
    bound address) on stderr once it listens.

    Raises:
        ConfigError: ``listen`` cannot be used. QueryError: the database cannot be read (see :func:`create_app`).
    """
    import uvicorn

    from daemon.web.app import create_app

    sock = bind(listen)
    host, port = sock.getsockname()[:2]
    app = create_app(
        database_url, cache_dir=cache_dir, allowed_hosts=allowed_hosts_for(host, allowed_hosts), hints=hints
    )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"upscaled web: http://{shown}:{port}{root_path.rstrip('/')}/ (database opened read-only)",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        server_header=False,
        proxy_headers=False,
        root_path=root_path.rstrip("/"),
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
