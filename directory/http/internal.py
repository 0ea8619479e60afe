"""Shard -> directory routes (``docs/INTERNALS.md``): ``auth="cluster"``, the edge checks
the cluster token; a shard acts only for the instance its token names."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from directory.context import Directory
from directory.domain import instances, placement, schemas
from directory.domain.auth import check_acting_for
from directory.domain.errors import BadRequest, Conflict, NotFound
from directory.http.edge import (
    ApiRoute,
    cluster_caller,
    decode,
    instance_param,
    json_response,
    read_body,
    room_param,
)
from directory.http.views import instance_view
from directory.ops import drain as drains
from roomshard.wire import internal
from roomshard.wire.protocol import valid_room_id

OPEN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_CONFIRM = 100_000  # rooms one heartbeat may ask to confirm (a shard's max)


async def heartbeat(request: Request, ctx: Directory) -> Response:
    now = ctx.clock()
    subject = cluster_caller(request)
    instance = instance_param(request.path_params["instance"])
    check_acting_for(subject, instance)
    body = decode(await read_body(request), internal.HeartbeatBody)
    schemas.check_urls(body.internal_url, body.public_base)

    def decide(row: Any) -> dict[str, Any]:
        return instances.heartbeat_changes(row, body, instance=instance, now=now,
                                          down_after=ctx.cfg.down_after,
                                          default_capacity=ctx.cfg.default_capacity)

    row = await ctx.store.upsert_instance(instance, decide)
    answer: dict[str, Any] = {"instance": instance_view(row, now=now, down_after=ctx.cfg.down_after),
                              "down_after": ctx.cfg.down_after}
    if body.confirm is not None:
        if len(body.confirm) > MAX_CONFIRM or not all(map(valid_room_id, body.confirm)):
            raise BadRequest("invalid_confirm", f"confirm: at most {MAX_CONFIRM} valid room ids")
        answer["owned"] = await ctx.store.rooms_owned(instance, body.confirm)
    return json_response(answer)


async def leave(request: Request, ctx: Directory) -> Response:
    subject = cluster_caller(request)
    instance = instance_param(request.path_params["instance"])
    check_acting_for(subject, instance)
    body = decode(await read_body(request), internal.LeaveBody, empty_ok=True)
    if await ctx.store.get_instance(instance) is None:
        raise NotFound("instance_not_found", f"no instance {instance}")
    # From this moment on no new room goes there (see instances.leave_changes).
    await ctx.store.upsert_instance(instance, lambda _row: instances.leave_changes(drain=body.drain))
    if body.drain:
        return json_response(await drains.drain_instance(ctx.mover, instance=instance,
                                                         reason=instances.REASON_SHUTDOWN))
    # No drain asked: the rooms are re-placed on their next connect (their
    # welcome says recovered: false).
    state = placement.DISABLED
    return json_response({"instance": instance, "state": state, "moves": [], "replaced": 0})


async def open_room(request: Request, ctx: Directory) -> Response:
    now = ctx.clock()
    subject = cluster_caller(request)
    room = room_param(request.path_params["room"])
    body = decode(await read_body(request), internal.OpenBody)
    instance = instance_param(body.instance)
    check_acting_for(subject, instance)
    if body.open_id is not None and not OPEN_ID_RE.fullmatch(body.open_id):
        raise BadRequest("invalid_open_id", f"open_id must match ^{OPEN_ID_RE.pattern}$")
    row = await ctx.store.open_room(room, instance, body.ticket_epoch, now=now,
                                    open_id=body.open_id)
    if row is None:
        current = await ctx.store.get_room(room)
        if (current is not None and current["instance"] == instance
                and body.ticket_epoch >= current["owner_epoch"] and current["state"] == "moving"):
            raise Conflict("moving", f"room {room} is moving")
        raise Conflict("not_owner", f"{instance} does not own room {room} at that epoch")
    return json_response(internal.OpenGrant(
        room=row["room"],
        instance=row["instance"],
        epoch=row["epoch"],
        owner_epoch=row["owner_epoch"],
        seq_base=row["seq_base"],
        lost=row["seq_base"] != 0,
        private=bool(row["private"]),
        members=list(row["members"]) if row["members"] is not None else None,
    ))


_I = "/v1/internal/instances/{instance:path}"
ROUTES = [
    ApiRoute("PUT", _I + "/heartbeat", "heartbeat", heartbeat,
             "A shard registers itself and reports its load", "internal", auth="cluster",
             body=internal.HeartbeatBody, response=internal.HeartbeatResponse,
             errors=(400, 401, 403, 409)),
    ApiRoute("POST", _I + "/leave", "leave", leave,
             "A shard stops cleanly: no new placements, optionally drain", "internal",
             auth="cluster", body=internal.LeaveBody, response=schemas.DrainReport,
             errors=(400, 401, 403, 404)),
    ApiRoute("POST", "/v1/internal/rooms/{room:path}/open", "open_room", open_room,
             "A shard asks before it creates a room in memory", "internal", auth="cluster",
             body=internal.OpenBody, response=internal.OpenGrant, errors=(400, 401, 403, 409)),
]
