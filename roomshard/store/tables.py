"""The store's schema and its start-up migrations.

One row per message, keyed by ``(room, seq)``, holding the message frame's
JSON (``payload``) and, for lookups, its id, user and time: a room's tail and what
follows or precedes a seq are range scans of the primary key, and the key
is also a fence (two writers can never store two messages under one seq).
``ts`` is indexed for expiry. Alembic keeps the store's version in its own
table (``roomshard_store_version``), so the store may live in the
directory's database next to the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Column, Double, Index, MetaData, String, Table, Text, text
from sqlalchemy.ext.asyncio import AsyncEngine

metadata = MetaData()

messages = Table(
    "messages",
    metadata,
    Column("room", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("id", String(64), nullable=False),  # the client's message id
    Column("user", String(64), nullable=False),
    Column("ts", Double, nullable=False),  # seconds since the Unix epoch, as in the frame
    # The ``message`` frame's JSON, as sent: a recovered room replays it as it is, and JSON
    # escapes what a text column could not hold (PostgreSQL refuses U+0000 in text).
    Column("payload", Text, nullable=False),
    Index("ix_messages_ts", "ts"),
)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "roomshard_store_version"
# pg_advisory_xact_lock key guarding the store's schema upgrades (not the directory's).
MIGRATION_LOCK_KEY = 7_263_711_106


def alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


async def migrate(engine: AsyncEngine) -> None:
    """Upgrade the store's schema to head; safe when several processes start at once.

    Alembic is imported and its scripts are read before the write lock is
    taken: a cold import under load can take seconds, and on SQLite the
    other openers wait for the lock only as long as the busy timeout.
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    ScriptDirectory.from_config(alembic_config()).get_current_head()

    def upgrade(sync_conn: Any) -> None:
        command.upgrade(alembic_config(sync_conn), "head")

    async with engine.connect() as conn:
        conn = await conn.execution_options(immediate=True)
        async with conn.begin():
            if engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                   {"k": MIGRATION_LOCK_KEY})
            await conn.run_sync(upgrade)
