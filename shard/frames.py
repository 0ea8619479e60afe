"""Wire frames of the shard: outgoing frame bytes and validation of client frames.

Outgoing frames are built here as complete, unmasked server frames (RFC 6455
section 5.2: server frames are never masked), so a broadcast encodes its
payload once and every recipient gets the very same ``bytes`` object.

Incoming bytes are cut into frames by :func:`read_client_frames` when they
are the common kind (complete, unfragmented, masked text/binary/pong frames,
no extension bits); anything else goes to the full ``websockets`` parser.

Incoming data frames are validated once, at the edge, by
:func:`parse_client_frame`: a ``send`` is ``{"type": "send", "id": str 1..64,
"text": str}``, optionally with ``"ordered": true`` (:mod:`shard.ratelimit`'s
order hold; other fields are ignored, so clients may add their own); anything
else is a :class:`FrameRejected` carrying the contract's error code (and the
client's ``id`` when it could be read), but a text message that is not UTF-8
is :class:`InvalidUtf8` (close 1007).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.frames import apply_mask  # the C version when websockets has its speedups

from roomshard.wire.protocol import MAX_CLIENT_MESSAGE_ID, ErrorCode

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


def frame_payload(frame: bytes) -> bytes:
    """The payload of a frame built by :func:`server_frame` (its header cut off)."""
    n = frame[1] & 0x7F
    return frame[2 if n < 126 else 4 if n == 126 else 10:]


def json_frame(obj: Any) -> bytes:
    return server_frame(OP_TEXT, orjson.dumps(obj))


def error_frame(code: str, message: str, msg_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if msg_id is not None:
        body["id"] = msg_id
    return json_frame(body)


# First header byte of the frames read_client_frames takes: FIN set, no RSV bits.
HEAD_TEXT, HEAD_BINARY, HEAD_PONG = 0x81, 0x82, 0x8A
_FAST_HEADS = frozenset((HEAD_TEXT, HEAD_BINARY, HEAD_PONG))
# An incomplete frame longer than this goes to the websockets parser (its
# buffer appends in place; ours would copy the partial frame per chunk).
MAX_FAST_PARTIAL = 16 * 1024


def read_client_frames(buf: bytes, max_size: int, max_frames: int
                       ) -> tuple[list[tuple[int, bytes]], int, bool]:
    """Cut the common client frames off the start of ``buf`` (which starts at a frame boundary).

    Returns ``(frames, consumed, slow)``: ``frames`` are ``(head byte,
    unmasked payload)`` of complete text, binary and pong frames, at most
    ``max_frames`` of them (the caller's work bound per loop turn);
    ``buf[consumed:]`` is left over. ``slow`` says the frame at ``consumed``
    is of another kind (a fragment, ping, close, an unmasked frame, RSV bits,
    a payload over ``max_size``, a 64-bit length, a long incomplete frame):
    the caller hands ``buf[consumed:]`` and everything after it to the full
    RFC 6455 parser, which answers those exactly as before (1002, 1009,
    pongs, the closing handshake). Otherwise ``buf[consumed:]`` is an
    incomplete frame to complete with the next bytes, or (when ``max_frames``
    frames were cut) more frames for the next turn.
    """
    frames: list[tuple[int, bytes]] = []
    pos, n = 0, len(buf)
    while n - pos >= 2 and max_frames:
        max_frames -= 1
        head, second = buf[pos], buf[pos + 1]
        if head not in _FAST_HEADS or not second & 0x80:  # clients must mask (5.1)
            return frames, pos, True
        length = second & 0x7F
        start = pos + 2
        if length >= 126:
            if length == 127 or head == HEAD_PONG:  # control frames are <= 125 bytes
                return frames, pos, True
            if n - pos < 4:
                break
            length = (buf[start] << 8) | buf[start + 1]
            start += 2
        if length > max_size:
            return frames, pos, True
        end = start + 4 + length
        if end > n:
            if end - pos > MAX_FAST_PARTIAL:
                return frames, pos, True
            break
        frames.append((head, apply_mask(buf[start + 4:end], buf[start:start + 4])))
        pos = end
    return frames, pos, False


@dataclass(frozen=True, slots=True)
class SendFrame:
    id: str
    text: str
    #: Sequence it only after every earlier ordered send of the connection that was
    #: refused for now (``"ordered": true``).
    ordered: bool = False


class InvalidUtf8(Exception):
    """A text message that is not UTF-8: the connection fails with 1007 (RFC 6455 8.1)."""


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
    """Validate one complete client message.

    Raises :class:`FrameRejected` (an error frame) or, for a text message
    that is not UTF-8, :class:`InvalidUtf8` (the connection fails with 1007).
    """
    if not is_text:
        raise FrameRejected(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send JSON text")
    try:
        obj = orjson.loads(payload)  # also rejects invalid UTF-8
    except orjson.JSONDecodeError:
        try:  # only on this error path: tell invalid UTF-8 (1007) from bad JSON
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidUtf8("text frame is not valid UTF-8") from None
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
    return SendFrame(msg_id, text, obj.get("ordered") is True)
