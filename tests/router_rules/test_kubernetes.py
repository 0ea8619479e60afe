"""`roomshard rules --format kubernetes`: Services and Gateway API HTTPRoutes, validated
against the real schemas (core kinds by kubernetes-validate, HTTPRoute by the Gateway API
CRD, standard channel: tests/router_rules/schemas/), golden files, and the change one more
shard makes."""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from router_rules.cli import rules
from router_rules.kubernetes import RULES_PER_ROUTE, build_objects, render_kubernetes
from router_rules.registry import RegistryError, parse_instances
from tests.router_rules.conftest import registry

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
REGEN = os.environ.get("ROOMSHARD_REGEN_GOLDEN") == "1"
GATEWAY_API = HERE / "schemas" / "gateway-api"
K8S_VERSION = "1.31"  # the Gateway API's standard channel and ordinals.start are GA there
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
#: Kinds the Gateway API defines (their CRD's schema), not Kubernetes itself.
GATEWAY_KINDS = {"HTTPRoute": "httproutes.yaml", "Gateway": "gateways.yaml"}


@cache
def crd_schema(kind_file: str) -> dict[str, Any]:
    crd = yaml.safe_load((GATEWAY_API / kind_file).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = v1["schema"]["openAPIV3Schema"]
    return schema


def validate(obj: dict[str, Any]) -> None:
    """Raise unless ``obj`` is valid: a core kind for kubernetes-validate (strict: no unknown
    field), a Gateway API kind for its CRD's schema, and a DNS-label name."""
    name = obj["metadata"]["name"]
    assert len(name) <= 63 and _NAME.fullmatch(name), name
    if obj["kind"] in GATEWAY_KINDS:
        jsonschema.Draft202012Validator(crd_schema(GATEWAY_KINDS[obj["kind"]])).validate(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _fixture(name: str) -> Any:
    return parse_instances(json.loads((HERE / "fixtures" / name).read_text()))


@pytest.mark.parametrize("fixture", ["instances.json", "multi.json"])
def test_golden_files_and_every_object_valid(fixture: str) -> None:
    """Output equals the reviewed golden file (ROOMSHARD_REGEN_GOLDEN=1 rewrites it), and
    every object in it passes its schema."""
    text = render_kubernetes(_fixture(fixture))
    path = GOLDEN / f"{fixture.removesuffix('.json')}.kubernetes.yaml"
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"missing golden file {path.name}: run with ROOMSHARD_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs from its golden file"
    for obj in objects(text):
        validate(obj)


def test_the_schemas_catch_what_the_api_server_would_refuse() -> None:
    """The checks can fail: an unknown field in a Service, a 17th rule, a relative path."""
    service, route = build_objects(registry([1]))
    with pytest.raises(kubernetes_validate.ValidationError):
        validate({**service, "spec": {**service["spec"], "selectr": {}}})
    crowded = {**route, "spec": {**route["spec"], "rules": route["spec"]["rules"] * 17}}
    with pytest.raises(jsonschema.ValidationError):
        validate(crowded)
    bad_match = json.loads(json.dumps(route))
    bad_match["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Glob"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad_match)


def test_a_service_selects_its_shard_pod_and_a_rule_routes_its_prefix() -> None:
    """i1's Service selects pod roomshard-shard-1 on its port as a WebSocket backend, and the
    route's rule sends /i1/room/ there; an https shard is a wss backend."""
    insts = parse_instances({"instances": [
        {"id": "i1", "state": "active", "internal_url": "http://10.0.0.1:8081"},
        {"id": "i2", "state": "down", "internal_url": "https://shard-2.internal:8443"}]})
    s1, s2, route = build_objects(insts, namespace="chat", gateway="edge", gateway_namespace="infra",
                                  hostnames=["chat.example.com"])
    assert s1["metadata"] == {"name": "roomshard-i1", "namespace": "chat", "labels": {
        "app.kubernetes.io/name": "roomshard", "app.kubernetes.io/managed-by": "roomshard-rules",
        "roomshard.io/instance": "i1"}}
    assert s1["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": "roomshard-shard-1"}
    assert s1["spec"]["ports"] == [{"name": "ws", "port": 8081, "targetPort": 8081, "protocol": "TCP",
                                    "appProtocol": "kubernetes.io/ws"}]
    assert s2["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/wss"  # a down shard keeps its rule
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "edge", "namespace": "infra"}]
    assert route["spec"]["hostnames"] == ["chat.example.com"]
    assert route["spec"]["rules"][1] == {
        "name": "i2", "matches": [{"path": {"type": "PathPrefix", "value": "/i2/room/"}}],
        "backendRefs": [{"kind": "Service", "name": "roomshard-i2", "port": 8443}]}
    for obj in (s1, s2, route):
        validate(obj)


def _by_name(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


@pytest.mark.parametrize("added", [5, 17, 40])
def test_one_more_shard_changes_exactly_one_service_and_one_rule(added: int) -> None:
    """Adding iN adds its Service and one rule to the route of its bucket (a new route when
    the bucket was empty); every other object is unchanged, byte for byte."""
    before_numbers = [n for n in range(1, 41) if n != added]
    before = _by_name(build_objects(registry(before_numbers)))
    after = _by_name(build_objects(registry([*before_numbers, added])))
    assert set(after) - set(before) == {("Service", f"roomshard-i{added}")}
    bucket = (added - 1) // RULES_PER_ROUTE + 1
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [("HTTPRoute", f"roomshard-shards-{bucket}")]
    old_rules = before[changed[0]]["spec"]["rules"]
    new_rules = after[changed[0]]["spec"]["rules"]
    assert [r for r in new_rules if r not in old_rules] == [
        r for r in new_rules if r["name"] == f"i{added}"]
    assert len(new_rules) == len(old_rules) + 1
    for obj in after.values():
        validate(obj)


def test_routes_hold_sixteen_rules_by_instance_number() -> None:
    """i1..i16 in route 1, i17..i32 in route 2, i100 alone in route 7."""
    objs = build_objects(registry([*range(1, 33), 100]))
    routes = [o for o in objs if o["kind"] == "HTTPRoute"]
    assert [r["metadata"]["name"] for r in routes] == ["roomshard-shards-1", "roomshard-shards-2",
                                                       "roomshard-shards-7"]
    assert [[rule["name"] for rule in r["spec"]["rules"]] for r in routes] == [
        [f"i{n}" for n in range(1, 17)], [f"i{n}" for n in range(17, 33)], ["i100"]]
    assert routes[2]["metadata"]["annotations"] == {"roomshard.io/instances": "i97-i112"}
    for obj in objs:
        validate(obj)


def test_no_instance_is_no_object_and_bad_names_are_refused() -> None:
    assert objects(render_kubernetes([])) == []
    for options in ({"namespace": "Chat"}, {"prefix": "x" * 51}, {"gateway": "a_b"},
                    {"hostnames": ["bad host"]}, {"statefulset": "-x"}):
        with pytest.raises(RegistryError):
            build_objects(registry([1]), **options)


def test_cli_writes_the_stream_and_refuses_with_one_line(tmp_path: Path) -> None:
    """`roomshard rules --format kubernetes --from-file F`: the YAML on stdout (or --out DIR),
    --gateway NAMESPACE/NAME; a bad option is one line and exit code 2."""
    src = HERE / "fixtures" / "instances.json"
    runner = CliRunner()
    done = runner.invoke(rules, ["--format", "kubernetes", "--from-file", str(src),
                                 "--gateway", "infra/edge", "--namespace", "chat"])
    assert done.exit_code == 0, done.output
    objs = objects(done.stdout)
    assert {o["metadata"]["namespace"] for o in objs} == {"chat"}
    route = next(o for o in objs if o["kind"] == "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["namespace"] == "infra"
    done = runner.invoke(rules, ["--format", "kubernetes", "--from-file", str(src), "--out", str(tmp_path)])
    assert done.exit_code == 0
    assert objects((tmp_path / "roomshard-kubernetes.yaml").read_text()) == objects(
        render_kubernetes(_fixture("instances.json")))
    bad = runner.invoke(rules, ["--format", "kubernetes", "--from-file", str(src), "--namespace", "Bad_NS"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().count("\n") == 0 and "--namespace 'Bad_NS'" in bad.stderr


def _ingress_objects(numbers: list[int], **options: Any) -> list[dict[str, Any]]:
    return build_objects(registry(numbers), routes="ingress", **options)


def test_the_ingress_variant_is_golden_and_valid() -> None:
    """--routes ingress: one Ingress per shard for the AWS Load Balancer Controller, an
    IngressGroup per public host, target-type ip, the WebSocket-safe idle timeout."""
    text = render_kubernetes(_fixture("multi.json"), routes="ingress")
    path = GOLDEN / "multi.ingress.kubernetes.yaml"
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"missing golden file {path.name}: run with ROOMSHARD_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs from its golden file"
    objs = objects(text)
    for obj in objs:
        validate(obj)
    ingresses = [o for o in objs if o["kind"] == "Ingress"]
    assert len(ingresses) == len([o for o in objs if o["kind"] == "Service"])
    first = ingresses[0]
    notes = first["metadata"]["annotations"]
    assert notes["alb.ingress.kubernetes.io/target-type"] == "ip"
    assert notes["alb.ingress.kubernetes.io/group.name"] == "roomshard"
    assert notes["alb.ingress.kubernetes.io/load-balancer-attributes"] == \
        "idle_timeout.timeout_seconds=60"
    (rule,) = first["spec"]["rules"]
    (path_rule,) = rule["http"]["paths"]
    assert (path_rule["path"], path_rule["pathType"]) == ("/i1/room/", "Prefix")
    assert path_rule["backend"]["service"]["name"] == "roomshard-i1"
    groups = {o["metadata"]["annotations"]["alb.ingress.kubernetes.io/group.name"]: o
              for o in ingresses}
    assert set(groups) == {"roomshard", "roomshard-chat-b-example-com",
                           "roomshard-chat-c-example-com-8443"}
    assert groups["roomshard-chat-c-example-com-8443"]["spec"]["rules"][0]["host"] == \
        "chat-c.example.com"


@pytest.mark.parametrize("added", [3, 40])
def test_one_more_shard_adds_one_service_and_one_ingress(added: int) -> None:
    before_numbers = [n for n in range(1, 41) if n != added]
    before = _by_name(_ingress_objects(before_numbers))
    after = _by_name(_ingress_objects([*before_numbers, added]))
    assert set(after) - set(before) == {("Service", f"roomshard-i{added}"),
                                        ("Ingress", f"roomshard-i{added}")}
    assert [k for k in before if before[k] != after[k]] == []


def test_the_ingress_variant_keeps_to_the_alb_limits() -> None:
    """Rules count once per host name; the default ALB keeps the directory's rules; an
    IngressGroup cannot order past 1,000; no ALB takes more than 100 target groups."""
    assert len(_ingress_objects(list(range(1, 99)))) == 2 * 98
    with pytest.raises(RegistryError, match="exceed the ALB's 100 rules"):
        _ingress_objects(list(range(1, 51)), hostnames=["a.example.com", "b.example.com"])
    assert _ingress_objects(list(range(1, 50)), hostnames=["a.example.com", "b.example.com"])
    with pytest.raises(RegistryError, match="group.order"):
        _ingress_objects([1001])
    with pytest.raises(RegistryError):
        _ingress_objects(list(range(1, 101)))
    with pytest.raises(RegistryError, match="--routes"):
        build_objects(registry([1]), routes="mesh")


def test_cli_writes_ingresses(tmp_path: Path) -> None:
    doc = tmp_path / "instances.json"
    doc.write_text(json.dumps({"instances": [
        {"id": "i1", "state": "active", "internal_url": "http://10.0.0.1:8081"}]}))
    result = CliRunner().invoke(rules, ["--format", "kubernetes", "--from-file", str(doc),
                                        "--routes", "ingress", "--ingress-group", "chat",
                                        "--ingress-class", "alb-internal"])
    assert result.exit_code == 0, result.output
    (ingress,) = [o for o in objects(result.output) if o["kind"] == "Ingress"]
    assert ingress["spec"]["ingressClassName"] == "alb-internal"
    assert ingress["metadata"]["annotations"]["alb.ingress.kubernetes.io/group.name"] == "chat"
    bad = CliRunner().invoke(rules, ["--format", "kubernetes", "--from-file", str(doc),
                                     "--routes", "ingress", "--ingress-group", "Not Valid"])
    assert bad.exit_code == 2 and "--ingress-group" in bad.output

