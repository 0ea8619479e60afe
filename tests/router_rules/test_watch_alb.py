"""``roomshard rules apply --watch`` against an ALB listener in moto's server mode (AWS itself
cannot be reached here): a real directory's registry changes, the reconciler follows; a route
goes only once its instance is removed, and a rule deleted by hand comes back."""

from __future__ import annotations

import httpx
import pytest

from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import t, wait_until
from tests.router_rules.albsim import DEFAULT_404, route
from tests.router_rules.moto_env import REGION, FakeAws
from tests.router_rules.test_apply import _sim

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


def _metric(url: str, name: str, label: str = "") -> float:
    for line in httpx.get(url, timeout=t(5)).text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {label} not in the metrics")


def test_the_reconciler_keeps_an_alb_listener_equal_to_the_registry(procs: Procs,
                                                                  fake_aws: FakeAws) -> None:
    _, listener = fake_aws.new_listener("watch-rules")
    elb = fake_aws.client("elbv2")
    d = procs.directory()
    with httpx.Client(base_url=d.url, headers=ADMIN, timeout=t(10)) as http:
        _follow_the_registry(procs, fake_aws, listener, elb, d.url, http)


def _target_groups(elb: object) -> set[str]:
    pages = elb.get_paginator("describe_target_groups").paginate()  # type: ignore[attr-defined]
    return {tg["TargetGroupName"] for page in pages for tg in page["TargetGroups"]}


def _follow_the_registry(procs: Procs, fake_aws: FakeAws, listener: str, elb: object,
                         directory: str, http: httpx.Client) -> None:

    def put(n: int, **body: object) -> None:
        r = http.put(f"/v1/admin/instances/i{n}",
                     json={"internal_url": f"http://10.0.0.{n}:8081", **body})
        assert r.status_code == 200, r.text

    def served(n: int) -> str:
        return route(_sim(elb, listener), f"/i{n}/room/r")

    put(1)
    put(2)
    watcher = procs.start("rules-alb", [
        "rules", "apply", "--watch", "--from-directory", directory, "--listener-arn", listener,
        "--endpoint-url", fake_aws.endpoint, "--region", REGION, "--interval", "0.2",
        "--resync", "1", "--max-backoff", "1", "--metrics-listen", "127.0.0.1:0",
        # moto keeps one state per process: other modules' target groups are there too.
        "--name-prefix", "watch"],
        env=fake_aws.env())
    metrics = watcher.url
    assert (served(1), served(2), served(3)) == ("watch-i1", "watch-i2", DEFAULT_404)

    put(3)  # scale out: its rule and target group appear
    wait_until(lambda: served(3) == "watch-i3", 20, "i3's rule")
    wait_until(lambda: "alb: routes +i3 (3 instances)" in watcher.output(), 10, "the change's log line")
    assert "alb default: + rule 1003 /i3/room/* -> watch-i3" in watcher.output()

    # Draining or disabled keeps the route: clients of a draining shard must still reach it.
    put(2, state="disabled")
    synced = _metric(metrics, "roomshard_rules_last_sync_timestamp_seconds")
    wait_until(lambda: _metric(metrics, "roomshard_rules_last_sync_timestamp_seconds") > synced + 1,
               20, "two more syncs")
    assert served(2) == "watch-i2"

    # Removed from the registry: only now do its rule and target group go.
    assert http.delete("/v1/admin/instances/i2").status_code == 200
    wait_until(lambda: served(2) == DEFAULT_404, 20, "i2's rule to go")
    # Its target group goes in the same sync, after the rule (every page: moto holds the
    # other modules' target groups too).
    wait_until(lambda: "watch-i2" not in _target_groups(elb), 20, "i2's target group to go")
    assert {"watch-i1", "watch-i3"} <= _target_groups(elb)
    assert (served(1), served(3)) == ("watch-i1", "watch-i3")

    # A rule deleted by hand is put back by the next resync.
    rule = next(r for r in elb.describe_rules(ListenerArn=listener)["Rules"] if r["Priority"] == "1001")
    elb.delete_rule(RuleArn=rule["RuleArn"])
    wait_until(lambda: served(1) == "watch-i1", 20, "the resync to restore i1's rule")

    assert _metric(metrics, "roomshard_rules_route_changes_total", 'kind="added"') == 1.0
    assert _metric(metrics, "roomshard_rules_route_changes_total", 'kind="removed"') == 1.0
    assert _metric(metrics, "roomshard_rules_pending_changes") == 0.0
    assert _metric(metrics, "roomshard_rules_routes") == 2.0


def test_an_aws_failure_is_retried_and_counted(procs: Procs, fake_aws: FakeAws) -> None:
    """A listener that does not exist: every attempt fails with one log line, the errors are
    counted by stage, and the process keeps trying (then stops cleanly on SIGTERM)."""
    d = procs.directory()
    httpx.put(f"{d.url}/v1/admin/instances/i1", headers=ADMIN, timeout=t(10),
              json={"internal_url": "http://10.0.0.1:8081"}).raise_for_status()
    missing = listener_arn_that_does_not_exist()
    proc = procs.start("alb-broken", [
        "rules", "apply", "--watch", "--from-directory", d.url, "--listener-arn", missing,
        "--endpoint-url", fake_aws.endpoint, "--region", REGION, "--interval", "0.1",
        "--max-backoff", "0.3", "--metrics-listen", "127.0.0.1:0"], env=fake_aws.env(),
        wait_ready=False)
    wait_until(lambda: proc.output().count("alb: aws failed") >= 3, 20, "three failed attempts")
    assert "alb: aws failed (1 in a row)" in proc.output()
    assert not proc.ready_file.exists()  # never in sync: never ready
    assert procs.terminate(proc) == 0


def listener_arn_that_does_not_exist() -> str:
    return ("arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/nope/"
            "50dc6c495c0c9188/f2f7dc8efc522ab2")
