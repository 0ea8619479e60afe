"""The generated nginx config, run by a real nginx in front of real WebSocket servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from roomshard.testing.timing import t
from router_rules.nginx import render_nginx
from router_rules.registry import RegistryError
from tests.router_rules.nginx_proc import Nginx, free_port

pytestmark = pytest.mark.nginx


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """A real nginx under a temp prefix, stopped at the end."""
    server = Nginx(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def _instance_server(name: str):
    """A WebSocket server that greets with its instance name and the path it was asked for."""
    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"instance": name, "path": ws.request.path}))
        async for msg in ws:
            await ws.send(f"{name}:{msg}")

    return await serve(handler, "127.0.0.1", 0)


@pytest.fixture
async def shards() -> AsyncIterator[dict[str, int]]:
    """Three WebSocket servers i1, i2, i3 on loopback: name -> port."""
    servers = {name: await _instance_server(name) for name in ("i1", "i2", "i3")}
    try:
        yield {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.close()
            await s.wait_closed()


def _registry(ports: dict[str, int]) -> list[dict]:
    return [{"id": name, "state": "active", "internal_url": f"http://127.0.0.1:{port}",
             "public_base": None} for name, port in ports.items()]


def test_generated_config_passes_nginx_t(nginx: Nginx, tmp_path: Path):
    """`nginx -t` accepts the generated file, with and without a directory upstream."""
    insts = [{"id": f"i{n}", "internal_url": f"http://127.0.0.1:{9000 + n}"} for n in (1, 2, 10, 9999)]
    for directory in (None, "http://127.0.0.1:8080"):
        include = tmp_path / "roomshard.conf"
        include.write_text(render_nginx(insts, listen="127.0.0.1:18080", directory_url=directory))
        res = nginx.check(include)
        assert res.returncode == 0, res.stderr


def test_nginx_t_catches_a_broken_file(nginx: Nginx, tmp_path: Path):
    """The check can fail: a truncated file is refused (the test is not a no-op)."""
    include = tmp_path / "roomshard.conf"
    include.write_text(render_nginx([{"id": "i1", "internal_url": "http://127.0.0.1:9001"}])[:-40])
    assert nginx.check(include).returncode != 0


async def test_rooms_reach_their_instance_through_nginx(nginx: Nginx, shards: dict[str, int], tmp_path: Path):
    """/iN/room/x reaches instance N over WebSocket; /i10/room/x and /i1/room are 404s."""
    include = tmp_path / "roomshard.conf"
    port = free_port()
    include.write_text(render_nginx(_registry(shards), listen=f"127.0.0.1:{port}"))
    assert nginx.check(include).returncode == 0
    nginx.start(include, port)
    base = f"ws://127.0.0.1:{port}"
    for name in ("i1", "i2", "i3"):
        for room in ("lobby", "a-b_C9"):
            path = f"/{name}/room/{room}?ticket=t.{name}"
            async with connect(base + path, open_timeout=t(10)) as ws:
                hello = json.loads(await asyncio.wait_for(ws.recv(), t(10)))
                assert hello == {"instance": name, "path": path}
                await ws.send("ping")
                assert await asyncio.wait_for(ws.recv(), t(10)) == f"{name}:ping"

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=t(10),
                                 follow_redirects=False) as http:
        for path in ("/i10/room/x", "/i1/room", "/I1/room/x", "/i1/Room/x", "/", "/v1/rooms/x/connect"):
            resp = await http.get(path)
            assert resp.status_code == 404, path
            assert resp.json()["error"]["code"] == "not_found"
    with pytest.raises(websockets.exceptions.InvalidStatus) as err:
        async with connect(f"{base}/i10/room/x", open_timeout=t(10)):
            pass
    assert err.value.response.status_code == 404


async def test_directory_upstream_gets_everything_but_rooms(nginx: Nginx, shards: dict[str, int],
                                                            tmp_path: Path):
    """With a directory URL, non-room paths go to the directory; rooms still go to shards."""
    async def directory(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"instance": "directory", "path": ws.request.path}))

    async with serve(directory, "127.0.0.1", 0) as dir_server:
        dir_port = dir_server.sockets[0].getsockname()[1]
        include = tmp_path / "roomshard.conf"
        port = free_port()
        include.write_text(render_nginx(_registry(shards), listen=f"127.0.0.1:{port}",
                                        directory_url=f"http://127.0.0.1:{dir_port}"))
        nginx.start(include, port)
        for path, expected in (("/v1/anything", "directory"), ("/i2/room/r", "i2"), ("/i7/room/r", "directory")):
            async with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=t(10)) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), t(10)))["instance"] == expected


@pytest.mark.parametrize("listen", ["80", "127.0.0.1:8080", "[::1]:8080", "0.0.0.0:65535"])
def test_listen_forms_accepted(listen):
    """PORT, ADDR:PORT and [v6]:PORT are valid listen values."""
    assert f"listen {listen};" in render_nginx([], listen=listen)


@pytest.mark.parametrize("listen", ["", "http://x:80", "0", "70000", "a b:80", "80;evil"])
def test_bad_listen_refused(listen):
    """Anything else is refused before it reaches an nginx config."""
    with pytest.raises(RegistryError, match="--listen"):
        render_nginx([], listen=listen)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=36500))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_termination_serves_wss(nginx: Nginx, shards: dict[str, int], tmp_path: Path):
    """With a certificate the generated server speaks TLS: wss://localhost/iN/room/x reaches N."""
    import ssl

    cert, key = _self_signed(tmp_path)
    port = free_port()
    include = tmp_path / "roomshard.conf"
    include.write_text(render_nginx(_registry(shards), listen=f"127.0.0.1:{port}", server_name="localhost",
                                    ssl_certificate=str(cert), ssl_certificate_key=str(key)))
    nginx.start(include, port)
    ctx = ssl.create_default_context(cafile=str(cert))
    async with connect(f"wss://localhost:{port}/i3/room/r", ssl=ctx, open_timeout=t(10)) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), t(10)))["instance"] == "i3"


@pytest.mark.parametrize("kwargs, needle", [
    ({"server_name": "a;b"}, "--server-name"),
    ({"ssl_certificate": "/x y.pem", "ssl_certificate_key": "/k"}, "--ssl-certificate"),
    ({"ssl_certificate": "/c.pem"}, "go together"),
])
def test_unsafe_or_partial_tls_options_refused(kwargs, needle):
    """Values that could break out of a directive, or half a TLS pair, are refused."""
    with pytest.raises(RegistryError, match=needle):
        render_nginx([], **kwargs)
