"""`rules apply` against a moto ELBv2 listener: every intermediate state stays routable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from roomshard.testing.timing import t
from router_rules import aws
from router_rules.model import DEFAULT_GROUP, build, empty_group
from router_rules.plan import PlanError, plan
from tests.router_rules.albsim import DEFAULT_404, SimRule, route
from tests.router_rules.conftest import registry
from tests.router_rules.moto_env import FakeAws


def _sim(elb, listener: str) -> list[SimRule]:
    names = {tg["TargetGroupArn"]: tg["TargetGroupName"]
             for tg in elb.describe_target_groups()["TargetGroups"]}
    return [SimRule(int(r["Priority"]),
                    tuple(v for c in r["Conditions"] for v in c["PathPatternConfig"]["Values"]),
                    names.get(r["Actions"][0].get("TargetGroupArn", ""), r["Actions"][0]["Type"]))
            for r in elb.describe_rules(ListenerArn=listener)["Rules"] if not r["IsDefault"]]


def _apply(elb, listener: str, numbers: list[int], prefix: str) -> list[list[SimRule]]:
    """Apply the registry ``numbers``; return the listener's rules after every call."""
    groups = build(registry(numbers), name_prefix=prefix).groups
    group = groups[0] if groups else empty_group(DEFAULT_GROUP)
    live = aws.read_live(elb, listener, prefix)
    the_plan = plan(group, live, name_prefix=prefix, registered={tg.name for tg in group.target_groups})
    _, vpc = aws.describe_listener(elb, listener)
    states: list[list[SimRule]] = []
    aws.execute(elb, the_plan, listener_arn=listener, vpc_id=vpc,
                on_step=lambda action: states.append(_sim(elb, listener)))
    assert len(states) == len(the_plan.actions)
    return states


def _check_steps(states: list[list[SimRule]], kept: set[int], prefix: str) -> None:
    for rules in states:
        priorities = [r.priority for r in rules]
        assert len(priorities) == len(set(priorities)), f"duplicate priority in {priorities}"
        for n in kept:  # instances registered before and after never lose their route
            assert route(rules, f"/i{n}/room/r") == f"{prefix}-i{n}"


def _final_routes(elb, listener: str, numbers: set[int], prefix: str) -> None:
    rules = _sim(elb, listener)
    for n in range(1, 13):
        assert route(rules, f"/i{n}/room/r") == (f"{prefix}-i{n}" if n in numbers else DEFAULT_404)


def test_apply_creates_updates_and_removes_without_collisions(fake_aws: FakeAws):
    """Apply 3 instances, then add 2 and remove 1, then remove all: no step breaks a kept route."""
    _, listener = fake_aws.new_listener("apply-rules")
    elb = fake_aws.client("elbv2")
    prefix = "ap"
    steps = [[1, 2, 3], [1, 3, 4, 10], [1, 3, 4, 10], [3], []]
    previous: set[int] = set()
    for numbers in steps:
        states = _apply(elb, listener, numbers, prefix)
        if numbers == [1, 3, 4, 10] and previous == set(numbers):
            assert states == []  # second identical apply: nothing to do
        _check_steps(states, previous & set(numbers), prefix)
        _final_routes(elb, listener, set(numbers), prefix)
        tg_names = {tg["TargetGroupName"] for tg in elb.describe_target_groups()["TargetGroups"]
                    if tg["TargetGroupName"].startswith(prefix + "-")}
        assert tg_names == {f"{prefix}-i{n}" for n in numbers}
        previous = set(numbers)


def test_apply_registers_target_and_attributes(fake_aws: FakeAws):
    """New target groups get the internal IP:port as target, /healthz, short deregistration, no stickiness."""
    _, listener = fake_aws.new_listener("apply-attrs")
    elb = fake_aws.client("elbv2")
    _apply(elb, listener, [7], "at")
    (tg,) = elb.describe_target_groups(Names=["at-i7"])["TargetGroups"]
    assert (tg["HealthCheckPath"], tg["HealthCheckProtocol"], tg["Port"]) == ("/healthz", "HTTP", 8081)
    health = elb.describe_target_health(TargetGroupArn=tg["TargetGroupArn"])["TargetHealthDescriptions"]
    assert [(h["Target"]["Id"], h["Target"]["Port"]) for h in health] == [("10.0.0.7", 8081)]
    attrs = {a["Key"]: a["Value"] for a in
             elb.describe_target_group_attributes(TargetGroupArn=tg["TargetGroupArn"])["Attributes"]}
    assert attrs["deregistration_delay.timeout_seconds"] == "10"
    assert attrs["stickiness.enabled"] == "false"


def test_foreign_rule_at_our_priority_stops_before_any_call(fake_aws: FakeAws):
    """A rule roomshard does not manage at 1000 + N makes the plan fail; nothing is created."""
    _, listener = fake_aws.new_listener("apply-foreign")
    elb = fake_aws.client("elbv2")
    elb.create_rule(ListenerArn=listener, Priority=1002,
                    Conditions=[{"Field": "path-pattern", "PathPatternConfig": {"Values": ["/admin/*"]}}],
                    Actions=[{"Type": "fixed-response", "FixedResponseConfig": {"StatusCode": "403"}}])
    (group,) = build(registry([1, 2]), name_prefix="fr").groups
    with pytest.raises(PlanError, match="priority 1002"):
        plan(group, aws.read_live(elb, listener, "fr"), name_prefix="fr")
    assert _sim(elb, listener) == [SimRule(1002, ("/admin/*",), "fixed-response")]
    assert not [tg for tg in elb.describe_target_groups()["TargetGroups"]
                if tg["TargetGroupName"].startswith("fr-")]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "roomshard", "rules", *args],
                          env={**os.environ, **env}, capture_output=True, text=True, check=False, timeout=t(60))


def test_cli_plan_then_apply(fake_aws: FakeAws, tmp_path):
    """`rules plan` prints the actions and changes nothing; `rules apply` performs them."""
    _, listener = fake_aws.new_listener("apply-cli")
    elb = fake_aws.client("elbv2")
    registry_file = tmp_path / "instances.json"
    registry_file.write_text(json.dumps({"instances": [
        {"id": "i1", "internal_url": "http://10.0.0.1:8081"},
        {"id": "i2", "internal_url": "http://10.0.0.2:8081", "state": "draining"}]}))
    common = ["--from-file", str(registry_file), "--listener-arn", listener, "--name-prefix", "cli"]
    res = _cli(["plan", *common], fake_aws.env())
    assert res.returncode == 0, res.stderr
    assert "+ rule 1001 /i1/room/* -> cli-i1" in res.stdout and "+ rule 1002" in res.stdout
    assert _sim(elb, listener) == []
    res = _cli(["apply", "--dry-run", *common], fake_aws.env())
    assert res.returncode == 0 and _sim(elb, listener) == []
    res = _cli(["apply", *common], fake_aws.env())
    assert res.returncode == 0, res.stderr
    assert sorted(r.priority for r in _sim(elb, listener)) == [1001, 1002]
    res = _cli(["plan", *common], fake_aws.env())
    assert "no changes" in res.stdout


def test_cli_aws_errors_are_one_line(fake_aws: FakeAws, tmp_path):
    """An unknown listener is one clear line and exit 2, no traceback."""
    registry_file = tmp_path / "instances.json"
    registry_file.write_text(json.dumps({"instances": [{"id": "i1", "internal_url": "http://10.0.0.1:8081"}]}))
    bogus = "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/nope/1/2"
    res = _cli(["plan", "--from-file", str(registry_file), "--listener-arn", bogus], fake_aws.env())
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("roomshard rules: describe_listeners")
