"""bench/js_client.py: the JavaScript client's deliveries in one Node process, end to end
at toy size, and how the report judges its goal."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench import js_client, report_extras
from tests.js.test_js_client import _node_ready


def _step(rate: int, delivered_ratio: float = 1.0, p99: float = 50.0, failures: int = 0) -> dict[str, Any]:
    return {"rate_target": rate, "sent": rate * 10, "sent_per_s": float(rate), "expected": rate * 200,
            "delivered": int(rate * 200 * delivered_ratio), "delivered_ratio": delivered_ratio,
            "deliveries_per_s": rate * 20 * delivered_ratio, "p50_ms": 10.0, "p99_ms": p99,
            "send_failures": failures, "client_cpu_seconds": 5.0, "client_cpu_util": 0.5,
            "event_loop_delay_p99_ms": 20.0}


def _rec(*steps: dict[str, Any], sessions: int = 2000) -> dict[str, Any]:
    return {"command": "python bench/js_client.py --rates 2500,5000 --seconds 10",
            "result": {"sessions": sessions, "rooms": 100, "members": 20, "seconds": 10,
                       "steps": list(steps)}}


def test_the_goal_takes_the_best_rate_the_client_kept_up_with() -> None:
    """A rate counts when >= 99 % arrived with p99 <= 200 ms and no send failed."""
    met = report_extras.js_client_goal(_rec(_step(2500), _step(5000, p99=900.0))["result"])
    assert met is not None and met.met and "50,000 deliveries/s sustained" in met.value
    slow = report_extras.js_client_goal(_rec(_step(2500, p99=250.0))["result"])
    assert slow is not None and not slow.met
    lossy = report_extras.js_client_goal(_rec(_step(3000, delivered_ratio=0.9))["result"])
    assert lossy is not None and not lossy.met
    failing = report_extras.js_client_goal(_rec(_step(3000, failures=1))["result"])
    assert failing is not None and not failing.met
    few = report_extras.js_client_goal(_rec(_step(3000), sessions=500)["result"])
    assert few is not None and not few.met
    text = "\n".join(report_extras.render({"extras": {"js-client": _rec(_step(2500),
                                                                          _step(5000, p99=900.0))}}))
    assert "    python bench/js_client.py --rates 2500,5000 --seconds 10" in text
    assert "| 2,500 | 50,000 | 100.00 % | 10 | 50 | 50 % | 20 | yes |" in text
    assert "| 5,000 | 100,000 | 100.00 % | 10 | 900 | 50 % | 20 | no |" in text
    assert "2,000 sessions get >= 50,000 messages/s: met" in text


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_small_run_counts_every_delivery() -> None:
    """20 sessions in 5 rooms, 100 messages/s for a second: every message reaches the 4
    members of its room once, no send fails, and the result says what it measured."""
    _node_ready()
    args = argparse.Namespace(rooms=5, members=4, rates="100", seconds=1.0, shards=1,
                              client_cpu="0", server_cpus="1", json="")
    result = js_client.run(args)
    assert (result["sessions"], result["rooms"], result["members"]) == (20, 5, 4)
    (step,) = result["steps"]
    assert step["sent"] >= 90 and step["expected"] == 4 * step["sent"]
    assert step["delivered"] == step["expected"] and step["send_failures"] == 0
    assert 0 < step["p50_ms"] <= step["p99_ms"]
    assert result["late_deliveries"] == 0
