"""The HTTP edge: route specs, the endpoint wrapper, body decoding, JSON responses.

Each route is an :class:`ApiRoute`: its handler plus the request/response
types and statuses that ``directory.openapi`` publishes. :func:`endpoint`
wraps a handler so that every outcome is the contract's JSON (errors
included), database outages become 503 ``database_unavailable`` with
``Retry-After``, unexpected exceptions become a logged 500 JSON body (never a
traceback to the client), and each request is counted in the app's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import orjson
from sqlalchemy import exc as sa_exc
from starlette.requests import Request
from starlette.responses import Response

from directory.context import Directory
from directory.errors import ApiError, BadRequest, Unavailable, error_response

log = logging.getLogger("roomshard.directory")

T = TypeVar("T")
Handler = Callable[[Request, Directory], Awaitable[Response]]

# Driver errors that mean "the database is not there right now" (the pool's
# pre-ping heals the engine once it is back). Integrity/programming/data
# errors are bugs and stay 500s.
_BUG_ERRORS = (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.DataError)
_DB_DOWN_ERRORS = (sa_exc.DBAPIError, sa_exc.DisconnectionError, sa_exc.TimeoutError,
                   OSError, TimeoutError)


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str  # Starlette pattern; ``{x:path}`` so that odd ids reach validation (400, not 404)
    name: str  # operationId and the metrics label
    handler: Handler
    summary: str
    tag: str
    auth: str = "none"  # none | admin | cluster | client
    body: type | None = None
    response: type | None = None
    errors: tuple[int, ...] = field(default=(400,))
    # (name, JSON type or JSON Schema, description); ids get their pattern in directory.openapi
    query: tuple[tuple[str, str | dict[str, Any], str], ...] = ()
    content_type: str = "application/json"


_NO_STORE = {"Cache-Control": "no-store"}


def json_response(data: Any, status: int = 200, *, no_store: bool = False) -> Response:
    """``no_store`` for bodies carrying a credential (a ticket must not sit in a cache)."""
    return Response(orjson.dumps(data, default=msgspec.to_builtins), status_code=status,
                    media_type="application/json",
                    headers=_NO_STORE if no_store else None)


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
    handler, name = route.handler, route.name

    async def run(request: Request) -> Response:
        ctx: Directory = request.app.state.ctx
        started = time.perf_counter()
        try:
            response = await handler(request, ctx)
        except ApiError as exc:
            response = exc.response()
        except _BUG_ERRORS:
            log.exception("%s %s failed", request.method, request.url.path)
            response = error_response(500, "internal_error", "internal error")
        except _DB_DOWN_ERRORS as exc:
            log.warning("database unavailable during %s %s: %s", request.method,
                        request.url.path, exc.__class__.__name__)
            response = Unavailable("database_unavailable", "the database is unreachable").response()
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            response = error_response(500, "internal_error", "internal error")
        ctx.metrics.observe(name, response.status_code, time.perf_counter() - started)
        return response

    run.__name__ = name
    return run
