"""``internal_url`` and ``public_base`` are clean URLs or a 400, on the admin PUT and on a shard's heartbeat.

They end up in generated nginx/Terraform/CloudFormation files: the nginx
directive injection of the issue must not even reach the registry.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.directory.conftest import ADMIN, Harness
from tests.directory.test_bad_input import assert_error

NGINX_INJECTION = ("http://127.0.0.1;}server{listen 8443;location ~ .{return 200 pwned;}}"
                   "upstream y{server 127.0.0.1")
BAD_INTERNAL = [
    NGINX_INJECTION,
    "http://127.0.0.1:9001;",
    'http://127.0.0.1:9001"',
    "http://127.0.0.1:9001'",
    "http://h$host:1",
    "http://h:1/$uri",
    "http://h:1/a b",
    "http://h:1/a%20b",
    "http://h:1\n",
    "http://h:1\r\nX: y",
    "http://h:1\t",
    " http://h:1",
    "http://user:pw@h:1",
    "http://h:1?x=1",
    "http://h:1#f",
    "http://h:1/a\\b",
    "http://h:0",
    "http://h:65536",
    "http://h:80:80",
    "http://[::1",
    "http://[zz::1]:80",
    "http://-h:1",
    "http://h..x:1",
    "http://h{1}:1",
    "ftp://h:1",
    "HTTP://h:1",
    "ws://h:1",
    "h:1",
    "http://",
    "http://" + "a" * 300,
    "http://h:1/${file(\"x\")}",
]
BAD_PUBLIC = [
    'wss://x${file("secret.txt")}',
    "wss://x%{if true}y%{endif}",
    "wss://chat.example.com/chat",
    "wss://chat.example.com;",
    "wss://chat.example.com?x",
    "wss://u@chat.example.com",
    "wss://chat example.com",
    "ftp://chat.example.com",
    NGINX_INJECTION,
]
GOOD_INTERNAL = ["http://127.0.0.1:9001", "https://shard-1.internal:8443/", "http://[::1]:9001",
                 "http://shard_1:9001", "http://127.0.0.1:9/i1", "http://10.0.0.5"]
GOOD_PUBLIC = ["wss://chat.example.com", "wss://chat-b.example.com:8443/", "ws://127.0.0.1:8080",
               "https://chat.example.com", "wss://[2001:db8::1]:443"]


@pytest.mark.parametrize("url", BAD_INTERNAL)
async def test_admin_put_refuses_an_unclean_internal_url(h: Harness, url: str) -> None:
    r = await h.client.put("/v1/admin/instances/i1", json={"internal_url": url}, headers=ADMIN)
    assert_error(r, 400, "invalid_internal_url")
    assert (await h.client.get("/v1/admin/instances/i1", headers=ADMIN)).status_code == 404


@pytest.mark.parametrize("url", BAD_PUBLIC)
async def test_admin_put_refuses_an_unclean_public_base(h: Harness, url: str) -> None:
    await h.put_instance("i1", "http://127.0.0.1:9001")
    r = await h.client.put("/v1/admin/instances/i1", json={"public_base": url}, headers=ADMIN)
    assert_error(r, 400, "invalid_public_base")
    got = (await h.client.get("/v1/admin/instances/i1", headers=ADMIN)).json()
    assert got["public_base"] is None


@pytest.mark.parametrize(("field", "url", "code"),
                         [("internal_url", u, "invalid_internal_url") for u in BAD_INTERNAL[:8]]
                         + [("public_base", u, "invalid_public_base") for u in BAD_PUBLIC])
async def test_heartbeat_refuses_unclean_urls(h: Harness, field: str, url: str, code: str) -> None:
    extra: dict[str, Any] = {field: url}
    if field == "internal_url":
        r = await h.heartbeat("i1", url=url)
    else:
        r = await h.heartbeat("i1", url="http://127.0.0.1:9001", **extra)
    assert_error(r, 400, code)
    assert (await h.client.get("/v1/admin/instances/i1", headers=ADMIN)).status_code == 404


@pytest.mark.parametrize(("internal", "public"), list(zip(GOOD_INTERNAL, GOOD_PUBLIC + [None])))
async def test_clean_urls_are_accepted_without_a_trailing_slash(h: Harness, internal: str,
                                                                public: str | None) -> None:
    got = await h.put_instance("i1", internal, public_base=public)
    assert got["internal_url"] == internal.rstrip("/")
    assert got["public_base"] == (public.rstrip("/") if public else None)
    r = await h.heartbeat("i2", url=internal, public_base=public)
    assert r.status_code == 200, r.text
