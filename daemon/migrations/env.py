"""Alembic environment: runs inside the connection (and transaction) that :func:`daemon.migrations.upgrade` holds."""

from __future__ import annotations

from alembic import context

from daemon.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # the `alembic` command line: open the database the settings name
    from daemon.config import load_settings
    from daemon.store import make_engine

    engine = make_engine(load_settings(check_paths=False).database)
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():  # a no-op: the caller's transaction is already open
        context.run_migrations()
