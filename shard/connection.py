"""One TCP connection of the shard: HTTP/1.1 (h11), then a WebSocket.

Why an ``asyncio.Protocol`` and not a framework: a task and an awaited send
per connection cost ~3x the memory and CPU of the fan-out itself (see
docs/benchmarks/shard-transport.md). Here nothing awaits on the hot path:

- incoming bytes go to h11 until the WebSocket handshake. Then the common
  frames (complete, unfragmented, masked text/binary/pong frames) are cut
  and unmasked by :func:`shard.frames.read_client_frames`, a few integer
  operations per frame; the first frame of any other kind (ping, close,
  fragment, protocol error, over ``max_frame``) and everything after it goes
  to the sans-I/O ``websockets.protocol.Protocol`` for the rest of the
  connection (pongs, close handshake, 1002, 1009 as before). Both start at
  the same frame boundary, so no frame is seen twice or skipped;
- outgoing frames are appended to :attr:`Connection.pending`; the shard
  writes every dirty connection's pending frames once per event-loop turn
  (:meth:`Connection.flush`). A broadcast appends the same ``bytes`` object
  to every member: no per-recipient encoding. While the transport buffers
  nothing (its high-water mark is 0, so it calls ``pause_writing`` as soon
  as it holds a byte) and is not closing (so the descriptor is still this
  connection's), flush writes to the socket itself with ``os.write``: one
  system call, none of the transport's bookkeeping; what the kernel does
  not take goes to the transport, which then holds the order.

Backpressure policy (slow consumers): a connection may hold at most
``send_queue_bytes`` of outgoing data, counting its pending frames plus the
transport's write buffer (the kernel's send buffer is capped at
:data:`KERNEL_SNDBUF`, so it cannot absorb megabytes first). Over that, at
flush time, the connection is closed with 4009 at once: its pending frames
are dropped, the close frame is written, the peer is removed from its room,
and the socket is aborted after :data:`CLOSE_GRACE_S`. A slow client
therefore never slows its room or makes the shard buffer without bound; it
reconnects with ``since``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlsplit

import h11
from websockets.frames import Opcode
from websockets.protocol import OPEN, Protocol, Side
from websockets.utils import accept_key

from roomshard.protocol import CloseCode, ErrorCode
from shard.frames import (
    HEAD_PONG,
    HEAD_TEXT,
    FrameRejected,
    error_frame,
    parse_client_frame,
    read_client_frames,
)
from shard.http import MAX_BODY_BYTES, HttpRequest, HttpResponse, error_response
from shard.ratelimit import TokenBucket, Verdict

if TYPE_CHECKING:
    from shard.registry import LiveRoom
    from shard.server import ShardServer

log = logging.getLogger("roomshard.shard.conn")
# websockets logs every closed connection at INFO; one shared quiet logger.
_WS_LOGGER = logging.getLogger("roomshard.shard.ws")
_WS_LOGGER.setLevel(logging.WARNING)

# Requested kernel send buffer per connection (Linux doubles it): bounds what
# a stalled peer holds in the kernel on top of ``send_queue_bytes``.
KERNEL_SNDBUF = 64 * 1024
CLOSE_GRACE_S = 2.0
# An HTTP connection with no complete request for this long is closed (also
# a socket that never finishes its WebSocket handshake).
HTTP_IDLE_TIMEOUT_S = 30.0  # wait this long for the peer's close frame before aborting
_TEXT, _BINARY, _CONT, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG


class Connection(asyncio.Protocol):
    """See the module docstring. ``pending``/``pending_bytes`` are the fan-out's fast path."""

    __slots__ = (
        "_body",
        "_busy",
        "_idle_timer",
        "_request",
        "bucket",
        "closed",
        "closing",
        "conn_id",
        "eof_after_flush",
        "fast",
        "fd",
        "frag",
        "frag_text",
        "http",
        "pending",
        "pending_bytes",
        "ping_outstanding",
        "queue_limit",
        "rbuf",
        "room",
        "server",
        "transport",
        "user",
        "write_paused",
        "ws",
    )

    def __init__(self, server: ShardServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.http: h11.Connection | None = h11.Connection(h11.SERVER)
        self.ws: Protocol | None = None
        self.conn_id = 0
        self.user = ""
        self.room: LiveRoom | None = None  # set once joined
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.queue_limit = server.cfg.send_queue_bytes
        # True while the transport buffers data (see connection_made): only
        # then is its buffer size worth asking for.
        self.write_paused = False
        self.fd = -1  # the socket's descriptor, for flush()'s direct writes
        self.bucket: TokenBucket | None = None
        self.ping_outstanding = False
        self.closed = False  # the TCP connection is gone
        self.closing = False  # we sent (or are sending) a close frame: no more data frames
        self.eof_after_flush = False
        self.frag: list[bytes] | None = None
        self.frag_text = False
        # True while incoming frames go through read_client_frames; rbuf is
        # its incomplete frame (or, before the join, the unread input).
        self.fast = False
        self.rbuf = b""
        self._body: list[bytes] = []
        self._request: h11.Request | None = None
        self._busy = False  # an HTTP request is being handled
        self._idle_timer: asyncio.TimerHandle | None = None

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

    def _arm_idle_timer(self) -> None:
        """Close a connection that sends no complete request (or upgrade) for a while."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(HTTP_IDLE_TIMEOUT_S,
                                                                 self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self.ws is None and not self._busy:
            self._close_transport()

    def data_received(self, data: bytes) -> None:
        if self.fast:
            if not self.closing:
                if self.room is not None:
                    self._read_fast(data)
                else:  # admission pending (reading is paused): kept for joined()
                    self.rbuf += data
                return
            # We are closing: the websockets parser runs the closing handshake.
            data, self.rbuf, self.fast = self.rbuf + data, b"", False
        ws = self.ws
        if ws is not None:
            ws.receive_data(data)
            self._after_ws_input()
        elif self.http is not None:
            self.http.receive_data(data)
            self._drive_http()

    def eof_received(self) -> bool | None:
        if self.ws is not None:
            if self.fast:
                rest, self.rbuf, self.fast = self.rbuf, b"", False
                if rest:
                    self.ws.receive_data(rest)
            self.ws.receive_eof()
            self._after_ws_input()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.pending.clear()
        self.pending_bytes = 0
        self.server.forget(self)

    # -- HTTP phase -------------------------------------------------------
    def _drive_http(self) -> None:
        http = self.http
        assert http is not None
        while not self.closed:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                self._respond(error_response(400, "bad_request", f"malformed HTTP: {exc}"),
                              close=True)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return  # PAUSED: a request is being answered; h11 holds the rest
            if isinstance(event, h11.Request):
                self._request = event
                self._body = []
            elif isinstance(event, h11.Data):
                self._body.append(event.data)
                if sum(map(len, self._body)) > MAX_BODY_BYTES:
                    self._respond(error_response(413, "too_large", "request body too large"),
                                  close=True)
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._complete_request()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close_transport()
                return

    def _complete_request(self) -> None:
        req = self._request
        assert req is not None and self.transport is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
        target = req.target.decode("latin-1")
        split = urlsplit(target)
        request = HttpRequest(req.method.decode("ascii").upper(), split.path,
                              dict(parse_qsl(split.query)), headers, b"".join(self._body))
        self._request, self._body = None, []
        if "websocket" in headers.get("upgrade", "").lower():
            self._upgrade(request)
            return
        self.transport.pause_reading()  # one request at a time per connection
        self._busy = True
        task = asyncio.get_running_loop().create_task(self.server.handle_http(request))
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
        if self.transport is not None and not self.closed:
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
            out = http.send(h11.Response(status_code=resp.status, headers=headers))
            out += http.send(h11.Data(data=resp.body)) or b""
            out += http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            self._close_transport()
            return
        self.transport.write(out or b"")
        if close or http.our_state is h11.MUST_CLOSE:
            self._close_transport()
            return
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
        else:
            self._close_transport()

    # -- WebSocket handshake -------------------------------------------------
    def _upgrade(self, request: HttpRequest) -> None:
        http, transport = self.http, self.transport
        assert http is not None and transport is not None
        key = request.headers.get("sec-websocket-key", "")
        if (request.method != "GET" or request.headers.get("sec-websocket-version") != "13"
                or not key or "upgrade" not in request.headers.get("connection", "").lower()):
            self._respond(error_response(400, "bad_request",
                                         "not a valid WebSocket handshake (RFC 6455 4.2.1)"),
                          close=True)
            return
        try:
            out = http.send(h11.InformationalResponse(status_code=101, headers=[
                ("upgrade", "websocket"), ("connection", "Upgrade"),
                ("sec-websocket-accept", accept_key(key))]))
        except h11.LocalProtocolError:
            self._respond(error_response(400, "bad_request", "upgrade not possible"), close=True)
            return
        transport.write(out or b"")
        trailing, _ = http.trailing_data
        self.http = None  # h11's buffers are not kept for the connection's life
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.ws = Protocol(Side.SERVER, state=OPEN, max_size=self.server.cfg.max_frame,
                           logger=_WS_LOGGER)
        transport.pause_reading()  # until admitted; frames wait in the kernel
        self.fast = True
        self.rbuf = bytes(trailing)
        self.server.admit(self, request)

    def joined(self, room: LiveRoom, conn_id: int, user: str, bucket: TokenBucket) -> None:
        """Called by the server once the room accepted this connection."""
        self.room, self.conn_id, self.user, self.bucket = room, conn_id, user, bucket
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            if self.fast:
                self._read_fast(b"")  # what came with the handshake
            else:
                self._after_ws_input()

    # -- WebSocket phase -------------------------------------------------
    def _read_fast(self, data: bytes) -> None:
        """Handle the common frames at the start of the input; see the module docstring."""
        buf = self.rbuf + data if self.rbuf else data
        frames, used, slow = read_client_frames(buf, self.server.cfg.max_frame)
        for head, payload in frames:
            if self.closing:  # an earlier frame closed us (4008): the rest is dropped
                break
            if head == HEAD_PONG:
                self.ping_outstanding = False
            else:
                self._on_message(payload, head == HEAD_TEXT)
        rest = buf[used:] if used else buf
        if slow or self.closing:
            self.rbuf, self.fast = b"", False
            if rest and self.ws is not None:
                self.ws.receive_data(rest)
            self._after_ws_input()
        else:
            self.rbuf = rest

    def _after_ws_input(self) -> None:
        ws = self.ws
        assert ws is not None
        if self.room is not None and not self.closing:
            for frame in ws.events_received():
                if self.closing:  # an earlier frame of this batch closed us (4008)
                    break
                op = frame.opcode
                if op is _TEXT or op is _BINARY:
                    if frame.fin:
                        self._on_message(frame.data, op is _TEXT)
                    else:
                        self.frag, self.frag_text = [frame.data], op is _TEXT
                elif op is _CONT:
                    if self.frag is not None:
                        self.frag.append(frame.data)
                        if frame.fin:
                            data, self.frag = b"".join(self.frag), None
                            self._on_message(data, self.frag_text)
                elif op is _PONG:
                    self.ping_outstanding = False
        self._take_ws_output()

    def _take_ws_output(self) -> None:
        """Queue what the sans-I/O protocol wants to write (pongs, close frames, EOF)."""
        ws = self.ws
        assert ws is not None
        for data in ws.data_to_send():
            if data:
                self._push(data)
            else:
                self.eof_after_flush = True
                self.server.mark_dirty(self)
        if ws.close_expected():
            self.closing = True
        if self.closing and self.room is not None:
            self.server.detach(self)

    def _on_message(self, payload: bytes, is_text: bool) -> None:
        server = self.server
        stats = server.stats
        stats.messages_in += 1
        room = self.room
        assert room is not None and self.bucket is not None
        verdict = self.bucket.take(server.monotonic())
        if verdict is not Verdict.OK:
            stats.rate_limited += 1
            if verdict is Verdict.CLOSE:
                self.close(CloseCode.POLICY, "rate limit exceeded")
                return
            try:
                msg_id = parse_client_frame(payload, is_text=is_text, max_text=1 << 30).id
            except FrameRejected as exc:
                msg_id = exc.msg_id
            self.queue(error_frame(ErrorCode.RATE_LIMITED,
                                   f"over {server.cfg.rate:g} messages/s", msg_id))
            return
        try:
            send = parse_client_frame(payload, is_text=is_text, max_text=server.cfg.max_text)
        except FrameRejected as exc:
            stats.rejected += 1
            self.queue(exc.frame())
            return
        room.send(self, send.id, send.text)

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
            self.server.mark_dirty(self)
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
        if self.eof_after_flush:
            self.eof_after_flush = False
            transport.close()

    def _slow_consumer(self) -> None:
        self.server.stats.slow_consumer_closes += 1
        log.info("closing slow consumer %s in room %s (4009)", self.user,
                 self.room.name if self.room else "-")
        self.pending.clear()
        self.pending_bytes = 0
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: send queue overflowed", now=True)

    def close(self, code: int, reason: str = "", *, now: bool = False) -> None:
        """Start the closing handshake with ``code``; abort after a grace period.

        ``now`` writes the close frame immediately instead of at the end of
        the turn (used when pending frames were dropped).
        """
        ws, transport = self.ws, self.transport
        if self.closed or ws is None or transport is None:
            return
        if not transport.is_reading():
            transport.resume_reading()  # to read the peer's close frame
        self.closing = True
        if ws.state is OPEN:
            ws.send_close(code, reason)
            if now:
                for data in ws.data_to_send():
                    if data:
                        transport.write(data)
            else:
                self._take_ws_output()
        self.server.detach(self)
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self.abort)

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def describe(self) -> dict[str, Any]:
        return {"user": self.user, "pending_bytes": self.pending_bytes}
