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

import contextlib
import os
from pathlib import Path
from typing import Any

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
    event,
    false,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

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
    # change so placement never counts the rooms table.
    Column("rooms_assigned", Integer, nullable=False, server_default="0"),
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


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An engine that heals after an outage and fails fast while the database is gone."""
    if is_sqlite(url):
        _create_private(url)
        engine = create_async_engine(url, pool_pre_ping=True, connect_args={"timeout": 5})
        _sqlite_pragmas(engine)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=2 * pool_size,
        # No pre-ping: it costs a round trip per checkout on the hot path.
        # Healing instead: a connection that fails with a disconnect error is
        # invalidated with every older pooled connection (SQLAlchemy's
        # disconnect handling; ``Store`` does the same for its raw reads), and
        # idempotent reads retry once on a fresh connection.
        pool_pre_ping=False,
        pool_timeout=5,
        pool_recycle=1800,
        # asyncpg: bound the connect and every statement so an unreachable
        # server turns into a 503 quickly instead of hanging requests.
        connect_args={"timeout": 3, "command_timeout": 10},
    )


def _create_private(url: str) -> None:
    """Create a new SQLite database file readable by its owner alone (0600).

    It holds private rooms' member lists. SQLite gives its -wal and -shm
    files the main file's permissions. An existing file is left as it is;
    a directory that does not exist is the open's error to report.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    with contextlib.suppress(FileExistsError, FileNotFoundError, NotADirectoryError,
                             PermissionError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    """WAL + busy_timeout, and write transactions that take the write lock at BEGIN.

    A deferred SQLite transaction that reads and then writes can fail at once
    with SQLITE_BUSY when another writer got there first (busy_timeout does
    not apply to that upgrade). Connections opened with the ``immediate``
    execution option begin with ``BEGIN IMMEDIATE`` and simply wait instead.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


async def migrate(engine: AsyncEngine) -> None:
    """Upgrade the schema to head; safe when several replicas start at once."""
    from alembic import command

    def upgrade(sync_conn: Any) -> None:
        command.upgrade(alembic_config(sync_conn), "head")

    async with engine.connect() as conn:
        conn = await conn.execution_options(immediate=True)
        async with conn.begin():
            if engine.dialect.name == "postgresql":
                from sqlalchemy import text

                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            await conn.run_sync(upgrade)
            await _recount(conn)


async def _recount(conn: AsyncConnection) -> None:
    """Re-derive ``rooms_assigned`` from the rooms table (heals any drift at start-up)."""
    from sqlalchemy import func, select, update

    count = (
        select(func.count())
        .select_from(rooms)
        .where(rooms.c.instance == instances.c.id)
        .scalar_subquery()
    )
    await conn.execute(update(instances).values(rooms_assigned=count))
