"""The tests' own ALB path-pattern matcher follows the AWS rules."""

import pytest

from tests.router_rules.albsim import DEFAULT_404, SimRule, path_pattern_matches, route


@pytest.mark.parametrize("pattern, path, expected", [
    ("/i1/room/*", "/i1/room/42", True),
    ("/i1/room/*", "/i1/room/", True),
    ("/i1/room/*", "/i1/room/a/b/c", True),  # * crosses /
    ("/i1/room/*", "/i1/room", False),
    ("/i1/room/*", "/i10/room/x", False),
    ("/i1/room/*", "/I1/room/x", False),  # case-sensitive
    ("/i1/room/*", "/i1/Room/x", False),
    ("/i1/room/*", "/x/i1/room/x", False),  # whole path
    ("/i?/room/*", "/i7/room/x", True),
    ("/i?/room/*", "/i77/room/x", False),  # ? is exactly one character
    ("/a.b", "/aXb", False),  # . is literal
    ("/v1/*", "/v1/rooms/x/connect", True),
])
def test_path_pattern_semantics(pattern, path, expected):
    """`*` is any run of characters including `/`, `?` one character, case matters."""
    assert path_pattern_matches(pattern, path) is expected


def test_lowest_priority_number_wins_and_default_is_404():
    """Rules are evaluated by priority; no match falls to the default 404."""
    rules = [SimRule(20, ("/a/*",), "late"), SimRule(10, ("/a/b*",), "early")]
    assert route(rules, "/a/bc?x=1") == "early"
    assert route(rules, "/a/x") == "late"
    assert route(rules, "/b") == DEFAULT_404


def test_duplicate_priorities_are_rejected():
    """A listener cannot hold two rules at one priority; the simulator refuses them."""
    with pytest.raises(AssertionError, match="duplicate priority"):
        route([SimRule(1, ("/a",), "x"), SimRule(1, ("/b",), "y")], "/a")
