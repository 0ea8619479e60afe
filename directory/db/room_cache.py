"""Room lookups without a round trip on PostgreSQL, kept right by the database's notifications.

A connect for a room that has a serving owner needs the room's row (owner,
epoch, access) and its owner's (state, address, last heartbeat). On SQLite
the directory reads them in its own process; on PostgreSQL each read is a
round trip, which is most of a connect's cost. :class:`RoomCache` keeps the
rooms this replica has looked up and every instance's row, and the HTTP
edge answers a connect from them at once
(:func:`directory.http.connect.connect_now`); a miss, and everything that is
not a plain served room (a new room, a suspect or dead owner, a hint), goes
the general way, which reads the database and fills the cache.

Why it stays right across directory replicas and moves: every change a
connect depends on fires a notification from the database itself, whoever
makes it (triggers from migration 0005: a room's owner, epoch, privacy or
members changing or the room deleted; an instance's state, addresses or
process changing, or the instance deleted), delivered to every replica when
the change commits. A replica drops what a notification names before the
next lookup, so it answers from its cache at most a delivery's delay (a few
milliseconds) after the commit, the same race a read that just preceded the
commit has. What can make it miss a notification is its listening
connection failing, so the cache is used only while that connection is up
and has answered its last keepalive (once a second): on any error it is
emptied and unused until a new connection is listening. A lookup that read
the database while a notification for its room arrived is not kept (it may
predate the change; a notification for another room does not void it: a
storm that places hundreds of rooms would otherwise keep every fill out),
and entries expire after ``TTL_S`` anyway. Liveness (the owner's
last heartbeat, not notified: it changes every few seconds) comes from a read
of the instances every ``REFRESH_S``: older than the database by at most that
much, so an owner can only look *less* alive than it is, and its rooms then
take the general way.

Rooms are also *told*: a shard's open of its rooms (their first joins) notifies
the public rooms it opened, with their owner and epoch, from the open's own
statement (``roomshard_opened``), so every replica knows a room its shard
made ready before a client asks it (the second member of a new room,
arriving at another replica, is answered at once instead of reading the
database). Delivered in commit order with the changes above, such a notice
can only be followed, never overtaken, by a later change to its room; within
the open's own transaction an epoch change is notified after it and drops
the room again (it is looked up, at the new epoch). One notice per batch of
opens, not per room: PostgreSQL serializes the commits of notifying
transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import asyncpg

log = logging.getLogger("roomshard.directory.room_cache")

ROOMS_CHANNEL = "roomshard_rooms"
INSTANCES_CHANNEL = "roomshard_instances"
#: Public rooms a shard opened (first joins): "room instance epoch" lines, from the open's
#: own statement (``Store._raw_open_rooms``), so a replica knows them before it is asked.
OPENED_CHANNEL = "roomshard_opened"
#: Instances re-read (and the listening connection proven alive) this often.
REFRESH_S = 1.0
#: A cached room is looked up again after this long, whatever it was told.
TTL_S = 30.0
#: Rooms kept at most (then the cache starts over: a cheap bound, not an LRU).
MAX_ROOMS = 200_000
#: Rooms whose last notification is remembered for the fill race at most (then every
#: lookup still out is not kept: the same bound, on what a burst of changes leaves).
MAX_NOTIFIED = 10_000
RETRY_S = 1.0

#: The listening connection's name in ``pg_stat_activity``.
APPLICATION_NAME = "roomshard-room-cache"


class RoomCache:
    """Rooms looked up and every instance, usable while :attr:`live`."""

    def __init__(self, dsn: str, instances_sql: str) -> None:
        self.dsn = dsn
        # Every instance as placement reads it (``Store``'s one query for that): the
        # rows lookups join, and new rooms' placement on this replica
        # (:meth:`placement_view`).
        self._instances_sql = instances_sql
        self.live = False
        self.version = 0  # bumped by every room notification and every reset
        # The version of each room's last notification, and the oldest token still good
        # (a reset, or forgetting those versions, voids every lookup still out).
        self._notified: dict[str, int] = {}
        self._floor = 0
        self._instances_version = 0  # bumped by every instance notification
        self._rooms: dict[str, tuple[float, str, int, bool, Any]] = {}
        self._instances: dict[str, dict[str, Any]] = {}
        self._conn: asyncpg.Connection | None = None
        self._refresh = asyncio.Event()
        # New rooms this replica placed per instance (ever), as many as there were when
        # the last read of the instances began (that read counts them already), and the
        # placements chosen but not done yet (counted from their choice on, so that
        # placements at the same moment spread).
        self._placed: dict[str, int] = {}
        self._placed_read: dict[str, int] = {}
        self._placing: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    # -- lookups (in the event loop, no await) ------------------------------

    def token(self) -> int:
        """Taken before a database read whose row may be :meth:`put` after it."""
        return self.version

    def get(self, room: str, now: float) -> Mapping[str, Any] | None:
        """The room's lookup row (as ``Store.room_target``'s), or None: not known here."""
        if not self.live:
            return None
        entry = self._rooms.get(room)
        if entry is None or now - entry[0] > TTL_S:
            return None
        _, instance, epoch, private, members = entry
        inst = self._instances.get(instance)
        if inst is None:
            return None
        return {"instance": instance, "epoch": epoch, "private": private, "members": members,
                "i_state": inst["state"], "internal_url": inst["internal_url"],
                "public_base": inst["public_base"], "last_heartbeat": inst["last_heartbeat"],
                "registered_at": inst["registered_at"]}

    def put(self, room: str, row: Mapping[str, Any], token: int, now: float) -> None:
        """Keep ``row`` (read after :meth:`token` gave ``token``) unless its room was
        notified meanwhile, or the cache started over, or the room is not placed."""
        if (not self.live or token < self._floor or self._notified.get(room, -1) > token
                or row["instance"] is None):
            return
        if len(self._rooms) >= MAX_ROOMS:
            self._rooms.clear()
        self._rooms[room] = (now, row["instance"], int(row["epoch"]), bool(row["private"]),
                             row["members"])

    def placement_view(self) -> list[dict[str, Any]] | None:
        """Every instance as placement reads it, its ``rooms_assigned`` with the rooms
        this replica placed since the last read and is placing now; None when the cache
        cannot say (not listening, or an instance changed and is being read again).

        Placement stays atomic without it (the room's insert-if-absent decides which
        replica's choice wins); the view only decides where a new room goes. It is at
        most ``REFRESH_S`` older than the database, so an instance can only look *less*
        alive than it is; an instance's change of state or address is notified and
        voids the view until the instances are read again. Other replicas' placements
        of the last ``REFRESH_S`` are not in it: each replica spreads its own, so a
        storm of new rooms still spreads over the instances (a count may be high for
        up to ``REFRESH_S``, never low)."""
        if not self.live or self._refresh.is_set() or not self._instances:
            return None
        placed, read, placing = self._placed, self._placed_read, self._placing
        return [{**row, "rooms_assigned": row["rooms_assigned"] + placed.get(iid, 0)
                 - read.get(iid, 0) + placing.get(iid, 0)}
                for iid, row in self._instances.items()]

    def placing(self, instance: str) -> None:
        """A new room is being placed on ``instance`` (chosen from :meth:`placement_view`);
        :meth:`placement_done` follows, whatever the outcome."""
        self._placing[instance] = self._placing.get(instance, 0) + 1

    def placement_done(self, instance: str, placed: bool) -> None:
        """The end of :meth:`placing`: the room was placed there, or not (another replica
        won, or the statement failed)."""
        left = self._placing.get(instance, 0) - 1
        if left > 0:
            self._placing[instance] = left
        else:
            self._placing.pop(instance, None)
        if placed:
            self.count_placed(instance)

    def view_refused(self) -> None:
        """The database refused a new room on an instance :meth:`placement_view` offered
        (a change whose notice is still on its way): no view until the instances are
        read again."""
        self._refresh.set()

    def count_placed(self, instance: str) -> None:
        """This replica placed a new room on ``instance``."""
        self._placed[instance] = self._placed.get(instance, 0) + 1

    def keep_new_room(self, room: str, instance: str, token: int, now: float) -> None:
        """This replica placed ``room`` on ``instance`` (new, at epoch 1): keep its lookup
        (unless it was notified after ``token``, taken before the placement)."""
        self.put(room, {"instance": instance, "epoch": 1, "private": False, "members": None},
                 token, now)

    # -- notifications --------------------------------------------------------

    def _room_changed(self, _conn: Any, _pid: int, _channel: str, room: str) -> None:
        self.version += 1
        self._rooms.pop(room, None)
        if len(self._notified) >= MAX_NOTIFIED:
            self._notified.clear()
            self._floor = self.version
        self._notified[room] = self.version

    def _rooms_opened(self, _conn: Any, _pid: int, _channel: str, lines: str) -> None:
        """Keep the rooms an open made ready: delivered in commit order, so a later change
        to one of them (a move, a new epoch) is notified after this and drops it again."""
        token, now = self.version, asyncio.get_running_loop().time()
        for line in lines.split("\n"):
            room, instance, epoch = line.split(" ")
            self.put(room, {"instance": instance, "epoch": int(epoch), "private": False,
                            "members": None}, token, now)

    def _instance_changed(self, _conn: Any, _pid: int, _channel: str, instance: str) -> None:
        self._instances_version += 1
        self._instances.pop(instance, None)  # its rooms miss until the re-read
        self._refresh.set()

    def _lost(self, _conn: Any) -> None:
        self._reset()
        self._refresh.set()

    def _reset(self) -> None:
        self.live = False
        self.version += 1
        self._floor = self.version
        self._notified.clear()
        self._rooms.clear()
        self._instances.clear()

    # -- the listening connection ------------------------------------------------

    async def run(self) -> None:
        """Listen, keep the instances fresh; on any failure start over (until cancelled)."""
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: unused until listening again
                if self.live:
                    log.warning("room cache off: its listening connection failed (%r); "
                                "lookups read the database until it is back", exc)
            finally:
                self._reset()
                await self._close()
            await asyncio.sleep(RETRY_S)

    async def _listen(self) -> None:
        conn = self._conn = await asyncpg.connect(
            self.dsn, timeout=5, server_settings={"application_name": APPLICATION_NAME})
        await conn.add_listener(ROOMS_CHANNEL, self._room_changed)
        await conn.add_listener(INSTANCES_CHANNEL, self._instance_changed)
        await conn.add_listener(OPENED_CHANNEL, self._rooms_opened)
        conn.add_termination_listener(self._lost)
        while True:
            seen = self._instances_version
            placed = dict(self._placed)
            rows = await conn.fetch(self._instances_sql, timeout=REFRESH_S)
            if seen != self._instances_version:
                continue  # an instance changed while it was read: read again
            if conn.is_closed():
                raise ConnectionError("the listening connection closed")
            self._instances = {r["id"]: dict(r) for r in rows}
            self._placed_read = placed
            if not self.live:
                self.live = True
                log.info("room cache on: listening for changes")
            self._refresh.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH_S):
                    await self._refresh.wait()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.close()
