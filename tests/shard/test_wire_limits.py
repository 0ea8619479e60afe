"""Wire limits checked in process (the end-to-end abuse tests are in test_wire_abuse.py)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from websockets.frames import Frame, Opcode

from roomshard.testing.timing import await_until, t
from tests.shard.e2e import RawClient, wait_closed_by_server


def masked(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def raw_handshake(port: int, head: str) -> bytes:
    """Send a raw HTTP request head; the response head."""
    with socket.create_connection(("127.0.0.1", port), timeout=t(5)) as sock:
        sock.sendall(head.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf


# -- fragments ---------------------------------------------------------------
@pytest.mark.parametrize("shard_overrides", [{"max_frame": 4096}])
async def test_fragment_overhead_counts_against_max_frame(shard):
    """1-byte fragments cost their overhead: far fewer than max_frame of them fit."""
    raw = await asyncio.to_thread(RawClient, shard.url("frag", "alice"))
    raw.sock.sendall(masked(Opcode.TEXT, b"x", fin=False)
                     + masked(Opcode.CONT, b"x", fin=False) * 200)  # 201 bytes of payload
    _, code = await wait_closed_by_server(raw)
    raw.close()
    assert code == 1009


# -- HTTP on the shard port ------------------------------------------------------
async def test_large_unauthenticated_body_is_refused_413(shard):
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{shard.server.url}/internal/rooms/r/access",
                            content=b"x" * (1 << 20), timeout=t(5))
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


async def test_large_body_is_refused_before_it_is_read(shard):
    """A Content-Length over the unauthenticated limit gets its 413 without sending the body."""
    head = (f"POST /internal/rooms/r/access HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n")
    port = int(shard.server.url.rsplit(":", 1)[1])
    resp = await asyncio.to_thread(raw_handshake, port, head)
    assert resp.startswith(b"HTTP/1.1 413"), resp


async def test_pipelined_requests_wait_while_the_client_does_not_read(shard, monkeypatch):
    """A client pipelining requests without reading cannot make answers pile up in the shard."""
    from shard.connection import Connection

    held_before_answer: list[int] = []
    conns: list[Connection] = []
    respond = Connection._respond

    def recording_respond(self, resp, *, close=False):
        if self.transport is not None:
            held_before_answer.append(self.transport.get_write_buffer_size())
            if self not in conns:
                conns.append(self)
        return respond(self, resp, close=close)

    monkeypatch.setattr(Connection, "_respond", recording_respond)
    n = 5000  # ~750 KB of answers: far more than the kernel buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(t(10))
    sock.connect(("127.0.0.1", int(shard.server.url.rsplit(":", 1)[1])))
    requests = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * n
    sender = asyncio.create_task(asyncio.to_thread(sock.sendall, requests))

    def stalled_or_piling_up() -> bool:
        return any(h > 0 for h in held_before_answer) or any(
            getattr(c, "_http_stalled", False) for c in conns)

    await await_until(stalled_or_piling_up, 10, "the shard to stall (or to pile up answers)")
    assert max(held_before_answer) == 0, "an answer was written behind unread answers"
    assert len(held_before_answer) < n  # it stopped answering while we did not read
    # Once we read, every answer comes, in order, none lost.
    got = b""
    while got.count(b"HTTP/1.1 200") < n:
        chunk = await asyncio.to_thread(sock.recv, 65536)
        assert chunk, "the shard closed the connection"
        got += chunk
    await sender
    sock.close()
    assert max(held_before_answer) == 0
