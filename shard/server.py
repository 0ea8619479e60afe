"""The shard server: admission, the write flush, timers, the lease, the HTTP routes.

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
eviction, the used-ticket set, rates) and one ping round for all
connections.

Extension points (for ``shard/handoff.py``, installed by
``shard.main.install_extensions``): ``router.add(...)`` for its routes,
``join_gates`` (each called with a valid ticket before the room is looked
up; it may adjust the registry, e.g. activate an adopted room, and returns
``None`` to proceed or ``(close_code, reason)`` to refuse) and
``tick_hooks`` (called with wall-clock ``now`` every slow tick, ~2 s).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from roomshard.config import ShardConfig, linger_limits
from roomshard.linger import LingerPool
from roomshard.protocol import CloseCode, valid_room_id
from roomshard.tickets import Signer, Ticket, TicketError
from shard import routes
from shard.connection import Connection
from shard.directory_client import DirectoryClient, DirectoryError, DirectoryRefused
from shard.frames import server_frame
from shard.http import HttpRequest, HttpResponse, Router
from shard.metrics import ShardMetrics, Stats
from shard.registry import LiveRoom, RoomRegistry

log = logging.getLogger("roomshard.shard")

TICK_S = 0.25
SLOW_TICKS = 8  # eviction, ticket purge and rates every 2 s
HEARTBEAT_RETRY_S = 0.25  # after a failed heartbeat, the next one within 0.25-0.375 s
# lease + this <= the directory's down_after (default 6 + 2 <= 10): the margin for
# clock rates, a heartbeat in flight and the close of every member.
MIN_LEASE_MARGIN_S = 2.0
_PING_FRAME = server_frame(0x9, b"roomshard")
_SINCE_RE = re.compile(r"[0-9]{1,20}")  # ASCII digits only ("²".isdigit() is true)


class Refused(Exception):
    """An admission refusal: the WebSocket is closed with ``code`` after the 101."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ShardServer:
    def __init__(self, cfg: ShardConfig, directory: DirectoryClient, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.monotonic = monotonic
        self.signer = Signer(cfg.cluster_secrets)
        self.directory = directory
        self.registry = RoomRegistry(self, directory)
        self.stats = Stats()
        self.metrics = ShardMetrics(self)
        self.router = Router()
        routes.install(self)
        self.started_at = clock()
        self.boot_id = secrets.token_hex(8)
        self.url = ""
        self.dirty: list[Connection] = []
        self._flush_scheduled = False
        self.ws_conns: set[Connection] = set()
        self.lingering = LingerPool(linger_limits(cfg))  # connections in a lingering close
        self._next_conn_id = 0
        self.used_tickets: dict[str, float] = {}  # jti -> exp
        self.registered = False
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
        self.join_gates: list[Callable[[Ticket], tuple[int, str] | None]] = []
        self.tick_hooks: list[Callable[[float], None]] = []

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), self.cfg.host,
                                                self.cfg.port, backlog=4096)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        log.warning("roomshard shard %s listening on %s", self.cfg.instance, self.url)
        self._spawn(self._heartbeat_loop())
        self._timers["tick"] = loop.call_later(TICK_S, self._tick)
        self._timers["ping"] = loop.call_later(self.cfg.ping_interval, self._ping_round)

    def ready(self) -> bool:
        return self.registered and not self.fenced and not self.stopping \
            and self.monotonic() < self.lease_until

    async def shutdown(self) -> None:
        """Stop accepting, close clients with 1001, leave the directory; bounded by shutdown_timeout."""
        handoff = getattr(self, "handoff", None)  # live handoff installed: rooms move away first
        if handoff is not None and self.registered:
            await handoff.leave_with_drain(self.cfg.shutdown_timeout / 2)
        self.stopping = True
        deadline = self.monotonic() + self.cfg.shutdown_timeout
        if self._server is not None:
            self._server.close()
        closed = self.registry.close_all(CloseCode.GOING_AWAY, "shard shutting down")
        for conn in list(self.ws_conns):
            conn.close(CloseCode.GOING_AWAY, "shard shutting down")
        log.warning("shutting down: closed %d clients", closed)
        try:
            await self.directory.leave(drain=False, timeout=max(0.5, self.cfg.shutdown_timeout / 3))
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
        await self.directory.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- writes: one flush per loop turn ---------------------------------------
    def mark_dirty(self, conn: Connection) -> None:
        self.dirty.append(conn)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()

    # -- admission ---------------------------------------------------------
    def admit(self, conn: Connection, request: HttpRequest) -> None:
        """Decide about a WebSocket that just got its 101; closes it with a code or joins it."""
        self.ws_conns.add(conn)
        if self.cfg.max_connections_per_address:
            self.conns_per_address[conn.address] = self.conns_per_address.get(conn.address, 0) + 1
        try:
            ticket, since = self._check(request, conn.address)
        except Refused as r:
            self._refuse(conn, r)
            return
        for gate in self.join_gates:
            verdict = gate(ticket)
            if verdict is not None:
                self._refuse(conn, Refused(*verdict))
                return
        live = self.registry.get(ticket.room)
        if live is not None and ticket.epoch <= live.room.epoch:
            self._join(conn, live, ticket, since)
        else:
            self._spawn(self._open_and_join(conn, ticket, since))

    def _check(self, request: HttpRequest, address: str) -> tuple[Ticket, int | None]:
        cfg = self.cfg
        parts = request.path.split("/")
        if len(parts) != 4 or parts[0] or parts[2] != "room" or parts[1] != cfg.instance:
            raise Refused(CloseCode.NOT_OWNER, f"not a room path of instance {cfg.instance}")
        room = parts[3]
        if not valid_room_id(room):
            raise Refused(CloseCode.NOT_OWNER, "invalid room id")
        if cfg.allowed_origins and request.headers.get("origin") not in cfg.allowed_origins:
            raise Refused(CloseCode.POLICY, "origin not allowed")
        if not self.ready():
            raise Refused(CloseCode.TRY_AGAIN_LATER, "shard not ready")
        token = request.query.get("ticket")
        if not token:
            raise Refused(CloseCode.TICKET_INVALID, "missing ticket")
        now = self.clock()
        try:
            ticket = self.signer.verify_ticket(token, now=now)
        except TicketError as exc:
            raise Refused(CloseCode.TICKET_INVALID, f"invalid ticket: {exc}") from None
        # Issued before this process started: it may have been used on our
        # previous incarnation, whose used-ticket set is gone.
        if ticket.iat < self.started_at:
            raise Refused(CloseCode.TICKET_INVALID, "ticket predates this shard process")
        if ticket.jti in self.used_tickets:
            raise Refused(CloseCode.TICKET_INVALID, "ticket already used")
        if ticket.room != room or ticket.instance != cfg.instance:
            raise Refused(CloseCode.TICKET_MISMATCH, "ticket is for another room or instance")
        self.used_tickets[ticket.jti] = ticket.exp
        if len(self.ws_conns) > cfg.max_connections:
            raise Refused(CloseCode.TRY_AGAIN_LATER, "shard at max connections")
        per_address = cfg.max_connections_per_address
        if per_address and self.conns_per_address.get(address, 0) > per_address:
            raise Refused(CloseCode.POLICY, f"over {per_address} connections from {address}")
        raw_since = request.query.get("since")
        since: int | None = None
        if raw_since is not None:
            # An unreadable since cannot be honoured: answer recovered false.
            since = int(raw_since) if _SINCE_RE.fullmatch(raw_since) else -1
        return ticket, since

    async def _open_and_join(self, conn: Connection, ticket: Ticket, since: int | None) -> None:
        live = self.registry.get(ticket.room)
        if live is not None and ticket.epoch > live.room.epoch:
            # The room changed hands while we held an old copy: ours is stale.
            log.warning("room %s in memory at epoch %d is stale (ticket epoch %d)",
                        ticket.room, live.room.epoch, ticket.epoch)
            self.registry.close_room(ticket.room, CloseCode.GOING_AWAY, "room state is stale")
        elif live is not None:  # another join's open finished since admit() looked: no second
            return self._join(conn, live, ticket, since)  # open (it would call the state lost)
        try:
            live = await self.registry.open(ticket.room, ticket.epoch)
        except DirectoryRefused as exc:
            code = CloseCode.TRY_AGAIN_LATER if exc.code == "moving" else CloseCode.NOT_OWNER
            self._refuse(conn, Refused(code, f"directory: {exc.code}"))
            return
        except DirectoryError as exc:
            log.warning("could not open room %s: %s", ticket.room, exc)
            self._refuse(conn, Refused(CloseCode.TRY_AGAIN_LATER, "directory unavailable"))
            return
        if not self.ready():
            self._refuse(conn, Refused(CloseCode.TRY_AGAIN_LATER, "shard not ready"))
            return
        self._join(conn, live, ticket, since)

    def _join(self, conn: Connection, live: LiveRoom, ticket: Ticket, since: int | None) -> None:
        if conn.closed:
            return
        if live.frozen:
            return self._refuse(conn, Refused(CloseCode.TRY_AGAIN_LATER, "room is moving"))
        if live.unconfirmed:
            return self._refuse(conn, Refused(CloseCode.TRY_AGAIN_LATER,
                                              "room not confirmed by the directory yet"))
        if ticket.epoch < live.room.owner_epoch:
            return self._refuse(conn, Refused(CloseCode.NOT_OWNER, "stale ticket epoch"))
        if not live.room.may_join(ticket.user):
            return self._refuse(conn, Refused(CloseCode.TICKET_MISMATCH, "not a member of this room"))
        self._next_conn_id += 1
        live.join(conn, self._next_conn_id, ticket.user, since)

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
    def load(self) -> dict[str, Any]:
        joined = sum(lr.connection_count() for lr in self.registry.rooms.values())
        return {"rooms": len(self.registry), "connections": joined,
                "messages_per_s": round(self.messages_per_s, 2)}

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
            confirm = self.registry.unconfirmed()
            try:
                answer = await self.directory.heartbeat(
                    internal_url=internal_url, public_base=cfg.public_base,
                    capacity=cfg.capacity, boot_id=self.boot_id, load=self.load(),
                    confirm=confirm or None,
                    # A slow directory still renews the lease as long as the answer
                    # comes before the lease would run out anyway.
                    timeout=max(0.5, cfg.lease - cfg.heartbeat_interval))
            except DirectoryRefused as exc:
                if confirm:
                    # A directory that cannot confirm (e.g. an older version): the kept
                    # rooms cannot be proven ours, so they go, as before this rule existed.
                    log.warning("the directory refused to confirm kept rooms (%s): dropping "
                                "%d rooms", exc, len(confirm))
                    for name in confirm:
                        self.registry.close_room(name, CloseCode.GOING_AWAY, "room not confirmed")
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
                owned = answer.get("owned")
                owned_set = set(owned) if isinstance(owned, list) else set()
                kept, dropped = self.registry.confirm(confirm, owned_set)
                log.warning("the directory confirmed %d kept rooms, %d were placed elsewhere",
                            kept, dropped)
            if self.fenced:
                log.warning("heartbeats succeed again: serving rooms")
                self.fenced = False
            if not self.registered:
                self.registered = True
                log.warning("registered with the directory at %s", cfg.directory_url)
                down_after = answer.get("down_after")
                if isinstance(down_after, (int, float)) and down_after - cfg.lease < MIN_LEASE_MARGIN_S:
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
        closed = self.registry.suspend_all(CloseCode.GOING_AWAY, "shard lost its lease")
        log.warning("no heartbeat acknowledged for %.1fs: lease lost, stopped serving %d rooms "
                    "(%d clients closed); their state is kept until the directory confirms it",
                    self.cfg.lease, len(self.registry), closed)

    # -- timers ---------------------------------------------------------------
    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        if self.stopping:
            return
        self._timers["tick"] = loop.call_later(TICK_S, self._tick)
        if self.registered and not self.fenced and self.monotonic() >= self.lease_until:
            self._fence()
        self._ticks += 1
        if self._ticks % SLOW_TICKS:
            return
        now = self.clock()
        self.registry.evict_idle(now, self.cfg.room_linger)
        for hook in self.tick_hooks:
            hook(now)
        if self.used_tickets:
            self.used_tickets = {j: exp for j, exp in self.used_tickets.items() if exp > now}
        mono = self.monotonic()
        elapsed = mono - self._last_rate_at
        self._last_rate_at = mono
        if elapsed > 0:
            self.messages_per_s = (self.stats.messages_out - self._last_messages) / elapsed
            self._last_messages = self.stats.messages_out
            for live in self.registry.rooms.values():
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
                conn.close(1011, "ping timeout")  # dead peer: nobody reads the frame
                conn.abort()
