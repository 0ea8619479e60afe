"""Test-side model of an ALB listener: AWS path-pattern matching and rule evaluation.

Written from the AWS documentation, independently of ``router_rules``, so the
tests check the generated output against AWS semantics rather than against
the generator's own idea of them:

* a path pattern is matched against the whole path (not the query string),
  case-sensitively; ``*`` matches zero or more characters including ``/``,
  ``?`` exactly one character; every other character matches itself;
* rules are evaluated from the lowest priority number up, the first match
  wins, and without a match the listener's default action (our fixed 404)
  answers.

Also here: readers that turn the generated Terraform JSON and CloudFormation
templates back into ``(priority, patterns, target group name)`` rules, and a
structural checker for the Terraform JSON (providers cannot be downloaded
here, so ``terraform validate`` cannot run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_404 = "default-404"
TG_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?")


def path_pattern_matches(pattern: str, path: str) -> bool:
    """AWS ALB path-pattern semantics (see module docstring)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, path, flags=re.DOTALL) is not None


@dataclass(frozen=True)
class SimRule:
    priority: int
    patterns: tuple[str, ...]
    target: str  # target group name


def route(rules: list[SimRule], path: str) -> str:
    """The target group name serving ``path`` (query string ignored), or DEFAULT_404."""
    path = path.split("?", 1)[0]
    priorities = [r.priority for r in rules]
    assert len(priorities) == len(set(priorities)), "duplicate priority on one listener"
    for rule in sorted(rules, key=lambda r: r.priority):
        if any(path_pattern_matches(p, path) for p in rule.patterns):
            return rule.target
    return DEFAULT_404


_REF_RE = re.compile(r"\$\{aws_lb_target_group\.([A-Za-z0-9_-]+)\.arn\}")


def terraform_listeners(doc: dict[str, Any]) -> dict[str, list[SimRule]]:
    """Listener variable name -> its rules, read from a Terraform JSON document."""
    resources = doc.get("resource", {})
    tgs = resources.get("aws_lb_target_group", {})
    out: dict[str, list[SimRule]] = {}
    for rule in resources.get("aws_lb_listener_rule", {}).values():
        (action,) = rule["action"]
        assert action["type"] == "forward"
        tg_key = _REF_RE.fullmatch(action["target_group_arn"]).group(1)
        patterns = tuple(v for c in rule["condition"] for pp in c["path_pattern"] for v in pp["values"])
        listener = re.fullmatch(r"\$\{var\.([a-z0-9_]+)\}", rule["listener_arn"]).group(1)
        out.setdefault(listener, []).append(SimRule(rule["priority"], patterns, tgs[tg_key]["name"]))
    return out


def cloudformation_rules(template: dict[str, Any]) -> list[SimRule]:
    """The listener rules of one generated CloudFormation template."""
    res = template["Resources"]
    out = []
    for body in res.values():
        if body["Type"] != "AWS::ElasticLoadBalancingV2::ListenerRule":
            continue
        props = body["Properties"]
        assert props["ListenerArn"] == {"Ref": "ListenerArn"}
        (action,) = props["Actions"]
        tg = res[action["TargetGroupArn"]["Ref"]]["Properties"]["Name"]
        patterns = tuple(v for c in props["Conditions"] if c["Field"] == "path-pattern"
                         for v in c["PathPatternConfig"]["Values"])
        out.append(SimRule(props["Priority"], patterns, tg))
    return out


_INTERP_RE = re.compile(r"\$\{([^{}]*)\}")
_REQUIRED = {
    "aws_lb_target_group": {"name", "port", "protocol", "vpc_id", "health_check"},
    "aws_lb_listener_rule": {"listener_arn", "priority", "action", "condition"},
    "aws_lb_target_group_attachment": {"target_group_arn", "target_id", "port"},
}


def check_terraform_json(doc: dict[str, Any]) -> None:
    """Structural validation of a Terraform JSON document; raises AssertionError."""
    assert set(doc) <= {"//", "variable", "resource", "output", "locals"}, set(doc)
    variables = doc.get("variable", {})
    for name, var in variables.items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name), name
        assert set(var) <= {"type", "default", "description", "validation", "sensitive", "nullable"}
    resources = doc.get("resource", {})
    declared = {(kind, name) for kind, items in resources.items() for name in items}
    for kind, items in resources.items():
        assert kind in _REQUIRED, kind
        for name, body in items.items():
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name), name
            missing = _REQUIRED[kind] - set(body)
            assert not missing, f"{kind}.{name} lacks {missing}"
    tg_names = [b["name"] for b in resources.get("aws_lb_target_group", {}).values()]
    assert len(tg_names) == len(set(tg_names)), "duplicate target group names"
    for n in tg_names:
        assert len(n) <= 32 and TG_NAME_RE.fullmatch(n), n
    per_listener: dict[str, list[int]] = {}
    for rule in resources.get("aws_lb_listener_rule", {}).values():
        assert isinstance(rule["priority"], int) and 1 <= rule["priority"] <= 50_000
        per_listener.setdefault(rule["listener_arn"], []).append(rule["priority"])
    for prios in per_listener.values():
        assert len(prios) == len(set(prios)), "duplicate priority on one listener"

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            assert value.count("${") == len(_INTERP_RE.findall(value)), f"unbalanced: {value}"
            for expr in _INTERP_RE.findall(value):
                for var in re.findall(r"\bvar\.([A-Za-z0-9_-]+)", expr):
                    assert var in variables, f"undeclared variable {var} in {value}"
                for kind, name in re.findall(r"\b(aws_[a-z_]+)\.([A-Za-z0-9_-]+)\.", expr):
                    assert (kind, name) in declared, f"undeclared {kind}.{name} in {value}"

    walk({k: v for k, v in doc.items() if k != "//"})
