"""The bodies of the calls between a shard and the directory (docs/INTERNALS.md).

One msgspec Struct per body, encoded by the side that sends it and decoded
by the side that reads it. They ignore unknown fields, so that shards and
directories can be upgraded one at a time; a missing or mistyped field is a
decoding error on the reading side.
"""

from __future__ import annotations

from typing import Any

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


# -- directory -> shard: the live handoff (docs/HANDOFF.md) ------------------------
class HandoffCall(Body, forbid_unknown_fields=True, omit_defaults=True):
    """One handoff call: ``POST /internal/rooms/{room}/<kind>`` with the room in the path,
    or an item of ``POST /internal/handoffs/<kind>`` with ``room`` set.

    A shard refuses fields it does not know (400): a call it misread could
    move a room wrongly.
    """

    move_id: str
    room: str | None = None  # in a batch item only


class Freeze(HandoffCall, kw_only=True):
    epoch: int  # the epoch the move reserved


class Adopt(HandoffCall, kw_only=True):
    epoch: int
    snapshot: dict[str, Any]  # Room.snapshot() of the source


class Commit(HandoffCall):
    pass


class Release(HandoffCall, kw_only=True):
    to: str  # the instance the room moved to
    epoch: int


class Abort(HandoffCall, kw_only=True):
    epoch: int  # the burnt epoch the room serves on at


class Discard(HandoffCall):
    pass


#: The calls by the name in their route.
HANDOFF_CALLS: dict[str, type[HandoffCall]] = {
    "freeze": Freeze, "adopt": Adopt, "commit": Commit, "release": Release, "abort": Abort,
    "discard": Discard,
}


class HandoffBatch(Body):
    """``POST /internal/handoffs/<kind>``: many calls of one kind (items decoded one by one)."""

    items: list[Any]
