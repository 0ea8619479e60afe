"""Theory of operation: registered instances -> load balancer groups, target groups, rules.

Pure: plain data in, plain data out, no I/O, no clock. Every renderer
(Terraform JSON, CloudFormation, nginx) and the live-listener planner read a
:class:`RuleSet`; none of them decides routing on its own.

What the model guarantees, and the AWS facts behind each choice:

* One target group and one listener rule per instance. The rule's only
  condition is ``path-pattern`` ``/iN/room/*``: ALB path patterns are
  case-sensitive, ``*`` matches any characters including ``/`` and ``?``
  exactly one, and the pattern must match the whole path, so ``/i1/room/*``
  matches neither ``/i1/room`` nor ``/i10/room/x``.
* The rule priority is ``RULE_PRIORITY_BASE + N``: a function of the
  instance number alone. Rules are never renumbered, so adding instance K+1
  adds one target group, one rule and one attachment and changes nothing
  else; priorities below ``RULE_PRIORITY_BASE`` are left to the
  infrastructure around us (the directory's rules in ``infra/``).
* Target group names: at most 32 characters of letters, digits and hyphens,
  no leading or trailing hyphen, not starting with ``internal-``, unique per
  account and region; ``<prefix>-iN``, with the prefix validated so that
  ``<prefix>-i9999`` still fits.
* Health check ``GET /healthz`` over HTTP(S) (the shard's liveness route),
  a short deregistration delay (a shard drains its rooms through the
  directory before it stops, so there is nothing left to wait for), no
  stickiness (the path already pins a room to its instance).
* An ALB holds at most 100 target groups (a hard limit) and, by default,
  100 rules (an adjustable quota). The default group's ALB also holds the
  directory's target group and rules, so fewer shards fit there. Instances are grouped by the host of their
  ``public_base`` (room URLs of that instance point at that host, so that
  host's load balancer must route it); instances without one belong to the
  ``default`` group, served by the directory's ``ROOMSHARD_PUBLIC_URL``. One
  group is one ALB and never packs two hosts, so a new instance never moves
  another one between load balancers. A group over the limit is an error
  naming the group: the operator gives some instances another public_base.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from router_rules.registry import Instance, RegistryError, sort_unique

MAX_TARGET_GROUPS_PER_ALB = 100  # hard AWS limit
#: Default AWS quota of rules per load balancer (adjustable), default rules excluded.
DEFAULT_RULES_QUOTA = 100
RULE_PRIORITY_BASE = 1000  # priorities 1..999 belong to infra (the directory's rules)
MAX_RULE_PRIORITY = 50_000  # AWS range is 1..50000
MAX_TARGET_GROUP_NAME = 32
MAX_PATH_PATTERN = 128
DEFAULT_NAME_PREFIX = "rs"
DEFAULT_GROUP = "default"
HEALTH_CHECK_PATH = "/healthz"
DEREGISTRATION_DELAY_S = 10
#: Target groups the default group's ALB holds besides the shards: the directory's.
DEFAULT_RESERVED_TARGET_GROUPS = 1
#: Rules infra/ puts on the default ALB: the directory's and the /v1/internal/* block.
DEFAULT_RESERVED_RULES = 2
#: Shards ping every 20 s by default (``roomshard.wire.protocol``). A proxy that
#: times out an idle connection sooner than the next ping would cut healthy
#: WebSockets; we use 3 pings' worth and never less than a minute.
MIN_IDLE_TIMEOUT_S = 60

_PREFIX_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_MAX_PREFIX = MAX_TARGET_GROUP_NAME - len("-i9999")
# Characters AWS accepts in a path-pattern value.
_PATH_PATTERN_RE = re.compile(r"[A-Za-z0-9_\-.$/~\"'@:+&*?]+")


class ModelError(RegistryError):
    """The registry cannot be mapped onto load balancers (limits, names)."""


def idle_timeout_for(ping_interval: float) -> int:
    """Idle/read timeout for proxies in front of shards: >= 3 pings, >= 60 s."""
    if ping_interval <= 0:
        raise ModelError("ping interval must be positive")
    return max(MIN_IDLE_TIMEOUT_S, math.ceil(3 * ping_interval))


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if ``<prefix>-i9999`` is a valid target group name, else raise."""
    if not _PREFIX_RE.fullmatch(prefix) or len(prefix) > _MAX_PREFIX:
        raise ModelError(f"name prefix {prefix!r}: use 1..{_MAX_PREFIX} letters, digits and "
                         "hyphens, not starting or ending with a hyphen")
    if prefix.lower().startswith("internal"):
        raise ModelError(f"name prefix {prefix!r}: target group names may not start with 'internal-'")
    return prefix


def target_group_name(prefix: str, number: int) -> str:
    return f"{prefix}-i{number}"


def rule_priority(number: int) -> int:
    return RULE_PRIORITY_BASE + number


def path_pattern(instance_id: str) -> str:
    return f"/{instance_id}/room/*"


def group_ident(host: str | None) -> str:
    """A group's identifier for variable names: ``chat-b.example.com:443`` -> ``chat_b_example_com_443``."""
    if host is None:
        return DEFAULT_GROUP
    ident = re.sub(r"[^a-z0-9]+", "_", host.lower()).strip("_")
    # Terraform identifiers start with a letter; "default" is the default group's.
    return ident if ident[:1].isalpha() and ident != DEFAULT_GROUP else "h_" + ident


@dataclass(frozen=True)
class HealthCheck:
    path: str = HEALTH_CHECK_PATH
    protocol: str = "HTTP"
    matcher: str = "200"
    interval_s: int = 10
    timeout_s: int = 5
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2


@dataclass(frozen=True)
class TargetGroup:
    key: str  # the instance id, also the resource key in every renderer
    name: str
    protocol: str  # HTTP or HTTPS, from internal_url
    port: int
    target_ip: str | None  # the internal_url host when it is an IP literal
    health_check: HealthCheck
    deregistration_delay_s: int = DEREGISTRATION_DELAY_S
    stickiness: bool = False


@dataclass(frozen=True)
class ListenerRule:
    key: str  # the instance id
    priority: int
    path_pattern: str
    target_group: str  # TargetGroup.key


@dataclass(frozen=True)
class AlbGroup:
    """One load balancer (one listener) and the instances it routes."""

    ident: str  # "default" or the public host as an identifier
    public_base: str | None  # None: the directory's ROOMSHARD_PUBLIC_URL
    instances: tuple[Instance, ...]
    target_groups: tuple[TargetGroup, ...]
    rules: tuple[ListenerRule, ...]

    @property
    def public_host(self) -> str | None:
        return self.instances[0].public_host if self.instances else None


@dataclass(frozen=True)
class RuleSet:
    groups: tuple[AlbGroup, ...]  # the default group first, then by public host
    name_prefix: str
    idle_timeout_s: int

    @property
    def instances(self) -> tuple[Instance, ...]:
        return tuple(sorted(i for g in self.groups for i in g.instances))

    def group_of(self, instance_id: str) -> AlbGroup:
        for g in self.groups:
            if any(i.id == instance_id for i in g.instances):
                return g
        raise KeyError(instance_id)


def _target_group(inst: Instance, prefix: str) -> TargetGroup:
    proto = inst.scheme.upper()
    return TargetGroup(key=inst.id, name=target_group_name(prefix, inst.number), protocol=proto,
                       port=inst.port, target_ip=inst.host if inst.host_is_ip else None,
                       health_check=HealthCheck(protocol=proto))


def _rule(inst: Instance) -> ListenerRule:
    pattern = path_pattern(inst.id)
    # Both hold for every i1..i9999; checked so a future id scheme cannot slip past AWS.
    assert len(pattern) <= MAX_PATH_PATTERN and _PATH_PATTERN_RE.fullmatch(pattern)
    assert rule_priority(inst.number) <= MAX_RULE_PRIORITY
    return ListenerRule(key=inst.id, priority=rule_priority(inst.number), path_pattern=pattern,
                        target_group=inst.id)


def build(instances: Iterable[Instance], *, name_prefix: str = DEFAULT_NAME_PREFIX,
          ping_interval: float = 20.0,
          reserved_target_groups: int = DEFAULT_RESERVED_TARGET_GROUPS,
          reserved_rules: int = DEFAULT_RESERVED_RULES,
          rules_quota: int = DEFAULT_RULES_QUOTA) -> RuleSet:
    """Map the registry onto ALB groups.

    ``reserved_target_groups`` and ``reserved_rules`` are held on the default
    group's ALB by something else (the directory, see ``infra/``);
    ``rules_quota`` is the account's rules-per-ALB quota. Raises
    :class:`ModelError` when a group exceeds the target group or rule limit,
    or for an invalid prefix.
    """
    prefix = validate_prefix(name_prefix)
    by_host: dict[str | None, list[Instance]] = {}
    for inst in sort_unique(instances):
        by_host.setdefault(inst.public_host, []).append(inst)
    hosts: Sequence[str | None] = sorted(by_host, key=lambda h: (h is not None, h or ""))
    groups = []
    idents: dict[str, str | None] = {}
    for host in hosts:
        members = by_host[host]
        ident = group_ident(host)
        if ident in idents:
            raise ModelError(f"public hosts {idents[ident]!r} and {host!r} map to the same "
                             f"group name {ident!r}; rename one")
        idents[ident] = host
        default = host is None
        limit = min(MAX_TARGET_GROUPS_PER_ALB - (reserved_target_groups if default else 0),
                    rules_quota - (reserved_rules if default else 0))
        if len(members) > limit:
            where = f"public_base host {host}" if host else "the default host (no public_base)"
            raise ModelError(
                f"{len(members)} instances route through {where}, but one ALB holds at most "
                f"{limit} of them (100 target groups per ALB, a hard AWS limit, and the rules "
                "quota): give some "
                "instances another public_base so they land on another load balancer")
        groups.append(AlbGroup(
            ident=ident, public_base=members[0].public_base if host else None,
            instances=tuple(members),
            target_groups=tuple(_target_group(i, prefix) for i in members),
            rules=tuple(_rule(i) for i in members)))
    return RuleSet(groups=tuple(groups), name_prefix=prefix,
                   idle_timeout_s=idle_timeout_for(ping_interval))


def empty_group(ident: str = DEFAULT_GROUP) -> AlbGroup:
    """A group with no instances: what a listener should route once its last instance is gone."""
    return AlbGroup(ident=ident, public_base=None, instances=(), target_groups=(), rules=())


def groups_summary(rules: RuleSet) -> dict[str, object]:
    """Which public host serves which instances: for operators and ``alb-groups.json``.

    ``min_idle_timeout_s`` is the idle timeout every ALB group needs for the
    shards' ping interval (``infra/`` sets 60 s).
    """
    return {"min_idle_timeout_s": rules.idle_timeout_s, "groups": [
        {"group": g.ident,
         "public_base": g.public_base,
         "serves": "the directory's ROOMSHARD_PUBLIC_URL" if g.public_base is None else g.public_base,
         "target_groups": len(g.target_groups),
         "instances": [i.id for i in g.instances]}
        for g in rules.groups]}


def listener_map(values: Sequence[str], rules: RuleSet) -> dict[AlbGroup, str]:
    """``[GROUP=]ARN`` options -> ALB group -> listener ARN; raises ModelError.

    A group name or public host the registry no longer has gets an empty
    group: applying it removes the rules of instances that left the registry.
    """
    groups = {g.ident: g for g in rules.groups}
    groups.update({g.public_host: g for g in rules.groups if g.public_host})
    out: dict[AlbGroup, str] = {}
    for value in values:
        key, sep, arn = value.rpartition("=")
        if not sep:
            if len(rules.groups) == 1:
                key = rules.groups[0].ident
            elif len(rules.groups) > 1 and DEFAULT_GROUP not in groups:
                raise ModelError(f"--listener-arn {arn}: several ALB groups, write GROUP=ARN")
            else:
                key = DEFAULT_GROUP
        group = groups.get(key) or empty_group(group_ident(key) if key != DEFAULT_GROUP else key)
        out[group] = arn
    return out
