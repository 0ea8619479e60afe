"""The bodies of the calls between a shard and the directory (docs/INTERNALS.md).

One msgspec Struct per body, encoded by the side that sends it and decoded
by the side that reads it. They ignore unknown fields, so that shards and
directories can be upgraded one at a time; a missing or mistyped field is a
decoding error on the reading side.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from roomshard.wire.errors import ErrorDetail


class Body(msgspec.Struct, kw_only=True):
    """Base of the internal bodies (unknown fields are ignored when decoding)."""


# A shard's numbers the directory stores or binds fit its columns (BIGINT epochs, INTEGER
# counts): out of range is the body's error (400 invalid_body), not the database's.
Epoch = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 31) - 1)]


#: An instance's state as the directory reports it (``down``: no heartbeat for
#: ``down_after``; the others are set by operators and shutdowns).
#: ``pending``: registered, not given rooms until its route through the load balancer
#: answers (the directory's ``ROOMSHARD_ROUTE_CHECK``; an extension of the contract's states).
State = Literal["active", "draining", "down", "disabled", "pending"]


#: The control channel (``GET /v1/internal/instances/{iN}/channel?boot_id=``, held open
#: by each shard for its life): the directory writes a line this often; the shard gives
#: a channel silent for three of them up and opens another.
CHANNEL_KEEPALIVE_S = 5.0


# -- shard -> directory ----------------------------------------------------------
class InstanceLoad(Body):
    """What a shard holds, reported with every heartbeat."""

    rooms: Count = 0
    connections: Count = 0
    messages_per_s: float = 0.0


class HeartbeatBody(Body):
    """``PUT /v1/internal/instances/{id}/heartbeat``: a shard registers and renews its lease.

    ``internal_url`` and ``public_base`` reach generated load balancer
    configuration: the directory checks them (``roomshard.urls``) once decoded.
    """

    internal_url: str
    boot_id: str  # new on every process start: the directory tells a restart from a renewal
    public_base: str | None = None
    capacity: int | None = None  # checked by the directory (invalid_capacity)
    load: InstanceLoad = msgspec.field(default_factory=InstanceLoad)
    # Rooms the shard kept in memory through a lost lease -> their epochs.
    confirm: dict[str, Epoch] | None = None


class InstanceView(Body):
    """An instance as the directory sees it (heartbeat answers and the admin API)."""

    id: str
    state: State
    state_reason: str | None
    capacity: int
    internal_url: str
    public_base: str | None
    last_heartbeat: str | None  # ISO 8601 UTC
    registered_at: str
    rooms_assigned: int
    load: InstanceLoad
    # Where the load balancer routes its rooms: {public_base, else ROOMSHARD_PUBLIC_URL}/iN/room/
    # (null: neither is set). Newer than the contract's fields: absent from older directories.
    route_url: str | None = None


class HeartbeatResponse(Body):
    instance: InstanceView
    down_after: float  # the directory calls an instance down after this long without one
    # Of the body's ``confirm``: the rooms still assigned to this instance at that epoch.
    owned: list[str] | None = None


class OpenBody(Body, omit_defaults=True):
    """``POST /v1/internal/rooms/{room}/open``: the shard asks to hold ``room`` in memory.

    ``open_id`` is left out when None (directories before it ignore it anyway)."""

    instance: str
    ticket_epoch: Epoch  # the epoch of the ticket that brought the first member
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


class OpenItem(Body, omit_defaults=True):
    """One room of :class:`OpenBatchBody`: what :class:`OpenBody` says for one room."""

    room: str
    ticket_epoch: Epoch
    open_id: str | None = None


class OpenBatchBody(Body):
    """``POST /v1/internal/opens``: several opens in one call, each decided as ``open``
    decides it, in one transaction (the first joins of a connect storm, the rooms of a
    dead shard coming back)."""

    instance: str
    rooms: list[OpenItem]


class OpenResult(Body, omit_defaults=True):
    """One room's answer in :class:`OpenBatch`: its grant, or the error ``open`` would
    have answered with (``not_owner``, ``moving``, ``invalid_room``, ``invalid_open_id``)."""

    room: str
    grant: OpenGrant | None = None
    error: ErrorDetail | None = None


class OpenBatch(Body):
    """The answer to :class:`OpenBatchBody`: one result per room, in the request's order."""

    results: list[OpenResult]


class LeaveBody(Body):
    """``POST /v1/internal/instances/{id}/leave``: the shard stops (``drain``: move rooms first;
    ``remove``: then take the instance out of the registry, freeing its number and route)."""

    drain: bool = False
    remove: bool = False


#: The cluster-token subject of a shard process that has no instance number yet: it may
#: only claim one (``POST /v1/internal/instances``, the heartbeat's body).
UNNUMBERED = "unnumbered"


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


class HandoffResult(Body, omit_defaults=True):
    """One item's answer in a batch: 200 and the call's answer, or the error of that item."""

    status: int
    body: dict[str, Any] | None = None
    error: ErrorDetail | None = None


class HandoffResults(Body):
    """The answer to a :class:`HandoffBatch`: one result per item, in item order."""

    results: list[HandoffResult]


# -- directory -> shard: rooms in memory, their access ------------------------------
class LiveLoad(Body):
    """A room's load as the shard holding it reports it."""

    connections: int = 0
    members: int = 0  # distinct users
    seq: int | None = None
    epoch: int | None = None
    messages_per_s: float = 0.0


class LiveRoomAnswer(LiveLoad, kw_only=True):
    """``GET /internal/rooms/{room}`` (404 ``room_not_loaded`` when not in memory)."""

    room: str


class LiveRoomsAnswer(Body):
    """``GET /internal/rooms``: every room the shard holds, by id."""

    rooms: dict[str, LiveLoad]


class AccessBody(Body, forbid_unknown_fields=True):
    """``POST /internal/rooms/{room}/access``: the room's new access list."""

    private: bool = False
    members: list[str] | None = None  # a private room's members


class AccessResult(Body):
    room: str
    closed: int  # members closed with 4003 (no longer allowed in)


# -- directory -> shard: the server API's messages ------------------------------------
class PublishCall(Body, forbid_unknown_fields=True):
    """``POST /internal/rooms/{room}/publish``: a message from the server API, sent by
    ``user`` into the room the directory placed here at ``epoch``."""

    epoch: int
    id: str
    user: str
    text: str


class Published(Body):
    """The answer to a publish, once the message has its seq (and, with a store, is stored);
    also the server API's answer (``POST /v1/rooms/{room}/messages``)."""

    room: str
    seq: int
    id: str


class HistoryMessage(Body):
    """One message of a room's history as the history API returns it."""

    seq: int
    id: str
    user: str
    text: str
    ts: float


class HistoryPage(Body):
    """``GET /internal/rooms/{room}/messages`` (what the shard holds in memory) and the
    history API (``GET /v1/rooms/{room}/messages``): the latest ``limit`` messages with
    seq < ``before``, oldest first; ``more``: older ones exist."""

    room: str
    messages: list[HistoryMessage]
    more: bool
