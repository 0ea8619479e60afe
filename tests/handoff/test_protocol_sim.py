"""The whole handoff wired in memory: coordinator, source and target shards, clients.

Every scenario runs the same chat (messages acked before the move, one sent
while the room is frozen, an acked one retried after) under injected faults
and checks the guarantees of the contract's "Room handoff guarantees".
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directory.domain import moves
from roomshard.wire.protocol import CloseCode
from shard.frames import frame_payload
from tests.handoff.sim import ROOM, Cluster, SimClient, Ticket

PRE_COMMIT_CALLS = ["call_freeze", "call_adopt", "commit_db"]
ROLLBACK_CALLS = ["mark_rolled_back", "call_discard", "call_abort"]
MODES = ["drop_request", "drop_reply"]


def run(**drive_kw: object) -> tuple[Cluster, moves.Move, dict[str, SimClient], dict[str, int]]:
    """Chat, move i1 -> i2 under the given faults, reconnect everyone, check every guarantee."""
    c = Cluster()
    alice, bob = SimClient("alice", c), SimClient("bob", c)
    assert alice.connect() is None and bob.connect() is None
    alice.send("a1", "hello")
    bob.send("b1", "hi alice")
    alice.send("a2", "how are you")
    acked_before = dict(alice.acks) | {f"bob:{k}": v for k, v in bob.acks.items()}
    assert acked_before == {"a1": 1, "a2": 3, "bob:b1": 2}

    sent_while_frozen = []

    def during_freeze() -> None:
        if not sent_while_frozen:
            sent_while_frozen.append(True)
            alice.send("a3", "sent while frozen")
            assert "a3" not in alice.acks, "a send was acked while the room was frozen"

    move = c.reserve("m1", "i2")
    move = c.drive(move, on_call={"call_freeze": during_freeze}, **drive_kw)  # type: ignore[arg-type]
    assert move.state in moves.TERMINAL
    c.check_owners()

    # Afterwards: a newcomer connects, everyone closed reconnects with since and
    # resends its outbox, and alice retries an id that was already acked.
    carol = SimClient("carol", c)
    assert carol.connect() is None
    for cl in (alice, bob):
        if cl.shard is None:
            assert cl.connect() is None
    alice.resend_acked("a1")
    c.check_owners()

    owners = c.owners()
    assert owners == [c.row.instance] and c.row.state == "active"
    room = c.shards[owners[0]].rooms[ROOM]
    history = [orjson.loads(frame_payload(f)) for f in room.history]
    ids = [(m["user"], m["id"]) for m in history]
    assert len(ids) == len(set(ids)), "a message was sequenced twice"
    assert [m["seq"] for m in history] == list(range(1, room.seq + 1)), "seq has a gap"
    by_id = {(m["user"], m["id"]): m["seq"] for m in history}
    for key, seq in acked_before.items():
        user, _, mid = key.rpartition(":")
        assert by_id[(user or "alice", mid)] == seq, f"acked {key} lost or renumbered"
    assert not alice.outbox and not bob.outbox, "a send was never acked"
    if sent_while_frozen:
        assert ("alice", "a3") in by_id
    assert ("alice", "a1", 1) in c.duplicate_acks  # the retry got the original ack
    return c, move, {"alice": alice, "bob": bob, "carol": carol}, acked_before


def assert_committed(c: Cluster, move: moves.Move) -> None:
    assert move.state is moves.State.RELEASED
    assert c.row.instance == "i2" and c.row.epoch == 2 and c.row.owner_epoch == 2
    assert ("alice", int(CloseCode.ROOM_MOVED)) in c.closes
    source = c.shards["i1"]
    assert ROOM not in source.rooms
    # The tombstone refuses a ticket from before the move without asking anyone.
    stale = SimClient("mallory", c)
    assert source.join(stale, Ticket(ROOM, "i1", 1), None) == CloseCode.NOT_OWNER


def assert_rolled_back(c: Cluster, move: moves.Move) -> None:
    assert move.state is moves.State.ABORTED
    assert c.row.instance == "i1" and c.row.epoch == 2, "the reserved epoch is burnt"
    assert c.row.owner_epoch == 1
    assert ROOM not in c.shards["i2"].rooms


def test_clean_move_keeps_seq_history_and_idempotency() -> None:
    """A move without faults commits, keeps seq/history/ids and reports the contract shape."""
    c, move, _, _ = run()
    assert_committed(c, move)
    rep = moves.report(move)
    assert set(rep) == {"room", "from", "to", "epoch", "members", "messages_transferred",
                        "pause_ms"}
    assert rep["from"] == "i1" and rep["to"] == "i2" and rep["epoch"] == 2
    assert rep["members"] == 2 and rep["messages_transferred"] == 3
    assert c.calls == ["call_freeze", "call_adopt", "commit_db", "call_release"]


@pytest.mark.parametrize("call", PRE_COMMIT_CALLS + ["call_release"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("times", [1, 2])
def test_call_failing_within_retries_still_commits(call: str, mode: str, times: int) -> None:
    """A call that fails once or twice (request or reply lost) is retried and the move commits."""
    c, move, _, _ = run(faults={call: [mode] * times})
    assert_committed(c, move)
    assert c.calls.count(call) == times + 1


@pytest.mark.parametrize("call", ["call_freeze", "call_adopt"])
@pytest.mark.parametrize("mode", MODES)
def test_call_failing_past_retries_rolls_back(call: str, mode: str) -> None:
    """A shard call failing three times rolls the move back to the serving source."""
    c, move, _, _ = run(faults={call: [mode] * 3})
    assert_rolled_back(c, move)


def test_commit_failing_before_the_database_rolls_back() -> None:
    """A commit that never reaches the database three times rolls back."""
    c, move, _, _ = run(faults={"commit_db": ["drop_request"] * 3})
    assert_rolled_back(c, move)


def test_commit_whose_replies_are_lost_rolls_forward() -> None:
    """A commit that landed but whose replies were lost wins the row: the rollback finds it."""
    c, move, _, _ = run(faults={"commit_db": ["drop_reply"] * 3})
    assert_committed(c, move)
    assert "mark_rolled_back" in c.calls and "call_discard" not in c.calls


def test_release_is_retried_until_it_lands() -> None:
    """After the commit a failing release is retried past the retry budget, never rolled back."""
    c, move, _, _ = run(faults={"call_release": ["drop_request"] * 6})
    assert_committed(c, move)
    assert c.calls.count("call_release") == 7 and "mark_rolled_back" not in c.calls


@pytest.mark.parametrize("call", ROLLBACK_CALLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("times", [1, 2, 3])
def test_rollback_survives_failing_cleanup(call: str, mode: str, times: int) -> None:
    """With the source frozen and the move rolling back, failing rollback calls still settle it."""
    c, move, _, _ = run(faults={"call_adopt": ["drop_request"] * 3, call: [mode] * times})
    assert_rolled_back(c, move)


def test_rollback_with_every_cleanup_lost_unfreezes_on_next_ticket() -> None:
    """When abort and discard never land, the next ticket unfreezes the source, not the target."""
    faults = {"call_adopt": ["drop_reply"] * 3, "call_discard": ["drop_request"] * 3,
              "call_abort": ["drop_request"] * 3}
    c, move, _, _ = run(faults=faults)
    assert_rolled_back(c, move)
    assert "left undone" in (move.reason or "")
    # The leftover adoption on i2 can never activate: no ticket names i2 at its epoch.
    assert c.shards["i2"].handoffs.adopted[ROOM].epoch == 2 and c.row.instance == "i1"


@pytest.mark.parametrize("after", range(1, 5))
def test_directory_restart_at_every_step_of_a_clean_move(after: int) -> None:
    """A directory restart after each transition completes or rolls back, never two owners."""
    c, move, _, _ = run(restart_after=after)
    if after >= 3:  # the commit is persisted from the third transition on
        assert_committed(c, move)
    else:
        assert_rolled_back(c, move)


@pytest.mark.parametrize("after", range(1, 9))
def test_directory_restart_at_every_step_of_a_rollback(after: int) -> None:
    """A restart anywhere in a rollback (adopt lost three times) still rolls back."""
    c, move, _, _ = run(faults={"call_adopt": ["drop_reply"] * 3}, restart_after=after)
    assert_rolled_back(c, move)


@pytest.mark.parametrize("step", range(1, 5))
def test_directory_dying_with_each_call_in_flight(step: int) -> None:
    """The directory dies after a call landed but before its reply: recovery settles it."""
    c, move, _, _ = run(crash_in_call=step)
    if step >= 4:  # the commit was persisted before the release went out
        assert_committed(c, move)
    elif step == 3:  # the commit landed in the database: the rollback finds it
        assert_committed(c, move)
        assert "mark_rolled_back" in c.calls
    else:
        assert_rolled_back(c, move)


@pytest.mark.parametrize("step", range(1, 9))
def test_directory_dying_with_each_rollback_call_in_flight(step: int) -> None:
    """Dying with any call of a rollback in flight still ends rolled back."""
    c, move, _, _ = run(faults={"call_adopt": ["drop_reply"] * 3}, crash_in_call=step)
    assert_rolled_back(c, move)


@pytest.mark.parametrize("at", range(1, 6))
def test_timeout_at_every_step(at: int) -> None:
    """A timeout rolls back before the commit and is ignored after it."""
    c, move, _, _ = run(timeout_at=at)
    if at <= 3:
        assert_rolled_back(c, move)
    else:
        assert_committed(c, move)


def test_leftover_adoption_never_activates_after_a_replacement() -> None:
    """A target's leftover adoption stays dead when the room later lands there by re-placement."""
    faults = {"call_adopt": ["drop_reply"] * 3, "call_discard": ["drop_request"] * 3}
    c, move, _, _ = run(faults=faults)
    assert_rolled_back(c, move)
    assert ROOM in c.shards["i2"].handoffs.adopted
    # i1 crashes; the directory re-places the room on i2 at a new epoch (state lost).
    c.shards["i1"].crash()
    c.row.instance, c.row.epoch = "i2", c.row.epoch + 1
    c.row.owner_epoch = c.row.epoch
    dave = SimClient("dave", c)
    assert dave.connect() is None
    room = c.shards["i2"].rooms[ROOM]
    assert room.lost and room.seq == 3 << 32, "a stale snapshot was served instead of a fresh epoch"
    assert ROOM not in c.shards["i2"].handoffs.adopted
    c.check_owners()


def test_late_release_never_drops_a_room_placed_back_on_the_source() -> None:
    """Target lost before the release lands; room re-placed on the source; the release is stale."""
    c = Cluster()
    alice = SimClient("alice", c)
    assert alice.connect() is None
    alice.send("a1", "before")
    dave = SimClient("dave", c)

    def target_dies_and_room_comes_back() -> None:
        c.shards["i2"].crash()
        c.row.instance, c.row.epoch = "i1", c.row.epoch + 1  # re-placed: i2 is down
        c.row.owner_epoch = c.row.epoch
        assert dave.connect() is None  # i1 drops its frozen copy, opens fresh

    move = c.reserve("m1", "i2")
    move = c.drive(move, faults={"call_release": ["drop_request"]},
                   on_call={"commit_db": target_dies_and_room_comes_back})
    assert move.state is moves.State.RELEASED
    room = c.shards["i1"].rooms[ROOM]
    assert room.epoch == 3 and room.lost and dave.shard is c.shards["i1"]
    assert ("alice", int(CloseCode.ROOM_MOVED)) in c.closes
    c.check_owners()
    assert alice.connect() is None
    alice.send("a2", "after")
    assert alice.acks["a2"] == (3 << 32) + 1  # above anything issued before: no reuse


def test_source_restart_after_freeze_loses_nothing_acked() -> None:
    """The source crashing after the freeze: the snapshot the directory holds is adopted."""
    c = Cluster()
    alice = SimClient("alice", c)
    assert alice.connect() is None
    alice.send("a1", "before")
    move = c.reserve("m1", "i2")
    move = c.drive(move, on_call={"call_freeze": c.shards["i1"].crash})
    assert move.state is moves.State.RELEASED
    assert alice.connect() is None
    assert c.shards["i2"].rooms[ROOM].seq == 1 and alice.acks == {"a1": 1}
    alice.send("a2", "after")
    assert alice.acks["a2"] == 2


events = st.fixed_dictionaries({
    call: st.lists(st.sampled_from(MODES), max_size=4)
    for call in PRE_COMMIT_CALLS + ["call_release"] + ROLLBACK_CALLS
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(faults=events, restart=st.none() | st.integers(1, 12),
       crash=st.none() | st.integers(1, 12), timeout=st.none() | st.integers(1, 12))
def test_any_mix_of_faults_keeps_the_guarantees(faults: dict[str, list[str]],
                                                restart: int | None, crash: int | None,
                                                timeout: int | None) -> None:
    """Random faults, restarts, crashes mid-call and timeouts: one owner, nothing acked lost."""
    c, move, _, _ = run(faults=faults, restart_after=restart, crash_in_call=crash,
                        timeout_at=timeout)
    if move.state is moves.State.RELEASED:
        assert_committed(c, move)
    else:
        assert_rolled_back(c, move)
