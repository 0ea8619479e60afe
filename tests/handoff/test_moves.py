"""The move coordinator's table, alone: transitions, actions, errors, recovery, drains."""

from __future__ import annotations

import pytest

from directory.domain import moves
from directory.domain.moves import Event, Move, MoveRuleError, State


def start() -> tuple[Move, list[moves.Action]]:
    return moves.begin(move_id="m1", room="r1", source="i1", target="i2", from_epoch=4, now=10.0)


def ok(move: Move, kind: str, actions: list[moves.Action], now: float = 10.0,
       **payload: object) -> tuple[Move, list[moves.Action]]:
    return moves.handle(move, Event(kind, actions[0].token, dict(payload)), now)


SNAP = {"room": "r1", "members": ["a", "b", "c"], "history": [{"seq": 1}, {"seq": 2}]}


def test_begin_reserves_the_next_epoch_and_freezes_the_source() -> None:
    """begin() targets epoch E+1 and its only action is a freeze call on the source."""
    move, actions = start()
    assert move.state is State.RESERVED and move.epoch == 5
    assert [(a.call, a.instance) for a in actions] == [("call_freeze", "i1")]
    assert actions[0].payload == {"room": "r1", "move_id": "m1", "epoch": 5}


def test_happy_path_walks_the_table_and_reports() -> None:
    """freeze, adopt, commit, release in order, each state emitting the next call."""
    move, a = start()
    move, a = ok(move, "freeze_ok", a, snapshot=SNAP)
    assert move.state is State.FROZEN and a[0].call == "call_adopt"
    assert a[0].instance == "i2" and a[0].payload["snapshot"] is SNAP
    move, a = ok(move, "adopt_ok", a)
    assert move.state is State.ADOPTED and a[0].call == "commit_db" and a[0].instance is None
    move, a = ok(move, "commit_ok", a, now=10.25)
    assert move.state is State.COMMITTED and move.owner == "i2" and move.snapshot is None
    assert a[0].call == "call_release" and a[0].payload["to"] == "i2"
    move, a = ok(move, "release_ok", a, now=11.0)
    assert move.state is State.RELEASED and a[0].call == "finished"
    assert moves.report(move) == {"room": "r1", "from": "i1", "to": "i2", "epoch": 5,
                                  "members": 3, "messages_transferred": 2, "pause_ms": 250.0}


def test_room_not_in_memory_skips_the_adopt() -> None:
    """A source without the room in memory answers no snapshot: commit without state."""
    move, a = start()
    move, a = ok(move, "freeze_ok", a, snapshot=None)
    assert move.state is State.ADOPTED and not move.carries_state
    assert a[0].call == "commit_db" and a[0].payload["carries_state"] is False


def test_failure_is_retried_with_backoff_then_rolls_back() -> None:
    """Two failures re-send the call with growing delays; the third gives up."""
    move, a = start()
    delays = []
    for _ in range(2):
        move, a = moves.handle(move, Event("freeze_failed", a[0].token), 10.0)
        assert move.state is State.RESERVED and a[0].call == "call_freeze"
        delays.append(a[0].delay_s)
    assert 0 < delays[0] < delays[1]
    move, a = moves.handle(move, Event("freeze_failed", a[0].token, {"error": "boom"}), 10.0)
    assert move.state is State.ABORTING and move.reason == "boom"
    assert [x.call for x in a] == ["mark_rolled_back"] and a[0].payload["to"] == "i1"
    move, a = ok(move, "rollback_ok", a)
    assert move.state is State.ROLLED_BACK
    assert sorted((x.call, x.instance) for x in a) == [("call_abort", "i1"), ("call_discard", "i2")]
    abort = next(x for x in a if x.call == "call_abort")
    discard = next(x for x in a if x.call == "call_discard")
    move, rest = moves.handle(move, Event("abort_ok", abort.token), 10.0)
    assert move.state is State.ROLLED_BACK and rest == []
    move, rest = moves.handle(move, Event("discard_ok", discard.token), 10.0)
    assert move.state is State.ABORTED and rest[0].call == "finished"


def test_a_late_reply_to_a_resent_call_is_ignored() -> None:
    """The answer to a superseded call (older token) changes nothing."""
    move, a = start()
    old = a[0].token
    move, a = moves.handle(move, Event("freeze_failed", old), 10.0)
    same, nothing = moves.handle(move, Event("freeze_ok", old, {"snapshot": SNAP}), 10.0)
    assert same == move and nothing == []


@pytest.mark.parametrize("kind,who", [("adopt_ok", "target"), ("commit_ok", "database"),
                                      ("release_ok", "source")])
def test_a_reply_nobody_asked_for_names_the_culprit(kind: str, who: str) -> None:
    """An answer to a call that was never made raises MoveRuleError naming the side."""
    move, _ = start()
    with pytest.raises(MoveRuleError) as err:
        moves.handle(move, Event(kind, 99), 10.0)
    assert err.value.who == who and "broke the move protocol" in str(err.value)


def test_an_unknown_event_is_the_drivers_fault() -> None:
    """An event the table does not know is blamed on the local driver (500)."""
    move, _ = start()
    with pytest.raises(MoveRuleError) as err:
        moves.handle(move, Event("dance_ok", 1), 10.0)
    assert err.value.who == "local driver" and err.value.status == 500


def test_moving_to_the_same_instance_is_refused() -> None:
    """begin() refuses a move onto the instance the room is on."""
    with pytest.raises(MoveRuleError):
        moves.begin(move_id="m", room="r", source="i1", target="i1", from_epoch=1, now=0)


def test_timeout_rolls_back_before_commit_only() -> None:
    """A timeout aborts a move before the commit and is ignored once committed."""
    move, a = start()
    aborted, acts = moves.handle(move, Event("timeout"), 20.0)
    assert aborted.state is State.ABORTING and aborted.reason == "timeout"
    move, a = ok(move, "freeze_ok", a, snapshot=SNAP)
    move, a = ok(move, "adopt_ok", a)
    move, a = ok(move, "commit_ok", a)
    same, acts = moves.handle(move, Event("timeout"), 20.0)
    assert same.state is State.COMMITTED and acts == []


def test_release_never_gives_up_but_a_gone_source_ends_it() -> None:
    """Release failures keep retrying (capped backoff); source_gone settles the move."""
    move, a = start()
    move, a = ok(move, "freeze_ok", a, snapshot=SNAP)
    move, a = ok(move, "adopt_ok", a)
    move, a = ok(move, "commit_ok", a)
    for _ in range(20):
        move, a = moves.handle(move, Event("release_failed", a[0].token), 10.0)
        assert move.state is State.COMMITTED and a[0].call == "call_release"
    assert a[0].delay_s == moves.BACKOFF_CAP_S
    move, a = moves.handle(move, Event("source_gone"), 10.0)
    assert move.state is State.RELEASED


def test_commit_and_rollback_settle_by_whoever_won_the_row() -> None:
    """commit_lost goes to cleanup, rollback_lost goes to release."""
    move, a = start()
    move, a = ok(move, "freeze_ok", a, snapshot=SNAP)
    move, a = ok(move, "adopt_ok", a)
    lost, acts = ok(move, "commit_lost", a)
    assert lost.state is State.ROLLED_BACK and {x.call for x in acts} == {"call_discard",
                                                                          "call_abort"}
    aborting, acts = moves.handle(move, Event("timeout"), 10.0)
    won, acts = ok(aborting, "rollback_lost", acts)
    assert won.state is State.COMMITTED and acts[0].call == "call_release"


@pytest.mark.parametrize("state,expect_state,expect_calls", [
    (State.RESERVED, State.ABORTING, ["mark_rolled_back"]),
    (State.FROZEN, State.ABORTING, ["mark_rolled_back"]),
    (State.ADOPTED, State.ABORTING, ["mark_rolled_back"]),
    (State.COMMITTED, State.COMMITTED, ["call_release"]),
    (State.ABORTING, State.ABORTING, ["mark_rolled_back"]),
    (State.ROLLED_BACK, State.ROLLED_BACK, ["call_discard", "call_abort"]),
    (State.RELEASED, State.RELEASED, []),
    (State.ABORTED, State.ABORTED, []),
])
def test_recover_rolls_back_before_commit_and_forward_after(
        state: State, expect_state: State, expect_calls: list[str]) -> None:
    """recover() maps every persisted state to the actions that finish the move."""
    move, _ = start()
    row = {**move.to_dict(), "state": state.value,
           "cleanup": [["discard", 0], ["abort", 0]] if state is State.ROLLED_BACK else []}
    rec, acts = moves.recover(row, 50.0)
    assert rec.state is expect_state
    assert [a.call for a in acts] == expect_calls


def test_recover_after_one_cleanup_landed_only_redoes_the_other() -> None:
    """A persisted ROLLED_BACK record with the discard done only re-sends the abort."""
    move, _ = start()
    row = {**move.to_dict(), "state": "rolled_back", "cleanup": [["abort", 1]]}
    _, acts = moves.recover(row, 50.0)
    assert [a.call for a in acts] == ["call_abort"]


def test_record_round_trips_without_the_snapshot() -> None:
    """to_dict/from_dict round-trip; the snapshot never goes to the database."""
    move, a = start()
    move, _ = ok(move, "freeze_ok", a, snapshot=SNAP)
    row = move.to_dict()
    assert "snapshot" not in row and row["state"] == "frozen"
    back = Move.from_dict(row)
    assert back == move and back.snapshot is None
    with pytest.raises(ValueError):
        Move.from_dict({**row, "state": "dancing"})


def test_drain_progress_bounds_parallelism_and_retries_once() -> None:
    """At most `parallelism` moves run; a rolled-back move is retried, then reported failed."""
    plan = [("r1", "i2"), ("r2", "i3"), ("r3", "i2")]
    d = moves.DrainProgress("i1", plan, parallelism=2, max_attempts=2)
    assert d.next_moves() == [("r1", "i2"), ("r2", "i3")]
    assert d.next_moves() == []
    d.succeeded("r1", {"room": "r1"})
    d.rolled_back("r2", "adopt failed", retarget="i4")
    assert d.next_moves() == [("r3", "i2"), ("r2", "i4")]  # the retry goes last
    d.succeeded("r3", {"room": "r3"})
    d.rolled_back("r2", "adopt failed again")
    assert d.next_moves() == [] and d.complete
    rep = d.report()
    assert rep["moved"] == 2 and rep["total"] == 3 and not rep["complete"]
    assert rep["failed"] == [{"room": "r2", "error": "adopt failed again"}]


def test_drain_progress_refuses_zero_parallelism() -> None:
    """A drain needs at least one move at a time."""
    with pytest.raises(ValueError):
        moves.DrainProgress("i1", [], parallelism=0)


def test_drain_progress_requeues_a_retargeted_move_whatever_its_attempts() -> None:
    """A rolled-back move with a new target is always requeued (never given up while a
    target is left); without one it is retried on the same target up to max_attempts."""
    p = moves.DrainProgress("i1", [("r", "i2")], parallelism=1, max_attempts=1)
    assert p.next_moves() == [("r", "i2")]
    p.rolled_back("r", "adopt on i2: unreachable", retarget="i3")
    assert p.next_moves() == [("r", "i3")]
    p.rolled_back("r", "adopt on i3: unreachable", retarget="i4")
    assert p.next_moves() == [("r", "i4")]
    p.rolled_back("r", "adopt on i4: unreachable")  # no target left, out of attempts
    assert p.next_moves() == [] and p.failed == {"r": "adopt on i4: unreachable"}
    assert p.report()["complete"] is False
