"""A moto server on loopback standing in for AWS (AWS itself cannot be reached here).

moto accepts things AWS refuses (more than 100 target groups per ALB, long
names, odd path patterns) and ignores some properties (CloudFormation
``Targets``, target group attributes): our own model and tests check those.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import boto3

REGION = "us-east-1"


@dataclass
class FakeAws:
    endpoint: str
    clients: list[Any] = field(default_factory=list)

    def client(self, service: str) -> Any:
        """A boto3 client of the fake; closed by :meth:`close` (an open one's pooled socket
        would be reported, unclosed, in whichever later test the collector runs)."""
        made = boto3.client(service, region_name=REGION, endpoint_url=self.endpoint,
                            aws_access_key_id="testing", aws_secret_access_key="testing")
        self.clients.append(made)
        return made

    def close(self) -> None:
        for made in self.clients:
            made.close()
        self.clients.clear()

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint}

    def new_listener(self, name: str) -> tuple[str, str]:
        """A fresh VPC + ALB + listener with a fixed 404 default: (vpc id, listener ARN)."""
        ec2, elb = self.client("ec2"), self.client("elbv2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24",
                                     AvailabilityZone=f"{REGION}{zone}")["Subnet"]["SubnetId"]
                   for i, zone in ((250, "a"), (251, "b"))]
        lb = elb.create_load_balancer(Name=name, Subnets=subnets)["LoadBalancers"][0]["LoadBalancerArn"]
        listener = elb.create_listener(
            LoadBalancerArn=lb, Protocol="HTTP", Port=80,
            DefaultActions=[{"Type": "fixed-response",
                             "FixedResponseConfig": {"StatusCode": "404"}}])["Listeners"][0]
        return vpc, listener["ListenerArn"]


@contextmanager
def moto_server() -> Iterator[FakeAws]:
    """moto in server mode on 127.0.0.1 with a free port; its clients closed, then stopped."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    fake = FakeAws(f"http://{host}:{port}")
    try:
        yield fake
    finally:
        fake.close()
        server.stop()

