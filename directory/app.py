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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from directory import api_admin, api_client, api_internal, api_meta, handoff, openapi
from directory.auth import ClientAuth
from directory.context import Directory
from directory.db import make_engine, migrate
from directory.edge import ApiRoute, endpoint
from directory.errors import error_response
from directory.metrics import Metrics
from directory.shards import ShardClient
from directory.store import Store
from roomshard.config import ConfigError, DirectoryConfig
from roomshard.tickets import Signer

log = logging.getLogger("roomshard.directory")
_MANGLED_CONNECT = re.compile(r"^/v1(/rooms)?/*connect/*$")
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


STALL_CHECK_S = 0.5
STALL_S = 2.0  # a loop turn this late: heartbeats may have waited unread meanwhile


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


def all_routes() -> list[ApiRoute]:
    return [*api_client.ROUTES, *api_admin.ROUTES, *api_internal.ROUTES, *api_meta.ROUTES]


def create_app(cfg: DirectoryConfig, *, clock: Callable[[], float] = time.time,
               shard_transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The directory app; raises ``ConfigError`` for settings it cannot use (e.g. a bad PEM)."""
    if cfg.public_url and not cfg.public_url.startswith(("ws://", "wss://", "http://", "https://")):
        raise ConfigError("ROOMSHARD_PUBLIC_URL: must be a ws://, wss://, http:// or https:// URL")
    signer = Signer(cfg.cluster_secrets)
    client_auth = ClientAuth(cfg)
    metrics = Metrics()
    specs = all_routes()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = make_engine(cfg.database_url)
        shards = ShardClient(signer, clock, shard_transport)
        store: Store | None = None
        try:
            await migrate(engine)
            store = Store(engine)
            app.state.ctx = Directory(cfg=cfg, clock=clock, store=store, signer=signer,
                                      shards=shards, metrics=metrics, client_auth=client_auth,
                                      admin_token=cfg.admin_token.encode(),
                                      awake_since=clock())
            await handoff.start(app.state.ctx)  # recovers moves a dead replica left behind
            watchdog = asyncio.get_running_loop().create_task(watch_stalls(app.state.ctx))
            yield
        finally:
            if "watchdog" in locals():
                watchdog.cancel()
            if hasattr(app.state, "ctx"):
                await handoff.stop(app.state.ctx)
            if store is not None:
                store.close()
            await shards.aclose()
            await engine.dispose()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        metrics.observe("unmatched", exc.status_code, 0.0)
        if exc.status_code == 404 and _MANGLED_CONNECT.match(request.url.path):
            # "/v1/rooms/../connect" arrives as "/v1/connect" once a client
            # normalises dot segments: it is a bad room id, not a missing route.
            return error_response(400, "invalid_room", "room id must match ^[A-Za-z0-9_-]{1,64}$")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, code, str(exc.detail) or code)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, "internal_error", "internal error")

    routes: list[Route | Mount] = [Route(s.path, endpoint(s), methods=[s.method], name=s.name)
                                   for s in specs]
    routes.append(Mount("/static", app=StaticFiles(directory=api_meta.STATIC_DIR, check_dir=False),
                        name="static"))
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.router.redirect_slashes = False
    app.state.openapi = api_meta.encode_openapi(
        openapi.build(specs, version=api_meta.package_version()))
    app.state.metrics = metrics
    return app
