"""Path ids with control characters: every route, every path parameter, the contract's order.

Starlette anchors route regexes with ``$`` (true before a trailing newline)
and ``{x:path}`` stops at a newline; the directory's routes end at the end
of the path instead, so such ids reach their handler: credentials (401)
first, then the id (400), never a 404 and never the id without its newline.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from directory.app import all_routes
from directory.http.edge import ApiRoute
from tests.directory.conftest import ADMIN, Harness, cluster_headers
from tests.directory.test_bad_input import assert_error

_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")
VALID = {"room": "lobby", "instance": "i1"}
BAD_IDS = ["a%0Ab", "a%0A", "%0A", "a%0Db", "a%00b", "a%09b", "lobby%0A%0A", "i1%0A"]
CODES = {"room": "invalid_room", "instance": "invalid_instance"}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: every case here is refused (401, then 400) before the database is read,
    so the PostgreSQL run repeated the same code paths (it cost a minute of the suite)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'directory.db'}"


def credentials(route: ApiRoute) -> dict[str, str]:
    if route.auth in ("admin", "server"):  # the server API takes the admin token too
        return ADMIN
    if route.auth == "cluster":
        return cluster_headers("i1")
    return {}


def with_params(route: ApiRoute, bad: str | None = None, which: str | None = None) -> str:
    return _PARAM.sub(lambda m: bad if m.group(1) == which and bad is not None
                      else VALID[m.group(1)], route.path)


PARAM_CASES = [(r, name, bad) for r in all_routes() for name in _PARAM.findall(r.path)
               for bad in BAD_IDS]


@pytest.mark.parametrize(("route", "param", "bad"), PARAM_CASES,
                         ids=[f"{r.name}-{p}-{b}" for r, p, b in PARAM_CASES])
async def test_control_characters_in_any_path_id_are_401_then_400(
        h: Harness, route: ApiRoute, param: str, bad: str) -> None:
    await h.put_instance("i1", "http://127.0.0.1:9")
    path = with_params(route, bad, param)
    if route.auth in ("admin", "cluster", "server"):
        r = await h.client.request(route.method, path, content=b"{}")
        assert_error(r, 401)
    r = await h.client.request(route.method, path, content=b'{"user": "alice"}',
                               headers=credentials(route))
    assert_error(r, 400, CODES[param])


@pytest.mark.parametrize("route", all_routes(), ids=[r.name for r in all_routes()])
@pytest.mark.parametrize("tail", ["%0A", "%0D%0A", "%00"])
async def test_a_control_character_after_a_route_is_not_that_route(
        h: Harness, route: ApiRoute, tail: str) -> None:
    """``/v1/rooms/lobby/connect%0A`` is not ``connect`` (it was a 200), ``/healthz%0A`` not healthz."""
    await h.put_instance("i1", "http://127.0.0.1:9")
    path = with_params(route) + tail
    if path.startswith(("/v1/admin/", "/v1/internal/")):
        assert_error(await h.client.request(route.method, path, content=b"{}"), 401)
    r = await h.client.request(route.method, path, content=b'{"user": "alice"}',
                               headers=credentials(route))
    assert_error(r, 400)


async def test_the_issue_examples(h: Harness) -> None:
    await h.put_instance("i1", "http://127.0.0.1:9")
    assert_error(await h.client.post("/v1/rooms/a%0Ab/connect", json={"user": "a"}), 400,
                 "invalid_room")
    assert_error(await h.client.get("/v1/admin/rooms/a%0Ab"), 401)
    assert_error(await h.client.get("/v1/admin/rooms/a%0Ab", headers=ADMIN), 400, "invalid_room")
    assert_error(await h.client.post("/v1/rooms/lobby/connect%0A", json={"user": "a"}), 400,
                 "invalid_path")
    assert_error(await h.client.get("/v1/admin/instances/i1%0A", headers=ADMIN), 400,
                 "invalid_instance")
    assert (await h.client.get("/v1/admin/instances/i1", headers=ADMIN)).status_code == 200
    assert_error(await h.client.get("/static/index.html%0A"), 400, "invalid_path")
    assert_error(await h.client.get("/v1/admin/rooms?instance=i1%0A", headers=ADMIN), 400,
                 "invalid_instance")


def test_every_route_under_admin_and_internal_names_its_caller() -> None:
    """The edge checks ``ApiRoute.auth``: a route under /v1/admin or /v1/internal without it
    would serve anyone."""
    for route in all_routes():
        if route.path.startswith("/v1/admin"):
            assert route.auth == "admin", route.name
        elif route.path.startswith("/v1/internal"):
            assert route.auth == "cluster", route.name
        elif route.name == "publish":
            assert route.auth == "server", route.name
        else:
            assert route.auth in ("none", "client"), route.name


GUARDED = [r for r in all_routes() if r.auth in ("admin", "cluster", "server")]


@pytest.mark.parametrize("route", GUARDED, ids=[r.name for r in GUARDED])
async def test_every_guarded_route_refuses_a_caller_without_its_credentials(
        h: Harness, route: ApiRoute) -> None:
    """No credentials, and the other kind's credentials: 401 before the handler runs
    (nothing is read, nothing changes)."""
    await h.put_instance("i1", "http://127.0.0.1:9")
    before = (await h.client.get("/v1/admin/instances/i1", headers=ADMIN)).json()
    other = ADMIN if route.auth == "cluster" else cluster_headers("i1")
    for headers in ({}, other, {"Authorization": "Bearer wrong"}):
        r = await h.client.request(route.method, with_params(route), headers=headers,
                                   content=b'{"to": "i1", "internal_url": "http://127.0.0.1:9"}')
        assert_error(r, 401)
    after = (await h.client.get("/v1/admin/instances/i1", headers=ADMIN)).json()
    assert after["state"] == before["state"] and after["capacity"] == before["capacity"]
