"""Render a :class:`RuleSet` as Terraform JSON (a ``.tf.json`` file).

The file declares everything it needs from the surrounding infrastructure
as variables, so it is complete as printed:

* ``vpc_id`` — the VPC of the target groups;
* ``listener_arn`` (default group) and ``listener_arn_<group>`` (one per
  public host) — the HTTPS listener of each ALB group (``infra/terraform``
  outputs them);
* ``targets`` — optional map instance id -> target id (EC2 instance id or
  IP); without an entry the IP literal of the instance's ``internal_url`` is
  used, and an instance whose ``internal_url`` names a host must have one;
* ``target_type`` — ``ip`` (default) or ``instance``.

Per instance ``iN`` there are exactly three resources, all keyed ``iN``:
``aws_lb_target_group``, ``aws_lb_listener_rule`` and
``aws_lb_target_group_attachment``. The instance -> group mapping appears
only inside those resources (listener variable and tags), so adding an
instance to an existing group adds those three and changes nothing else.
No ``required_providers`` block: the file drops into a root module that
already has one (a second declaration would be an error).
"""

from __future__ import annotations

import json
import re
from typing import Any

from router_rules.model import AlbGroup, ModelError, RuleSet, TargetGroup

FILE_NAME = "roomshard-rules.tf.json"


def literal(value: str) -> str:
    """A registry value as a Terraform string that is never evaluated.

    Terraform JSON strings are templates: ``${...}`` interpolates and ``%{...}``
    is a directive (``${file("secret")}`` would be read at plan time). Every
    string that comes from the registry goes through here: ``$${`` and
    ``%%{`` are Terraform's escapes for the literal characters.
    """
    return value.replace("${", "$${").replace("%{", "%%{")


_IDENT_RE = re.compile(r"[a-z][a-z0-9_]*")
_KEY_RE = re.compile(r"i[1-9][0-9]{0,3}")


def _check_names(rules: RuleSet) -> None:
    """Identifiers cannot be escaped: a group or resource key that is not one is refused."""
    for g in rules.groups:
        if not _IDENT_RE.fullmatch(g.ident):
            raise ModelError(f"ALB group {g.ident!r} is not a Terraform identifier")
        for key in [tg.key for tg in g.target_groups] + [r.key for r in g.rules]:
            if not _KEY_RE.fullmatch(key):
                raise ModelError(f"resource key {key!r} is not an instance id")


def listener_variable(group: AlbGroup) -> str:
    return "listener_arn" if group.ident == "default" else f"listener_arn_{group.ident}"


def _target_group(tg: TargetGroup, group: AlbGroup) -> dict[str, Any]:
    hc = tg.health_check
    return {
        "name": literal(tg.name),
        "port": tg.port,
        "protocol": tg.protocol,
        "vpc_id": "${var.vpc_id}",
        "target_type": "${var.target_type}",
        "deregistration_delay": tg.deregistration_delay_s,
        "health_check": [{
            "enabled": True, "path": hc.path, "protocol": hc.protocol, "matcher": hc.matcher,
            "interval": hc.interval_s, "timeout": hc.timeout_s,
            "healthy_threshold": hc.healthy_threshold,
            "unhealthy_threshold": hc.unhealthy_threshold,
        }],
        "stickiness": [{"type": "lb_cookie", "enabled": tg.stickiness}],
        "tags": _tags(tg.key, group),
    }


def _tags(instance_id: str, group: AlbGroup) -> dict[str, str]:
    return {"roomshard:instance": literal(instance_id), "roomshard:alb-group": literal(group.ident),
            "roomshard:managed-by": "roomshard rules"}


def _target_id(tg: TargetGroup) -> str:
    key = json.dumps(literal(tg.key))  # a quoted string inside an expression is a template too
    if tg.target_ip is None:
        return f"${{var.targets[{key}]}}"
    return f"${{lookup(var.targets, {key}, {json.dumps(literal(tg.target_ip))})}}"


def render_document(rules: RuleSet) -> dict[str, Any]:
    """The Terraform JSON document as a dict (see the module docstring)."""
    _check_names(rules)
    variables: dict[str, Any] = {
        "vpc_id": {"type": "string", "description": "VPC of the shard target groups"},
        "target_type": {
            "type": "string", "default": "ip",
            "description": "ip (targets are private IPs) or instance (EC2 instance ids)",
            "validation": [{"condition": '${contains(["ip", "instance"], var.target_type)}',
                            "error_message": "target_type must be ip or instance."}],
        },
        "targets": {
            "type": "map(string)", "default": {},
            "description": "instance id (iN) -> target id; defaults to the IP of its internal_url",
        },
    }
    for g in rules.groups:
        variables[listener_variable(g)] = {
            "type": "string",
            "description": "HTTPS listener ARN of the ALB serving "
                           + literal(g.public_base or "the default host (ROOMSHARD_PUBLIC_URL)"),
        }
    tgs: dict[str, Any] = {}
    listener_rules: dict[str, Any] = {}
    attachments: dict[str, Any] = {}
    for g in rules.groups:
        by_key = {tg.key: tg for tg in g.target_groups}
        for rule in g.rules:
            tg = by_key[rule.target_group]
            tgs[tg.key] = _target_group(tg, g)
            listener_rules[rule.key] = {
                "listener_arn": f"${{var.{listener_variable(g)}}}",
                "priority": rule.priority,
                "action": [{"type": "forward",
                            "target_group_arn": f"${{aws_lb_target_group.{tg.key}.arn}}"}],
                "condition": [{"path_pattern": [{"values": [rule.path_pattern]}]}],
                "tags": _tags(rule.key, g),
            }
            attachments[tg.key] = {
                "target_group_arn": f"${{aws_lb_target_group.{tg.key}.arn}}",
                "target_id": _target_id(tg),
                "port": tg.port,
            }
    resource: dict[str, Any] = {}
    if tgs:
        resource = {"aws_lb_target_group": tgs, "aws_lb_listener_rule": listener_rules,
                    "aws_lb_target_group_attachment": attachments}
    doc: dict[str, Any] = {
        "//": "Generated by `roomshard rules --format terraform` from the directory's registry; "
              "regenerate instead of editing.",
        "variable": variables,
        "output": {"roomshard_alb_groups": {
            "description": "ALB group -> the public host it serves and its listener",
            "value": {g.ident: {"public_base": literal(g.public_base or "ROOMSHARD_PUBLIC_URL"),
                                "listener_arn": f"${{var.{listener_variable(g)}}}"}
                      for g in rules.groups},
        }},
    }
    if resource:
        doc["resource"] = resource
    return doc


def render_terraform(rules: RuleSet) -> str:
    """Terraform JSON text: deterministic (no timestamps, instances by number)."""
    return json.dumps(render_document(rules), indent=2) + "\n"
