"""Real `roomshard directory` processes on loopback: atomic placement across replicas on one
PostgreSQL, database outage and healing, heartbeat expiry, start-up errors, clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from roomshard.testing.pg import PgServer
from roomshard.testing.procs import TEST_ADMIN_TOKEN, TEST_CLUSTER_SECRET, Procs
from roomshard.testing.timing import await_until, t
from roomshard.wire.tickets import Signer

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
pytestmark = pytest.mark.e2e


async def register(client: httpx.AsyncClient, base: str, *ids: str, boot_id: str = "b1") -> None:
    """Register instances as shards do (one heartbeat each): only those get rooms."""
    for iid in ids:
        token = Signer([TEST_CLUSTER_SECRET]).cluster_token(iid, to="directory", now=time.time())
        r = await client.put(f"{base}/v1/internal/instances/{iid}/heartbeat",
                             headers={"Authorization": f"Bearer {token}"},
                             json={"internal_url": f"http://127.0.0.1:9/{iid}", "boot_id": boot_id})
        assert r.status_code == 200, r.text


@pytest.mark.postgres
async def test_sixty_concurrent_first_connects_across_two_replicas(procs: Procs, pg_url: str) -> None:
    """60 concurrent first connects per room, spread over 2 directories on one PostgreSQL, agree on instance and epoch."""
    # The instances heartbeat once: keep them alive for the whole test.
    env = {"ROOMSHARD_DOWN_AFTER": "600"}
    a = procs.directory("dir-a", database_url=pg_url, env=env)
    b = procs.directory("dir-b", database_url=pg_url, env=env)
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=t(30), limits=limits) as client:
        await register(client, a.url, "i1", "i2", "i3")
        for room in ("race-1", "race-2", "race-3"):
            replies = await asyncio.gather(*(
                client.post(f"{(a, b)[n % 2].url}/v1/rooms/{room}/connect", json={"user": f"u{n}"})
                for n in range(60)))
            assert {r.status_code for r in replies} == {200}, [r.text for r in replies][:3]
            assert len({(r.json()["instance"], r.json()["epoch"]) for r in replies}) == 1
        instances = (await client.get(f"{b.url}/v1/admin/instances", headers=ADMIN)).json()
        assert sum(i["rooms_assigned"] for i in instances["instances"]) == 3
        rooms = (await client.get(f"{a.url}/v1/admin/rooms", headers=ADMIN)).json()["rooms"]
        assert sorted(r["room"] for r in rooms) == ["race-1", "race-2", "race-3"]
        assert {r["epoch"] for r in rooms} == {1}


async def _counts(client: httpx.AsyncClient, base: str) -> dict[str, int]:
    listed = (await client.get(f"{base}/v1/admin/instances", headers=ADMIN)).json()["instances"]
    return {i["id"]: i["rooms_assigned"] for i in listed}


async def _owners(client: httpx.AsyncClient, base: str) -> dict[str, int]:
    rooms = (await client.get(f"{base}/v1/admin/rooms?limit=1000", headers=ADMIN)).json()["rooms"]
    return {iid: sum(1 for r in rooms if r["instance"] == iid) for iid in {r["instance"] for r in rooms}}


@pytest.mark.postgres
async def test_room_counts_stay_exact_under_concurrent_new_rooms_and_restarts(
        procs: Procs, pg_url: str) -> None:
    """PostgreSQL counts new rooms in per-backend slots (migration 0006): 200 new rooms at
    once over two replicas are each counted once, a restart's recount folds the slots in
    without counting twice, removals count down, and a deleted instance's slots go with it."""
    env = {"ROOMSHARD_DOWN_AFTER": "600", "ROOMSHARD_ROOM_CREATE_RATE": "0"}
    a = procs.directory("dir-a", database_url=pg_url, env=env)
    b = procs.directory("dir-b", database_url=pg_url, env=env)
    async with httpx.AsyncClient(timeout=t(30), limits=httpx.Limits(max_connections=250)) as client:
        await register(client, a.url, "i1", "i2")
        replies = await asyncio.gather(*(
            client.post(f"{(a, b)[n % 2].url}/v1/rooms/count-{n}/connect", json={"user": f"u{n}"})
            for n in range(200)))
        assert {r.status_code for r in replies} == {200}, [r.text for r in replies][:3]
        owners = await _owners(client, a.url)
        assert sum(owners.values()) == 200 and owners.keys() == {"i1", "i2"}
        assert await _counts(client, a.url) == owners == await _counts(client, b.url)

        procs.terminate(b)  # its start-up recount folds the slots into the instances' rows
        b = procs.restart(b)
        assert await _counts(client, b.url) == owners
        # ... and placements after the fold count on top of it.
        assert (await client.post(f"{a.url}/v1/rooms/count-200/connect",
                                  json={"user": "u"})).status_code == 200
        assert sum((await _counts(client, b.url)).values()) == 201

        # i3 gets new rooms (slots), loses them to the unused-room sweep (its row's count),
        # is deleted, and comes back: at 0, not at its old slots' sum.
        c = procs.directory("dir-c", database_url=pg_url,
                            env={**env, "ROOMSHARD_ROOM_UNUSED_TTL": "1"})
        for iid in ("i1", "i2"):
            r = await client.put(f"{c.url}/v1/admin/instances/{iid}", headers=ADMIN,
                                 json={"state": "disabled"})
            assert r.status_code == 200, r.text
        await register(client, c.url, "i3")
        for n in range(5):
            r = await client.post(f"{a.url}/v1/rooms/gone-{n}/connect", json={"user": "u"})
            assert r.json()["instance"] == "i3", r.text
        assert (await _counts(client, c.url))["i3"] == 5

        async def swept() -> bool:
            return (await _counts(client, c.url)) == {"i1": 0, "i2": 0, "i3": 0}

        await await_until(swept, 10, "the sweep removes every room nobody joined")
        r = await client.delete(f"{c.url}/v1/admin/instances/i3", headers=ADMIN)
        assert r.status_code == 200, r.text
        await register(client, c.url, "i3", boot_id="b2")  # a new process: b1 was retired
        assert (await _counts(client, b.url))["i3"] == 0


@pytest.mark.postgres
async def test_database_outage_is_503_and_heals_without_restart(procs: Procs, pg_server: PgServer,
                                                                pg_url: str) -> None:
    """With PostgreSQL stopped the directory answers 503 database_unavailable + Retry-After; it heals once PG is back."""
    d = procs.directory(database_url=pg_url, env={"ROOMSHARD_DOWN_AFTER": "600"})
    async with httpx.AsyncClient(timeout=t(30)) as client:
        await register(client, d.url, "i1")
        assert (await client.post(f"{d.url}/v1/rooms/r/connect", json={"user": "a"})).status_code == 200
        pg_server.stop()
        try:
            for path, method in (("/v1/rooms/r/connect", "POST"), ("/readyz", "GET"),
                                 ("/v1/admin/instances", "GET")):
                r = await client.request(method, f"{d.url}{path}", json={"user": "a"}, headers=ADMIN)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "database_unavailable"
                assert int(r.headers["retry-after"]) >= 1
            assert (await client.get(f"{d.url}/healthz")).status_code == 200
        finally:
            pg_server.start()

        async def connect_ok() -> bool:
            r = await client.post(f"{d.url}/v1/rooms/r/connect", json={"user": "a"})
            return r.status_code == 200 and r.json()["instance"] == "i1"

        await await_until(connect_ok, 30, "the directory to heal after PostgreSQL came back")
        assert (await client.get(f"{d.url}/readyz")).status_code == 200
    assert d.popen.poll() is None


async def test_heartbeat_then_down_after_silence(procs: Procs) -> None:
    """A shard that stops heartbeating reads as down once down_after passes (real clock, small values)."""
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "0.5"})
    signer = Signer([TEST_CLUSTER_SECRET])
    async with httpx.AsyncClient(timeout=t(10)) as client:
        import time

        token = signer.cluster_token("i1", to="directory", now=time.time())
        r = await client.put(f"{d.url}/v1/internal/instances/i1/heartbeat",
                             headers={"Authorization": f"Bearer {token}"},
                             json={"internal_url": "http://127.0.0.1:9", "boot_id": "x"})
        assert r.status_code == 200 and r.json()["down_after"] == 0.5
        assert r.json()["instance"]["state"] == "active"

        async def is_down() -> bool:
            r = await client.get(f"{d.url}/v1/admin/instances/i1", headers=ADMIN)
            return bool(r.json()["state"] == "down")

        await await_until(is_down, 10, "i1 to be down")
        r = await client.post(f"{d.url}/v1/rooms/r/connect", json={"user": "a"})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "no_instance_available")


BAD_SETTINGS = [
    ({"ROOMSHARD_AUTH": "maybe"}, "ROOMSHARD_AUTH"),
    ({"ROOMSHARD_AUTH": "jwt"}, "ROOMSHARD_JWT_SECRET"),
    ({"ROOMSHARD_AUTH": "jwt", "ROOMSHARD_JWT_PUBLIC_KEY": "not a pem"}, "ROOMSHARD_JWT_PUBLIC_KEY"),
    ({"ROOMSHARD_DATABASE_URL": "mysql://db/x"}, "ROOMSHARD_DATABASE_URL"),
    ({"ROOMSHARD_DATABASE_URL": "postgresql://127.0.0.1:1/nope"}, "ROOMSHARD_DATABASE_URL"),
    ({"ROOMSHARD_DATABASE_URL": "sqlite:////nonexistent-dir/x/y.db"}, "ROOMSHARD_DATABASE_URL"),
    ({"ROOMSHARD_TICKET_TTL": "soon"}, "ROOMSHARD_TICKET_TTL"),
    ({"ROOMSHARD_ADMIN_TOKEN": ""}, "ROOMSHARD_ADMIN_TOKEN"),
    ({"ROOMSHARD_LOG_LEVEL": "loud"}, "ROOMSHARD_LOG_LEVEL"),
    ({"ROOMSHARD_PUBLIC_URL": "chat.example.com"}, "ROOMSHARD_PUBLIC_URL"),
]


@pytest.mark.parametrize(("env", "names"), BAD_SETTINGS, ids=[str(e) for e, _ in BAD_SETTINGS])
def test_bad_setting_stops_startup_with_one_line(tmp_path: Any, env: dict[str, str],
                                                 names: str) -> None:
    """A missing or invalid setting exits 2 with one line naming it, no traceback."""
    full = {**os.environ, "ROOMSHARD_ADMIN_TOKEN": "a", "ROOMSHARD_CLUSTER_SECRET": "s",
            "ROOMSHARD_AUTH": "open",
            "ROOMSHARD_DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}", **env}
    proc = subprocess.run([sys.executable, "-m", "roomshard", "directory", "--port", "0"], check=False,
                          env=full, capture_output=True, text=True, timeout=t(60))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert names in lines[0] and "Traceback" not in proc.stderr


def test_sigterm_and_sigint_stop_cleanly(procs: Procs) -> None:
    """The process logs its listening line, and SIGTERM or SIGINT stops it with exit 0."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        d = procs.directory(f"dir-{sig.name}")
        assert f"roomshard directory listening on {d.url}" in d.output()
        os.killpg(d.popen.pid, sig)
        assert d.popen.wait(timeout=t(20)) == 0
        assert "Traceback" not in d.output()
