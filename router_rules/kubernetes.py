"""Render the registry as Kubernetes objects: a Service per shard, Gateway API HTTPRoutes.

* One ``Service`` per instance, ``{prefix}-iN``, selecting the one pod of the
  shard by ``statefulset.kubernetes.io/pod-name: {statefulset}-N`` (the
  StatefulSet in ``infra/kubernetes/`` starts its ordinals at 1, so pod
  ``roomshard-shard-3`` is instance ``i3``), on the port of the instance's
  ``internal_url``, ``appProtocol: kubernetes.io/ws`` (``wss`` for an https
  shard) so the Gateway knows it carries WebSockets.
* ``HTTPRoute`` objects attached to a Gateway: one rule per instance, a
  ``PathPrefix`` match on ``/iN/room/`` to its Service. The API allows 16
  rules per HTTPRoute, so route ``{prefix}-shards-K`` holds the instances
  numbered 16(K-1)+1 .. 16K: adding a shard adds one Service and one rule
  and moves no other shard's rule (a fixed bucket, not a re-split of a list).
  A PathPrefix match is by path element, so ``/i1/room/`` never matches
  ``/i10/room/x``.

* Or, with ``routes="ingress"``, one ``Ingress`` per instance for the AWS
  Load Balancer Controller instead of the HTTPRoutes: ``Prefix`` ``/iN/room/``
  to its Service, ``target-type: ip`` (the ALB sends straight to the pod), an
  IngressGroup per ALB (``{group}`` for the default host, ``{group}-{host}``
  per ``public_base`` host, as the ALB groups of the other formats) ordered by
  instance number (``group.order: N``). Adding a shard adds one Service and one
  Ingress. The ALB limits are checked as for the other formats (target groups
  per ALB, rules per ALB: one rule per instance and host name). The controller
  numbers its rules' priorities itself, in ``group.order``: a shard whose
  number falls between two others shifts the priorities after it (rule
  modifications in place, which the controller makes one by one); roomshard's
  own ``rules apply --watch`` never renumbers (priority ``1000 + N``).

Every registered instance keeps its Service and rule whatever its state, as
with the other formats; it loses them when it is removed from the registry.
The output is a pure function of the registry and the options (no
timestamps, stable order): one YAML stream for ``kubectl apply -f``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import yaml

from router_rules import model
from router_rules.registry import Instance, RegistryError, sort_unique

FILE_NAME = "roomshard-kubernetes.yaml"
DEFAULT_NAMESPACE = "roomshard"
DEFAULT_GATEWAY = "roomshard"
DEFAULT_STATEFULSET = "roomshard-shard"
DEFAULT_SERVICE_PREFIX = "roomshard"
#: Rules one HTTPRoute may hold (``spec.rules`` maxItems in the Gateway API).
RULES_PER_ROUTE = 16
ROUTES = ("gateway", "ingress")
DEFAULT_INGRESS_GROUP = "roomshard"
DEFAULT_INGRESS_CLASS = "alb"
#: The AWS Load Balancer Controller's ``group.order`` range is -1000..1000.
MAX_GROUP_ORDER = 1000
_ALB = "alb.ingress.kubernetes.io/"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
_LABELS = {"app.kubernetes.io/name": "roomshard", "app.kubernetes.io/managed-by": "roomshard-rules"}
# RFC 1123 labels and subdomains, as Kubernetes checks names.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _check(what: str, value: str, pattern: re.Pattern[str], longest: int) -> str:
    if len(value) > longest or not pattern.fullmatch(value):
        raise RegistryError(f"{what} {value!r}: lower-case letters, digits and '-' "
                            f"(at most {longest} characters)")
    return value


def _service(inst: Instance, *, namespace: str, prefix: str, statefulset: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(prefix, inst), "namespace": namespace,
                     "labels": {**_LABELS, "roomshard.io/instance": inst.id}},
        "spec": {
            "type": "ClusterIP",
            "selector": {POD_NAME_LABEL: f"{statefulset}-{inst.number}"},
            "ports": [{"name": "ws", "port": inst.port, "targetPort": inst.port, "protocol": "TCP",
                       "appProtocol": "kubernetes.io/wss" if inst.scheme == "https"
                       else "kubernetes.io/ws"}],
            # A shard's pod is ready only while it takes rooms (/readyz); until then a room
            # URL answers 503 from the Gateway, and the client asks the directory again.
            "publishNotReadyAddresses": False,
        },
    }


def service_name(prefix: str, inst: Instance) -> str:
    return f"{prefix}-{inst.id}"


def route_name(prefix: str, bucket: int) -> str:
    return f"{prefix}-shards-{bucket}"


def _route(bucket: int, members: list[Instance], *, namespace: str, prefix: str,
           gateway: str, gateway_namespace: str | None, hostnames: list[str]) -> dict[str, Any]:
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}
    if gateway_namespace is not None:
        parent["namespace"] = gateway_namespace
    spec: dict[str, Any] = {"parentRefs": [parent]}
    if hostnames:
        spec["hostnames"] = hostnames
    spec["rules"] = [{
        "name": inst.id,
        "matches": [{"path": {"type": "PathPrefix", "value": f"/{inst.id}/room/"}}],
        "backendRefs": [{"kind": "Service", "name": service_name(prefix, inst), "port": inst.port}],
    } for inst in members]
    low, high = (bucket - 1) * RULES_PER_ROUTE + 1, bucket * RULES_PER_ROUTE
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": route_name(prefix, bucket), "namespace": namespace,
                     "labels": dict(_LABELS),
                     "annotations": {"roomshard.io/instances": f"i{low}-i{high}"}},
        "spec": spec,
    }


def _ingress(inst: Instance, *, namespace: str, prefix: str, group: str, ingress_class: str,
             hosts: list[str], idle_timeout: int) -> dict[str, Any]:
    paths = {"paths": [{"path": f"/{inst.id}/room/", "pathType": "Prefix", "backend": {
        "service": {"name": service_name(prefix, inst), "port": {"number": inst.port}}}}]}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": service_name(prefix, inst), "namespace": namespace,
                     "labels": {**_LABELS, "roomshard.io/instance": inst.id},
                     "annotations": {
                         _ALB + "group.name": group,
                         _ALB + "group.order": str(inst.number),
                         _ALB + "target-type": "ip",
                         _ALB + "backend-protocol": "HTTPS" if inst.scheme == "https" else "HTTP",
                         _ALB + "healthcheck-path": model.HEALTH_CHECK_PATH,
                         # A quiet WebSocket must outlive the ALB's idle timeout (3 pings).
                         _ALB + "load-balancer-attributes":
                             f"idle_timeout.timeout_seconds={idle_timeout}",
                     }},
        "spec": {"ingressClassName": ingress_class,
                 "rules": [{"host": h, "http": paths} for h in hosts] or [{"http": paths}]},
    }


def _ingresses(ordered: list[Instance], *, namespace: str, prefix: str, group: str,
               ingress_class: str, hosts: list[str], limits: dict[str, int],
               ping_interval: float) -> list[dict[str, Any]]:
    """One Ingress per instance, its IngressGroup that of its ALB group; limits checked."""
    quota = limits.get("rules_quota", model.DEFAULT_RULES_QUOTA)
    reserved_rules = limits.get("reserved_rules", model.DEFAULT_RESERVED_RULES)
    rules = model.build(  # ModelError past an ALB's target groups
        ordered, rules_quota=quota, reserved_rules=reserved_rules,
        reserved_target_groups=limits.get("reserved_target_groups",
                                          model.DEFAULT_RESERVED_TARGET_GROUPS))
    out = []
    for g in rules.groups:
        group_hosts = ([_check("public_base host", g.public_host.rsplit(":", 1)[0].lower(),
                               _HOSTNAME, 253)] if g.public_host else hosts)
        name = group if g.ident == model.DEFAULT_GROUP else f"{group}-{g.ident.replace('_', '-')}"
        _check("--ingress-group", name, _LABEL, 63)
        reserved = reserved_rules if g.ident == model.DEFAULT_GROUP else 0
        needed = len(g.instances) * max(1, len(group_hosts))
        if needed + reserved > quota:
            raise model.ModelError(
                f"IngressGroup {name}: {needed} rules ({len(g.instances)} shards x "
                f"{max(1, len(group_hosts))} hosts) + {reserved} reserved exceed the ALB's "
                f"{quota} rules: give some instances another public_base")
        for inst in g.instances:
            if inst.number > MAX_GROUP_ORDER:
                raise model.ModelError(
                    f"{inst.id}: an IngressGroup orders at most {MAX_GROUP_ORDER} instances "
                    "(group.order); use the Gateway API routes (--routes gateway)")
            out.append(_ingress(inst, namespace=namespace, prefix=prefix, group=name,
                                ingress_class=ingress_class, hosts=group_hosts,
                                idle_timeout=model.idle_timeout_for(ping_interval)))
    return sorted(out, key=lambda o: int(o["metadata"]["labels"]["roomshard.io/instance"][1:]))


def build_objects(instances: Iterable[Instance], *, namespace: str = DEFAULT_NAMESPACE,
                  prefix: str = DEFAULT_SERVICE_PREFIX, statefulset: str = DEFAULT_STATEFULSET,
                  gateway: str = DEFAULT_GATEWAY, gateway_namespace: str | None = None,
                  hostnames: Iterable[str] = (), routes: str = "gateway",
                  ingress_group: str = DEFAULT_INGRESS_GROUP,
                  ingress_class: str = DEFAULT_INGRESS_CLASS,
                  limits: dict[str, int] | None = None,
                  ping_interval: float = 20.0) -> list[dict[str, Any]]:
    """The objects, Services first (by instance number), then the HTTPRoutes (by bucket) or
    the Ingresses (by instance number)."""
    _check("--namespace", namespace, _LABEL, 63)
    _check("--service-prefix", prefix, _LABEL, 50)  # + "-i9999" within a 63-character label
    _check("--statefulset", statefulset, _LABEL, 50)
    _check("--gateway", gateway, _SUBDOMAIN, 253)
    if gateway_namespace is not None:
        _check("--gateway namespace", gateway_namespace, _LABEL, 63)
    hosts = [_check("--hostname", h, _HOSTNAME, 253) for h in hostnames]
    ordered = sort_unique(instances)
    services = [_service(i, namespace=namespace, prefix=prefix, statefulset=statefulset)
                for i in ordered]
    if routes not in ROUTES:
        raise RegistryError(f"--routes {routes!r}: gateway or ingress")
    if routes == "ingress":
        _check("--ingress-group", ingress_group, _LABEL, 40)
        _check("--ingress-class", ingress_class, _SUBDOMAIN, 253)
        return [*services, *_ingresses(ordered, namespace=namespace, prefix=prefix,
                                       group=ingress_group, ingress_class=ingress_class,
                                       hosts=hosts, limits=limits or {},
                                       ping_interval=ping_interval)]
    buckets: dict[int, list[Instance]] = {}
    for inst in ordered:
        buckets.setdefault((inst.number - 1) // RULES_PER_ROUTE + 1, []).append(inst)
    http_routes = [_route(b, members, namespace=namespace, prefix=prefix, gateway=gateway,
                          gateway_namespace=gateway_namespace, hostnames=hosts)
                   for b, members in sorted(buckets.items())]
    return [*services, *http_routes]


def render_kubernetes(instances: Iterable[Instance], **options: Any) -> str:
    """One YAML stream of every object (``kubectl apply -f``); empty registry: no object."""
    objects = build_objects(instances, **options)
    head = ("# roomshard shards: generated by `roomshard rules --format kubernetes` from the "
            "registry.\n# Apply with kubectl (or let the reconciler do it); do not edit by hand.\n")
    return head + "".join("---\n" + yaml.safe_dump(o, sort_keys=False, default_flow_style=False)
                          for o in objects)
