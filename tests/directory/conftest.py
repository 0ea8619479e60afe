"""Directory test fixtures: a database per test (SQLite file or PostgreSQL) and in-process apps."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from directory.app import create_app
from roomshard.config import DirectoryConfig
from roomshard.testing.procs import TEST_ADMIN_TOKEN, TEST_CLUSTER_SECRET
from roomshard.testing.timing import await_until
from roomshard.wire.tickets import Signer

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
T0 = 1_800_000_000.0


class Clock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database with the directory's schema at head (a copy of a template
    migrated once a session: the directory's start-up finds nothing to migrate;
    ``test_migrations`` runs the migrations on empty databases): an SQLite file, or a
    PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "directory.db"
        shutil.copyfile(request.getfixturevalue("directory_sqlite_template"), path)
        return f"sqlite+aiosqlite:///{path}"
    return str(request.getfixturevalue("directory_pg_url"))


def make_cfg(db_url: str, **overrides: Any) -> DirectoryConfig:
    # Two warmed (and primed) PostgreSQL connections, not the production 30: the
    # warm-up and its priming still run in every test, at a fifth of the start-up time
    # (test_pool_warm starts processes with the setting as shipped).
    base = {"database_url": db_url, "admin_token": TEST_ADMIN_TOKEN, "auth": "open",
            "cluster_secret": TEST_CLUSTER_SECRET, "down_after": 10.0,
            "database_pool_warm": 2}
    base.update(overrides)
    return DirectoryConfig(**base)


def cluster_headers(subject: str, now: float = T0) -> dict[str, str]:
    token = Signer([TEST_CLUSTER_SECRET]).cluster_token(subject, to="directory", now=now)
    return {"Authorization": f"Bearer {token}"}


@dataclasses.dataclass
class Harness:
    """One in-process directory app and an httpx client to it."""

    client: httpx.AsyncClient
    clock: Clock
    cfg: DirectoryConfig
    app: Any

    async def put_instance(self, iid: str, url: str | None = None, **body: Any) -> dict[str, Any]:
        if url is not None:
            body["internal_url"] = url
        r = await self.client.put(f"/v1/admin/instances/{iid}", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def heartbeat(self, iid: str, *, boot_id: str = "boot-1", url: str | None = None,
                        **extra: Any) -> httpx.Response:
        body = {"internal_url": url or f"http://shard-{iid}.test", "boot_id": boot_id, **extra}
        return await self.client.put(f"/v1/internal/instances/{iid}/heartbeat", json=body,
                                     headers=cluster_headers(iid, self.clock.now))

    async def placement_sees(self, *active: str) -> None:
        """Wait until this replica's placement would choose among exactly ``active``
        (PostgreSQL: its room cache's view hears of a new instance by notification, a
        moment after the heartbeat's answer, and places on the instances it knows
        meanwhile: valid, but not the spread a test of the spread expects)."""
        cache = self.app.state.ctx.store.cache
        if cache is None:
            return

        def seen() -> bool:
            view = cache.placement_view()
            return view is not None and sorted(
                i["id"] for i in view if i["state"] == "active") == sorted(active)

        await await_until(seen, 10, f"the placement view to show {active}")

    async def connect(self, room: str, user: str = "alice", **kw: Any) -> httpx.Response:
        return await self.client.post(f"/v1/rooms/{room}/connect", json={"user": user}, **kw)


@asynccontextmanager
async def running(cfg: DirectoryConfig, clock: Clock | None = None,
                  shard_transport: httpx.AsyncBaseTransport | None = None) -> AsyncIterator[Harness]:
    clock = clock or Clock()
    app = create_app(cfg, clock=clock, shard_transport=shard_transport)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://directory.test") as c:
            yield Harness(c, clock, cfg, app)


@pytest.fixture
def harness_factory(db_url: str) -> Callable[..., Any]:
    """``async with harness_factory(**cfg_overrides) as h`` runs an app on this test's database."""

    def factory(clock: Clock | None = None, shard_transport: Any = None, **overrides: Any) -> Any:
        return running(make_cfg(db_url, **overrides), clock, shard_transport)

    return factory


@pytest.fixture
async def h(harness_factory: Callable[..., Any]) -> AsyncIterator[Harness]:
    """A running directory app (open auth, fake clock) on this test's database."""
    async with harness_factory() as harness:
        yield harness
