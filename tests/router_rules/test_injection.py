"""Registry values that would inject into generated files are refused or escaped, in every renderer.

The first line of defence is the directory (``tests/directory/test_registered_urls.py``);
these tests are the second: a saved or hand-edited registry (``--from-file``),
a directory of an older version, or an ``Instance`` built by hand.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router_rules.cloudformation import render_cloudformation
from router_rules.model import build
from router_rules.nginx import render_nginx
from router_rules.registry import Instance, RegistryError, parse_instances
from router_rules.terraform import literal, render_document, render_terraform
from tests.router_rules.nginx_proc import Nginx
from tests.router_rules.test_cli import assert_one_line_error, rules

NGINX_INJECTION = ("http://127.0.0.1;}server{listen 8443;location ~ .{return 200 pwned;}}"
                   "upstream y{server 127.0.0.1")
BAD_INTERNAL = [NGINX_INJECTION, 'http://127.0.0.1:9001"', "http://h$host:1", "http://a b:1",
                "http://h:1;", "http://u@h:1", "http://h:1?q", "http://h:1\n"]
BAD_PUBLIC = ['wss://x${file("secret.txt")}', "wss://x%{if true}y%{endif}", "wss://x;}",
              "wss://x'", "wss://x y", "wss://x#f"]


def _doc(internal: str = "http://127.0.0.1:9001", public: str | None = None) -> dict[str, Any]:
    return {"instances": [{"id": "i1", "state": "active", "internal_url": "http://10.0.0.1:8081"},
                          {"id": "i2", "state": "active", "internal_url": internal,
                           "public_base": public}]}


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.nginx
def test_the_nginx_injection_passes_nginx_t_when_interpolated_but_is_refused(
        nginx: Nginx, tmp_path: Path) -> None:
    """The issue's URL is a real attack (nginx -t accepts it spliced in), and the renderer refuses it."""
    clean = render_nginx(parse_instances(_doc("http://127.0.0.1:9001")))
    naive = clean.replace("server 127.0.0.1:9001;", "server " + NGINX_INJECTION[7:] + ":9001;")
    include = tmp_path / "naive.conf"
    include.write_text(naive)
    check = nginx.check(include)
    assert check.returncode == 0 and "pwned" in naive, check.stderr  # what used to be generated
    with pytest.raises(RegistryError) as err:
        render_nginx(_doc(NGINX_INJECTION)["instances"])
    assert "internal_url" in str(err.value) and "\n" not in str(err.value)
    ok = tmp_path / "ok.conf"
    ok.write_text(clean)
    assert nginx.check(ok).returncode == 0


@pytest.mark.parametrize("internal", BAD_INTERNAL)
def test_every_renderer_refuses_an_unclean_internal_url(internal: str) -> None:
    with pytest.raises(RegistryError) as err:
        parse_instances(_doc(internal))
    assert "\n" not in str(err.value)
    with pytest.raises(RegistryError):
        render_nginx(_doc(internal)["instances"])


@pytest.mark.parametrize("public", BAD_PUBLIC)
def test_an_unclean_public_base_is_refused(public: str) -> None:
    with pytest.raises(RegistryError) as err:
        parse_instances(_doc(public=public))
    assert "public_base" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", [("host", "127.0.0.1;}server{"), ("host", "h$x"),
                                          ("host", "a b"), ("public_base", 'wss://x${file("s")}'),
                                          ("scheme", "http;"), ("port", 0)])
def test_an_instance_built_by_hand_is_checked_too(field: str, value: Any) -> None:
    good = parse_instances(_doc())[1]
    with pytest.raises(RegistryError):
        dataclasses.replace(good, **{field: value})
    assert isinstance(dataclasses.replace(good), Instance)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


# The interpolations the generator writes on purpose.
OURS = ("${var.", "${aws_lb_target_group.", "${lookup(var.targets, ", "${contains(")


def test_terraform_escapes_every_registry_string_in_the_whole_document() -> None:
    """A group whose public_base carries ${...} and %{...} (bypassing validation): nothing evaluates."""
    rules_ = build(parse_instances(_doc(public="wss://chat.example.com")))
    evil = 'wss://x${file("secret.txt")}%{if true}y%{endif}'
    groups = tuple(dataclasses.replace(g, public_base=evil) if g.public_base else g
                   for g in rules_.groups)
    doc = render_document(dataclasses.replace(rules_, groups=groups))
    seen_evil = 0
    for s in _strings(doc):
        unescaped = s.replace("$${", "").replace("%%{", "")
        rest = unescaped
        for ours in OURS:
            rest = rest.replace(ours, "")
        assert "${" not in rest and "%{" not in rest, s
        if "file(" in s:
            seen_evil += 1
            assert "$${file(" in s and "%%{if true}" in s
    assert seen_evil >= 2  # a variable description and the output value
    assert json.loads(render_terraform(dataclasses.replace(rules_, groups=groups)))


def test_literal_escapes_both_template_sequences() -> None:
    assert literal('${a}%{b}$x%y') == '$${a}%%{b}$x%y'
    assert literal("plain") == "plain"


def test_cloudformation_and_terraform_render_clean_values_unchanged() -> None:
    rules_ = build(parse_instances(_doc(public="wss://chat.example.com:8443/")))
    text = render_terraform(rules_)
    assert "wss://chat.example.com:8443" in text and "$${" not in text
    assert any("wss://chat.example.com:8443" in t for t in render_cloudformation(rules_).values())


@pytest.mark.parametrize("args", [["--format", "nginx"], ["--format", "terraform"],
                                  ["--format", "cloudformation"],
                                  ["plan", "--listener-arn", "arn:aws:x"],
                                  ["apply", "--dry-run", "--listener-arn", "arn:aws:x"]])
@pytest.mark.parametrize("doc", [_doc(NGINX_INJECTION), _doc(public='wss://x${file("s")}')],
                         ids=["internal_url", "public_base"])
def test_rules_cli_refuses_an_unclean_registry_with_one_line_and_exit_2(
        tmp_path: Path, args: list[str], doc: dict[str, Any]) -> None:
    saved = tmp_path / "instances.json"
    saved.write_text(json.dumps(doc))
    res = rules(*args, "--from-file", str(saved), env={"AWS_DEFAULT_REGION": "us-east-1"})
    assert_one_line_error(res, "instance i2")
    assert res.stdout == ""


@pytest.mark.parametrize("kwargs, needle", [
    ({"server_name": "a#b"}, "--server-name"), ({"server_name": "a$host"}, "--server-name"),
    ({"server_name": "a\nb"}, "--server-name"),
    ({"ssl_certificate": "/c#.pem", "ssl_certificate_key": "/k"}, "--ssl-certificate"),
    ({"ssl_certificate": "/c.pem", "ssl_certificate_key": "/k$x"}, "--ssl-certificate-key"),
    ({"ssl_certificate": "/c\\;.pem", "ssl_certificate_key": "/k"}, "--ssl-certificate"),
    ({"directory_url": NGINX_INJECTION}, "directory URL"),
    ({"directory_url": "http://d:1/$x"}, "directory URL"),
])
def test_nginx_options_cannot_inject_either(kwargs: dict[str, str], needle: str) -> None:
    with pytest.raises(RegistryError) as err:
        render_nginx(parse_instances(_doc()), **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
