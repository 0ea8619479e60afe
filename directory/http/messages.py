"""A room's messages over HTTP: the history API and the server API's publish.

``GET /v1/rooms/{room}/messages`` pages back through a room's history: from
the message store when the directory has one (``ROOMSHARD_HISTORY_URL``),
else from what the room's owner holds in memory. Readers are identified as
for ``connect`` (open mode: the ``user`` query parameter; jwt mode: the
bearer JWT); the admin token reads any room.

``POST /v1/rooms/{room}/messages`` hands a message from an application
backend to the room's owner (placing the room if it has none), which
sequences it like a member's send (and stores it, with a store) before the
answer. A room mid-move, a shard that just died, a stale placement: the
directory asks again (at the new owner) until ``PUBLISH_DEADLINE_S``, then
answers 503 with ``Retry-After``; the same ``(user, id)`` sent again is
the same message.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from directory.context import Directory
from directory.db.store import Target
from directory.domain.auth import is_admin
from directory.domain.errors import ApiError, BadRequest, Forbidden, NotFound, Unavailable
from directory.domain.schemas import PublishBody
from directory.http.edge import ApiRoute, decode, json_response, read_body, room_param
from roomshard.store.messages import StoredMessage
from roomshard.wire.internal import HistoryMessage, HistoryPage, PublishCall, Published
from roomshard.wire.protocol import (
    HISTORY_PAGE,
    INVALID_USER_ID,
    MAX_CLIENT_MESSAGE_ID,
    MAX_HISTORY_PAGE,
    bounded_int,
    valid_message_id,
    valid_user_id,
)

#: The contract: a publish that cannot be delivered within this long is a 503.
PUBLISH_DEADLINE_S = 5.0
#: Between two tries of a publish (a move's pause is tens of milliseconds).
PUBLISH_RETRY_S = (0.02, 0.05, 0.1, 0.2)


def _int_param(request: Request, name: str, low: int, high: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    value = bounded_int(raw, low, high)
    if value is None:
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise BadRequest("invalid_parameter", f"{name} must be an integer, {bound}")
    return value


async def history(request: Request, ctx: Directory) -> Response:
    """The latest ``limit`` messages with seq < ``before``, oldest first, and ``more``."""
    room = request.path_params["room"]
    authorization = request.headers.get("authorization")
    admin = is_admin(authorization, ctx.admin_token)
    reader: str | None = None
    if not admin and ctx.client_auth.mode == "jwt":
        reader = ctx.client_auth.jwt_subject(authorization, now=ctx.clock())
    room_param(room)
    if not admin and ctx.client_auth.mode != "jwt":
        reader = request.query_params.get("user")
        if reader is not None and not valid_user_id(reader):
            raise BadRequest("invalid_user", INVALID_USER_ID)
    before = _int_param(request, "before", 1, None)
    limit = _int_param(request, "limit", 1, MAX_HISTORY_PAGE) or HISTORY_PAGE
    row = await ctx.store.room_target(room)
    if row is None:
        raise NotFound("room_not_found", f"room {room} was never created")
    if row["private"] and not admin and (reader is None or reader not in (row["members"] or ())):
        raise Forbidden("not_a_member", f"room {room} is private"
                        + ("" if reader is not None else ": name the reader (user=...)"))
    if ctx.messages is not None:
        stored = await ctx.messages.before(room, before, limit + 1,
                                           newer_than=ctx.clock() - ctx.cfg.history_retention)
        more = len(stored) > limit
        page = HistoryPage(room=room, messages=[_view(m) for m in stored[-limit:]], more=more)
    else:
        page = await _from_owner(ctx, row, room, before, limit)
    return json_response(page)


def _view(message: StoredMessage) -> HistoryMessage:
    return msgspec.json.decode(message.payload, type=HistoryMessage)


async def _from_owner(ctx: Directory, row: Any, room: str, before: int | None,
                      limit: int) -> HistoryPage:
    """Without a store: what the room's owner holds in memory (nothing, for a room no shard
    holds: its messages went with it)."""
    if row["instance"] is None or row["internal_url"] is None:
        return HistoryPage(room=room, messages=[], more=False)
    page = await ctx.shards.history(row["instance"], row["internal_url"], room, before, limit)
    if page is None:
        raise Unavailable("shard_unavailable", f"the shard holding room {room} did not answer",
                          retry_after=1)
    return page


async def publish(request: Request, ctx: Directory) -> Response:
    """Deliver one message to the room's owner; 200 once it has its seq (and is stored)."""
    room = room_param(request.path_params["room"])
    body = decode(await read_body(request), PublishBody)
    if not valid_message_id(body.id):
        raise BadRequest("invalid_id", f"id must be 1..{MAX_CLIENT_MESSAGE_ID} characters")
    if not valid_user_id(body.user):
        raise BadRequest("invalid_user", INVALID_USER_ID)
    call = PublishCall(epoch=0, id=body.id, user=body.user, text=body.text)
    deadline = time.monotonic() + PUBLISH_DEADLINE_S
    pauses = itertools.chain(PUBLISH_RETRY_S, itertools.repeat(PUBLISH_RETRY_S[-1]))
    while True:
        outcome = await _deliver(ctx, room, call, deadline)
        if isinstance(outcome, Published):
            ctx.metrics.published.inc()
            return json_response(outcome)
        pause = next(pauses)
        if time.monotonic() + pause >= deadline:
            raise Unavailable("unavailable", f"could not deliver the message within "
                              f"{PUBLISH_DEADLINE_S:g} s ({outcome}); send it again with the "
                              "same id", retry_after=1)
        await asyncio.sleep(pause)


async def _deliver(ctx: Directory, room: str, call: PublishCall,
                   deadline: float) -> Published | str:
    """One try: the answer of the room's owner, or why there was none (to try again).
    Raises BadRequest when the owner refuses the message itself (too long, ...)."""
    try:
        target = await _placed(ctx, room)
    except ApiError as exc:  # no shard to place it on (yet)
        return exc.message
    status, answer = await ctx.shards.publish(
        target.instance, target.internal_url, room,
        msgspec.structs.replace(call, epoch=target.epoch),
        timeout=max(0.1, deadline - time.monotonic()))
    if status == 400 and isinstance(answer, dict):
        raise BadRequest(str(answer.get("code", "bad_request")),
                         str(answer.get("message", "refused by the shard")))
    if status == 200:
        try:
            return msgspec.convert(answer, Published)
        except msgspec.ValidationError as exc:
            return f"{target.instance} answered nonsense: {exc}"
    reason = answer.get("message") if isinstance(answer, dict) else answer
    return f"{target.instance}: {reason}"


async def _placed(ctx: Directory, room: str) -> Target:
    now = ctx.clock()
    row = await ctx.store.room_target(room)
    target, kind = await ctx.store.place(room, row, now=now, down_after=ctx.cfg.down_after,
                                         keep_after=ctx.replace_after(now))
    if kind != "existing":
        ctx.metrics.placements.labels(kind).inc()
    return target


_HISTORY_QUERY: tuple[tuple[str, str | dict[str, Any], str], ...] = (
    ("before", {"type": "integer", "minimum": 1}, "only messages with a lower seq"),
    ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY_PAGE,
               "default": HISTORY_PAGE},
     "how many messages (the latest of them)"),
    ("user", "string", "open auth mode: the reader (required for private rooms)"),
)

ROUTES = [
    ApiRoute("GET", "/v1/rooms/{room:path}/messages", "history", history,
             "A room's messages, latest first by page (with a store: every stored one; "
             "without: what its shard holds in memory)", "clients", auth="client",
             response=HistoryPage, query=_HISTORY_QUERY, errors=(400, 401, 403, 404, 503)),
    ApiRoute("POST", "/v1/rooms/{room:path}/messages", "publish", publish,
             "Send a message into a room from an application backend, as a user; idempotent "
             "by (user, id); answered once it has its seq (and is stored)", "server",
             auth="server", body=PublishBody, response=Published, errors=(400, 401, 503)),
]
