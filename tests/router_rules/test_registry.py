"""Parsing the directory's instances document."""

import json
from pathlib import Path

import pytest

from router_rules.registry import RegistryError, parse_instances

FIXTURES = Path(__file__).parent / "fixtures"


def test_fixture_parses_sorted_by_number():
    """Instances come out sorted by number (i2 before i10), unknown fields ignored."""
    insts = parse_instances(json.loads((FIXTURES / "instances.json").read_text()))
    assert [i.id for i in insts] == ["i1", "i2", "i3", "i10"]
    assert insts[3].scheme == "https" and insts[3].port == 8443 and insts[3].host_is_ip
    assert not insts[1].host_is_ip and insts[1].host == "shard-2.internal"


def test_public_base_normalised_to_scheme_and_host():
    """Trailing slashes and host case do not split one public host into two groups."""
    insts = parse_instances(json.loads((FIXTURES / "multi.json").read_text()))
    by_id = {i.id: i for i in insts}
    assert by_id["i101"].public_host == by_id["i102"].public_host == "chat-b.example.com"
    assert by_id["i201"].public_base == "wss://chat-c.example.com:8443"
    assert by_id["i1"].public_base is None


@pytest.mark.parametrize("doc, needle", [
    ([], "expected a JSON object"),
    ({"instances": {}}, "expected a JSON object"),
    ({"instances": ["i1"]}, "must be a JSON object"),
    ({"instances": [{"id": "x1", "internal_url": "http://a:1"}]}, "'x1' is not i1..i9999"),
    ({"instances": [{"id": "i0", "internal_url": "http://a:1"}]}, "'i0' is not i1..i9999"),
    ({"instances": [{"id": "i10000", "internal_url": "http://a:1"}]}, "not i1..i9999"),
    ({"instances": [{"id": "i1"}]}, "internal_url must be a non-empty string"),
    ({"instances": [{"id": "i1", "internal_url": "ftp://a:1"}]}, "is not an http(s)://host:port URL"),
    ({"instances": [{"id": "i1", "internal_url": "http://a:1/x"}]}, "must not have a path"),
    ({"instances": [{"id": "i1", "internal_url": "http://a:99999"}]}, "invalid port"),
    ({"instances": [{"id": "i1", "internal_url": "http://a:1", "public_base": 3}]}, "string or null"),
    ({"instances": [{"id": "i1", "internal_url": "http://a:1", "public_base": "wss://h/chat"}]},
     "must not have a path"),
    ({"instances": [{"id": "i1", "internal_url": "http://a:1", "state": ""}]}, "state"),
    ({"instances": [{"id": "i1", "internal_url": "http://a:1"},
                    {"id": "i1", "internal_url": "http://b:1"}]}, "listed twice"),
])
def test_invalid_documents_are_one_clear_error(doc, needle):
    """Each malformed document raises RegistryError naming the problem."""
    with pytest.raises(RegistryError) as err:
        parse_instances(doc)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
