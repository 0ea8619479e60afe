"""The shard's plain HTTP routes: health, readiness, metrics, internal control.

Internal routes (docs/INTERNALS.md) need a cluster token made for this
instance (its ``aud`` names it) whose ``sub`` is ``"directory"``: 401 without a
valid one (a token made for another instance, or of a version that named no
receiver, is not valid here), 403 for another subject. Checks run in the
contract's order: credentials, input, then the room.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from roomshard.wire.internal import AccessBody, AccessResult, LiveRoomAnswer, LiveRoomsAnswer
from roomshard.wire.probe import PROBE_SUFFIX
from roomshard.wire.protocol import INVALID_ROOM_ID, CloseCode, valid_room_id, valid_user_id
from roomshard.wire.tickets import DIRECTORY, Signer, TicketError
from shard.http import HttpError, HttpRequest, HttpResponse, Router, error_response, json_response
from shard.live_rooms import LiveRooms
from shard.metrics import CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class DirectoryAuth:
    """Checks that a caller holds the directory's cluster token for this instance."""

    signer: Signer
    instance: str
    clock: Callable[[], float]

    def require(self, req: HttpRequest) -> None:
        """Raise 401/403 unless the caller holds the directory's cluster token for this instance."""
        token = req.bearer()
        if token is None:
            raise HttpError(401, "unauthorized", "missing cluster token")
        try:
            subject = self.signer.verify_cluster_token(token, receiver=self.instance,
                                                       now=self.clock())
        except TicketError as exc:
            raise HttpError(401, "unauthorized", f"invalid cluster token: {exc}") from None
        if subject != DIRECTORY:
            raise HttpError(403, "forbidden", "only the directory may call this route")

    def trusted(self, token: str) -> bool:
        """True for a valid cluster token made for this instance (any subject)."""
        try:
            self.signer.verify_cluster_token(token, receiver=self.instance, now=self.clock())
        except TicketError:
            return False
        return True


def install(router: Router, *, instance: str, boot_id: str, auth: DirectoryAuth,
            not_ready: Callable[[], str | None], render_metrics: Callable[[], bytes],
            live_rooms: LiveRooms,
            store_state: Callable[[], dict[str, object] | None] = lambda: None) -> None:
    """Register the shard's own routes.

    ``not_ready`` says why the shard is not ready (None: it is); ``store_state`` how its
    message store fares (None: it has none), reported by ``/readyz``. A store that fails
    does not make the shard unready: it still serves its rooms (resumes, presence, what
    was stored), and every shard shares that store, so taking them all out of a load
    balancer would cut every room; sends are refused with ``unavailable`` meanwhile.
    """

    async def healthz(req: HttpRequest) -> HttpResponse:
        # boot_id: which process answers (the directory's check of a closed control channel).
        return json_response({"status": "ok", "instance": instance, "boot_id": boot_id})

    async def readyz(req: HttpRequest) -> HttpResponse:
        why = not_ready()
        if why is None:
            body: dict[str, object] = {"status": "ready", "instance": instance}
            store = store_state()
            if store is not None:
                body["store"] = store
            return json_response(body)
        return error_response(503, "not_ready", f"shard {instance} not ready: {why}",
                              [("retry-after", "1")])

    async def route_probe(req: HttpRequest) -> HttpResponse:
        # The directory's check that the load balancer routes /iN/room/ to this very process
        # (directory.ops.route_check): "~" is never in a room id, so no room is shadowed.
        return json_response({"instance": instance, "boot_id": boot_id})

    async def metrics(req: HttpRequest) -> HttpResponse:
        return HttpResponse(200, render_metrics(), CONTENT_TYPE)

    async def list_rooms(req: HttpRequest) -> HttpResponse:
        auth.require(req)
        return json_response(LiveRoomsAnswer(rooms={n: lr.load() for n, lr in live_rooms.rooms.items()}))

    async def get_room(req: HttpRequest) -> HttpResponse:
        auth.require(req)
        name = room_param(req)
        live = live_rooms.get(name)
        if live is None:
            raise HttpError(404, "room_not_loaded", f"room {name} is not in memory on this shard")
        load = live.load()
        return json_response(LiveRoomAnswer(room=name, **msgspec.structs.asdict(load)))

    async def set_access(req: HttpRequest) -> HttpResponse:
        auth.require(req)
        name = room_param(req)
        private, members = parse_access(req)
        live = live_rooms.get(name)
        if live is None:
            return json_response(AccessResult(room=name, closed=0))
        live.room.private = private
        live.room.allowed = frozenset(members) if members is not None else None
        gone = [c for c in live.members_conns() if not live.room.may_join(c.user)]
        for conn in gone:
            conn.close(CloseCode.TICKET_MISMATCH, "no longer a member of this room")
        return json_response(AccessResult(room=name, closed=len(gone)))

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)
    router.add("GET", "/metrics", metrics)
    # Any iN: a load balancer that sends iN's path to this shard learns whose it reached.
    router.add("GET", "/{probed}" + PROBE_SUFFIX, route_probe)
    router.add("GET", "/internal/rooms", list_rooms)
    router.add("GET", "/internal/rooms/{room}", get_room)
    router.add("POST", "/internal/rooms/{room}/access", set_access)


def room_param(req: HttpRequest) -> str:
    return room_id(req.params["room"])


def room_id(name: str | None) -> str:
    """``name`` when it is a room id; else HttpError 400 ``invalid_room``."""
    if name is None or not valid_room_id(name):
        raise HttpError(400, "invalid_room", INVALID_ROOM_ID)
    return name


def parse_access(req: HttpRequest) -> tuple[bool, list[str] | None]:
    """The access body (``AccessBody``) with valid user ids; raises HttpError 400."""
    body = req.decode(AccessBody)
    if body.members is not None and not all(valid_user_id(m) for m in body.members):
        raise HttpError(400, "bad_request", "members must be a list of user ids")
    return body.private, body.members
