"""Theory of operation: bring a live ALB listener in line with one ALB group.

Pure: the live state (what ``describe_rules`` / ``describe_target_groups`` /
``describe_target_health`` returned, as plain data) and the desired
:class:`~router_rules.model.AlbGroup` go in; an ordered list of actions
comes out. ``router_rules.aws`` performs them with boto3, one call each.

The order is what keeps the listener safe at every intermediate step:

1. create missing target groups and register their targets;
2. create rules for new instances, only at priorities no rule holds, so a
   create never collides on a priority;
3. modify managed rules in place (same priority, new condition/target), an
   atomic switch for the rooms behind them;
4. delete managed rules that are no longer wanted, only now that every
   wanted rule exists, so no registered instance is unroutable at any step;
5. deregister stale targets and delete target groups no rule uses any more.

A rule is *managed* when its one condition is a single ``/iN/room/*`` path
pattern or it forwards to one of our target groups (``<prefix>-iN``). A
priority of ours (1000 + N) held by a rule we do not manage is a conflict:
the plan refuses rather than overwrite someone else's rule.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from router_rules.model import AlbGroup, HealthCheck, RegistryError, TargetGroup

_MANAGED_PATH_RE = re.compile(r"/i[1-9][0-9]{0,3}/room/\*")

Target = tuple[str, int]  # (target id, port)


class PlanError(RegistryError):
    """The listener cannot be brought in line safely; one line for the operator."""


@dataclass(frozen=True)
class LiveTargetGroup:
    arn: str
    name: str
    protocol: str
    port: int
    health_check_path: str
    targets: frozenset[Target] = frozenset()
    load_balancers: tuple[str, ...] = ()  # ARNs; a target group serves one ALB at most


@dataclass(frozen=True)
class LiveRule:
    arn: str
    priority: int
    path_patterns: tuple[str, ...]  # every value of every path-pattern condition
    other_conditions: int  # conditions of any other field (host-header, ...)
    forward_arns: tuple[str, ...]  # target groups of a forward action


@dataclass(frozen=True)
class LiveState:
    load_balancer: str  # ARN of the listener's ALB
    target_groups: Mapping[str, LiveTargetGroup]  # by name, the whole region's
    rules: tuple[LiveRule, ...]  # non-default rules of the listener


@dataclass(frozen=True)
class CreateTargetGroup:
    name: str
    protocol: str
    port: int
    health_check: HealthCheck
    deregistration_delay_s: int
    instance: str

    def describe(self) -> str:
        return f"+ target group {self.name} ({self.protocol}:{self.port}, health {self.health_check.path})"


@dataclass(frozen=True)
class ModifyTargetGroup:
    name: str
    health_check: HealthCheck

    def describe(self) -> str:
        return f"~ target group {self.name} (health check {self.health_check.path})"


@dataclass(frozen=True)
class RegisterTargets:
    name: str
    targets: tuple[Target, ...]

    def describe(self) -> str:
        return f"+ targets of {self.name}: {', '.join(f'{i}:{p}' for i, p in self.targets)}"


@dataclass(frozen=True)
class CreateRule:
    priority: int
    path_pattern: str
    target_group: str  # name

    def describe(self) -> str:
        return f"+ rule {self.priority} {self.path_pattern} -> {self.target_group}"


@dataclass(frozen=True)
class ModifyRule:
    arn: str
    priority: int
    path_pattern: str
    target_group: str

    def describe(self) -> str:
        return f"~ rule {self.priority} {self.path_pattern} -> {self.target_group}"


@dataclass(frozen=True)
class DeleteRule:
    arn: str
    priority: int
    path_patterns: tuple[str, ...]

    def describe(self) -> str:
        return f"- rule {self.priority} {' '.join(self.path_patterns)}"


@dataclass(frozen=True)
class DeregisterTargets:
    name: str
    targets: tuple[Target, ...]

    def describe(self) -> str:
        return f"- targets of {self.name}: {', '.join(f'{i}:{p}' for i, p in self.targets)}"


@dataclass(frozen=True)
class DeleteTargetGroup:
    name: str

    def describe(self) -> str:
        return f"- target group {self.name}"


Action = (CreateTargetGroup | ModifyTargetGroup | RegisterTargets | CreateRule | ModifyRule
          | DeleteRule | DeregisterTargets | DeleteTargetGroup)


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        if not self.actions:
            return "no changes: the listener matches the registry"
        return "\n".join(a.describe() for a in self.actions)


def desired_targets(group: AlbGroup, overrides: Mapping[str, str]) -> dict[str, Target]:
    """Instance id -> (target id, port): the override, else the internal_url's IP."""
    out: dict[str, Target] = {}
    for tg in group.target_groups:
        target = overrides.get(tg.key, tg.target_ip)
        if target is None:
            raise PlanError(f"instance {tg.key}: its internal_url names a host, not an IP; "
                            f"pass --target {tg.key}=<ip or instance id>")
        out[tg.key] = (target, tg.port)
    return out


def _managed(rule: LiveRule, our_arns: set[str]) -> bool:
    by_path = (rule.other_conditions == 0 and len(rule.path_patterns) == 1
               and _MANAGED_PATH_RE.fullmatch(rule.path_patterns[0]) is not None)
    return by_path or bool(set(rule.forward_arns) & our_arns)


def plan(group: AlbGroup, live: LiveState, *, name_prefix: str,
         target_overrides: Mapping[str, str] | None = None,
         registered: Collection[str] = ()) -> Plan:
    """Ordered actions that make ``live`` route exactly ``group``. Raises PlanError.

    ``registered`` names every target group of the whole registry (all ALB
    groups): a target group of ours that belongs to another group is never
    deleted here, and one that is attached to no load balancer is deleted
    only when no group wants it.
    """
    targets = desired_targets(group, target_overrides or {})
    ours = re.compile(rf"{re.escape(name_prefix)}-i[1-9][0-9]{{0,3}}")
    our_tgs = {n: tg for n, tg in live.target_groups.items() if ours.fullmatch(n)}
    arn_to_name = {tg.arn: n for n, tg in live.target_groups.items()}
    wanted: dict[str, TargetGroup] = {tg.name: tg for tg in group.target_groups}
    name_of = {tg.key: tg.name for tg in group.target_groups}

    creates: list[Action] = []
    for name, tg in wanted.items():
        have = our_tgs.get(name)
        want_target = targets[tg.key]
        if have is None:
            creates += [CreateTargetGroup(name, tg.protocol, tg.port, tg.health_check,
                                          tg.deregistration_delay_s, tg.key),
                        RegisterTargets(name, (want_target,))]
            continue
        if have.load_balancers and live.load_balancer not in have.load_balancers:
            raise PlanError(f"target group {name} is attached to another load balancer "
                            f"({have.load_balancers[0]}); apply that listener's plan first")
        if have.protocol != tg.protocol:
            raise PlanError(f"target group {name} speaks {have.protocol} but {tg.key}'s "
                            f"internal_url needs {tg.protocol}; delete it and apply again")
        if have.health_check_path != tg.health_check.path:
            creates.append(ModifyTargetGroup(name, tg.health_check))
        if want_target not in have.targets:
            creates.append(RegisterTargets(name, (want_target,)))

    our_arns = {tg.arn for tg in our_tgs.values()}
    by_priority = {r.priority: r for r in live.rules}
    new_rules: list[Action] = []
    modifies: list[Action] = []
    kept: set[str] = set()
    for rule in group.rules:
        tg_name = name_of[rule.target_group]
        have_rule = by_priority.get(rule.priority)
        if have_rule is None:
            new_rules.append(CreateRule(rule.priority, rule.path_pattern, tg_name))
            continue
        if not _managed(have_rule, our_arns):
            raise PlanError(f"priority {rule.priority} (for {rule.key}) is held by a rule "
                            f"roomshard does not manage ({have_rule.arn}); move that rule")
        kept.add(have_rule.arn)
        current = tuple(arn_to_name.get(a, a) for a in have_rule.forward_arns)
        if (have_rule.path_patterns != (rule.path_pattern,) or have_rule.other_conditions
                or current != (tg_name,)):
            modifies.append(ModifyRule(have_rule.arn, rule.priority, rule.path_pattern, tg_name))

    deletes: list[Action] = [DeleteRule(r.arn, r.priority, r.path_patterns)
                             for r in sorted(live.rules, key=lambda r: r.priority)
                             if r.arn not in kept and _managed(r, our_arns)]
    cleanup: list[Action] = []
    for name, tg in sorted(our_tgs.items()):
        if name not in wanted:
            # Wanted by another group (its public_base changed): keep it, that
            # group's plan attaches it once this listener's rule is gone.
            detached_here = live.load_balancer in tg.load_balancers or not tg.load_balancers
            if detached_here and name not in registered:
                cleanup.append(DeleteTargetGroup(name))
            continue
        stale = tuple(sorted(tg.targets - {targets[wanted[name].key]}))
        if stale:
            cleanup.append(DeregisterTargets(name, stale))
    return Plan(tuple(creates + new_rules + modifies + deletes + cleanup))
