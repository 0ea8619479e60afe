"""The sends that have no ack yet, kept in order and resent after a reconnect.

A send stays here from the moment the application calls ``send`` until the
server acks it (or refuses it for good). Each reconnect bumps the
connection generation; :meth:`Outbox.due` returns, in order, every entry not
yet written on the current connection, so the session can flush after a
welcome and after each new send without writing anything twice on one
connection. Resends keep the message id: the server's idempotency window
turns a resend of a message it already sequenced into the original ack, so
nothing is broadcast twice.

Pure: no sockets and no futures; the session keeps the futures by id.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class Pending:
    id: str
    text: str
    #: Generation of the connection this entry was last written on (-1: never).
    sent_on: int = -1


class Outbox:
    def __init__(self) -> None:
        self._entries: OrderedDict[str, Pending] = OrderedDict()
        self.generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._entries

    def add(self, msg_id: str, text: str) -> Pending:
        """Queue a new send; raises ValueError if ``msg_id`` is already pending."""
        if msg_id in self._entries:
            raise ValueError(f"message id {msg_id!r} is already pending")
        entry = Pending(msg_id, text)
        self._entries[msg_id] = entry
        return entry

    def new_connection(self) -> None:
        """A new connection is open: everything pending is due again."""
        self.generation += 1

    def due(self) -> list[Pending]:
        """Entries not yet written on the current connection, oldest first."""
        return [e for e in self._entries.values() if e.sent_on != self.generation]

    def mark_sent(self, msg_id: str) -> None:
        entry = self._entries.get(msg_id)
        if entry is not None:
            entry.sent_on = self.generation

    def mark_unsent(self, msg_id: str) -> None:
        """Write it again on this connection (after a ``rate_limited`` or ``unavailable``
        refusal), and every entry written after it too: the shard holds the ordered
        sends behind a refused one (docs/PROTOCOL.md, "Ordered sends"), so they are
        refused as well, and writing them again in order keeps the order they were
        sent in. One of them the shard took meanwhile (a shard without the hold) is
        acked again, not sequenced twice.

        An entry due already was marked with its whole tail (the refusals of a burst
        arrive one per entry: each costs nothing after the first); what the writer
        wrote after that mark is behind the held send and gets its own refusal.
        """
        entry = self._entries.get(msg_id)
        if entry is None or entry.sent_on != self.generation:
            return
        for e in reversed(self._entries.values()):  # the tail, back to the refused entry
            e.sent_on = -1
            if e is entry:
                break

    def ack(self, msg_id: str) -> Pending | None:
        """Remove an acked entry; None for an ack we do not wait for (a duplicate)."""
        return self._entries.pop(msg_id, None)

    def refuse(self, msg_id: str) -> Pending | None:
        """Drop an entry the server refused for good (too long, malformed)."""
        return self._entries.pop(msg_id, None)

    def pending(self) -> list[Pending]:
        return list(self._entries.values())

    def clear(self) -> list[Pending]:
        entries = list(self._entries.values())
        self._entries.clear()
        return entries
