"""All SQL of the directory, on SQLite and PostgreSQL alike.

Assignment changes are atomic in the database, never read-then-write:

* a new room is one ``INSERT ... ON CONFLICT (room) DO NOTHING``; whoever
  loses the race reads the winner's row back, so concurrent first connects
  from any number of replicas agree on one instance and epoch;
* re-placing a room whose instance is down or disabled is a compare-and-set
  ``UPDATE ... WHERE epoch = :old`` that bumps ``epoch`` and ``owner_epoch``;
* ``rooms_assigned`` counters move in the same transaction as the rows (an
  instance's count is its row's plus its ``room_counts`` slots, where
  PostgreSQL's new rooms are counted: :data:`ROOMS_ASSIGNED`).

Reads run in autocommit on PostgreSQL (one round trip, no BEGIN/ROLLBACK);
writes on SQLite begin IMMEDIATE (see ``roomshard.sql``) and, within one
process, take turns on an asyncio lock first: SQLite has one writer at a
time anyway, and writers queued in the event loop hand the lock on at once,
where writers queued in SQLite's busy handler sleep and poll (up to 100 ms
a turn), and one that polls past the busy timeout fails with "database is
locked". A write that cannot start within :data:`SQLITE_WRITE_WAIT_S` is
refused with 503 ``overloaded`` and ``Retry-After``, not
``database_unavailable``: the database is there, only busy. On PostgreSQL the two
statements of the measured connect path (room lookup; new room) run on the
pooled asyncpg connection directly (``Store._raw``, on a connection kept at
hand between statements: ``directory.db.reserve``), the new room as one
data-modifying CTE; everything else goes through SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import QueuePool

from directory.db.engine import instances, retired_processes, room_counts, rooms
from directory.db.reserve import ConnectionReserve
from directory.db.room_cache import OPENED_CHANNEL, RoomCache
from directory.domain import instances as instances_domain
from directory.domain import placement
from directory.domain.errors import Conflict, Overloaded, Unavailable
from directory.domain.instances import REASON_SHUTDOWN, died_changes
from roomshard.sql import DEFAULT_SYNCHRONOUS, Synchronous

T = TypeVar("T")
SEQ_EPOCH_FACTOR = 1 << 32  # protocol.SEQ_EPOCH_SHIFT as a product (portable SQL)
MAX_PLACEMENT_ATTEMPTS = 5
#: Rooms re-placed per write transaction when a whole instance's rooms are (replace_all).
REPLACE_BATCH = 500
#: How long a finished re-placement of a room stays joinable by connects that read the
#: room before it committed (``Store._replace``).
REPLACED_MEMO_S = 2.0
#: How long a write waits for its turn on SQLite's one write lock (in this process)
#: before the request is answered 503 ``overloaded``.
SQLITE_WRITE_WAIT_S = 10.0
#: Claims of a new instance number that may collide with other replicas' before a 503.
MAX_CLAIM_ATTEMPTS = 20
#: How long a removed instance's process stays refused; a process running this long after
#: its instance was removed is kept out by its own 409s long before (it stops heartbeating).
RETIRED_KEEP_S = 7 * 86400

_ROOM_TARGET = (
    select(
        rooms.c.instance,
        rooms.c.epoch,
        rooms.c.private,
        rooms.c.members,
        instances.c.state.label("i_state"),
        instances.c.internal_url,
        instances.c.public_base,
        instances.c.last_heartbeat,
        instances.c.registered_at,
    )
    .select_from(rooms.outerjoin(instances, instances.c.id == rooms.c.instance))
    .where(rooms.c.room == bindparam("room"))
)


#: An instance's rooms: its row's count plus its ``room_counts`` slots (migration 0006).
ROOMS_ASSIGNED = (
    instances.c.rooms_assigned
    + func.coalesce(select(func.sum(room_counts.c.rooms))
                    .where(room_counts.c.instance == instances.c.id)
                    .scalar_subquery(), 0)
).label("rooms_assigned")
#: The instances' columns as every reader sees them (``rooms_assigned`` complete).
INSTANCE_COLUMNS = (*(c for c in instances.c if c.name != "rooms_assigned"), ROOMS_ASSIGNED)

#: Placement's view of the instances (both dialects' hot paths).
_INSTANCES_SQL = (
    "SELECT id, number, state, capacity, rooms_assigned + COALESCE((SELECT sum(rooms) "
    "FROM room_counts WHERE room_counts.instance = instances.id), 0) AS rooms_assigned, "
    "load_connections, last_heartbeat, registered_at, internal_url, public_base FROM instances"
)
#: Slots per instance in ``room_counts`` (by placing backend: concurrent placements
#: rarely share one, and a reader sums at most this many rows per instance).
ROOM_COUNT_SLOTS = 16
# The room's row, selected from the chosen instance's ($2) row only while that instance
# can take a new room by the database at the statement's start: active, heard from
# within $4 seconds of $3 (``placement.eligible``). The choice may come from the room
# cache's view, which learns of a drain, a disable or a new address by notification,
# a moment after its commit: the statement, not the view, has the last word.
_PG_NEW_ROOM_ROW = (
    "SELECT $1::varchar, id, 1, 1, 'active', false, 0, $3::float8, $3::float8 "
    f"FROM instances WHERE id = $2::varchar AND state = '{placement.ACTIVE}' "
    "AND last_heartbeat >= $3::float8 - $4::float8"
)
# Insert-if-absent and count it, atomically: the count only sees the row the
# INSERT really created (none when another replica won the race, or when the
# instance cannot take the room). The count goes
# to the placing backend's slot, not to the instance's row: a row lock held
# through each commit would place one room per WAL flush (migration 0006).
_PG_NEW_ROOM_SQL = f"""
WITH ins AS (
    INSERT INTO rooms (room, instance, epoch, owner_epoch, state, private, seq_base,
                       created_at, updated_at)
    {_PG_NEW_ROOM_ROW}
    ON CONFLICT (room) DO NOTHING
    RETURNING instance
)
INSERT INTO room_counts (instance, slot, rooms)
SELECT instance, pg_backend_pid() % {ROOM_COUNT_SLOTS}, 1 FROM ins
ON CONFLICT (instance, slot) DO UPDATE SET rooms = room_counts.rooms + 1
RETURNING instance
"""

def _pg_find_or_new_room_sql(target_sql: str) -> str:
    """The room's lookup (``target_sql``, the room as ``$1``) and, when there is no such
    room and instance ``$2`` can take it (``_PG_NEW_ROOM_ROW``), its insert at epoch 1
    there and its count, in one statement; one row: ``placed`` (1: inserted) and the
    lookup's columns (all NULL: no row seen, when the insert is the one that placed it,
    or the instance could not take it, or another replica's insert won meanwhile)."""
    return f"""
WITH found AS ({target_sql}),
ins AS (
    INSERT INTO rooms (room, instance, epoch, owner_epoch, state, private, seq_base,
                       created_at, updated_at)
    {_PG_NEW_ROOM_ROW} AND NOT EXISTS (SELECT 1 FROM found)
    ON CONFLICT (room) DO NOTHING
    RETURNING instance
), counted AS (
    INSERT INTO room_counts (instance, slot, rooms)
    SELECT instance, pg_backend_pid() % {ROOM_COUNT_SLOTS}, 1 FROM ins
    ON CONFLICT (instance, slot) DO UPDATE SET rooms = room_counts.rooms + 1
    RETURNING instance
)
SELECT (SELECT count(*) FROM counted) AS placed, found.* FROM (SELECT 1) AS one
LEFT JOIN found ON true
"""


try:
    import asyncpg

    # InternalClientError: a statement on a connection that has just been told it is
    # being closed ("terminating connection due to administrator command" read while
    # idle, the socket's end not yet): the connection is gone, like the others'.
    _PG_DOWN_ERRORS: tuple[type[BaseException], ...] = (
        asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
        asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.AdminShutdownError,
        asyncpg.InternalClientError, OSError, ConnectionError, TimeoutError)
    #: What else a checkout that opens a connection raises when the server refuses it
    #: (too many connections, starting up, a wrong password): "no database", 503.
    _PG_ERRORS: tuple[type[BaseException], ...] = (asyncpg.PostgresError,)
except ImportError:  # pragma: no cover - asyncpg is a dependency
    _PG_DOWN_ERRORS = (OSError, ConnectionError, TimeoutError)
    _PG_ERRORS = ()


def _new_room_stmt(insert: Any, room: Any, instance: Any, now: Any) -> Any:
    """Insert-if-absent of a new room at epoch 1, RETURNING it (nothing when it exists)."""
    return (insert(rooms)
            .values(room=room, instance=instance, epoch=1, owner_epoch=1, state="active",
                    private=False, seq_base=0, created_at=now, updated_at=now)
            .on_conflict_do_nothing(index_elements=["room"])
            .returning(rooms.c.room))


def _open_stmt(room: Any, instance: Any, ticket_epoch: Any, *, now: Any,
               open_id: Any) -> Any:
    """The one UPDATE of an open (docs/INTERNALS.md), RETURNING the grant's columns.

    Values or bind parameters (the SQLite hot path compiles it once with parameters:
    ``opened_by = NULL`` is never true, so a NULL ``open_id`` is never a retry)."""
    again = and_(rooms.c.opened_epoch == rooms.c.epoch, rooms.c.opened_by == open_id) \
        if open_id is not None else false()
    new_epoch = case((again, rooms.c.epoch),
                     (rooms.c.opened_epoch == rooms.c.epoch, rooms.c.epoch + 1),
                     else_=rooms.c.epoch)
    return (
        update(rooms)
        .where(rooms.c.room == room, rooms.c.instance == instance,
               rooms.c.owner_epoch <= ticket_epoch, rooms.c.state == "active")
        .values(epoch=new_epoch, opened_epoch=new_epoch, opened_by=open_id,
                seq_base=case((again, rooms.c.seq_base),
                              (rooms.c.opened_epoch.is_(None), 0),
                              else_=new_epoch * SEQ_EPOCH_FACTOR),
                updated_at=now)
        .returning(rooms.c.room, rooms.c.instance, rooms.c.epoch, rooms.c.owner_epoch,
                   rooms.c.seq_base, rooms.c.private, rooms.c.members)
    )


# PostgreSQL: a batch of opens in ONE statement (``_open_stmt``'s UPDATE over the batch:
# its SET expressions read the row as it was, as there): $1 rooms, $2 ticket epochs,
# $3 open ids, $4 the instance, $5 now. A NULL open id is never a retry (NULL = NULL is not true).
_PG_AGAIN = "(r.opened_epoch = r.epoch AND r.opened_by = v.open_id)"
_PG_NEW_EPOCH = (f"CASE WHEN {_PG_AGAIN} THEN r.epoch WHEN r.opened_epoch = r.epoch "
                 "THEN r.epoch + 1 ELSE r.epoch END")
# The opens, and the public rooms opened told to every replica's room cache in the same
# transaction (``roomshard_opened``: "room instance epoch" lines; delivered in commit order
# with the triggers' notifications; a batch past the payload's 8000 bytes is not told).
_PG_OPEN_ROOMS_SQL = f"""
WITH opened AS (
    UPDATE rooms AS r SET epoch = {_PG_NEW_EPOCH}, opened_epoch = {_PG_NEW_EPOCH},
        opened_by = v.open_id,
        seq_base = CASE WHEN {_PG_AGAIN} THEN r.seq_base WHEN r.opened_epoch IS NULL THEN 0
                        ELSE ({_PG_NEW_EPOCH}) * {SEQ_EPOCH_FACTOR}::bigint END,
        updated_at = $5
    FROM unnest($1::varchar[], $2::bigint[], $3::varchar[]) AS v(room, ticket_epoch, open_id)
    WHERE r.room = v.room AND r.instance = $4 AND r.owner_epoch <= v.ticket_epoch
      AND r.state = 'active'
    RETURNING r.room, r.instance, r.epoch, r.owner_epoch, r.seq_base, r.private, r.members
), told AS (
    SELECT pg_notify('{OPENED_CHANNEL}', lines) FROM (
        SELECT string_agg(room || ' ' || instance || ' ' || epoch, E'\\n') AS lines
        FROM opened WHERE NOT private) AS batch
    WHERE octet_length(lines) < 8000
)
SELECT opened.* FROM opened LEFT JOIN told ON true
"""
_PG_OPEN_REFUSED_SQL = ("SELECT room, instance, owner_epoch, state FROM rooms "
                        "WHERE room = ANY($1::varchar[])")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a client of a room goes now."""

    room: str
    instance: str
    epoch: int
    internal_url: str
    public_base: str | None


class NoInstance(Unavailable):
    code = "no_instance_available"

    def __init__(self) -> None:
        super().__init__(message="no active instance can take the room")


class Store:
    def __init__(self, engine: AsyncEngine, *,
                 synchronous: Synchronous = DEFAULT_SYNCHRONOUS) -> None:
        """``synchronous``: the SQLite setting ``engine`` was made with (its hot-path
        writer commits the same way)."""
        self.engine = engine
        self.dialect = engine.dialect.name
        if self.dialect == "postgresql":
            self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
            self._insert = postgresql.insert
        else:
            self._reader = engine
            self._insert = sqlite.insert
        self._writer = engine.execution_options(immediate=True)
        self._write_turn = asyncio.Lock() if self.dialect == "sqlite" else None
        self._raw_target_sql: str | None = None
        self._raw_find_or_new_sql = ""
        if self.dialect == "postgresql":
            compiled = _ROOM_TARGET.compile(dialect=engine.dialect,
                                            compile_kwargs={"render_postcompile": True})
            self._raw_target_sql = str(compiled).replace("%(room)s", "$1")
            assert "$1" in self._raw_target_sql
            self._raw_find_or_new_sql = _pg_find_or_new_room_sql(self._raw_target_sql)
        # Store._raw: idle connections at hand (a third of the pool), and what a checkout
        # raises when there is no database
        self._reserve: ConnectionReserve | None = None
        if self.dialect == "postgresql":
            pool = engine.pool
            self._reserve = ConnectionReserve(
                engine.sync_engine, pool.size() // 3 if isinstance(pool, QueuePool) else 0)
        self._checkout_errors: tuple[type[BaseException], ...] = (
            *_PG_DOWN_ERRORS, *_PG_ERRORS, engine.dialect.loaded_dbapi.Error)
        # PostgreSQL: served rooms looked up without a round trip (directory.db.room_cache)
        self.cache: RoomCache | None = None
        if self.dialect == "postgresql":
            self.cache = RoomCache(engine.url.set(drivername="postgresql")
                                   .render_as_string(hide_password=False), _INSTANCES_SQL)
        self._lite: LiteHotPath | None = None
        self._replacing: dict[tuple[str, int], asyncio.Future[Target | None]] = {}  # _replace
        if self.dialect == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            self._lite = LiteHotPath(engine.url.database,
                                     str(_ROOM_TARGET.compile(dialect=engine.dialect)), synchronous)

    def start(self) -> asyncio.Task[None] | None:
        """The background work the store needs while it serves (the room cache's
        listener on PostgreSQL), or None; cancel the task to stop it."""
        if self.cache is None:
            return None
        return asyncio.get_running_loop().create_task(self.cache.run())

    def close(self) -> None:
        if self._lite is not None:
            self._lite.close()
        if self._reserve is not None:
            self._reserve.close()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._reader.connect() as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction (never nested: on SQLite a second one would wait for the first)."""
        async with self._turn(), self._writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """This process's turn to write on SQLite (nothing on PostgreSQL)."""
        turn = self._write_turn
        if turn is None:
            yield
            return
        try:
            async with asyncio.timeout(SQLITE_WRITE_WAIT_S):
                await turn.acquire()
        except TimeoutError:
            raise Overloaded(f"the database is busy: no write turn within "
                             f"{SQLITE_WRITE_WAIT_S:g} s") from None
        try:
            yield
        finally:
            turn.release()

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.execute(select(literal(1)))

    # -- connect ---------------------------------------------------------
    async def room_target(self, room: str) -> Mapping[str, Any] | None:
        """The room joined with its instance: one indexed query (kept in the room cache)."""
        if self._raw_target_sql is not None:
            cache = self.cache
            token = cache.token() if cache is not None else 0
            row = await self._raw_room_target(room)
            if cache is not None and row is not None:
                cache.put(room, row, token, asyncio.get_running_loop().time())
            return row
        if self._lite is not None:
            return self._lite.room_target(room)
        async with self.read() as conn:
            row = (await conn.execute(_ROOM_TARGET, {"room": room})).first()
        return row._mapping if row is not None else None

    @property
    def finds_or_places(self) -> bool:
        """Whether :meth:`room_target_or_new` can look a room up and place it in one go."""
        return self._raw_target_sql is not None and self.cache is not None

    async def room_target_or_new(self, room: str, *, now: float,
                                 down_after: float) -> tuple[Mapping[str, Any] | None, Target | None]:
        """:meth:`room_target`, and the room placed when there is none, in ONE statement
        (PostgreSQL: a new room's first connect costs one round trip, not two).

        Returns ``(None, target)`` when this call placed the room (on the instance
        :meth:`place` would pick from the room cache's view), else ``(row, None)``
        with the lookup's row, None when there is no such room: the caller places
        it the general way (the cache's view has no instance to offer). Only where
        :attr:`finds_or_places`; the caller has charged the creation (it refunds
        it unless a room was placed)."""
        cache = self.cache
        assert cache is not None and self._raw_target_sql is not None
        inst = self._view_choice(now=now, down_after=down_after)
        if inst is None:
            return await self.room_target(room), None
        token = cache.token()
        chosen = inst["id"]
        cache.placing(chosen)
        placed = False
        try:
            rec = await self._raw(lambda c: c.fetchrow(self._raw_find_or_new_sql, room, chosen,
                                                       now, down_after))
            placed = rec["placed"] == 1
        finally:
            cache.placement_done(chosen, placed)
        if placed:
            cache.keep_new_room(room, chosen, token, asyncio.get_running_loop().time())
            return None, Target(room, chosen, 1, inst["internal_url"], inst["public_base"])
        if rec["epoch"] is None:
            # The view offered an instance the database says takes no new room (its
            # change is committed, its notice not here yet: read the instances again),
            # or another replica placed the room since this statement's snapshot (rare:
            # the view is read again for nothing). The caller places it the general way.
            cache.view_refused()
            return await self.room_target(room), None
        row = _target_row(rec)
        del row["placed"]
        cache.put(room, row, token, asyncio.get_running_loop().time())
        return row, None

    @property
    def looks_up_now(self) -> bool:
        """Whether :meth:`room_target_now` can answer (SQLite: the loop's own connection;
        PostgreSQL: the room cache, while it listens)."""
        if self._lite is not None:
            return True
        return self.cache is not None and self.cache.live

    def room_target_now(self, room: str) -> Mapping[str, Any] | None:
        """:meth:`room_target` without waiting; only where :attr:`looks_up_now`. None: no
        such room (SQLite), or not known here (the cache): the general way finds out."""
        if self._lite is not None:
            return self._lite.room_target(room)
        assert self.cache is not None
        return self.cache.get(room, asyncio.get_running_loop().time())

    @staticmethod
    def serving_target(room: str, row: Mapping[str, Any], *, now: float,
                       keep_after: float) -> Target | None:
        """The room's target when its current owner (``row``, from :meth:`room_target`)
        still serves rooms (it is active or draining and heard from within ``keep_after``)."""
        if row["i_state"] is not None and placement.serves_rooms(row["i_state"], _seen(row),
                                                                 now=now, down_after=keep_after):
            return _target(room, row)
        return None

    async def prime(self, c: Any) -> None:
        """Ready a new PostgreSQL connection (``c``: asyncpg's) for the hot path before it
        serves (``roomshard.sql.warm_pool``): its backend reads the catalog entries of
        every table and index the hot statements touch, and plans them, the first time
        (PostgreSQL's share of the server core in a storm's first second: 42-46 %
        unprimed, 30-37 % primed). Nothing is written: the lookup reads a room that
        cannot exist, the others are prepared."""
        if self._raw_target_sql is None:
            return
        await c.fetchrow(self._raw_target_sql, "")
        await c.fetch(_INSTANCES_SQL)
        for sql in (self._raw_find_or_new_sql, _PG_NEW_ROOM_SQL, _PG_OPEN_ROOMS_SQL,
                    _PG_OPEN_REFUSED_SQL):
            await c.prepare(sql)

    async def _raw(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op(asyncpg_connection)`` on a pooled connection, outside SQLAlchemy's
        execution layer (PostgreSQL hot paths: it costs more CPU than the query).

        The connection comes from the reserve (``directory.db.reserve``) or the
        pool; the pool, its limits and its invalidation stay SQLAlchemy's: a dead
        connection is invalidated with every older one (as SQLAlchemy's own
        disconnect handling does) and ``op`` retried once on a fresh one, so ``op``
        must be idempotent. Raises ``OperationalError`` (-> 503) when the database
        is not there, as ``engine.connect()`` would.
        """
        reserve = self._reserve
        assert reserve is not None
        for attempt in (1, 2):
            try:
                fairy = await reserve.acquire()
            except self._checkout_errors as exc:
                raise sa_exc.OperationalError("pool checkout", None, exc) from exc
            try:
                result = await op(fairy.driver_connection)
            except _PG_DOWN_ERRORS as exc:
                await reserve.invalidate(fairy, exc)
                if attempt == 2:
                    raise sa_exc.OperationalError("raw statement", None, exc) from exc
                continue
            except BaseException:
                fairy.close()  # an unfinished statement (cancelled): not kept at hand
                raise
            reserve.release(fairy)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _raw_room_target(self, room: str) -> Mapping[str, Any] | None:
        rec = await self._raw(lambda c: c.fetchrow(self._raw_target_sql, room))
        return None if rec is None else _target_row(rec)

    def _view_choice(self, *, now: float, down_after: float) -> Mapping[str, Any] | None:
        """The instance a new room goes to by the room cache's view of the instances;
        None without a view or with no eligible instance in it (maybe one only not seen
        yet: the database decides then)."""
        view = self.cache.placement_view() if self.cache is not None else None
        if view is not None:
            with suppress(NoInstance):
                return _pick(view, now=now, down_after=down_after)
        return None

    async def _raw_place_new(self, room: str, *, now: float, down_after: float) -> Target | None:
        """PostgreSQL: pick an instance, then insert the room and count it in ONE statement
        (a data-modifying CTE, atomic in autocommit). None when another replica won.

        The pick reads the room cache's view of the instances while it has one
        (``RoomCache.placement_view``: one round trip per new room instead of two),
        else the database; the statement places the room only where the database says
        the instance can take it, and a view's choice it refuses is made again from the
        database. The new room's lookup is kept in the cache."""
        cache = self.cache
        token = cache.token() if cache is not None else 0
        inst = self._view_choice(now=now, down_after=down_after)

        async def insert(c: Any, chosen: Mapping[str, Any]) -> Target | None:
            if await c.fetchrow(_PG_NEW_ROOM_SQL, room, chosen["id"], now, down_after) is None:
                return None
            return Target(room, chosen["id"], 1, chosen["internal_url"], chosen["public_base"])

        async def op(c: Any) -> Target | None:
            if inst is not None:
                done = await insert(c, inst)
                if done is not None:
                    return done
                # The view's instance cannot take rooms any more (drained, disabled,
                # down a moment ago), or another replica placed the room: the view is
                # read again, as after the one-go statement, and the database picks
                # (its insert does nothing in the second case).
                assert cache is not None
                cache.view_refused()
            return await insert(c, _pick([dict(r) for r in await c.fetch(_INSTANCES_SQL)],
                                         now=now, down_after=down_after))

        if cache is None:
            return await self._raw(op)
        if inst is not None:
            cache.placing(inst["id"])
        placed = None
        try:
            placed = await self._raw(op)
        finally:
            if inst is not None:
                cache.placement_done(inst["id"], placed is not None and placed.instance == inst["id"])
        if placed is not None:
            if inst is None or placed.instance != inst["id"]:
                cache.count_placed(placed.instance)  # the database's choice
            cache.keep_new_room(room, placed.instance, token, asyncio.get_running_loop().time())
        return placed

    async def _lite_place_new(self, room: str, *, now: float,
                              down_after: float) -> Target | None | str:
        assert self._lite is not None and self._write_turn is not None
        async with self._turn():
            return self._lite.place_new(room, now=now, down_after=down_after)

    async def place(self, room: str, current: Mapping[str, Any] | None, *, now: float,
                    down_after: float, keep_after: float | None = None) -> tuple[Target, str]:
        """Give ``room`` a live instance: insert it, or CAS-move it off a dead one.

        ``current`` is the row :meth:`room_target` returned. ``keep_after``
        (default ``down_after``) is how long without a heartbeat the current
        owner keeps the room; new owners are chosen with ``down_after``. Returns the target
        and what happened (``"new"``, ``"replaced"`` or ``"existing"`` when
        another replica won). Raises :class:`NoInstance`.
        """
        for _ in range(MAX_PLACEMENT_ATTEMPTS):
            if current is not None:
                serving = self.serving_target(
                    room, current, now=now, keep_after=down_after if keep_after is None else keep_after)
                if serving is not None:
                    return serving, "existing"
            if current is None and self._raw_target_sql is not None:
                done = await self._raw_place_new(room, now=now, down_after=down_after)
                if done is not None:
                    return done, "new"
                current = await self.room_target(room)
                continue
            if current is None and self._lite is not None:
                placed = await self._lite_place_new(room, now=now, down_after=down_after)
                if isinstance(placed, Target):
                    return placed, "new"
                if placed is None:  # placed meanwhile: take the winner's row
                    current = await self.room_target(room)
                    continue
                # BUSY: another process writes; the general path below waits its turn
            if current is None:
                async with self.write() as conn:
                    chosen = await self._choose(conn, now=now, down_after=down_after)
                    done = await self._insert_room(conn, room, chosen, now=now)
                kind = "new"
            else:
                done, led = await self._replace(room, current, now=now, down_after=down_after)
                kind = "replaced" if led else "existing"
            if done is not None:
                return done, kind
            current = await self.room_target(room)  # lost a race: take the winner's row
        raise Unavailable("placement_contended", "room assignment kept changing; retry")

    async def _replace(self, room: str, current: Mapping[str, Any], *, now: float,
                       down_after: float) -> tuple[Target | None, bool]:
        """Move ``room`` off its dead owner (``current``); the new target, or None when
        another replica did first, and whether this call did it.

        The connects that find a room's owner dead at once (all its clients
        reconnect together after a crash) share one attempt per room and epoch
        in this process: one write transaction, not one each (every other CAS
        would fail anyway, after waiting its write turn). A finished attempt
        stays joinable for ``REPLACED_MEMO_S``: a connect that read the row just
        before the attempt committed joins it instead of trying again.
        """
        key = (room, int(current["epoch"]))
        flight = self._replacing.get(key)
        if flight is not None:
            return await asyncio.shield(flight), False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Target | None] = loop.create_future()
        fut.add_done_callback(_retrieved)
        self._replacing[key] = fut
        try:
            async with self.write() as conn:
                chosen = await self._choose(conn, now=now, down_after=down_after)
                done = await self._reassign(conn, room, old_epoch=current["epoch"],
                                            old_instance=current["instance"],
                                            new_instance=chosen, now=now)
        except Exception as exc:
            del self._replacing[key]
            fut.set_exception(exc)
            raise
        except BaseException:
            del self._replacing[key]
            fut.set_result(None)  # cancelled: the others look again themselves
            raise
        fut.set_result(done)
        loop.call_later(REPLACED_MEMO_S, self._replacing.pop, key, None)
        return done, True

    async def _choose(self, conn: AsyncConnection, *, now: float,
                      down_after: float) -> Mapping[str, Any]:
        rows = (await conn.execute(select(*INSTANCE_COLUMNS))).mappings().all()
        return _pick(rows, now=now, down_after=down_after)

    async def _insert_room(self, conn: AsyncConnection, room: str, inst: Mapping[str, Any], *,
                           now: float) -> Target | None:
        if (await conn.execute(_new_room_stmt(self._insert, room, inst["id"], now))).first() is None:
            return None
        await bump_rooms_assigned(conn, {inst["id"]: +1})
        return Target(room, inst["id"], 1, inst["internal_url"], inst["public_base"])

    async def _reassign(self, conn: AsyncConnection, room: str, *, old_epoch: int,
                        old_instance: str | None, new_instance: Mapping[str, Any],
                        now: float) -> Target | None:
        new_id = new_instance["id"]
        new_epoch = await reassign(conn, room, old_epoch=old_epoch, old_instance=old_instance,
                                   new_instance=new_id, now=now)
        if new_epoch is None:
            return None
        return Target(room, new_id, new_epoch, new_instance["internal_url"],
                      new_instance["public_base"])

    # -- shard -> directory ------------------------------------------------
    async def open_rooms(self, instance: str, opens: Sequence[tuple[str, int, str | None]],
                         *, now: float) -> list[Mapping[str, Any] | str]:
        """INTERNALS "open", for each ``(room, ticket_epoch, open_id)``, all in ONE
        write transaction (one commit and one SQLite write lock for a storm's first
        joins): an atomic UPDATE per room. A room opened before at its current epoch
        gets a new epoch (its earlier copy is gone) -- unless this is a retry of
        that very open (same ``open_id``): then the same grant again, nothing
        changes. Per room: the granted row, or the refusal's code (``moving``: the
        caller owns it but it is mid-move; ``not_owner``: anything else)."""
        if self._lite is not None:
            async with self._turn():
                done = self._lite.open_rooms(instance, opens, now=now)
            if not isinstance(done, str):
                return done
            # BUSY: another process writes; the general path waits its turn off the loop
        names = [room for room, _, _ in opens]
        if (self._raw_target_sql is not None and len(set(names)) == len(names)
                and all(open_id is not None for _, _, open_id in opens)):
            return await self._raw_open_rooms(instance, opens, now=now)
        out: list[Mapping[str, Any] | str] = []
        async with self.write() as conn:
            for room, ticket_epoch, open_id in opens:
                row = (await conn.execute(_open_stmt(room, instance, ticket_epoch, now=now,
                                                     open_id=open_id))).first()
                if row is not None:
                    out.append(row._mapping)
                    continue
                current = (await conn.execute(
                    select(rooms.c.instance, rooms.c.owner_epoch, rooms.c.state)
                    .where(rooms.c.room == room))).mappings().first()
                out.append(_refusal(current, instance, ticket_epoch))
        return out

    async def _raw_open_rooms(self, instance: str, opens: Sequence[tuple[str, int, str | None]],
                              *, now: float) -> list[Mapping[str, Any] | str]:
        """PostgreSQL: :meth:`open_rooms` in one statement for the whole batch (a storm's
        first joins: a statement per room, each a round trip, took ~300 ms for 60 rooms
        while their first members waited). Every open has its id, so a retry of the
        batch on a fresh connection (``_raw``) grants the same again.

        The UPDATE commits alone (autocommit: one round trip, where BEGIN and
        COMMIT made three); the rooms it refused are read after it, only for the
        refusal's code, which is the state of the room a moment later at worst
        (the refusal itself was decided by the UPDATE, atomically)."""
        names = [room for room, _, _ in opens]

        async def op(c: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
            granted = {r["room"]: _target_row(r) for r in await c.fetch(
                _PG_OPEN_ROOMS_SQL, names, [int(e) for _, e, _ in opens],
                [i for _, _, i in opens], instance, float(now))}
            refused = [room for room in names if room not in granted]
            current = {r["room"]: r for r in await c.fetch(_PG_OPEN_REFUSED_SQL, refused)} \
                if refused else {}
            return granted, current

        granted, current = await self._raw(op)
        return [granted[room] if room in granted
                else _refusal(current.get(room), instance, ticket_epoch)
                for room, ticket_epoch, _ in opens]

    # -- rooms -------------------------------------------------------------
    async def rooms_owned(self, instance: str, epochs: Mapping[str, int]) -> list[str]:
        """Of ``epochs`` (room -> epoch), the rooms assigned to ``instance`` at exactly that epoch."""
        names = sorted(epochs)
        owned: list[str] = []
        async with self.read() as conn:
            for i in range(0, len(names), 500):  # bounded IN lists
                chunk = names[i:i + 500]
                res = await conn.execute(
                    select(rooms.c.room, rooms.c.epoch)
                    .where(rooms.c.room.in_(chunk), rooms.c.instance == instance))
                owned.extend(r.room for r in res if r.epoch == epochs[r.room])
        return owned

    async def get_room(self, room: str) -> Mapping[str, Any] | None:
        async with self.read() as conn:
            row = (await conn.execute(select(rooms).where(rooms.c.room == room))).first()
        return row._mapping if row is not None else None

    async def list_rooms(self, instance: str | None, limit: int) -> Sequence[Mapping[str, Any]]:
        stmt = select(rooms).order_by(rooms.c.room).limit(limit)
        if instance is not None:
            stmt = stmt.where(rooms.c.instance == instance)
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    async def set_access(self, room: str, private: bool, members: list[str], *,
                         now: float) -> Mapping[str, Any]:
        """Create-or-update the room's access; returns the row after the change."""
        stored = members if private or members else None
        async with self.write() as conn:
            await conn.execute(
                self._insert(rooms)
                .values(room=room, instance=None, epoch=0, owner_epoch=0, state="active",
                        private=private, members=stored, seq_base=0, created_at=now,
                        updated_at=now)
                .on_conflict_do_update(index_elements=["room"],
                                       set_={"private": private, "members": stored,
                                             "updated_at": now})
            )
            row = (await conn.execute(select(rooms).where(rooms.c.room == room))).first()
        assert row is not None
        return row._mapping

    # -- instances ---------------------------------------------------------
    async def list_instances(self) -> Sequence[Mapping[str, Any]]:
        async with self.read() as conn:
            return (await conn.execute(select(*INSTANCE_COLUMNS).order_by(instances.c.number))
                    ).mappings().all()

    async def get_instance(self, instance: str) -> Mapping[str, Any] | None:
        async with self.read() as conn:
            return await _instance(conn, instance)

    async def upsert_instance(self, instance: str, decide: Any, *,
                              process: str | None = None) -> Mapping[str, Any]:
        """Read the row, let ``decide(row_or_None)`` return changes, write them, read back.

        Runs in one write transaction (the row is locked on PostgreSQL,
        the database on SQLite) so two heartbeats cannot interleave.
        ``process``: the boot id of the shard process asking (a heartbeat); it may
        not register an instance an admin removed while it ran (409 ``instance_retired``).
        """
        async with self.write() as conn:
            stmt = select(*INSTANCE_COLUMNS).where(instances.c.id == instance)
            if self.dialect == "postgresql":
                stmt = stmt.with_for_update(of=instances)
            row = (await conn.execute(stmt)).mappings().first()
            if row is None and process is not None:
                await _refuse_retired(conn, process)
            changes = decide(row)
            if row is None:
                await conn.execute(
                    self._insert(instances).values(**changes)
                    .on_conflict_do_update(index_elements=["id"], set_={
                        k: v for k, v in changes.items() if k not in ("id", "registered_at")})
                )
            elif changes:
                await conn.execute(update(instances).where(instances.c.id == instance)
                                   .values(**changes))
            out = await _instance(conn, instance)
        assert out is not None
        return out

    async def claim_instance(self, process: str,
                             reclaim: Callable[[Mapping[str, Any]], bool],
                             decide: Callable[[str, Mapping[str, Any] | None], dict[str, Any]]
                             ) -> Mapping[str, Any]:
        """Give the shard process ``process`` (a boot id) an instance number, once.

        The same process asking again gets the same instance (a retried claim).
        Else the instance ``reclaim(row)`` accepts (the same address, its process
        gone), else the lowest free number. ``decide(instance, row_or_None)`` returns
        the row's values, as a heartbeat's. Atomic across replicas: the new row is
        an insert that another replica's insert of the same number turns into a
        retry with the next free number; a reclaim is a conditional update on the
        previous process's boot id. Raises 409 ``instance_retired`` for a process an
        admin removed, 503 when no number is free (or the claims keep colliding).
        """
        for _attempt in range(MAX_CLAIM_ATTEMPTS):
            async with self.write() as conn:
                await _refuse_retired(conn, process)
                rows = (await conn.execute(select(*INSTANCE_COLUMNS)
                                           .order_by(instances.c.number))).mappings().all()
                mine = next((r for r in rows if r["boot_id"] == process), None)
                if mine is not None:
                    return mine
                old = next((r for r in rows if reclaim(r)), None)
                if old is not None:
                    done = await conn.execute(
                        update(instances).where(instances.c.id == old["id"],
                                                instances.c.boot_id == old["boot_id"])
                        .values(**decide(old["id"], dict(old))))
                    if done.rowcount:
                        out = await _instance(conn, old["id"])
                        assert out is not None
                        return out
                    continue
                taken = {r["number"] for r in rows}
                while True:
                    number = instances_domain.lowest_free_number(taken)
                    if number is None:
                        raise Unavailable("no_free_instance",
                                          f"all {instances_domain.MAX_NUMBER} instance numbers "
                                          "are taken: retire instances that are gone")
                    instance = f"i{number}"
                    done = await conn.execute(self._insert(instances)
                                              .values(**decide(instance, None))
                                              .on_conflict_do_nothing(index_elements=["id"]))
                    out = await _instance(conn, instance)
                    if out is not None and (done.rowcount or out["boot_id"] == process):
                        return out  # ours, or this process's own claim sent again
                    # Another claim took it since the read: the next free number, in
                    # this transaction (24 claims at once on two replicas made the last
                    # ones re-read up to 23 times, past the bound).
                    taken.add(number)
        raise Unavailable("claim_contention", "instance numbers are being claimed by many "
                                              "shards at once: retry")

    async def confirm_route(self, instance: str, boot_id: str) -> bool:
        """Make ``instance`` active if it is still pending under process ``boot_id`` (its
        route answered, ``directory.ops.route_check``); whether this call did."""
        async with self.write() as conn:
            done = await conn.execute(
                update(instances)
                .where(instances.c.id == instance, instances.c.boot_id == boot_id,
                       instances.c.state == placement.PENDING)
                .values(state=placement.ACTIVE, state_reason=None))
            return bool(done.rowcount == 1)

    async def park_dead(self, instance: str, boot_id: str) -> Mapping[str, Any] | None:
        """Park ``instance`` as died if ``boot_id`` is still its registered process and it
        serves rooms (active or draining, not parked by its own shutdown); the row after,
        or None when nothing changed (another process took it over, it left first)."""
        async with self.write() as conn:
            done = await conn.execute(
                update(instances)
                .where(instances.c.id == instance, instances.c.boot_id == boot_id,
                       instances.c.state.in_((placement.ACTIVE, placement.DRAINING)),
                       or_(instances.c.state_reason.is_(None),
                           instances.c.state_reason != REASON_SHUTDOWN))
                .values(**died_changes()))
            if done.rowcount != 1:
                return None
            return await _instance(conn, instance)

    async def delete_instance(self, instance: str, *, now: float) -> str:
        """``"deleted"``, ``"missing"`` or ``"has_rooms"``.

        The process the instance ran as is recorded as retired: its heartbeats
        cannot register the instance again (``upsert_instance(process=)``).
        Records older than :data:`RETIRED_KEEP_S` are dropped here.
        """
        async with self.write() as conn:
            has_rooms = (await conn.execute(
                select(rooms.c.room).where(rooms.c.instance == instance).limit(1))).first()
            if has_rooms is not None:
                return "has_rooms"
            gone = (await conn.execute(delete(instances).where(instances.c.id == instance)
                                       .returning(instances.c.boot_id))).first()
            # Its slots sum to 0 with the row's count; a later instance of this id starts at 0.
            await conn.execute(delete(room_counts).where(room_counts.c.instance == instance))
            if gone is None:
                return "missing"
            await conn.execute(delete(retired_processes)
                               .where(retired_processes.c.retired_at < now - RETIRED_KEEP_S))
            if gone.boot_id:
                await conn.execute(self._insert(retired_processes).values(
                    boot_id=gone.boot_id, instance=instance, retired_at=now)
                    .on_conflict_do_nothing(index_elements=["boot_id"]))
            return "deleted"

    async def remove_unused_rooms(self, created_before: float, limit: int) -> int:
        """Delete up to ``limit`` rooms nobody joined, created before ``created_before``.

        Unused: no shard ever opened it (``opened_epoch`` NULL: no member
        joined, so it holds no message), placed by a connect (an access
        record made by an admin stays), not private, not moving. The DELETE
        repeats the conditions, so a room opened meanwhile (by a join on
        another replica's ticket) stays; ``rooms_assigned`` moves with it.
        """
        unused = and_(rooms.c.opened_epoch.is_(None), rooms.c.instance.is_not(None),
                      rooms.c.state == "active", rooms.c.private == false(),
                      rooms.c.created_at < created_before)
        async with self.write() as conn:
            names = [r.room for r in await conn.execute(
                select(rooms.c.room).where(unused).limit(limit))]
            if not names:
                return 0
            gone = (await conn.execute(delete(rooms).where(rooms.c.room.in_(names), unused)
                                       .returning(rooms.c.instance))).all()
            await bump_rooms_assigned(conn, {instance: -count for instance, count
                                             in Counter(row.instance for row in gone).items()})
        return len(gone)

    async def replace_all(self, instance: str, *, now: float, down_after: float) -> int:
        """Re-place every room of ``instance`` (it is down: no snapshot to move); how many.

        In transactions of ``REPLACE_BATCH`` rooms, each room by the same CAS as a
        connect's re-placement (a room re-placed meanwhile is skipped), spread over the
        live instances as one by one placements would (the least loaded first, counting
        what this batch has given each).
        """
        moved = 0
        async with self.read() as conn:
            rows = (await conn.execute(select(rooms.c.room, rooms.c.epoch)
                                       .where(rooms.c.instance == instance))).all()
        if not rows:
            return 0
        if self._lite is not None:
            async with self._turn():
                done = self._lite.replace_rooms(instance, [(r, e) for r, e in rows],
                                                now=now, down_after=down_after)
            if isinstance(done, int):
                return done
            # BUSY: another process writes; the general path below waits its turn
        rows = sorted(rows)  # the same lock order as any other batch
        for start in range(0, len(rows), REPLACE_BATCH):
            for attempt in (1, 2):
                try:
                    moved += await self._replace_batch(instance, rows[start:start + REPLACE_BATCH],
                                                       now=now, down_after=down_after)
                    break
                except sa_exc.DBAPIError as exc:
                    if attempt == 2 or not _deadlocked(exc):
                        raise
        return moved

    async def _replace_batch(self, instance: str, batch: list[Any], *, now: float,
                             down_after: float) -> int:
        """One transaction: each room by the CAS, then the counts (``bump_rooms_assigned``:
        no deadlock with the connects and moves re-placing rooms of this instance)."""
        gained: dict[str, int] = {}
        async with self.write() as conn:
            candidates = [dict(r) for r in (await conn.execute(select(*INSTANCE_COLUMNS))).mappings()]
            for room, epoch in batch:
                chosen = _pick(candidates, now=now, down_after=down_after)
                if chosen["id"] == instance:
                    continue
                done = (await conn.execute(_reassign_stmt(room, epoch, chosen["id"], now))).first()
                if done is not None:
                    chosen["rooms_assigned"] += 1
                    gained[chosen["id"]] = gained.get(chosen["id"], 0) + 1
            moved = sum(gained.values())
            await bump_rooms_assigned(conn, {**gained, instance: -moved})
        return moved


async def reassign(conn: AsyncConnection, room: str, *, old_epoch: int,
                   old_instance: str | None, new_instance: str, now: float) -> int | None:
    """Compare-and-set a room to ``new_instance``; the new epoch, or None if the epoch moved on.

    Public for the handoff module: a live move ends with the same CAS.
    """
    row = (await conn.execute(_reassign_stmt(room, old_epoch, new_instance, now))).first()
    if row is None:
        return None
    changes = Counter({new_instance: +1})
    if old_instance is not None:
        changes[old_instance] -= 1
    await bump_rooms_assigned(conn, changes)
    return int(row[0])


def _deadlocked(exc: sa_exc.DBAPIError) -> bool:
    """PostgreSQL aborted the transaction to break a deadlock (SQLSTATE 40P01)."""
    return getattr(exc.orig, "sqlstate", None) == "40P01"


def _reassign_stmt(room: Any, old_epoch: Any, new_instance: Any, now: Any) -> Any:
    """The CAS that gives a room a new owner at the next epoch (returns the epoch)."""
    return (update(rooms)
            .where(and_(rooms.c.room == room, rooms.c.epoch == old_epoch))
            .values(instance=new_instance, epoch=rooms.c.epoch + 1,
                    owner_epoch=rooms.c.epoch + 1, state="active", move_to=null(),
                    updated_at=now)
            .returning(rooms.c.epoch))


async def bump_rooms_assigned(conn: AsyncConnection, changes: Mapping[str, int]) -> None:
    """Keep ``instances.rooms_assigned`` in step: call in the transaction that moves rooms
    (the handoff module's commit too), after its room updates. One update per instance,
    in id order: every such transaction locks the rooms first and the instance rows
    after, alike, so two of them never deadlock. Start-up re-derives the counts anyway."""
    for instance in sorted(changes):
        if changes[instance]:
            await conn.execute(_bump_stmt(instance, changes[instance]))


def _bump_stmt(instance: Any, delta: Any) -> Any:
    return (update(instances).where(instances.c.id == instance)
            .values(rooms_assigned=instances.c.rooms_assigned + delta))


async def _refuse_retired(conn: AsyncConnection, process: str) -> None:
    """409 ``instance_retired`` for a shard process whose instance an admin removed while it
    ran (``Store.delete_instance``): it may not register, and so be routed, again."""
    retired = (await conn.execute(select(retired_processes.c.instance)
                                  .where(retired_processes.c.boot_id == process))).first()
    if retired is not None:
        raise Conflict("instance_retired",
                       f"{retired.instance} was removed from the registry while this process "
                       f"(boot id {process}) ran; it may not register again: stop it (a new "
                       "process registers anew)")


async def _instance(conn: AsyncConnection, instance: str) -> Mapping[str, Any] | None:
    return (await conn.execute(select(*INSTANCE_COLUMNS).where(instances.c.id == instance))
            ).mappings().first()


class LiteHotPath:
    """SQLite hot paths on stdlib connections, in the loop: the room lookup, a new room.

    aiosqlite runs every statement on a helper thread, and SQLAlchemy's
    execution layer sits on top: the thread hops alone cost ~1 ms of CPU, fifty
    times the primary-key lookup itself, and a new room cost ~2.4 ms in all
    (docs/benchmarks/connect.md). In WAL mode readers never wait for writers,
    so reading on the event loop's thread blocks it for microseconds (bounded by
    a short busy_timeout). A new room is one short write transaction (read the
    instances, insert-if-absent, count it) on a second connection whose
    busy_timeout is 0: the caller holds the process's write turn, so only
    another process can hold SQLite's lock, and then :meth:`place_new` answers
    :data:`BUSY` at once and the caller takes the general path, which waits
    for the lock off the loop. Only for file databases (an in-memory one is
    private to its connection).
    """

    BUSY = "busy"

    def __init__(self, path: str, target_sql: str, synchronous: str) -> None:
        self._path, self._target_sql, self._synchronous = path, target_sql, synchronous
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None

    def _connect(self, busy_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")
        return conn

    def room_target(self, room: str) -> Mapping[str, Any] | None:
        try:
            if self._reader is None:
                self._reader = self._connect(200)
                self._reader.execute("PRAGMA query_only=1")
            rec = self._reader.execute(self._target_sql, (room,)).fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise sa_exc.OperationalError(self._target_sql, None, exc) from exc
        return None if rec is None else _target_row(rec)

    def place_new(self, room: str, *, now: float, down_after: float) -> Target | None | str:
        """Insert ``room`` on the least loaded live instance and count it, atomically.

        The new room's target; None when the room exists by now (another
        request or replica placed it first); :data:`BUSY` when another process
        holds SQLite's write lock. Raises :class:`NoInstance`."""
        placed: list[Target] = []

        def run(conn: sqlite3.Connection) -> None:
            rows = [dict(r) for r in conn.execute(_INSTANCES_SQL)]
            inst = _pick(rows, now=now, down_after=down_after)
            if conn.execute(_LITE_NEW_ROOM_SQL, {**_LITE_NEW_ROOM_CONSTANTS, "room": room,
                                                 "instance": inst["id"], "now": now}
                            ).fetchone() is None:
                return  # placed meanwhile: nothing to count
            conn.execute(_LITE_COUNT_SQL, {**_LITE_COUNT_CONSTANTS, "instance": inst["id"]})
            placed.append(Target(room, inst["id"], 1, inst["internal_url"], inst["public_base"]))

        if not self._write(run):
            return self.BUSY
        return placed[0] if placed else None

    def open_rooms(self, instance: str, opens: Sequence[tuple[str, int, str | None]], *,
                   now: float) -> list[Mapping[str, Any] | str] | str:
        """:meth:`Store.open_rooms` in one transaction on this connection, or :data:`BUSY`."""
        out: list[Mapping[str, Any] | str] = []

        def run(conn: sqlite3.Connection) -> None:
            for room, ticket_epoch, open_id in opens:
                rec = conn.execute(_LITE_OPEN_SQL, {
                    **_LITE_OPEN_CONSTANTS, "room": room, "instance": instance,
                    "ticket_epoch": ticket_epoch, "now": now, "open_id": open_id}).fetchone()
                if rec is not None:
                    out.append(_target_row(rec))
                    continue
                cur = conn.execute(_LITE_ROOM_STATE_SQL, (room,)).fetchone()
                out.append(_refusal(cur, instance, ticket_epoch))

        return out if self._write(run) else self.BUSY

    def replace_rooms(self, instance: str, rows: Sequence[tuple[str, int]], *, now: float,
                      down_after: float) -> int | str:
        """:meth:`Store.replace_all`'s rooms in one transaction on this connection; how many
        were re-placed, or :data:`BUSY`."""
        moved: list[int] = [0]

        def run(conn: sqlite3.Connection) -> None:
            candidates = [dict(r) for r in conn.execute(_INSTANCES_SQL)]
            for room, epoch in rows:
                chosen = _pick(candidates, now=now, down_after=down_after)
                if chosen["id"] == instance:
                    continue
                if conn.execute(_LITE_REASSIGN_SQL, {
                        **_LITE_REASSIGN_CONSTANTS, "room": room, "old_epoch": epoch,
                        "new_instance": chosen["id"], "now": now}).fetchone() is None:
                    continue  # re-placed meanwhile (a connect's own)
                conn.execute(_LITE_UNCOUNT_SQL, {**_LITE_UNCOUNT_CONSTANTS, "instance": instance})
                conn.execute(_LITE_COUNT_SQL, {**_LITE_COUNT_CONSTANTS, "instance": chosen["id"]})
                chosen["rooms_assigned"] += 1
                moved[0] += 1

        if not self._write(run):
            return self.BUSY
        return moved[0]

    def _write(self, run: Callable[[sqlite3.Connection], None]) -> bool:
        """``run`` in one write transaction (False: another process holds the lock)."""
        try:
            if self._writer is None:
                self._writer = self._connect(0)
                self._writer.execute(f"PRAGMA synchronous={self._synchronous}")
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    return False
                raise
            try:
                run(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.close()
            raise sa_exc.OperationalError("write", None, exc) from exc
        return True

    def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                conn.close()
        self._reader = self._writer = None


def _lite(stmt: Any) -> tuple[str, dict[str, Any]]:
    """A statement compiled once for the SQLite hot path: its SQL with named parameters,
    and the values of the parameters its own constants compiled to (merged per call)."""
    compiled = stmt.compile(dialect=sqlite.dialect(paramstyle="named"))
    return str(compiled), {k: v for k, v in compiled.params.items() if v is not None}


_LITE_OPEN_SQL, _LITE_OPEN_CONSTANTS = _lite(_open_stmt(
    bindparam("room"), bindparam("instance"), bindparam("ticket_epoch"), now=bindparam("now"),
    open_id=bindparam("open_id")))
_LITE_NEW_ROOM_SQL, _LITE_NEW_ROOM_CONSTANTS = _lite(_new_room_stmt(
    sqlite.insert, bindparam("room"), bindparam("instance"), bindparam("now")))
_LITE_COUNT_SQL, _LITE_COUNT_CONSTANTS = _lite(_bump_stmt(bindparam("instance"), 1))
_LITE_UNCOUNT_SQL, _LITE_UNCOUNT_CONSTANTS = _lite(_bump_stmt(bindparam("instance"), -1))
_LITE_REASSIGN_SQL, _LITE_REASSIGN_CONSTANTS = _lite(_reassign_stmt(
    bindparam("room"), bindparam("old_epoch"), bindparam("new_instance"), bindparam("now")))
_LITE_ROOM_STATE_SQL = "SELECT instance, owner_epoch, state FROM rooms WHERE room = ?"


def _pick(rows: Sequence[Mapping[str, Any]], *, now: float, down_after: float) -> Mapping[str, Any]:
    chosen = placement.choose(
        (placement.Candidate(id=r["id"], number=r["number"], state=r["state"],
                             capacity=r["capacity"], rooms_assigned=r["rooms_assigned"],
                             connections=r["load_connections"], seen_at=_seen(r))
         # A registration without a heartbeat (an admin's PUT) is no proof that a
         # shard answers there: never place a room on it (docs/API.md).
         for r in rows if r["last_heartbeat"] is not None),
        now=now, down_after=down_after)
    if chosen is None:
        raise NoInstance()
    return next(r for r in rows if r["id"] == chosen.id)


def _refusal(current: Any, instance: str, ticket_epoch: int) -> str:
    """Why an open was refused: ``moving`` (the caller owns the room, mid-move) or ``not_owner``."""
    moving = (current is not None and current["instance"] == instance
              and ticket_epoch >= current["owner_epoch"] and current["state"] == "moving")
    return "moving" if moving else "not_owner"


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a shared attempt's error as seen (its callers got it; maybe none waited)."""
    if not fut.cancelled():
        fut.exception()


def _seen(row: Mapping[str, Any]) -> float:
    hb = row["last_heartbeat"]
    return float(hb if hb is not None else row["registered_at"])


def _target(room: str, row: Mapping[str, Any]) -> Target:
    return Target(room, row["instance"], int(row["epoch"]), row["internal_url"], row["public_base"])


def _target_row(rec: Any) -> dict[str, Any]:
    """A raw driver row of the room lookup as a dict; ``members`` decoded from JSON text."""
    row = dict(rec)
    if isinstance(row["members"], str):
        row["members"] = orjson.loads(row["members"])
    return row
