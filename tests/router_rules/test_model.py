"""The pure model: names, priorities, ALB groups and AWS limits."""

import random

import pytest

from router_rules import model
from router_rules.model import ModelError, build
from tests.router_rules.albsim import TG_NAME_RE
from tests.router_rules.conftest import registry


def test_one_target_group_and_rule_per_instance_with_fixed_priority():
    """iN gets target group <prefix>-iN and a /iN/room/* rule at priority 1000 + N."""
    rules = build(registry([1, 2, 10, 9999]), name_prefix="rs-prod")
    (group,) = rules.groups
    assert [tg.name for tg in group.target_groups] == ["rs-prod-i1", "rs-prod-i2", "rs-prod-i10",
                                                      "rs-prod-i9999"]
    assert [(r.priority, r.path_pattern) for r in group.rules] == [
        (1001, "/i1/room/*"), (1002, "/i2/room/*"), (1010, "/i10/room/*"), (10999, "/i9999/room/*")]
    tg = group.target_groups[0]
    assert (tg.health_check.path, tg.health_check.protocol) == ("/healthz", "HTTP")
    assert tg.stickiness is False and tg.deregistration_delay_s <= 30


def test_priority_does_not_depend_on_the_other_instances():
    """Removing or adding instances never renumbers the rules of the others."""
    full = {r.key: r.priority for r in build(registry(list(range(1, 40)))).groups[0].rules}
    part = {r.key: r.priority for r in build(registry(list(range(1, 40, 3)))).groups[0].rules}
    assert all(full[k] == v for k, v in part.items())


@pytest.mark.parametrize("prefix", ["rs", "a", "roomshard-prod-eu-west-1", "A1-b2", "x" * 26])
def test_valid_prefixes_give_valid_names_up_to_i9999(prefix):
    """Every accepted prefix yields names AWS accepts, even for i9999."""
    name = model.target_group_name(model.validate_prefix(prefix), 9999)
    assert len(name) <= 32 and TG_NAME_RE.fullmatch(name)


@pytest.mark.parametrize("prefix", ["", "-rs", "rs-", "r_s", "rs.prod", "x" * 27, "internal-rs",
                                    "has space"])
def test_invalid_prefixes_are_refused(prefix):
    """A prefix that could produce an invalid target group name is refused up front."""
    with pytest.raises(ModelError, match="name prefix"):
        build(registry([1]), name_prefix=prefix)


def test_names_are_unique_over_every_instance_number():
    """All 9999 possible names are distinct and valid with the longest prefix."""
    prefix = "p" * 26
    names = {model.target_group_name(prefix, n) for n in range(1, 10000)}
    assert len(names) == 9999
    assert all(len(n) <= 32 and TG_NAME_RE.fullmatch(n) for n in names)


def test_250_instances_split_into_3_groups_by_public_base():
    """250 instances on three public hosts -> 3 ALB groups of <= 100 target groups each."""
    hosts = {n: "wss://chat-a.example.com" if n <= 100 else
             "wss://chat-b.example.com" if n <= 200 else "wss://chat-c.example.com"
             for n in range(1, 251)}
    numbers = list(range(1, 251))
    random.Random(7).shuffle(numbers)
    rules = build(registry(numbers, hosts))
    assert len(rules.groups) == 3
    for group in rules.groups:
        assert len(group.target_groups) <= model.MAX_TARGET_GROUPS_PER_ALB
        assert {i.public_base for i in group.instances} == {group.public_base}
    assert [len(g.instances) for g in rules.groups] == [100, 100, 50]
    assert rules.group_of("i150").public_base == "wss://chat-b.example.com"
    assert sorted(i.id for i in rules.instances) == sorted(f"i{n}" for n in range(1, 251))


def test_instances_without_public_base_form_the_default_group_first():
    """No public_base -> the default group (listed first); others sort by host."""
    rules = build(registry([1, 2, 3, 4], {2: "wss://b.example.com", 3: "wss://a.example.com"}))
    assert [(g.ident, [i.id for i in g.instances]) for g in rules.groups] == [
        ("default", ["i1", "i4"]), ("a_example_com", ["i3"]), ("b_example_com", ["i2"])]


def test_default_group_keeps_room_for_the_directory():
    """The default ALB also holds the directory's target group and 2 rules: 98 shards fit, 99 do not."""
    assert len(build(registry(list(range(1, 99)))).groups[0].target_groups) == 98
    with pytest.raises(ModelError, match="default host"):
        build(registry(list(range(1, 100))))
    assert len(build(registry(list(range(1, 100))), reserved_rules=0).groups[0].rules) == 99
    with pytest.raises(ModelError, match="at most 99"):
        build(registry(list(range(1, 101))), reserved_rules=0, rules_quota=200)
    assert len(build(registry(list(range(1, 101))), reserved_target_groups=0,
                     reserved_rules=0).groups[0].rules) == 100


def test_public_host_groups_hold_100_but_not_more_even_with_a_raised_rules_quota():
    """Target groups per ALB are a hard 100: a raised rules quota does not lift it."""
    hosts = {n: "wss://b.example.com" for n in range(1, 102)}
    assert len(build(registry(list(range(1, 101)), hosts)).groups[0].rules) == 100
    with pytest.raises(ModelError, match="at most 100"):
        build(registry(list(range(1, 102)), hosts), rules_quota=1000)


def test_one_public_base_over_100_is_a_clear_error():
    """101 instances sharing one public_base cannot be split: the error names the host."""
    hosts = {n: "wss://big.example.com" for n in range(1, 102)}
    with pytest.raises(ModelError) as err:
        build(registry(list(range(1, 102)), hosts))
    assert "big.example.com" in str(err.value) and "100" in str(err.value)


def test_group_identifiers_that_collide_are_refused():
    """Two hosts that map to one identifier are an error, not a silent merge."""
    with pytest.raises(ModelError, match="same group name"):
        build(registry([1, 2], {1: "wss://a-b.example.com", 2: "wss://a.b.example.com"}))


def test_idle_timeout_covers_several_pings():
    """Proxy idle timeouts are >= 2 ping intervals and never below a minute."""
    assert model.idle_timeout_for(20) == 60
    assert model.idle_timeout_for(45) == 135
    assert all(model.idle_timeout_for(p) >= 2 * p for p in (0.5, 1, 20, 30, 100, 1000))
