"""Where a room goes: pure functions over plain instance data (no I/O, no clock).

Load is (assigned rooms + live connections) / capacity, the contract's
default. A new room goes to the least loaded instance that is ``active`` and
alive; ``draining``, ``disabled``, ``down`` and ``pending`` (registered, its
route through the load balancer not proven yet) instances never get a room.
Ties break on the instance number (i1 before i2), so every replica given the
same data makes the same choice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ACTIVE = "active"
DRAINING = "draining"
DISABLED = "disabled"
DOWN = "down"
PENDING = "pending"
ADMIN_STATES = (ACTIVE, DRAINING, DISABLED)


@dataclass(frozen=True, slots=True)
class Candidate:
    """What placement needs to know about one instance."""

    id: str
    number: int
    state: str  # stored state: active | draining | disabled | pending
    capacity: int
    rooms_assigned: int
    connections: int
    seen_at: float  # last heartbeat, or registration time if none yet


def is_down(seen_at: float, *, now: float, down_after: float) -> bool:
    """An instance is down once ``down_after`` seconds pass without a heartbeat."""
    return now - seen_at > down_after


def effective_state(stored: str, seen_at: float, *, now: float, down_after: float) -> str:
    """The state the API reports: ``down`` overrides a stored active/draining state.

    A ``disabled`` instance stays ``disabled`` (an admin decision or a clean
    shutdown says more than a missing heartbeat).
    """
    if stored != DISABLED and is_down(seen_at, now=now, down_after=down_after):
        return DOWN
    return stored


def serves_rooms(stored: str, seen_at: float, *, now: float, down_after: float) -> bool:
    """Whether rooms already on the instance stay there (active or draining, alive)."""
    return effective_state(stored, seen_at, now=now, down_after=down_after) in (ACTIVE, DRAINING)


def load(c: Candidate) -> float:
    return (c.rooms_assigned + c.connections) / max(c.capacity, 1)


def eligible(c: Candidate, *, now: float, down_after: float) -> bool:
    return effective_state(c.state, c.seen_at, now=now, down_after=down_after) == ACTIVE


def choose(candidates: Iterable[Candidate], *, now: float, down_after: float,
           exclude: str | None = None) -> Candidate | None:
    """The least loaded eligible instance, or None when no instance can take a room."""
    best: Candidate | None = None
    best_key: tuple[float, int] | None = None
    for c in candidates:
        if c.id == exclude or not eligible(c, now=now, down_after=down_after):
            continue
        key = (load(c), c.number)
        if best_key is None or key < best_key:
            best, best_key = c, key
    return best
