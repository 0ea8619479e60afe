"""uvicorn's httptools protocol with the limits httptools lacks: head size and head time.

httptools has no limit on a request head: it concatenates a header (or the
request line) chunk by chunk until it ends, so one client sending a 160 MiB
header stalls the directory's event loop for tens of seconds, long enough
for every shard's heartbeat to time out. :class:`BoundedHttpToolsProtocol`
counts the bytes of each request head as they arrive and refuses a head
over :data:`MAX_HEAD_BYTES` at once with ``431`` and the contract's JSON
error body, without buffering the rest; a head that is not complete within
:data:`HEAD_TIMEOUT_S` of its first byte (or of the connection, for the
first request) is refused with ``408`` (slowloris).

Every close the directory starts while a request may still be arriving is
a lingering close (:mod:`roomshard.linger`): after a refusal, and after an
answer given before the request's body was read (``413`` from
``directory.http.edge.read_body``, a ``401`` that never looks at the body), the
connection is half-closed, the response goes out with a FIN, and whatever
the client still sends is read and dropped until its FIN or a bound
(``ROOMSHARD_CLOSE_LINGER_*``). A declared body of at most
:data:`DROP_BODY_MAX_BYTES` answered before it arrived is read and dropped
and the connection goes on (its answer said keep-alive). Closing at once with unread input would send
a TCP reset that destroys the response before the client reads it. uvicorn
sees the transport through :class:`_Transport`, whose ``close`` lingers
while a request is unfinished.

Connects in flight are bounded here, before any work is queued for them
(:class:`ConnectAdmission`): a ``POST /v1/rooms/{room}/connect`` whose head
completes while ``ROOMSHARD_CONNECTS_IN_FLIGHT`` connects are read and not
yet answered gets no ASGI task at all: it is answered 503 ``overloaded``
with ``Retry-After`` and its connection closes (lingering). Every request
that is read becomes a task that runs to its end on the one event loop, in
arrival order: bounding the connects bounds how long a shard's heartbeat or
open waits behind them (1,000 connects are ~0.2 s of work), however many
clients retry at once; a shed connect costs its parse and a write. The
shards' calls are never counted or shed.

A connect that arrived whole in one read (HTTP/1.1, kept alive, a declared body
of at most :data:`MAX_ANSWER_NOW_BODY`, no ``Expect``, no chunks, not pipelined
behind an unanswered request) is first offered to ``ConnectAdmission.answer``
(``directory.http.connect.connect_now``) inside the read: a room with a serving
owner the store can look up at once is answered there, with no ASGI task
(docs/benchmarks/connect.md); anything else becomes an ordinary request, counted
as above, which does every check again.

Accounting is per ``data_received`` chunk (at most one transport read, a
few hundred KiB): the head is refused once more than ``MAX_HEAD_BYTES``
arrived while it was incomplete, so the work spent on one head is bounded
by the limit plus one read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from directory.domain.errors import RETRY_AFTER_S
from roomshard.linger import Linger, LingerLimits, LingerPool
from roomshard.wire.errors import error_body

#: Longest request head (request line + headers) the directory reads; like the shard's.
MAX_HEAD_BYTES = 16 * 1024
#: A request head must be complete this long after its first byte.
HEAD_TIMEOUT_S = 10.0
#: The directory's default bounds of a lingering close (``ROOMSHARD_CLOSE_LINGER_*``).
DEFAULT_LINGER = LingerLimits(max=1_000)

#: Largest connect body answered without a task (a connect's is ~20 bytes).
MAX_ANSWER_NOW_BODY = 4096
#: A request answered before its body was read keeps its connection if the body it
#: declared is at most this long (the rest is read and dropped); a longer or chunked one
#: ends the connection with a lingering close.
DROP_BODY_MAX_BYTES = 64 * 1024

#: The scope key of a request's arrival (``loop.time()`` of its first byte), which lets a
#: handler see how long the request waited for its turn (``directory.http.connect`` sheds
#: a connect that waited too long).
ARRIVED = "roomshard.arrived"

#: On every directory response, errors and refusals included (uvicorn's default headers:
#: no per-request cost). The chat page adds its Content-Security-Policy.
SECURITY_HEADERS = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]

log = logging.getLogger("roomshard.directory")


#: ``answer(room, authorization, body)``: the 200 body of a connect answerable at once,
#: else None (``directory.http.connect.connect_now``).
AnswerNow = Callable[[str, "str | None", bytes], "bytes | None"]


class ConnectAdmission:
    """The connects one server has read and not answered yet, bounded; ``on_shed`` is
    called for each connect answered 503 ``overloaded`` here (the app's metrics);
    ``answer`` answers a connect that arrived whole before it becomes a task, where it
    can (see the module docstring)."""

    __slots__ = ("answer", "in_flight", "limit", "on_shed")

    def __init__(self, limit: int, on_shed: Callable[[], None] | None = None,
                 answer: AnswerNow | None = None) -> None:
        self.limit = limit
        self.in_flight = 0
        self.on_shed = on_shed
        self.answer = answer

    def full(self) -> bool:
        return self.in_flight >= self.limit


def uvicorn_options(linger: LingerLimits = DEFAULT_LINGER,
                    connects: ConnectAdmission | None = None) -> dict[str, Any]:
    """The ``uvicorn.Config`` options of the directory's HTTP edge.

    httptools bounded in head size and time, closes that linger within
    ``linger`` (one pool of lingering sockets per call: per server), at most
    ``connects.limit`` connects at once (``ROOMSHARD_CONNECTS_IN_FLIGHT``; no bound
    when not given); no WebSocket routes on the
    directory, so upgrade requests are plain HTTP requests.
    """
    protocol = type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                    {"linger_pool": LingerPool(linger),
                     "connects": connects or ConnectAdmission(sys.maxsize)})
    return {"http": protocol, "ws": "none", "headers": SECURITY_HEADERS}


class _Transport:
    """The transport as uvicorn sees it: ``close`` lingers while a request is unfinished."""

    __slots__ = ("_protocol", "_transport", "is_closing", "write")

    def __init__(self, transport: asyncio.Transport, protocol: BoundedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write  # the per-response calls skip __getattr__
        self.is_closing = transport.is_closing

    def close(self) -> None:
        self._protocol.close_connection()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


def refusal(status: int, code: str, message: str,
            headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with the contract's JSON body."""
    body = error_body(code, message)
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        *(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in (*SECURITY_HEADERS, *headers)),
        b"connection: close\r\n\r\n",
        body,
    ])


CONNECT_PREFIX, CONNECT_SUFFIX = "/v1/rooms/", "/connect"


def connect_room(path: str) -> str | None:
    """The room of a ``/v1/rooms/{room}/connect`` path, as the connect route's pattern
    (``directory.app.strict``: everything between the prefix and the last ``/connect``)
    reads it; None for any other path."""
    if (path.startswith(CONNECT_PREFIX) and path.endswith(CONNECT_SUFFIX)
            and len(path) >= len(CONNECT_PREFIX) + len(CONNECT_SUFFIX)):
        return path[len(CONNECT_PREFIX):-len(CONNECT_SUFFIX)]
    return None


def _declared_length(headers: list[tuple[bytes, bytes]]) -> float:
    """The request body's declared length; infinite when chunked, repeated or malformed."""
    length: float = 0
    seen = False
    for name, value in headers:
        if name == b"transfer-encoding":
            return math.inf
        if name == b"content-length":
            if seen or not value.isdigit():
                return math.inf
            seen, length = True, int(value)
    return length


def _connect_of(method: bytes, url: bytes) -> str | None:
    """The room of a ``POST /v1/rooms/{room}/connect`` (the request line's path, decoded
    as uvicorn does); None for any other request."""
    if method != b"POST":
        return None
    path = url.partition(b"?")[0].decode("latin-1")
    return connect_room(unquote(path) if "%" in path else path)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that refuses oversized (431) and slow (408) request heads."""

    linger_pool = LingerPool(DEFAULT_LINGER)  # replaced per server by uvicorn_options
    connects = ConnectAdmission(sys.maxsize)  # likewise

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._raw: asyncio.Transport | None = None
        self._linger: Linger | None = None
        self._body_open = False  # the latest request's head is in, its body still arriving
        # ... and its declared length is small: answered before it is read, the rest is read
        # and dropped and the connection stays open (its answer said keep-alive).
        self._small_body = False
        self._head_open = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._head_started = False  # a byte of the current head has arrived
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._shed = False  # the current request is a connect answered 503 overloaded
        self._now: list[bytes] | None = None  # a connect held for an answer at once: its body
        self._now_room = ""  # and its room
        self._now_auth: str | None = None  # and its Authorization header
        connects = self.connects

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            try:
                await self._app(scope, receive, send)
            finally:
                connects.in_flight -= 1

        self._app = self.app
        self._counted_app = counted

    # -- timers ---------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_open and self._head_started:
            self._refuse(408, "request_timeout",
                         f"request head not complete within {HEAD_TIMEOUT_S:g} s")
        elif self._head_open and (self.cycle is None or self.cycle.response_complete):
            # A connection that never sent a byte: uvicorn's keep-alive timer
            # only runs after a response, so close it here.
            self.transport.close()

    # -- closing --------------------------------------------------------------
    def close_connection(self) -> None:
        """Close; linger when the client may still be sending (see the module docstring)."""
        raw = self._raw
        if raw is None or self._linger is not None:
            return
        if self._refused or self._body_open or self._head_started:
            self._start_linger()  # the client is still sending
        else:
            raw.close()

    def _start_linger(self) -> None:
        self._refused = True  # nothing more is parsed
        self._cancel_head_timer()
        self._unset_keepalive_if_required()  # uvicorn's: cancels the keep-alive timer
        if self._raw is not None and self._linger is None:
            self._linger = self.linger_pool.start(self._raw)

    # -- protocol interface ---------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        self._arm_head_timer()  # also ends a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._raw = None  # uvicorn's close() from here on is a no-op
        if self._linger is not None:
            self._linger.lost()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self._linger is not None:
            self._linger.eof()
            return True
        return None  # the transport closes

    def data_received(self, data: bytes) -> None:
        if self._refused:
            if self._linger is not None:
                self._linger.data(len(data))
            return
        was_open = self._head_open
        super().data_received(data)
        if self._now is not None:  # its body is still arriving: the general way bounds its time
            if self._refused or self.transport.is_closing():
                self._now = None
            else:
                self._go_general()
        if self._shed and not self._refused:
            connects = self.connects
            if connects.on_shed is not None:
                connects.on_shed()
            self._refuse(503, "overloaded",
                         f"the directory is overloaded: {connects.limit} connects in flight; "
                         "retry after Retry-After, with jitter",
                         headers=(("Retry-After", str(RETRY_AFTER_S)),), quiet=True)
            return
        if self._refused or self.transport.is_closing():
            return
        if not self._head_open:
            return
        if was_open:
            # The head spanned this whole read (and is still incomplete).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "request_header_too_large",
                             f"request line and headers over {MAX_HEAD_BYTES} bytes")
                return
        if self._head_timer is None:
            # Armed only for a head that a read left incomplete: a request that
            # arrives whole (the usual case) costs no timer.
            self._arm_head_timer()

    # -- parser callbacks -----------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._unset_keepalive_if_required()  # (armed by an answer earlier in this read)
        self.scope[ARRIVED] = self.loop.time()  # type: ignore[literal-required]
        self._head_started = True
        if not self._head_open:  # a new request on a kept-alive connection
            self._head_open = True
            self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_started = False
        self._head_bytes = 0
        self._cancel_head_timer()
        self._body_open = True
        self._small_body = _declared_length(self.headers) <= DROP_BODY_MAX_BYTES
        if self._shed:
            return  # a request pipelined behind a shed connect: the connection is ending
        room = _connect_of(self.parser.get_method(), self.url)
        if room is None:
            super().on_headers_complete()
            return
        connects = self.connects
        if connects.full():
            self._shed = True  # answered once this read is parsed (data_received)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # Pipelined behind an unanswered request: its task starts later, or never if
            # the client goes away first; not counted (clients do not pipeline connects).
            super().on_headers_complete()
            return
        if connects.answer is not None and self._answerable():
            self._now = []  # answered in on_message_complete if the whole request is here
            self._now_room = room
            return
        self._start_counted()

    def _answerable(self) -> bool:
        """A plain kept-alive HTTP/1.1 request with a small declared body (no
        ``Expect``, no upgrade, no chunks): the kind :meth:`_answer_now` may answer."""
        if self.expect_100_continue or self.parser.should_upgrade():
            return False
        if self.parser.get_http_version() != "1.1" or not self.parser.should_keep_alive():
            return False
        length = None
        self._now_auth = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return False
                length = int(value)
            elif name == b"transfer-encoding":
                return False
            elif name == b"authorization" and self._now_auth is None:
                self._now_auth = value.decode("latin-1")
        return length is not None and length <= MAX_ANSWER_NOW_BODY

    def _start_counted(self) -> None:
        """uvicorn's start of the request (its ASGI task), counted in flight."""
        tasks = len(self.tasks)
        self.app = self._counted_app  # the task it starts now counts itself out when it ends
        try:
            super().on_headers_complete()
        finally:
            self.app = self._app
        if len(self.tasks) > tasks:  # (uvicorn starts none for, e.g., an upgrade request)
            self.connects.in_flight += 1

    def _go_general(self) -> None:
        """The connect held for :meth:`_answer_now` becomes an ordinary request."""
        body, self._now = self._now, None
        assert body is not None
        self._start_counted()
        for chunk in body:
            super().on_body(chunk)

    def on_body(self, body: bytes) -> None:
        if self._now is not None:
            self._now.append(body)
        elif not self._shed:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_open = False
        if self._now is not None:
            if self._answer_now():
                return
            self._go_general()
        if not self._shed:
            super().on_message_complete()

    def _answer_now(self) -> bool:
        """Answer the held connect if the app can at once (200); False: it cannot."""
        assert self._now is not None and self.connects.answer is not None
        body = self._now[0] if len(self._now) == 1 else b"".join(self._now)
        answer = self.connects.answer(self._now_room, self._now_auth, body)
        if answer is None:
            return False
        self._now = None
        self.transport.write(b"".join([
            b"HTTP/1.1 200 OK\r\n",
            *(b"%s: %s\r\n" % kv for kv in self.server_state.default_headers),
            b"content-type: application/json\r\ncache-control: no-store\r\n"
            b"content-length: %d\r\n\r\n" % len(answer),
            answer,
        ]))
        self.on_response_complete()  # uvicorn's keep-alive timer, as after any response
        return True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (self._body_open and self.cycle is not None and self.cycle.response_complete
                and not self._refused and self._linger is None and not self._small_body):
            # Answered before the request's body was read (413, 401, ...): the
            # rest of it is dropped and the connection ends, lingering. A small
            # declared body is read and dropped instead (uvicorn ignores a body that
            # arrives after its answer), and the connection goes on: the answer said
            # keep-alive, and a client's next request on it must find it open.
            self._start_linger()

    # -- refusal --------------------------------------------------------------
    def _refuse(self, status: int, code: str, message: str,
                headers: tuple[tuple[str, str], ...] = (), *, quiet: bool = False) -> None:
        self._refused = True
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        if not quiet:  # (shed connects are counted, not logged one by one)
            log.warning("refused a request from %s: %s", self.client and self.client[0], message)
        transport = self.transport
        if self.cycle is None or self.cycle.response_complete:
            transport.write(refusal(status, code, message, headers))
        else:  # a pipelined earlier response is still being written: just end it
            self.cycle.keep_alive = False
            self.cycle.disconnected = True
        self.parser = None  # type: ignore[assignment]  # no more parsing on this connection
        if self.cycle is None or self.cycle.response_complete:
            self._start_linger()
        # else: the pipelined response's end closes the connection (close_connection)
