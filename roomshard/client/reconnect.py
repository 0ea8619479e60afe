"""What a client does when its connection ends: the contract's close-code table as data.

Theory of operation: every reconnect asks the directory again (a ticket is
accepted once, so an old URL is never reused) and resumes with ``since`` =
the last seq seen. Close codes only change *how soon* and what the user is
shown: a stale route (4001/4003/4004) or a clean shard stop (1001) is
retried at once, a move (4010) too but shows "moving", a shard that is not
ready (1013) gets a short wait, a policy close (4008) or a lost connection
gets the exponential backoff, and a frame-too-big close (1009) is the
client's own bug, so it stops. Every wait has jitter, so that the thousands
of clients of one shard that stopped, or that a directory shed with the same
``Retry-After``, spread out instead of coming back in one wave.

Pure: no sockets, no clock, no randomness. The session feeds the close code
in and acts on the returned :class:`Decision`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from roomshard.wire.protocol import CloseCode

#: Close code the client sends when the user closes the session.
NORMAL_CLOSURE = 1000
#: websockets reports a connection that ended without a close frame as 1006.
ABNORMAL_CLOSURE = 1006


class Action(Enum):
    RETRY = "retry"  # ask the directory again, after the decision's delay floor
    STOP = "stop"  # do not reconnect; the session ends with an error


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: Seconds to wait at least before asking the directory again.
    min_delay: float
    #: Whether consecutive failures grow the wait (backoff) or not.
    backoff: bool
    #: Show the room as "moving" (4010) rather than "connecting" meanwhile.
    moving: bool
    reason: str


# Seconds; 1013 means "not ready yet / mid-move": a move pauses a room for
# well under a second, so a short floor avoids hammering the directory.
TRY_AGAIN_FLOOR_S = 0.1
# 4008 means we were too fast: wait at least a second before coming back.
POLICY_FLOOR_S = 1.0

_TABLE: dict[int, Decision] = {
    CloseCode.TICKET_INVALID: Decision(Action.RETRY, 0.0, True, False, "ticket refused"),
    CloseCode.TICKET_MISMATCH: Decision(Action.RETRY, 0.0, True, False, "ticket for another room or instance"),
    CloseCode.NOT_OWNER: Decision(Action.RETRY, 0.0, True, False, "stale route"),
    CloseCode.ROOM_MOVED: Decision(Action.RETRY, 0.0, True, True, "room moved"),
    CloseCode.GOING_AWAY: Decision(Action.RETRY, 0.0, True, False, "shard shutting down"),
    CloseCode.SLOW_CONSUMER: Decision(Action.RETRY, 0.0, True, False, "slow consumer"),
    CloseCode.TRY_AGAIN_LATER: Decision(Action.RETRY, TRY_AGAIN_FLOOR_S, True, False, "shard not ready or room mid-move"),
    CloseCode.POLICY: Decision(Action.RETRY, POLICY_FLOOR_S, True, False, "rate limit or policy violation"),
    CloseCode.MESSAGE_TOO_BIG: Decision(Action.STOP, 0.0, False, False, "frame too big"),
}

_LOST = Decision(Action.RETRY, 0.0, True, False, "connection lost")


def decide(code: int | None) -> Decision:
    """The decision for a connection that ended with close ``code``.

    ``None`` means no WebSocket was established (refused, DNS, HTTP error
    from a proxy); it is treated like a lost connection. Codes the contract
    does not list (1006, 1011, 1000 from the server...) are retried with
    backoff: a chat client should come back whenever it can.
    """
    if code is None:
        return _LOST
    return _TABLE.get(code, Decision(Action.RETRY, 0.0, True, False, f"closed with {code}"))


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter, bounded by ``cap``.

    ``delay(attempt, rand)``: attempt 0 is the first retry after a working
    connection; ``rand`` in [0, 1) comes from the caller so the schedule is
    deterministic in tests. Full jitter (AWS architecture blog, "Exponential
    Backoff and Jitter") spreads a crowd of clients that lost the same shard
    instead of sending them back in one wave.
    """

    base: float = 0.1
    factor: float = 2.0
    cap: float = 5.0
    #: The first retry of a retryable close comes within ``base`` (after the decision's
    #: floor): a whole shard's clients that lose it together come back spread over
    #: ``base`` instead of in one instant; the exponential schedule starts after.
    immediate_first: bool = True

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * self.factor ** max(0, attempt - 1)) if attempt > 0 else self.base

    def delay(self, attempt: int, rand: float, decision: Decision) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based) after ``decision``."""
        if not decision.backoff:
            return decision.min_delay
        if attempt == 0 and self.immediate_first:
            return decision.min_delay + rand * self.base
        return min(self.cap, max(decision.min_delay, rand * self.ceiling(attempt)))


def after_retry_after(retry_after: float, rand: float) -> float:
    """The wait a ``Retry-After`` of ``retry_after`` seconds asks for, with jitter: uniform
    in [retry_after, 2 x retry_after), so that the clients a directory shed together do not
    all come back in the same instant."""
    return retry_after * (1.0 + rand)
