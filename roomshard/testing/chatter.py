"""A raw WebSocket chat client that records everything, for checking handoff guarantees.

Unlike ``client.Session`` it deduplicates nothing: it keeps every message
frame as received, so a duplicate or a gap shows in the log. It does what
the contract tells a client to do: ask the directory, connect with
``since`` = the last seq seen, resend unacked ids after every welcome,
reconnect after 4010/1001/1013/4004 (and after a dead connection), and
resend a send refused with ``unavailable`` (the message store is down) a
little later.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from roomshard.testing.timing import await_until

RETRY_S = 0.05
RESEND_S = 0.2  # a send refused with unavailable goes again after this


@dataclass
class Welcome:
    instance: str
    epoch: int
    seq: int
    since: int | None
    recovered: bool | None


@dataclass
class Chatter:
    directory_url: str
    room: str
    user: str
    http: httpx.AsyncClient
    log: list[dict[str, Any]] = field(default_factory=list)  # every message frame, as received
    acks: dict[str, int] = field(default_factory=dict)  # id -> seq
    unacked: dict[str, str] = field(default_factory=dict)  # id -> text, in send order
    welcomes: list[Welcome] = field(default_factory=list)
    closes: list[int | None] = field(default_factory=list)
    ack_conflicts: list[tuple[str, int, int]] = field(default_factory=list)
    unavailable: int = 0  # sends refused with unavailable (resent later)
    refused: list[int] = field(default_factory=list)  # HTTP statuses of refused handshakes
    # (time.monotonic(), instance, type) of every message and ack frame: who served what when
    served: list[tuple[float, str, str]] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    open_timeout: float = 5.0  # a 1,000-member room's joins (O(n^2) presence) take longer
    # Shared by many chatters: bounds the directory calls in flight (httpcore's pool is
    # O(queued^2) with thousands of waiting requests).
    gate: asyncio.Semaphore | None = None
    # Other directory replicas, asked in turn once the current one does not answer.
    replicas: list[str] = field(default_factory=list)
    _ws: Any = None
    _task: asyncio.Task[None] | None = None
    _stop: bool = False
    _ids: Any = field(default_factory=itertools.count)

    @property
    def last_seq(self) -> int | None:
        return self.log[-1]["seq"] if self.log else (self.welcomes[0].seq if self.welcomes else None)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def send(self) -> str:
        """Queue one message (sent now if connected, else after the next welcome)."""
        msg_id = f"{self.user}-{next(self._ids)}"
        self.unacked[msg_id] = f"hello from {self.user} {msg_id}"
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(orjson.dumps(
                    {"type": "send", "id": msg_id, "text": self.unacked[msg_id]}).decode())
        return msg_id

    async def _resolve(self) -> str | None:
        try:
            async with self.gate or contextlib.nullcontext():
                r = await self.http.post(f"{self.directory_url}/v1/rooms/{self.room}/connect",
                                         json={"user": self.user})
        except httpx.HTTPError:
            if self.replicas:  # the next replica, this one last
                self.replicas.append(self.directory_url)
                self.directory_url = self.replicas.pop(0)
            return None
        if r.status_code != 200:
            return None
        url = r.json()["url"]
        since = self.last_seq
        return url if since is None or not self.welcomes else f"{url}&since={since}"

    async def _run(self) -> None:
        while not self._stop:
            url = await self._resolve()
            if url is None:
                await asyncio.sleep(RETRY_S)
                continue
            code = await self._session(url)
            self.closes.append(code)
            if code in (1013, None):
                await asyncio.sleep(RETRY_S)

    async def _session(self, url: str) -> int | None:
        try:
            async with ws_connect(url, open_timeout=self.open_timeout, close_timeout=1, ping_interval=None,
                                  max_queue=None) as ws:
                async for raw in ws:
                    frame = orjson.loads(raw)
                    kind = frame.get("type")
                    if kind == "welcome":
                        self._on_welcome(frame, url)
                        self._ws = ws
                        for msg_id, text in list(self.unacked.items()):
                            await ws.send(orjson.dumps(
                                {"type": "send", "id": msg_id, "text": text}).decode())
                        self.opened.set()
                    elif kind == "message":
                        self.log.append(frame)
                        self.served.append((time.monotonic(), self.welcomes[-1].instance, kind))
                    elif kind == "ack":
                        self._on_ack(frame["id"], frame["seq"])
                        self.served.append((time.monotonic(), self.welcomes[-1].instance, kind))
                    elif kind == "error" and frame.get("code") == "unavailable":
                        self.unavailable += 1
                        asyncio.get_running_loop().call_later(
                            RESEND_S, self._resend, ws, frame.get("id"))
                return ws.close_code  # a clean close (1000, 1001) ends the loop quietly
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        except InvalidStatus as exc:
            self.refused.append(exc.response.status_code)
            return None
        except (TimeoutError, OSError, InvalidHandshake):
            return None
        finally:
            self._ws = None
        return None

    def _resend(self, ws: Any, msg_id: str | None) -> None:
        """Send a refused message again (on the same connection; a new one resends anyway)."""
        if msg_id in self.unacked and ws is self._ws:
            text = self.unacked[msg_id]
            task = asyncio.get_running_loop().create_task(ws.send(orjson.dumps(
                {"type": "send", "id": msg_id, "text": text}).decode()))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _on_welcome(self, frame: dict[str, Any], url: str) -> None:
        since = int(url.rsplit("since=", 1)[1]) if "since=" in url else None
        self.welcomes.append(Welcome(frame["instance"], frame["epoch"], frame["seq"], since,
                                     frame.get("recovered")))

    def _on_ack(self, msg_id: str, seq: int) -> None:
        self.unacked.pop(msg_id, None)
        old = self.acks.setdefault(msg_id, seq)
        if old != seq:
            self.ack_conflicts.append((msg_id, old, seq))


def check_logs(room_clients: list[Chatter]) -> list[str]:
    """Every acked message in every member's log once, in seq order, no gap; the problems found."""
    problems = []
    acked: dict[int, str] = {}
    for c in room_clients:
        problems += [f"{c.user}: id {i} acked as {a} then {b}" for i, a, b in c.ack_conflicts]
        for msg_id, seq in c.acks.items():
            if acked.setdefault(seq, msg_id) != msg_id:
                problems.append(f"seq {seq} acked for {acked[seq]} and {msg_id}")
    for c in room_clients:
        seqs = [m["seq"] for m in c.log]
        first = c.welcomes[0].seq if c.welcomes else 0
        expected = list(range(first + 1, first + 1 + len(seqs)))
        if seqs != expected:
            bad = next(i for i, (a, b) in enumerate(zip(seqs, expected, strict=False)) if a != b)
            problems.append(f"{c.user}: seqs not contiguous from {first + 1}: "
                            f"...{seqs[max(0, bad - 2):bad + 3]} at index {bad}")
        by_seq = {m["seq"]: m["id"] for m in c.log}
        for seq, msg_id in acked.items():
            if seq > first and by_seq.get(seq) != msg_id:
                problems.append(f"{c.user}: acked {msg_id} (seq {seq}) is "
                                f"{by_seq.get(seq, 'missing')} in the log")
        ids = [m["id"] for m in c.log]
        if len(ids) != len(set(ids)):
            problems.append(f"{c.user}: an id was broadcast twice")
    return problems


async def start_chatting(chatters: list[Chatter], *, open_timeout: float = 20) -> list[Chatter]:
    """Start ``chatters``, wait until every one is in, and have each send one acked message."""
    for c in chatters:
        c.start()
    await await_until(lambda: all(c.opened.is_set() for c in chatters), open_timeout,
                      "clients open")
    for c in chatters:
        await c.send()
    await await_until(lambda: all(not c.unacked for c in chatters), 10, "first acks")
    return chatters
