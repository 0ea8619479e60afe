"""The roomshard Python client: ``async with connect(directory_url, room, user) as s``.

::

    async with client.connect("http://127.0.0.1:8080", "lobby", "alice") as s:
        seq = await s.send("hello")
        async for item in s:          # Message or Gap, each message once, in seq order
            print(item)

See :mod:`roomshard.client.session` for the reconnect behaviour, and
:mod:`roomshard.client.messages` for a room's history (``history``) and the
server API for backends (``Publisher``).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from roomshard.client.errors import (
    ClientError,
    ConnectRefused,
    DirectoryUnavailable,
    SendRefused,
    SessionClosed,
)
from roomshard.client.inbox import Gap, Message, Presence
from roomshard.client.messages import HistoryMessage, HistoryPage, Published, Publisher, history
from roomshard.client.reconnect import Backoff
from roomshard.client.session import ServerError, Session, State, StateChange

__all__ = [
    "Backoff", "ClientError", "ConnectRefused", "DirectoryUnavailable", "Gap", "HistoryMessage",
    "HistoryPage", "Message", "Presence", "Published", "Publisher", "SendRefused", "ServerError",
    "Session", "SessionClosed", "State", "StateChange", "connect", "history",
]


class _Connect:
    """``await connect(...)`` -> an open Session; ``async with connect(...) as s`` closes it after."""

    def __init__(self, session: Session, timeout: float | None) -> None:
        self._session = session
        self._timeout = timeout

    def __await__(self) -> Generator[Any, None, Session]:
        return self._session.start(timeout=self._timeout).__await__()

    async def __aenter__(self) -> Session:
        return await self._session.start(timeout=self._timeout)

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()


def connect(directory_url: str, room: str, user: str | None, *, since: int | None = None,
            token: str | None = None, timeout: float | None = 30.0, **kwargs: Any) -> _Connect:
    """Open a session to ``room`` as ``user`` once the first welcome arrives.

    ``since`` resumes after that seq; ``token`` is the application's JWT (jwt
    auth mode). Raises ConnectRefused when the directory refuses (bad id,
    credentials, private room), TimeoutError when no welcome came in
    ``timeout`` seconds. Other keyword arguments go to :class:`Session`.
    """
    return _Connect(Session(directory_url, room, user, since=since, token=token, **kwargs), timeout)
