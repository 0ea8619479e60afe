"""The bodies of the calls between a shard and the directory (docs/INTERNALS.md).

One msgspec Struct per body, encoded by the side that sends it and decoded
by the side that reads it. They ignore unknown fields, so that shards and
directories can be upgraded one at a time; a missing or mistyped field is a
decoding error on the reading side.
"""

from __future__ import annotations

import msgspec


class Body(msgspec.Struct, kw_only=True):
    """Base of the internal bodies (unknown fields are ignored when decoding)."""


# -- shard -> directory ----------------------------------------------------------
class OpenBody(Body, omit_defaults=True):
    """``POST /v1/internal/rooms/{room}/open``: the shard asks to hold ``room`` in memory.

    ``open_id`` is left out when None (directories before it ignore it anyway)."""

    instance: str
    ticket_epoch: int  # the epoch of the ticket that brought the first member
    # Same id on a retry of an open whose answer was lost: the same grant, no new epoch.
    open_id: str | None = None


class OpenGrant(Body):
    """The directory's answer to ``open``: who owns the room and where its seq starts."""

    room: str
    instance: str
    epoch: int
    owner_epoch: int
    seq_base: int
    lost: bool  # the room's state was lost: seq restarts at seq_base (epoch << 32)
    private: bool = False
    members: list[str] | None = None  # a private room's members


class LeaveBody(Body):
    """``POST /v1/internal/instances/{id}/leave``: the shard stops (``drain``: move rooms first)."""

    drain: bool = False
