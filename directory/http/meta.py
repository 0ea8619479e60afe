"""Routes for everyone: health, readiness, metrics, the OpenAPI document, the chat page."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from directory.context import Directory
from directory.domain import schemas
from directory.domain.errors import Unavailable
from directory.http.edge import ApiRoute, json_response

STATIC_DIR = Path(__file__).with_name("static")
# Under it, roomshard/: the JavaScript client's modules (js/src built by ``npm run
# build:page``), served by the directory's /static mount; the chat page imports them and
# ``tests/js`` checks they are what the sources build to.
NOT_INSTALLED_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>roomshard</title></head>
<body><h1>roomshard directory</h1>
<p>The chat page is not installed in this build (directory/static/index.html is missing).</p>
<p>The API is described at <a href="/openapi.json">/openapi.json</a>.</p></body></html>
"""


def package_version() -> str:
    try:
        return version("roomshard")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


async def healthz(request: Request, ctx: Directory) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request, ctx: Directory) -> Response:
    try:
        await ctx.store.ping()
    except Exception as exc:
        raise Unavailable("database_unavailable", "the database is unreachable") from exc
    return json_response({"status": "ready"})


async def metrics(request: Request, ctx: Directory) -> Response:
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request, ctx: Directory) -> Response:
    doc: bytes = request.app.state.openapi
    return Response(doc, media_type="application/json")


_INLINE = {"script": re.compile(r'<script(?: type="module")?>(.*?)</script>', re.DOTALL),
           "style": re.compile(r"<style>(.*?)</style>", re.DOTALL)}


def content_security_policy(page: str) -> str:
    """The chat page's policy: only its own inline script and style (by hash) run, and the
    client's modules the directory serves (``'self'``, /static/roomshard/).

    It fetches the directory (``'self'``) and opens WebSockets to whatever shard
    URL the directory returns (a public_base, ROOMSHARD_PUBLIC_URL or a shard's
    own address, on any host and port), hence ``ws: wss:``. No frames (nor being
    framed), no plugins, no base or form redirection.
    """
    def hashes(kind: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                        for m in _INLINE[kind].findall(page)) or "'none'"

    return (f"default-src 'none'; script-src 'self' {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


async def index(request: Request, ctx: Directory) -> Response:
    try:
        page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    except FileNotFoundError:
        page = NOT_INSTALLED_PAGE
    return HTMLResponse(page, headers={"Content-Security-Policy": content_security_policy(page),
                                       "X-Frame-Options": "DENY"})


ROUTES = [
    ApiRoute("GET", "/healthz", "healthz", healthz, "The process is alive", "everyone",
             response=schemas.Status, errors=()),
    ApiRoute("GET", "/readyz", "readyz", readyz, "The database is reachable", "everyone",
             response=schemas.Status, errors=(503,)),
    ApiRoute("GET", "/metrics", "metrics", metrics, "Prometheus metrics", "everyone",
             errors=(), content_type="text/plain"),
    ApiRoute("GET", "/openapi.json", "openapi", openapi, "This document", "everyone",
             errors=()),
    ApiRoute("GET", "/", "index", index, "The chat page", "everyone", errors=(),
             content_type="text/html"),
]


def encode_openapi(doc: dict[str, object]) -> bytes:
    return orjson.dumps(doc)
