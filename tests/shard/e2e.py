"""Helpers of the shard's end-to-end tests: tickets from the real directory, raw sockets."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

import httpx
import orjson

from roomshard.testing.procs import Proc
from roomshard.testing.timing import t


async def room_url(directory: Proc, room: str, user: str, since: int | None = None,
                   http: httpx.AsyncClient | None = None) -> str:
    """Ask the real directory for a ticketed room URL (open auth)."""
    if http is None:
        async with httpx.AsyncClient(verify=False) as own:  # plain http: skip loading CA certs
            return await room_url(directory, room, user, since, own)
    resp = await http.post(f"{directory.url}/v1/rooms/{room}/connect", json={"user": user},
                           timeout=t(10))
    assert resp.status_code == 200, resp.text
    url = resp.json()["url"]
    return url if since is None else f"{url}&since={since}"


async def metric(proc: Proc, name: str) -> float:
    """One sample of the shard's /metrics (0 when absent)."""
    async with httpx.AsyncClient(verify=False) as http:
        text = (await http.get(f"{proc.url}/metrics", timeout=t(10))).text
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class RawClient:
    """A WebSocket client on a plain socket that can stop reading (a stalled peer)."""

    def __init__(self, url: str, rcvbuf: int = 4096) -> None:
        rest = url.split("://", 1)[1]
        hostport, path = rest.split("/", 1)
        host, port = hostport.rsplit(":", 1)
        self.sock = socket.socket()
        # A small receive buffer makes the server's send queue fill quickly.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(t(10))
        self.sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        # Frames are parsed from an offset: no copy of the whole buffer per frame.
        self.buf, self.pos = bytearray(rest), 0

    def read_frames_until_close(self) -> tuple[list[dict], int | None]:
        """Drain the socket; the JSON frames and the close code (None if none came)."""
        frames: list[dict] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return frames, None
            opcode, payload = frame
            if opcode == 0x8:
                return frames, struct.unpack("!H", payload[:2])[0]
            if opcode == 0x1:
                frames.append(orjson.loads(payload))

    def _need(self, n: int) -> bool:
        """At least ``n`` unread bytes buffered (reads more as needed); O(1) amortised."""
        while len(self.buf) - self.pos < n:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return False
            if not chunk:
                return False
            self.buf += chunk
        return True

    def _next_frame(self) -> tuple[int, bytes] | None:
        if not self._need(2):
            return None
        p = self.pos
        opcode, n = self.buf[p] & 0x0F, self.buf[p + 1] & 0x7F
        head = 2
        if n == 126:
            if not self._need(4):
                return None
            n, head = struct.unpack_from("!H", self.buf, p + 2)[0], 4
        elif n == 127:
            if not self._need(10):
                return None
            n, head = struct.unpack_from("!Q", self.buf, p + 2)[0], 10
        if not self._need(head + n):
            return None
        payload = bytes(self.buf[p + head:p + head + n])
        self.pos = p + head + n
        return opcode, payload

    def close(self) -> None:
        self.sock.close()


async def wait_closed_by_server(raw: RawClient) -> tuple[list[dict], int | None]:
    return await asyncio.to_thread(raw.read_frames_until_close)
