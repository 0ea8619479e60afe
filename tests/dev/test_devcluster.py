"""`roomshard dev` as a user runs it: a real subprocess tree, stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from roomshard import client
from roomshard.testing.devrun import DevRun, instance_process
from roomshard.testing.timing import t, wait_until

pytestmark = pytest.mark.e2e


async def test_dev_serves_the_page_and_chat_then_stops_on_ctrl_c(tmp_path: Path, run_dev: list[DevRun]) -> None:
    """`roomshard dev --port 0` serves the chat page and rooms; SIGINT exits 0 fast, leaving no process."""
    dev = DevRun(["--port", "0", "--shards", "2", "--data-dir", str(tmp_path / "data")])
    run_dev.append(dev)
    dev.wait_up()
    page_url = dev.field("chat page")
    token = dev.field("admin token")
    assert (tmp_path / "data" / "logs" / "directory.log").exists()
    # The database holds private rooms' member lists: owner-only, like the secrets.
    for private in ("roomshard.db", "messages.db", "secrets.json"):
        assert (tmp_path / "data" / private).stat().st_mode & 0o777 == 0o600, private

    page = httpx.get(page_url, timeout=t(10))
    assert page.status_code == 200 and "roomshard" in page.text
    assert 'import { connect, ConnectRefused, newId } from "/static/roomshard/index.js"' in page.text
    module = httpx.get(dev.field("directory") + "/static/roomshard/index.js", timeout=t(10))
    assert module.status_code == 200 and "export" in module.text
    inst = httpx.get(page_url + "v1/admin/instances", headers={"Authorization": f"Bearer {token}"},
                     timeout=t(10)).json()["instances"]
    assert sorted((i["id"], i["state"]) for i in inst) == [("i1", "active"), ("i2", "active")]

    base = page_url.rstrip("/")
    async with client.connect(base, "devroom", "alice") as a, client.connect(base, "devroom", "bob") as b:
        seq = await a.send("hi from alice")
        async for m in b:
            assert isinstance(m, client.Message) and (m.seq, m.user, m.text) == (seq, "alice", "hi from alice")
            break
        children = dev.descendants()
        assert len(children) >= 3  # directory + 2 shards

    dev.popen.send_signal(signal.SIGINT)
    assert dev.popen.wait(timeout=t(15)) == 0
    assert "stopped." in dev.output
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_dev_keeps_the_chat_across_a_restart(tmp_path: Path, run_dev: list[DevRun]) -> None:
    """By default the messages are stored in the data dir: a restarted `roomshard dev` has
    them (history, resume, seq going on); `--history memory` says it keeps none."""
    data = str(tmp_path / "data")
    dev = DevRun(["--port", "0", "--shards", "1", "--data-dir", data])
    run_dev.append(dev)
    dev.wait_up()
    assert "stored before they are acked, in" in dev.output and "messages.db" in dev.output
    base = dev.field("chat page").rstrip("/")
    async with client.connect(base, "kept", "alice") as a:
        seqs = [await a.send(f"before restart {i}") for i in range(3)]
    dev.stop()
    again = DevRun(["--port", "0", "--shards", "1", "--data-dir", data])
    run_dev.append(again)
    again.wait_up()
    base = again.field("chat page").rstrip("/")
    page = await client.history(base, "kept")
    assert [(m.seq, m.text) for m in page.messages] == [
        (s, f"before restart {i}") for i, s in enumerate(seqs)]
    async with client.connect(base, "kept", "bob", since=seqs[0]) as b:
        got = []
        async for m in b:
            got.append((m.seq, m.text))  # a resume after the restart: recovered, no gap
            if len(got) == 2:
                break
        assert got == [(seqs[1], "before restart 1"), (seqs[2], "before restart 2")]
        assert await b.send("after restart") == seqs[-1] + 1
    again.stop()
    memory = DevRun(["--port", "0", "--shards", "1", "--data-dir", data, "--history", "memory"])
    run_dev.append(memory)
    memory.wait_up()
    assert "in memory only (--history memory)" in memory.output


def test_dev_with_a_busy_port_says_so_and_exits_2(tmp_path: Path, run_dev: list[DevRun]) -> None:
    """A port already in use is one clear line and exit code 2, before anything starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        dev = DevRun(["--port", str(port), "--shards", "1", "--data-dir", str(tmp_path)])
        run_dev.append(dev)
        assert dev.popen.wait(timeout=t(20)) == 2
    dev.stop()
    assert f"port {port} on 127.0.0.1 is already in use" in dev.output
    assert "Traceback" not in dev.output


def test_dev_starts_a_shard_that_dies_again(tmp_path: Path, run_dev: list[DevRun]) -> None:
    """A shard killed under dev is named with how it ended and started again; dev runs on."""
    dev = DevRun(["--port", "0", "--shards", "2", "--data-dir", str(tmp_path)])
    run_dev.append(dev)
    dev.wait_up()
    old = instance_process(dev.descendants(), "i2")
    old.kill()
    wait_until(lambda: "roomshard dev: i2 started again" in dev.output, t(30), "i2 started again")
    assert "roomshard dev: i2 was killed by SIGKILL; starting it again in 1 s" in dev.output
    new = instance_process(dev.descendants(), "i2")
    assert new.pid != old.pid and dev.popen.poll() is None

    def active() -> bool:  # the new process took its instance back
        r = httpx.get(f"{dev.field('directory')}/v1/admin/instances",
                      headers={"Authorization": f"Bearer {dev.field('admin token')}"}, timeout=5)
        return any(i["id"] == "i2" and i["state"] == "active" for i in r.json()["instances"])

    wait_until(active, t(30), "i2 active again")


def test_dev_no_restart_leaves_a_dead_shard_down(tmp_path: Path, run_dev: list[DevRun]) -> None:
    dev = DevRun(["--port", "0", "--shards", "2", "--data-dir", str(tmp_path), "--no-restart"])
    run_dev.append(dev)
    dev.wait_up()
    instance_process(dev.descendants(), "i2").kill()
    wait_until(lambda: "i2 was killed by SIGKILL; left down (--no-restart)" in dev.output,
               t(30), "dev to say i2 is left down")
    assert dev.popen.poll() is None
    assert not [p for p in dev.descendants() if "i2" in p.cmdline()]


def test_dev_stops_everything_when_the_directory_dies(tmp_path: Path, run_dev: list[DevRun]) -> None:
    """If the directory dies, dev names it, stops the others and exits non-zero."""
    dev = DevRun(["--port", "0", "--shards", "2", "--data-dir", str(tmp_path)])
    run_dev.append(dev)
    dev.wait_up()
    children = dev.descendants()
    next(p for p in children if "directory" in p.cmdline()).kill()
    assert dev.popen.wait(timeout=t(20)) == 1
    dev.stop()
    assert "directory was killed by SIGKILL; stopping everything" in dev.output
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.nginx
async def test_dev_behind_nginx_answers_on_one_port(tmp_path: Path, run_dev: list[DevRun]) -> None:
    """With --router nginx the page, the API and every room URL go through nginx on one port."""
    from roomshard.cli.dev import nginx_binary

    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx missing: run the README's test command")
        pytest.skip("nginx not installed")
    dev = DevRun(["--port", "0", "--shards", "2", "--data-dir", str(tmp_path), "--router", "nginx"])
    run_dev.append(dev)
    dev.wait_up()
    router = dev.field("router")
    assert dev.field("chat page") == router + "/"
    assert 'from "/static/roomshard/index.js"' in httpx.get(router + "/", timeout=t(10)).text
    # The page's client modules come through the same port.
    assert httpx.get(router + "/static/roomshard/session.js", timeout=t(10)).status_code == 200
    route = httpx.post(router + "/v1/rooms/edge/connect", json={"user": "alice"}, timeout=t(10)).json()
    assert route["url"].startswith(router.replace("http://", "ws://") + "/" + route["instance"] + "/room/edge?")
    async with client.connect(router, "edge", "alice") as a, client.connect(router, "edge", "bob") as b:
        seq = await a.send("through nginx")
        async for m in b:
            assert isinstance(m, client.Message) and (m.seq, m.text) == (seq, "through nginx")
            break

    # A shard started by hand (numbered by the directory) is routed by the dev cluster's
    # reconciler and gets rooms once nginx reaches it.
    secrets = json.loads((tmp_path / "secrets.json").read_text())
    directory = dev.field("directory")
    extra = subprocess.Popen(
        [sys.executable, "-m", "roomshard", "shard", "--port", "0", "--directory-url", directory],
        env={**os.environ, **secrets}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        admin = {"Authorization": f"Bearer {secrets['ROOMSHARD_ADMIN_TOKEN']}"}

        def third_active() -> bool:
            listed = httpx.get(f"{directory}/v1/admin/instances", headers=admin, timeout=t(5))
            return {"i3": "active"}.items() <= {i["id"]: i["state"]
                                                for i in listed.json()["instances"]}.items()

        wait_until(third_active, 30, "the hand-started shard to be routed and active")
        assert "location /i3/room/ {" in (tmp_path / "nginx" / "roomshard.conf").read_text()
        # New rooms go to the least loaded shards: i3 (and any other still empty) first.
        placed = {}
        for n in range(3):
            r = httpx.post(f"{router}/v1/rooms/new-{n}/connect", json={"user": "carol"}, timeout=t(10))
            placed[r.json()["instance"]] = f"new-{n}"
        assert "i3" in placed, placed
        async with client.connect(router, placed["i3"], "carol") as c:
            assert await c.send("routed by itself") >= 1
    finally:
        os.killpg(extra.pid, signal.SIGTERM)
        extra.wait(timeout=t(20))
    children = dev.descendants()
    assert any("nginx" in p.name() for p in children)
    dev.popen.send_signal(signal.SIGINT)
    assert dev.popen.wait(timeout=t(15)) == 0
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
