"""PostgreSQL for the tests: fixtures for a server (started by tests/pgserver.py) and a fresh database per test.

``$UPSCALED_TEST_POSTGRES`` (a SQLAlchemy URL without a database name, such as
``postgresql+psycopg://postgres@127.0.0.1:5432``) uses a server that is already running instead; ``.ci/run`` sets
it. Without server binaries the tests that need the server skip and say why.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.pgserver import NoServer, running_server

__all__ = ["NoServer", "create_database", "pg_server", "pg_url", "running_server"]


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
