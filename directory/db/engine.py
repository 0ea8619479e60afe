"""Tables, the async engine and start-up migrations.

SQLAlchemy Core tables (no ORM: the connect path is measured and Core keeps it
to one compiled statement per query). The same schema runs on SQLite (embedded
default) and PostgreSQL (production); Alembic migrations in
``directory/db/migrations`` create it and run at start-up. Several replicas may
start together on one PostgreSQL, so the upgrade runs under a transaction-level
advisory lock: the first replica migrates, the others wait and find ``head``.

Times are float seconds since the Unix epoch (the API renders ISO 8601).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from roomshard.sql import upgrade_schema

metadata = MetaData()

instances = Table(
    "instances",
    metadata,
    Column("id", String(8), primary_key=True),
    Column("number", Integer, nullable=False),  # iN -> N, the placement tie-break
    Column("internal_url", Text, nullable=False),
    Column("public_base", Text),
    Column("capacity", Integer, nullable=False),
    # Stored state: active | draining | disabled. ``down`` is never stored: it is
    # computed from the liveness time, so it holds even when nobody writes.
    Column("state", String(16), nullable=False),
    Column("state_reason", String(32)),  # "admin", "shutdown" or NULL
    Column("boot_id", String(128)),
    Column("registered_at", Double, nullable=False),
    Column("last_heartbeat", Double),
    Column("load_rooms", Integer, nullable=False, server_default="0"),
    Column("load_connections", Integer, nullable=False, server_default="0"),
    Column("load_messages_per_s", Double, nullable=False, server_default="0"),
    # Rooms assigned here, kept in the same transaction as every assignment
    # change so placement never counts the rooms table; plus this instance's
    # ``room_counts`` slots (read it through ``store.ROOMS_ASSIGNED``).
    Column("rooms_assigned", Integer, nullable=False, server_default="0"),
)

# New rooms placed by PostgreSQL's one-statement placement, counted in a slot per
# placing backend (migration 0006: placements on one instance commit together).
room_counts = Table(
    "room_counts",
    metadata,
    Column("instance", String(8), primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("rooms", Integer, nullable=False, server_default="0"),
)

# Processes of instances an admin removed: their heartbeats may not register the
# instance again (migration 0007).
retired_processes = Table(
    "retired_processes",
    metadata,
    Column("boot_id", String(128), primary_key=True),
    Column("instance", String(8), nullable=False),
    Column("retired_at", Double, nullable=False),
)

rooms = Table(
    "rooms",
    metadata,
    Column("room", String(64), primary_key=True),
    Column("instance", String(8)),  # NULL: record made by an access PUT, not placed yet
    Column("epoch", BigInteger, nullable=False),
    Column("owner_epoch", BigInteger, nullable=False),
    Column("opened_epoch", BigInteger),
    Column("opened_by", String(64)),  # the open_id of the open at opened_epoch (migration 0003)
    Column("seq_base", BigInteger, nullable=False, server_default="0"),
    Column("state", String(16), nullable=False, server_default="active"),  # active | moving
    Column("move_to", String(8)),  # target while moving (owned by the handoff module)
    Column("private", Boolean, nullable=False, server_default=false()),
    Column("members", JSON),  # list of user ids, or NULL
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Index("ix_rooms_instance", "instance"),
    # The unused-room sweep (migration 0004): rooms no shard ever opened, by age.
    Index("ix_rooms_unused", "created_at", postgresql_where=text("opened_epoch IS NULL"),
          sqlite_where=text("opened_epoch IS NULL")),
)

# One row per live move (docs/HANDOFF.md): ``state`` is the authority (commit
# and rollback set it atomically with the room row), ``record`` the coordinator's
# ``Move.to_dict()``; ``lease_*`` lets exactly one directory replica drive it.
moves = Table(
    "moves",
    metadata,
    Column("move_id", String(32), primary_key=True),
    Column("room", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("record", JSON, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_until", Double, nullable=False, server_default="0"),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Index("ix_moves_state", "state"),
    Index("ix_moves_room", "room"),
)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key guarding schema upgrades ("roomshard" in ASCII-ish).
MIGRATION_LOCK_KEY = 7_263_711_105


async def migrate(engine: AsyncEngine) -> None:
    """Upgrade the schema to head and re-derive the room counts; safe when several replicas
    start at once."""
    await upgrade_schema(engine, MIGRATIONS_DIR, lock_key=MIGRATION_LOCK_KEY, then=_recount)


async def _recount(conn: AsyncConnection) -> None:
    """Re-derive ``rooms_assigned`` from the rooms table and empty ``room_counts`` (heals
    any drift at start-up).

    Another replica may be placing rooms meanwhile: on PostgreSQL the slots are
    locked against writes first, so a placement either committed before the
    count (and its slot is emptied here) or waits and counts itself after it.
    """
    from sqlalchemy import delete, func, select, update

    if conn.dialect.name == "postgresql":
        await conn.execute(text("LOCK TABLE room_counts IN SHARE ROW EXCLUSIVE MODE"))
    count = (
        select(func.count())
        .select_from(rooms)
        .where(rooms.c.instance == instances.c.id)
        .scalar_subquery()
    )
    await conn.execute(delete(room_counts))
    await conn.execute(update(instances).values(rooms_assigned=count))
