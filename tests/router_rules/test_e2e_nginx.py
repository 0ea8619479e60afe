"""End to end: a chat through nginx (rules generated from the live registry) reaches the owning shard."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import await_until, t
from router_rules.nginx import render_nginx
from tests.router_rules.nginx_proc import Nginx, free_port

pytestmark = [pytest.mark.nginx, pytest.mark.e2e]


async def _recv_type(ws, kind: str) -> dict:
    """The next frame of type ``kind`` (presence frames may come in between)."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), t(10)))
        if frame["type"] == kind:
            return frame


async def test_chat_through_nginx_reaches_the_owning_shard(procs: Procs, tmp_path: Path):
    """Directory + 2 shards: rules from GET /v1/admin/instances; each room's URL works via nginx."""
    port = free_port()
    public = f"ws://127.0.0.1:{port}"
    directory = procs.directory(env={"ROOMSHARD_PUBLIC_URL": public})
    for name in ("i1", "i2"):
        procs.shard(name, directory.url)
    admin = httpx.AsyncClient(base_url=directory.url, timeout=t(5),
                              headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"})

    async def both_active() -> bool:
        doc = (await admin.get("/v1/admin/instances")).json()
        return sorted(i["id"] for i in doc["instances"] if i["state"] == "active") == ["i1", "i2"]

    async with admin:
        await await_until(both_active, 30, "both shards registered and active")
        registry = (await admin.get("/v1/admin/instances")).json()

    nginx = Nginx(tmp_path)
    try:
        include = tmp_path / "roomshard.conf"
        include.write_text(render_nginx(registry["instances"], listen=f"127.0.0.1:{port}",
                                        directory_url=directory.url))
        check = nginx.check(include)
        assert check.returncode == 0, check.stderr
        nginx.start(include, port)

        seen: set[str] = set()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=t(10)) as http:
            for i in range(8):  # least-loaded placement spreads new rooms over both shards
                room = f"room-{i}"
                tickets = []
                for user in ("alice", "bob"):
                    resp = await http.post(f"/v1/rooms/{room}/connect", json={"user": user})
                    assert resp.status_code == 200, resp.text
                    tickets.append(resp.json())
                assert tickets[0]["url"].startswith(f"{public}/{tickets[0]['instance']}/room/{room}?")
                async with connect(tickets[0]["url"], open_timeout=t(10)) as alice, \
                        connect(tickets[1]["url"], open_timeout=t(10)) as bob:
                    welcome = await _recv_type(alice, "welcome")
                    assert welcome["instance"] == tickets[0]["instance"]
                    await _recv_type(bob, "welcome")
                    await alice.send(json.dumps({"type": "send", "id": f"m{i}", "text": f"hi {room}"}))
                    ack = await _recv_type(alice, "ack")
                    got = await _recv_type(bob, "message")
                    assert (got["user"], got["text"], got["seq"]) == ("alice", f"hi {room}", ack["seq"])
                seen.add(tickets[0]["instance"])
        assert seen == {"i1", "i2"}
    finally:
        nginx.stop()
