"""An in-memory cluster for handoff tests: a directory, shards and clients, no I/O.

The directory row and its conditional updates model what ``directory/`` does
in SQL; the shard wiring models what ``shard/`` does around the real
``shard.room.Room`` and ``shard.handoff.Handoffs``; the driver is the loop a
directory runs around ``directory.domain.moves``. Faults are injected per call:
``drop_request`` (never delivered) or ``drop_reply`` (delivered, answer
lost), listed per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from directory.domain import moves
from roomshard.client.outbox import Outbox
from roomshard.wire.protocol import CloseCode
from shard.handoff import Handoffs
from shard.room import Room

ROOM = "lobby"
KIND = {"call_freeze": "freeze", "call_adopt": "adopt", "commit_db": "commit",
        "call_release": "release", "mark_rolled_back": "rollback",
        "call_discard": "discard", "call_abort": "abort", "finished": "finished"}


class OwnershipViolation(AssertionError):
    pass


@dataclass
class Ticket:
    room: str
    instance: str
    epoch: int


@dataclass
class Row:
    """The directory's room row (see docs/INTERNALS.md)."""

    instance: str
    epoch: int
    owner_epoch: int
    opened_epoch: int | None
    state: str = "active"
    move_id: str | None = None
    # Outcome of settled moves, so a replayed conditional update answers the same.
    settled: dict[str, str] = field(default_factory=dict)


class SimShard:
    """A shard's wiring around Room and Handoffs (what shard/ is expected to do)."""

    def __init__(self, instance: str, cluster: Cluster) -> None:
        self.instance = instance
        self.cluster = cluster
        self.handoffs = Handoffs(instance, tombstone_ttl=600.0)
        self.rooms: dict[str, Room] = {}
        # Sends of a frozen room's members, unread (the real shard leaves them in TCP buffers).
        self.unread: list[tuple[int, str, str]] = []
        self.conns: dict[int, SimClient] = {}

    # -- control calls ---------------------------------------------------------
    def freeze(self, p: dict[str, Any]) -> dict[str, Any]:
        room = self.rooms.get(p["room"])
        snap = self.handoffs.freeze(p["room"], p["move_id"], p["epoch"],
                                    room.snapshot() if room else None, self.cluster.now)
        return {"snapshot": snap}

    def adopt(self, p: dict[str, Any]) -> dict[str, Any]:
        self.handoffs.adopt(p["room"], p["move_id"], p["epoch"], p["snapshot"],
                            loaded=p["room"] in self.rooms, now=self.cluster.now)
        return {}

    def release(self, p: dict[str, Any]) -> dict[str, Any]:
        live = self.rooms.get(p["room"])
        released = self.handoffs.release(p["room"], p["move_id"], p["to"], p["epoch"],
                                         self.cluster.now,
                                         loaded_epoch=live.epoch if live is not None else None)
        if released:
            self.rooms.pop(p["room"], None)
            self.unread.clear()  # their senders are closed: they resend to the new owner
            for conn_id, client in list(self.conns.items()):
                del self.conns[conn_id]
                client.closed(int(CloseCode.ROOM_MOVED))
        return {}

    def abort(self, p: dict[str, Any]) -> dict[str, Any]:
        adm = self.handoffs.abort(p["room"], p["move_id"], p["epoch"])
        if adm.kind == "unfrozen":
            self._unfreeze(p["room"], adm.epoch)
        return {}

    def discard(self, p: dict[str, Any]) -> dict[str, Any]:
        self.handoffs.discard(p["room"], p["move_id"])
        return {}

    def _unfreeze(self, name: str, epoch: int | None) -> None:
        room = self.rooms.get(name)
        if room is None:
            return
        if epoch is not None:
            room.epoch = max(room.epoch, epoch)
        unread, self.unread = self.unread, []
        for conn_id, msg_id, text in unread:  # read at last, in order
            self._sequence(room, conn_id, msg_id, text)

    def crash(self) -> None:
        """A process restart: every in-memory thing is gone, clients see 1001."""
        self.handoffs = Handoffs(self.instance, tombstone_ttl=600.0)
        self.rooms.clear()
        self.unread.clear()
        for conn_id, client in list(self.conns.items()):
            del self.conns[conn_id]
            client.closed(int(CloseCode.GOING_AWAY))

    # -- client side -----------------------------------------------------------
    def serving(self, name: str) -> bool:
        return name in self.rooms and name not in self.handoffs.frozen

    def join(self, client: SimClient, ticket: Ticket, since: int | None) -> int | None:
        """Returns a close code, or None when joined."""
        now = self.cluster.now
        if ticket.instance != self.instance:
            return int(CloseCode.TICKET_MISMATCH)
        adm = self.handoffs.admit(ticket.room, ticket.epoch, now)
        if adm.kind == "refuse":
            return adm.close_code
        if adm.kind == "activate":
            assert adm.snapshot is not None and adm.epoch is not None
            self.rooms[ticket.room] = Room.from_snapshot(
                adm.snapshot, instance=self.instance, epoch=adm.epoch, owner_epoch=adm.epoch)
        elif adm.kind == "unfrozen":
            self._unfreeze(ticket.room, adm.epoch)
        elif adm.kind == "stale":
            self.rooms.pop(ticket.room, None)
            self.unread.clear()
            for conn_id, other in list(self.conns.items()):
                del self.conns[conn_id]
                other.closed(int(adm.close_code or CloseCode.ROOM_MOVED))
        room = self.rooms.get(ticket.room)
        if room is None:
            opened = self.cluster.open(ticket.room, self.instance, ticket.epoch)
            if isinstance(opened, int):
                return opened
            room = self.rooms[ticket.room] = opened
        elif ticket.epoch < room.owner_epoch:
            return int(CloseCode.NOT_OWNER)
        self.cluster.check_owners()
        conn_id = self.cluster.next_conn()
        self.conns[conn_id] = client
        client.conn_id, client.shard = conn_id, self
        room.join(conn_id, client.user, now, since)
        return None

    def send(self, client: SimClient, msg_id: str, text: str) -> None:
        if ROOM in self.handoffs.frozen:
            # The real shard stops reading a frozen room's sockets: the send waits
            # unread in the TCP buffer, neither acked nor broadcast.
            self.unread.append((client.conn_id, msg_id, text))
        else:
            self._sequence(self.rooms[ROOM], client.conn_id, msg_id, text)

    def _sequence(self, room: Room, conn_id: int, msg_id: str, text: str) -> None:
        client = self.conns.get(conn_id)
        if client is None:
            return  # its connection went: it resends after reconnecting
        out = room.send(client.user, msg_id, text, self.cluster.now)
        if out.broadcast is None:
            self.cluster.duplicate_acks.append((client.user, msg_id, out.seq))
        client.acked(msg_id, out.seq)


class SimClient:
    """A chat client: outbox of unacked ids, acked ids, reconnect rule."""

    def __init__(self, user: str, cluster: Cluster) -> None:
        self.user = user
        self.cluster = cluster
        self.outbox = Outbox()
        self.acks: dict[str, int] = {}
        self.shard: SimShard | None = None
        self.conn_id = -1
        self.last_seq = 0

    def acked(self, msg_id: str, seq: int) -> None:
        if msg_id in self.acks:
            assert self.acks[msg_id] == seq, f"{msg_id} acked as {self.acks[msg_id]} then {seq}"
        self.acks[msg_id] = seq
        self.outbox.ack(msg_id)
        self.last_seq = max(self.last_seq, seq)

    def closed(self, code: int) -> None:
        self.shard = None
        self.cluster.closes.append((self.user, code))

    def connect(self) -> int | None:
        """Ask the directory, join with since, resend the outbox; the close code if refused."""
        ticket = self.cluster.ticket(self.user)
        code = self.cluster.shards[ticket.instance].join(self, ticket, self.last_seq)
        if code is not None:
            return code
        self.outbox.new_connection()
        for entry in self.outbox.due():
            self.outbox.mark_sent(entry.id)
            assert self.shard is not None
            self.shard.send(self, entry.id, entry.text)
        return None

    def send(self, msg_id: str, text: str) -> None:
        self.outbox.add(msg_id, text)
        if self.shard is not None:
            self.outbox.mark_sent(msg_id)
            self.shard.send(self, msg_id, text)

    def resend_acked(self, msg_id: str) -> None:
        """A retry of an already acked id (its ack was lost on the client's side)."""
        assert self.shard is not None
        self.shard.send(self, msg_id, "retry")


class Cluster:
    """Directory row, shards, clients and the move driver with fault injection."""

    def __init__(self, instances: tuple[str, ...] = ("i1", "i2")) -> None:
        self.now = 1000.0
        self.shards = {i: SimShard(i, self) for i in instances}
        self.row = Row(instances[0], 1, 1, None)
        self.persisted: dict[str, Any] | None = None
        self.closes: list[tuple[str, int]] = []
        self.duplicate_acks: list[tuple[str, str, int]] = []
        self.calls: list[str] = []
        self._conn = 0

    def next_conn(self) -> int:
        self._conn += 1
        return self._conn

    # -- directory ---------------------------------------------------------------
    def ticket(self, user: str) -> Ticket:
        return Ticket(ROOM, self.row.instance, self.row.epoch)

    def open(self, room: str, instance: str, ticket_epoch: int) -> Room | int:
        """The directory's ``open`` (docs/INTERNALS.md), answering a Room or a close code."""
        r = self.row
        if r.state == "moving":
            return int(CloseCode.TRY_AGAIN_LATER)
        if r.instance != instance or ticket_epoch < r.owner_epoch:
            return int(CloseCode.NOT_OWNER)
        lost = r.opened_epoch is not None
        if r.opened_epoch is not None and r.opened_epoch == r.epoch:
            r.epoch += 1
        r.opened_epoch = r.epoch
        base = r.epoch << 32 if lost else 0
        return Room(name=room, instance=instance, epoch=r.epoch, seq_base=base, lost=lost,
                    owner_epoch=r.owner_epoch)

    def reserve(self, move_id: str, to: str) -> moves.Move:
        assert self.row.state == "active", "room already moving"
        self.row.state, self.row.move_id = "moving", move_id
        move, self.pending = moves.begin(move_id=move_id, room=ROOM, source=self.row.instance,
                                         target=to, from_epoch=self.row.epoch, now=self.now)
        self.persisted = move.to_dict()
        return move

    def commit_db(self, p: dict[str, Any]) -> str:
        r = self.row
        if r.settled.get(p["move_id"]) == "committed":
            return "commit_ok"
        if r.settled.get(p["move_id"]) == "rolled_back":
            return "commit_lost"
        assert r.state == "moving" and r.move_id == p["move_id"]
        r.instance, r.epoch, r.owner_epoch = p["to"], p["epoch"], p["epoch"]
        if p["carries_state"]:
            r.opened_epoch = p["epoch"]
        r.state, r.move_id = "active", None
        r.settled[p["move_id"]] = "committed"
        return "commit_ok"

    def rollback_db(self, p: dict[str, Any]) -> str:
        r = self.row
        if r.settled.get(p["move_id"]) == "committed":
            return "rollback_lost"
        if r.settled.get(p["move_id"]) == "rolled_back":
            return "rollback_ok"
        assert r.state == "moving" and r.move_id == p["move_id"]
        r.epoch = p["epoch"]  # the reserved epoch is burnt
        if r.opened_epoch is not None:
            r.opened_epoch = p["epoch"]
        r.state, r.move_id = "active", None
        r.settled[p["move_id"]] = "rolled_back"
        return "rollback_ok"

    # -- invariants ----------------------------------------------------------------
    def owners(self) -> list[str]:
        """Shards that would serve the room right now (serving, or able to activate)."""
        out = [i for i, s in self.shards.items() if s.serving(ROOM)]
        for i, s in self.shards.items():
            a = s.handoffs.adopted.get(ROOM)
            if a is not None and self.row.instance == i and self.row.epoch == a.epoch \
                    and self.row.state == "active":
                out.append(i)
        return out

    def check_owners(self) -> None:
        owners = self.owners()
        if len(owners) > 1:
            raise OwnershipViolation(f"room served by {owners} at once")
        if owners and owners[0] != self.row.instance:
            raise OwnershipViolation(f"{owners[0]} serves, directory says {self.row.instance}")

    # -- the driver ------------------------------------------------------------------
    def drive(self, move: moves.Move, *, faults: dict[str, list[str]] | None = None,
              restart_after: int | None = None, crash_in_call: int | None = None,
              timeout_at: int | None = None, on_call: dict[str, Any] | None = None,
              retries: int = moves.DEFAULT_RETRIES, max_steps: int = 200) -> moves.Move:
        """Run a move to its end.

        ``restart_after=N``: the directory restarts once the N-th reply is
        handled and persisted. ``crash_in_call=N``: it dies while the N-th call
        is in flight -- the call lands, its reply is never handled -- and a new
        directory process recovers from the last persisted record.
        """
        faults = {k: list(v) for k, v in (faults or {}).items()}
        queue = list(self.pending)
        steps = 0
        while queue:
            steps += 1
            assert steps < max_steps, "move did not settle"
            action = queue.pop(0)
            if action.call == "finished":
                break
            if timeout_at is not None and steps == timeout_at:
                move, new = moves.handle(move, moves.Event("timeout"), self.now)
                self._persist(move)
                # A timeout before the commit replaces the calls in flight (their late
                # replies are stale); after it, the move rolls forward as it was.
                queue = new or [action, *queue]
                continue
            self.now += 0.001 + action.delay_s
            event = self._perform(action, faults, on_call or {})
            self.check_owners()
            if crash_in_call is not None and steps == crash_in_call:
                move, queue = moves.recover(self.persisted or {}, self.now)
                self._persist(move)
                continue
            move, new = moves.handle(move, event, self.now, retries=retries)
            self._persist(move)
            still = dict(move.outstanding)
            queue = [a for a in queue if still.get(KIND[a.call]) == a.token] + new
            if restart_after is not None and steps == restart_after:
                move, queue = moves.recover(self.persisted or {}, self.now)
                self._persist(move)
        return move

    def _persist(self, move: moves.Move) -> None:
        self.persisted = move.to_dict()

    def _perform(self, a: moves.Action, faults: dict[str, list[str]],
                 on_call: dict[str, Any]) -> moves.Event:
        self.calls.append(a.call)
        kind = KIND[a.call]
        plan = faults.get(a.call)
        mode = plan.pop(0) if plan else None
        if mode == "drop_request":
            return moves.Event(f"{kind}_failed", a.token, {"error": "injected"})
        if kind == "commit":
            outcome = self.commit_db(a.payload)
            payload: dict[str, Any] = {}
        elif kind == "rollback":
            outcome = self.rollback_db(a.payload)
            payload = {}
        else:
            assert a.instance is not None
            payload = getattr(self.shards[a.instance], kind)(a.payload)
            outcome = f"{kind}_ok"
        hook = on_call.get(a.call)
        if hook is not None:
            hook()
        if mode == "drop_reply":
            return moves.Event(f"{kind}_failed", a.token, {"error": "injected"})
        return moves.Event(outcome, a.token, payload)

