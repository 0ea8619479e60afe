"""Every call from the directory to a shard (``docs/INTERNALS.md``), in one client.

The httpx transport is the seam: tests pass an ``httpx.ASGITransport`` of a
fake shard app or an ``httpx.MockTransport``; production uses the network.
Every call carries a fresh cluster token for its instance and never raises.
The load and access calls are short (``SHARD_CALL_TIMEOUT_S``) and best
effort: an unreachable or confused shard yields ``None`` and the caller
reports the value as unknown (``null``). The handoff calls of a live move
(:meth:`ShardClient.handoffs`) answer ``(status, body or error)`` per room,
status 0 when the shard could not be asked; the move driver decides.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import orjson

from roomshard.wire.internal import (
    AccessBody,
    AccessResult,
    HandoffBatch,
    HandoffCall,
    HandoffResults,
    HistoryPage,
    LiveLoad,
    LiveRoomAnswer,
    LiveRoomsAnswer,
    PublishCall,
)
from roomshard.wire.tickets import DIRECTORY, Signer

SHARD_CALL_TIMEOUT_S = 1.0
#: A closed control channel's check (directory.ops.failover): generous, because a busy
#: directory (the dead shard's clients all asking at once) is slow to see even a refusal.
PROBE_TIMEOUT_S = 2.0
GONE, ALIVE, UNKNOWN = "gone", "alive", "unknown"  # what a probe found
HANDOFF_CALL_TIMEOUT_S = 3.0  # one handoff call; a SIGSTOPped shard costs this much per try
HANDOFF_ITEM_S = 0.02  # more time per item of a batched handoff call
_encode = msgspec.json.Encoder().encode
#: One handoff call's outcome: (HTTP status, the answer's body or its error); status 0 when
#: the shard could not be asked or answered nonsense.
Outcome = tuple[int, Any]
log = logging.getLogger("roomshard.directory.shards")

NOT_LOADED: dict[str, Any] = {"loaded": False, "connections": 0, "members": 0, "seq": None,
                              "messages_per_s": 0.0}


class ShardClient:
    def __init__(self, signer: Signer, clock: Callable[[], float],
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._signer = signer
        self._clock = clock
        self.http = httpx.AsyncClient(transport=transport, timeout=SHARD_CALL_TIMEOUT_S)
        self._no_batch: set[str] = set()  # shard URLs without the batch route (older shards)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def probe(self, internal_url: str, boot_id: str,
                    timeout: float = PROBE_TIMEOUT_S) -> str:
        """Whether process ``boot_id`` still answers at ``internal_url``: ``GONE`` when
        nothing listens there (connection refused) or another process answers
        ``/healthz``; ``ALIVE`` when it answers; ``UNKNOWN`` when nothing is proven
        (no answer within ``timeout``, an unreachable host, a shard without ``boot_id``)."""
        url = httpx.URL(internal_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(url.host, port), timeout)
        except ConnectionRefusedError:
            return GONE
        except (OSError, TimeoutError):
            return UNKNOWN
        writer.close()
        try:
            resp = await self.http.get(f"{internal_url}/healthz", timeout=timeout)
            answered = resp.json().get("boot_id") if resp.status_code == 200 else None
        except httpx.ConnectError as exc:  # refused now: the listener went away meanwhile
            return GONE if _refused(exc) else UNKNOWN
        except (httpx.HTTPError, ValueError, AttributeError):
            return UNKNOWN
        if not isinstance(answered, str):
            return UNKNOWN
        return ALIVE if answered == boot_id else GONE

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


    # -- the server API -----------------------------------------------------------
    async def publish(self, instance: str, internal_url: str, room: str, call: PublishCall,
                      timeout: float) -> Outcome:
        """Hand a message of the server API to the room's owner: ``(status, answer or
        error)``, status 0 when the shard could not be asked (the caller retries)."""
        return await self._post(instance, f"{internal_url}/internal/rooms/{room}/publish",
                                call, timeout)

    async def history(self, instance: str, internal_url: str, room: str, before: int | None,
                      limit: int) -> HistoryPage | None:
        """What the owner holds of ``room`` in memory (no message store); None when it could
        not be asked."""
        params = f"?limit={limit}" + (f"&before={before}" if before is not None else "")
        resp = await self._call(instance, "GET",
                                f"{internal_url}/internal/rooms/{room}/messages{params}")
        if resp is None or resp.status_code != 200:
            return None
        try:
            return msgspec.json.decode(resp.content, type=HistoryPage)
        except msgspec.DecodeError:
            return None

    # -- the handoff calls of a live move ------------------------------------------
    async def handoffs(self, instance: str, internal_url: str, kind: str,
                       items: list[HandoffCall]) -> list[Outcome]:
        """``POST /internal/handoffs/<kind>`` with every item, one outcome per item in order;
        room by room (``/internal/rooms/{room}/<kind>``) on a shard without the batch route
        (an older version mid-upgrade)."""
        if internal_url not in self._no_batch:
            status, answer = await self._post(instance, f"{internal_url}/internal/handoffs/{kind}",
                                              HandoffBatch(items=list(items)),
                                              HANDOFF_CALL_TIMEOUT_S + HANDOFF_ITEM_S * len(items))
            if status == 200:
                return _batch_outcomes(answer, len(items))
            if status != 404:
                return [(status, answer)] * len(items)
            self._no_batch.add(internal_url)
            log.info("shard %s has no batch handoff route: calling room by room", instance)

        async def one(item: HandoffCall) -> Outcome:
            body = msgspec.structs.replace(item, room=None)  # the room goes in the path
            return await self._post(instance, f"{internal_url}/internal/rooms/{item.room}/{kind}",
                                    body, HANDOFF_CALL_TIMEOUT_S)

        return list(await asyncio.gather(*(one(i) for i in items)))

    async def _post(self, instance: str, url: str, body: HandoffCall | HandoffBatch | PublishCall,
                    timeout: float) -> tuple[int, Any]:
        try:
            # Encoded in one pass (a snapshot carries up to the whole history), no copy first.
            resp = await self.http.post(
                url, content=_encode(body), timeout=timeout,
                headers={**self.headers(instance), "Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            self._no_batch.clear()  # a restarted shard may run a newer version: try the batch route
            return 0, f"unreachable ({exc.__class__.__name__})"
        try:
            answer = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            answer = resp.text[:200]
        if resp.status_code != 200 and isinstance(answer, dict):
            answer = answer.get("error", answer)
        return resp.status_code, answer


def _batch_outcomes(answer: Any, n: int) -> list[Outcome]:
    """A batch reply as one outcome per item; a reply that is not one result per item fails
    every item (the moves retry, nothing is assumed done)."""
    try:
        results = msgspec.convert(answer, HandoffResults).results
    except msgspec.ValidationError:
        results = []
    if len(results) != n:
        return [(0, "malformed batch answer")] * n
    return [(r.status, r.body if r.status == 200 else msgspec.to_builtins(r.error or r))
            for r in results]


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


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by a refused TCP connection (httpx wraps it twice)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
