"""Generated CloudFormation passes cfn-lint and deploys on moto (create, then update)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from roomshard.testing.timing import t
from router_rules.cloudformation import render_cloudformation
from router_rules.model import build
from tests.router_rules.albsim import DEFAULT_404, SimRule, route
from tests.router_rules.conftest import registry
from tests.router_rules.moto_env import FakeAws

HERE = Path(__file__).parent
INFRA_TEMPLATE = HERE.parents[1] / "infra" / "cloudformation" / "base.yaml"


def cfn_lint(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("cfn-lint") or str(Path(sys.executable).with_name("cfn-lint"))
    return subprocess.run([exe, "--regions", "us-east-1", "--", *map(str, paths)],
                          capture_output=True, text=True, check=False, timeout=t(120))


def test_generated_templates_pass_cfn_lint(tmp_path):
    """Every generated template (single group, several groups, host-named targets) lints clean."""
    hosts = {n: "wss://chat-b.example.com" for n in range(150, 160)}
    sets = {"one": registry([1, 2, 3, 10, 9999]), "multi": registry(list(range(1, 20)) + list(range(150, 160)), hosts)}
    paths = []
    for label, insts in sets.items():
        for name, text in render_cloudformation(build(insts)).items():
            paths.append(tmp_path / f"{label}.{name}")
            paths[-1].write_text(text)
    paths += sorted((HERE / "golden").glob("*.template.json"))
    res = cfn_lint(*paths)
    assert res.returncode == 0, res.stdout + res.stderr


def test_infra_templates_pass_cfn_lint():
    """infra/cloudformation/*.yaml (base, shard, shard-group) lint clean."""
    templates = sorted(INFRA_TEMPLATE.parent.glob("*.yaml"))
    assert {t.name for t in templates} >= {"base.yaml", "shard.yaml", "shard-group.yaml"}
    res = cfn_lint(*templates)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path):
    """The lint step can fail: an unknown property is reported (the check is not a no-op)."""
    (name, text), = render_cloudformation(build(registry([1]))).items()
    doc = json.loads(text)
    doc["Resources"]["RuleI1"]["Properties"]["Priorty"] = 5
    bad = tmp_path / name
    bad.write_text(json.dumps(doc))
    assert cfn_lint(bad).returncode != 0


def _live_rules(elb, listener: str) -> list[SimRule]:
    names = {tg["TargetGroupArn"]: tg["TargetGroupName"]
             for tg in elb.describe_target_groups()["TargetGroups"]}
    out = []
    for r in elb.describe_rules(ListenerArn=listener)["Rules"]:
        if r["IsDefault"]:
            continue
        patterns = tuple(v for c in r["Conditions"] for v in c["PathPatternConfig"]["Values"])
        out.append(SimRule(int(r["Priority"]), patterns, names[r["Actions"][0]["TargetGroupArn"]]))
    return out


def _deploy(cfn, stack: str, template: str, params: dict[str, str], update: bool) -> str:
    call = cfn.update_stack if update else cfn.create_stack
    call(StackName=stack, TemplateBody=template,
         Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()])
    return cfn.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]


def test_template_deploys_and_updates_on_moto(fake_aws: FakeAws):
    """create_stack routes every instance; update_stack adds i4 and drops i2 from the stack.

    moto does not delete listener rules or target groups a stack update
    removes (it has no delete handler for them), so i2's removal is checked
    on the stack's resource list, where CloudFormation itself decides it.
    """
    vpc, listener = fake_aws.new_listener("cfn-rules")
    cfn, elb = fake_aws.client("cloudformation"), fake_aws.client("elbv2")
    params = {"VpcId": vpc, "ListenerArn": listener}

    (text,) = render_cloudformation(build(registry([1, 2, 3]), name_prefix="cfn")).values()
    assert _deploy(cfn, "roomshard-rules", text, params, update=False) == "CREATE_COMPLETE"
    sim = _live_rules(elb, listener)
    assert sorted((r.priority, r.patterns) for r in sim) == [
        (1001, ("/i1/room/*",)), (1002, ("/i2/room/*",)), (1003, ("/i3/room/*",))]
    assert [route(sim, f"/i{n}/room/lobby") for n in (1, 2, 3, 4)] == ["cfn-i1", "cfn-i2", "cfn-i3", DEFAULT_404]

    (text,) = render_cloudformation(build(registry([1, 3, 4]), name_prefix="cfn")).values()
    assert _deploy(cfn, "roomshard-rules", text, params, update=True) == "UPDATE_COMPLETE"
    sim = _live_rules(elb, listener)
    assert [route(sim, f"/i{n}/room/lobby") for n in (1, 3, 4)] == ["cfn-i1", "cfn-i3", "cfn-i4"]
    assert len({r.priority for r in sim}) == len(sim)
    in_stack = {r["LogicalResourceId"]
                for r in cfn.describe_stack_resources(StackName="roomshard-rules")["StackResources"]}
    assert in_stack == {"TargetGroupI1", "RuleI1", "TargetGroupI3", "RuleI3", "TargetGroupI4", "RuleI4"}
