"""Alembic environment of the message store: run with a connection from ``tables.migrate``."""

from __future__ import annotations

from alembic import context

from roomshard.store.tables import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable from the alembic CLI
    raise RuntimeError("run the store's migrations through roomshard.store.tables.migrate(engine)")

context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
