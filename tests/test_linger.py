"""roomshard.linger over real loopback sockets: how each lingering close ends.

A server accepts, writes an answer, and lingers at once; a plain socket
client plays the peer. "Reset" is observed as the client sees it
(``ConnectionResetError``), a clean end as EOF after the whole answer.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from roomshard.linger import Linger, LingerLimits, LingerPool
from roomshard.testing.timing import await_until, t

ANSWER = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\n{}"


@dataclass
class LingerServer:
    pool: LingerPool
    answer: bytes = ANSWER
    port: int = 0
    lingers: list[Linger | None] = field(default_factory=list)
    lost: int = 0


class _Proto(asyncio.Protocol):
    def __init__(self, srv: LingerServer) -> None:
        self.srv = srv
        self.linger: Linger | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.srv.answer)
        self.linger = self.srv.pool.start(transport)
        self.srv.lingers.append(self.linger)

    def data_received(self, data: bytes) -> None:
        assert self.linger is not None, "input after a close without linger"
        self.linger.data(len(data))

    def eof_received(self) -> bool:
        if self.linger is not None:
            self.linger.eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger is not None:
            self.linger.lost()
        self.srv.lost += 1


async def serve(limits: LingerLimits, answer: bytes = ANSWER) -> AsyncIterator[LingerServer]:
    srv = LingerServer(LingerPool(limits), answer)
    server = await asyncio.get_running_loop().create_server(lambda: _Proto(srv), "127.0.0.1", 0)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def fast() -> AsyncIterator[LingerServer]:
    async for srv in serve(LingerLimits(time=1.5, timeout=0.3, bytes=1 << 20, max=4)):
        yield srv


def _client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=t(5))
    return sock


def _read_all(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until EOF; True when it ended in a reset instead."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, True
    return data, False


async def test_peer_fin_closes_cleanly_after_the_answer_even_with_input_sent(fast):
    sock = _client(fast.port)
    sock.sendall(b"x" * 300_000)  # a body the server never wanted
    sock.shutdown(socket.SHUT_WR)
    data, reset = await asyncio.to_thread(_read_all, sock)
    sock.close()
    assert (data, reset) == (ANSWER, False)
    await await_until(lambda: fast.lost == 1, 5, "the server socket to close")
    assert fast.pool.ends["fin"] == 1
    assert fast.pool.dropped_bytes == 300_000
    assert fast.pool.active == 0


async def test_a_silent_peer_is_closed_after_the_quiet_period(fast):
    sock = _client(fast.port)
    started = time.monotonic()
    data, reset = await asyncio.to_thread(_read_all, sock)
    assert (data, reset) == (ANSWER, False)  # our FIN right after the answer...
    assert time.monotonic() - started < t(0.25)
    # ...and, the peer staying silent and open, the socket closes after the quiet period.
    await await_until(lambda: fast.lost == 1, 5, "the server socket to close")
    assert fast.pool.ends == {**fast.pool.ends, "quiet": 1, "fin": 0}
    assert time.monotonic() - started >= 0.3
    sock.close()


def _reset_while_sending(sock: socket.socket, chunk: bytes, times: int, pace: float = 0.0) -> bool:
    """Send ``chunk`` up to ``times`` times, ``pace`` seconds apart; True once the server
    reset the connection (the pacing is the input's shape, not a wait for a condition)."""
    try:
        for _ in range(times):
            sock.sendall(chunk)
            time.sleep(pace)
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


async def test_a_peer_that_keeps_sending_is_reset_at_the_time_cap(fast):
    sock = _client(fast.port)
    started = time.monotonic()
    # 100 bytes every 0.1 s (more often than the 0.3 s quiet period) for up to 5 s.
    reset = await asyncio.to_thread(_reset_while_sending, sock, b"y" * 100, int(t(50)), 0.1)
    assert reset, "the server never reset the trickling peer"
    sock.close()
    assert fast.pool.ends["time"] == 1
    assert 1.4 < time.monotonic() - started < t(3.0)
    await await_until(lambda: fast.pool.active == 0, 5, "the pool to empty")


async def test_a_peer_sending_past_the_byte_cap_is_reset(fast):
    sock = _client(fast.port)
    # 12.8 MiB at most; the cap is 1 MiB.
    reset = await asyncio.to_thread(_reset_while_sending, sock, b"z" * 65536, 200)
    assert reset, "the server never reset the flooding peer"
    sock.close()
    assert fast.pool.ends["bytes"] == 1
    assert fast.pool.dropped_bytes > 1 << 20


async def test_lingering_sockets_are_bounded_in_number(fast):
    socks = [_client(fast.port) for _ in range(6)]
    await await_until(lambda: len(fast.lingers) == 6, 5, "six connections")
    assert sum(1 for lg in fast.lingers if lg is not None) == 4
    assert fast.pool.ends["full"] == 2
    for sock in socks:
        sock.close()
    await await_until(lambda: fast.pool.active == 0 and fast.lost == 6, 5, "every socket closed")


async def test_a_peer_that_never_reads_a_large_answer_is_reset_after_the_quiet_period():
    # Far more than the kernel buffers hold: the transport keeps the rest.
    async for srv in serve(LingerLimits(time=5, timeout=0.3, bytes=1 << 20, max=4), b"w" * (8 << 20)):
        started = time.monotonic()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        await await_until(lambda s=srv: s.lost == 1, 5, "the stalled peer to be dropped")
        assert srv.pool.ends["quiet"] == 1
        assert time.monotonic() - started < t(2)
        sock.close()
