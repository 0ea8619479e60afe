"""The pure planner: live listener state + desired group -> ordered, collision-free actions."""

from __future__ import annotations

import pytest

from router_rules import plan as p
from router_rules.model import build
from router_rules.registry import parse_instances
from tests.router_rules.conftest import registry

LB = "arn:lb/mine"


def _tg(name: str, target: str | None = None, lbs: tuple[str, ...] = (LB,)) -> p.LiveTargetGroup:
    targets = frozenset({(target, 8081)}) if target else frozenset()
    return p.LiveTargetGroup(arn=f"arn:tg/{name}", name=name, protocol="HTTP", port=8081,
                             health_check_path="/healthz", targets=targets, load_balancers=lbs)


def _rule(priority: int, pattern: str, tg: str) -> p.LiveRule:
    return p.LiveRule(arn=f"arn:rule/{priority}", priority=priority, path_patterns=(pattern,),
                      other_conditions=0, forward_arns=(f"arn:tg/{tg}",))


def _live_for(numbers: list[int]) -> p.LiveState:
    insts = registry(numbers)
    tgs = {f"rs-i{i.number}": _tg(f"rs-i{i.number}", i.host) for i in insts}
    rules = tuple(_rule(1000 + i.number, f"/i{i.number}/room/*", f"rs-i{i.number}") for i in insts)
    return p.LiveState(load_balancer=LB, target_groups=tgs, rules=rules)


def _plan(numbers: list[int], live: p.LiveState, **kw) -> p.Plan:
    (group,) = build(registry(numbers)).groups
    return p.plan(group, live, name_prefix="rs", **kw)


def _kinds(plan: p.Plan) -> list[str]:
    return [type(a).__name__ for a in plan.actions]


def test_empty_listener_gets_groups_then_rules():
    """From nothing: every target group (with its target) is created before any rule."""
    plan = _plan([1, 2], p.LiveState(LB, {}, ()))
    assert _kinds(plan) == ["CreateTargetGroup", "RegisterTargets", "CreateTargetGroup",
                            "RegisterTargets", "CreateRule", "CreateRule"]
    assert [(a.priority, a.path_pattern, a.target_group) for a in plan.actions[4:]] == [
        (1001, "/i1/room/*", "rs-i1"), (1002, "/i2/room/*", "rs-i2")]
    assert plan.actions[1].targets == (("10.0.0.1", 8081),)


def test_matching_listener_needs_no_change():
    """A listener that already routes the registry gets an empty plan."""
    plan = _plan([1, 5, 9], _live_for([1, 5, 9]))
    assert plan.actions == () and "no changes" in plan.describe()


def test_add_and_remove_orders_creates_before_deletes():
    """i3 added and i2 removed: create i3's group and rule first, delete i2's rule, then its group."""
    plan = _plan([1, 3], _live_for([1, 2]))
    assert _kinds(plan) == ["CreateTargetGroup", "RegisterTargets", "CreateRule", "DeleteRule",
                            "DeleteTargetGroup"]
    assert plan.actions[3].priority == 1002 and plan.actions[4].name == "rs-i2"


def test_wrong_target_is_modified_in_place():
    """A managed rule at i1's priority forwarding elsewhere is modified, never deleted and re-created."""
    live = _live_for([1, 2])
    live = p.LiveState(LB, live.target_groups, (_rule(1001, "/i1/room/*", "rs-i2"), live.rules[1]))
    plan = _plan([1, 2], live)
    assert _kinds(plan) == ["ModifyRule"]
    assert plan.actions[0].arn == "arn:rule/1001" and plan.actions[0].target_group == "rs-i1"


def test_managed_rule_at_a_stale_priority_is_deleted_after_the_new_one_exists():
    """An old /i1/room/* rule at another priority goes only after the rule at 1001 is created."""
    live = _live_for([1])
    live = p.LiveState(LB, live.target_groups, (_rule(1500, "/i1/room/*", "rs-i1"),))
    assert _kinds(_plan([1], live)) == ["CreateRule", "DeleteRule"]


def test_foreign_rule_at_our_priority_is_a_conflict():
    """A rule we do not manage holding 1000 + N stops the plan instead of being overwritten."""
    foreign = p.LiveRule("arn:rule/x", 1001, ("/admin/*",), 0, ("arn:tg/other",))
    with pytest.raises(p.PlanError, match="does not manage"):
        _plan([1], p.LiveState(LB, {}, (foreign,)))


def test_foreign_rules_elsewhere_are_left_alone():
    """Rules below 1000 that roomshard does not manage (the directory's) are never deleted."""
    directory = p.LiveRule("arn:rule/10", 10, ("/v1/*", "/"), 0, ("arn:tg/directory",))
    live = _live_for([1])
    plan = _plan([1], p.LiveState(LB, live.target_groups, (directory, *live.rules)))
    assert plan.actions == ()


def test_changed_target_registers_new_before_deregistering_old():
    """A shard that moved to a new IP: register the new target first, deregister the old last."""
    live = _live_for([1])
    live = p.LiveState(LB, {"rs-i1": _tg("rs-i1", "10.9.9.9")}, live.rules)
    plan = _plan([1], live)
    assert _kinds(plan) == ["RegisterTargets", "DeregisterTargets"]
    assert plan.actions[1].targets == (("10.9.9.9", 8081),)


def test_host_named_internal_url_needs_a_target_override():
    """An internal_url with a host name cannot be an ip target without --target."""
    doc = {"instances": [{"id": "i7", "internal_url": "http://s7.internal:8081"}]}
    (group,) = build(parse_instances(doc)).groups
    with pytest.raises(p.PlanError, match="--target i7="):
        p.plan(group, p.LiveState(LB, {}, ()), name_prefix="rs")
    plan = p.plan(group, p.LiveState(LB, {}, ()), name_prefix="rs", target_overrides={"i7": "i-0abc"})
    assert plan.actions[1].targets == (("i-0abc", 8081),)


def test_target_group_of_another_alb_is_refused():
    """A target group serves one ALB: reusing one attached elsewhere is an error, not a failed call."""
    live = p.LiveState(LB, {"rs-i1": _tg("rs-i1", "10.0.0.1", lbs=("arn:lb/other",))}, ())
    with pytest.raises(p.PlanError, match="another load balancer"):
        _plan([1], live)


def test_target_groups_of_other_groups_are_kept():
    """A detached target group another ALB group still wants is not deleted by this plan."""
    live = p.LiveState(LB, {"rs-i200": _tg("rs-i200", "10.0.0.200", lbs=())}, ())
    plan = _plan([1], live, registered={"rs-i1", "rs-i200"})
    assert "DeleteTargetGroup" not in _kinds(plan)
    plan = _plan([1], live, registered={"rs-i1"})
    assert _kinds(plan)[-1] == "DeleteTargetGroup"


def test_plan_text_lists_every_action():
    """describe() prints one line per action with +, ~ or -."""
    text = _plan([1, 3], _live_for([1, 2])).describe()
    assert text.splitlines() == [
        "+ target group rs-i3 (HTTP:8081, health /healthz)", "+ targets of rs-i3: 10.0.0.3:8081",
        "+ rule 1003 /i3/room/* -> rs-i3", "- rule 1002 /i2/room/*", "- target group rs-i2"]
