"""Reads and writes of the message store (SQLite or PostgreSQL).

Reads and expiry go through SQLAlchemy Core; every one is one statement or one
transaction and holds no connection between calls. A write is a batch: the
messages of a group commit go in one statement and one commit (one fsync per
batch, not per message), on the writer's own connection
(``roomshard.store.writers``). Reads are range scans of the primary key
``(room, seq)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from sqlalchemy import and_, delete, func, select, tuple_
from sqlalchemy import exc as sa_exc

from roomshard.sql import make_engine
from roomshard.store.tables import messages, migrate
from roomshard.store.writers import SeqTaken, batch_writer

__all__ = ["STORE_ERRORS", "MessageStore", "SeqTaken", "StoreUnreachable", "StoredMessage"]


#: What a read, an expiry or an open raises when the store's database is gone or failing
#: (SQLAlchemy's errors, and the OS's for a file or a socket): the caller answers "later".
STORE_ERRORS: tuple[type[Exception], ...] = (sa_exc.SQLAlchemyError, OSError)


class StoreUnreachable(OSError):
    """The store could not be opened (unreachable, no such file, refused credentials)."""


class StoredMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One stored message: its key, its id, user and time, and its ``message`` frame's JSON."""

    room: str
    seq: int
    id: str
    user: str
    ts: float
    payload: str  # {"type": "message", "seq", "id", "user", "text", "ts"}


_COLUMNS = (messages.c.room, messages.c.seq, messages.c.id, messages.c.user, messages.c.ts,
            messages.c.payload)


def _rows(result: Sequence[tuple[str, int, str, str, float, str]]) -> list[StoredMessage]:
    return [StoredMessage(room=r[0], seq=r[1], id=r[2], user=r[3], ts=r[4], payload=r[5])
            for r in result]


class MessageStore:
    """The store behind ``ROOMSHARD_HISTORY_URL``; :meth:`open` before use, :meth:`close` after."""

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        # FULL on SQLite: a stored message survives a crash of the machine too. Pre-ping
        # (one round trip per batch): after a restart of the database the retried write
        # gets a live connection.
        self.engine = make_engine(url, pool_size=pool_size, synchronous="FULL", pre_ping=True)
        self._writer = batch_writer(url)

    async def open(self) -> None:
        """Create or upgrade the schema (safe when several processes start at once); raises
        :class:`StoreUnreachable` with one line for the operator when the store cannot be used."""
        try:
            await migrate(self.engine)
        except STORE_ERRORS as exc:
            cause = getattr(exc, "orig", None) or exc
            reason = (str(cause).splitlines() or [cause.__class__.__name__])[0]
            url = self.engine.url.render_as_string(hide_password=True)
            raise StoreUnreachable(f"cannot open the message store {url}: {reason}") from exc

    async def close(self) -> None:
        await self._writer.close()
        await self.engine.dispose()

    # -- writes ----------------------------------------------------------------
    async def write(self, batch: Sequence[StoredMessage]) -> None:
        """Store ``batch`` in one transaction; all or nothing (``roomshard.store.writers``:
        one statement on a connection of the writer's own; call it one batch at a time).

        Raises :class:`SeqTaken` when a ``(room, seq)`` is already stored: another writer
        stored a message under that seq, and none of the batch is.
        """
        if not batch:
            return
        await self._writer.write([(m.room, m.seq, m.id, m.user, m.ts, m.payload) for m in batch])

    async def expire(self, older_than: float, limit: int) -> int:
        """Delete at most ``limit`` messages stored before ``older_than``; how many went."""
        oldest = (select(messages.c.room, messages.c.seq).where(messages.c.ts < older_than)
                  .order_by(messages.c.ts).limit(limit))
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(messages).where(tuple_(messages.c.room, messages.c.seq).in_(oldest)))
        return int(result.rowcount or 0)

    # -- reads -----------------------------------------------------------------
    async def last_seq(self, room: str) -> int | None:
        """The highest stored seq of ``room`` (None: nothing stored)."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(func.max(messages.c.seq)).where(messages.c.room == room))
        return None if value is None else int(value)

    async def tail(self, room: str, limit: int) -> list[StoredMessage]:
        """The latest ``limit`` messages of ``room``, oldest first."""
        return await self.before(room, None, limit)

    async def before(self, room: str, before: int | None, limit: int, *,
                     newer_than: float | None = None) -> list[StoredMessage]:
        """The latest ``limit`` messages with seq < ``before`` (no bound: None), oldest first;
        with ``newer_than``, none stored before that time (retention, ahead of expiry)."""
        where = messages.c.room == room
        if before is not None:
            where = and_(where, messages.c.seq < before)
        if newer_than is not None:
            where = and_(where, messages.c.ts >= newer_than)
        query = select(*_COLUMNS).where(where).order_by(messages.c.seq.desc()).limit(limit)
        async with self.engine.connect() as conn:
            result = (await conn.execute(query)).all()
        return _rows([tuple(r) for r in reversed(result)])

    async def after(self, room: str, since: int, limit: int) -> list[StoredMessage]:
        """At most ``limit`` messages with seq > ``since``, oldest first."""
        query = (select(*_COLUMNS).where(and_(messages.c.room == room, messages.c.seq > since))
                 .order_by(messages.c.seq).limit(limit))
        async with self.engine.connect() as conn:
            result = (await conn.execute(query)).all()
        return _rows([tuple(r) for r in result])

    async def span(self, room: str, after: int, before: int) -> tuple[int | None, int]:
        """The lowest stored seq of ``room`` in ``(after, before)`` and how many are stored
        there: the range is whole when that is ``(after + 1, before - after - 1)``."""
        where = and_(messages.c.room == room, messages.c.seq > after, messages.c.seq < before)
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(func.min(messages.c.seq), func.count())
                                      .select_from(messages).where(where))).one()
        return (None if row[0] is None else int(row[0])), int(row[1])

    async def recent_ids(self, room: str, since_ts: float,
                         limit: int) -> list[tuple[str, str, int, float]]:
        """``(user, id, seq, ts)`` of the messages stored at or after ``since_ts`` (at most
        ``limit``, the latest), oldest first: a recovered room's idempotency window."""
        query = (select(messages.c.user, messages.c.id, messages.c.seq, messages.c.ts)
                 .where(and_(messages.c.room == room, messages.c.ts >= since_ts))
                 .order_by(messages.c.seq.desc()).limit(limit))
        async with self.engine.connect() as conn:
            result = (await conn.execute(query)).all()
        return [(r[0], r[1], int(r[2]), float(r[3])) for r in reversed(result)]

    async def oldest_seq(self, room: str) -> int | None:
        """The lowest stored seq of ``room`` (None: nothing stored)."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(func.min(messages.c.seq)).where(messages.c.room == room))
        return None if value is None else int(value)
