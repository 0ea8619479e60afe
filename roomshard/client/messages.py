"""A room's messages over HTTP: its history, and the server API's publish for backends.

::

    page = await history("http://127.0.0.1:8080", "lobby", user="alice")
    for m in page.messages:              # oldest first; page.more: older ones exist
        print(m.seq, m.user, m.text)

    async with Publisher("http://127.0.0.1:8080", api_key) as pub:
        sent = await pub.publish("lobby", "announcer", "the build is green")
        print(sent.seq)

``Publisher.publish`` gives a message an id once and sends it with that id
until it is delivered: the directory answers 503 (``Retry-After``) while a
room moves or its shard is replaced, and the same ``(user, id)`` is one
message however often it is sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from types import TracebackType
from typing import Self
from urllib.parse import quote

import httpx
import msgspec

from roomshard.client.directory_api import check
from roomshard.client.errors import DirectoryUnavailable
from roomshard.wire.internal import HistoryMessage, HistoryPage, Published

__all__ = ["HistoryMessage", "HistoryPage", "Published", "Publisher", "history"]

#: How long :meth:`Publisher.publish` keeps sending a message the directory could not
#: deliver yet (503) before it gives up with DirectoryUnavailable.
PUBLISH_PATIENCE_S = 30.0


def _messages_url(directory_url: str, room: str) -> str:
    return f"{directory_url.rstrip('/')}/v1/rooms/{quote(room, safe='')}/messages"


async def history(directory_url: str, room: str, *, user: str | None = None,
                  token: str | None = None, before: int | None = None, limit: int = 50,
                  http: httpx.AsyncClient | None = None) -> HistoryPage:
    """The latest ``limit`` messages of ``room`` with seq < ``before``, oldest first.

    ``user`` names the reader in open auth mode (needed for a private room);
    ``token`` is the application's JWT (jwt mode) or the admin token. Page
    back with ``before=page.messages[0].seq`` while ``page.more``. Raises
    ConnectRefused (400, 401, 403, 404) or DirectoryUnavailable.
    """
    params: dict[str, str | int] = {"limit": limit}
    if before is not None:
        params["before"] = before
    if user is not None:
        params["user"] = user
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = http or httpx.AsyncClient(timeout=10.0)
    try:
        resp = await client.get(_messages_url(directory_url, room), params=params,
                                headers=headers)
    except httpx.HTTPError as exc:
        raise DirectoryUnavailable(f"directory unreachable: {exc!r}") from exc
    finally:
        if http is None:
            await client.aclose()
    check(resp)
    return msgspec.json.decode(resp.content, type=HistoryPage)


class Publisher:
    """The server API for an application backend: messages into rooms, as a user.

    ``api_key`` is one of the directory's ``ROOMSHARD_API_KEYS`` (or its
    admin token). One instance keeps one HTTP connection pool; close it
    (or use ``async with``) when done.
    """

    def __init__(self, directory_url: str, api_key: str, *,
                 patience: float = PUBLISH_PATIENCE_S, timeout: float = 10.0) -> None:
        self.directory_url = directory_url
        self.patience = patience
        self._http = httpx.AsyncClient(timeout=timeout,
                                       headers={"Authorization": f"Bearer {api_key}"})

    async def publish(self, room: str, user: str, text: str, *,
                      msg_id: str | None = None) -> Published:
        """Send ``text`` into ``room`` as ``user``; returns its seq once it is delivered (and
        stored, with a store). ``msg_id`` (default: a new one) makes it idempotent: sent
        again, it is the same message. Retries what the directory could not deliver yet
        for up to ``patience`` seconds; raises ConnectRefused for a refusal (400, 401)."""
        msg_id = msg_id or uuid.uuid4().hex
        body = {"id": msg_id, "user": user, "text": text}
        deadline = time.monotonic() + self.patience
        while True:
            try:
                resp = await self._http.post(_messages_url(self.directory_url, room), json=body)
                check(resp)
                return msgspec.json.decode(resp.content, type=Published)
            except httpx.HTTPError as exc:
                error = DirectoryUnavailable(f"directory unreachable: {exc!r}")
            except DirectoryUnavailable as exc:
                error = exc
            wait = min(max(error.retry_after or 0.5, 0.1), 5.0)
            if time.monotonic() + wait > deadline:
                raise error
            await asyncio.sleep(wait)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
