"""Calls from the directory to shards (``docs/INTERNALS.md``), all best effort.

The httpx transport is the seam: tests pass an ``httpx.ASGITransport`` of a
fake shard app or an ``httpx.MockTransport``; production uses the network.
Every call is short (``SHARD_CALL_TIMEOUT_S``) and never raises: an
unreachable or confused shard yields ``None`` and the caller reports the
value as unknown (``null``) instead of failing the admin request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from roomshard.wire.internal import (
    AccessBody,
    AccessResult,
    LiveLoad,
    LiveRoomAnswer,
    LiveRoomsAnswer,
)
from roomshard.wire.tickets import DIRECTORY, Signer

SHARD_CALL_TIMEOUT_S = 1.0
log = logging.getLogger("roomshard.directory.shards")

NOT_LOADED: dict[str, Any] = {"loaded": False, "connections": 0, "members": 0, "seq": None,
                              "messages_per_s": 0.0}


class ShardClient:
    def __init__(self, signer: Signer, clock: Callable[[], float],
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._signer = signer
        self._clock = clock
        self.http = httpx.AsyncClient(transport=transport, timeout=SHARD_CALL_TIMEOUT_S)

    async def aclose(self) -> None:
        await self.http.aclose()

    def headers(self, instance: str) -> dict[str, str]:
        """A fresh cluster token for one call to ``instance`` (refused by every other one)."""
        token = self._signer.cluster_token(DIRECTORY, to=instance, now=self._clock())
        return {"Authorization": "Bearer " + token}

    async def _call(self, instance: str, method: str, url: str,
                    json: Any = None) -> httpx.Response | None:
        try:
            return await self.http.request(method, url, json=json, headers=self.headers(instance))
        except httpx.HTTPError as exc:
            log.warning("shard call %s %s failed: %s", method, url, exc)
            return None

    async def room_load(self, instance: str, internal_url: str,
                        room: str) -> dict[str, Any] | None:
        """One room's live load; ``NOT_LOADED`` when the shard does not hold it in memory."""
        resp = await self._call(instance, "GET", f"{internal_url}/internal/rooms/{room}")
        if resp is None:
            return None
        if resp.status_code == 404:
            return dict(NOT_LOADED)
        return _room_load(resp)

    async def rooms_load(self, instance: str,
                         internal_url: str) -> dict[str, dict[str, Any]] | None:
        """Live load of every room the shard holds, by room id."""
        resp = await self._call(instance, "GET", f"{internal_url}/internal/rooms")
        if resp is None or resp.status_code != 200:
            return None
        try:
            answer = msgspec.json.decode(resp.content, type=LiveRoomsAnswer)
        except msgspec.DecodeError:
            return None
        return {name: _loaded(load) for name, load in answer.rooms.items()}

    async def push_access(self, instance: str, internal_url: str, room: str, private: bool,
                          members: list[str]) -> int | None:
        """Tell the owner the new access list; returns how many it closed with 4003."""
        resp = await self._call(instance, "POST", f"{internal_url}/internal/rooms/{room}/access",
                                json=msgspec.to_builtins(AccessBody(private=private,
                                                                    members=members)))
        if resp is None or resp.status_code != 200:
            return None
        try:
            return msgspec.json.decode(resp.content, type=AccessResult).closed
        except msgspec.DecodeError:
            return None


def _room_load(resp: httpx.Response) -> dict[str, Any] | None:
    if resp.status_code != 200:
        return None
    try:
        return _loaded(msgspec.json.decode(resp.content, type=LiveRoomAnswer))
    except msgspec.DecodeError:
        return None


def _loaded(load: LiveLoad) -> dict[str, Any]:
    """A shard's report as the admin API's room load (``loaded``: it is in memory)."""
    return {"loaded": True, "connections": load.connections, "members": load.members,
            "seq": load.seq, "messages_per_s": load.messages_per_s}
