"""Wire limits checked in process (the end-to-end abuse tests are in test_wire_abuse.py)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from websockets.frames import Frame, Opcode

from tests.shard.e2e import RawClient, wait_closed_by_server
from tests.support.timing import t


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
