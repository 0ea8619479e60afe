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

from sqlalchemy import BigInteger, Column, Double, Index, MetaData, String, Table, Text
from sqlalchemy.ext.asyncio import AsyncEngine

from roomshard.sql import upgrade_schema

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


async def migrate(engine: AsyncEngine) -> None:
    """Upgrade the store's schema to head; safe when several processes start at once."""
    await upgrade_schema(engine, MIGRATIONS_DIR, lock_key=MIGRATION_LOCK_KEY)
