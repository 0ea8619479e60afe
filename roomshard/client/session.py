"""An async chat session: one room, one user, reconnecting on its own.

The session runs one task that loops: ask the directory for the room's URL,
open the WebSocket (with ``since`` = last seq seen), read frames until the
connection ends, then let :func:`roomshard.client.reconnect.decide` and the
:class:`~roomshard.client.reconnect.Backoff` say how long to wait before asking
again. Unacked sends stay in the :class:`~roomshard.client.outbox.Outbox` and are
written again, same id, after every welcome; received messages pass through
the :class:`~roomshard.client.inbox.Inbox` so the application sees each one once, in
order, and a :class:`~roomshard.client.inbox.Gap` when the server could not recover.

Events are queued without a bound: a chat client that stops reading its
events keeps them in memory. Iterate ``async for item in session`` for
messages and gaps, or :meth:`Session.events` for everything (presence and
state changes too); use one of the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from roomshard.client.directory_api import resolve, with_since
from roomshard.client.errors import (
    ClientError,
    ConnectRefused,
    DirectoryUnavailable,
    SendRefused,
    SessionClosed,
)
from roomshard.client.inbox import Gap, Inbox, Message, Presence
from roomshard.client.messages import HistoryPage, history
from roomshard.client.outbox import Outbox
from roomshard.client.reconnect import Action, Backoff, Decision, after_retry_after, decide

log = logging.getLogger("roomshard.client")

#: After a ``rate_limited`` refusal: hold every write this long, then space
#: writes PACED_INTERVAL_S apart for PACED_FOR_S (16/s, under the default 20/s).
RATE_LIMITED_RETRY_S = 0.25
PACED_INTERVAL_S = 0.06
PACED_FOR_S = 3.0
#: After an ``unavailable`` refusal (the shard's message store is down): write it again
#: after this long (the shard heals by itself once the store is back).
UNAVAILABLE_RETRY_S = 1.0
_UNAVAILABLE = Decision(Action.RETRY, 0.0, True, False, "directory unavailable")


class State(str, Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    MOVING = "moving"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StateChange:
    state: State
    reason: str
    instance: str | None = None
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``error`` frame that did not concern one of our pending sends."""

    code: str
    message: str
    id: str | None = None


Event = Message | Gap | Presence | StateChange | ServerError
_END = object()


class Session:
    """A reconnecting session; build it with :func:`roomshard.client.connect`."""

    def __init__(self, directory_url: str, room: str, user: str | None, *,
                 since: int | None = None, token: str | None = None,
                 backoff: Backoff | None = None, rand: Callable[[], float] = random.random,
                 http: httpx.AsyncClient | None = None, open_timeout: float = 10.0) -> None:
        self.directory_url = directory_url
        self.room = room
        self.user = user
        self.token = token
        self.outbox = Outbox()
        self.inbox = Inbox(last_seq=since)
        self.instance: str | None = None
        self.epoch: int | None = None
        self.error: ClientError | None = None
        #: How many connections reached their welcome (tests and dashboards read it).
        self.connections = 0
        self._backoff = backoff or Backoff()
        self._rand = rand
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(10.0))
        self._open_timeout = open_timeout
        self._state = State.CONNECTING
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._futures: dict[str, asyncio.Future[int]] = {}
        self._ws: ClientConnection | None = None
        self._wake_writer = asyncio.Event()
        self._wake_sleep = asyncio.Event()
        self._opened = asyncio.Event()
        self._closing = False
        self._hold_until = 0.0  # loop time before which the writer holds (rate limited)
        self._pace_until = 0.0  # loop time before which writes are spaced PACED_INTERVAL_S apart
        self._task: asyncio.Task[None] | None = None

    # -- properties -------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def members(self) -> list[str]:
        return list(self.inbox.members)

    @property
    def last_seq(self) -> int | None:
        return self.inbox.last_seq

    # -- lifecycle --------------------------------------------------------

    async def start(self, *, wait: bool = True, timeout: float | None = 30.0) -> Session:
        """Start connecting; with ``wait``, return once open (raises the fatal error or TimeoutError)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"roomshard-session-{self.room}")
        if wait:
            try:
                await self.wait_open(timeout)
            except BaseException:
                await self.close()
                raise
        return self

    async def wait_open(self, timeout: float | None = None) -> None:
        """Wait until the session is open (again); raises the session's error if it ended."""
        assert self._task is not None, "start() first"
        async def opened() -> None:
            while self._state is not State.OPEN:
                self._opened.clear()
                opened_wait = asyncio.ensure_future(self._opened.wait())
                try:
                    await asyncio.wait([opened_wait, self._task],  # type: ignore[list-item]
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    opened_wait.cancel()
                if self._task is not None and self._task.done():
                    raise self.error or SessionClosed("session closed")
        await asyncio.wait_for(opened(), timeout)

    async def close(self) -> None:
        """Close the connection (1000) and end the session; pending sends fail with SessionClosed."""
        self._closing = True
        self._wake_sleep.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        self._finish(None)
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> Session:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- history ----------------------------------------------------------

    async def history(self, before: int | None = None, limit: int = 50) -> HistoryPage:
        """The room's latest ``limit`` messages with seq < ``before``, oldest first (from
        the message store, or what the room's shard holds in memory); page back with
        ``before=page.messages[0].seq`` while ``page.more``."""
        return await history(self.directory_url, self.room,
                             user=self.user if self.token is None else None,
                             token=self.token, before=before, limit=limit, http=self._http)

    # -- sending ----------------------------------------------------------

    def send(self, text: str, id: str | None = None) -> asyncio.Future[int]:
        """Queue ``text``; the returned future resolves to its seq once acked.

        Raises SessionClosed if the session has ended. The future fails with
        SendRefused if the shard refuses the message for good (too long).
        """
        if self._state is State.CLOSED:
            raise self.error or SessionClosed("session closed")
        msg_id = id or uuid.uuid4().hex
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.outbox.add(msg_id, text)
        self._futures[msg_id] = fut
        self._wake_writer.set()
        return fut

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every send so far is acked (or refused)."""
        futs = list(self._futures.values())
        if futs:
            await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), timeout)

    # -- receiving --------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in arrival order, until the session ends (then its error, if any)."""
        while True:
            item = await self._events.get()
            if item is _END:
                self._events.put_nowait(_END)  # later iterators end too
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def messages(self) -> AsyncIterator[Message | Gap]:
        async for ev in self.events():
            if isinstance(ev, Message | Gap):
                yield ev

    def __aiter__(self) -> AsyncIterator[Message | Gap]:
        return self.messages()

    # -- the connection loop ---------------------------------------------

    def _set_state(self, state: State, reason: str) -> None:
        if state is not self._state:
            self._state = state
            self._events.put_nowait(StateChange(state, reason, self.instance, self.epoch))

    def _finish(self, error: ClientError | None) -> None:
        if self._state is State.CLOSED:
            return
        if error is not None and self.error is None:
            self.error = error
        self._set_state(State.CLOSED, str(error) if error else "closed")
        exc = self.error or SessionClosed("session closed before the ack")
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here: awaiting it still raises
        self._futures.clear()
        self.outbox.clear()
        self._events.put_nowait(_END)

    async def _run(self) -> None:
        attempt = 0
        unreachable: str | None = None  # the instance the last try could not reach
        try:
            while not self._closing:
                floor = 0.0
                try:
                    route = await resolve(self._http, self.directory_url, self.room, self.user,
                                          self.token, unreachable)
                except ConnectRefused as exc:
                    self._finish(exc)
                    return
                except DirectoryUnavailable as exc:
                    log.info("directory unavailable: %s", exc)
                    decision = _UNAVAILABLE
                    floor = after_retry_after(exc.retry_after or 0.0, self._rand())
                else:
                    before = self.connections
                    code = await self._connect_once(route.url)
                    if self._closing:
                        break
                    # Refused, no handshake, or ended without a close frame: say so next time.
                    unreachable = route.instance if code in (None, 1006) else None
                    decision = decide(code)
                    if self.connections != before:
                        attempt = 0  # it worked for a while: start the schedule over
                    if decision.action is Action.STOP:
                        self._finish(SessionClosed(f"closed by the server: {code} {decision.reason}"))
                        return
                moving = decision.moving or self._state is State.MOVING
                self._set_state(State.MOVING if moving else State.CONNECTING, decision.reason)
                delay = max(floor, self._backoff.delay(attempt, self._rand(), decision))
                attempt += 1
                if delay > 0:
                    self._wake_sleep.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake_sleep.wait(), delay)
        except Exception as exc:  # a bug must end the session visibly, not hang it
            log.exception("session loop failed")
            self._finish(SessionClosed(f"internal error: {exc!r}"))
            raise
        finally:
            self._finish(None)

    async def _connect_once(self, url: str) -> int | None:
        """One connection; returns its close code (None: it never opened)."""
        since = self.inbox.since()
        try:
            async with ws_connect(with_since(url, since), open_timeout=self._open_timeout,
                                  max_size=16 << 20, close_timeout=2) as ws:
                self._ws = ws
                if self._closing:
                    return None
                writer: asyncio.Task[None] | None = None
                try:
                    async for raw in ws:
                        frame = orjson.loads(raw)
                        kind = frame.get("type")
                        if kind == "welcome":
                            self._on_welcome(frame, since)
                            if writer is None:
                                writer = asyncio.create_task(self._writer(ws))
                        else:
                            self._on_frame(kind, frame)
                finally:
                    if writer is not None:
                        writer.cancel()
                        with contextlib.suppress(BaseException):
                            await writer
                return ws.close_code
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else 1006
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            log.info("could not open %s: %r", url.split("?")[0], exc)
            return None
        finally:
            self._ws = None

    def _on_welcome(self, frame: dict[str, Any], since: int | None) -> None:
        welcome, gap = self.inbox.on_welcome(frame, since)
        self.instance, self.epoch = welcome.instance, welcome.epoch
        self.outbox.new_connection()
        self.connections += 1
        self._set_state(State.OPEN, f"welcome from {welcome.instance}")
        if gap is not None:
            self._events.put_nowait(gap)
        self._opened.set()
        self._wake_writer.set()

    def _on_frame(self, kind: Any, frame: dict[str, Any]) -> None:
        if kind == "message":
            msg = self.inbox.on_message(frame)
            if msg is not None:
                self._events.put_nowait(msg)
        elif kind == "ack":
            msg_id = str(frame.get("id"))
            if self.outbox.ack(msg_id) is not None:
                fut = self._futures.pop(msg_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(int(frame["seq"]))
        elif kind == "presence":
            self._events.put_nowait(self.inbox.on_presence(frame))
        elif kind == "error":
            self._on_error(frame)

    def _on_error(self, frame: dict[str, Any]) -> None:
        msg_id, code = frame.get("id"), str(frame.get("code", ""))
        message = str(frame.get("message", ""))
        if msg_id is not None and str(msg_id) in self.outbox:
            msg_id = str(msg_id)
            if code in ("rate_limited", "unavailable"):
                # Still ours to deliver: hold every write a little, then write it again
                # (going on at full speed would get the connection closed with 4008; a
                # store that is down needs a moment to come back), with every send written
                # after it (the shard holds them behind it: the order is kept).
                self.outbox.mark_unsent(msg_id)
                now = asyncio.get_running_loop().time()
                self._hold_until = now + (RATE_LIMITED_RETRY_S if code == "rate_limited"
                                          else UNAVAILABLE_RETRY_S)
                self._pace_until = now + PACED_FOR_S
                self._wake_writer.set()
                return
            self.outbox.refuse(msg_id)
            fut = self._futures.pop(msg_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(SendRefused(code, message))
            return
        self._events.put_nowait(ServerError(code, message, msg_id))

    async def _writer(self, ws: ClientConnection) -> None:
        """Write every due outbox entry, in order, whenever woken; one writer per connection.

        After a ``rate_limited`` refusal the writer holds briefly, then paces its
        writes for a while (a burst of resends would only collect more refusals
        and end with a 4008 close).
        """
        loop = asyncio.get_running_loop()
        last_write = 0.0
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while due := self.outbox.due():
                for entry in due:
                    now = loop.time()
                    paced = last_write + PACED_INTERVAL_S - now if now < self._pace_until else 0.0
                    if (wait := max(self._hold_until - now, paced)) > 0:
                        await asyncio.sleep(wait)
                        break  # look again at what is due after the wait
                    if entry.id not in self.outbox or entry.sent_on == self.outbox.generation:
                        continue  # acked or rewritten meanwhile
                    try:
                        await ws.send(orjson.dumps({"type": "send", "id": entry.id, "text": entry.text,
                                                    "ordered": True}).decode())
                    except ConnectionClosed:
                        return  # the reader sees the close and the loop reconnects
                    self.outbox.mark_sent(entry.id)
                    last_write = loop.time()
                else:
                    break  # the whole snapshot is written; new sends wake us again
