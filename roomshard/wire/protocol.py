"""The wire vocabulary shared by the directory, the shards and the clients.

Everything here is data: identifier patterns, close codes, error codes and
the defaults of the limits. See ``docs/PROTOCOL.md`` and the external
contract for what each one means to a client.
"""

from __future__ import annotations

import re
from enum import IntEnum

ROOM_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
USER_ID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
INSTANCE_ID_RE = re.compile(r"i([1-9][0-9]{0,3})")
#: What a refused room id is told (400 ``invalid_room``), everywhere.
INVALID_ROOM_ID = f"room id must match ^{ROOM_ID_RE.pattern}$"
#: What a refused user id is told (400 ``invalid_user``), everywhere.
INVALID_USER_ID = f"user id must match ^{USER_ID_RE.pattern}$"
# A client message id: 1..64 characters, any text.
MAX_CLIENT_MESSAGE_ID = 64
#: The history API's pages: ``limit`` defaults to this many messages, at most the max.
HISTORY_PAGE = 50
MAX_HISTORY_PAGE = 500

#: A room whose state was lost restarts its sequence above anything issued
#: before: the first seq of epoch E is ``E << SEQ_EPOCH_SHIFT`` (+1). Live
#: moves keep the seq, so this jump only happens after a loss.
SEQ_EPOCH_SHIFT = 32


def valid_room_id(room: str) -> bool:
    return ROOM_ID_RE.fullmatch(room) is not None


def valid_user_id(user: str) -> bool:
    return USER_ID_RE.fullmatch(user) is not None


def valid_message_id(msg_id: str) -> bool:
    return 1 <= len(msg_id) <= MAX_CLIENT_MESSAGE_ID


def bounded_int(raw: str, low: int, high: int | None = None) -> int | None:
    """The integer ``raw`` spells in decimal digits, within ``[low, high]``; else None."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19):
        return None
    value = int(raw)
    return value if value >= low and (high is None or value <= high) else None


def instance_number(instance: str) -> int | None:
    """``"i12"`` -> 12; None for anything that is not an instance id (1..9999)."""
    m = INSTANCE_ID_RE.fullmatch(instance)
    return int(m.group(1)) if m else None


def seq_base_for_lost_state(epoch: int) -> int:
    return epoch << SEQ_EPOCH_SHIFT


class CloseCode(IntEnum):
    """WebSocket close codes a client acts on (contract table)."""

    GOING_AWAY = 1001  # shard shutting down: re-resolve, reconnect with since
    MESSAGE_TOO_BIG = 1009  # frame too big: fix the client
    TRY_AGAIN_LATER = 1013  # shard not ready or room mid-move: re-resolve after a wait
    TICKET_INVALID = 4001  # invalid, expired or already used ticket
    TICKET_MISMATCH = 4003  # ticket for another room/instance, or access revoked
    NOT_OWNER = 4004  # this instance does not own the room (stale route)
    POLICY = 4008  # rate limit or policy violation: back off
    SLOW_CONSUMER = 4009  # send queue overflowed: reconnect with since
    ROOM_MOVED = 4010  # room moved: re-resolve, reconnect with since


class ErrorCode:
    """``code`` values of ``{"type": "error"}`` frames that do not end the connection."""

    BAD_REQUEST = "bad_request"
    TOO_LONG = "too_long"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # the message store cannot take it now: send it again later


# Defaults of the shard's limits (all configurable).
DEFAULT_MAX_TEXT = 4096
DEFAULT_MAX_FRAME = 1 << 20
DEFAULT_RATE_PER_S = 20.0
DEFAULT_RATE_BURST = 40
DEFAULT_HISTORY = 1000
#: History bytes (message JSON) per room: 1,000 messages of 4,096 characters fit even
#: at 6 bytes a character (escaped control characters), so the count is what binds.
DEFAULT_HISTORY_BYTES = 32 << 20
#: History bytes of every room of one shard together.
DEFAULT_HISTORY_BYTES_TOTAL = 512 << 20
DEFAULT_ROOM_LINGER_S = 600.0
DEFAULT_IDEMPOTENCY_WINDOW_S = 300.0
DEFAULT_PING_INTERVAL_S = 20.0
DEFAULT_PING_TIMEOUT_S = 20.0  # each round checks only its own pings: may equal the interval
# The wire budget of one connection, over every frame it sends (data,
# control and continuation frames): a token bucket of frames and one of
# bytes. Far above a client at the message rate limit (20/s, burst 40)
# with its pings and pongs; over either bucket the connection is closed 4008.
DEFAULT_FRAME_RATE_PER_S = 200.0
DEFAULT_FRAME_BURST = 1000
DEFAULT_BYTE_RATE_PER_S = float(1 << 20)
DEFAULT_BYTE_BURST = 4 << 20  # at least max_frame: one largest message fits
DEFAULT_MAX_FRAGMENTS = 256  # frames of one fragmented message; over it: 1009
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 0  # 0 = no per-address cap
DEFAULT_TICKET_TTL_S = 60
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
DEFAULT_DOWN_AFTER_S = 10.0
