"""Plain HTTP on the shard's port: request/response values and a small router.

The shard parses HTTP itself (h11, in :mod:`shard.connection`) because its
WebSocket path must stay free of a per-connection task. The few plain
routes (health, readiness, metrics, the internal control routes) go through
this router. Other modules (the live handoff) add their own routes with
:meth:`Router.add`. Every error is the contract's JSON error body; an
exception in a handler becomes a 500 with that body, never a traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import orjson

from roomshard.wire.errors import error_body

log = logging.getLogger("roomshard.shard.http")

T = TypeVar("T")
MAX_BODY_BYTES = 8 << 20  # a handoff snapshot of 1,000 long messages fits
# A request without a valid cluster token (only the internal routes take
# one, and they need it) may not make the shard buffer more than this.
MAX_UNAUTHENTICATED_BODY_BYTES = 64 << 10


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body as JSON; raises :class:`HttpError` 400 when it is not."""
        try:
            return orjson.loads(self.body or b"null")
        except orjson.JSONDecodeError:
            raise HttpError(400, "bad_request", "body is not valid JSON") from None

    def decode(self, kind: type[T]) -> T:
        """The body as the wire Struct ``kind``; :class:`HttpError` 400 saying why when not."""
        return convert(self.json(), kind)

    def bearer(self) -> str | None:
        auth = self.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    """Raised by handlers: becomes the contract's JSON error body with ``status``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []

    def response(self) -> HttpResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def convert(data: Any, kind: type[T]) -> T:
    """Parsed JSON as the wire Struct ``kind``; :class:`HttpError` 400 saying why when not."""
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise HttpError(400, "bad_request", str(exc)) from None


def json_response(obj: Any, status: int = 200) -> HttpResponse:
    """``obj`` as JSON: plain data, or wire Structs (``roomshard.wire``)."""
    return HttpResponse(status, orjson.dumps(obj, default=msgspec.to_builtins))


def error_response(status: int, code: str, message: str,
                   headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(status, error_body(code, message), headers=list(headers or []))


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class Router:
    """Routes ``(method, "/path/{param}")`` to async handlers."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Register a route; ``{name}`` matches one path segment into ``request.params``."""
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method.upper(), re.compile(regex), handler))

    def match(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool]:
        """(handler, params, path_known): path_known tells 405 from 404."""
        known = False
        for m, regex, handler in self._routes:
            found = regex.fullmatch(path)
            if found:
                known = True
                if m == method:
                    return handler, found.groupdict(), True
        return None, {}, known

    async def dispatch(self, request: HttpRequest) -> HttpResponse:
        handler, params, known = self.match(request.method, request.path)
        if handler is None:
            if known:
                return error_response(405, "method_not_allowed",
                                      f"{request.method} is not allowed on {request.path}")
            return error_response(404, "not_found", f"no route {request.path}")
        request.params = params
        try:
            return await handler(request)
        except HttpError as exc:
            return exc.response()
        except Exception:  # a bug must not leak a traceback to the caller
            log.exception("handler for %s %s failed", request.method, request.path)
            return error_response(500, "internal_error", "the shard failed to handle this request")
