"""When `roomshard dev` starts a dead shard again (``roomshard.cli.dev.Restarts``)."""

from __future__ import annotations

import signal

from roomshard.cli.dev import Restarts, how_it_ended


def test_a_shard_that_keeps_dying_waits_longer_each_time_up_to_the_cap() -> None:
    r = Restarts(first=1, cap=30, steady=60)
    r.started("i1", 0)
    waits = []
    now = 0.0
    for _ in range(7):
        now += 0.5  # dies half a second after each start
        waits.append(r.delay("i1", now))
        now += waits[-1]
        r.started("i1", now)
    assert waits == [1, 2, 4, 8, 16, 30, 30]


def test_a_shard_that_stayed_up_a_while_is_started_again_at_once() -> None:
    r = Restarts(first=1, cap=30, steady=60)
    r.started("i1", 0)
    assert [r.delay("i1", t) for t in (1, 2, 3)] == [1, 2, 4]
    r.started("i1", 10)
    assert r.delay("i1", 75) == 1  # up 65 s: a new failure, not the same one
    r.started("i2", 0)
    assert r.delay("i2", 1) == 1  # each shard has its own backoff


def test_how_a_process_ended_is_said_plainly() -> None:
    assert how_it_ended(-signal.SIGKILL) == "was killed by SIGKILL"
    assert how_it_ended(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert how_it_ended(1) == "exited with code 1"
    assert how_it_ended(0) == "exited with code 0"
