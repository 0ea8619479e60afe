"""``POST /v1/rooms/{room}/connect``: the measured hot path.

Checks run in the contract's order: credentials (401), input (400), access
(403), the room-creation budget for a room that has no record yet (429,
``directory.domain.budget``), availability (503).

Overload is answered, not failed. Past ``connects_in_flight`` (1,000) the
HTTP edge answers a connect 503 ``overloaded`` before it becomes a task
(``directory.http.server.ConnectAdmission``); here (:func:`_admit`), a
connect that waited longer than ``connect_queue_wait`` (2 s) between its
first byte and its handler (the database's pool, a slow loop) is answered
503 ``overloaded`` with ``Retry-After`` at once, right after the input
checks and before any database work: that is the work shedding saves, so
the access check (403) of a private room comes after it. A client retries
after ``Retry-After`` with jitter. The shards' control calls
(``/v1/internal``) are never shed. For a room that already has a live owner this is
one indexed query (room joined with its instance) plus a ticket signature.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from directory.context import Directory
from directory.db.store import Target
from directory.domain.budget import CreateBudget, retry_after
from directory.domain.errors import ApiError, BadRequest, Forbidden, Overloaded, TooManyRequests
from directory.domain.schemas import ConnectBody, ConnectResponse
from directory.http.edge import ApiRoute, decode, json_response, read_body
from directory.http.server import ARRIVED
from roomshard.wire.protocol import INVALID_ROOM_ID, INVALID_USER_ID, valid_room_id, valid_user_id


def ws_base(url: str) -> str:
    """``http(s)://`` -> ``ws(s)://``; ws URLs unchanged; no trailing slash."""
    if url.startswith("http://"):
        url = "ws://" + url[7:]
    elif url.startswith("https://"):
        url = "wss://" + url[8:]
    return url.rstrip("/")


def room_url(ctx: Directory, target: Target, ticket: str) -> str:
    base = target.public_base or ctx.cfg.public_url or target.internal_url
    return f"{ws_base(base)}/{target.instance}/room/{target.room}?ticket={ticket}"


async def connect(request: Request, ctx: Directory) -> Response:
    try:
        return await _connect(request, ctx)
    except ApiError as exc:
        ctx.metrics.connects.labels(exc.code).inc()
        raise


def _admit(request: Request, ctx: Directory) -> None:
    """Shed this connect (503 ``overloaded``) when it waited too long for its turn."""
    arrived = request.scope.get(ARRIVED)
    if arrived is not None:
        waited = asyncio.get_running_loop().time() - arrived
        if waited > ctx.cfg.connect_queue_wait:
            raise Overloaded(f"the directory is overloaded: this connect waited {waited:.1f} s "
                             "for its turn; retry after Retry-After, with jitter")


async def _connect(request: Request, ctx: Directory) -> Response:
    now = ctx.clock()
    room = request.path_params["room"]
    jwt_mode = ctx.client_auth.mode == "jwt"
    user: str | None = None
    if jwt_mode:
        user = ctx.client_auth.jwt_subject(request.headers.get("authorization"), now=now)
    if not valid_room_id(room):
        raise BadRequest("invalid_room", INVALID_ROOM_ID)
    body = decode(await read_body(request), ConnectBody, empty_ok=jwt_mode)
    if not jwt_mode:
        user = body.user
        if user is None:
            raise BadRequest("missing_user", 'body must be {"user": "<id>"}')
    assert user is not None
    if not valid_user_id(user):
        raise BadRequest("invalid_user", INVALID_USER_ID)
    _admit(request, ctx)
    row = await ctx.store.room_target(room)
    if row is not None and row["private"] and user not in (row["members"] or ()):
        raise Forbidden("not_a_member", f"room {room} is private")
    charged = _charge_creation(ctx, request, user, now) if row is None else ()
    try:
        target, kind = await ctx.store.place(room, row, now=now, down_after=ctx.cfg.down_after,
                                             keep_after=ctx.replace_after(now))
    except BaseException:
        _refund(charged)
        raise
    if kind == "existing":
        _refund(charged)  # another request created the room first: this one only joins it
    else:
        ctx.metrics.placements.labels(kind).inc()
    ttl = ctx.cfg.ticket_ttl
    ticket = ctx.signer.issue_ticket(room=room, instance=target.instance, epoch=target.epoch,
                                     user=user, ttl=ttl, now=now)
    ctx.metrics.connect_ok.inc()
    return json_response({
        "room": room,
        "instance": target.instance,
        "epoch": target.epoch,
        "url": room_url(ctx, target, ctx.signer.encode_ticket(ticket)),
        "expires_in": ttl,
    }, no_store=True)


def _charge_creation(ctx: Directory, request: Request, user: str,
                     now: float) -> tuple[tuple[CreateBudget, str], ...]:
    """Charge a room creation to the user's budget (and the address's); 429 when over.

    Returns what was charged, for a refund when no room gets created.
    """
    charged: list[tuple[CreateBudget, str]] = []
    checks = [(ctx.create_budget, user, "user")]
    if ctx.create_budget_by_address.per_minute > 0 and request.client is not None:
        checks.append((ctx.create_budget_by_address, request.client.host, "address"))
    for budget, key, name in checks:
        wait = budget.take(key, now)
        if wait > 0:
            _refund(tuple(charged))
            ctx.metrics.creates_refused.labels(name).inc()
            raise TooManyRequests(
                message=f"over the budget of {budget.per_minute:g} new rooms per minute "
                        f"per {name}; joining existing rooms is not limited",
                retry_after=retry_after(wait))
        charged.append((budget, key))
    return tuple(charged)


def _refund(charged: tuple[tuple[CreateBudget, str], ...]) -> None:
    for budget, key in charged:
        budget.give_back(key)


ROUTES = [
    ApiRoute("POST", "/v1/rooms/{room:path}/connect", "connect", connect,
             "Get a ready room URL with a single-use ticket; places a new room atomically",
             "clients", auth="client", body=ConnectBody, response=ConnectResponse,
             errors=(400, 401, 403, 429, 503)),
]
