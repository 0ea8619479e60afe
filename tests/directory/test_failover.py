"""A dead shard process is found at once (``directory.ops.failover``), and only a dead one.

Real processes: a directory with ``down_after`` 600 s (so a lapsed heartbeat
can never explain what these tests see) and shards that hold their control
channels. A SIGKILLed shard is ``down`` within a second and its rooms are
placed again at a higher epoch; a stopped (SIGSTOP) shard, whose sockets stay
open, is not parked; a clean shutdown is not a death.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import exc as sa_exc

from roomshard.testing.metrics import sample
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Proc, Procs
from roomshard.testing.timing import await_until, t
from tests.directory.conftest import Harness

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


async def _instances(http: httpx.AsyncClient, base: str) -> dict[str, dict[str, Any]]:
    listed = (await http.get(f"{base}/v1/admin/instances", headers=ADMIN)).json()["instances"]
    return {i["id"]: i for i in listed}



async def _cluster(procs: Procs, database_url: str | None = None) -> tuple[Proc, dict[str, Proc]]:
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600"}, database_url=database_url)
    shards = {i: procs.shard(i, d.url) for i in ("i1", "i2")}
    async with httpx.AsyncClient(timeout=t(10)) as http:
        async def both_active() -> bool:
            found = await _instances(http, d.url)
            return all(found.get(i, {}).get("state") == "active" for i in shards)
        await await_until(both_active, t(30), "both shards active")
    return d, shards


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


async def test_a_killed_shard_is_down_at_once_and_its_rooms_placed_again(
        procs: Procs, database_url: str | None) -> None:
    d, shards = await _cluster(procs, database_url)
    async with httpx.AsyncClient(timeout=t(10)) as http:
        rooms = [f"fo{n}" for n in range(20)]
        placed = {r: (await http.post(f"{d.url}/v1/rooms/{r}/connect", json={"user": "u"})).json()
                  for r in rooms}
        first = placed["fo0"]
        victim, other = first["instance"], ({"i1", "i2"} - {first["instance"]}).pop()
        killed = time.monotonic()
        procs.kill(shards[victim])

        async def down() -> bool:
            return (await _instances(http, d.url))[victim]["state"] == "down"

        await await_until(down, t(5), f"{victim} down")
        took = time.monotonic() - killed
        listed = (await _instances(http, d.url))[victim]
        assert listed["state_reason"] == "died", listed


        async def emptied() -> bool:  # its rooms are re-placed at once, not by each connect
            return (await _instances(http, d.url))[victim]["rooms_assigned"] == 0

        await await_until(emptied, t(5), f"{victim}'s rooms re-placed")
        for room, before in placed.items():
            row = (await http.get(f"{d.url}/v1/admin/rooms/{room}", headers=ADMIN)).json()
            if before["instance"] == victim:
                assert (row["instance"], row["epoch"]) == (other, before["epoch"] + 1), row
            else:
                assert (row["instance"], row["epoch"]) == (other, before["epoch"]), row
        again = await http.post(f"{d.url}/v1/rooms/fo0/connect", json={"user": "u"})
        assert again.status_code == 200, again.text
        assert (again.json()["instance"], again.json()["epoch"]) == (other, first["epoch"] + 1)
        metrics = (await http.get(f"{d.url}/metrics")).text
    assert took < t(2), f"found down after {took:.2f} s"
    assert sample(metrics, 'roomshard_directory_failovers_total{evidence="channel_closed"}') == 1.0
    assert sample(metrics, 'roomshard_directory_channel_checks_total{found="gone"}') == 1.0
    assert f"{victim} is down: its process" in d.output()


async def test_a_restarted_shard_takes_its_instance_back(procs: Procs) -> None:
    d, shards = await _cluster(procs)
    async with httpx.AsyncClient(timeout=t(10)) as http:
        procs.kill(shards["i1"])

        async def state(want: str) -> bool:
            return (await _instances(http, d.url))["i1"]["state"] == want

        await await_until(lambda: state("down"), t(5), "i1 down")
        procs.shard("i1", d.url)  # a new process (new boot id): active again at its heartbeat
        await await_until(lambda: state("active"), t(30), "i1 active again")
        assert (await _instances(http, d.url))["i1"]["state_reason"] is None


async def test_a_stopped_shard_is_not_parked_and_a_clean_stop_is_no_death(procs: Procs) -> None:
    """SIGSTOP keeps its sockets open: nothing closes, nothing is parked (the lease and
    down_after handle a silent shard). A SIGTERM leaves cleanly before the channel
    closes: checked, found gone, not parked as died."""
    d, shards = await _cluster(procs)
    async with httpx.AsyncClient(timeout=t(10)) as http:
        os.kill(shards["i1"].popen.pid, signal.SIGSTOP)
        try:
            procs.terminate(shards["i2"])  # clean: leave, then exit
            async def checked() -> bool:
                text = (await http.get(f"{d.url}/metrics")).text
                return sample(text, 'roomshard_directory_channel_checks_total{found="gone"}') == 1
            await await_until(checked, t(10), "i2's closed channel checked")
            found = await _instances(http, d.url)
            metrics = (await http.get(f"{d.url}/metrics")).text
        finally:
            os.kill(shards["i1"].popen.pid, signal.SIGCONT)
    assert (found["i2"]["state"], found["i2"]["state_reason"]) == ("disabled", "shutdown")
    assert found["i1"]["state"] == "active", found["i1"]  # stopped, not closed: not parked
    assert sample(metrics, 'roomshard_directory_failovers_total{evidence="channel_closed"}') == 0


async def test_a_database_error_during_the_check_is_logged_not_raised(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """The check of a closed channel meets a failing database: nothing is parked, the
    channel's handler ends quietly (one warning, no traceback), the lease decides."""
    failover = h.app.state.ctx.failover

    async def down(instance: str) -> None:
        raise sa_exc.OperationalError("SELECT", None, OSError("connection refused"))

    failover.store.get_instance = down
    assert await failover.channel_closed("i1", "boot-1") is False
    assert "checking it (its control channel closed) failed" in caplog.text and "Traceback" not in caplog.text
