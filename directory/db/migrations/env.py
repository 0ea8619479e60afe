"""Alembic environment: always run with a connection handed in by ``directory.db.engine.migrate``."""

from __future__ import annotations

from alembic import context

from directory.db.engine import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable from the alembic CLI
    raise RuntimeError("run migrations through directory.db.engine.migrate(engine)")

context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
