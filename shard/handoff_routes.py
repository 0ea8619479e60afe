"""The shard's live-handoff wiring: internal routes, the join gate, the tick hook.

``shard.handoff.Handoffs`` decides (pure); this module applies its answers to
the live rooms (docs/HANDOFF.md, "Shard wiring"):

- ``freeze`` snapshots the room and :meth:`LiveRoom.freeze` stops reading its
  members' sockets in the same loop turn, so no send is sequenced after the
  snapshot: unread sends wait in TCP buffers, unacked (that is the "hold").
  With a message store a room may have messages sequenced and not yet
  stored: it is frozen first, and snapshotted once they are stored (so the
  snapshot's seq is the last one given; the new owner goes on after it);
  if the store does not take them within the bound the freeze is refused
  (503 ``unavailable``, the room thawed) and the directory rolls back;
- ``release`` closes the room's clients with 4010 and drops the room (the
  unread sends are resent by the clients to the new owner, where the
  idempotency window from the snapshot answers retries of acked ids);
- ``abort`` sets the burnt epoch and thaws the room (the unread sends are then
  sequenced normally, acked on the same connection);
- ``adopt`` keeps a snapshot until a ticket at its epoch (or ``commit``)
  activates it with ``Room.from_snapshot``;
- every join with a valid ticket first goes through ``Handoffs.admit``.

Built by ``ShardServer``: it calls :meth:`HandoffWiring.gate` for every join
with a valid ticket, :meth:`HandoffWiring.tick` every slow tick and
:meth:`HandoffWiring.leave_with_drain` on SIGTERM; :meth:`HandoffWiring.install`
adds the routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from roomshard.config import ShardConfig
from roomshard.wire.errors import ErrorDetail
from roomshard.wire.internal import (
    HANDOFF_CALLS,
    Abort,
    Adopt,
    Commit,
    Discard,
    Freeze,
    HandoffBatch,
    HandoffResult,
    HandoffResults,
    Release,
)
from roomshard.wire.protocol import CloseCode, instance_number
from roomshard.wire.tickets import Ticket
from shard.directory_client import DirectoryClient, DirectoryError
from shard.handoff import Admission, HandoffError, Handoffs
from shard.http import HttpError, HttpRequest, HttpResponse, Router, convert, json_response
from shard.live_rooms import LiveRooms
from shard.room import SNAPSHOT_VERSION, Room
from shard.routes import DirectoryAuth, room_id, room_param

log = logging.getLogger("roomshard.shard.handoff")
# What Room.from_snapshot reads: checked at adopt time (building the room there would cost
# the pause a second full copy of the history).
SNAPSHOT_KEYS = frozenset({"room", "epoch", "owner_epoch", "seq_base", "lost", "seq",
                           "history_limit", "history", "idempotency_window", "idempotency",
                           "private", "allowed"})


#: Items per batch request: a drain's calls arrive in groups of its parallelism.
MAX_BATCH = 256
#: A freeze waits at most this long (and at most ``store_wait``) for a room's messages to be
#: stored: well within the directory's call timeout, so a refusal arrives as an answer.
MAX_SETTLE_S = 2.0


class HandoffWiring:
    """One per shard process: the :class:`Handoffs` table and its effects on the live_rooms."""

    def __init__(self, cfg: ShardConfig, live_rooms: LiveRooms, directory: DirectoryClient,
                 auth: DirectoryAuth, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.live_rooms = live_rooms
        self.directory = directory
        self.auth = auth
        self.clock = clock
        self.handoffs = Handoffs(cfg.instance)
        # Rooms frozen while their messages reach the store, before their freeze: the wait.
        self._settling: dict[str, asyncio.Future[bool]] = {}

    def install(self, router: Router) -> None:
        """Add the handoff routes."""
        for kind in HANDOFF_CALLS:
            router.add("POST", f"/internal/rooms/{{room}}/{kind}", self.route(kind))
        router.add("POST", "/internal/handoffs/{kind}", self.batch)
        router.add("GET", "/internal/handoffs", self.state)

    # -- joins ---------------------------------------------------------------
    def gate(self, ticket: Ticket) -> tuple[int, str] | None:
        """Every join with a valid ticket, before the room is looked up.

        None: proceed; else ``(close_code, reason)`` to refuse the join with.
        """
        if not self.handoffs.frozen and not self.handoffs.adopted and not self.handoffs.tombstones:
            return None
        adm = self.handoffs.admit(ticket.room, ticket.epoch, self.clock())
        if adm.kind == "proceed":
            return None
        if adm.kind == "refuse":
            assert adm.close_code is not None
            why = "room is mid-move" if adm.close_code == CloseCode.TRY_AGAIN_LATER \
                else "room moved to another instance"
            return adm.close_code, why
        if adm.kind == "activate":
            assert adm.snapshot is not None and adm.epoch is not None
            self._activate(ticket.room, adm.snapshot, adm.epoch)
        elif adm.kind == "unfrozen":
            self._unfreeze(ticket.room, adm)
        elif adm.kind == "stale":
            self.live_rooms.close_room(ticket.room, CloseCode.ROOM_MOVED, "room state is stale")
        return None

    def _activate(self, room: str, snapshot: dict[str, Any], epoch: int) -> None:
        cfg = self.cfg
        built = Room.from_snapshot(snapshot, instance=cfg.instance, epoch=epoch,
                                   owner_epoch=epoch, history_bytes_limit=cfg.history_bytes)
        self.live_rooms.adopt(built)
        log.info("room %s activated from a handoff at epoch %d (seq %d)", room, epoch, built.seq)

    def _unfreeze(self, room: str, adm: Admission) -> None:
        live = self.live_rooms.get(room)
        if live is None:
            return
        if adm.epoch is not None:
            live.room.epoch = max(live.room.epoch, adm.epoch)
        live.thaw()  # the sends waiting unread in TCP buffers are sequenced now

    # -- routes --------------------------------------------------------------
    def route(self, kind: str) -> Any:
        """``POST /internal/rooms/{room}/<kind>``: one call."""
        op = getattr(self, kind)

        async def one(req: HttpRequest) -> HttpResponse:
            self.auth.require(req)
            name = room_param(req)
            call = req.decode(HANDOFF_CALLS[kind])
            if call.room is not None:  # the room is the path's
                raise HttpError(400, "bad_request", "Object contains unknown field `room`")
            if isinstance(call, Freeze):
                settled = await self._settle([name])
                return json_response(self.freeze(name, call, settled=settled[name]))
            return json_response(op(name, call))

        return one

    async def batch(self, req: HttpRequest) -> HttpResponse:
        """``POST /internal/handoffs/<kind>`` ``{"items": [{"room", ...}]}``: many calls of one
        kind in one request and one loop turn, answered item by item (a drain's moves).

        ``{"results": [{"status": 200, "body": {...}} | {"status": 4xx, "error": {...}}]}``,
        in item order; a bad item fails alone."""
        self.auth.require(req)
        kind = req.params["kind"]
        spec = HANDOFF_CALLS.get(kind)
        if spec is None:
            raise HttpError(404, "not_found", f"no handoff call {kind!r}")
        items = req.decode(HandoffBatch).items
        if len(items) > MAX_BATCH:
            raise HttpError(400, "bad_request", f"at most {MAX_BATCH} items per batch")
        op = getattr(self, kind)
        settled: dict[str, bool | None] = {}
        if kind == "freeze":
            settled = await self._settle([item["room"] for item in items
                                          if isinstance(item, dict)
                                          and isinstance(item.get("room"), str)])
        results: list[HandoffResult] = []
        for item in items:
            try:
                call = convert(item, spec)
                name = room_id(call.room)
                body = (self.freeze(name, call, settled=settled.get(name))
                        if isinstance(call, Freeze) else op(name, call))
                results.append(HandoffResult(status=200, body=body))
            except HttpError as exc:
                results.append(HandoffResult(status=exc.status, error=ErrorDetail(
                    code=exc.code, message=exc.message)))
        return json_response(HandoffResults(results=results))

    async def _settle(self, names: list[str]) -> dict[str, bool | None]:
        """Before their freeze, rooms with messages on their way to the store: frozen now,
        then waited for until those are stored. Per room: None (nothing to wait for),
        True (frozen here, every message stored: snapshot it in this turn) or False (the
        store did not take them in time: thawed again, refuse the freeze)."""
        out: dict[str, bool | None] = dict.fromkeys(names)
        waits: dict[str, asyncio.Future[bool]] = {}
        for name in names:
            fut = self._settling.get(name)
            if fut is None:
                live = self.live_rooms.get(name)
                if live is None or live.frozen or not live.storing():
                    continue
                live.freeze()  # nothing more is sequenced: the wait ends
                fut = asyncio.ensure_future(
                    live.settle(min(self.cfg.store_wait, MAX_SETTLE_S)))
                self._settling[name] = fut
                fut.add_done_callback(self._settled_callback(name))
            waits[name] = fut
        if waits:
            done = await asyncio.gather(*(asyncio.shield(f) for f in waits.values()))
            out.update(zip(waits, done, strict=True))
        return out

    def _settled_callback(self, name: str) -> Callable[[asyncio.Future[bool]], None]:
        def done(_: asyncio.Future[bool]) -> None:
            self._settling.pop(name, None)

        return done

    def _thaw_unless_frozen(self, name: str) -> None:
        """Undo a freeze of :meth:`_settle` (unless a move froze the room meanwhile)."""
        live = self.live_rooms.get(name)
        if live is not None and live.frozen and name not in self.handoffs.frozen:
            live.thaw()

    def freeze(self, name: str, body: Freeze, *, settled: bool | None = None) -> dict[str, Any]:
        if settled is not None and (settled is False or (
                (live := self.live_rooms.get(name)) is not None and live.storing())):
            self._thaw_unless_frozen(name)
            raise HttpError(503, "unavailable",
                            f"room {name}: its messages could not be stored in time")
        try:
            return self._freeze(name, body, settled=settled is True)
        except HttpError:
            if settled:
                self._thaw_unless_frozen(name)
            raise

    def _freeze(self, name: str, body: Freeze, *, settled: bool) -> dict[str, Any]:
        adopted = self.handoffs.adopted.get(name)
        if adopted is not None and body.epoch > adopted.epoch:
            # The directory reserves a later epoch for a room here only once it owns it
            # here: the adoption was committed, no member has come back yet. Serve it.
            self.handoffs.commit(name, adopted.move_id)
            self._activate(name, adopted.snapshot, adopted.epoch)
        live = self.live_rooms.get(name)
        # ``settled``: frozen by _settle for this freeze, not by a move.
        unfrozen = live is not None and (not live.frozen or settled)
        snapshot = live.room.snapshot() if live is not None and unfrozen else None
        if live is not None and not unfrozen and name not in self.handoffs.frozen:
            raise HttpError(409, "moving", f"room {name} is frozen")
        try:
            snap = self.handoffs.freeze(name, body.move_id, body.epoch, snapshot,
                                        self.clock())
        except HandoffError as exc:
            raise HttpError(exc.status, exc.code, exc.message) from None
        if live is not None:
            live.freeze()  # same loop turn as the snapshot: nothing is sequenced in between
        return {"snapshot": snap}

    def adopt(self, name: str, body: Adopt) -> dict[str, Any]:
        missing = SNAPSHOT_KEYS - set(body.snapshot)
        if body.snapshot.get("version") != SNAPSHOT_VERSION or missing:
            raise HttpError(400, "bad_snapshot", f"not a version {SNAPSHOT_VERSION} room snapshot"
                            + (f" (missing {', '.join(sorted(missing))})" if missing else ""))
        try:
            self.handoffs.adopt(name, body.move_id, body.epoch, body.snapshot,
                                loaded=self.live_rooms.get(name) is not None,
                                now=self.clock())
        except HandoffError as exc:
            raise HttpError(exc.status, exc.code, exc.message) from None
        return {}

    def commit(self, name: str, body: Commit) -> dict[str, Any]:
        adopted = self.handoffs.commit(name, body.move_id)
        if adopted is not None:
            self._activate(name, adopted.snapshot, adopted.epoch)
        return {"activated": adopted is not None}

    def release(self, name: str, body: Release) -> dict[str, Any]:
        if instance_number(body.to) is None:
            raise HttpError(400, "bad_request", "to must be an instance id")
        live = self.live_rooms.get(name)
        try:
            released = self.handoffs.release(
                name, body.move_id, body.to, body.epoch, self.clock(),
                loaded_epoch=live.room.epoch if live is not None else None)
        except HandoffError as exc:
            raise HttpError(exc.status, exc.code, exc.message) from None
        if not released:
            return {"closed": 0, "stale": True}
        closed = self.live_rooms.close_room(name, CloseCode.ROOM_MOVED,
                                                 f"room moved to {body.to}")
        return {"closed": closed}

    def abort(self, name: str, body: Abort) -> dict[str, Any]:
        try:
            adm = self.handoffs.abort(name, body.move_id, body.epoch)
        except HandoffError as exc:
            raise HttpError(exc.status, exc.code, exc.message) from None
        if adm.kind == "unfrozen":
            self._unfreeze(name, adm)
        return {"unfrozen": adm.kind == "unfrozen"}

    def discard(self, name: str, body: Discard) -> dict[str, Any]:
        return {"discarded": self.handoffs.discard(name, body.move_id)}

    async def leave_with_drain(self, budget: float) -> None:
        """SIGTERM: ask the directory to live-move every room away while we still serve."""
        try:
            report = await self.directory.leave(drain=True, timeout=max(0.5, budget))
        except DirectoryError as exc:
            log.warning("drain before stopping did not finish: %s", exc)
            return
        log.warning("drained before stopping: %s of %s rooms moved, state %s",
                    report.get("moved"), report.get("total"), report.get("state"))

    async def state(self, req: HttpRequest) -> HttpResponse:
        """What is mid-move here (operators, tests): frozen and adopted rooms, tombstones."""
        self.auth.require(req)
        h = self.handoffs
        return json_response({
            "frozen": {r: {"move_id": f.move_id, "epoch": f.epoch} for r, f in h.frozen.items()},
            "adopted": {r: {"move_id": a.move_id, "epoch": a.epoch} for r, a in h.adopted.items()},
            "tombstones": len(h.tombstones)})

    def tick(self, now: float) -> None:
        self.handoffs.expire(now)
