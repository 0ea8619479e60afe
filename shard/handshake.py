"""The common WebSocket handshake, parsed in one pass by httptools (sans I/O).

Nearly every connection a shard ever sees opens with one complete, ordinary
handshake in its first read: ``GET /iN/room/ID?ticket=... HTTP/1.1`` with
``Upgrade: websocket``, ``Connection: Upgrade``, a 16-byte
``Sec-WebSocket-Key`` and ``Sec-WebSocket-Version: 13``, no body.
:func:`parse_upgrade` recognises exactly that with httptools (llhttp, the
parser uvicorn uses) and returns the request and the 101 answer. Anything
else (a partial head, another method or version, a body, a missing or
repeated handshake header, a malformed request) returns ``None``, and the
connection takes the general path: h11 for HTTP and websockets'
``ServerProtocol.accept`` for the handshake, which answers every refusal
with its precise status. Both paths accept the same handshakes; this one
costs a sixth of the other's CPU (docs/benchmarks/connect.md).
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

import httptools
from websockets.utils import accept_key

from shard.http import HttpRequest

#: The longest head taken on this path (the general path's bound is 16 KiB as well).
MAX_HEAD_BYTES = 16 * 1024
_END = b"\r\n\r\n"
# Headers taken here only when they appear exactly once (RFC 6455 4.2.1; h11 needs one Host).
_ONCE = frozenset((b"host", b"upgrade", b"connection", b"sec-websocket-key",
                   b"sec-websocket-version"))


class Upgrade(NamedTuple):
    request: HttpRequest
    response: bytes  # the complete 101 answer
    rest: bytes  # what the client sent after the head (its first frames, if any)


class _Head:
    """httptools callbacks: the URL and the raw headers of one request head."""

    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_upgrade(data: bytes) -> Upgrade | None:
    """The request and 101 answer when ``data`` starts with a whole plain handshake, else None."""
    end = data.find(_END, 0, MAX_HEAD_BYTES)
    if end < 0:
        return None
    head_end = end + len(_END)
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data[:head_end])
    except httptools.HttpParserUpgrade:
        pass  # what a handshake ends with
    except httptools.HttpParserError:
        return None
    if not head.complete or parser.get_method() != b"GET" or parser.get_http_version() != "1.1":
        return None
    seen: dict[bytes, bytes] = {}
    for name, value in head.headers:
        if name in _ONCE and name in seen:
            return None
        if name in (b"content-length", b"transfer-encoding"):
            return None
        seen[name] = value
    if (b"host" not in seen or seen.get(b"sec-websocket-version") != b"13"
            or _tokens(seen.get(b"upgrade")) != [b"websocket"]
            or b"upgrade" not in _tokens(seen.get(b"connection"))):
        return None
    key = seen.get(b"sec-websocket-key", b"")
    try:
        if len(b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    target = head.url.decode("latin-1")
    split = urlsplit(target)
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
    request = HttpRequest("GET", split.path, dict(parse_qsl(split.query)), headers)
    response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_key(key.decode("ascii")).encode("ascii") + b"\r\n\r\n")
    return Upgrade(request, response, data[head_end:])


def _tokens(value: bytes | None) -> list[bytes]:
    """A comma-separated header's tokens, trimmed and lower-cased."""
    if value is None:
        return []
    return [t.strip().lower() for t in value.split(b",")]
