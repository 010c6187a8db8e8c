"""A real PostgreSQL server for the tests: ``initdb`` into a temp folder, ``pg_ctl start`` on 127.0.0.1.

``$UPSCALED_TEST_POSTGRES`` (a SQLAlchemy URL without a database name, such as
``postgresql+psycopg://postgres@127.0.0.1:5432``) uses a server that is already running instead. Otherwise the
server binaries are looked up on PATH and in /usr/lib/postgresql/*/bin; without them the tests that need the server
skip and say why. initdb refuses to run as root, so as root the server runs as ``nobody``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoServer(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


@contextmanager
def running_server() -> Iterator[str]:
    """Start a throw-away PostgreSQL server; yields its base URL (no database name) and stops it afterwards.

    Raises:
        NoServer: initdb or pg_ctl cannot be found.
        subprocess.CalledProcessError: initdb or the start failed (the server log is in the message).
    """
    bindir = _bindir()
    if bindir is None:
        raise NoServer("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    root = Path(tempfile.mkdtemp(prefix="upscaled-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        os.chown(root, 65534, 65534)
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if shutil.which("setpriv") \
            else ["runuser", "-u", "nobody", "--"]
    data, port = root / "data", _free_port()
    run = dict(check=True, capture_output=True, text=True, cwd=root)
    try:
        try:
            subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                            "-E", "UTF8", "--no-sync"], **run)
            # fsync off: a test server need not survive a power cut, and the 2-core CI box is shared.
            opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                            "-w", "-t", "60", "start"], **run)
        except subprocess.CalledProcessError as exc:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            exc.stderr = f"{exc.stderr}\n{log}"
            raise
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server: str) -> str:
    """A new empty database on ``server``; returns its URL."""
    from sqlalchemy import create_engine, text

    name = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {name}"))
    finally:
        admin.dispose()
    return f"{server}/{name}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The base URL of a running PostgreSQL server (no database name)."""
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'upscaled[postgres]'")
    external = os.environ.get("UPSCALED_TEST_POSTGRES")
    if external:
        yield external.rstrip("/")
        return
    try:
        with running_server() as url:
            yield url
    except NoServer as exc:
        pytest.skip(str(exc))
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"could not start PostgreSQL: {exc.stderr}")


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database on the test server; dropped afterwards."""
    from sqlalchemy import create_engine, text

    url = create_database(pg_server)
    name = url.rsplit("/", 1)[1]
    admin = create_engine(f"{pg_server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
