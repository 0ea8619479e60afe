"""One TCP connection of the shard: HTTP/1.1 (h11), then a WebSocket.

A connection knows no server: it is given a :class:`ConnectionContext`
(settings, counters, the writer, the lingering pool) and reports what
happens to it through :class:`ConnectionEvents` (an upgraded WebSocket to
admit, a request to answer, a close, the end of the TCP connection); once
admitted it hands each complete data message to its room
(:class:`RoomLink`), which rate-limits, parses and answers it.

Why an ``asyncio.Protocol`` and not a framework: a task and an awaited send
per connection cost ~3x the memory and CPU of the fan-out itself (see
docs/benchmarks/shard-transport.md). Here nothing awaits on the hot path:

- a connection's first read, when it is one whole ordinary WebSocket
  handshake (nearly always), is answered by :mod:`shard.handshake` in one
  httptools pass; otherwise incoming bytes go to h11 until the WebSocket
  handshake (websockets' ``ServerProtocol.accept`` decides it), then to the
  connection's :class:`shard.reader.FrameReader` (sans I/O: a fast path for
  the common frames, the ``websockets`` protocol for the rest), which
  reports messages and pongs back (:meth:`on_message`, :meth:`on_pong`);
- outgoing frames are appended to :attr:`Connection.pending`, its send
  queue; the write scheduler (:class:`shard.writer.Writer`) has every dirty
  connection write its queue once per event-loop turn
  (:meth:`Connection.flush`). A broadcast appends the same ``bytes`` object
  to every member: no per-recipient encoding. While the transport buffers
  nothing (its high-water mark is 0, so it calls ``pause_writing`` as soon
  as it holds a byte) and is not closing (so the descriptor is still this
  connection's), flush writes to the socket itself with ``os.write``: one
  system call, none of the transport's bookkeeping; what the kernel does
  not take goes to the transport, which then holds the order.

Input is bounded per connection (docs/PROTOCOL.md, "Abuse limits"): a
:class:`shard.ratelimit.WireBudget` of frames and bytes over everything the
peer sends (control frames and fragments included; overdrawn: fail with
4008), and a work bound per loop turn: at most :data:`MAX_FRAMES_PER_TURN`
frames are handled (the websockets parser is fed
:data:`shard.reader.WS_FEED_SLICE` bytes at a time), and what is left waits
in the reader with reading paused until the next turn, so timers and
heartbeats run whatever one peer sends.

Backpressure policy (slow consumers): a connection may hold at most
``send_queue_bytes`` of outgoing data, counting its pending frames plus the
transport's write buffer (the kernel's send buffer is capped at
:data:`KERNEL_SNDBUF`, so it cannot absorb megabytes first). Over that, at
flush time, the connection is closed with 4009 at once: its pending frames
are dropped, the close frame is written and the peer is removed from its
room. A slow client therefore never slows its room or makes the shard
buffer without bound; it reconnects with ``since``.

Every close is a lingering close (:mod:`roomshard.linger`): the close frame
(or an HTTP error answer) goes out after every frame queued before it, then
the connection is half-closed and whatever the peer still sends is read and
dropped, unparsed, until its FIN or a bound. A close handshake the peer
does not answer within :data:`CLOSE_GRACE_S` is given up the same way.
Closing with unread input would make the kernel reset the connection, and
the peer would lose what it had not read yet, close frame included.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import typing
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import h11
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader
from websockets.http11 import Request as WsRequest
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from roomshard.config import ShardConfig
from roomshard.linger import Linger, LingerPool
from roomshard.wire.protocol import CloseCode
from shard.handshake import parse_upgrade
from shard.http import (
    MAX_BODY_BYTES,
    MAX_UNAUTHENTICATED_BODY_BYTES,
    HttpRequest,
    HttpResponse,
    error_response,
)
from shard.ratelimit import TokenBucket, WireBudget
from shard.reader import WS_LOGGER, FrameReader
from shard.stats import Stats
from shard.writer import Writer

log = logging.getLogger("roomshard.shard.conn")

# Requested kernel send buffer per connection (Linux doubles it): bounds what
# a stalled peer holds in the kernel on top of ``send_queue_bytes``.
KERNEL_SNDBUF = 64 * 1024
CLOSE_GRACE_S = 2.0
# An HTTP connection with no complete request for this long is closed (also
# a socket that never finishes its WebSocket handshake).
HTTP_IDLE_TIMEOUT_S = 30.0
# Work bound per connection and loop turn: at most this many incoming frames
# are handled, then reading pauses and the rest waits for the next turn, so
# one connection cannot keep the loop from its timers, heartbeats and other
# sockets (the wire budget then closes a flooder with 4008).
MAX_FRAMES_PER_TURN = 64
# HTTP statuses of a refused WebSocket handshake -> the error body's code.
_HANDSHAKE_ERRORS = {400: "bad_request", 403: "forbidden", 405: "method_not_allowed",
                     426: "upgrade_required", 505: "http_version_not_supported"}
# Headers of websockets' refusal we replace with our own JSON body's.
_OWN_HEADERS = frozenset(("date", "connection", "content-length", "content-type"))


class ConnectionEvents(typing.Protocol):
    """What a connection reports to the server it belongs to (``ShardServer``)."""

    def admit(self, conn: Connection, request: HttpRequest) -> None:
        """The WebSocket handshake is answered (101): admit ``conn`` to a room, or close it."""

    async def handle_http(self, request: HttpRequest) -> HttpResponse:
        """Answer a plain HTTP request."""

    def detach(self, conn: Connection) -> None:
        """``conn`` is closing: take it out of its room (idempotent)."""

    def forget(self, conn: Connection) -> None:
        """The TCP connection is gone."""


class RoomLink(typing.Protocol):
    """The room a joined connection is in (``shard.live_rooms.LiveRoom``)."""

    name: str
    frozen: bool  # mid-move: the connection's input waits unread

    def receive(self, conn: Connection, payload: bytes, is_text: bool) -> None:
        """A complete data message from ``conn`` (the room checks, parses and answers it)."""

    def refill(self, conn: Connection) -> None:
        """``conn`` wrote everything queued: queue the next chunk of its replay."""

    def leave(self, conn: Connection) -> None:
        """``conn`` leaves the room (presence to the others when its user's last went)."""


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What every connection of a shard shares: settings, counters, writer, reports."""

    cfg: ShardConfig
    stats: Stats
    writer: Writer
    lingering: LingerPool
    events: ConnectionEvents
    monotonic: Callable[[], float]
    # True for a bearer token that is the directory's cluster token for this shard
    # (such requests may carry larger bodies: the internal routes).
    trusted: Callable[[str], bool]


class Connection(asyncio.Protocol):
    """See the module docstring. ``pending``/``pending_bytes`` are the fan-out's fast path."""

    __slots__ = (
        "_body",
        "_body_limit",
        "_body_size",
        "_busy",
        "_deferred",
        "_eof_pending",
        "_fresh",
        "_head",
        "_http_stalled",
        "_idle_timer",
        "_peer_eof",
        "_request",
        "_unpaid",
        "address",
        "bucket",
        "budget",
        "closed",
        "closing",
        "conn_id",
        "ctx",
        "eof_after_flush",
        "failed",
        "fd",
        "http",
        "linger",
        "pending",
        "pending_bytes",
        "ping_outstanding",
        "queue_limit",
        "reader",
        "replaying",
        "room",
        "transport",
        "user",
        "write_paused",
    )

    def __init__(self, ctx: ConnectionContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        # h11, made on the first read that is not a whole ordinary handshake.
        self.http: h11.Connection | None = None
        self._fresh = True  # no byte read yet
        self._head: bytes | None = None  # the 101 while it waits for the end of the turn
        self.reader: FrameReader | None = None  # set by the WebSocket upgrade
        self.conn_id = 0
        self.user = ""
        self.room: RoomLink | None = None  # set once joined
        self.replaying = False  # its welcome/replay is still being written (LiveRoom.refill)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.queue_limit = ctx.cfg.send_queue_bytes
        # True while the transport buffers data (see connection_made): only
        # then is its buffer size worth asking for.
        self.write_paused = False
        self.fd = -1  # the socket's descriptor, for flush()'s direct writes
        self.bucket: TokenBucket | None = None  # its message rate, kept for its room (receive)
        self.budget: WireBudget | None = None  # every frame and byte, from the upgrade on
        self.address = ""  # the peer's IP address, for the per-address cap
        # The ping round whose ping is unanswered (0: none); a pong clears it.
        self.ping_outstanding = 0
        self.closed = False  # the TCP connection is gone
        self.closing = False  # we sent (or are sending) a close frame: no more data frames
        self.failed = False  # failed (RFC 6455 7.1.7): nothing more is read
        self.eof_after_flush = False
        self._deferred = False  # reading paused by the work bound; resumes next turn
        self._eof_pending = False  # the peer half-closed; handled once the reader's input is
        self._unpaid = 0  # bytes read but not charged to the budget yet (see charge)
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_limit = MAX_UNAUTHENTICATED_BODY_BYTES
        self._request: h11.Request | None = None
        self._busy = False  # an HTTP request is being handled
        self._http_stalled = False  # an answer waits in the transport: read no next request
        self._idle_timer: asyncio.TimerHandle | None = None
        self._peer_eof = False  # the peer's FIN arrived
        self.linger: Linger | None = None  # set once closing: input is read and dropped

    # -- asyncio callbacks ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass; same API.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            if transport.get_extra_info("sslcontext") is None:  # never around TLS
                self.fd = sock.fileno()
            # Linux autotunes a socket's send buffer up to 4 MiB: a stalled
            # peer would absorb that much before our own queue bound applies.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SNDBUF)
        # Told (pause_writing) as soon as the transport holds any byte the
        # kernel did not take: flush() then needs no buffer-size call per write.
        self.transport.set_write_buffer_limits(high=0, low=0)
        self._arm_idle_timer()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.replaying:  # the client read what we wrote: the next chunk of its replay
            self.ctx.writer.mark_dirty(self)
        if self._http_stalled:  # the client read our answer: on to its next request
            self._http_stalled = False
            self._next_http_request()

    def _arm_idle_timer(self) -> None:
        """Close a connection that sends no complete request (or upgrade) for a while."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(HTTP_IDLE_TIMEOUT_S,
                                                                 self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self.reader is None and not self._busy:
            self._close_transport()

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            if self.linger is not None:
                self.linger.data(len(data))
            elif self._fresh:
                self._fresh = False
                upgrade = parse_upgrade(data)
                if upgrade is not None:
                    self._accept(upgrade.request, upgrade.response, upgrade.rest)
                    return
                self.http = h11.Connection(h11.SERVER)
                self.http.receive_data(data)
                self._drive_http()
            elif self.http is not None:
                self.http.receive_data(data)
                self._drive_http()
            return
        if self.failed:  # nothing more is parsed; a lingering close drops it
            if self.linger is not None:
                self.linger.data(len(data))
            return
        # Bytes are charged with the frames they carry: one budget call per read.
        self._unpaid += len(data)
        reader = self.reader
        reader.feed(data)
        if self.room is not None or self.closing:  # else admission pending: kept for joined()
            self._pump()
        if self._unpaid and not self.failed:  # no complete frame in this read
            self.charge(0)

    def eof_received(self) -> bool | None:
        self._peer_eof = True
        if self.linger is not None:
            self.linger.eof()
            return True
        if self.reader is None:
            return None  # let the transport close
        if self.failed:
            return True  # our close frame is still to be written: flush() closes after it
        # Handle what is still buffered first (the work bound may defer it).
        self._eof_pending = True
        if not self._deferred and (self.room is not None or self.closing):
            self._pump()
        return True  # we close the transport once the input is handled

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.linger is not None:
            self.linger.lost()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.pending.clear()
        self.pending_bytes = 0
        self.ctx.events.forget(self)

    # -- HTTP phase -------------------------------------------------------
    def _drive_http(self) -> None:
        http = self.http
        assert http is not None
        while not self.closed:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:  # a head over h11's 16 KiB bound
                    resp = error_response(431, "request_header_too_large",
                                          "request line and headers over 16384 bytes")
                else:
                    resp = error_response(400, "bad_request", f"malformed HTTP: {exc}")
                self._respond(resp, close=True)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return  # PAUSED: a request is being answered; h11 holds the rest
            if isinstance(event, h11.Request):
                self._request = event
                self._body, self._body_size = [], 0
                self._body_limit = self._body_limit_for(event)
                length = _content_length(event)
                if length is not None and length > self._body_limit:
                    self._too_large()  # refused before reading a byte of it
                    return
            elif isinstance(event, h11.Data):
                self._body.append(event.data)
                self._body_size += len(event.data)
                if self._body_size > self._body_limit:
                    self._too_large()
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._complete_request()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close_transport()
                return

    def _body_limit_for(self, req: h11.Request) -> int:
        """A body larger than a plain request's needs the cluster token (internal routes)."""
        for name, value in req.headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    if self.ctx.trusted(token.strip()):
                        return MAX_BODY_BYTES
                    break
        return MAX_UNAUTHENTICATED_BODY_BYTES

    def _too_large(self) -> None:
        self._respond(error_response(413, "too_large",
                                     f"request body over {self._body_limit} bytes"), close=True)

    def _complete_request(self) -> None:
        req = self._request
        assert req is not None and self.transport is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
        target = req.target.decode("latin-1")
        split = urlsplit(target)
        request = HttpRequest(req.method.decode("ascii").upper(), split.path,
                              dict(parse_qsl(split.query)), headers, b"".join(self._body))
        self._request, self._body, self._body_size = None, [], 0
        if "websocket" in headers.get("upgrade", "").lower():
            self._upgrade(request, req)
            return
        self.transport.pause_reading()  # one request at a time per connection
        self._busy = True
        task = asyncio.get_running_loop().create_task(self.ctx.events.handle_http(request))
        task.add_done_callback(self._http_done)

    def _http_done(self, task: asyncio.Task[HttpResponse]) -> None:
        self._busy = False
        self._arm_idle_timer()  # keep-alive: the idle clock restarts after each answer
        if self.closed:
            return
        if task.cancelled():
            self._respond(error_response(503, "shutting_down", "the shard is stopping"), close=True)
            return
        self._respond(task.result())
        if self.write_paused:
            # The client has not read this answer yet: its next (pipelined)
            # request waits, so answers cannot pile up in our buffers.
            self._http_stalled = True
            return
        self._next_http_request()

    def _next_http_request(self) -> None:
        if self.transport is not None and not self.closed and self.http is not None:
            self.transport.resume_reading()
            self._drive_http()

    def _respond(self, resp: HttpResponse, *, close: bool = False) -> None:
        http = self.http
        if http is None or self.transport is None or self.closed:
            return
        headers = [("content-type", resp.content_type), ("content-length", str(len(resp.body))),
                   *resp.headers]
        if close:
            headers.append(("connection", "close"))
        try:
            out = http.send(h11.Response(status_code=resp.status, headers=headers,
                                         reason=_reason(resp.status)))
            out += http.send(h11.Data(data=resp.body)) or b""
            out += http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            self._close_transport()
            return
        self.transport.write(out or b"")
        if close or http.our_state is h11.MUST_CLOSE:
            self._linger()  # the rest of a refused request may still be on its way
            return
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
        else:
            self._linger()

    # -- WebSocket handshake -------------------------------------------------
    def _upgrade(self, request: HttpRequest, raw: h11.Request) -> None:
        """Answer a WebSocket handshake: websockets' ServerProtocol.accept decides (RFC 6455 4.2).

        A request that is not a valid handshake (method, HTTP version, key,
        version, Upgrade/Connection) gets its HTTP status with the JSON error
        body (426 with ``Sec-WebSocket-Version: 13`` for another version);
        it is not a WebSocket. Refusals of a valid one happen after the 101.
        No extension is offered (permessage-deflate stays off).
        """
        http, transport = self.http, self.transport
        assert http is not None and transport is not None
        cfg = self.ctx.cfg
        handshake = ServerProtocol(max_size=cfg.max_frame, logger=WS_LOGGER)
        response = handshake.accept(WsRequest(
            raw.target.decode("latin-1"),
            Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw.headers),
            method=request.method, protocol="HTTP/" + raw.http_version.decode("ascii")))
        if response.status_code != 101:
            exc = handshake.handshake_exc
            status = response.status_code
            extra = [(k, v) for k, v in response.headers.raw_items() if k.lower() not in _OWN_HEADERS]
            if isinstance(exc, InvalidHeader) and exc.name.lower() == "sec-websocket-version":
                status = 426  # RFC 6455 4.4: name the version we speak
                extra.append(("Sec-WebSocket-Version", "13"))
            self._respond(error_response(status, _HANDSHAKE_ERRORS.get(status, "bad_request"),
                                         f"not a valid WebSocket handshake: {exc}", extra),
                          close=True)
            return
        trailing, _ = http.trailing_data
        self._accept(request, response.serialize(), bytes(trailing))

    def _accept(self, request: HttpRequest, response: bytes, trailing: bytes) -> None:
        """Write the 101 and become a WebSocket whose admission the server decides."""
        transport = self.transport
        assert transport is not None
        cfg = self.ctx.cfg
        # The 101 goes out at the end of the turn, in one write with what follows it
        # (the welcome, when the room is in memory; a refusal's close frame).
        self._head = response
        self._push(response)
        self.http = None  # h11's buffers are not kept for the connection's life
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.reader = FrameReader(cfg.max_frame, cfg.max_fragments, trailing)
        self.budget = WireBudget(cfg.frame_rate, cfg.frame_burst, cfg.byte_rate, cfg.byte_burst,
                                 self.ctx.monotonic())
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
        transport.pause_reading()  # until admitted; frames wait in the kernel
        self._unpaid = len(trailing)
        self.ctx.events.admit(self, request)

    def joined(self, room: RoomLink, conn_id: int, user: str, bucket: TokenBucket) -> None:
        """Called by the server once the room accepted this connection."""
        self.room, self.conn_id, self.user, self.bucket = room, conn_id, user, bucket
        if self.transport is not None and not self.closed and not self.failed:
            self.transport.resume_reading()
            self._pump()  # what came with the handshake

    # -- WebSocket phase -------------------------------------------------
    def _pump(self) -> None:
        """Handle buffered input, at most MAX_FRAMES_PER_TURN frames (:class:`FrameReader`).

        What the bound leaves waits, with reading paused, for the next loop
        turn (:meth:`_resume_input`); the peer's EOF is handled once every
        byte before it was.
        """
        reader = self.reader
        assert reader is not None
        left = reader.read(self, MAX_FRAMES_PER_TURN, eof=self._eof_pending)
        if self.failed:
            return
        if reader.fast:  # what is left is an incomplete frame, or frames past the bound
            if reader.buf and not left:
                self._defer()
            return
        if reader.buf:
            self._defer()
        elif self._eof_pending:
            self._eof_pending = False
            reader.end(self)
            self.eof_after_flush = True  # the peer is gone: close once our frames are out
            self.ctx.writer.mark_dirty(self)

    def _defer(self) -> None:
        """Pause reading; handle the rest of the reader's input on the next loop turn."""
        if not self._deferred and self.transport is not None:
            self._deferred = True
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._resume_input)

    def _resume_input(self) -> None:
        self._deferred = False
        if self.closed or self.failed or self.transport is None:
            return
        room = self.room
        if room is not None and room.frozen and not self.closing:
            return  # mid-move: the input waits, reading stays paused; thaw() calls resume()
        self._pump()
        if not self._deferred and not self.failed and not self._eof_pending:
            self.transport.resume_reading()

    def resume(self) -> None:
        """Read again after a pause by the room (a move's freeze ended without a release)."""
        if self.closed or self.failed or self.transport is None or self._deferred:
            return
        if self.reader is not None and self.reader.buf:
            self._resume_input()  # what a deferred turn left: handle it, then read
        else:
            self.transport.resume_reading()

    def charge(self, frames: int) -> bool:
        """Charge ``frames`` and the unpaid bytes to the wire budget; False (and failed) when over."""
        budget, nbytes = self.budget, self._unpaid
        self._unpaid = 0
        if budget is None or budget.take(frames, nbytes, self.ctx.monotonic()):
            return True
        self._over_budget("frames or bytes")
        return False

    def _over_budget(self, what: str) -> None:
        cfg = self.ctx.cfg
        self.ctx.stats.wire_budget_closes += 1
        log.info("closing %s (4008): over the wire budget of %s (%g frames/s, %g bytes/s)",
                 self.user or self.address, what, cfg.frame_rate, cfg.byte_rate)
        if self.closing:  # already closing: the close frame is out; read nothing more
            self._end_input()
            return
        self.fail(CloseCode.POLICY, "too many frames or bytes")

    # -- what the frame reader reports (FrameSink) ----------------------------
    def on_message(self, payload: bytes, is_text: bool) -> None:
        room = self.room
        assert room is not None  # not closing: admitted (see data_received)
        room.receive(self, payload, is_text)

    def on_pong(self) -> None:
        self.ping_outstanding = 0

    def take_output(self) -> None:
        """Queue what the sans-I/O protocol wants to write (pongs, close frames, EOF)."""
        assert self.reader is not None
        ws = self.reader.protocol
        for data in ws.data_to_send():
            if data:
                self._push(data)
            else:
                self.eof_after_flush = True
                self.ctx.writer.mark_dirty(self)
        if ws.close_expected():
            self.closing = True
        if self.closing and self.room is not None:
            self.ctx.events.detach(self)

    # -- output -------------------------------------------------------------
    def queue(self, frame: bytes) -> None:
        """Append one data frame for this connection; written at the end of the loop turn.

        Dropped once the connection is closing: nothing may follow a close frame.
        """
        if self.closed or self.closing:
            return
        self._push(frame)

    def _push(self, frame: bytes) -> None:
        if self.closed:
            return
        if not self.pending:
            self.ctx.writer.mark_dirty(self)
        self.pending.append(frame)
        self.pending_bytes += len(frame)

    def flush(self) -> None:
        """Write pending frames; enforce the send-queue bound (4009)."""
        transport = self.transport
        pending = self.pending
        if self.closed or transport is None or transport.is_closing():
            pending.clear()
            self.pending_bytes = 0
            return
        if pending:
            # Only a paused transport holds bytes (its high-water mark is 0).
            held = transport.get_write_buffer_size() if self.write_paused else 0
            if self.pending_bytes + held > self.queue_limit:
                self._slow_consumer()
                return
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            if self.write_paused:
                transport.write(data)
            else:
                # The transport holds nothing (it would have paused us), so
                # writing to its socket directly keeps the byte order and
                # skips its buffering machinery; what the kernel does not
                # take, and any error, goes through the transport after all.
                try:
                    sent = os.write(self.fd, data)
                except OSError:  # EAGAIN, a reset peer, or no fd (-1): the transport decides
                    sent = 0
                if sent < len(data):
                    transport.write(data[sent:] if sent else data)
            pending.clear()
            self.pending_bytes = 0
            self._head = None
        if self.replaying and not self.write_paused and not self.closing:
            room = self.room
            if room is not None:
                room.refill(self)  # the kernel took everything: the next chunk
        if self.eof_after_flush:
            self.eof_after_flush = False
            self._linger()

    def _slow_consumer(self) -> None:
        self.ctx.stats.slow_consumer_closes += 1
        log.info("closing slow consumer %s in room %s (4009)", self.user,
                 self.room.name if self.room else "-")
        self.pending.clear()
        self.pending_bytes = 0
        if self._head is not None and self.transport is not None:
            self.transport.write(self._head)  # the 101 before the close frame, whatever else goes
            self._head = None
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: send queue overflowed", now=True)

    def close(self, code: int, reason: str = "", *, now: bool = False) -> None:
        """Start the closing handshake with ``code``; linger after a grace period.

        ``now`` writes the close frame immediately instead of at the end of
        the turn (used when pending frames were dropped).
        """
        reader, transport = self.reader, self.transport
        if self.closed or reader is None or transport is None:
            return
        ws = reader.protocol
        if not transport.is_reading() and not self.failed and not self._deferred:
            transport.resume_reading()  # to read the peer's close frame
        self.closing = True
        if ws.state is OPEN:
            ws.send_close(code, reason)
            if now:
                for data in ws.data_to_send():
                    if data:
                        transport.write(data)
            else:
                self.take_output()
        self.ctx.events.detach(self)
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._close_grace_over)

    def _close_grace_over(self) -> None:
        """The peer did not answer our close frame in time: stop waiting for it, linger."""
        if not self.closed and self.linger is None:
            self._end_input()

    def _end_input(self) -> None:
        """Parse nothing more; once the pending output is written, half-close and linger."""
        self.failed = self.closing = True
        self._discard_input()
        self.eof_after_flush = True
        self.ctx.writer.mark_dirty(self)

    def _linger(self) -> None:
        """Half-close after our last byte; read and drop the peer's input until its FIN.

        See :mod:`roomshard.linger`: closing with unread input would reset
        the connection and destroy what the peer has not read yet.
        """
        transport = self.transport
        if self.closed or transport is None or self.linger is not None:
            return
        self.failed = self.closing = True
        self._discard_input()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.linger = self.ctx.lingering.start(transport, peer_eof=self._peer_eof)

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): close frame, then close the TCP connection.

        Nothing more is parsed (reading pauses until the close frame is
        out), so an abusive sender costs no more CPU; the close frame is
        written at the end of the turn after every frame queued before it,
        then the connection lingers (see :meth:`_linger`).
        """
        reader, transport = self.reader, self.transport
        if self.closed or self.failed or reader is None or transport is None:
            return
        self.failed = True
        reader.discard()
        transport.pause_reading()
        was_closing, self.closing = self.closing, True
        reader.protocol.fail(code, reason)
        self.take_output()  # the close frame, then EOF: flush() closes the transport
        self.ctx.events.detach(self)
        if not was_closing:
            asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._close_grace_over)

    def _discard_input(self) -> None:
        if self.reader is not None:
            self.reader.discard()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def describe(self) -> dict[str, Any]:
        return {"user": self.user, "pending_bytes": self.pending_bytes}


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _content_length(req: h11.Request) -> int | None:
    for name, value in req.headers:
        if name == b"content-length":
            return int(value)  # h11 validated it
    return None
