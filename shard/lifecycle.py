"""Scale-in on AWS: a shard in an Auto Scaling group leaves before its machine goes.

With ``ROOMSHARD_ASG_LIFECYCLE_HOOK`` set to the name of the group's
``autoscaling:EC2_INSTANCE_TERMINATING`` lifecycle hook, the shard polls the
instance metadata service (IMDSv2) for
``/latest/meta-data/autoscaling/target-lifecycle-state``. When the group
decides to terminate this machine the answer becomes ``Terminated`` while the
machine waits in ``Terminating:Wait``; the shard then stops as on SIGTERM
(rooms live-moved away, clients closed with 1001, the instance leaves the
directory, and is removed when the directory numbered it), and only then
calls ``CompleteLifecycleAction`` (``CONTINUE``) so the group terminates the
machine. The hook's heartbeat timeout must be longer than the shard's
``ROOMSHARD_SHUTDOWN_TIMEOUT`` (``infra/`` sets both).

I/O only (IMDS over httpx, the Auto Scaling API through boto3 in a thread);
the composition is in :mod:`shard.main`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import httpx

log = logging.getLogger("roomshard.shard.lifecycle")

TOKEN_TTL_S = 21600
REQUEST_TIMEOUT_S = 2.0
TERMINATED = "Terminated"


class LifecycleError(Exception):
    """The metadata service or the Auto Scaling API failed; one line."""


class AsgLifecycle:
    """This machine's termination lifecycle hook: wait for it, then complete it."""

    def __init__(self, hook: str, *, imds_url: str, poll: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.hook = hook
        self.poll = poll
        self.terminating = False
        self.instance_id: str | None = None
        self._http = httpx.AsyncClient(base_url=imds_url.rstrip("/"), transport=transport,
                                       timeout=REQUEST_TIMEOUT_S)
        self._token: str | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str) -> str:
        for _attempt in range(2):  # a token that expired is fetched again once
            if self._token is None:
                try:
                    r = await self._http.put("/latest/api/token", headers={
                        "X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
                except httpx.HTTPError as exc:
                    raise LifecycleError(f"instance metadata: {exc!r}") from exc
                if r.status_code != 200:
                    raise LifecycleError(f"instance metadata token: HTTP {r.status_code}")
                self._token = r.text
            try:
                r = await self._http.get(path, headers={"X-aws-ec2-metadata-token": self._token})
            except httpx.HTTPError as exc:
                raise LifecycleError(f"instance metadata {path}: {exc!r}") from exc
            if r.status_code == 401:
                self._token = None
                continue
            if r.status_code != 200:
                raise LifecycleError(f"instance metadata {path}: HTTP {r.status_code}")
            return r.text.strip()
        raise LifecycleError(f"instance metadata {path}: token refused")

    async def watch(self, stop: asyncio.Event) -> None:
        """Until the group terminates this machine: then set ``terminating`` and ``stop``."""
        failures = 0
        while not stop.is_set():
            try:
                if self.instance_id is None:
                    self.instance_id = await self._get("/latest/meta-data/instance-id")
                    log.warning("watching Auto Scaling lifecycle hook %s for %s", self.hook,
                                self.instance_id)
                state = await self._get("/latest/meta-data/autoscaling/target-lifecycle-state")
                failures = 0
            except LifecycleError as exc:
                failures += 1
                if failures in (1, 5) or failures % 60 == 0:
                    log.warning("cannot read the lifecycle state (%d in a row): %s", failures, exc)
                state = None
            if state == TERMINATED:
                log.warning("the Auto Scaling group terminates this machine: stopping (rooms "
                            "move away first), then completing lifecycle hook %s", self.hook)
                self.terminating = True
                stop.set()
                return
            try:
                await asyncio.wait_for(stop.wait(), self.poll)
            except TimeoutError:
                pass

    async def complete(self) -> None:
        """Tell the group this machine may go now (``CONTINUE``); raises LifecycleError."""
        assert self.instance_id is not None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
            or await self._get("/latest/meta-data/placement/region")
        instance_id = self.instance_id
        await asyncio.to_thread(_complete, self.hook, instance_id, region)
        log.warning("completed lifecycle hook %s for %s: the machine may terminate",
                    self.hook, instance_id)


def _complete(hook: str, instance_id: str, region: str) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client: Any = boto3.client("autoscaling", region_name=region)
        found = client.describe_auto_scaling_instances(InstanceIds=[instance_id])
        groups = found.get("AutoScalingInstances", [])
        if not groups:
            raise LifecycleError(f"{instance_id} is in no Auto Scaling group")
        client.complete_lifecycle_action(
            LifecycleHookName=hook, AutoScalingGroupName=groups[0]["AutoScalingGroupName"],
            InstanceId=instance_id, LifecycleActionResult="CONTINUE")
    except (BotoCoreError, ClientError) as exc:
        raise LifecycleError(f"complete_lifecycle_action {hook}: {exc}") from exc
