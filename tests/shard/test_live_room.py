"""A live room on its own (no server, no sockets): fan-out, acks, presence, paced resumes."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson

from roomshard.config import ShardConfig
from roomshard.wire.protocol import CloseCode
from shard.live_rooms import REPLAY_CHUNK_BYTES, LiveRoom, RoomContext
from shard.room import Room
from shard.stats import Stats
from shard.writer import Writer

NOW = 1_700_000_000.0
# Presence at once unless a test batches it (test_presence_batch.py).
CFG = ShardConfig(instance="i1", port=0, directory_url="http://directory.test",
                  cluster_secret="s" * 32, presence_batch=0)


class Member:
    """A connection as the room sees it: its send queue, flushed by the writer."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.queue_limit = 0
        self.replaying = False
        self.reading = True  # False: the kernel takes nothing, no refill
        self.room: LiveRoom | None = None
        self.conn_id = 0
        self.user = ""
        self.transport = None
        self.closed: int | None = None
        self.failed: int | None = None
        self.bucket: object = None
        self.frames: list[bytes] = []  # written, in order
        self.largest_write = 0

    def queue(self, frame: bytes) -> None:
        if not self.pending:
            self.writer.mark_dirty(self)
        self.pending.append(frame)
        self.pending_bytes += len(frame)

    def flush(self) -> None:
        if not self.reading:
            return
        self.largest_write = max(self.largest_write, self.pending_bytes)
        self.frames.extend(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        if self.replaying and self.room is not None:
            self.room.refill(self)  # as Connection.flush: everything was taken

    def joined(self, room: LiveRoom, conn_id: int, user: str, bucket: object) -> None:
        self.room, self.conn_id, self.user, self.bucket = room, conn_id, user, bucket

    def fail(self, code: int, reason: str) -> None:
        self.failed = code

    def close(self, code: int, reason: str = "") -> None:
        self.closed = code
        if self.room is not None:
            self.room.leave(self)  # as the server's detach

    def messages(self) -> list[dict]:
        """Every frame written, decoded (a write may hold several: a presence window's)."""
        return [m for chunk in self.frames for m in decode_frames(chunk)]


def decode_frames(chunk: bytes) -> list[dict]:
    """The (unmasked, JSON) frames one queued chunk holds, decoded."""
    out = []
    pos = 0
    while pos < len(chunk):
        start, size = _payload(chunk, pos)
        out.append(orjson.loads(chunk[start:start + size]))
        pos = start + size
    return out


def _payload(data: bytes, pos: int) -> tuple[int, int]:
    """Where the payload of the (unmasked) frame at ``pos`` starts, and its length."""
    n = data[pos + 1] & 0x7F
    if n < 126:
        return pos + 2, n
    if n == 126:
        return pos + 4, int.from_bytes(data[pos + 2:pos + 4], "big")
    return pos + 10, int.from_bytes(data[pos + 2:pos + 10], "big")


class Fixture:
    def __init__(self, cfg: ShardConfig = CFG, **room_kw) -> None:
        self.stats = Stats()
        self.writer = Writer()
        self.mono = 0.0  # the monotonic clock the rate limit reads
        self.room = Room(name="r", instance="i1", epoch=1, **room_kw)
        self.live = LiveRoom(self.room, RoomContext(cfg, self.stats, self.writer,
                                                    lambda: NOW, lambda: self.mono))
        self.ids = 0

    def join(self, user: str, since: int | None = None) -> Member:
        m = Member(self.writer)
        self.ids += 1
        self.live.join(m, self.ids, user, since)  # type: ignore[arg-type]
        return m


async def turns(n: int = 1) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_message_reaches_every_member_once_and_its_sender_an_ack_after_it():
    f = Fixture()
    alice, bob, carol = f.join("alice"), f.join("bob"), f.join("carol")
    await turns()
    f.live.send(alice, "m1", "hi")  # type: ignore[arg-type]
    await turns()
    kinds = {m.user: [x["type"] for x in m.messages()] for m in (alice, bob, carol)}
    assert kinds == {"alice": ["welcome", "presence", "presence", "message", "ack"],
                     "bob": ["welcome", "presence", "message"],
                     "carol": ["welcome", "message"]}
    assert alice.frames[3] is bob.frames[2] is carol.frames[1]  # encoded once for the room
    assert f.stats.messages_out == 1 and f.stats.deliveries == 3 + 3  # + presence
    f.live.leave(carol)  # type: ignore[arg-type]
    await turns()
    assert alice.messages()[-1] == {"type": "presence", "event": "leave", "user": "carol"}


async def test_a_resume_is_written_in_chunks_as_the_member_reads_then_joins_the_fan_out():
    f = Fixture()
    alice = f.join("alice")
    text = "x" * 100_000
    for i in range(12):  # about 1.2 MB of history
        f.live.send(alice, f"m{i}", text)  # type: ignore[arg-type]
    await turns()
    bob = f.join("bob", since=0)
    f.live.send(alice, "during", "sent while bob catches up")  # type: ignore[arg-type]
    carol = f.join("carol")  # a presence while bob replays: held until he caught up
    await turns(20)
    got = bob.messages()
    assert got[0]["type"] == "welcome" and got[0]["recovered"] is True
    assert [m["seq"] for m in got if m["type"] == "message"] == list(range(1, 14))
    assert got[-1] == {"type": "presence", "event": "join", "user": "carol"}
    assert bob.largest_write <= REPLAY_CHUNK_BYTES + 110_000  # never the whole replay at once
    assert not bob.replaying and bob.conn_id in f.live.conns
    f.live.send(carol, "after", "now live")  # type: ignore[arg-type]
    await turns()
    assert bob.messages()[-1]["id"] == "after"
    assert carol.closed is None and alice.closed is None


async def test_a_replay_chunk_fits_a_small_send_queue():
    """With a send queue smaller than a chunk's default size, each chunk is at most half the
    queue (plus one message): the replay never overflows the queue it is written to (it did:
    every resume closed with 4009, and every retry again)."""
    queue = 64 * 1024
    f = Fixture(dataclasses.replace(CFG, send_queue_bytes=queue))
    alice = f.join("alice")
    for i in range(100):  # about 400 KB of history
        f.live.send(alice, f"m{i}", "x" * 4000)  # type: ignore[arg-type]
    await turns()
    bob = f.join("bob", since=0)
    await turns(100)
    got = bob.messages()
    assert [m["seq"] for m in got if m["type"] == "message"] == list(range(1, 101))
    assert bob.largest_write <= queue // 2 + 4100, bob.largest_write
    assert not bob.replaying and bob.closed is None


async def test_a_replay_the_history_window_overtakes_is_closed_4009():
    f = Fixture(history_limit=5)
    alice = f.join("alice")
    for i in range(5):
        f.live.send(alice, f"m{i}", "y" * 100_000)  # type: ignore[arg-type]
    await turns()
    bob = f.join("bob", since=0)
    bob.reading = False  # reads nothing: the replay does not move
    await turns()
    for i in range(5):  # the window moves past bob's next message
        f.live.send(alice, f"n{i}", "z")  # type: ignore[arg-type]
    assert bob.closed == CloseCode.SLOW_CONSUMER
    assert f.stats.slow_consumer_closes == 1
    assert bob.conn_id not in f.live.replaying and f.live.connection_count() == 1


async def test_a_received_frame_is_parsed_and_every_refusal_answered():
    f = Fixture()
    alice = f.join("alice")
    receive = f.live.receive
    receive(alice, b'{"type":"send","id":"m1","text":"hi"}', True)  # type: ignore[arg-type]
    receive(alice, b'{"type":"nope"}', True)  # type: ignore[arg-type]
    receive(alice, b'{"type":"send","id":"m2","text":"' + b"x" * 5000 + b'"}', True)  # type: ignore[arg-type]
    await turns()
    got = alice.messages()[1:]
    assert [m["type"] for m in got] == ["message", "ack", "error", "error"]
    assert got[2]["code"] == "bad_request"
    assert got[3]["code"] == "too_long" and got[3]["id"] == "m2"
    assert f.stats.messages_in == 3 and f.stats.rejected == 2 and f.room.seq == 1
    receive(alice, b'{"type":"send","id":"m3","text":"\xff"}', True)  # type: ignore[arg-type]
    assert alice.failed == 1007 and f.room.seq == 1  # not UTF-8 (RFC 6455 8.1)


async def test_over_the_rate_a_message_gets_rate_limited_and_a_flood_the_4008_close():
    f = Fixture()
    alice = f.join("alice")
    for i in range(CFG.rate_burst + 1):  # the burst, then one over it (no time passes)
        f.live.receive(alice, b'{"type":"send","id":"r%d","text":"t"}' % i, True)  # type: ignore[arg-type]
    await turns()
    last = alice.messages()[-1]
    assert last == {"type": "error", "code": "rate_limited",
                    "message": f"over {CFG.rate:g} messages/s", "id": f"r{CFG.rate_burst}"}
    assert f.room.seq == CFG.rate_burst and alice.closed is None
    for i in range(3 * CFG.rate_burst):  # hammering on: 3 x burst strikes close it
        f.live.receive(alice, b'{"type":"send","id":"x","text":"t"}', True)  # type: ignore[arg-type]
    assert alice.closed == CloseCode.POLICY
    f.mono += 10.0  # a well-behaved client after a pause is fine again
    bob = f.join("bob")
    f.live.receive(bob, b'{"type":"send","id":"b1","text":"t"}', True)  # type: ignore[arg-type]
    assert f.room.seq == CFG.rate_burst + 1


def _ordered(msg_id: str) -> bytes:
    return orjson.dumps({"type": "send", "id": msg_id, "text": msg_id, "ordered": True})


async def test_an_ordered_send_behind_a_refused_one_waits_until_that_one_is_accepted():
    """The order hold: sends written before the client heard of a refusal cannot overtake
    the refused send once the bucket has refilled; they are refused with its code, take no
    token, and go once it has been written again and accepted."""
    f = Fixture()
    alice = f.join("alice")
    for i in range(CFG.rate_burst + 1):  # the burst, then o40 refused
        f.live.receive(alice, _ordered(f"o{i}"), True)  # type: ignore[arg-type]
    f.mono += 1.0  # the bucket refills: 20 tokens
    for msg_id in ("o41", "o42"):  # written before the client heard of o40's refusal
        f.live.receive(alice, _ordered(msg_id), True)  # type: ignore[arg-type]
    await turns()
    errors = [m for m in alice.messages() if m["type"] == "error"]
    assert [(e["code"], e["id"]) for e in errors] == [("rate_limited", f"o{CFG.rate_burst}"),
                                                      ("rate_limited", "o41"),
                                                      ("rate_limited", "o42")]
    assert "'o40'" in errors[1]["message"]
    assert f.room.seq == CFG.rate_burst  # nothing overtook o40
    assert f.stats.rate_limited == 3
    # A send without "ordered" is not held back (a client that drops refused sends).
    f.live.receive(alice, b'{"type":"send","id":"plain","text":"t"}', True)  # type: ignore[arg-type]
    assert f.room.seq == CFG.rate_burst + 1
    for msg_id in ("o40", "o41", "o42"):  # written again, in order: all accepted
        f.live.receive(alice, _ordered(msg_id), True)  # type: ignore[arg-type]
    await turns()
    sent = [m["id"] for m in alice.messages() if m["type"] == "message"]
    assert sent[CFG.rate_burst:] == ["plain", "o40", "o41", "o42"]
    assert alice.bucket.held is None  # type: ignore[attr-defined]


async def test_the_held_send_refused_again_keeps_the_hold_and_hammering_behind_it_closes():
    f = Fixture()
    alice = f.join("alice")
    for i in range(CFG.rate_burst + 1):
        f.live.receive(alice, _ordered(f"o{i}"), True)  # type: ignore[arg-type]
    f.live.receive(alice, _ordered("o40"), True)  # type: ignore[arg-type]  # refused again
    f.mono += 0.2  # 4 tokens: o41 behind the hold is refused without taking one
    f.live.receive(alice, _ordered("o41"), True)  # type: ignore[arg-type]
    assert f.room.seq == CFG.rate_burst
    f.live.receive(alice, _ordered("o40"), True)  # type: ignore[arg-type]
    f.live.receive(alice, _ordered("o41"), True)  # type: ignore[arg-type]
    assert f.room.seq == CFG.rate_burst + 2
    for i in range(CFG.rate_burst + 1):  # 2 tokens left: p2 is refused and held ...
        f.live.receive(alice, _ordered(f"p{i}"), True)  # type: ignore[arg-type]
    for _ in range(3 * CFG.rate_burst):  # ... and hammering behind it is a flood: 4008
        f.live.receive(alice, _ordered("behind"), True)  # type: ignore[arg-type]
    assert alice.closed == CloseCode.POLICY
    assert f.room.seq == CFG.rate_burst + 4  # o40, o41, p0, p1
