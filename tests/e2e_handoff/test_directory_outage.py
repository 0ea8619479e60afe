"""A short directory outage (a restart, a stalled loop) costs no room its state.

Default intervals (heartbeat 2 s, lease 6 s, down after 10 s): the shard
retries a failed heartbeat within ~0.25 s, so a directory restart shorter
than the lease is not even noticed by the members; a directory stalled for
longer than the lease makes the shard stop serving (1001), but the rooms'
state is kept and confirmed by the directory afterwards, so members resume
with ``recovered: true`` and no acked message is lost.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.pg import free_port
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import ADMIN


async def _chat(directory_url: str, http: httpx.AsyncClient, n: int = 3) -> list[Chatter]:
    return await start_chatting([Chatter(directory_url, "r", f"u{k}", http) for k in range(n)])


async def _finish(chatters: list[Chatter]) -> None:
    for c in chatters:
        await c.send()
    await await_until(lambda: all(not c.unacked for c in chatters), 30, "acks after the outage")
    await await_until(lambda: all(len(c.log) == len(chatters[0].log) for c in chatters), 10,
                      "every member has every message")
    for c in chatters:
        await c.stop()
    assert check_logs(chatters) == []
    for c in chatters:
        assert all(w.recovered is not False for w in c.welcomes), c.welcomes


async def _just_after_a_heartbeat(directory_url: str, http: httpx.AsyncClient) -> None:
    """Return right after the directory recorded a heartbeat of i1 (the lease is fresh)."""
    async def last() -> str:
        r = await http.get(f"{directory_url}/v1/admin/instances", headers=ADMIN)
        return r.json()["instances"][0]["last_heartbeat"]

    before = await last()
    deadline = asyncio.get_running_loop().time() + t(10)
    while (await last()) == before:
        assert asyncio.get_running_loop().time() < deadline, "no heartbeat within 10 s"


async def test_directory_restart_shorter_than_the_lease_drops_nothing(procs: Procs) -> None:
    port = free_port()
    directory = procs.directory(extra=["--port", str(port)])
    shard = procs.shard("i1", directory.url)
    async with httpx.AsyncClient(timeout=t(5)) as http:
        chatters = await _chat(directory.url, http)
        await _just_after_a_heartbeat(directory.url, http)
        procs.kill(directory)
        await asyncio.sleep(3.3)  # the outage itself: the directory is down this long
        directory = procs.restart(directory)
        await _finish(chatters)
        # Nobody was disconnected: the shard never lost its lease.
        assert all(len(c.welcomes) == 1 for c in chatters), [c.welcomes for c in chatters]
    assert "lease lost" not in shard.output()


@pytest.mark.parametrize("outage", ["stall", "restart"])
async def test_directory_outage_longer_than_the_lease_keeps_the_rooms(procs: Procs,
                                                                        outage: str) -> None:
    """SIGSTOP (a loop stalled by a huge request) or SIGKILL + restart, past the lease."""
    directory = procs.directory(extra=["--port", str(free_port())])
    shard = procs.shard("i1", directory.url)
    async with httpx.AsyncClient(timeout=t(5)) as http:
        chatters = await _chat(directory.url, http)
        seq_before = chatters[0].last_seq
        if outage == "stall":
            os.killpg(directory.popen.pid, signal.SIGSTOP)
        else:
            procs.kill(directory)
        try:
            await await_until(lambda: "lease lost" in shard.output(), 15, "the shard to fence")
        finally:
            if outage == "stall":
                os.killpg(directory.popen.pid, signal.SIGCONT)
            else:
                directory = procs.restart(directory)
        await await_until(lambda: all(len(c.welcomes) >= 2 for c in chatters), 30,
                          "members back after the outage")
        await _finish(chatters)
        # They came back into the same room state: resumed, same era of seqs.
        assert all(c.welcomes[-1].recovered is True for c in chatters), \
            [c.welcomes for c in chatters]
        assert chatters[0].last_seq == seq_before + len(chatters)
    assert "confirmed 1 kept rooms, 0 were placed elsewhere" in shard.output()
    if outage == "stall":  # and the directory knew not to trust its heartbeat ages
        assert "the event loop stalled" in directory.output()
