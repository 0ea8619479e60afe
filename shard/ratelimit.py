"""Per-connection rate limiting as a pure token bucket (pass ``now``).

A connection may send ``rate`` messages per second with bursts of ``burst``.
A refused message gets a ``rate_limited`` error frame. Refusals also fill a
"strikes" bucket that drains at ``rate`` per second: a client that only
slightly overshoots stays connected (its strikes drain as fast as they
come), while one that keeps hammering reaches ``3 x burst`` strikes and is
closed with 4008 (with the defaults: 120 refusals net of draining, i.e.
about 2 s of sending at 5x the rate).
"""

from __future__ import annotations

from enum import Enum

STRIKE_FACTOR = 3


class Verdict(Enum):
    OK = "ok"
    REFUSE = "refuse"  # error frame rate_limited
    CLOSE = "close"  # close 4008


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "strikes", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.strikes = 0.0
        self.last = now

    def take(self, now: float) -> Verdict:
        """Account one message at ``now``."""
        elapsed = max(0.0, now - self.last)
        self.last = now
        refill = elapsed * self.rate
        self.tokens = min(self.burst, self.tokens + refill)
        self.strikes = max(0.0, self.strikes - refill)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return Verdict.OK
        self.strikes += 1.0
        if self.strikes >= STRIKE_FACTOR * self.burst:
            return Verdict.CLOSE
        return Verdict.REFUSE
