"""The shard server: builds the parts, admits joins, runs the timers and the lease.

Lifecycle: :meth:`ShardServer.start` binds the port and starts heartbeating;
the shard is *ready* (``/readyz`` 200, joins admitted) once a heartbeat
succeeded and while its lease holds. :meth:`ShardServer.shutdown` stops
accepting, closes every client with 1001, tells the directory, waits at
most ``shutdown_timeout``.

Lease fencing: the lease runs from the *send* time of the last heartbeat
the directory acknowledged. When ``lease`` seconds pass without one (shorter
than the directory's ``down_after``), the shard closes every room's members
with 1001 and refuses joins with 1013 until a heartbeat succeeds again, so
a partitioned shard never serves a room the directory has re-placed. The
rooms' state stays in memory, *unconfirmed*: the next acknowledged heartbeat
carries their names and epochs, and the directory answers which it still
assigns here at exactly that epoch (a re-placement always bumps the epoch).
Those are served again, with their history; the others are dropped. A failed
heartbeat is retried within ~0.25 s, so a directory restart shorter than the
lease costs nothing at all.

Timers are plain loop callbacks, not tasks: one tick (lease, linger
eviction, the used-ticket set, the live handoff's expiries, rates) and one
ping round for all connections.

This module is the shard's composition root: it builds the parts and hands
each the state it needs (nothing below imports it). Connections report to
the server through :class:`shard.connection.ConnectionEvents`; the rooms
write through the :class:`shard.writer.Writer`; the live handoff
(:class:`shard.handoff_routes.HandoffWiring`) sees every join with a valid
ticket first (:meth:`HandoffWiring.gate`: it may activate an adopted room,
or refuse the join with a close code).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from websockets.frames import CloseCode as WsCloseCode
from websockets.frames import Opcode

from roomshard.config import ShardConfig, linger_limits
from roomshard.linger import LingerPool
from roomshard.store.commit import GroupCommit
from roomshard.store.messages import STORE_ERRORS, MessageStore, SeqTaken
from roomshard.wire.internal import (
    HistoryMessage,
    HistoryPage,
    InstanceLoad,
    PublishCall,
    Published,
)
from roomshard.wire.protocol import (
    HISTORY_PAGE,
    INVALID_USER_ID,
    MAX_CLIENT_MESSAGE_ID,
    MAX_HISTORY_PAGE,
    CloseCode,
    bounded_int,
    valid_message_id,
    valid_user_id,
)
from roomshard.wire.tickets import Signer, Ticket
from shard import routes
from shard.admission import Admission, Refused
from shard.connection import Connection, ConnectionContext
from shard.directory_client import (
    DirectoryClient,
    DirectoryError,
    DirectoryRefused,
    DirectoryUnavailable,
)
from shard.frames import server_frame
from shard.handoff_routes import HandoffWiring
from shard.http import HttpError, HttpRequest, HttpResponse, Router, json_response
from shard.live_rooms import (
    LiveRoom,
    LiveRooms,
    Pending,
    Publication,
    RoomContext,
    StoreUnavailable,
    deliver_stored,
)
from shard.metrics import MetricsSources, ShardMetrics
from shard.room import StoredRun
from shard.stats import Stats
from shard.writer import Writer

log = logging.getLogger("roomshard.shard")

#: A publish waits at most this long for its message to be stored (the directory's own
#: bound on a publish is the contract's 5 s; the message may still be stored later, and a
#: retry with the same id then gets its seq).
PUBLISH_WAIT_S = 4.0
#: Retention: how often a shard deletes expired messages (jittered, so shards sharing a
#: store take turns), and how many one transaction deletes.
EXPIRE_EVERY_S = 60.0
EXPIRE_BATCH = 1000


def _int_query(req: HttpRequest, name: str, low: int, high: int | None) -> int | None:
    """An integer query parameter within ``[low, high]``; None when absent; 400 otherwise."""
    raw = req.query.get(name)
    if raw is None:
        return None
    value = bounded_int(raw, low, high)
    if value is None:
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise HttpError(400, "bad_request", f"{name} must be an integer, {bound}")
    return value


TICK_S = 0.25
SLOW_TICKS = 8  # eviction, ticket purge and rates every 2 s
#: A room's open that finds the directory unavailable is retried (50 ms doubling to 0.5 s,
#: with jitter) for this long before its clients are told 1013: a directory busy with a
#: connect storm, or restarting, costs them a wait, not a refusal and a reconnect.
OPEN_RETRY_S = 2.0
HEARTBEAT_RETRY_S = 0.25  # after a failed heartbeat, the next one within 0.25-0.375 s
CHANNEL_RETRY_S, CHANNEL_RETRY_MAX_S = 0.1, 2.0  # the control channel's reopening backoff
# lease + this <= the directory's down_after (default 6 + 2 <= 10): the margin for
# clock rates, a heartbeat in flight and the close of every member.
MIN_LEASE_MARGIN_S = 2.0
_PING_FRAME = server_frame(Opcode.PING, b"roomshard")


class ShardServer:
    def __init__(self, cfg: ShardConfig, directory: DirectoryClient, *,
                 store: MessageStore | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 boot_id: str | None = None, remove_on_leave: bool = False) -> None:
        self.cfg = cfg
        # A numbered-by-the-directory shard (--instance auto) leaves the registry when it
        # stops: its number, and its route, are free for the next machine.
        self.remove_on_leave = remove_on_leave
        self.clock = clock
        self.monotonic = monotonic
        self.signer = Signer(cfg.cluster_secrets)
        self.directory = directory
        self.stats = Stats()
        self.writer = Writer()
        self.ws_conns: set[Connection] = set()
        self.lingering = LingerPool(linger_limits(cfg))  # connections in a lingering close
        # With a message store, a message is stored before it is broadcast and acked.
        self.store = store
        self.commit: GroupCommit[Pending] | None = None
        if store is not None:
            self.commit = GroupCommit(self._store, deliver_stored, rejected=self._not_stored,
                                      permanent=(SeqTaken,),
                                      max_bytes=cfg.store_queue_bytes, max_age=cfg.store_wait,
                                      clock=monotonic, linger=cfg.store_linger)
        self.live_rooms = LiveRooms(RoomContext(cfg, self.stats, self.writer, clock, monotonic,
                                                self.commit, store, self.holds_lease),
                                    directory, self.ready)
        auth = routes.DirectoryAuth(self.signer, cfg.instance, clock)
        self._conn_ctx = ConnectionContext(cfg, self.stats, self.writer, self.lingering, self,
                                           monotonic, auth.trusted)
        self.metrics = ShardMetrics(MetricsSources(cfg.instance, self.stats, self.live_rooms,
                                                   self.ws_conns, self.lingering, self.ready,
                                                   self.commit))
        self.router = Router()
        self.boot_id = boot_id or secrets.token_hex(8)
        routes.install(self.router, instance=cfg.instance, boot_id=self.boot_id, auth=auth,
                       not_ready=self.not_ready,
                       render_metrics=self.metrics.render, live_rooms=self.live_rooms,
                       store_state=self.store_state)
        self.handoff = HandoffWiring(cfg, self.live_rooms, directory, auth, clock)
        self.handoff.install(self.router)
        self._auth = auth
        self.router.add("POST", "/internal/rooms/{room}/publish", self._publish_route)
        self.router.add("GET", "/internal/rooms/{room}/messages", self._history_route)
        self.started_at = clock()
        self.url = ""
        self._next_conn_id = 0
        self.admission = Admission(cfg, self.signer, self.started_at)
        self.registered = False
        self.retired = False  # an admin removed this instance: this process may not register
        self.lease_until = 0.0
        self.fenced = False
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._ticks = 0
        self._last_rate_at = monotonic()
        self._last_messages = 0
        self.messages_per_s = 0.0
        self._hb_failures = 0
        self._ping_rounds = 0  # the number of the latest ping round
        self.conns_per_address: dict[str, int] = {}  # WebSockets per peer address (when capped)

    # -- lifecycle ----------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on ``sock`` (bound already: ``--instance auto`` needed its address to claim
        a number) or on the configured host and port."""
        loop = asyncio.get_running_loop()
        if self.store is not None:
            await self.store.open()
        if sock is not None:
            self._server = await loop.create_server(lambda: Connection(self._conn_ctx),
                                                    sock=sock, backlog=4096)
        else:
            self._server = await loop.create_server(lambda: Connection(self._conn_ctx),
                                                    self.cfg.host, self.cfg.port, backlog=4096)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        log.warning("roomshard shard %s listening on %s", self.cfg.instance, self.url)
        self._spawn(self._heartbeat_loop())
        if self.store is not None:
            self._spawn(self._expire_loop())
        self._timers["tick"] = loop.call_later(TICK_S, self._tick)
        self._timers["ping"] = loop.call_later(self.cfg.ping_interval, self._ping_round)

    def ready(self) -> bool:
        return self.registered and not self.fenced and not self.stopping \
            and not self.retired and self.monotonic() < self.lease_until

    def holds_lease(self) -> bool:
        """Whether the lease holds; past it, fence now rather than at the next tick (a
        loop that stalled reads its sockets before it runs its timers)."""
        if self.monotonic() < self.lease_until:
            return True
        if self.registered and not self.fenced and not self.stopping:
            self._fence()
        return False

    def store_state(self) -> dict[str, object] | None:
        """How the message store fares (``/readyz``); None without one."""
        commit = self.commit
        if commit is None:
            return None
        return {"state": "failing" if commit.failing else "ok",
                "waiting_messages": commit.waiting_items,
                "oldest_wait_s": round(commit.oldest_age(), 3)}

    def not_ready(self) -> str | None:
        """Why the shard is not ready (``/readyz``); None when it is."""
        if self.ready():
            return None
        return ("stopping" if self.stopping
                else "removed from the registry (retired): stop this process" if self.retired
                else "lease lost" if self.fenced
                else "not registered with the directory" if not self.registered
                else "lease expired")

    async def shutdown(self) -> None:
        """Stop accepting, close clients with 1001, leave the directory; bounded by shutdown_timeout."""
        if self.registered and not self.retired:  # rooms move away first, live
            await self.handoff.leave_with_drain(self.cfg.shutdown_timeout / 2)
        self.stopping = True
        deadline = self.monotonic() + self.cfg.shutdown_timeout
        if self._server is not None:
            self._server.close()
        if self.commit is not None and not await self.commit.flush(self.cfg.shutdown_timeout / 3):
            log.warning("shutting down with messages not stored: their senders were not acked "
                        "and send them again")
        closed = self.live_rooms.close_all(CloseCode.GOING_AWAY, "shard shutting down")
        for conn in list(self.ws_conns):
            conn.close(CloseCode.GOING_AWAY, "shard shutting down")
        log.warning("shutting down: closed %d clients", closed)
        try:
            if not self.retired:  # a retired instance is no longer in the registry
                await self.directory.leave(drain=False, remove=self.remove_on_leave,
                                           timeout=max(0.5, self.cfg.shutdown_timeout / 3))
        except DirectoryError as exc:
            log.warning("could not tell the directory we leave: %s", exc)
        while self.ws_conns and self.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.ws_conns):
            conn.abort()
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.commit is not None:
            await self.commit.close()
        if self.store is not None:
            await self.store.close()
        await self.directory.aclose()

    async def _store(self, batch: list[Pending]) -> None:
        assert self.store is not None
        await self.store.write([p.message for p in batch])

    def _not_stored(self, batch: list[Pending], error: Exception) -> None:
        """The store refused a batch for good (a seq another shard stored first: the room
        was placed elsewhere meanwhile): its rooms' members ask the directory again."""
        for live in {id(p.live): p.live for p in batch}.values():
            if self.live_rooms.get(live.name) is live:
                log.warning("closing room %s: its messages could not be stored (%s)", live.name,
                            error.__class__.__name__)
                self.live_rooms.close_room(live.name, CloseCode.TRY_AGAIN_LATER,
                                           "the room's messages could not be stored")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- admission ---------------------------------------------------------
    def admit(self, conn: Connection, request: HttpRequest) -> None:
        """Decide about a WebSocket that just got its 101; closes it with a code or joins it."""
        self.ws_conns.add(conn)
        if self.cfg.max_connections_per_address:
            self.conns_per_address[conn.address] = self.conns_per_address.get(conn.address, 0) + 1
        try:
            admitted = self.admission.check(
                request, now=self.clock(), ready=self.ready(), sockets=len(self.ws_conns),
                from_address=self.conns_per_address.get(conn.address, 0), address=conn.address)
        except Refused as r:
            self._refuse(conn, r)
            return
        ticket, since = admitted.ticket, admitted.since
        verdict = self.handoff.gate(ticket)
        if verdict is not None:
            self._refuse(conn, Refused(*verdict))
            return
        live = self.live_rooms.get(ticket.room)
        if live is not None and ticket.epoch <= live.room.epoch:
            self._join(conn, live, ticket, since)
        else:
            self._spawn(self._open_and_join(conn, ticket, since))

    async def _open_and_join(self, conn: Connection, ticket: Ticket, since: int | None) -> None:
        try:
            live = await self._load(ticket.room, ticket.epoch)
        except Refused as refusal:
            self._refuse(conn, refusal)
            return
        self._join(conn, live, ticket, since)

    async def _load(self, name: str, epoch: int) -> LiveRoom:
        """The room in memory for a caller that holds ``epoch`` (a ticket's, a publish's):
        opened (asking the directory) when it is not in memory, a stale copy replaced.
        Raises :class:`Refused` with the close code to answer."""
        live = self.live_rooms.get(name)
        if live is not None and epoch > live.room.epoch:
            # The room changed hands while we held an old copy: ours is stale.
            log.warning("room %s in memory at epoch %d is stale (ticket epoch %d)",
                        name, live.room.epoch, epoch)
            self.live_rooms.close_room(name, CloseCode.GOING_AWAY, "room state is stale")
        elif live is not None:  # another open finished meanwhile: no second one
            return live  # (it would call the state lost)
        try:
            live = await self._open(name, epoch)
        except DirectoryRefused as exc:
            code = CloseCode.TRY_AGAIN_LATER if exc.code == "moving" else CloseCode.NOT_OWNER
            raise Refused(code, f"directory: {exc.code}") from None
        except DirectoryError as exc:
            log.warning("could not open room %s: %s", name, exc)
            raise Refused(CloseCode.TRY_AGAIN_LATER, "directory unavailable") from None
        if not self.ready():
            raise Refused(CloseCode.TRY_AGAIN_LATER, "shard not ready")
        return live

    async def _open(self, name: str, epoch: int) -> LiveRoom:
        """``live_rooms.open``, retried within :data:`OPEN_RETRY_S` while the directory is
        unavailable and this shard holds its lease (the retries keep the open's id)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPEN_RETRY_S
        pause = 0.05
        while True:
            try:
                return await self.live_rooms.open(name, epoch)
            except DirectoryUnavailable as exc:
                wait = pause * (0.5 + random.random())
                if not self.ready() or loop.time() + wait > deadline:
                    raise
                log.info("opening room %s: %s; retrying in %.2f s", name, exc, wait)
            await asyncio.sleep(wait)
            pause = min(pause * 2, 0.5)

    def _serving(self, live: LiveRoom, epoch: int) -> Refused | None:
        """Why a caller holding ``epoch`` may not use ``live`` now (None: it may)."""
        if self.live_rooms.get(live.name) is not live:  # closed or replaced while we read
            return Refused(CloseCode.TRY_AGAIN_LATER, "room is reopening")
        if live.frozen:
            return Refused(CloseCode.TRY_AGAIN_LATER, "room is moving")
        if live.unconfirmed:
            return Refused(CloseCode.TRY_AGAIN_LATER, "room not confirmed by the directory yet")
        if epoch < live.room.owner_epoch:
            return Refused(CloseCode.NOT_OWNER, "stale ticket epoch")
        return None

    def _join(self, conn: Connection, live: LiveRoom, ticket: Ticket, since: int | None,
              stored: StoredRun | None = None) -> None:
        if conn.closed:
            return
        refusal = self._serving(live, ticket.epoch)
        if refusal is not None:
            return self._refuse(conn, refusal)
        if not live.room.may_join(ticket.user):
            return self._refuse(conn, Refused(CloseCode.TICKET_MISMATCH, "not a member of this room"))
        if (stored is None and since is not None and self.store is not None
                and live.room.before_window(since)):
            self._spawn(self._join_from_store(conn, live, ticket, since))
            return None
        self._next_conn_id += 1
        live.join(conn, self._next_conn_id, ticket.user, since, stored)
        return None

    async def _join_from_store(self, conn: Connection, live: LiveRoom, ticket: Ticket,
                               since: int) -> None:
        """A resume from before the history window: ask the store what it holds there
        first (the welcome says whether the resume is recovered)."""
        try:
            stored = await self.live_rooms.stored_run(live.room, since)
        except StoreUnavailable as exc:
            log.warning("could not resume in room %s: %s", ticket.room, exc)
            self._refuse(conn, Refused(CloseCode.TRY_AGAIN_LATER, "message store unavailable"))
            return
        self._join(conn, live, ticket, since, stored)

    # -- retention ----------------------------------------------------------------------
    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S * random.uniform(0.8, 1.2))
            await self.expire_once()

    async def expire_once(self) -> int:
        """Delete the stored messages older than ``history_retention``, ``EXPIRE_BATCH`` per
        transaction (so no write of a live room waits long behind it), and drop them from
        the rooms' history in memory; how many were deleted. A store that does not answer
        is tried again next time."""
        assert self.store is not None
        horizon = self.clock() - self.cfg.history_retention
        for live in self.live_rooms.rooms.values():
            live.room.expire(horizon)
        deleted = 0
        try:
            while True:
                n = await self.store.expire(horizon, EXPIRE_BATCH)
                deleted += n
                self.stats.store_expired += n
                if n < EXPIRE_BATCH:
                    break
                await asyncio.sleep(0.01)  # the next batch after the writes that queued meanwhile
        except STORE_ERRORS as exc:
            log.warning("expiring old messages failed (tried again later): %s",
                        exc.__class__.__name__)
        if deleted:
            log.info("expired %d messages stored before %.0f", deleted, horizon)
        return deleted

    # -- the server API: messages from application backends, history in memory -------------
    async def _publish_route(self, req: HttpRequest) -> HttpResponse:
        """``POST /internal/rooms/{room}/publish`` (:class:`PublishCall`): the directory hands
        a message of the server API to the room's owner; answered once it has its seq (with
        a store: once stored). 409 ``moving`` / ``not_owner`` and 503 tell the directory to
        try again (after a move, at the new owner)."""
        self._auth.require(req)
        name = routes.room_param(req)
        call = req.decode(PublishCall)
        if not valid_message_id(call.id):
            raise HttpError(400, "bad_request",
                            f"id must be a string of 1..{MAX_CLIENT_MESSAGE_ID} characters")
        if not valid_user_id(call.user):
            raise HttpError(400, "invalid_user", INVALID_USER_ID)
        if len(call.text) > self.cfg.max_text:
            raise HttpError(400, "too_long", f"text is over {self.cfg.max_text} characters")
        if not self.ready():
            raise HttpError(503, "not_ready", f"shard {self.cfg.instance}: {self.not_ready()}")
        verdict = self.handoff.gate(Ticket(room=name, instance=self.cfg.instance,
                                           epoch=call.epoch, user=call.user, jti="", iat=0.0,
                                           exp=0.0))
        try:
            if verdict is not None:
                raise Refused(*verdict)
            live = await self._load(name, call.epoch)
            refusal = self._serving(live, call.epoch)
            if refusal is not None:
                raise refusal
        except Refused as r:
            code = "moving" if r.code == CloseCode.TRY_AGAIN_LATER else "not_owner"
            raise HttpError(409, code, f"room {name}: {r.reason}") from None
        publication = Publication(call.user)
        live.send(publication, call.id, call.text)
        try:
            answer = await asyncio.wait_for(asyncio.shield(publication.answer), PUBLISH_WAIT_S)
        except TimeoutError:
            raise HttpError(503, "unavailable", "the message store did not store it in time; "
                            "send it again (same id)") from None
        if answer.get("type") != "ack":
            raise HttpError(503, str(answer.get("code", "unavailable")),
                            str(answer.get("message", "not sent")))
        return json_response(Published(room=name, seq=answer["seq"], id=call.id))

    async def _history_route(self, req: HttpRequest) -> HttpResponse:
        """``GET /internal/rooms/{room}/messages?before=SEQ&limit=N``: the room's messages in
        memory (the history API without a store); empty for a room not in memory."""
        self._auth.require(req)
        name = routes.room_param(req)
        before = _int_query(req, "before", 1, None)
        limit = _int_query(req, "limit", 1, MAX_HISTORY_PAGE)
        live = self.live_rooms.get(name)
        if live is None:
            return json_response(HistoryPage(room=name, messages=[], more=False))
        payloads, more = live.room.page(before, limit or HISTORY_PAGE)
        messages = [msgspec.json.decode(p, type=HistoryMessage) for p in payloads]
        return json_response(HistoryPage(room=name, messages=messages, more=more))

    def _refuse(self, conn: Connection, refusal: Refused) -> None:
        self.stats.refused[refusal.code] = self.stats.refused.get(refusal.code, 0) + 1
        log.info("refused a client with %d: %s", refusal.code, refusal.reason)
        conn.close(refusal.code, refusal.reason)

    def detach(self, conn: Connection) -> None:
        """Take ``conn`` out of its room (presence leave to the others); idempotent."""
        room = conn.room
        if room is not None:
            room.leave(conn)

    def forget(self, conn: Connection) -> None:
        """The TCP connection is gone."""
        self.detach(conn)
        if conn in self.ws_conns:
            self.ws_conns.discard(conn)
            count = self.conns_per_address.get(conn.address, 0)
            if count > 1:
                self.conns_per_address[conn.address] = count - 1
            else:
                self.conns_per_address.pop(conn.address, None)

    # -- HTTP -----------------------------------------------------------
    async def handle_http(self, request: HttpRequest) -> HttpResponse:
        return await self.router.dispatch(request)

    # -- control plane --------------------------------------------------------
    def load(self) -> InstanceLoad:
        joined = sum(lr.connection_count() for lr in self.live_rooms.rooms.values())
        return InstanceLoad(rooms=len(self.live_rooms), connections=joined,
                            messages_per_s=round(self.messages_per_s, 2))

    async def _channel_loop(self) -> None:
        """Hold the control channel to the directory for this process's life.

        The operating system closes it the moment this process ends (SIGKILL
        included), so the directory learns of a crash at once instead of after
        ``down_after`` (docs/HANDOFF.md, "A dead shard"). Reopened with backoff
        (0.1 s doubling to 2 s, jittered) whenever it ends; a directory without
        the route (404/405) is not asked again. The lease is untouched: the channel
        only adds a signal, heartbeats still keep this shard serving.
        """
        delay = CHANNEL_RETRY_S
        while not self.stopping:
            opened = self.monotonic()
            try:
                await self.directory.hold_channel(self.boot_id)
            except DirectoryRefused as exc:
                if exc.status in (404, 405):
                    log.info("the directory has no control channel: heartbeats only")
                    return
                log.warning("control channel refused by the directory: %s", exc)
            except DirectoryError as exc:
                log.info("control channel to the directory ended: %s", exc)
            if self.stopping:
                return
            if self.monotonic() - opened > CHANNEL_RETRY_MAX_S:
                delay = CHANNEL_RETRY_S  # it was up a while: this is a new outage
            await asyncio.sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, CHANNEL_RETRY_MAX_S)

    async def _heartbeat_loop(self) -> None:
        """Heartbeat every ``heartbeat_interval``; after a failure, retry within ~0.25 s.

        A directory restart (a deploy) is a few seconds of refused
        connections: the quick retries reach the new process as soon as it
        listens, well before the lease runs out. Rooms kept through a lost
        lease ride along (``confirm``) and are served again only once the
        answer says the directory still assigns them here at their epoch.
        """
        cfg = self.cfg
        internal_url = cfg.advertise_url or self.url
        while not self.stopping:
            sent_at = self.monotonic()
            confirm = self.live_rooms.unconfirmed()
            try:
                answer = await self.directory.heartbeat(
                    internal_url=internal_url, public_base=cfg.public_base,
                    capacity=cfg.capacity, boot_id=self.boot_id, load=self.load(),
                    confirm=confirm or None,
                    # A slow directory still renews the lease as long as the answer
                    # comes before the lease would run out anyway.
                    timeout=max(0.5, cfg.lease - cfg.heartbeat_interval))
            except DirectoryRefused as exc:
                if exc.code == "instance_retired":
                    # Removed by an admin (`roomshard admin retire`): registering again would
                    # put this process back into the load balancer. Nothing is left to do
                    # but to be stopped; /readyz says so.
                    self.retired = True
                    log.error("%s was removed from the registry: this process no longer "
                              "heartbeats and will not serve; stop it (%s)", cfg.instance, exc)
                    return
                if confirm:
                    # A directory that cannot confirm (e.g. an older version): the kept
                    # rooms cannot be proven ours, so they go, as before this rule existed.
                    log.warning("the directory refused to confirm kept rooms (%s): dropping "
                                "%d rooms", exc, len(confirm))
                    for name in confirm:
                        self.live_rooms.close_room(name, CloseCode.GOING_AWAY, "room not confirmed")
                    continue
                self._hb_failures += 1
                log.warning("heartbeat refused by the directory: %s", exc)
                await asyncio.sleep(cfg.heartbeat_interval)
                continue
            except DirectoryError as exc:
                self._hb_failures += 1
                if self._hb_failures in (1, 5) or self._hb_failures % 30 == 0:
                    log.warning("heartbeat to the directory failed (%d in a row): %s",
                                self._hb_failures, exc)
                elapsed = self.monotonic() - sent_at
                retry = HEARTBEAT_RETRY_S * (1 + random.random() / 2)  # jitter: no herd
                await asyncio.sleep(max(0.0, min(retry, cfg.heartbeat_interval) - elapsed))
                continue
            self._hb_failures = 0
            self.lease_until = sent_at + cfg.lease
            if confirm:
                kept, dropped = self.live_rooms.confirm(confirm, set(answer.owned or ()))
                log.warning("the directory confirmed %d kept rooms, %d were placed elsewhere",
                            kept, dropped)
            if self.fenced:
                log.warning("heartbeats succeed again: serving rooms")
                self.fenced = False
            if not self.registered:
                self.registered = True
                log.warning("registered with the directory at %s", cfg.directory_url)
                self._spawn(self._channel_loop())
                down_after = answer.down_after
                if down_after - cfg.lease < MIN_LEASE_MARGIN_S:
                    # The contract's rule needs the shard to stop before the directory
                    # calls it down; say so loudly (the directory's setting may be on purpose).
                    log.error("ROOMSHARD_LEASE (%.1fs) leaves less than %.1fs before the "
                              "directory's down_after (%.1fs): a partitioned shard may still "
                              "serve rooms the directory re-places", cfg.lease,
                              MIN_LEASE_MARGIN_S, down_after)
                self._write_ready_file()
            elapsed = self.monotonic() - sent_at
            await asyncio.sleep(max(0.0, cfg.heartbeat_interval - elapsed))

    def _write_ready_file(self) -> None:
        if self.cfg.ready_file:
            path = Path(self.cfg.ready_file)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps({"url": self.url}))
            os.replace(tmp, path)

    def _fence(self) -> None:
        """The lease ran out: stop serving every room (see the module docstring).

        Members are closed with 1001 (they resume with ``since``); the rooms'
        state stays in memory, unconfirmed, and is served again only if the
        directory confirms it never placed them elsewhere.
        """
        self.fenced = True
        closed = self.live_rooms.suspend_all(CloseCode.GOING_AWAY, "shard lost its lease")
        log.warning("no heartbeat acknowledged for %.1fs: lease lost, stopped serving %d rooms "
                    "(%d clients closed); their state is kept until the directory confirms it",
                    self.cfg.lease, len(self.live_rooms), closed)

    # -- timers ---------------------------------------------------------------
    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        if self.stopping:
            return
        self._timers["tick"] = loop.call_later(TICK_S, self._tick)
        self.holds_lease()  # fences the shard once its lease has run out
        self._ticks += 1
        if self._ticks % SLOW_TICKS:
            return
        now = self.clock()
        self.live_rooms.evict_idle(now, self.cfg.room_linger)
        self.handoff.tick(now)
        self.admission.forget_expired(now)
        mono = self.monotonic()
        elapsed = mono - self._last_rate_at
        self._last_rate_at = mono
        if elapsed > 0:
            self.messages_per_s = (self.stats.messages_out - self._last_messages) / elapsed
            self._last_messages = self.stats.messages_out
            for live in self.live_rooms.rooms.values():
                live.update_rate(elapsed)

    def _ping_round(self) -> None:
        """Ping every joined connection; check the answers ``ping_timeout`` later.

        Each round has a number; a connection remembers the round of its
        unanswered ping and any pong clears it. A round's check looks only at
        its own pings, so a later round (due first when ``ping_timeout`` >=
        ``ping_interval``) never makes an answered ping look unanswered, and a
        connection with a ping still unanswered is not pinged again.
        """
        if self.stopping:
            return
        loop = asyncio.get_running_loop()
        self._timers["ping"] = loop.call_later(self.cfg.ping_interval, self._ping_round)
        self._ping_rounds += 1
        round_no = self._ping_rounds
        pinged = []
        for conn in self.ws_conns:
            # A closing connection (it may linger for a while) is not pinged: its
            # close frame is out, and its end is the linger's bounds.
            if (conn.room is not None and not conn.closing and not conn.closed
                    and not conn.ping_outstanding):
                conn.ping_outstanding = round_no
                conn.queue(_PING_FRAME)
                pinged.append(conn)
        if pinged:
            self._timers["ping_check"] = loop.call_later(
                self.cfg.ping_timeout, self._ping_check, pinged, round_no)

    def _ping_check(self, pinged: list[Connection], round_no: int) -> None:
        if self.stopping:
            return
        for conn in pinged:
            if conn.ping_outstanding == round_no and not conn.closing and not conn.closed:
                self.stats.ping_timeouts += 1
                log.info("no pong from %s within %.1fs: closing", conn.user, self.cfg.ping_timeout)
                conn.close(WsCloseCode.INTERNAL_ERROR, "ping timeout")  # nobody reads it
                conn.abort()
