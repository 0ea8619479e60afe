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
import time
from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy.exc import OperationalError
from starlette.requests import Request
from starlette.responses import Response

from directory.context import Directory
from directory.db.store import Target
from directory.domain.budget import CreateBudget, retry_after
from directory.domain.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    Overloaded,
    TooManyRequests,
    Unavailable,
)
from directory.domain.schemas import ConnectBody, ConnectResponse
from directory.http.edge import NO_STORE, ApiRoute, decode, read_body
from directory.http.server import ARRIVED
from directory.ops.failover import SUSPECT_HOLD_S
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
    user = _credentials(ctx, room, request.headers.get("authorization"), now)
    user, unreachable = _user(ctx, await read_body(request), user)
    _admit(request, ctx)
    store = ctx.store
    row: Mapping[str, Any] | None
    # Within the budget, a room this replica does not know is looked up and placed in one
    # go (PostgreSQL): charged ahead, refunded unless it was new. Not for a client that
    # says which owner it lost (a reconnect: the room exists, a plain lookup is cheaper).
    one_go = store.finds_or_places and unreachable is None
    charged, over = _take_creation(ctx, request, user, now) if one_go else ((), None)
    if one_go and over is None:
        try:
            row, created = await store.room_target_or_new(room, now=now,
                                                          down_after=ctx.cfg.down_after)
        except BaseException:
            _refund(charged)
            raise
        if created is not None:
            ctx.metrics.placements.labels("new").inc()
            return Response(_answer(ctx, created, user, now), media_type="application/json",
                            headers=NO_STORE)
        _refund(charged)
    else:
        row = await store.room_target(room)
    if row is not None:
        _check_access(room, row, user)
        row = await _after_suspicion(ctx, room, row, unreachable, now)
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
    return Response(_answer(ctx, target, user, now), media_type="application/json",
                    headers=NO_STORE)


def connect_now(ctx: Directory, room: str, authorization: str | None, body: bytes) -> bytes | None:
    """The 200 body of a connect that can be answered without waiting, else None.

    The HTTP edge calls this for a connect whose request arrived whole
    (:class:`directory.http.server.BoundedHttpToolsProtocol`), before it
    becomes a task: a room that has a serving owner, looked up where the store
    answers at once (SQLite, in this process). Everything else (a new room, a
    dead owner, any error, a store that must be awaited) answers None and the
    request goes the general way (:func:`connect`), which does every check
    again; nothing here has an effect before the answer is certain. Same
    checks in the same order, same ticket, same metrics as the general way.
    """
    started = time.perf_counter()
    store = ctx.store
    if not store.looks_up_now:
        return None
    now = ctx.clock()
    try:
        user, unreachable = _user(ctx, body, _credentials(ctx, room, authorization, now))
        row = store.room_target_now(room)
        if row is None:
            return None
        _check_access(room, row, user)
    except (ApiError, OperationalError):
        return None
    if unreachable == row["instance"] or row["instance"] in ctx.failover.suspects:
        return None  # the owner may have died: the general way waits for the check
    target = store.serving_target(room, row, now=now, keep_after=ctx.replace_after(now))
    if target is None:
        return None
    answer = _answer(ctx, target, user, now)
    ctx.metrics.answered_at_once.inc()
    ctx.metrics.observe("connect", 200, time.perf_counter() - started)
    return answer


def _credentials(ctx: Directory, room: str, authorization: str | None, now: float) -> str | None:
    """The JWT's user (401 without a valid one) in ``jwt`` mode; then the room id (400)."""
    user = None
    if ctx.client_auth.mode == "jwt":
        user = ctx.client_auth.jwt_subject(authorization, now=now)
    if not valid_room_id(room):
        raise BadRequest("invalid_room", INVALID_ROOM_ID)
    return user


def _user(ctx: Directory, body: bytes, user: str | None) -> tuple[str, str | None]:
    """The connecting user: the JWT's, else the body's ``user`` (400 without a valid one);
    and the instance the client says it could not reach (``unreachable``), if any."""
    jwt_mode = user is not None
    decoded = decode(body, ConnectBody, empty_ok=jwt_mode)
    if not jwt_mode:
        user = decoded.user
        if user is None:
            raise BadRequest("missing_user", 'body must be {"user": "<id>"}')
    assert user is not None
    if not valid_user_id(user):
        raise BadRequest("invalid_user", INVALID_USER_ID)
    return user, decoded.unreachable


async def _after_suspicion(ctx: Directory, room: str, row: Mapping[str, Any],
                           unreachable: str | None, now: float) -> Mapping[str, Any] | None:
    """``row`` again after the check of its owner when the owner is suspect (its control
    channel closed, or this client could not reach it): re-placed, or found alive. Past
    ``SUSPECT_HOLD_S`` 503 with Retry-After: never the URL of a shard that may be dead.
    An owner that no longer serves by its heartbeats (past ``down_after``) needs no
    check: the room is placed elsewhere right after this."""
    if ctx.store.serving_target(room, row, now=now, keep_after=ctx.replace_after(now)) is None:
        return row
    instance = row["instance"]
    verdict = ctx.failover.verdict(instance, hinted=unreachable == instance)
    if verdict is None:
        return row
    try:
        async with asyncio.timeout(SUSPECT_HOLD_S):
            await asyncio.shield(verdict)
    except TimeoutError:
        raise Unavailable("owner_suspected",
                          f"room {room}'s instance {instance} may have died and is being "
                          "checked; retry after Retry-After, with jitter",
                          retry_after=1) from None
    return await ctx.store.room_target(room)


def _check_access(room: str, row: Mapping[str, Any], user: str) -> None:
    if row["private"] and user not in (row["members"] or ()):
        raise Forbidden("not_a_member", f"room {room} is private")


def _answer(ctx: Directory, target: Target, user: str, now: float) -> bytes:
    """The 200 body: the room's URL with a fresh single-use ticket."""
    ttl = ctx.cfg.ticket_ttl
    ticket = ctx.signer.issue_ticket(room=target.room, instance=target.instance,
                                     epoch=target.epoch, user=user, ttl=ttl, now=now)
    ctx.metrics.connect_ok.inc()
    return orjson.dumps({
        "room": target.room,
        "instance": target.instance,
        "epoch": target.epoch,
        "url": room_url(ctx, target, ctx.signer.encode_ticket(ticket)),
        "expires_in": ttl,
    })


Charged = tuple[tuple[CreateBudget, str], ...]


def _charge_creation(ctx: Directory, request: Request, user: str, now: float) -> Charged:
    """Charge a room creation to the user's budget (and the address's); 429 when over.

    Returns what was charged, for a refund when no room gets created.
    """
    charged, over = _take_creation(ctx, request, user, now)
    if over is not None:
        budget, name, wait = over
        ctx.metrics.creates_refused.labels(name).inc()
        raise TooManyRequests(
            message=f"over the budget of {budget.per_minute:g} new rooms per minute "
                    f"per {name}; joining existing rooms is not limited",
            retry_after=retry_after(wait))
    return charged


def _take_creation(ctx: Directory, request: Request, user: str,
                   now: float) -> tuple[Charged, tuple[CreateBudget, str, float] | None]:
    """What a room creation charged, or nothing and the budget it is over (its name,
    the wait): a charge ahead of the lookup refuses nothing (the room may exist)."""
    charged: list[tuple[CreateBudget, str]] = []
    checks = [(ctx.create_budget, user, "user")]
    if ctx.create_budget_by_address.per_minute > 0 and request.client is not None:
        checks.append((ctx.create_budget_by_address, request.client.host, "address"))
    for budget, key, name in checks:
        wait = budget.take(key, now)
        if wait > 0:
            _refund(tuple(charged))
            return (), (budget, name, wait)
        charged.append((budget, key))
    return tuple(charged), None


def _refund(charged: Charged) -> None:
    for budget, key in charged:
        budget.give_back(key)


ROUTES = [
    ApiRoute("POST", "/v1/rooms/{room:path}/connect", "connect", connect,
             "Get a ready room URL with a single-use ticket; places a new room atomically",
             "clients", auth="client", body=ConnectBody, response=ConnectResponse,
             errors=(400, 401, 403, 429, 503)),
]
