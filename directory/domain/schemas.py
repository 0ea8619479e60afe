"""Request and response bodies of the directory API, as msgspec Structs.

These types are the single source of truth: request bodies are decoded and
validated against them once at the edge (unknown fields refused with 400 on
the public API), and ``directory.http.openapi`` turns them into the OpenAPI
document's JSON Schemas. Responses are built as plain dicts on the hot path
(encoded with orjson); tests check that every response converts to its Struct.

Internal (shard -> directory) bodies ignore unknown fields so that shards and
directories can be upgraded one at a time; those the shard builds or reads
too are defined once in :mod:`roomshard.wire.internal` (the error body in
:mod:`roomshard.wire.errors`).

``internal_url`` and ``public_base`` are checked at decoding, in the admin
PUT and in a shard's heartbeat alike (``roomshard.urls``: scheme, host, port
and nothing else): a 400 ``invalid_internal_url`` / ``invalid_public_base``.
These values reach generated load balancer configuration.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType, field

from directory.domain.errors import BadRequest
from roomshard import urls
from roomshard.wire.internal import InstanceView

AdminState = Literal["active", "draining", "disabled"]


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Lenient(msgspec.Struct, kw_only=True):
    pass


# -- clients -----------------------------------------------------------------
class ConnectBody(Strict):
    """``open`` auth: ``user`` is required. ``jwt`` auth: the body may be empty and ``user`` is ignored.

    ``unreachable`` (optional): the instance the client could not reach on its
    last try (refused, no handshake, a connection that ended without a close
    frame). A hint, never proof: when it names the room's current owner the
    directory checks that shard's process at once (docs/HANDOFF.md) and
    answers after the check.
    """

    user: str | None = None
    unreachable: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class ConnectResponse(Lenient):
    room: str
    instance: str
    epoch: int
    url: str
    expires_in: int


class PublishBody(Strict):
    """``POST /v1/rooms/{room}/messages``: a message from an application backend, sent as
    ``user`` (ids as a client's ``send``: the same ``(user, id)`` is one message)."""

    id: str
    user: str
    text: str


# -- instances ---------------------------------------------------------------
def check_urls(internal_url: object, public_base: object) -> None:
    """Raise ``BadRequest`` unless both are clean URLs (``UNSET``/``None``/``""`` pass)."""
    if isinstance(internal_url, str):
        try:
            urls.check_internal_url(internal_url)
        except urls.UrlError as exc:
            raise BadRequest("invalid_internal_url", str(exc)) from None
    if isinstance(public_base, str) and public_base != "":
        try:
            urls.check_public_base(public_base)
        except urls.UrlError as exc:
            raise BadRequest("invalid_public_base", str(exc)) from None


class InstanceList(Lenient):
    instances: list[InstanceView]


class InstancePut(Strict):
    """Register (``internal_url`` required) or update an instance; absent fields are unchanged."""

    internal_url: str | UnsetType = UNSET
    public_base: str | None | UnsetType = UNSET
    capacity: int | UnsetType = UNSET
    state: str | UnsetType = UNSET  # active | draining | disabled (``down`` is refused)

    def __post_init__(self) -> None:
        check_urls(self.internal_url, self.public_base)


class InstanceDeleted(Lenient):
    id: str
    deleted: bool


# -- rooms -------------------------------------------------------------------
class RoomLoad(Lenient):
    loaded: bool
    connections: int = 0
    members: int = 0
    seq: int | None = None
    messages_per_s: float = 0.0


class RoomView(Lenient):
    room: str
    instance: str | None
    epoch: int
    owner_epoch: int
    state: str
    private: bool
    members: list[str] | None
    load: RoomLoad | None  # null when the owning shard could not be asked


class RoomList(Lenient):
    rooms: list[RoomView]


class AccessPut(Strict):
    private: bool
    members: list[str] = field(default_factory=list)


class AccessView(Lenient):
    room: str
    private: bool
    members: list[str]
    instance: str | None
    closed: int | None  # connections the shard closed with 4003; null if not asked/unreachable


class MoveBody(Strict):
    to: str


class MoveReport(Lenient):
    room: str
    from_: str = field(name="from")
    to: str
    epoch: int
    members: int
    messages_transferred: int
    pause_ms: float


class PlannedMove(Lenient):
    room: str
    from_: str = field(name="from")
    to: str


class RebalanceBody(Strict):
    dry_run: bool = True
    max_moves: int = 100


class RebalanceReport(Lenient):
    moves: list[PlannedMove]
    before: dict[str, Any]
    after: dict[str, Any]


class DrainBody(Strict):
    # Moves in flight at once: more drains faster, each room's pause grows with its batch.
    # None: the drain module's default (directory.ops.drain.DRAIN_PARALLELISM).
    parallelism: int | None = None


class DrainReport(Lenient):
    instance: str
    state: str
    moves: list[dict[str, Any]]
    replaced: int = 0  # rooms re-placed without a live move (the instance was down)
    removed: bool | None = None  # a leave with remove: whether the instance left the registry


# -- shard -> directory (internal) --------------------------------------------
# -- everyone ----------------------------------------------------------------
class Status(Lenient):
    status: str
