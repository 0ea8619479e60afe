"""Per-connection rate limiting as a pure token bucket (pass ``now``).

A connection may send ``rate`` messages per second with bursts of ``burst``.
A refused message gets a ``rate_limited`` error frame. Refusals also fill a
"strikes" bucket that drains at ``rate`` per second: a client that only
slightly overshoots stays connected (its strikes drain as fast as they
come), while one that keeps hammering reaches ``3 x burst`` strikes and is
closed with 4008 (with the defaults: 120 refusals net of draining, i.e.
about 2 s of sending at 5x the rate).

The bucket also keeps the connection's order hold: a send marked ``ordered``
that is refused for now (``rate_limited``, or ``unavailable`` while the
message store cannot take it) is :attr:`TokenBucket.held`, and every later
``ordered`` send of the connection is refused with the same code until that
one is sent again and accepted. A client that writes its refused sends again
in order (as both roomshard clients do) therefore has its messages sequenced
in the order it wrote them, however its writes and the refusals cross.
"""

from __future__ import annotations

from enum import Enum

STRIKE_FACTOR = 3


class Verdict(Enum):
    OK = "ok"
    REFUSE = "refuse"  # error frame rate_limited
    CLOSE = "close"  # close 4008


class TokenBucket:
    __slots__ = ("burst", "held", "last", "rate", "strikes", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.strikes = 0.0
        self.last = now
        #: ``(id, error code)`` of the ordered send refused for now that later ordered
        #: sends wait behind; None: no hold.
        self.held: tuple[str, str] | None = None

    def take(self, now: float) -> Verdict:
        """Account one message at ``now``."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return Verdict.OK
        return self._strike()

    def strike(self, now: float) -> Verdict:
        """Account a refusal that takes no token (an ordered send behind a held one)."""
        self._refill(now)
        return self._strike()

    def hold(self, msg_id: str, code: str) -> None:
        """The ordered send ``msg_id`` was refused with ``code``: later ordered sends wait
        behind it (behind the first such send, while one is held already)."""
        if self.held is None:
            self.held = (msg_id, code)

    def release(self, msg_id: str) -> None:
        """``msg_id`` was accepted: if it was held, the sends behind it may go."""
        if self.held is not None and self.held[0] == msg_id:
            self.held = None

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.last)
        self.last = now
        refill = elapsed * self.rate
        self.tokens = min(self.burst, self.tokens + refill)
        self.strikes = max(0.0, self.strikes - refill)

    def _strike(self) -> Verdict:
        self.strikes += 1.0
        if self.strikes >= STRIKE_FACTOR * self.burst:
            return Verdict.CLOSE
        return Verdict.REFUSE


class WireBudget:
    """Everything one connection sends: a token bucket of frames and one of bytes.

    Unlike :class:`TokenBucket` (complete messages, refused one by one) this
    counts every frame (data, continuation, ping, pong, close) and every byte
    read from the socket. A client cannot be told "too many pings", so
    overdrawing either bucket is abuse and closes the connection with 4008;
    the defaults (``roomshard.wire.protocol``) are far above any well-behaved
    client, which the message rate limit keeps to 20/s anyway.
    """

    __slots__ = ("byte_burst", "byte_rate", "bytes", "frame_burst", "frame_rate", "frames",
                 "last")

    def __init__(self, frame_rate: float, frame_burst: int, byte_rate: float, byte_burst: int,
                 now: float) -> None:
        self.frame_rate, self.frame_burst = frame_rate, float(frame_burst)
        self.byte_rate, self.byte_burst = byte_rate, float(byte_burst)
        self.frames, self.bytes = self.frame_burst, self.byte_burst
        self.last = now

    def take(self, frames: int, nbytes: int, now: float) -> bool:
        """Account ``frames`` and ``nbytes`` at ``now``; False once either bucket is overdrawn."""
        elapsed = now - self.last
        if elapsed > 0:
            self.last = now
            self.frames = min(self.frame_burst, self.frames + elapsed * self.frame_rate)
            self.bytes = min(self.byte_burst, self.bytes + elapsed * self.byte_rate)
        self.frames -= frames
        self.bytes -= nbytes
        return self.frames >= 0.0 and self.bytes >= 0.0
