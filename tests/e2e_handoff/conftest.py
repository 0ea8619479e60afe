"""A real cluster for handoff tests: one ``roomshard directory`` and N ``roomshard shard`` processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from roomshard.testing.procs import TEST_ADMIN_TOKEN, TEST_CLUSTER_SECRET, Proc, Procs
from roomshard.testing.timing import t, wait_until
from roomshard.wire.tickets import DIRECTORY, Signer

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
# Heartbeats every 0.5 s, lease 3 s, down after 4.5 s: a crash is noticed quickly, and a
# loaded 2-core machine still renews every lease.
# One test process runs every client: with thousands of them its pongs can come late, and
# these tests are not about dead peers, so the shards ping rarely.
SHARD_ENV = {"ROOMSHARD_HEARTBEAT_INTERVAL": "0.5", "ROOMSHARD_LEASE": "3",
             "ROOMSHARD_SHUTDOWN_TIMEOUT": "8", "ROOMSHARD_PING_INTERVAL": "120",
             "ROOMSHARD_PING_TIMEOUT": "120"}
DIRECTORY_ENV = {"ROOMSHARD_DOWN_AFTER": "4.5"}


def directory_auth(shard_url: str) -> dict[str, str]:
    """The directory's cluster-token header for the shard at ``shard_url`` (whose
    instance id its ``/healthz`` names: a token is valid on that instance only)."""
    instance = httpx.get(f"{shard_url}/healthz", timeout=t(5)).json()["instance"]
    token = Signer([TEST_CLUSTER_SECRET]).cluster_token(DIRECTORY, to=instance, now=time.time())
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Cluster:
    procs: Procs
    directory: Proc
    shards: dict[str, Proc] = field(default_factory=dict)
    shard_env: dict[str, str] = field(default_factory=dict)  # on top of SHARD_ENV

    @property
    def url(self) -> str:
        return self.directory.url

    def admin(self, method: str, path: str, body: Any = None, timeout: float = 60) -> httpx.Response:
        return httpx.request(method, self.url + path, json=body, headers=ADMIN, timeout=t(timeout))

    def add_shard(self, instance: str) -> Proc:
        self.shards[instance] = self.procs.shard(instance, self.url,
                                                 env={**SHARD_ENV, **self.shard_env})
        return self.shards[instance]

    def states(self) -> dict[str, str]:
        body = self.admin("GET", "/v1/admin/instances").json()
        return {i["id"]: i["state"] for i in body["instances"]}

    def wait_state(self, instance: str, state: str, timeout: float = 15) -> None:
        wait_until(lambda: self.states().get(instance) == state, timeout,
                   f"{instance} to be {state}", poll=0.1)

    def room(self, room: str) -> dict[str, Any]:
        return self.admin("GET", f"/v1/admin/rooms/{room}").json()

    def restart_directory(self) -> None:
        self.directory = self.procs.restart(self.directory)


def start_cluster(procs: Procs, shards: int, shard_env: dict[str, str] | None = None,
                  **_: Any) -> Cluster:
    directory = procs.directory(env=DIRECTORY_ENV)
    cluster = Cluster(procs, directory, shard_env=shard_env or {})
    for n in range(1, shards + 1):
        cluster.add_shard(f"i{n}")
    return cluster


@pytest.fixture
def cluster(procs: Procs) -> Iterator[Cluster]:
    yield start_cluster(procs, 3)
