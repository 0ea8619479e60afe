"""Presence under churn (``presence_batch``): gathered per room, never out of order.

The first presence frame after a quiet spell goes out at once; the others of its
window together at the window's end, one write per member; a message flushes what
is held before it; a connection that joined during a window gets only what came
after its join. The randomized test replays a history of joins, leaves and
messages and checks every member's view against what happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from roomshard.config import ConfigError
from roomshard.testing.timing import await_until, t
from shard.live_rooms import MAX_HELD_PRESENCE
from tests.shard.test_live_room import CFG, Fixture, Member, decode_frames, turns

WINDOW = 0.02
LONGEST = 4 * WINDOW
BATCHED = dataclasses.replace(CFG, presence_batch=WINDOW, presence_batch_max=LONGEST)


class Counted(Member):
    """A member that counts its writes (one per flush that had something), and when."""

    def __init__(self, writer) -> None:
        super().__init__(writer)
        self.writes = 0
        self.written_at: list[float] = []

    def flush(self) -> None:
        if self.pending and self.reading:
            self.writes += 1
            self.written_at.append(asyncio.get_running_loop().time())
        super().flush()


class Batched(Fixture):
    def __init__(self) -> None:
        super().__init__(BATCHED)

    def join(self, user: str, since: int | None = None) -> Counted:
        m = Counted(self.writer)
        self.ids += 1
        self.live.join(m, self.ids, user, since)  # type: ignore[arg-type]
        return m


def events(m: Member) -> list[tuple[str, str]]:
    return [(x["event"], x["user"]) for x in m.messages() if x["type"] == "presence"]


async def settled(f: Fixture, *members: Member) -> None:
    """Until the room holds nothing and every queue is written."""
    async def done() -> bool:
        return not f.live._held and all(not m.pending for m in members)
    await await_until(done, t(5), "presence written")


async def test_the_first_goes_at_once_the_window_s_others_together():
    f = Batched()
    alice = f.join("alice")
    await turns()
    members = [alice, f.join("bob")]
    await turns()
    assert events(alice) == [("join", "bob")]  # a quiet room: at once
    writes = alice.writes
    for user in ("carol", "dave", "erin"):
        members.append(f.join(user))
        await turns()
    assert events(alice) == [("join", "bob")]  # held in the window bob's join opened
    await settled(f, *members)
    assert events(alice) == [("join", u) for u in ("bob", "carol", "dave", "erin")]
    assert alice.writes == writes + 1  # the window's three in one write
    assert events(members[2]) == [("join", "dave"), ("join", "erin")]
    # Each presence frame a member got is counted once.
    assert f.stats.deliveries == sum(len(events(m)) for m in members) == 4 + 3 + 2 + 1


async def test_a_member_that_joined_during_the_window_gets_only_what_came_after():
    f = Batched()
    alice = f.join("alice")
    f.join("bob")  # opens the window
    carol = f.join("carol")  # held
    dave = f.join("dave")  # held; carol should get it, dave not his own
    f.live.leave(f.live.conns[2])  # bob leaves: held
    await settled(f, alice, carol, dave)
    assert events(alice) == [("join", "bob"), ("join", "carol"), ("join", "dave"), ("leave", "bob")]
    assert carol.messages()[0]["members"] == ["alice", "bob", "carol"]
    assert events(carol) == [("join", "dave"), ("leave", "bob")]
    assert dave.messages()[0]["members"] == ["alice", "bob", "carol", "dave"]
    assert events(dave) == [("leave", "bob")]


async def test_a_message_sends_what_is_held_before_it():
    f = Batched()
    alice = f.join("alice")
    f.join("bob")
    await turns()
    carol = f.join("carol")  # held: the window is open
    f.live.send(alice, "m1", "hi")  # type: ignore[arg-type]
    await turns()
    kinds = [(x["type"], x.get("user")) for x in alice.messages()[1:]]
    assert kinds == [("presence", "bob"), ("presence", "carol"), ("message", "alice"), ("ack", None)]
    assert [x["type"] for x in carol.messages()] == ["welcome", "message"]


async def test_what_a_window_holds_is_bounded():
    """Past MAX_HELD_PRESENCE frames a window's frames go out early (each member's
    queue grows in bounded pieces; a late joiner's tail is bounded the same)."""
    f = Batched()
    alice = f.join("alice")
    for n in range(5 * MAX_HELD_PRESENCE):
        f.join(f"u{n}")
        if n % 7 == 0:
            await turns()
    await settled(f, alice)
    assert len(events(alice)) == 5 * MAX_HELD_PRESENCE
    assert max(len(decode_frames(chunk)) for chunk in alice.frames) == MAX_HELD_PRESENCE


async def test_a_member_replaying_its_resume_gets_the_window_after_its_replay():
    f = Batched()
    alice = f.join("alice")
    for i in range(5):
        f.live.send(alice, f"m{i}", "x" * 1000)  # type: ignore[arg-type]
    await turns()
    f.join("bob")  # opens the window
    late = f.join("late", since=0)  # a resume: replayed, then joins the fan-out
    f.join("carol")  # held
    await settled(f, alice, late)
    kinds = [(x["type"], x.get("seq") or x.get("user")) for x in late.messages()[1:]]
    assert kinds == [*[("message", s) for s in range(1, 6)], ("presence", "carol")]


async def test_randomized_histories_every_member_sees_what_happened_in_order():
    """Random joins, leaves and messages with windows ending in between: each member's
    welcome plus its presence frames equal the room's members at every message it got
    and at the end; nobody hears of their own join; no frame twice."""
    for seed in range(12):
        rng = random.Random(seed)
        f = Batched()
        live: dict[str, Counted] = {}
        sent = 0
        truth: dict[int, list[str]] = {}  # the room's users when each seq was sent
        for step in range(120):
            roll = rng.random()
            if roll < 0.45 or not live:
                user = f"u{seed}-{step}"
                live[user] = f.join(user)
            elif roll < 0.7:
                user = rng.choice(sorted(live))
                f.live.leave(live.pop(user))  # type: ignore[arg-type]
            else:
                sender = live[rng.choice(sorted(live))]
                sent += 1
                f.live.send(sender, f"m{sent}", "members?")  # type: ignore[arg-type]
                truth[sent] = sorted(live)
            if rng.random() < 0.5:
                await turns()
            if rng.random() < 0.1:
                await asyncio.sleep(WINDOW * rng.random() * 2)
        await settled(f, *live.values())
        for user, m in live.items():
            frames = m.messages()
            assert frames[0]["type"] == "welcome"
            view = set(frames[0]["members"])
            seen_seq = set()
            for x in frames[1:]:
                if x["type"] == "presence":
                    assert x["user"] != user or x["event"] == "leave", (seed, user, x)
                    if x["event"] == "join":
                        assert x["user"] not in view, (seed, user, x)
                        view.add(x["user"])
                    else:
                        assert x["user"] in view, (seed, user, x)
                        view.discard(x["user"])
                elif x["type"] == "message":
                    assert x["seq"] not in seen_seq
                    seen_seq.add(x["seq"])
                    assert sorted(view) == truth[x["seq"]], (seed, user, x["seq"])
            assert sorted(view) == sorted(live), (seed, user)


async def test_windows_grow_while_the_churn_goes_on_and_start_over_after_a_quiet_one():
    """Each busy window is twice the last, up to presence_batch_max; a quiet window
    ends the growth: the next event goes at once and opens a window of presence_batch."""
    f = Batched()
    loop = asyncio.get_running_loop()
    alice = f.join("alice")
    await turns()
    alice.written_at.clear()  # her welcome
    members = [alice]
    n = 0
    start = loop.time()
    while loop.time() - start < 10 * WINDOW:  # a join every turn: churn throughout
        n += 1
        members.append(f.join(f"u{n}"))
        await asyncio.sleep(0.002)
    await settled(f, *members)
    gaps = [b - a for a, b in zip(alice.written_at, alice.written_at[1:])]
    # The first join went at once; then windows of 0.02, 0.04, 0.08, 0.08, ... (a timer
    # may fire up to a clock tick early, never a window early).
    expected = [min(WINDOW * 2 ** i, LONGEST) for i in range(len(gaps))]
    assert len(gaps) >= 4
    assert all(gap >= want - 0.002 for gap, want in zip(gaps, expected)), (gaps, expected)
    assert len(events(alice)) == n  # nothing lost by the longer windows

    async def quiet() -> bool:
        return f.live._window is None
    await await_until(quiet, t(5), "the quiet window after the churn closes")
    writes = alice.writes
    members.append(f.join("late"))
    await turns()
    assert alice.writes == writes + 1 and events(alice)[-1] == ("join", "late")  # at once
    assert f.live._window_len == WINDOW  # and the window it opened is the shortest again
    await settled(f, *members)


def test_a_window_may_not_grow_to_less_than_it_starts_at():
    """ROOMSHARD_PRESENCE_BATCH_MAX below ROOMSHARD_PRESENCE_BATCH is refused at start."""
    with pytest.raises(ConfigError, match="PRESENCE_BATCH_MAX"):
        dataclasses.replace(CFG, presence_batch=1.0, presence_batch_max=0.5)
    assert dataclasses.replace(CFG, presence_batch=0, presence_batch_max=0).presence_batch_max == 0
