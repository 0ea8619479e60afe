"""The async SQLAlchemy engine both services use: SQLite embedded, PostgreSQL in production.

The directory's registry (``directory.db``) and the message store
(``roomshard.store``) open their databases here, so both heal after an
outage the same way and treat SQLite the same way (a private file, WAL, a
busy timeout, write transactions that take the lock at ``BEGIN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only as await_

#: SQLite's ``synchronous``: NORMAL keeps every commit through a crash of the process
#: (WAL); FULL also through a crash of the machine (one fsync per commit).
Synchronous = Literal["NORMAL", "FULL"]
#: The directory's (its registry is re-derived from the shards after a machine crash).
DEFAULT_SYNCHRONOUS: Synchronous = "NORMAL"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, *, pool_size: int = 10, synchronous: Synchronous = DEFAULT_SYNCHRONOUS,
                pre_ping: bool = False, name: str | None = None) -> AsyncEngine:
    """An engine that heals after an outage and fails fast while the database is gone.

    ``pre_ping``: test a pooled PostgreSQL connection before each use (one round trip):
    for a caller that checks out once per batch, so a connection the server closed
    (a restart) is replaced instead of failing every retry. ``name``: PostgreSQL's
    ``application_name`` of its connections (``pg_stat_activity`` says whose they are).
    """
    if is_sqlite(url):
        _create_private(url)
        engine = create_async_engine(url, pool_pre_ping=True, connect_args={"timeout": 5})
        _sqlite_pragmas(engine, synchronous)
        return engine
    return create_async_engine(
        url,
        # Every connection opened stays pooled (no overflow): a connect storm needs
        # many at once, and an overflow connection, closed as soon as it is returned,
        # is a new PostgreSQL connection (TLS attempt, authentication, a backend
        # process) for each burst: a third of a directory's CPU in such a storm.
        # Opened lazily: a quiet process holds few.
        pool_size=3 * pool_size,
        max_overflow=0,
        # No pre-ping by default: it costs a round trip per checkout on the hot path.
        # Healing instead: a connection that fails with a disconnect error is
        # invalidated with every older pooled connection (SQLAlchemy's
        # disconnect handling; the directory's ``Store`` does the same for its raw reads), and
        # idempotent reads retry once on a fresh connection.
        pool_pre_ping=pre_ping,
        pool_timeout=5,
        pool_recycle=1800,
        # asyncpg: bound the connect and every statement so an unreachable
        # server turns into a 503 quickly instead of hanging requests.
        connect_args={"timeout": 3, "command_timeout": 10,
                      **({"server_settings": {"application_name": name}} if name else {})},
    )


def pool_limit(engine: AsyncEngine) -> int:
    """The most connections ``engine``'s pool holds (PostgreSQL: every one it opens stays)."""
    size = getattr(engine.pool, "size", None)
    return int(size()) if callable(size) else 1


async def warm_pool(engine: AsyncEngine, connections: int,
                    prime: Callable[[Any], Awaitable[None]] | None = None) -> int:
    """Open up to ``connections`` pooled connections at once and put them back: PostgreSQL
    only (SQLite's are local files). Returns how many were opened.

    A new PostgreSQL connection costs a backend process, authentication and the
    driver's type setup: milliseconds of both machines' CPU. Opened at start, the
    first storm (a deploy, a failover) finds them ready instead of paying for them
    while it is served. ``prime(driver_connection)`` runs on each one opened (the
    caller's first statements: a new backend reads the tables' catalog entries
    the first time it touches them)."""
    if is_sqlite(str(engine.url)):
        return 0

    async def open_one(held: contextlib.AsyncExitStack) -> None:
        conn = await held.enter_async_context(engine.connect())
        if prime is not None:
            await prime((await conn.get_raw_connection()).driver_connection)

    async with contextlib.AsyncExitStack() as held:
        results = await asyncio.gather(
            *(open_one(held) for _ in range(min(connections, pool_limit(engine)))),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r  # cancelled: the stack puts back what was opened
        return sum(1 for r in results if not isinstance(r, BaseException))


def _create_private(url: str) -> None:
    """Create a new SQLite database file readable by its owner alone (0600).

    It holds private rooms' member lists (the directory) or messages (the store). SQLite gives its -wal and -shm
    files the main file's permissions. An existing file is left as it is;
    a directory that does not exist is the open's error to report.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    with contextlib.suppress(FileExistsError, FileNotFoundError, NotADirectoryError,
                             PermissionError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _sqlite_pragmas(engine: AsyncEngine, synchronous: Synchronous) -> None:
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
        cur.execute("PRAGMA busy_timeout=5000")
        _wal(cur)
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


#: How long a connection tries to turn a new database file to WAL while others do the same.
_WAL_SWITCH_S = 5.0


def _wal(cur: Any) -> None:
    """Put the database in WAL mode (it stays so: later connections find it done).

    Only a new file needs the switch, and the switch needs the file to itself:
    connections that open a new file at once (processes started together, or a
    store and a directory sharing it) each hold a read lock while wanting the
    write lock, and SQLite answers all but one "database is locked" at once,
    without its busy timeout (a deadlock otherwise). The losers try again
    within a bound; by then the winner has switched the file.
    """
    deadline = time.monotonic() + _WAL_SWITCH_S
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        await_(asyncio.sleep(0.01))


#: Alembic's ``context`` and ``op`` are module-level proxies, set for one run at a time:
#: two upgrades in one process (a store sharing a directory's database, two stores, a
#: test's template databases in two threads) must not interleave, or one run's steps
#: find the other's proxies (or none). Across processes the database's lock orders them.
#: A run holds the thread lock; a loop's own tasks first take their loop's lock, as a task
#: that met the thread lock held by its own loop's task would stop the loop that task needs.
_ALEMBIC_RUN = threading.Lock()
_LOOP_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary())
_LOOP_TURNS_GUARD = threading.Lock()


def _alembic_turn() -> asyncio.Lock:
    """This event loop's turn at Alembic."""
    loop = asyncio.get_running_loop()
    with _LOOP_TURNS_GUARD:
        return _LOOP_TURNS.setdefault(loop, asyncio.Lock())


async def upgrade_schema(engine: AsyncEngine, migrations: Path, *, lock_key: int,
                         then: Callable[[AsyncConnection], Awaitable[None]] | None = None) -> None:
    """Run the Alembic migrations in ``migrations`` up to head, then ``then`` in the same
    transaction; safe when several processes start at once.

    The upgrade holds the write lock (``BEGIN IMMEDIATE`` on SQLite, a
    transaction-level advisory lock ``lock_key`` on PostgreSQL): the first
    process migrates, the others wait and find head. Alembic is imported and
    its scripts read before the lock is taken: a cold import under load can
    take seconds, and on SQLite the others wait only as long as the busy
    timeout.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    def config(connection: Any = None) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations))
        cfg.attributes["connection"] = connection
        return cfg

    ScriptDirectory.from_config(config()).get_current_head()

    def upgrade(sync_conn: Any) -> None:
        with _ALEMBIC_RUN:  # other threads' runs; this loop's are ordered by its turn, below
            command.upgrade(config(sync_conn), "head")

    async with _alembic_turn(), engine.connect() as conn:
        conn = await conn.execution_options(immediate=True)
        async with conn.begin():
            if engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
            await conn.run_sync(upgrade)
            if then is not None:
                await then(conn)
