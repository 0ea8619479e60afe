"""bench/storm.py end to end, small: a drained shard's clients are all back, none lost state."""

from __future__ import annotations

import argparse
import shutil

import pytest

from bench import storm
from tests.bench.test_loadgen_smoke import NODE_MODULES

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("node") is None or not (NODE_MODULES / "ws").is_dir(),
                       reason="bench/node/node_modules not installed (bench/compare installs it)"),
]


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"clients": 200, "rooms": 10, "down_after": 10.0, "timeout": 30.0,
                                 "loadgen_cpu": "", "json": "", "postgres": False,
                                 "directories": 1, "liveness": None, "stopped_for": 0.0, "logs": "",
                                 "spread": False, **kw})


def test_sigterm_storm_brings_every_client_back_recovered() -> None:
    """200 clients in 10 rooms on the stopped shard: after SIGTERM (a drain) every one has
    its next welcome from i2 or i3 within 5 s, and no welcome says recovered: false."""
    result = storm.run(_args(signal="term"))
    assert result["lost"] == 200 and result["welcomed_again"] == 200, result
    assert result["within_5_s"] == 200 and result["recovered_false"] == 0, result
    assert set(result["instances_after"]) <= {"i2", "i3"}, result
    # Each client was lost when its room's move committed, then came back: the two parts
    # of its time (a client lost after its welcome again would not be back).
    assert 0 < result["lost_p50_s"] <= result["lost_max_s"] <= result["max_s"], result
    assert 0 < result["rejoin_p50_s"] <= result["rejoin_p99_s"] <= result["rejoin_max_s"], result
    assert result["rejoin_max_s"] <= result["max_s"], result
    # Each process's CPU, the stopped shard's until it exited (its drain is work).
    cpu = result["cpu_s"]
    assert set(cpu) == {"directory0", "i1", "i2", "i3"} and cpu["i1"] > 0, result
    assert result["failures"] == {}, result


def test_sigkill_storm_brings_every_client_back_before_down_after() -> None:
    """200 clients in 10 rooms: after SIGKILL every one has its next welcome within 5 s,
    half of down_after (the directory found the dead process by its control channel)."""
    result = storm.run(_args(signal="kill"))
    assert result["lost"] == 200 and result["welcomed_again"] == 200, result
    assert result["within_5_s"] == 200, result
    assert result["within_2_s"] <= result["within_5_s"], result
    # What the storm cost, to tell a slow service from a saturated machine.
    assert result["client_cpu_s"] > 0 and result["servers_cpu_s"] > 0, result
    assert 0 < result["machine_busy"] <= 1, result
    assert set(result["instances_after"]) <= {"i2", "i3"}, result
    assert result["failures"] == {}, result


def test_sigstop_storm_brings_every_client_back_after_down_after() -> None:
    """200 clients in 10 rooms on a shard stopped for 6 s (down_after 3): each drops its
    silent connection (3 s without a pong), is held or told to retry while the shard is
    checked and proven nothing, and has its next welcome from i2 or i3 once down_after
    has passed; the shard is woken (SIGCONT) 6 s after its stop."""
    result = storm.run(_args(signal="stop", down_after=3.0, stopped_for=6.0))
    assert result["lost"] == 200 and result["welcomed_again"] == 200, result
    assert set(result["instances_after"]) <= {"i2", "i3"}, result
    assert result["socket_errors"].get("liveness", 0) == 200, result
    assert 3.0 <= result["p50_s"] and result["max_s"] < 15, result
    assert result["failures"] == {}, result


def test_spread_storm_kills_the_busiest_shard_and_only_its_clients_come_back() -> None:
    """--spread: the rooms on all three shards, the busiest killed; exactly its clients
    lose their connection and each has its next welcome from another shard."""
    result = storm.run(_args(signal="kill", spread=True))
    before = result["clients_before"]
    assert sum(before.values()) == 200 and len(before) == 3, result
    victim = result["stopped"]
    assert before[victim] == max(before.values()), result
    assert result["lost"] == before[victim] == result["welcomed_again"], result
    assert victim not in result["instances_after"], result
    assert result["failures"] == {}, result

