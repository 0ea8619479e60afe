"""The HTTP edge: route specs, the endpoint wrapper, body decoding, JSON responses.

Each route is an :class:`ApiRoute`: its handler, who may call it (``auth``),
and the request/response types and statuses that ``directory.http.openapi``
publishes. :func:`endpoint` wraps a handler: it checks the route's ``auth``
before the handler runs (401 otherwise), and makes every outcome the
contract's JSON (errors included, :func:`error_response`): database outages
become 503 ``database_unavailable`` with ``Retry-After``, unexpected
exceptions a logged 500 JSON body (never a traceback to the client); each
request is counted in the app's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
import orjson
from sqlalchemy import exc as sa_exc
from starlette.requests import Request
from starlette.responses import Response

from directory.context import Directory
from directory.domain.auth import check_admin, check_server_key, cluster_subject
from directory.domain.errors import ApiError, BadRequest, Overloaded, Unavailable
from roomshard.wire.errors import error_body
from roomshard.wire.protocol import INVALID_ROOM_ID, instance_number, valid_room_id

log = logging.getLogger("roomshard.directory")

T = TypeVar("T")
Handler = Callable[[Request, Directory], Awaitable[Response]]

# Driver errors that mean "the database is not there right now" (the pool's
# pre-ping heals the engine once it is back). Integrity/programming/data
# errors are bugs and stay 500s.
_BUG_ERRORS = (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.DataError)
_DB_DOWN_ERRORS = (sa_exc.DBAPIError, sa_exc.DisconnectionError, sa_exc.TimeoutError,
                   OSError, TimeoutError)


#: Who may call a route, checked by :func:`endpoint` before its handler runs:
#: ``admin``: the operator's bearer token; ``cluster``: a shard's cluster token (the
#: instance it names: :func:`cluster_caller`); ``client``: an application user, whom the
#: handler identifies (open mode: the body's ``user``; jwt mode: the bearer JWT, verified
#: before anything else); ``server``: an application backend (one of ``ROOMSHARD_API_KEYS``,
#: or the admin token); ``none``: anyone.
Auth = Literal["none", "admin", "cluster", "client", "server"]


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str  # Starlette pattern; ``{x:path}`` so that odd ids reach validation (400, not 404)
    name: str  # operationId and the metrics label
    handler: Handler
    summary: str
    tag: str
    auth: Auth = "none"
    body: type | None = None
    response: type | None = None
    errors: tuple[int, ...] = field(default=(400,))
    # (name, JSON type or JSON Schema, description); ids get their pattern in directory.http.openapi
    query: tuple[tuple[str, str | dict[str, Any], str], ...] = ()
    content_type: str = "application/json"


NO_STORE = {"Cache-Control": "no-store"}


def error_response(status: int, code: str, message: str, *,
                   retry_after: int | None = None) -> Response:
    """The contract's error body (``roomshard.wire.errors``) as a response."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return Response(error_body(code, message), status_code=status,
                    media_type="application/json", headers=headers)


def error_of(exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message, retry_after=exc.retry_after)


def authenticate(auth: Auth, request: Request, ctx: Directory) -> None:
    """Refuse (:class:`~directory.domain.errors.Unauthorized`) a caller that ``auth`` does not admit."""
    if auth == "admin":
        check_admin(request.headers.get("authorization"), ctx.admin_token)
    elif auth == "server":
        check_server_key(request.headers.get("authorization"), ctx.admin_token, ctx.api_keys)
    elif auth == "cluster":
        request.state.cluster_caller = cluster_subject(request.headers.get("authorization"),
                                                       ctx.signer, now=ctx.clock())


def cluster_caller(request: Request) -> str:
    """The instance whose cluster token authenticated this request (``auth="cluster"``)."""
    caller: str = request.state.cluster_caller
    return caller


def json_response(data: Any, status: int = 200, *, no_store: bool = False) -> Response:
    """``no_store`` for bodies carrying a credential (a ticket must not sit in a cache)."""
    return Response(orjson.dumps(data, default=msgspec.to_builtins), status_code=status,
                    media_type="application/json",
                    headers=NO_STORE if no_store else None)


MAX_BODY_BYTES = 1 << 20
#: A request body must arrive within this long of its head (a trickled body is refused).
BODY_TIMEOUT_S = 30.0


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(ApiError):
    status = 408
    code = "request_timeout"


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) without reading it all,
    or a body still incomplete after ``BODY_TIMEOUT_S`` (408)."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await _read_body(request, limit)
    except TimeoutError:
        raise RequestTimeout(message=f"request body not complete within {BODY_TIMEOUT_S:g} s") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(message=f"request body over {limit} bytes")
    if declared is not None:
        return await request.body()  # uvicorn enforces the declared length
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(message=f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def instance_param(value: str) -> str:
    """An instance id from a path or a body (400 ``invalid_instance`` otherwise)."""
    if instance_number(value) is None:
        raise BadRequest("invalid_instance", "instance id must be i1..i9999")
    return value


def room_param(value: str) -> str:
    """A room id from a path (400 ``invalid_room`` otherwise)."""
    if not valid_room_id(value):
        raise BadRequest("invalid_room", INVALID_ROOM_ID)
    return value


def decode(body: bytes, kind: type[T], *, empty_ok: bool = False) -> T:
    """Decode a JSON body into ``kind``; raises BadRequest with a precise message."""
    if not body.strip():
        if not empty_ok:
            raise BadRequest("invalid_json", "request body must be a JSON object")
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest("invalid_body", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest("invalid_json", f"malformed JSON: {exc}") from None


def endpoint(route: ApiRoute) -> Callable[[Request], Awaitable[Response]]:
    handler, name, auth = route.handler, route.name, route.auth

    async def run(request: Request) -> Response:
        ctx: Directory = request.app.state.ctx
        started = time.perf_counter()
        try:
            authenticate(auth, request, ctx)
            response = await handler(request, ctx)
        except ApiError as exc:
            response = error_of(exc)
        except _BUG_ERRORS:
            log.exception("%s %s failed", request.method, request.url.path)
            response = error_response(500, "internal_error", "internal error")
        except sa_exc.TimeoutError:
            # The connection pool had no connection free in time: the database answers,
            # this directory has more requests than connections (load, not an outage).
            response = error_of(Overloaded("the directory is overloaded: no database "
                                           "connection was free in time; retry after "
                                           "Retry-After, with jitter"))
        except _DB_DOWN_ERRORS as exc:
            log.warning("database unavailable during %s %s: %s", request.method,
                        request.url.path, exc.__class__.__name__)
            response = error_of(Unavailable("database_unavailable", "the database is unreachable"))
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            response = error_response(500, "internal_error", "internal error")
        ctx.metrics.observe(name, response.status_code, time.perf_counter() - started)
        return response

    run.__name__ = name
    return run
