"""Scale-in on AWS (ROOMSHARD_ASG_LIFECYCLE_HOOK): when its Auto Scaling group terminates the
machine, the shard hands every room over live, leaves the registry, and only then completes
the lifecycle hook.

AWS cannot be reached here. The Auto Scaling group, its instance and its lifecycle hook live
in moto's server mode; moto (5.2) has no ``CompleteLifecycleAction``, so this module adds that
one call to the in-process moto server: it checks the hook exists for the group, records the
call and terminates the instance, as AWS does. The instance metadata service is a small HTTP
server on loopback answering the IMDSv2 paths the shard reads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import await_until, t
from tests.router_rules.moto_env import REGION, FakeAws, moto_server

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
HOOK = "roomshard-drain"
COMPLETED: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def fake_aws() -> Iterator[FakeAws]:
    from moto.autoscaling import responses

    def complete_lifecycle_action(self: Any) -> Any:
        group = self._get_param("AutoScalingGroupName")
        hook = self._get_param("LifecycleHookName")
        hooks = self.autoscaling_backend.describe_lifecycle_hooks(group, [hook])
        if not hooks:
            raise ValueError(f"no lifecycle hook {hook} on {group}")
        call = {"group": group, "hook": hook, "instance": self._get_param("InstanceId"),
                "result": self._get_param("LifecycleActionResult")}
        COMPLETED.append(call)
        self.autoscaling_backend.terminate_instance(call["instance"], True)
        return responses.EmptyResult()

    assert not hasattr(responses.AutoScalingResponse, "complete_lifecycle_action"), \
        "moto implements CompleteLifecycleAction now: drop this stand-in"
    responses.AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action
    try:
        with moto_server() as fake:
            yield fake
    finally:
        del responses.AutoScalingResponse.complete_lifecycle_action


class Imds:
    """IMDSv2 for one machine: token, instance id, region, target lifecycle state."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.state = "InService"
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: str) -> None:
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:
                ok = self.path == "/latest/api/token" and \
                    self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self._answer(200 if ok else 400, "tok" if ok else "")

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != "tok":
                    self._answer(401, "")
                    return
                answers = {"/latest/meta-data/instance-id": imds.instance_id,
                           "/latest/meta-data/placement/region": REGION,
                           "/latest/meta-data/autoscaling/target-lifecycle-state": imds.state}
                body = answers.get(self.path)
                self._answer(404 if body is None else 200, body or "")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _group_with_hook(aws: FakeAws) -> str:
    """An Auto Scaling group of one machine with a termination hook; the machine's id."""
    asg = aws.client("autoscaling")
    asg.create_launch_configuration(LaunchConfigurationName="shards", ImageId="ami-12c6146b",
                                    InstanceType="t3.small")
    asg.create_auto_scaling_group(AutoScalingGroupName="roomshard-shards",
                                  LaunchConfigurationName="shards", MinSize=0, MaxSize=3,
                                  DesiredCapacity=1, AvailabilityZones=[f"{REGION}a"])
    asg.put_lifecycle_hook(LifecycleHookName=HOOK, AutoScalingGroupName="roomshard-shards",
                           LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                           HeartbeatTimeout=300, DefaultResult="ABANDON")
    return str(_machines(aws)[0])


def _machines(aws: FakeAws) -> list[str]:
    """The group's machines (moto's state is the process's: other modules' groups too)."""
    (group,) = aws.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=["roomshard-shards"])["AutoScalingGroups"]
    return [m["InstanceId"] for m in group["Instances"]]


async def test_a_terminating_machine_hands_its_rooms_over_then_completes_the_hook(
        procs: Procs, fake_aws: FakeAws) -> None:
    machine = _group_with_hook(fake_aws)
    assert _machines(fake_aws) == [machine]
    imds = Imds(machine)
    try:
        d = procs.directory()
        shard = procs.start("asg-shard", ["shard", "--port", "0", "--directory-url", d.url], env={
            **fake_aws.env(), "ROOMSHARD_ASG_LIFECYCLE_HOOK": HOOK,
            "ROOMSHARD_IMDS_URL": imds.url, "ROOMSHARD_LIFECYCLE_POLL": "0.1"})
        procs.shard("i2", d.url)
        assert "the directory numbered this shard i1" in shard.output()
        async with httpx.AsyncClient(timeout=t(10)) as http:
            chatters = await start_chatting([Chatter(d.url, f"asg-{r}", f"u{r}-{k}", http)
                                             for r in range(4) for k in range(2)])
            on_i1 = {c.room for c in chatters if c.welcomes[-1].instance == "i1"}
            assert on_i1, "least-loaded placement put rooms on the machine that goes"
            talking = True

            async def talk() -> None:
                while talking:
                    for c in chatters:
                        await c.send()
                    await asyncio.sleep(0.05)

            talker = asyncio.get_running_loop().create_task(talk())
            imds.state = "Terminated"  # what IMDS says while the machine is Terminating:Wait
            await await_until(lambda: shard.popen.poll() is not None, 60,
                              "the shard to stop by itself")
            talking = False
            await talker
            assert shard.popen.returncode == 0, shard.output()
            await await_until(lambda: all(not c.unacked for c in chatters), 20, "every send acked")
            rooms = [chatters[k:k + 2] for k in range(0, len(chatters), 2)]

            def caught_up() -> bool:
                return all(c.last_seq is not None and c.last_seq >= max(
                    s for m in room for s in m.acks.values()) for room in rooms for c in room)

            await await_until(caught_up, 20, "every acked message delivered")
            assert [p for room in rooms for p in check_logs(room)] == []
            for c in chatters:
                assert c.welcomes[-1].instance == "i2"
                if c.room in on_i1:
                    assert 4010 in c.closes, (c.room, c.closes)  # moved live, then resumed
            listed = (await http.get(f"{d.url}/v1/admin/instances", headers=ADMIN)).json()
            assert [i["id"] for i in listed["instances"]] == ["i2"]
            for c in chatters:
                await c.stop()
        out = shard.output()
        assert out.index("drained before stopping") < out.index(f"completed lifecycle hook {HOOK}")
        assert COMPLETED == [{"group": "roomshard-shards", "hook": HOOK, "instance": machine,
                              "result": "CONTINUE"}]
        assert _machines(fake_aws) == []
    finally:
        imds.close()
