"""Shard -> directory routes (``docs/INTERNALS.md``): ``auth="cluster"``, the edge checks
the cluster token; a shard acts only for the instance its token names."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from directory.context import Directory
from directory.domain import instances, placement, schemas
from directory.domain.auth import check_acting_for
from directory.domain.errors import BadRequest, Conflict, Forbidden, NotFound
from directory.http.edge import (
    NO_STORE,
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
from roomshard.wire.errors import ErrorDetail
from roomshard.wire.protocol import INVALID_ROOM_ID, valid_room_id

OPEN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_CONFIRM = 100_000  # rooms one heartbeat may ask to confirm (a shard's max)
MAX_OPEN_BATCH = 1_000  # rooms one ``opens`` call may open (a shard sends at most 500)


async def heartbeat(request: Request, ctx: Directory) -> Response:
    now = ctx.clock()
    subject = cluster_caller(request)
    instance = instance_param(request.path_params["instance"])
    check_acting_for(subject, instance)
    body = decode(await read_body(request), internal.HeartbeatBody)
    schemas.check_urls(body.internal_url, body.public_base)
    changes = _heartbeat_changes(ctx, body, now)
    row = await ctx.store.upsert_instance(instance, lambda row: changes(instance, row),
                                          process=body.boot_id)
    answer = _heartbeat_answer(ctx, row, now)
    if body.confirm is not None:
        if len(body.confirm) > MAX_CONFIRM or not all(map(valid_room_id, body.confirm)):
            raise BadRequest("invalid_confirm", f"confirm: at most {MAX_CONFIRM} valid room ids")
        answer["owned"] = await ctx.store.rooms_owned(instance, body.confirm)
    return json_response(answer)


async def claim(request: Request, ctx: Directory) -> Response:
    """A shard started without an instance number gets one: the number a process of its
    at this address had (gone now), else the lowest free; answered like a heartbeat."""
    now = ctx.clock()
    subject = cluster_caller(request)
    if subject != internal.UNNUMBERED:
        raise Forbidden("wrong_instance", f"token of {subject} cannot claim an instance "
                                          f"(the subject is {internal.UNNUMBERED!r})")
    body = decode(await read_body(request), internal.HeartbeatBody)
    schemas.check_urls(body.internal_url, body.public_base)
    url = instances.check_internal_url(body.internal_url)
    row = await ctx.store.claim_instance(
        body.boot_id, lambda r: instances.reclaimable(r, internal_url=url, now=now,
                                                      down_after=ctx.cfg.down_after),
        _heartbeat_changes(ctx, body, now))
    return json_response(_heartbeat_answer(ctx, row, now))


def _heartbeat_changes(ctx: Directory, body: internal.HeartbeatBody,
                       now: float) -> Callable[[str, Any], dict[str, Any]]:
    """``(instance, row_or_None) -> column values`` of a heartbeat (or a claim) as ``body``
    says, for the store's write."""
    def changes(instance: str, row: Any) -> dict[str, Any]:
        return instances.heartbeat_changes(row, body, instance=instance, now=now,
                                          down_after=ctx.cfg.down_after,
                                          default_capacity=ctx.cfg.default_capacity,
                                          route_check=ctx.cfg.route_check)
    return changes


def _heartbeat_answer(ctx: Directory, row: Any, now: float) -> dict[str, Any]:
    """The body of a heartbeat's (or a claim's) answer: the instance as the registry has it."""
    return {"instance": instance_view(row, now=now, down_after=ctx.cfg.down_after,
                                      public_url=ctx.cfg.public_url),
            "down_after": ctx.cfg.down_after}


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
        report = await drains.drain_instance(ctx.mover, instance=instance,
                                             reason=instances.REASON_SHUTDOWN)
    else:
        # No drain asked: the rooms are re-placed on their next connect (their
        # welcome says recovered: false).
        report = {"instance": instance, "state": placement.DISABLED, "moves": [], "replaced": 0}
    if body.remove:
        # What a drain left (or no drain moved) is re-placed now: nothing may point at a
        # removed instance. The process is retired with it (its heartbeats are refused).
        now = ctx.clock()
        report["replaced"] = report.get("replaced", 0) + await ctx.store.replace_all(
            instance, now=now, down_after=ctx.cfg.down_after)
        report["removed"] = await ctx.store.delete_instance(instance, now=now) == "deleted"
    return json_response(report)


async def open_room(request: Request, ctx: Directory) -> Response:
    now = ctx.clock()
    subject = cluster_caller(request)
    room = room_param(request.path_params["room"])
    body = decode(await read_body(request), internal.OpenBody)
    instance = instance_param(body.instance)
    check_acting_for(subject, instance)
    _check_open_id(body.open_id)
    (outcome,) = await ctx.store.open_rooms(instance, [(room, body.ticket_epoch, body.open_id)],
                                            now=now)
    if isinstance(outcome, str):
        raise Conflict(outcome, _REFUSED[outcome].format(room=room, instance=instance))
    return json_response(_grant(outcome))


async def open_rooms(request: Request, ctx: Directory) -> Response:
    """Several opens in one call and one transaction; a room that may not be opened gets
    its error in its result, the others their grants (docs/INTERNALS.md)."""
    now = ctx.clock()
    subject = cluster_caller(request)
    body = decode(await read_body(request), internal.OpenBatchBody)
    instance = instance_param(body.instance)
    check_acting_for(subject, instance)
    if len(body.rooms) > MAX_OPEN_BATCH:
        raise BadRequest("too_many_rooms", f"at most {MAX_OPEN_BATCH} rooms per call")
    errors = [_input_error(item) for item in body.rooms]
    valid = [(item.room, item.ticket_epoch, item.open_id)
             for item, error in zip(body.rooms, errors) if error is None]
    outcomes = iter(await ctx.store.open_rooms(instance, valid, now=now) if valid else ())
    return json_response(internal.OpenBatch(results=[
        internal.OpenResult(room=item.room, error=error) if error is not None
        else _result(item.room, instance, next(outcomes))
        for item, error in zip(body.rooms, errors)]))


_REFUSED = {"moving": "room {room} is moving",
            "not_owner": "{instance} does not own room {room} at that epoch"}
_OPEN_ID_MESSAGE = f"open_id must match ^{OPEN_ID_RE.pattern}$"


def _check_open_id(open_id: str | None) -> None:
    if open_id is not None and not OPEN_ID_RE.fullmatch(open_id):
        raise BadRequest("invalid_open_id", _OPEN_ID_MESSAGE)


def _input_error(item: internal.OpenItem) -> ErrorDetail | None:
    """What a single open of ``item`` would answer 400 with, or None."""
    if not valid_room_id(item.room):
        return ErrorDetail(code="invalid_room", message=INVALID_ROOM_ID)
    if item.open_id is not None and not OPEN_ID_RE.fullmatch(item.open_id):
        return ErrorDetail(code="invalid_open_id", message=_OPEN_ID_MESSAGE)
    return None


def _result(room: str, instance: str, outcome: Any) -> internal.OpenResult:
    """One room's batch result from ``Store.open_rooms``' outcome (a row or a refusal)."""
    if isinstance(outcome, str):
        message = _REFUSED[outcome].format(room=room, instance=instance)
        return internal.OpenResult(room=room, error=ErrorDetail(code=outcome, message=message))
    return internal.OpenResult(room=room, grant=_grant(outcome))


def _grant(row: Any) -> internal.OpenGrant:
    return internal.OpenGrant(
        room=row["room"],
        instance=row["instance"],
        epoch=row["epoch"],
        owner_epoch=row["owner_epoch"],
        seq_base=row["seq_base"],
        lost=row["seq_base"] != 0,
        private=bool(row["private"]),
        members=list(row["members"]) if row["members"] is not None else None,
    )


async def channel(request: Request, ctx: Directory) -> Response:
    """The shard's control channel: held open for its process's life (directory.ops.failover)."""
    subject = cluster_caller(request)
    instance = instance_param(request.path_params["instance"])
    check_acting_for(subject, instance)
    boot_id = request.query_params.get("boot_id", "")
    if not 0 < len(boot_id) <= 128:
        raise BadRequest("invalid_boot_id", "boot_id: the process's boot id (1..128 characters)")
    return ChannelResponse(ctx, instance, boot_id)


class ChannelResponse(Response):
    """A body that never ends on its own: a line every ``CHANNEL_KEEPALIVE_S`` until the
    shard's side closes (then :meth:`Failover.channel_closed` checks it) or this
    directory stops (then it ends, and the shard opens one to the next)."""

    def __init__(self, ctx: Directory, instance: str, boot_id: str) -> None:
        super().__init__(b"", media_type="text/plain", headers=NO_STORE)
        del self.headers["content-length"]  # a stream: chunked
        self.ctx, self.instance, self.boot_id = ctx, instance, boot_id

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        failover = self.ctx.failover
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"open\n", "more_body": True})
        stop = asyncio.get_running_loop().create_future()
        failover.channels.add(stop)
        recv: asyncio.Future[Any] = asyncio.ensure_future(receive())
        peer_closed = False
        try:
            while True:
                done, _ = await asyncio.wait({recv, stop}, timeout=internal.CHANNEL_KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    break
                if recv in done:
                    if recv.result()["type"] == "http.disconnect":
                        peer_closed = True
                        break
                    recv = asyncio.ensure_future(receive())  # the (empty) request body
                    continue
                await send({"type": "http.response.body", "body": b"\n", "more_body": True})
        finally:
            failover.channels.discard(stop)
            recv.cancel()
        if not peer_closed:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await failover.channel_closed(self.instance, self.boot_id)


_I = "/v1/internal/instances/{instance:path}"
ROUTES = [
    ApiRoute("PUT", _I + "/heartbeat", "heartbeat", heartbeat,
             "A shard registers itself and reports its load", "internal", auth="cluster",
             body=internal.HeartbeatBody, response=internal.HeartbeatResponse,
             errors=(400, 401, 403, 409)),
    ApiRoute("GET", _I + "/channel", "channel", channel,
             "A shard's control channel, held open for its process's life: its close is "
             "checked at once (a dead process is found in milliseconds, not down_after)",
             "internal", auth="cluster", errors=(400, 401, 403), content_type="text/plain",
             query=(("boot_id", "string", "the shard process's boot id, as in its heartbeats"),)),
    ApiRoute("POST", "/v1/internal/instances", "claim_instance", claim,
             "A shard started without an instance number claims one (the heartbeat's body)",
             "internal", auth="cluster", body=internal.HeartbeatBody,
             response=internal.HeartbeatResponse, errors=(400, 401, 403, 409, 503)),
    ApiRoute("POST", _I + "/leave", "leave", leave,
             "A shard stops cleanly: no new placements, optionally drain", "internal",
             auth="cluster", body=internal.LeaveBody, response=schemas.DrainReport,
             errors=(400, 401, 403, 404)),
    ApiRoute("POST", "/v1/internal/rooms/{room:path}/open", "open_room", open_room,
             "A shard asks before it creates a room in memory", "internal", auth="cluster",
             body=internal.OpenBody, response=internal.OpenGrant, errors=(400, 401, 403, 409)),
    ApiRoute("POST", "/v1/internal/opens", "open_rooms", open_rooms,
             "A shard asks before it creates several rooms in memory (one transaction)",
             "internal", auth="cluster", body=internal.OpenBatchBody,
             response=internal.OpenBatch, errors=(400, 401, 403)),
]
