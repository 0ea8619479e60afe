"""The OpenAPI 3.1 document, generated from the route table and its msgspec types.

Nothing here is written by hand per route: paths, methods, request and
response schemas and error statuses all come from each :class:`ApiRoute`,
and the JSON Schemas come from ``msgspec.json.schema_components`` over the
same Structs that decode the requests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from directory.http.edge import ApiRoute
from roomshard.wire.errors import ErrorBody
from roomshard.wire.protocol import INSTANCE_ID_RE, ROOM_ID_RE, USER_ID_RE

_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")
_STATUS_TEXT = {400: "Invalid input", 401: "Missing or bad credentials", 403: "Not allowed",
                404: "Not found", 409: "Conflict", 429: "Too many requests (see Retry-After)",
                503: "Unavailable (see Retry-After)"}
# Path and query parameters that are ids: the same patterns the handlers fullmatch.
ID_SCHEMAS: dict[str, dict[str, Any]] = {
    "room": {"type": "string", "pattern": f"^{ROOM_ID_RE.pattern}$", "minLength": 1,
             "maxLength": 64},
    "instance": {"type": "string", "pattern": f"^{INSTANCE_ID_RE.pattern}$", "minLength": 2,
                 "maxLength": 5},
    "user": {"type": "string", "pattern": f"^{USER_ID_RE.pattern}$", "minLength": 1,
             "maxLength": 64},
}
_SECURITY: dict[str, list[dict[str, list[str]]]] = {"admin": [{"adminToken": []}], "cluster": [{"clusterToken": []}],
             "client": [{}, {"clientJwt": []}], "server": [{"apiKey": []}, {"adminToken": []}]}


def build(routes: Iterable[ApiRoute], *, version: str) -> dict[str, Any]:
    routes = list(routes)
    types: list[Any] = [ErrorBody]
    for r in routes:
        types += [t for t in (r.body, r.response) if t is not None]
    (refs, components) = msgspec.json.schema_components(
        list(dict.fromkeys(types)), ref_template="#/components/schemas/{name}")
    ref = dict(zip(dict.fromkeys(types), refs))
    error_ref = ref[ErrorBody]
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        path = _PARAM.sub(r"{\1}", r.path)
        op: dict[str, Any] = {"operationId": r.name, "summary": r.summary, "tags": [r.tag]}
        params = [{"name": n, "in": "path", "required": True,
                   "schema": ID_SCHEMAS.get(n, {"type": "string"})}
                  for n in _PARAM.findall(r.path)]
        params += [{"name": n, "in": "query", "required": False,
                    "schema": ID_SCHEMAS.get(n, {"type": t}) if isinstance(t, str) else t,
                    "description": d} for n, t, d in r.query]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": r.auth != "client",
                                 "content": {"application/json": {"schema": ref[r.body]}}}
        ok: dict[str, Any] = {"description": "OK"}
        if r.response is not None:
            ok["content"] = {r.content_type: {"schema": ref[r.response]}}
        elif r.content_type != "application/json":
            ok["content"] = {r.content_type: {"schema": {"type": "string"}}}
        responses: dict[str, Any] = {"200": ok}
        for status in r.errors:
            responses[str(status)] = {"description": _STATUS_TEXT.get(status, "Error"),
                                      "content": {"application/json": {"schema": error_ref}}}
        op["responses"] = responses
        if r.auth in _SECURITY:
            op["security"] = _SECURITY[r.auth]
        paths.setdefault(path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "roomshard directory", "version": version,
                 "description": "Rooms -> instances, tickets, and the admin API. Every error "
                                "body is {\"error\": {\"code\", \"message\"}}."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "ROOMSHARD_ADMIN_TOKEN"},
                "clusterToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                 "description": "cluster token signed with ROOMSHARD_CLUSTER_SECRET"},
                "clientJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                              "description": "application JWT (auth mode jwt); sub = user id"},
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "one of ROOMSHARD_API_KEYS (the server API)"},
            },
        },
    }
