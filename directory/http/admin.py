"""Operator routes under ``/v1/admin`` (``Authorization: Bearer <admin token>``, checked by
the edge before a handler runs: every route here is ``auth="admin"``).

Live load comes from the owning shard with a short timeout; when the shard
cannot be asked the load is ``null`` (never a 500). Moves, drains of live
instances and rebalancing are the directory's operations: ``Directory.mover``
(``directory.ops.mover``), ``directory.ops.drain``, ``directory.ops.rebalance``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from directory.context import Directory
from directory.domain import instances, placement, schemas
from directory.domain.errors import BadRequest, Conflict, NotFound
from directory.domain.moves import DRAIN_PARALLELISM
from directory.http.edge import (
    ApiRoute,
    decode,
    instance_param,
    json_response,
    read_body,
    room_param,
)
from directory.http.views import instance_view, room_view
from directory.ops import drain as drains
from directory.ops import rebalance as rebalancing
from roomshard.wire.protocol import (
    valid_user_id,
)

MAX_DRAIN_PARALLELISM = 256

MAX_MEMBERS = 10_000
DEFAULT_ROOM_LIST_LIMIT = 1000
MAX_ROOM_LIST_LIMIT = 100_000
_DIGITS_RE = re.compile(r"[0-9]{1,9}")


def _state(ctx: Directory, row: Any, now: float) -> str:
    return instances.state_of(row, now=now, down_after=ctx.cfg.down_after)


# -- instances ---------------------------------------------------------------
def _view(ctx: Directory, row: Any, now: float) -> dict[str, Any]:
    return instance_view(row, now=now, down_after=ctx.cfg.down_after, public_url=ctx.cfg.public_url)


async def list_instances(request: Request, ctx: Directory) -> Response:
    now = ctx.clock()
    rows = await ctx.store.list_instances()
    return json_response({"instances": [_view(ctx, r, now) for r in rows]})


async def put_instance(request: Request, ctx: Directory) -> Response:
    instance = instance_param(request.path_params["instance"])
    body = decode(await read_body(request), schemas.InstancePut)
    now = ctx.clock()

    def decide(row: Any) -> dict[str, Any]:
        return instances.admin_put_changes(row, body, instance=instance, now=now,
                                          default_capacity=ctx.cfg.default_capacity)

    row = await ctx.store.upsert_instance(instance, decide)
    return json_response(_view(ctx, row, now))


async def get_instance(request: Request, ctx: Directory) -> Response:
    instance = instance_param(request.path_params["instance"])
    row = await ctx.store.get_instance(instance)
    if row is None:
        raise NotFound("instance_not_found", f"no instance {instance}")
    return json_response(_view(ctx, row, ctx.clock()))


async def delete_instance(request: Request, ctx: Directory) -> Response:
    instance = instance_param(request.path_params["instance"])
    outcome = await ctx.store.delete_instance(instance, now=ctx.clock())
    if outcome == "missing":
        raise NotFound("instance_not_found", f"no instance {instance}")
    if outcome == "has_rooms":
        raise Conflict("instance_has_rooms", f"{instance} still has rooms assigned; drain it first")
    return json_response({"id": instance, "deleted": True})


async def drain(request: Request, ctx: Directory) -> Response:
    instance = instance_param(request.path_params["instance"])
    body = decode(await read_body(request), schemas.DrainBody, empty_ok=True)
    if body.parallelism is not None and not 1 <= body.parallelism <= MAX_DRAIN_PARALLELISM:
        raise BadRequest("invalid_parallelism",
                         f"parallelism must be 1..{MAX_DRAIN_PARALLELISM}")
    row = await ctx.store.get_instance(instance)
    if row is None:
        raise NotFound("instance_not_found", f"no instance {instance}")
    now = ctx.clock()
    if _state(ctx, row, now) != placement.DOWN:
        return json_response(await drains.drain_instance(
            ctx.mover, instance=instance, reason=instances.REASON_ADMIN,
            parallelism=body.parallelism or DRAIN_PARALLELISM))
    # A down instance has nothing to hand over: re-place its rooms now (their
    # next welcome says recovered: false) and park it disabled.
    await ctx.store.upsert_instance(instance, lambda _row: {
        "state": placement.DISABLED, "state_reason": instances.REASON_ADMIN})
    replaced = await ctx.store.replace_all(instance, now=now, down_after=ctx.cfg.down_after)
    return json_response({"instance": instance, "state": placement.DISABLED, "moves": [],
                          "replaced": replaced})


# -- rooms -------------------------------------------------------------------
async def _loads(ctx: Directory, rows: list[Any]) -> dict[str, dict[str, Any] | None]:
    """Live load per room, one shard call per owning instance, concurrently."""
    owners = {r["instance"] for r in rows if r["instance"] is not None}
    urls: dict[str, str] = {}
    for inst in owners:
        irow = await ctx.store.get_instance(inst)
        if irow is not None:
            urls[inst] = irow["internal_url"]
    names = sorted(urls)
    results = await asyncio.gather(*(ctx.shards.rooms_load(n, urls[n]) for n in names))
    by_instance = dict(zip(names, results))
    out: dict[str, dict[str, Any] | None] = {}
    for r in rows:
        loads = by_instance.get(r["instance"])
        if loads is None:
            out[r["room"]] = None
        else:
            out[r["room"]] = loads.get(r["room"], {"loaded": False, "connections": 0,
                                                   "members": 0, "seq": None,
                                                   "messages_per_s": 0.0})
    return out


async def list_rooms(request: Request, ctx: Directory) -> Response:
    instance = request.query_params.get("instance")
    if instance is not None:
        instance_param(instance)
        if await ctx.store.get_instance(instance) is None:
            raise NotFound("instance_not_found", f"no instance {instance}")
    raw_limit = request.query_params.get("limit", str(DEFAULT_ROOM_LIST_LIMIT))
    # ASCII digits only: "²".isdigit() is true and int("²") raises.
    if not _DIGITS_RE.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_ROOM_LIST_LIMIT:
        raise BadRequest("invalid_limit", f"limit must be 1..{MAX_ROOM_LIST_LIMIT}")
    rows = list(await ctx.store.list_rooms(instance, int(raw_limit)))
    loads = await _loads(ctx, rows)
    return json_response({"rooms": [room_view(r, loads[r["room"]]) for r in rows]})


async def get_room(request: Request, ctx: Directory) -> Response:
    room = room_param(request.path_params["room"])
    row = await ctx.store.get_room(room)
    if row is None:
        raise NotFound("room_not_found", f"no room {room}")
    load = None
    if row["instance"] is not None:
        irow = await ctx.store.get_instance(row["instance"])
        if irow is not None:
            load = await ctx.shards.room_load(row["instance"], irow["internal_url"], room)
    return json_response(room_view(row, load))


async def put_access(request: Request, ctx: Directory) -> Response:
    room = room_param(request.path_params["room"])
    body = decode(await read_body(request), schemas.AccessPut)
    if len(body.members) > MAX_MEMBERS:
        raise BadRequest("too_many_members", f"at most {MAX_MEMBERS} members")
    for m in body.members:
        if not valid_user_id(m):
            raise BadRequest("invalid_member", f"member {m!r} is not a valid user id")
    members = list(dict.fromkeys(body.members))  # dedupe, keep order
    row = await ctx.store.set_access(room, body.private, members, now=ctx.clock())
    closed = None
    if body.private and row["instance"] is not None:
        # Someone may have lost access: the owner closes them with 4003.
        irow = await ctx.store.get_instance(row["instance"])
        if irow is not None:
            closed = await ctx.shards.push_access(row["instance"], irow["internal_url"], room, True,
                                                    members)
    return json_response({"room": room, "private": body.private, "members": members,
                          "instance": row["instance"], "closed": closed})


async def move(request: Request, ctx: Directory) -> Response:
    room = room_param(request.path_params["room"])
    body = decode(await read_body(request), schemas.MoveBody)
    to = instance_param(body.to)
    row = await ctx.store.get_room(room)
    if row is None or row["instance"] is None:
        raise NotFound("room_not_found", f"no placed room {room}")
    target = await ctx.store.get_instance(to)
    if target is None:
        raise NotFound("instance_not_found", f"no instance {to}")
    if row["instance"] == to:
        raise Conflict("already_there", f"room {room} is already on {to}")
    if _state(ctx, target, ctx.clock()) != placement.ACTIVE:
        raise Conflict("instance_not_active", f"{to} is not active")
    if row["state"] == "moving":
        raise Conflict("already_moving", f"room {room} is already moving")
    return json_response(await ctx.mover.move_room(room=room, source=row["instance"], to=to))


async def rebalance(request: Request, ctx: Directory) -> Response:
    body = decode(await read_body(request), schemas.RebalanceBody, empty_ok=True)
    if body.max_moves < 0:
        raise BadRequest("invalid_max_moves", "max_moves must be >= 0")
    return json_response(await rebalancing.rebalance(ctx.mover, dry_run=body.dry_run,
                                                          max_moves=body.max_moves))


_I = "/v1/admin/instances/{instance:path}"
_R = "/v1/admin/rooms/{room:path}"
ROUTES = [
    ApiRoute("GET", "/v1/admin/instances", "list_instances", list_instances,
             "Registered instances with state and load", "operators", auth="admin",
             response=schemas.InstanceList, errors=(401,)),
    ApiRoute("POST", _I + "/drain", "drain_instance", drain,
             "Live-move every room off the instance, then mark it disabled", "operators",
             auth="admin", body=schemas.DrainBody, response=schemas.DrainReport, errors=(400, 401, 404, 409)),
    ApiRoute("PUT", _I, "put_instance", put_instance, "Register or update an instance",
             "operators", auth="admin", body=schemas.InstancePut, response=schemas.InstanceView,
             errors=(400, 401)),
    ApiRoute("GET", _I, "get_instance", get_instance, "One instance", "operators",
             auth="admin", response=schemas.InstanceView, errors=(400, 401, 404)),
    ApiRoute("DELETE", _I, "delete_instance", delete_instance,
             "Remove an instance from the registry (409 while rooms are assigned)", "operators",
             auth="admin", response=schemas.InstanceDeleted, errors=(400, 401, 404, 409)),
    ApiRoute("GET", "/v1/admin/rooms", "list_rooms", list_rooms,
             "Room assignments with live load", "operators", auth="admin",
             response=schemas.RoomList, errors=(400, 401, 404),
             query=(("instance", "string", "only rooms on this instance (iN)"),
                    ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_ROOM_LIST_LIMIT,
                               "default": DEFAULT_ROOM_LIST_LIMIT}, "at most this many rooms"))),
    ApiRoute("PUT", _R + "/access", "put_room_access", put_access,
             "Make a room private to its members, or public again", "operators", auth="admin",
             body=schemas.AccessPut, response=schemas.AccessView, errors=(400, 401)),
    ApiRoute("POST", _R + "/move", "move_room", move, "Live handoff of a room to another instance",
             "operators", auth="admin", body=schemas.MoveBody, response=schemas.MoveReport,
             errors=(400, 401, 404, 409)),
    ApiRoute("GET", _R, "get_room", get_room, "One room's assignment and live load",
             "operators", auth="admin", response=schemas.RoomView, errors=(400, 401, 404)),
    ApiRoute("POST", "/v1/admin/rebalance", "rebalance", rebalance,
             "Plan (and unless dry_run, perform) the fewest moves that even out load",
             "operators", auth="admin", body=schemas.RebalanceBody,
             response=schemas.RebalanceReport, errors=(400, 401)),
]
