"""Assemble the directory's Starlette app: routes, error handlers, lifespan.

The lifespan owns every resource (database engine and its migrations, the
httpx client to shards, the metrics registry); nothing is global, so several
apps can live in one test process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from directory.context import Directory
from directory.db.engine import migrate
from directory.db.store import Store
from directory.domain.auth import ClientAuth
from directory.domain.budget import CreateBudget
from directory.domain.errors import ApiError
from directory.http import admin, connect, internal, messages, meta, openapi
from directory.http.edge import ApiRoute, authenticate, endpoint, error_of, error_response
from directory.http.server import CONNECT_PREFIX, CONNECT_SUFFIX, connect_room
from directory.metrics import Metrics
from directory.ops.failover import Failover
from directory.ops.mover import Mover
from directory.ops.route_check import RouteChecker
from directory.shards import ShardClient
from roomshard import urls
from roomshard.config import ConfigError, DirectoryConfig
from roomshard.sql import make_engine, pool_limit, warm_pool
from roomshard.store.messages import MessageStore
from roomshard.wire.protocol import INVALID_ROOM_ID
from roomshard.wire.tickets import Signer

log = logging.getLogger("roomshard.directory")
_MANGLED_CONNECT = re.compile(r"/v1(/rooms)?/*connect/*")
# A path with a control character (%0A, %00, ...) that names no route is bad input.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


STALL_CHECK_S = 0.5
STALL_S = 2.0  # a loop turn this late: heartbeats may have waited unread meanwhile
SWEEP_BATCH = 500  # unused rooms removed per transaction


async def watch_stalls(ctx: Directory) -> None:
    """Treat a stalled event loop like a restart (see ``Directory.replace_after``).

    While the loop was stuck (a huge request, a GC pause, a swapped-out
    process) the shards' heartbeats waited unread: their last heartbeat in
    the database says nothing about them, so no room is re-placed for lack of
    one during the next ``down_after``.
    """
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(STALL_CHECK_S)
        now = loop.time()
        if now - last > STALL_CHECK_S + STALL_S:
            ctx.awake_since = ctx.clock()
            log.warning("the event loop stalled for %.1fs: no room is re-placed for lack of "
                        "heartbeats for the next %.0fs", now - last - STALL_CHECK_S,
                        ctx.cfg.down_after)
        last = now


async def sweep_unused_rooms(ctx: Directory) -> None:
    """Remove rooms no member ever joined, older than ``room_unused_ttl`` (0: never).

    Every replica sweeps; a removal is one conditional DELETE per batch
    (rooms no shard ever opened, not private, not moving), so replicas never
    conflict and a room that was joined meanwhile stays. At most
    :data:`SWEEP_BATCH` rooms per transaction, batches back to back while
    full, then a pause of a quarter of the TTL (at most a minute).
    """
    ttl = ctx.cfg.room_unused_ttl
    if ttl <= 0:
        return
    pause = min(60.0, ttl / 4)
    while True:
        await asyncio.sleep(pause)
        try:
            while True:
                removed = await ctx.store.remove_unused_rooms(ctx.clock() - ttl, SWEEP_BATCH)
                if removed:
                    ctx.metrics.rooms_removed.inc(removed)
                    log.info("removed %d rooms nobody joined for %.0fs", removed, ttl)
                if removed < SWEEP_BATCH:
                    break
                await asyncio.sleep(0)  # other requests between full batches
        except Exception as exc:  # noqa: BLE001 - a database outage: try again later
            log.warning("could not remove unused rooms: %s", exc)


async def _warm(engine: AsyncEngine, connections: int,
                prime: Callable[[Any], Awaitable[None]]) -> None:
    """Open the database pool's connections before serving (``ROOMSHARD_DATABASE_POOL_WARM``),
    each readied by ``prime``; a failure is logged, not fatal: the pool opens them as needed."""
    if engine.dialect.name == "sqlite":
        return  # local files: nothing to open ahead
    wanted = min(connections, pool_limit(engine))
    try:
        async with asyncio.timeout(10):
            opened = await warm_pool(engine, wanted, prime)
    except TimeoutError:
        log.warning("the database pool's connections took over 10 s to open; "
                    "they open as needed")
        return
    if opened < wanted:
        log.warning("opened %d of the database pool's %d connections at start (is "
                    "PostgreSQL's max_connections big enough?); the rest open as needed",
                    opened, wanted)


def strict(route: Route | Mount) -> Route | Mount:
    """End the route's regex at the end of the path, newlines included.

    Starlette anchors with ``$`` (which also matches before a trailing
    newline: ``/v1/rooms/r/connect%0A`` would be ``connect``) and its
    ``{x:path}`` is ``.*`` (which stops at a newline: ``a%0Ab`` would be a 404
    before the credential check). With ``\\Z`` and DOTALL every path
    parameter, whatever it holds, reaches its handler, which checks
    credentials (401) before validating the id with ``fullmatch`` (400).
    """
    route.path_regex = re.compile(route.path_regex.pattern.removesuffix("$") + r"\Z", re.DOTALL)
    return route


def _unrouted_control_chars(request: Request) -> Response | None:
    """400 for a path with a control character that matched no route, credentials first."""
    path = request.scope["path"]  # not request.url.path: urlsplit drops newlines and tabs
    if not _CONTROL_CHARS.search(path):
        return None
    ctx: Directory = request.app.state.ctx
    try:
        if path.startswith("/v1/admin/"):
            authenticate("admin", request, ctx)
        elif path.startswith("/v1/internal/"):
            authenticate("cluster", request, ctx)
    except ApiError as exc:
        return error_of(exc)
    return error_response(400, "invalid_path", "the path must not contain control characters")


def all_routes() -> list[ApiRoute]:
    return [*connect.ROUTES, *messages.ROUTES, *admin.ROUTES, *internal.ROUTES, *meta.ROUTES]


class DirectoryApp(Starlette):
    """Starlette, with the measured hot path dispatched straight to its endpoint.

    ``POST /v1/rooms/{room}/connect`` goes to the very endpoint its route has (same
    checks, metrics and error bodies: the endpoint answers every outcome itself),
    without the middleware stack and the walk over the route table, a sixth of a
    connect's CPU in the directory (docs/benchmarks/connect.md). A path takes
    this way exactly when the connect route's own pattern would match it
    (:func:`directory.http.server.connect_room`).
    """

    connect: Callable[[Request], Awaitable[Response]] | None = None

    def connect_now(self, room: str, authorization: str | None, body: bytes) -> bytes | None:
        """A connect answered before it becomes a request task, where it can be
        (:func:`directory.http.connect.connect_now`; the HTTP edge calls it)."""
        ctx = getattr(self.state, "ctx", None)
        if ctx is None or self.connect is None:
            return None
        return connect.connect_now(ctx, room, authorization, body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.connect is not None:
            room = connect_room(scope["path"])
            if room is not None:
                scope["app"] = self
                scope["path_params"] = {"room": room}
                response = await self.connect(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(cfg: DirectoryConfig, *, clock: Callable[[], float] = time.time,
               shard_transport: httpx.AsyncBaseTransport | None = None) -> DirectoryApp:
    """The directory app; raises ``ConfigError`` for settings it cannot use (e.g. a bad PEM)."""
    if cfg.public_url:
        try:
            urls.check_public_base(cfg.public_url)
        except urls.UrlError as exc:
            raise ConfigError(f"ROOMSHARD_PUBLIC_URL: {str(exc).removeprefix('public_base')}") from None
    signer = Signer(cfg.cluster_secrets)
    client_auth = ClientAuth(cfg)
    metrics = Metrics()
    specs = all_routes()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = make_engine(cfg.database_url, name="roomshard-directory")
        shards = ShardClient(signer, clock, shard_transport)
        store: Store | None = None
        mover: Mover | None = None
        message_store = None if cfg.history_url == "memory" else MessageStore(cfg.history_url)
        background: list[asyncio.Task[None]] = []
        try:
            await migrate(engine)
            store = Store(engine)
            await _warm(engine, cfg.database_pool_warm, store.prime)
            if message_store is not None:
                await message_store.open()
            mover = Mover(store, shards, metrics, clock, down_after=cfg.down_after)
            app.state.ctx = Directory(cfg=cfg, clock=clock, store=store, signer=signer,
                                      shards=shards, metrics=metrics, client_auth=client_auth,
                                      admin_token=cfg.admin_token.encode(), mover=mover,
                                      failover=Failover(store, shards, metrics, clock,
                                                        down_after=cfg.down_after),
                                      api_keys=tuple(k.encode() for k in cfg.server_api_keys),
                                      messages=message_store,
                                      awake_since=clock(),
                                      create_budget=CreateBudget(cfg.room_create_rate),
                                      create_budget_by_address=CreateBudget(
                                          cfg.room_create_rate_per_address))
            mover.start()  # and recover the moves a dead replica left behind
            loop = asyncio.get_running_loop()
            background = [loop.create_task(watch_stalls(app.state.ctx)),
                          loop.create_task(sweep_unused_rooms(app.state.ctx))]
            if cfg.route_check:
                checker = RouteChecker(store, metrics, public_url=cfg.public_url, clock=clock,
                                       down_after=cfg.down_after)
                background.append(loop.create_task(checker.run()))
            if (listening := store.start()) is not None:
                background.append(listening)
                metrics.watch_cache(store.cache)
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if mover is not None:
                await mover.stop()
            if store is not None:
                store.close()
            if message_store is not None:
                await message_store.close()
            await shards.aclose()
            await engine.dispose()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        metrics.observe("unmatched", exc.status_code, 0.0)
        if exc.status_code in (404, 405) and (refused := _unrouted_control_chars(request)):
            return refused
        if exc.status_code == 404 and _MANGLED_CONNECT.fullmatch(request.url.path):
            # "/v1/rooms/../connect" arrives as "/v1/connect" once a client
            # normalises dot segments: it is a bad room id, not a missing route.
            return error_response(400, "invalid_room", INVALID_ROOM_ID)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, code, str(exc.detail) or code)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, "internal_error", "internal error")

    routes: list[Route | Mount] = [strict(Route(s.path, endpoint(s), methods=[s.method], name=s.name))
                                   for s in specs]
    routes.append(strict(Mount("/static", app=StaticFiles(directory=meta.STATIC_DIR,
                                                          check_dir=False), name="static")))
    app = DirectoryApp(routes=routes, lifespan=lifespan,
                       exception_handlers={HTTPException: http_error, Exception: server_error})
    (connect_spec,) = (s for s in specs if s.name == "connect")
    assert connect_spec.method == "POST" and connect_spec.path == (
        CONNECT_PREFIX + "{room:path}" + CONNECT_SUFFIX)
    app.connect = endpoint(connect_spec)
    app.router.redirect_slashes = False
    app.state.openapi = meta.encode_openapi(
        openapi.build(specs, version=meta.package_version()))
    app.state.metrics = metrics
    return app
