"""Health, readiness, metrics, the OpenAPI document and the chat page."""

from __future__ import annotations

from typing import Any

import pytest

from directory.app import all_routes
from directory.http import meta
from tests.directory.conftest import Harness


async def test_health_and_ready(h: Harness) -> None:
    """/healthz and /readyz answer 200 JSON while the database is reachable."""
    assert (await h.client.get("/healthz")).json() == {"status": "ok"}
    assert (await h.client.get("/readyz")).json() == {"status": "ready"}


async def test_metrics_count_requests_connects_and_placements(h: Harness) -> None:
    """/metrics is Prometheus text with requests by route/status, connects, placements, latency."""
    await h.heartbeat("i1")
    await h.connect("m")
    await h.connect("m")
    await h.connect("bad room")
    text = (await h.client.get("/metrics")).text
    assert 'roomshard_directory_requests_total{route="connect",status="200"} 2.0' in text
    assert 'roomshard_directory_connects_total{result="invalid_room"} 1.0' in text
    assert 'roomshard_directory_placements_total{kind="new"} 1.0' in text
    assert 'roomshard_directory_request_seconds_bucket{le="0.02",route="connect"}' in text


async def test_openapi_describes_every_route_with_schemas(h: Harness) -> None:
    """/openapi.json is OpenAPI 3 with every route, its request schema and its error schema."""
    doc = (await h.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    for route in all_routes():
        path = route.path.replace(":path}", "}")
        op = doc["paths"][path][route.method.lower()]
        if route.body is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
        for status in route.errors:
            assert op["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorBody")
    connect = doc["components"]["schemas"]["ConnectBody"]
    assert connect["additionalProperties"] is False
    assert set(doc["components"]["schemas"]["ConnectResponse"]["required"]) == {
        "room", "instance", "epoch", "url", "expires_in"}


async def test_index_page_or_not_installed_notice(h: Harness, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Any) -> None:
    """GET / serves directory/static/index.html, or a small page saying the chat page is not installed."""
    monkeypatch.setattr(meta, "STATIC_DIR", tmp_path)
    r = await h.client.get("/")
    assert r.status_code == 200 and "not installed" in r.text
    (tmp_path / "index.html").write_text("<title>chat</title>")
    assert (await h.client.get("/")).text == "<title>chat</title>"


async def test_openapi_id_parameters_carry_their_patterns(h: Harness) -> None:
    """Every room/instance/user path or query parameter has the pattern and lengths the handlers enforce."""
    import re

    doc = (await h.client.get("/openapi.json")).json()
    examples = {"room": ("lobby", "a\nb"), "instance": ("i9999", "i1\n"), "user": ("a.b@c", "a b")}
    seen = set()
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for p in op.get("parameters", []):
                if p["name"] not in examples:
                    continue
                seen.add((p["in"], p["name"]))
                schema = p["schema"]
                assert schema["type"] == "string" and schema["minLength"] >= 1, (path, p)
                good, bad = examples[p["name"]]
                assert re.fullmatch(schema["pattern"].strip("^$"), good)
                assert not re.search(schema["pattern"].replace("$", r"\Z"), bad), (path, p)
                assert schema["maxLength"] == (5 if p["name"] == "instance" else 64)
    assert {("path", "room"), ("path", "instance"), ("query", "instance")} <= seen
    limit = next(p for p in doc["paths"]["/v1/admin/rooms"]["get"]["parameters"]
                 if p["name"] == "limit")
    assert limit["schema"]["minimum"] == 1 and limit["schema"]["maximum"] >= 1000


async def test_chat_page_has_a_csp_that_allows_only_its_own_inline_code(h: Harness) -> None:
    import base64
    import hashlib
    import re

    r = await h.client.get("/")
    csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert r.headers["x-frame-options"] == "DENY"
    assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'none'"
    assert csp["connect-src"].split() == ["'self'", "ws:", "wss:"]
    assert "unsafe-inline" not in r.headers["content-security-policy"]
    for kind in ("script", "style"):
        blocks = re.findall(rf"<{kind}(?: type=\"module\")?>(.*?)</{kind}>", r.text, re.DOTALL)
        assert blocks
        for block in blocks:
            digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in csp[f"{kind}-src"].split()
    # Scripts: that one inline module, and the client's modules the directory serves.
    assert csp["script-src"].split()[0] == "'self'" and len(csp["script-src"].split()) == 2
    assert 'from "/static/roomshard/index.js"' in r.text


async def test_the_client_modules_the_page_imports_are_served(h: Harness) -> None:
    """GET /static/roomshard/index.js and every module it imports, as JavaScript (the
    /static mount); a missing one, or a path out of it, is the contract's 404 body."""
    import re

    r = await h.client.get("/static/roomshard/index.js")
    assert r.status_code == 200 and r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "export" in r.text and "connect" in r.text
    imported = set(re.findall(r"from '\./([a-z]+\.js)'", r.text))
    assert {"session.js", "reconnect.js", "errors.js"} <= imported
    for name in imported:
        m = await h.client.get(f"/static/roomshard/{name}")
        assert m.status_code == 200, name
    for bad in ("nope.js", "../../meta.py", "index.d.ts"):
        m = await h.client.get(f"/static/roomshard/{bad}")
        assert m.status_code == 404 and m.json()["error"]["code"] == "not_found", bad