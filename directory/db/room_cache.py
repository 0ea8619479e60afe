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

_INSTANCES_SQL = ("SELECT id, state, internal_url, public_base, last_heartbeat, registered_at "
                  "FROM instances")


class RoomCache:
    """Rooms looked up and every instance, usable while :attr:`live`."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
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

    # -- notifications --------------------------------------------------------

    def _room_changed(self, _conn: Any, _pid: int, _channel: str, room: str) -> None:
        self.version += 1
        self._rooms.pop(room, None)
        if len(self._notified) >= MAX_NOTIFIED:
            self._notified.clear()
            self._floor = self.version
        self._notified[room] = self.version

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
        conn = self._conn = await asyncpg.connect(self.dsn, timeout=5)
        await conn.add_listener(ROOMS_CHANNEL, self._room_changed)
        await conn.add_listener(INSTANCES_CHANNEL, self._instance_changed)
        conn.add_termination_listener(self._lost)
        while True:
            seen = self._instances_version
            rows = await conn.fetch(_INSTANCES_SQL, timeout=REFRESH_S)
            if seen != self._instances_version:
                continue  # an instance changed while it was read: read again
            if conn.is_closed():
                raise ConnectionError("the listening connection closed")
            self._instances = {r["id"]: dict(r) for r in rows}
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
