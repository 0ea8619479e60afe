"""The message store's write path: one batch, one statement, one commit, on a connection of its own.

The group commit writes one batch at a time, so its writer holds one
connection of its own, outside SQLAlchemy's pool and execution layer (measured:
a pooled SQLAlchemy transaction cost the shard ~400 µs of CPU per batch, more
than the fan-out of the batch's messages):

- PostgreSQL (asyncpg): the batch is one ``INSERT ... SELECT FROM unnest(...)``
  of six arrays: one round trip, atomic on its own (no ``BEGIN``/``COMMIT``
  round trips), with synchronous commit (the server's setting) before it returns;
- SQLite: ``BEGIN IMMEDIATE``, ``executemany``, ``COMMIT`` in one call on a
  thread of its own (one hop), ``synchronous=FULL`` (an fsync per batch).

A ``(room, seq)`` already stored raises :class:`SeqTaken` (nothing of the
batch is stored); any other failure closes the connection (the next write
opens a new one: a restarted database heals by itself) and propagates, for
the group commit to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from sqlalchemy.engine import make_url

#: One message as the writers take it: (room, seq, id, user, ts, payload).
Row = tuple[str, int, str, str, float, str]


class SeqTaken(Exception):
    """A message of the batch has a ``(room, seq)`` the store already holds: another writer
    stored a message under that seq (the room was placed elsewhere). Retrying cannot help."""


class BatchWriter(Protocol):
    async def write(self, rows: Sequence[Row]) -> None: ...

    async def close(self) -> None: ...


_PG_INSERT = (
    'INSERT INTO messages (room, seq, id, "user", ts, payload) '
    "SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::float8[], "
    "$6::text[])"
)


class PgWriter:
    def __init__(self, url: str) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self._conn: Any = None

    async def write(self, rows: Sequence[Row]) -> None:
        import asyncpg

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=3, command_timeout=10)
        try:
            await self._conn.execute(_PG_INSERT, *(list(c) for c in zip(*rows, strict=True)))
        except asyncpg.UniqueViolationError as exc:
            raise SeqTaken(str(exc)) from exc
        except BaseException:
            await self.close()  # whatever it was, the next write starts on a fresh connection
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
            if not conn.is_closed():
                conn.terminate()


_SQLITE_INSERT = "INSERT INTO messages (room, seq, id, user, ts, payload) VALUES (?, ?, ?, ?, ?, ?)"


class SqliteWriter:
    def __init__(self, url: str) -> None:
        self._path = make_url(url).database or ""
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")

    def _write(self, rows: Sequence[Row]) -> None:
        if self._conn is None:
            conn = sqlite3.connect(self._path, timeout=5, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")  # a stored message survives a power cut
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_SQLITE_INSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as exc:
            raise SeqTaken(str(exc)) from exc
        except sqlite3.Error:
            self._close()
            raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def write(self, rows: Sequence[Row]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._write, rows)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=False)


def batch_writer(url: str) -> BatchWriter:
    """The writer for the store at ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``)."""
    return SqliteWriter(url) if url.startswith("sqlite") else PgWriter(url)
