"""The room-creation budget: how many new rooms one user (or address) may create.

A ``connect`` for a room id that has no record yet creates the room; every
room costs a database row, placement, and a share of every drain and
rebalance, so creations are budgeted per user (and, optionally, per client
address for public open-mode deployments, where user ids are self-declared).
Joining an existing room is never counted.

Each key has a token bucket of ``per_minute`` tokens refilled at
``per_minute / 60`` per second: a burst of a minute's budget, then the
steady rate. The buckets live in this directory replica's memory (no
database round trip on the connect path), so with *n* replicas behind a
load balancer a user can create up to *n* times the budget; plan the setting
per replica. Memory is bounded: past :data:`MAX_KEYS` keys, the buckets that
have refilled completely (they are the same as no bucket) are forgotten.
"""

from __future__ import annotations

import math

MAX_KEYS = 100_000


class CreateBudget:
    """Token buckets of room creations per key; ``per_minute`` 0 means no budget."""

    __slots__ = ("_buckets", "per_minute", "rate")

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0  # tokens per second
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float) -> float:
        """Take one creation for ``key``: 0.0 when allowed, else the seconds until one is."""
        if self.per_minute <= 0:
            return 0.0
        tokens, at = self._buckets.get(key, (self.per_minute, now))
        tokens = min(self.per_minute, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if key not in self._buckets and len(self._buckets) >= MAX_KEYS:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def give_back(self, key: str) -> None:
        """Return a creation that did not happen (another request created the room first)."""
        entry = self._buckets.get(key)
        if entry is not None:
            self._buckets[key] = (min(self.per_minute, entry[0] + 1.0), entry[1])

    def _forget_full(self, now: float) -> None:
        full_after = self.per_minute / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}


def retry_after(seconds: float) -> int:
    """A ``Retry-After`` value in whole seconds, at least 1."""
    return max(1, math.ceil(seconds))
