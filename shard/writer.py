"""The write scheduler: the dirty set and one flush per event-loop turn.

A frame for a connection is appended to its send queue (``pending``, a list
of ``bytes``, and ``pending_bytes``); the first frame of a turn also puts
the connection on the dirty list and schedules one flush at the end of the
turn (``loop.call_soon``). The flush asks each dirty connection to write
its queue (:meth:`Queue.flush`: one system call for everything queued this
turn, and the send-queue bound). Nothing on this path awaits.

:meth:`Writer.fan_out` is the broadcast: it appends the same ``bytes``
object, built once by the room, to every member's queue, with no call and
no encoding per recipient.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Protocol


class Queue(Protocol):
    """What the writer needs of a connection: its send queue and a way to write it."""

    pending: list[bytes]
    pending_bytes: int

    def flush(self) -> None: ...


class Writer:
    """One per shard process; see the module docstring."""

    __slots__ = ("_scheduled", "dirty")

    def __init__(self) -> None:
        self.dirty: list[Queue] = []  # connections with frames queued this turn
        self._scheduled = False

    def mark_dirty(self, conn: Queue) -> None:
        """``conn`` has a first frame queued (or something to do at flush time)."""
        self.dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def fan_out(self, conns: Collection[Queue], frame: bytes) -> int:
        """Append ``frame`` to every connection's queue; returns how many got it."""
        n = len(frame)
        dirty = self.dirty
        for c in conns:
            p = c.pending
            if not p:
                dirty.append(c)
            p.append(frame)
            c.pending_bytes += n
        if conns and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return len(conns)

    def flush(self) -> None:
        """Write every dirty connection's queue (called once per loop turn)."""
        self._scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()
