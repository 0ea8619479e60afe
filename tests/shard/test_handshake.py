"""shard.handshake: the one-pass path takes exactly the plain handshakes websockets accepts."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol

from shard.handshake import MAX_HEAD_BYTES, parse_upgrade

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
BASE = [("Host", "shard.local"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]


def _head(headers: list[tuple[str, str]], *, line: str = "GET /i1/room/r-1?ticket=abc.def HTTP/1.1",
          rest: bytes = b"") -> bytes:
    lines = [line, *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + rest


def _websockets_answer(headers: list[tuple[str, str]]) -> bytes:
    response = ServerProtocol().accept(Request("/i1/room/r-1", Headers(headers)))
    assert response.status_code == 101
    return response.headers["Sec-WebSocket-Accept"].encode()


def test_a_plain_handshake_is_answered_like_websockets_does() -> None:
    upgrade = parse_upgrade(_head(BASE + [("User-Agent", "x/1")]))
    assert upgrade is not None
    assert upgrade.request.method == "GET"
    assert upgrade.request.path == "/i1/room/r-1"
    assert upgrade.request.query == {"ticket": "abc.def"}
    assert upgrade.request.headers["user-agent"] == "x/1"
    assert upgrade.request.headers["sec-websocket-key"] == KEY
    assert upgrade.response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: " + _websockets_answer(BASE) + b"\r\n" in upgrade.response
    assert upgrade.response.endswith(b"\r\n\r\n")
    assert upgrade.rest == b""


def test_bytes_after_the_head_are_kept_for_the_frame_reader() -> None:
    frame = b"\x81\x85\x00\x00\x00\x00hello"
    upgrade = parse_upgrade(_head(BASE, rest=frame))
    assert upgrade is not None and upgrade.rest == frame


def test_header_names_and_tokens_are_case_insensitive() -> None:
    headers = [("host", "h"), ("UPGRADE", "WebSocket"), ("connection", "keep-alive, Upgrade"),
               ("SEC-WEBSOCKET-KEY", KEY), ("Sec-Websocket-Version", "13")]
    assert parse_upgrade(_head(headers)) is not None


def _without(name: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in BASE if k != name]


def _with(name: str, value: str) -> list[tuple[str, str]]:
    return [(k, value if k == name else v) for k, v in BASE]


GENERAL_PATH = [
    ("partial head", _head(BASE)[:-2]),
    ("POST", _head(BASE, line="POST /i1/room/r HTTP/1.1")),
    ("HTTP/1.0", _head(BASE, line="GET /i1/room/r HTTP/1.0")),
    ("no host", _head(_without("Host"))),
    ("two hosts", _head(BASE + [("Host", "other")])),
    ("no upgrade", _head(_without("Upgrade"))),
    ("upgrade to two protocols", _head(_with("Upgrade", "websocket, h2c"))),
    ("connection without upgrade", _head(_with("Connection", "keep-alive"))),
    ("no key", _head(_without("Sec-WebSocket-Key"))),
    ("two keys", _head(BASE + [("Sec-WebSocket-Key", KEY)])),
    ("short key", _head(_with("Sec-WebSocket-Key", "c2hvcnQ="))),
    ("key not base64", _head(_with("Sec-WebSocket-Key", "!" * 24))),
    ("version 8", _head(_with("Sec-WebSocket-Version", "8"))),
    ("a body", _head(BASE + [("Content-Length", "2")], rest=b"{}")),
    ("chunked", _head(BASE + [("Transfer-Encoding", "chunked")])),
    ("malformed request line", b"GET\r\n\r\n"),
    ("bad header", _head(BASE + [("Bad Header", "x")])),
    ("head over the bound", _head(BASE + [("X-Pad", "a" * MAX_HEAD_BYTES)])),
]


@pytest.mark.parametrize(("case", "data"), GENERAL_PATH, ids=[c for c, _ in GENERAL_PATH])
def test_everything_else_takes_the_general_path(case: str, data: bytes) -> None:
    assert parse_upgrade(data) is None
