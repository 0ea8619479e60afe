"""Elastic shards end to end behind a real nginx kept in step by the reconciler
(``roomshard rules --format nginx --watch``): a shard added under live traffic stays
``pending`` until nginx routes it, becomes ``active`` by itself, and no client ever gets a
404 from nginx; a shard retired under live traffic (``roomshard admin retire``) hands every
room over with no acked message lost, and its nginx route goes only after that."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Proc, Procs
from roomshard.testing.timing import await_until, t
from router_rules.nginx import render_nginx
from tests.router_rules.nginx_proc import Nginx, free_port

pytestmark = [pytest.mark.nginx, pytest.mark.e2e]

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
#: Closes after which the contract tells a client to ask the directory again and reconnect.
RETRY_CODES = {1001, 1013, 4004, 4010}


class Edge:
    """A directory with the route check, nginx in front of everything, and the reconciler."""

    def __init__(self, procs: Procs, tmp_path: Path) -> None:
        self.procs = procs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The prober makes a new room every few milliseconds: no room-creation budget.
        self.directory = procs.directory(env={"ROOMSHARD_ROUTE_CHECK": "1",
                                              "ROOMSHARD_ROOM_CREATE_RATE": "0",
                                              "ROOMSHARD_PUBLIC_URL": f"ws://127.0.0.1:{self.port}"})
        self.nginx = Nginx(tmp_path / "nginx")
        self.include = tmp_path / "nginx" / "roomshard.conf"
        self.include.parent.mkdir(parents=True)
        listen = f"127.0.0.1:{self.port}"
        self.include.write_text(render_nginx([], listen=listen, directory_url=self.directory.url))
        self.nginx.start(self.include, self.port)
        self.watcher: Proc = procs.start("rules", [
            "rules", "--format", "nginx", "--from-directory", self.directory.url, "--watch",
            "--out", str(self.include), "--listen", listen,
            "--directory-upstream", self.directory.url,
            "--check-cmd", self.nginx.command(self.include, "-t"),
            "--reload-cmd", self.nginx.command(self.include, "-s", "reload"),
            "--interval", "0.2", "--metrics-listen", "127.0.0.1:0"])

    async def states(self, admin: httpx.AsyncClient) -> dict[str, str]:
        doc = (await admin.get(f"{self.directory.url}/v1/admin/instances", headers=ADMIN)).json()
        return {i["id"]: i["state"] for i in doc["instances"]}

    def stop(self) -> None:
        self.nginx.stop()


class Prober:
    """Connects to fresh rooms through nginx, one after another, and keeps every outcome."""

    def __init__(self, edge: str) -> None:
        self.edge = edge
        self.welcomed_by: list[str] = []
        self.refused: list[tuple[str, int]] = []  # (url, HTTP status) of refused handshakes
        self.directory_errors: list[int] = []
        self.failures: list[str] = []  # anything else that kept a connect from its welcome
        self.retried = 0  # directory calls sent again after a closed keep-alive connection
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _run(self, http: httpx.AsyncClient) -> None:
        for n in itertools.count():
            if self._stopping:
                return
            try:
                r = await http.post(f"{self.edge}/v1/rooms/probe-{n}/connect", json={"user": "p"})
            except httpx.TransportError:
                # nginx's old workers close their idle keep-alive connections on a reload: a
                # request sent on one just then fails, and a client sends it again.
                self.retried += 1
                continue
            if r.status_code != 200:
                self.directory_errors.append(r.status_code)
                await asyncio.sleep(0.05)
                continue
            url = r.json()["url"]
            try:
                async with ws_connect(url, open_timeout=t(5), close_timeout=1) as ws:
                    welcome = await asyncio.wait_for(ws.recv(), t(5))
                    if '"welcome"' in welcome:
                        self.welcomed_by.append(r.json()["instance"])
                    else:
                        self.failures.append(f"{url}: {welcome[:200]}")
            except InvalidStatus as exc:
                self.refused.append((url, exc.response.status_code))
            except ConnectionClosed as exc:
                # A room placed on the shard being retired just before its drain closes with
                # 1013 (moving) or 4010 (moved): the contract's "ask the directory again".
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code not in RETRY_CODES:
                    self.failures.append(f"{url}: {exc!r}")
                self.retried += 1
            except (OSError, TimeoutError, WebSocketException) as exc:
                self.failures.append(f"{url}: {exc!r}")

    def alive(self) -> bool:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # its exception fails the test here, with its traceback
            raise AssertionError("the prober stopped")
        return True

    def start(self, http: httpx.AsyncClient) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(http))

    async def stop(self) -> None:
        """Ask the loop to end after its current connect; cancel it only if it does not
        (on Python 3.11 a ``wait_for`` whose inner await finishes as it is cancelled can
        swallow the cancellation, and a loop that only relied on it would run on)."""
        assert self._task is not None
        if self._task.done():
            self._task.result()  # an assertion inside fails the test here
        self._stopping = True
        done, _ = await asyncio.wait({self._task}, timeout=t(15))
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _talk(chatters: list[Chatter], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for c in chatters:
            await c.send()
        await asyncio.sleep(0.05)


# Every step below has its own bound (the sum of them is past the suite's 120 s); a run that
# fails prints each process's last lines.
@pytest.mark.timeout(240)
async def test_scale_out_and_in_under_traffic_behind_nginx(procs: Procs, tmp_path: Path) -> None:
    edge = Edge(procs, tmp_path)
    try:
        async with httpx.AsyncClient(timeout=t(10)) as http:
            for name in ("i1", "i2"):
                procs.shard(name, edge.directory.url)
            await await_until(lambda: _all_active(edge, http, {"i1", "i2"}), 30,
                              "i1 and i2 active through nginx")
            chatters = [Chatter(edge.url, f"room-{r}", f"u{r}-{k}", http)
                        for r in range(4) for k in range(2)]
            await start_chatting(chatters)
            prober = Prober(edge.url)
            prober.start(http)
            stop_talking = asyncio.Event()
            talk = asyncio.get_running_loop().create_task(_talk(chatters, stop_talking))

            # Started off the event loop: the chatters and the prober keep going meanwhile.
            await asyncio.to_thread(procs.shard, "i3", edge.directory.url)
            seen: list[str] = []

            async def i3_active() -> bool:
                state = (await edge.states(http)).get("i3")
                if state is not None and (not seen or seen[-1] != state):
                    seen.append(state)
                    if state == "active":  # nginx routed it first: the probe came through
                        assert "location /i3/room/ {" in edge.include.read_text()
                return state == "active"

            await await_until(i3_active, 30, "i3 to become active by itself")
            assert seen[0] == "pending", seen
            assert "i3 is active: its route answers through the load balancer" in edge.directory.output()
            # The least loaded instance gets the new rooms: i3, reached through nginx.
            await await_until(lambda: prober.alive() and "i3" in prober.welcomed_by, 20,
                              "a new room welcomed by i3")
            metrics = (await http.get(edge.watcher.url)).text
            assert 'roomshard_rules_route_changes_total{kind="added",target="nginx"} 3.0' in metrics
            assert "routes +i3 (3 instances)" in edge.watcher.output()

            # Scale in: retire i1 while everyone talks and new rooms keep coming.
            i1_rooms = {c.room for c in chatters if c.welcomes[-1].instance == "i1"}
            assert i1_rooms, "least-loaded placement put some of the rooms on i1"
            retire = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "roomshard", "admin", "--directory-url", edge.directory.url,
                "retire", "i1", "--route-timeout", "30", env=procs.base_env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(retire.communicate(), t(60))
            said = out.decode()
            assert retire.returncode == 0, said
            assert "removed i1 from the registry" in said
            assert "the load balancer no longer routes ws://127.0.0.1:" in said
            assert said.rstrip().endswith("retired i1: no room and no route left; stop its process")
            # The route went only after the drain and the removal: nginx has no i1 now.
            assert "/i1/room/" not in edge.include.read_text()
            assert "routes -i1 (2 instances)" in edge.watcher.output()
            states = await edge.states(http)
            assert "i1" not in states and states["i2"] == states["i3"] == "active"
            # The retired process may not come back: its next heartbeat is refused.
            i1 = next(p for p in procs.procs if p.name == "i1")
            await await_until(lambda: "i1 was removed from the registry" in i1.output(), 20,
                              "i1's heartbeat to be refused")
            assert (await http.get(f"{i1.url}/readyz")).status_code == 503
            assert "i1" not in await edge.states(http)

            stop_talking.set()
            await asyncio.wait_for(talk, t(15))
            await asyncio.wait_for(prober.stop(), t(15))
            await await_until(lambda: all(not c.unacked for c in chatters), 20, "every send acked")
            rooms = [chatters[k:k + 2] for k in range(0, len(chatters), 2)]
            await await_until(lambda: all(_caught_up(room) for room in rooms), 20,
                              "every acked message delivered to its room")
            assert [p for room in rooms for p in check_logs(room)] == []
            for c in chatters:
                assert c.welcomes[-1].instance != "i1", (c.room, c.welcomes)
                if c.room in i1_rooms:  # moved live: 4010, then resumed elsewhere with no gap
                    assert 4010 in c.closes, (c.room, c.closes)
            assert prober.refused == [] and prober.directory_errors == []
            assert prober.failures == []
            assert not [c.refused for c in chatters if c.refused]
            assert len(prober.welcomed_by) >= 10
            assert 'roomshard_rules_pending_changes{target="nginx"} 0.0' in (
                await http.get(edge.watcher.url)).text
            for c in chatters:
                await asyncio.wait_for(c.stop(), t(10))
    except BaseException:
        # What each process said, in the failure's report (a step that hangs or fails).
        for proc in procs.procs:
            print(f"--- {proc.name} (last lines)\n" + "\n".join(proc.output().splitlines()[-25:]))
        print("--- nginx error log (last lines)\n"
              + "\n".join(edge.nginx.error_log().splitlines()[-25:]))
        raise
    finally:
        edge.stop()


def _caught_up(room: list[Chatter]) -> bool:
    top = max(seq for c in room for seq in c.acks.values())
    return all(c.last_seq is not None and c.last_seq >= top for c in room)


async def _all_active(edge: Edge, http: httpx.AsyncClient, ids: set[str]) -> bool:
    states = await edge.states(http)
    return {i for i, s in states.items() if s == "active"} == ids
