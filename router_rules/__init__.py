"""Load balancer rules for roomshard: registry -> ALB groups, target groups and rules.

Pure model in :mod:`router_rules.model`; renderers for Terraform JSON,
CloudFormation and nginx; a planner and a boto3 executor for live ALB
listeners; the ``roomshard rules`` command in :mod:`router_rules.cli`.
"""

from router_rules.model import RuleSet, build
from router_rules.nginx import render_nginx
from router_rules.registry import Instance, RegistryError, parse_instances

__all__ = ["Instance", "RegistryError", "RuleSet", "build", "parse_instances", "render_nginx"]
