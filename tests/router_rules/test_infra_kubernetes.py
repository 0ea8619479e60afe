"""infra/kubernetes/: every object valid against the real schemas, and the pieces agree with
each other and with `roomshard rules --format kubernetes` (names, labels, ports, ordinals,
the drain inside the grace period). No cluster runs here: nothing is applied."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from router_rules.kubernetes import (
    DEFAULT_GATEWAY,
    DEFAULT_NAMESPACE,
    DEFAULT_STATEFULSET,
    POD_NAME_LABEL,
    build_objects,
)
from tests.router_rules.conftest import registry
from tests.router_rules.test_kubernetes import validate

INFRA = Path(__file__).resolve().parents[2] / "infra" / "kubernetes"


def load() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((INFRA / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for obj in yaml.safe_load_all((INFRA / name).read_text()):
            if obj is not None:
                out[(obj["kind"], obj["metadata"]["name"])] = obj
    return out


@pytest.fixture(scope="module")
def objs() -> dict[tuple[str, str], dict[str, Any]]:
    return load()


def test_every_file_is_in_the_kustomization_and_every_object_is_valid(
        objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    listed = set(yaml.safe_load((INFRA / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in INFRA.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = sorted({k for k, _ in objs})
    assert kinds == ["ConfigMap", "Deployment", "Gateway", "HTTPRoute", "Namespace", "NetworkPolicy",
                     "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Service",
                     "ServiceAccount", "StatefulSet"]
    for obj in objs.values():
        validate(obj)


def test_kubectl_kustomize_renders_the_same_objects(objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    """`kubectl kustomize` (offline) builds the set the tests check, nothing more or less."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run(["kubectl", "kustomize", str(INFRA)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rendered = {(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(done.stdout) if o}
    assert rendered == set(objs)


def _containers(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_the_shards_statefulset_matches_the_generated_services(
        objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Pod N is iN: ordinals start at 1 and the generated Service for iN selects pod
    roomshard-shard-N by the label the StatefulSet controller sets; the shard listens where
    the registry's URL (its pod IP, the generated Service's port) says."""
    sts = objs[("StatefulSet", DEFAULT_STATEFULSET)]
    assert sts["metadata"]["namespace"] == DEFAULT_NAMESPACE
    assert sts["spec"]["ordinals"] == {"start": 1}
    shard = _containers(sts)
    script = shard["args"][0]
    assert 'exec roomshard shard --instance "i${HOSTNAME##*-}"' in script
    port = shard["ports"][0]["containerPort"]
    assert f'--advertise-url "http://${{POD_IP}}:{port}"' in script
    assert f"--port {port}" in script
    (service,) = [o for o in build_objects(registry([3]))
                  if o["kind"] == "Service"]
    assert service["spec"]["selector"] == {POD_NAME_LABEL: f"{DEFAULT_STATEFULSET}-3"}
    assert service["spec"]["ports"][0]["targetPort"] == 8081 == port
    assert shard["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert shard["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_a_shard_drains_within_its_grace_period(objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The preStop hook sends the shard SIGTERM (its live drain) and waits; the pod's grace
    period is longer than the drain's bound, so no shard is killed mid-move; one shard at a
    time may be disrupted."""
    sts = objs[("StatefulSet", DEFAULT_STATEFULSET)]
    shard = _containers(sts)
    pre_stop = " ".join(shard["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in pre_stop and "kill -0 1" in pre_stop
    drain = float(objs[("ConfigMap", "roomshard")]["data"]["ROOMSHARD_SHUTDOWN_TIMEOUT"])
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + 10
    assert shard["envFrom"] == [{"configMapRef": {"name": "roomshard"}}]
    pdb = objs[("PodDisruptionBudget", DEFAULT_STATEFULSET)]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def test_selectors_secrets_and_routes_line_up(objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Every selector selects its pods, every secret key read exists, the directory's route
    and the generated shards' routes attach to the same Gateway, and the directory's
    Service port is the one the shards are told."""
    secret_keys = set(objs[("Secret", "roomshard")]["stringData"])
    for kind, name in [("Deployment", "roomshard-directory"), ("StatefulSet", DEFAULT_STATEFULSET),
                       ("Deployment", "roomshard-rules")]:
        obj = objs[(kind, name)]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for env in _containers(obj).get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == "roomshard" and ref["key"] in secret_keys, ref
    for name, component in [("roomshard-directory", "directory"), (DEFAULT_STATEFULSET, "shard")]:
        svc = objs[("Service", name)]
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == component
    directory_port = objs[("Service", "roomshard-directory")]["spec"]["ports"][0]["port"]
    script = _containers(objs[("StatefulSet", DEFAULT_STATEFULSET)])["args"][0]
    assert re.search(rf"--directory-url http://roomshard-directory:{directory_port}\b", script)
    route = objs[("HTTPRoute", "roomshard-directory")]
    generated = next(o for o in build_objects(registry([1])) if o["kind"] == "HTTPRoute")
    assert route["spec"]["parentRefs"] == generated["spec"]["parentRefs"]
    assert route["spec"]["parentRefs"][0]["name"] == DEFAULT_GATEWAY
    assert ("Gateway", DEFAULT_GATEWAY) in objs
    assert route["spec"]["rules"][0]["backendRefs"][0]["port"] == directory_port


def test_only_the_gateway_and_roomshard_itself_reach_the_pods(
        objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    for name, port in [("roomshard-shard", 8081), ("roomshard-directory", 8080)]:
        policy = objs[("NetworkPolicy", name)]["spec"]
        assert policy["policyTypes"] == ["Ingress"]
        (rule,) = policy["ingress"]
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"roomshard.io/gateway": "true"}}},
                                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "roomshard"}}}]


def test_the_reconciler_applies_what_it_generates_and_may_touch_nothing_else(
        objs: dict[tuple[str, str], dict[str, Any]]) -> None:
    """rules.yaml: the reconciler follows the directory's Service, writes the objects of
    `roomshard rules --format kubernetes` for the same Gateway and StatefulSet, prunes only
    what it labels, and its Role grants exactly the kinds it writes; the directory gates
    new shards on their route."""
    deploy = objs[("Deployment", "roomshard-rules")]
    args = _containers(deploy)["args"]
    directory_port = objs[("Service", "roomshard-directory")]["spec"]["ports"][0]["port"]
    assert args[:4] == ["rules", "--format=kubernetes",
                        f"--from-directory=http://roomshard-directory:{directory_port}", "--watch"]
    assert f"--gateway={DEFAULT_GATEWAY}" in args and f"--statefulset={DEFAULT_STATEFULSET}" in args
    reload = next(a for a in args if a.startswith("--reload-cmd="))
    generated = build_objects(registry([1]))
    label = "app.kubernetes.io/managed-by=roomshard-rules"
    assert f"-l {label}" in reload and "--prune " in reload
    assert {f"{k}={v}" for o in generated for k, v in o["metadata"]["labels"].items()} >= {label}
    kinds = {o["kind"] for o in generated}
    assert kinds == {"Service", "HTTPRoute"}
    assert "--prune-allowlist=core/v1/Service" in reload
    assert "--prune-allowlist=gateway.networking.k8s.io/v1/HTTPRoute" in reload
    role = objs[("Role", "roomshard-rules")]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "services"), ("gateway.networking.k8s.io", "httproutes")}
    binding = objs[("RoleBinding", "roomshard-rules")]
    assert binding["subjects"][0]["name"] == deploy["spec"]["template"]["spec"]["serviceAccountName"]
    assert deploy["spec"]["replicas"] == 1
    assert objs[("ConfigMap", "roomshard")]["data"]["ROOMSHARD_ROUTE_CHECK"] == "on"
