"""The boto3 side of ``roomshard rules plan|apply``: read a listener, perform a plan.

I/O only: what to do is decided by :mod:`router_rules.plan`. Every botocore
error is translated into :class:`AwsError` (one line), so the command line
never shows a traceback. ``on_step`` is called after every successful call;
the tests use it to check the listener's state between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from router_rules import model
from router_rules import plan as p
from router_rules.registry import Instance, RegistryError
from router_rules.watch import SyncError

TAGS = [{"Key": "roomshard:managed-by", "Value": "roomshard rules"}]


class AwsError(RegistryError):
    """An AWS call failed; the message is one line."""


def _call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise AwsError(f"{what}: {err.get('Code', 'error')}: {err.get('Message', exc)}") from exc
    except BotoCoreError as exc:
        raise AwsError(f"{what}: {exc}") from exc


def _pages(what: str, fn: Callable[..., Any], key: str, **kwargs: Any) -> Iterator[Any]:
    marker: str | None = None
    while True:
        page = _call(what, fn, **kwargs, **({"Marker": marker} if marker else {}))
        yield from page.get(key, [])
        marker = page.get("NextMarker")
        if not marker:
            return


def _rule(raw: dict[str, Any]) -> p.LiveRule:
    paths: list[str] = []
    other = 0
    for cond in raw.get("Conditions", []):
        if cond.get("Field") == "path-pattern":
            paths += cond.get("PathPatternConfig", {}).get("Values") or cond.get("Values") or []
        else:
            other += 1
    arns: list[str] = []
    for action in raw.get("Actions", []):
        if action.get("Type") != "forward":
            continue
        if action.get("TargetGroupArn"):
            arns.append(action["TargetGroupArn"])
        else:
            arns += [t["TargetGroupArn"] for t in action.get("ForwardConfig", {}).get("TargetGroups", [])]
    return p.LiveRule(arn=raw["RuleArn"], priority=int(raw["Priority"]), path_patterns=tuple(paths),
                      other_conditions=other, forward_arns=tuple(dict.fromkeys(arns)))


def describe_listener(client: Any, listener_arn: str) -> tuple[str, str]:
    """(load balancer ARN, VPC id) of a listener."""
    listeners = _call("describe_listeners", client.describe_listeners, ListenerArns=[listener_arn])
    lb_arn = listeners["Listeners"][0]["LoadBalancerArn"]
    lbs = _call("describe_load_balancers", client.describe_load_balancers, LoadBalancerArns=[lb_arn])
    return lb_arn, lbs["LoadBalancers"][0]["VpcId"]


def read_live(client: Any, listener_arn: str, name_prefix: str) -> p.LiveState:
    """The listener's rules and the region's target groups named ``<prefix>-iN``."""
    lb_arn, _ = describe_listener(client, listener_arn)
    rules = tuple(_rule(r) for r in _pages("describe_rules", client.describe_rules, "Rules",
                                           ListenerArn=listener_arn) if not r.get("IsDefault"))
    groups: dict[str, p.LiveTargetGroup] = {}
    for tg in _pages("describe_target_groups", client.describe_target_groups, "TargetGroups"):
        name = tg["TargetGroupName"]
        if not name.startswith(name_prefix + "-i"):
            continue
        health = _call("describe_target_health", client.describe_target_health,
                       TargetGroupArn=tg["TargetGroupArn"])
        targets = frozenset((d["Target"]["Id"], int(d["Target"].get("Port", tg["Port"])))
                            for d in health.get("TargetHealthDescriptions", []))
        groups[name] = p.LiveTargetGroup(
            arn=tg["TargetGroupArn"], name=name, protocol=tg["Protocol"], port=int(tg["Port"]),
            health_check_path=tg.get("HealthCheckPath", ""), targets=targets,
            load_balancers=tuple(tg.get("LoadBalancerArns", [])))
    return p.LiveState(load_balancer=lb_arn, target_groups=groups, rules=rules)


def _tg_arn(client: Any, name: str, known: dict[str, str]) -> str:
    if name not in known:
        found = _call("describe_target_groups", client.describe_target_groups, Names=[name])
        known[name] = found["TargetGroups"][0]["TargetGroupArn"]
    return known[name]


def _health_kwargs(hc: Any) -> dict[str, Any]:
    return {"HealthCheckEnabled": True, "HealthCheckProtocol": hc.protocol,
            "HealthCheckPath": hc.path, "HealthCheckIntervalSeconds": hc.interval_s,
            "HealthCheckTimeoutSeconds": hc.timeout_s,
            "HealthyThresholdCount": hc.healthy_threshold,
            "UnhealthyThresholdCount": hc.unhealthy_threshold,
            "Matcher": {"HttpCode": hc.matcher}}


def execute(client: Any, the_plan: p.Plan, *, listener_arn: str, vpc_id: str,
            target_type: str = "ip",
            on_step: Callable[[p.Action], None] | None = None) -> None:
    """Perform ``the_plan`` in its order. Raises :class:`AwsError` at the first failure."""
    arns: dict[str, str] = {}
    for action in the_plan.actions:
        if isinstance(action, p.CreateTargetGroup):
            made = _call(f"create_target_group {action.name}", client.create_target_group,
                         Name=action.name, Protocol=action.protocol, Port=action.port,
                         VpcId=vpc_id, TargetType=target_type,
                         Tags=[*TAGS, {"Key": "roomshard:instance", "Value": action.instance}],
                         **_health_kwargs(action.health_check))
            arns[action.name] = made["TargetGroups"][0]["TargetGroupArn"]
            _call(f"modify_target_group_attributes {action.name}",
                  client.modify_target_group_attributes, TargetGroupArn=arns[action.name],
                  Attributes=[{"Key": "deregistration_delay.timeout_seconds",
                               "Value": str(action.deregistration_delay_s)},
                              {"Key": "stickiness.enabled", "Value": "false"}])
        elif isinstance(action, p.ModifyTargetGroup):
            _call(f"modify_target_group {action.name}", client.modify_target_group,
                  TargetGroupArn=_tg_arn(client, action.name, arns),
                  **_health_kwargs(action.health_check))
        elif isinstance(action, (p.RegisterTargets, p.DeregisterTargets)):
            fn = client.register_targets if isinstance(action, p.RegisterTargets) else client.deregister_targets
            _call(f"{fn.__name__} {action.name}", fn, TargetGroupArn=_tg_arn(client, action.name, arns),
                  Targets=[{"Id": i, "Port": port} for i, port in action.targets])
        elif isinstance(action, (p.CreateRule, p.ModifyRule)):
            conditions = [{"Field": "path-pattern", "PathPatternConfig": {"Values": [action.path_pattern]}}]
            actions = [{"Type": "forward", "TargetGroupArn": _tg_arn(client, action.target_group, arns)}]
            if isinstance(action, p.CreateRule):
                _call(f"create_rule {action.priority}", client.create_rule, ListenerArn=listener_arn,
                      Priority=action.priority, Conditions=conditions, Actions=actions, Tags=TAGS)
            else:
                _call(f"modify_rule {action.priority}", client.modify_rule, RuleArn=action.arn,
                      Conditions=conditions, Actions=actions)
        elif isinstance(action, p.DeleteRule):
            _call(f"delete_rule {action.priority}", client.delete_rule, RuleArn=action.arn)
        elif isinstance(action, p.DeleteTargetGroup):
            _call(f"delete_target_group {action.name}", client.delete_target_group,
                  TargetGroupArn=_tg_arn(client, action.name, arns))
        else:  # pragma: no cover - the Action union is closed
            raise TypeError(f"unknown plan action {action!r}")
        if on_step is not None:
            on_step(action)


@dataclass
class AlbListeners:
    """The ALB listener(s) kept equal to the registry: ``rules apply --watch``'s target.

    Each apply reads every listener and the region's ``<prefix>-iN`` target
    groups, plans and performs the plan in its safe order (create, modify,
    then delete: see :mod:`router_rules.plan`); a listener already equal to
    the registry costs only the describe calls. ``listener_arns`` are the
    ``[GROUP=]ARN`` options.
    """

    client: Any
    listener_arns: tuple[str, ...]
    name_prefix: str = model.DEFAULT_NAME_PREFIX
    limits: dict[str, int] = field(default_factory=dict)
    target_overrides: dict[str, str] = field(default_factory=dict)
    target_type: str = "ip"
    say: Callable[[str], None] = lambda _line: None
    name: str = "alb"

    def apply(self, instances: Sequence[Instance]) -> None:
        try:
            rules = model.build(instances, name_prefix=self.name_prefix, **self.limits)
            listeners = model.listener_map(self.listener_arns, rules)
        except RegistryError as exc:
            raise SyncError("render", str(exc)) from exc
        registered = {tg.name for g in rules.groups for tg in g.target_groups}
        try:
            for g, arn in listeners.items():
                live = read_live(self.client, arn, self.name_prefix)
                the_plan = p.plan(g, live, name_prefix=self.name_prefix,
                                  target_overrides=self.target_overrides, registered=registered)
                if not the_plan.actions:
                    continue
                _, vpc = describe_listener(self.client, arn)

                def said(action: p.Action, ident: str = g.ident) -> None:
                    self.say(f"{self.name} {ident}: {action.describe()}")

                execute(self.client, the_plan, listener_arn=arn, vpc_id=vpc,
                        target_type=self.target_type, on_step=said)
        except p.PlanError as exc:
            raise SyncError("plan", str(exc)) from exc
        except RegistryError as exc:
            raise SyncError("aws", str(exc)) from exc
