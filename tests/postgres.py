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

__all__ = ["NoServer", "create_database", "pg_roles", "pg_server", "pg_url", "running_server"]


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


def _doc_sql(section: str) -> list[str]:
    """The statements of the ```sql blocks under docs/security.md's ``### section`` heading, in order (psql's ``\\c``
    lines left out); a ``$$`` body stays one statement."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    body = doc.split(f"### {section}\n", 1)[1].split("\n### ", 1)[0]
    statements, current, quoted = [], [], False
    for block in body.split("```sql\n")[1:]:
        for line in block.split("\n```", 1)[0].splitlines():
            if line.startswith("\\c") or (not current and (not line.strip() or line.startswith("--"))):
                continue
            current.append(line)
            quoted ^= line.count("$$") % 2 == 1
            if not quoted and line.rstrip().endswith(";"):
                statements.append("\n".join(current))
                current = []
    return statements


@pytest.fixture
def pg_roles(pg_server: str, pg_url: str) -> Iterator[tuple[str, str]]:
    """(the service's URL, a reader's URL) on ``pg_url``'s database, their roles made by docs/security.md's own SQL
    (sections "PostgreSQL roles" and "Readers cannot stall the daemon"); the roles are dropped afterwards.

    Role names are cluster-wide, so each test gets its own; the page's ``CREATE DATABASE`` becomes this database."""
    from sqlalchemy import create_engine, make_url, text

    name = pg_url.rsplit("/", 1)[1]
    tag = uuid.uuid4().hex[:8]
    service, reader = f"svc_{tag}", f"rdr_{tag}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            for stmt in _doc_sql("PostgreSQL roles") + _doc_sql("Readers cannot stall the daemon"):
                stmt = stmt.replace("upscaled_reader", reader).replace("upscaled", service)
                if stmt.startswith("CREATE DATABASE"):
                    stmt = f"ALTER DATABASE {name} OWNER TO {service}"
                c.execute(text(stmt))
        url = make_url(pg_url)
        yield tuple(url.set(username=u, password=None).render_as_string(hide_password=False) for u in (service, reader))
    finally:
        with admin.connect() as c:
            c.execute(text(f"ALTER DATABASE {name} OWNER TO CURRENT_USER"))
            for role in (service, reader):  # one at a time: both at once trips over the default ACL between them
                c.execute(text(f"DROP OWNED BY {role}"))
            c.execute(text(f"DROP ROLE IF EXISTS {service}, {reader}"))
        admin.dispose()
