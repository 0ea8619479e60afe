"""The shard's calls to the directory (docs/INTERNALS.md), over httpx.

The transport is injectable, so tests replace the network with
``httpx.MockTransport``. Every call carries a fresh cluster token with
``sub`` = this instance.

Opens are batched (``roomshard.batching``): the opens asked for while one
is on its way go out together as the next ``POST /v1/internal/opens``, one
call and one directory transaction for all of them. A connect storm's first
joins of hundreds of rooms are then a few calls, not hundreds of concurrent
ones (each its own SQLite write, and the HTTP pool's bookkeeping growing
with the square of the requests in flight). A directory without the batch
route (404/405, an older version) gets single ``open`` calls from then on.

Errors::

    DirectoryError            any failed control call
      DirectoryUnavailable    network error, timeout, 5xx or an answer that is not the
                              directory's: retry later (close 1013)
      DirectoryRefused        a 4xx with the directory's error code, e.g.
                              ``not_owner`` (close 4004) or ``moving`` (1013)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from roomshard.batching import Batcher
from roomshard.wire.errors import ErrorBody
from roomshard.wire.internal import (
    CHANNEL_KEEPALIVE_S,
    HeartbeatBody,
    HeartbeatResponse,
    InstanceLoad,
    LeaveBody,
    OpenBatch,
    OpenBatchBody,
    OpenBody,
    OpenGrant,
    OpenItem,
)
from roomshard.wire.tickets import DIRECTORY, Signer

REQUEST_TIMEOUT_S = 3.0
#: Rooms per ``opens`` call (the directory takes up to 1,000).
MAX_OPEN_BATCH = 500


class DirectoryError(Exception):
    """A control call to the directory failed."""


class DirectoryUnavailable(DirectoryError):
    """The directory could not be reached or failed (5xx)."""


class DirectoryRefused(DirectoryError):
    """The directory answered with a 4xx and an error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class DirectoryClient:
    def __init__(self, base_url: str, instance: str, signer: Signer, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time,
                 timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.instance = instance
        self._signer = signer
        self._clock = clock
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), transport=transport,
                                       timeout=timeout)
        self._opens: Batcher[None, OpenItem] = Batcher(self._open_batch, MAX_OPEN_BATCH)
        self._batch_opens = True  # False once the directory turned out not to have the route
        self.open_calls = 0  # calls made to open rooms (batches and single opens), for tests

    async def aclose(self) -> None:
        await self._opens.aclose()
        await self._http.aclose()

    async def heartbeat(self, *, internal_url: str, public_base: str | None,
                        capacity: int | None, boot_id: str, load: InstanceLoad,
                        confirm: dict[str, int] | None = None,
                        timeout: float | None = None) -> HeartbeatResponse:
        """Register/refresh this instance; raises :class:`DirectoryError`.

        ``confirm``: rooms this shard kept in memory through a lost lease, with
        their epochs; the answer's ``owned`` lists those the directory still
        assigns to this instance at exactly that epoch (docs/INTERNALS.md).
        """
        body = HeartbeatBody(internal_url=internal_url, public_base=public_base,
                             capacity=capacity, boot_id=boot_id, load=load,
                             confirm=confirm or None)
        data = await self._call("PUT", f"/v1/internal/instances/{self.instance}/heartbeat",
                                msgspec.to_builtins(body), timeout)
        try:
            return msgspec.convert(data, HeartbeatResponse)
        except msgspec.ValidationError as exc:
            raise DirectoryUnavailable(f"malformed heartbeat answer: {exc}") from exc

    async def claim(self, *, internal_url: str, public_base: str | None, capacity: int | None,
                    boot_id: str, load: InstanceLoad) -> HeartbeatResponse:
        """Get an instance number (this client was made for ``UNNUMBERED``), and act as that
        instance from then on; raises :class:`DirectoryError`."""
        body = HeartbeatBody(internal_url=internal_url, public_base=public_base,
                             capacity=capacity, boot_id=boot_id, load=load)
        data = await self._call("POST", "/v1/internal/instances", msgspec.to_builtins(body))
        try:
            answer = msgspec.convert(data, HeartbeatResponse)
        except msgspec.ValidationError as exc:
            raise DirectoryUnavailable(f"malformed claim answer: {exc}") from exc
        self.instance = answer.instance.id
        return answer

    async def open_room(self, room: str, ticket_epoch: int, *,
                        open_id: str | None = None) -> OpenGrant:
        """Ask to create ``room`` in memory; raises :class:`DirectoryError`.

        ``open_id``: the same on a retry of an open whose answer was lost.
        Concurrent opens share one call (see the module docstring)."""
        item = OpenItem(room=room, ticket_epoch=ticket_epoch, open_id=open_id)
        if not self._batch_opens:
            return await self._open_one(item)
        grant: OpenGrant = await self._opens.submit(None, item)
        return grant

    async def _open_one(self, item: OpenItem) -> OpenGrant:
        body = OpenBody(instance=self.instance, ticket_epoch=item.ticket_epoch,
                        open_id=item.open_id)
        self.open_calls += 1
        data = await self._call("POST", f"/v1/internal/rooms/{item.room}/open",
                                msgspec.to_builtins(body))
        try:
            return msgspec.convert(data, OpenGrant)
        except msgspec.ValidationError as exc:
            raise DirectoryUnavailable(f"malformed open answer: {exc}") from exc

    async def _open_batch(self, _key: None, items: list[OpenItem]) -> list[OpenGrant | DirectoryError]:
        """One ``opens`` call: per item its grant or its refusal (raised to that caller)."""
        if not self._batch_opens:
            return await self._open_each(items)
        body = OpenBatchBody(instance=self.instance, rooms=items)
        self.open_calls += 1
        try:
            data = await self._call("POST", "/v1/internal/opens", msgspec.to_builtins(body))
        except DirectoryRefused as exc:
            if exc.status not in (404, 405):
                raise
            self._batch_opens = False  # a directory from before the batch route
            return await self._open_each(items)
        try:
            answer = msgspec.convert(data, OpenBatch)
        except msgspec.ValidationError as exc:
            raise DirectoryUnavailable(f"malformed opens answer: {exc}") from exc
        if [r.room for r in answer.results] != [i.room for i in items]:
            raise DirectoryUnavailable("the opens answer does not match the rooms asked for")
        out: list[OpenGrant | DirectoryError] = []
        for result in answer.results:
            if result.grant is not None:
                out.append(result.grant)
            elif result.error is not None:
                out.append(DirectoryRefused(409, result.error.code, result.error.message))
            else:
                out.append(DirectoryUnavailable(f"no grant nor error for room {result.room}"))
        return out

    async def _open_each(self, items: list[OpenItem]) -> list[OpenGrant | DirectoryError]:
        async def one(item: OpenItem) -> OpenGrant | DirectoryError:
            try:
                return await self._open_one(item)
            except DirectoryError as exc:
                return exc

        return list(await asyncio.gather(*(one(i) for i in items)))

    async def hold_channel(self, boot_id: str) -> None:
        """Hold the control channel (``GET .../channel``) open until it ends; raises
        :class:`DirectoryRefused` for a refusal, :class:`DirectoryUnavailable` otherwise.

        The directory writes a line every ``CHANNEL_KEEPALIVE_S``; a channel
        silent for three of them is given up (a directory that is gone without a FIN).
        """
        token = self._signer.cluster_token(self.instance, to=DIRECTORY, now=self._clock())
        path = f"/v1/internal/instances/{self.instance}/channel"
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=3 * CHANNEL_KEEPALIVE_S)
        try:
            async with self._http.stream("GET", path, params={"boot_id": boot_id},
                                         headers={"Authorization": f"Bearer {token}"},
                                         timeout=timeout) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    if resp.status_code in (404, 405):
                        raise DirectoryRefused(resp.status_code, "not_found", "no channel route")
                    _raise_for(resp, "GET", path)
                async for _ in resp.aiter_raw():
                    pass
        except httpx.HTTPError as exc:
            raise DirectoryUnavailable(f"GET {path}: {exc!r}") from exc
        raise DirectoryUnavailable(f"GET {path}: the directory ended the channel")

    async def leave(self, *, drain: bool, remove: bool = False,
                    timeout: float | None = None) -> dict[str, Any]:
        """Tell the directory this instance stops (``remove``: and leaves the registry);
        raises :class:`DirectoryError`."""
        return await self._call("POST", f"/v1/internal/instances/{self.instance}/leave",
                                msgspec.to_builtins(LeaveBody(drain=drain, remove=remove)),
                                timeout)

    async def _call(self, method: str, path: str, body: dict[str, Any],
                    timeout: float | None = None) -> dict[str, Any]:
        token = self._signer.cluster_token(self.instance, to=DIRECTORY, now=self._clock())
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            resp = await self._http.request(method, path, json=body,
                                            headers={"Authorization": f"Bearer {token}"}, **extra)
        except httpx.HTTPError as exc:
            raise DirectoryUnavailable(f"{method} {path}: {exc!r}") from exc
        if resp.status_code >= 400:
            _raise_for(resp, method, path)
        try:
            data = resp.json()
        except ValueError as exc:
            raise DirectoryUnavailable(f"{method} {path}: non-JSON answer") from exc
        if not isinstance(data, dict):
            raise DirectoryUnavailable(f"{method} {path}: unexpected answer")
        return data


def _raise_for(resp: httpx.Response, method: str, path: str) -> None:
    """An error answer as :class:`DirectoryUnavailable` (5xx, not the directory's body)
    or :class:`DirectoryRefused` (its 4xx error body)."""
    if resp.status_code >= 500:
        raise DirectoryUnavailable(f"{method} {path}: HTTP {resp.status_code}")
    try:
        err = msgspec.json.decode(resp.content, type=ErrorBody).error
    except msgspec.DecodeError:  # not the directory's answer (a proxy in between)
        raise DirectoryUnavailable(f"{method} {path}: HTTP {resp.status_code} "
                                   "without the error body") from None
    raise DirectoryRefused(resp.status_code, err.code, err.message)
