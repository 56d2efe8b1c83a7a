"""Alembic's environment for the fleet database, run by fleet_server.migrate (no alembic.ini).

The caller hands over an open connection in ``config.attributes["connection"]`` (the server's own
engine, with its SQLite pragmas); without one, ``sqlalchemy.url`` of the config is opened, which is
how ``command.revision(..., autogenerate=True)`` is pointed at a scratch database (docs: deploy/README.md).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from fleet_server.db import Base


def _run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table instead
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the pending revisions on the given connection, or on ``sqlalchemy.url`` if none was given."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("alembic needs a connection or sqlalchemy.url")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():  # SQL scripts for a DBA are not offered: the server upgrades itself
    raise RuntimeError("the fleet database has no offline (--sql) migrations; run `toco-fleet db upgrade`")
run_migrations_online()
