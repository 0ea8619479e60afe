"""Fixtures for the shard tests: an in-process shard against the directory double."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from roomshard.config import ShardConfig
from roomshard.store.messages import MessageStore
from roomshard.testing.timing import await_until, t
from roomshard.wire.tickets import Signer
from shard.directory_client import DirectoryClient
from shard.server import ShardServer
from tests.shard.fakedir import SECRET, FakeDirectory

BASE_CFG = ShardConfig(instance="i1", port=0, directory_url="http://directory.test",
                       cluster_secret=SECRET, heartbeat_interval=0.1, lease=1.0)


@dataclass
class Harness:
    server: ShardServer
    fake: FakeDirectory

    @property
    def ws_base(self) -> str:
        return self.server.url.replace("http://", "ws://")

    def url(self, room: str, user: str, *, since: int | None = None, **ticket_kw) -> str:
        url = f"{self.ws_base}/i1/room/{room}?ticket={self.fake.ticket(room, user, **ticket_kw)}"
        return url if since is None else f"{url}&since={since}"

    async def join(self, room: str, user: str, **kw) -> tuple[ClientConnection, dict]:
        """Connect and return the socket and its welcome."""
        ws = await connect(self.url(room, user, **kw), open_timeout=t(5))
        return ws, await recv_json(ws)


async def recv_json(ws: ClientConnection, timeout: float = 5) -> dict:
    import asyncio

    return orjson.loads(await asyncio.wait_for(ws.recv(), t(timeout)))


async def recv_until(ws: ClientConnection, kind: str, timeout: float = 5) -> dict:
    """Skip frames (presence, messages) until one of ``kind`` arrives."""
    while True:
        msg = await recv_json(ws, timeout)
        if msg["type"] == kind:
            return msg


async def close_code(ws: ClientConnection, timeout: float = 5) -> int | None:
    """Read until the server closes; the close code it sent."""
    import asyncio

    try:
        while True:
            await asyncio.wait_for(ws.recv(), t(timeout))
    except websockets.ConnectionClosed:
        pass
    return ws.close_code


async def start_shard(fake: FakeDirectory, *, store: MessageStore | None = None,
                      **overrides) -> ShardServer:
    cfg = dataclasses.replace(BASE_CFG, **overrides)
    directory = DirectoryClient(cfg.directory_url, cfg.instance, Signer([SECRET]),
                                transport=fake.transport())
    server = ShardServer(cfg, directory, store=store)
    await server.start()
    await await_until(server.ready, 5, "the shard to register")
    return server


@pytest.fixture
def shard_overrides() -> dict:
    """Per-test ShardConfig overrides (parametrize or override this fixture)."""
    return {}


@pytest.fixture
async def shard(shard_overrides: dict) -> AsyncIterator[Harness]:
    """An in-process shard registered with the directory double."""
    fake = FakeDirectory()
    server = await start_shard(fake, **shard_overrides)
    try:
        yield Harness(server, fake)
    finally:
        await server.shutdown()
