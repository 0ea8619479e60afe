"""Instance numbers claimed at once over two replicas of one PostgreSQL database, each
claim sent several times at once (a shard retrying a claim it got no answer to): every
process gets one number, the same in every answer, and the numbers are the lowest ones."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from roomshard.wire import internal
from tests.directory.conftest import ADMIN, cluster_headers

pytestmark = pytest.mark.postgres

PROCESSES = 8
COPIES = 4  # each claim sent this many times at once, over both replicas


@pytest.fixture
def db_url(directory_pg_url: str) -> str:
    return directory_pg_url


async def test_claims_sent_again_at_once_get_one_number_per_process(
        harness_factory: Callable[..., Any]) -> None:
    async with AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(harness_factory()) for _ in range(2)]

        async def claim(n: int, copy: int) -> str:
            h = replicas[(n + copy) % 2]
            r = await h.client.post("/v1/internal/instances",
                                    headers=cluster_headers(internal.UNNUMBERED, h.clock.now),
                                    json={"internal_url": f"http://10.0.0.{n}:8081",
                                          "boot_id": f"p{n}"})
            assert r.status_code == 200, r.text
            return str(r.json()["instance"]["id"])

        got = await asyncio.gather(*(claim(n, c) for n in range(PROCESSES) for c in range(COPIES)))
        by_process = [set(got[n * COPIES:(n + 1) * COPIES]) for n in range(PROCESSES)]
        assert all(len(ids) == 1 for ids in by_process), by_process
        assert sorted(ids.pop() for ids in by_process) == sorted(
            f"i{n}" for n in range(1, PROCESSES + 1))
        listed = (await replicas[0].client.get("/v1/admin/instances", headers=ADMIN)).json()
        assert len(listed["instances"]) == PROCESSES
