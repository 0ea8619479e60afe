"""Terraform JSON, CloudFormation and nginx output: golden files, routing, stability."""

from __future__ import annotations

import difflib
import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_rules.cloudformation import render_cloudformation
from router_rules.model import build
from router_rules.nginx import render_nginx
from router_rules.registry import parse_instances
from router_rules.terraform import render_terraform
from tests.router_rules.albsim import (
    DEFAULT_404,
    check_terraform_json,
    cloudformation_rules,
    route,
    terraform_listeners,
)
from tests.router_rules.conftest import registry

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
REGEN = os.environ.get("ROOMSHARD_REGEN_GOLDEN") == "1"


def _fixture(name: str):
    return parse_instances(json.loads((HERE / "fixtures" / name).read_text()))


def _outputs(fixture: str) -> dict[str, str]:
    insts = _fixture(fixture)
    rules = build(insts, name_prefix="rs-test")
    stem = fixture.removesuffix(".json")
    out = {f"{stem}.tf.json": render_terraform(rules),
           f"{stem}.nginx.conf": render_nginx(insts, listen="127.0.0.1:8000")}
    for name, text in render_cloudformation(rules).items():
        out[f"{stem}.{name}"] = text
    return out


@pytest.mark.parametrize("fixture", ["instances.json", "multi.json"])
def test_golden_files(fixture):
    """Output equals the reviewed golden files (ROOMSHARD_REGEN_GOLDEN=1 rewrites them)."""
    for name, text in _outputs(fixture).items():
        path = GOLDEN / name
        if REGEN:
            path.write_text(text)
        assert path.exists(), f"missing golden file {name}: run with ROOMSHARD_REGEN_GOLDEN=1"
        assert text == path.read_text(), f"{name} differs from its golden file"


def test_same_input_gives_identical_bytes_whatever_the_order():
    """The output is a pure function of the registry: same bytes twice and after shuffling."""
    doc = json.loads((HERE / "fixtures" / "multi.json").read_text())
    first = _outputs("multi.json")
    for seed in range(5):
        shuffled = dict(doc, instances=random.Random(seed).sample(doc["instances"], len(doc["instances"])))
        insts = parse_instances(shuffled)
        rules = build(insts, name_prefix="rs-test")
        assert render_terraform(rules) == first["multi.tf.json"]
        assert render_nginx(insts, listen="127.0.0.1:8000") == first["multi.nginx.conf"]
        for name, text in render_cloudformation(rules).items():
            assert text == first[f"multi.{name}"]
    assert _outputs("multi.json") == first


def test_generated_terraform_is_structurally_valid():
    """Every variable and resource referenced is declared; names and priorities are legal."""
    for fixture in ("instances.json", "multi.json"):
        check_terraform_json(json.loads(_outputs(fixture)[fixture.removesuffix(".json") + ".tf.json"]))


def test_host_named_targets_need_an_input_and_ip_targets_do_not():
    """An internal_url with a host name becomes a required input; IPs are used as is."""
    rules = build(_fixture("instances.json"))
    tf = json.loads(render_terraform(rules))
    att = tf["resource"]["aws_lb_target_group_attachment"]
    assert att["i1"]["target_id"] == '${lookup(var.targets, "i1", "10.0.1.1")}'
    assert att["i2"]["target_id"] == '${var.targets["i2"]}'
    (cfn,) = [json.loads(t) for t in render_cloudformation(rules).values()]
    assert "TargetI2" in cfn["Parameters"] and "TargetI1" not in cfn["Parameters"]
    assert cfn["Resources"]["TargetGroupI10"]["Properties"]["Protocol"] == "HTTPS"


def _flat_tf(doc: dict) -> dict:
    flat = {("variable", k): v for k, v in doc["variable"].items()}
    flat.update({("output", k): v for k, v in doc["output"].items()})
    for kind, items in doc.get("resource", {}).items():
        flat.update({(kind, k): v for k, v in items.items()})
    return flat


def _flat_cfn(doc: dict) -> dict:
    flat = {(section, k): v for section in ("Parameters", "Resources", "Outputs")
            for k, v in doc[section].items()}
    flat[("Description", "")] = doc["Description"]
    return flat


@settings(max_examples=40, deadline=None)
@given(numbers=st.sets(st.integers(1, 300), min_size=1, max_size=60), new=st.integers(1, 300))
def test_adding_one_instance_adds_exactly_one_tg_rule_and_attachment(numbers, new):
    """K -> K+1 instances adds one target group, one rule, one attachment; nothing else changes."""
    if new in numbers:
        numbers = numbers - {new}
        if not numbers:
            return
    before_i, after_i = registry(sorted(numbers)), registry(sorted(numbers | {new}))
    before = _flat_tf(json.loads(render_terraform(build(before_i))))
    after = _flat_tf(json.loads(render_terraform(build(after_i))))
    assert set(after) - set(before) == {("aws_lb_target_group", f"i{new}"),
                                        ("aws_lb_listener_rule", f"i{new}"),
                                        ("aws_lb_target_group_attachment", f"i{new}")}
    assert all(after[k] == v for k, v in before.items())

    (cfn_before,) = [_flat_cfn(json.loads(t)) for t in render_cloudformation(build(before_i)).values()]
    (cfn_after,) = [_flat_cfn(json.loads(t)) for t in render_cloudformation(build(after_i)).values()]
    assert set(cfn_after) - set(cfn_before) == {("Resources", f"TargetGroupI{new}"),
                                                ("Resources", f"RuleI{new}")}
    assert len(cfn_after[("Resources", f"TargetGroupI{new}")]["Properties"]["Targets"]) == 1
    assert all(cfn_after[k] == v for k, v in cfn_before.items())

    # nginx: the new file is the old one with lines inserted, none removed or changed.
    diff = list(difflib.ndiff(render_nginx(before_i).splitlines(), render_nginx(after_i).splitlines()))
    assert not [line for line in diff if line.startswith("- ")]
    added = [line[2:].strip() for line in diff if line.startswith("+ ")]
    assert f"upstream roomshard_i{new} {{" in added and f"location /i{new}/room/ {{" in added


ROOM = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
# Small numbers are over-represented so i1/i10/i100/i11 prefix pairs come up often.
NUMBER = st.one_of(st.integers(1, 120), st.integers(1, 9999))


@settings(max_examples=60, deadline=None)
@given(numbers=st.sets(NUMBER, min_size=1, max_size=40), rooms=st.lists(ROOM, min_size=1, max_size=5),
       probe=NUMBER)
def test_every_room_path_reaches_its_instance_and_nothing_else(numbers, rooms, probe):
    """Under AWS path-pattern semantics /iN/room/ID reaches N only; other paths hit the 404."""
    rules = build(registry(sorted(numbers)), name_prefix="rs")
    listeners = terraform_listeners(json.loads(render_terraform(rules)))
    (cfn,) = [json.loads(t) for t in render_cloudformation(rules).values()]
    for sim in (listeners["listener_arn"], cloudformation_rules(cfn)):
        for n in numbers:
            for room in rooms:
                assert route(sim, f"/i{n}/room/{room}?ticket=abc") == f"rs-i{n}"
                assert route(sim, f"/i{n}/room/{room}/extra") == f"rs-i{n}"
            assert route(sim, f"/i{n}/room") == DEFAULT_404
            assert route(sim, f"/I{n}/room/{rooms[0]}") == DEFAULT_404
            assert route(sim, f"/i{n}/Room/{rooms[0]}") == DEFAULT_404
        expected = f"rs-i{probe}" if probe in numbers else DEFAULT_404
        assert route(sim, f"/i{probe}/room/{rooms[0]}") == expected
        assert route(sim, "/v1/rooms/x/connect") == DEFAULT_404


def test_each_public_host_listener_routes_only_its_instances():
    """With several ALB groups each listener routes its own instances and 404s the others."""
    hosts = {n: f"wss://chat-{'abc'[(n - 1) // 100]}.example.com" for n in range(1, 251)}
    rules = build(registry(list(range(1, 251)), hosts))
    listeners = terraform_listeners(json.loads(render_terraform(rules)))
    assert set(listeners) == {"listener_arn_chat_a_example_com", "listener_arn_chat_b_example_com",
                              "listener_arn_chat_c_example_com"}
    for n in range(1, 251):
        own = f"listener_arn_chat_{'abc'[(n - 1) // 100]}_example_com"
        for var, sim in listeners.items():
            expected = f"rs-i{n}" if var == own else DEFAULT_404
            assert route(sim, f"/i{n}/room/r1") == expected
    templates = render_cloudformation(rules)
    assert len(templates) == 3
    for text in templates.values():
        doc = json.loads(text)
        assert len(doc["Resources"]) <= 200 and len(doc["Parameters"]) <= 200  # stack limits


def test_every_state_keeps_its_rule():
    """Draining, down and disabled instances keep their routes until removed from the registry."""
    insts = _fixture("instances.json")
    assert {i.state for i in insts} >= {"active", "draining", "down"}
    sim = terraform_listeners(json.loads(render_terraform(build(insts))))["listener_arn"]
    assert sorted(r.target for r in sim) == ["rs-i1", "rs-i10", "rs-i2", "rs-i3"]
