"""Lingering close: a server that closes a connection first lets the peer read it.

Closing a socket whose receive buffer still holds unread input makes Linux
answer with a TCP reset, and the peer's kernel then throws away everything
it had received but not yet read: the close frame, the error response, the
acks written just before. So a closing server (the shard and the directory
alike) never closes a socket the peer may still be writing to. It
*lingers*, as nginx's ``lingering_close`` does:

1. everything it means to send is written, then the connection is
   half-closed (``write_eof``: a FIN after the last byte);
2. whatever the peer still sends is read and dropped, unparsed and charged
   to nobody;
3. the socket is closed at the peer's FIN, or after ``timeout`` seconds
   without input, and reset once ``time`` seconds passed since the linger
   began or more than ``bytes`` were dropped.

A peer that still holds unread output of ours when a bound is reached (it
stopped reading) is reset: it would never read it. The number of lingering
sockets per process is bounded by ``max``; past it a connection is closed at
once, as it would be without lingering.

Both servers call :meth:`LingerPool.start` with their transport and route the
transport's callbacks (``data_received``, ``eof_received``,
``connection_lost``) to the returned :class:`Linger`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

DEFAULT_LINGER_TIME_S = 30.0
DEFAULT_LINGER_TIMEOUT_S = 5.0
DEFAULT_LINGER_BYTES = 64 << 20
#: How a linger ended, the label values of the ``linger_ends`` metrics.
ENDS = ("fin", "quiet", "time", "bytes", "full", "unsupported")


@dataclass(frozen=True, slots=True)
class LingerLimits:
    """The bounds of one lingering close (see the module docstring)."""

    time: float = DEFAULT_LINGER_TIME_S
    timeout: float = DEFAULT_LINGER_TIMEOUT_S
    bytes: int = DEFAULT_LINGER_BYTES
    max: int = 10_000


class LingerPool:
    """The lingering sockets of one server: how many now, and how their lingers ended."""

    def __init__(self, limits: LingerLimits) -> None:
        self.limits = limits
        self.active = 0
        self.ends: dict[str, int] = dict.fromkeys(ENDS, 0)
        self.dropped_bytes = 0

    def start(self, transport: asyncio.Transport, *, peer_eof: bool = False) -> Linger | None:
        """Half-close ``transport`` and linger; None when it was closed at once instead.

        ``peer_eof``: the peer already sent its FIN (nothing more can arrive),
        so the socket is closed as soon as our output is out.
        """
        if transport.is_closing():
            return None
        if not transport.can_write_eof():
            self.ends["unsupported"] += 1
            transport.close()
            return None
        if self.active >= self.limits.max:
            self.ends["full"] += 1
            transport.close()
            return None
        return Linger(self, transport, peer_eof)


class Linger:
    """One lingering socket; see the module docstring."""

    __slots__ = ("_deadline", "_last", "_loop", "_pool", "_timer", "closing", "dropped", "is_lost",
                 "transport")

    def __init__(self, pool: LingerPool, transport: asyncio.Transport, peer_eof: bool) -> None:
        self._pool = pool
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._deadline = now + pool.limits.time
        self._last = now
        self.dropped = 0
        self.closing = False  # close() was called; waiting for connection_lost
        self.is_lost = False
        pool.active += 1
        transport.write_eof()  # sent after whatever the transport still holds
        self._timer: asyncio.TimerHandle | None = None
        if peer_eof:
            self.eof()
            return
        if not transport.is_reading():
            transport.resume_reading()
        self._arm(min(now + pool.limits.timeout, self._deadline))

    def _arm(self, when: float) -> None:
        self._timer = self._loop.call_at(when, self._check)

    def data(self, n: int) -> None:
        """The peer sent ``n`` more bytes: dropped."""
        self.dropped += n
        self._pool.dropped_bytes += n
        self._last = self._loop.time()
        if self.dropped > self._pool.limits.bytes and not self.closing:
            self._end("bytes", reset=True)

    def eof(self) -> None:
        """The peer's FIN: nothing more will arrive; close once our output is out."""
        if not self.closing:
            self._end("fin", reset=False)

    def lost(self) -> None:
        """The transport's ``connection_lost``."""
        if self.is_lost:
            return
        self.is_lost = True
        self._pool.active -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.is_lost:
            return
        now = self._loop.time()
        if self.closing:  # closed gracefully a while ago but our output is still not read
            self.transport.abort()
            return
        if now >= self._deadline:
            self._end("time", reset=True)
        elif now - self._last >= self._pool.limits.timeout:
            self._end("quiet", reset=False)
        else:
            self._arm(min(self._last + self._pool.limits.timeout, self._deadline))

    def _end(self, how: str, *, reset: bool) -> None:
        self._pool.ends[how] += 1
        self.closing = True
        transport = self.transport
        if reset or (how == "quiet" and transport.get_write_buffer_size()):
            transport.abort()  # the peer stopped reading (or abuses the linger): reset
            return
        transport.close()  # our buffered output is written first, then the socket closes
        if self._timer is not None:
            self._timer.cancel()
        # A peer that never reads what is left would keep the socket open: bounded.
        self._arm(self._loop.time() + self._pool.limits.timeout)
