"""Property: executing any plan step by step never collides and never unroutes a kept room."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from router_rules import plan as p
from router_rules.model import build, empty_group
from tests.router_rules.albsim import SimRule, route
from tests.router_rules.conftest import registry

LB = "arn:lb/sim"


@dataclass
class SimListener:
    """An in-memory ALB listener that refuses what AWS refuses."""

    rules: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # prio -> (arn, pattern, tg)
    tgs: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # name -> targets
    made: int = 0  # rule ARNs are unique, like AWS's

    def live(self) -> p.LiveState:
        groups = {n: p.LiveTargetGroup(f"arn:tg/{n}", n, "HTTP", 8081, "/healthz", frozenset(t),
                                       (LB,) if any(r[2] == n for r in self.rules.values()) else ())
                  for n, t in self.tgs.items()}
        rules = tuple(p.LiveRule(arn, prio, (pattern,), 0, (f"arn:tg/{tg}",))
                      for prio, (arn, pattern, tg) in sorted(self.rules.items()))
        return p.LiveState(LB, groups, rules)

    def do(self, action: p.Action) -> None:
        if isinstance(action, p.CreateTargetGroup):
            assert action.name not in self.tgs, "DuplicateTargetGroupName"
            self.tgs[action.name] = set()
        elif isinstance(action, p.RegisterTargets):
            self.tgs[action.name] |= set(action.targets)
        elif isinstance(action, p.DeregisterTargets):
            self.tgs[action.name] -= set(action.targets)
        elif isinstance(action, p.CreateRule):
            assert action.priority not in self.rules, "PriorityInUse"
            assert action.target_group in self.tgs, "TargetGroupNotFound"
            self.made += 1
            self.rules[action.priority] = (f"arn:rule/{self.made}", action.path_pattern,
                                           action.target_group)
        elif isinstance(action, p.ModifyRule):
            (prio,) = [k for k, r in self.rules.items() if r[0] == action.arn]
            assert action.target_group in self.tgs, "TargetGroupNotFound"
            self.rules[prio] = (action.arn, action.path_pattern, action.target_group)
        elif isinstance(action, p.DeleteRule):
            (prio,) = [k for k, r in self.rules.items() if r[0] == action.arn]
            del self.rules[prio]
        elif isinstance(action, p.DeleteTargetGroup):
            assert all(r[2] != action.name for r in self.rules.values()), "ResourceInUse"
            del self.tgs[action.name]
        elif isinstance(action, p.ModifyTargetGroup):
            pass
        else:
            raise TypeError(action)

    def routes(self, path: str) -> str:
        return route([SimRule(prio, (pattern,), tg) for prio, (_, pattern, tg) in self.rules.items()], path)


NUMBERS = st.sets(st.integers(1, 40), max_size=15)


@settings(max_examples=150, deadline=None)
@given(before=NUMBERS, after=NUMBERS, miswire=st.integers(1, 40), stale=st.integers(1, 40))
def test_any_transition_is_safe_at_every_step(before, after, miswire, stale):
    """From any registry to any other: no priority collision, kept rooms routable after every call."""
    sim = SimListener()
    for n in sorted(before):
        sim.do(p.CreateTargetGroup(f"rs-i{n}", "HTTP", 8081, None, 10, f"i{n}"))  # type: ignore[arg-type]
        sim.do(p.RegisterTargets(f"rs-i{n}", ((f"10.0.0.{n}", 8081),)))
        sim.do(p.CreateRule(1000 + n, f"/i{n}/room/*", f"rs-i{n}"))
    # Drift the listener: one rule forwarding to the wrong group, one rule at a stale priority.
    if miswire in before and len(before) > 1:
        other = min(before - {miswire})
        sim.rules[1000 + miswire] = (sim.rules[1000 + miswire][0], f"/i{miswire}/room/*", f"rs-i{other}")
    if stale in before and 1000 + stale in sim.rules and sim.rules[1000 + stale][2] == f"rs-i{stale}":
        sim.rules[2000 + stale] = sim.rules.pop(1000 + stale)

    groups = build(registry(sorted(after))).groups
    group = groups[0] if groups else empty_group()
    kept = {n for n in before & after
            if sim.routes(f"/i{n}/room/r") == f"rs-i{n}"}  # routable before the plan
    the_plan = p.plan(group, sim.live(), name_prefix="rs", registered={f"rs-i{n}" for n in after})
    for action in the_plan.actions:
        sim.do(action)
        for n in kept:
            assert sim.routes(f"/i{n}/room/r") == f"rs-i{n}", f"i{n} unroutable after {action}"
            assert (f"10.0.0.{n}", 8081) in sim.tgs[f"rs-i{n}"]
    for n in range(1, 41):
        assert sim.routes(f"/i{n}/room/r") == (f"rs-i{n}" if n in after else "default-404")
    assert set(sim.tgs) == {f"rs-i{n}" for n in after}
    assert p.plan(group, sim.live(), name_prefix="rs").actions == ()  # converged
