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


def test_sigterm_storm_brings_every_client_back_recovered() -> None:
    """200 clients in 10 rooms on the stopped shard: after SIGTERM (a drain) every one has
    its next welcome from i2 or i3 within 5 s, and no welcome says recovered: false."""
    args = argparse.Namespace(signal="term", clients=200, rooms=10, down_after=10.0, timeout=30.0,
                              loadgen_cpu="", json="", postgres=False, directories=1)
    result = storm.run(args)
    assert result["lost"] == 200 and result["welcomed_again"] == 200, result
    assert result["within_5_s"] == 200 and result["recovered_false"] == 0, result
    assert set(result["instances_after"]) <= {"i2", "i3"}, result
    assert result["failures"] == {}, result


def test_sigkill_storm_brings_every_client_back_before_down_after() -> None:
    """200 clients in 10 rooms: after SIGKILL every one has its next welcome within 5 s,
    half of down_after (the directory found the dead process by its control channel)."""
    args = argparse.Namespace(signal="kill", clients=200, rooms=10, down_after=10.0, timeout=30.0,
                              loadgen_cpu="", json="", postgres=False, directories=1)
    result = storm.run(args)
    assert result["lost"] == 200 and result["welcomed_again"] == 200, result
    assert result["within_5_s"] == 200, result
    assert set(result["instances_after"]) <= {"i2", "i3"}, result
    assert result["failures"] == {}, result
