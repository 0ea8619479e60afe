"""Wire frames of the shard: outgoing frame bytes and validation of client frames.

Outgoing frames are built here as complete, unmasked server frames (RFC 6455
section 5.2: server frames are never masked), so a broadcast encodes its
payload once and every recipient gets the very same ``bytes`` object.

Incoming data frames are validated once, at the edge, by
:func:`parse_client_frame`: a ``send`` is ``{"type": "send", "id": str 1..64,
"text": str}`` (other fields are ignored, so clients may add
their own); anything else is a :class:`FrameRejected` carrying the
contract's error code (and the client's ``id`` when it could be read).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson

from roomshard.protocol import MAX_CLIENT_MESSAGE_ID, ErrorCode

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
_FIN = 0x80


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server frame: header + payload."""
    n = len(payload)
    if n < 126:
        head = bytes((_FIN | opcode, n))
    elif n < 65536:
        head = struct.pack("!BBH", _FIN | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", _FIN | opcode, 127, n)
    return head + payload


def text_frame(payload: bytes) -> bytes:
    """A text frame around an already-encoded UTF-8 (JSON) payload."""
    return server_frame(OP_TEXT, payload)


def json_frame(obj: Any) -> bytes:
    return server_frame(OP_TEXT, orjson.dumps(obj))


def error_frame(code: str, message: str, msg_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if msg_id is not None:
        body["id"] = msg_id
    return json_frame(body)


@dataclass(frozen=True, slots=True)
class SendFrame:
    id: str
    text: str


class FrameRejected(Exception):
    """A client frame refused with an error frame; the connection stays open."""

    def __init__(self, code: str, message: str, msg_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id

    def frame(self) -> bytes:
        return error_frame(self.code, self.message, self.msg_id)


def parse_client_frame(payload: bytes, *, is_text: bool, max_text: int) -> SendFrame:
    """Validate one complete client message; raises :class:`FrameRejected`."""
    if not is_text:
        raise FrameRejected(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send JSON text")
    try:
        obj = orjson.loads(payload)  # also rejects invalid UTF-8
    except orjson.JSONDecodeError:
        raise FrameRejected(ErrorCode.BAD_REQUEST, "malformed JSON") from None
    if not isinstance(obj, dict):
        raise FrameRejected(ErrorCode.BAD_REQUEST, "a frame must be a JSON object")
    raw_id = obj.get("id")
    msg_id = raw_id if isinstance(raw_id, str) and 1 <= len(raw_id) <= MAX_CLIENT_MESSAGE_ID else None
    kind = obj.get("type")
    if kind != "send":
        raise FrameRejected(ErrorCode.BAD_REQUEST, f"unknown frame type {kind!r}", msg_id)
    if msg_id is None:
        raise FrameRejected(
            ErrorCode.BAD_REQUEST, f"id must be a string of 1..{MAX_CLIENT_MESSAGE_ID} characters")
    text = obj.get("text")
    if not isinstance(text, str):
        raise FrameRejected(ErrorCode.BAD_REQUEST, "text must be a string", msg_id)
    if len(text) > max_text:
        raise FrameRejected(ErrorCode.TOO_LONG, f"text is over {max_text} characters", msg_id)
    return SendFrame(msg_id, text)
