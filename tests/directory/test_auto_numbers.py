"""Shards numbered by the directory (``roomshard shard`` without ``--instance``): the lowest
free number, once per process, across directory replicas; a clean stop frees it; a restart at
the same address takes it back. Real processes on loopback."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from roomshard import client
from roomshard.testing.pg import free_port
from roomshard.testing.procs import TEST_ADMIN_TOKEN, TEST_CLUSTER_SECRET, Procs
from roomshard.testing.timing import t, wait_until
from roomshard.wire.internal import UNNUMBERED
from roomshard.wire.tickets import Signer

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
pytestmark = pytest.mark.e2e


def _registry(url: str) -> dict[str, tuple[str, str | None]]:
    doc = httpx.get(f"{url}/v1/admin/instances", headers=ADMIN, timeout=t(10)).json()
    return {i["id"]: (i["state"], i["internal_url"]) for i in doc["instances"]}


@pytest.mark.postgres
async def test_concurrent_claims_over_two_replicas_get_distinct_lowest_numbers(
        procs: Procs, pg_url: str) -> None:
    a = procs.directory("dir-a", database_url=pg_url)
    b = procs.directory("dir-b", database_url=pg_url)
    signer = Signer([TEST_CLUSTER_SECRET])
    async with httpx.AsyncClient(timeout=t(30)) as http:

        async def claim(n: int) -> str:
            token = signer.cluster_token(UNNUMBERED, to="directory", now=time.time())
            r = await http.post(f"{(a, b)[n % 2].url}/v1/internal/instances",
                                headers={"Authorization": f"Bearer {token}"},
                                json={"internal_url": f"http://10.0.1.{n}:8081", "boot_id": f"p{n}"})
            assert r.status_code == 200, r.text
            return str(r.json()["instance"]["id"])

        got = await asyncio.gather(*(claim(n) for n in range(24)))
    assert sorted(got, key=lambda i: int(i[1:])) == [f"i{n}" for n in range(1, 25)]
    assert len(_registry(a.url)) == 24


def _shard(procs: Procs, name: str, directory_url: str, port: int = 0) -> None:
    procs.start(name, ["shard", "--port", str(port), "--directory-url", directory_url])


def test_numbered_shards_chat_free_their_number_on_stop_and_take_it_back_after_a_crash(
        procs: Procs) -> None:
    d = procs.directory()
    port = free_port()
    _shard(procs, "first", d.url, port)
    _shard(procs, "second", d.url)
    registry = _registry(d.url)
    assert sorted(registry) == ["i1", "i2"] and {s for s, _ in registry.values()} == {"active"}
    first = next(p for p in procs.procs if p.name == "first")
    assert "the directory numbered this shard i1" in first.output()

    async def chat(room: str) -> None:
        async with client.connect(d.url, room, "alice") as alice, \
                client.connect(d.url, room, "bob") as bob:
            seq = await alice.send("numbered")
            async for m in bob:
                if isinstance(m, client.Message):
                    assert (m.seq, m.text) == (seq, "numbered")
                    break

    for room in ("n1", "n2", "n3"):
        asyncio.run(chat(room))

    # A crash: its number waits for it; the restart at the same address takes it back.
    procs.kill(first)
    wait_until(lambda: _registry(d.url)["i1"][0] in ("down", "disabled"), 30,
               "the directory to see i1's process gone")
    _shard(procs, "first-again", d.url, port)
    again = next(p for p in procs.procs if p.name == "first-again")
    assert "the directory numbered this shard i1" in again.output()
    assert sorted(_registry(d.url)) == ["i1", "i2"]

    # A clean stop hands the rooms over and leaves the registry: i1 is free again.
    assert procs.terminate(again) == 0
    assert sorted(_registry(d.url)) == ["i2"]
    asyncio.run(chat("n1"))  # its rooms live on i2 now
    _shard(procs, "third", d.url)
    assert sorted(_registry(d.url)) == ["i1", "i2"]


def test_a_numbered_shard_told_to_remove_itself_on_stop_leaves_the_registry(procs: Procs) -> None:
    """ROOMSHARD_REMOVE_ON_STOP=on (a StatefulSet's shards): a clean stop hands the rooms
    over, then removes the instance; without it the instance stays, disabled by its stop."""
    d = procs.directory()
    kept = procs.shard("i1", d.url)
    gone = procs.shard("i2", d.url, env={"ROOMSHARD_REMOVE_ON_STOP": "on"})
    procs.shard("i3", d.url)
    assert procs.terminate(gone) == 0
    assert procs.terminate(kept) == 0
    registry = _registry(d.url)
    assert sorted(registry) == ["i1", "i3"] and registry["i1"][0] == "disabled"
    assert "drained before stopping" in gone.output()
