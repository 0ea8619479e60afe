"""``roomshard rules``: generate load balancer rules, or bring a live ALB in line.

    roomshard rules --format terraform|cloudformation|nginx|kubernetes \\
        (--from-directory URL | --from-file FILE) [--out DIR] [--listen ADDR:PORT] ...
    roomshard rules --format nginx|kubernetes --from-directory URL --watch \\
        --out FILE [--check-cmd CMD] [--reload-cmd CMD] [--metrics-listen ADDR:PORT]
    roomshard rules plan  --listener-arn [GROUP=]ARN (--from-directory URL | --from-file FILE)
    roomshard rules apply --listener-arn [GROUP=]ARN ... [--dry-run]

``rules`` is a group that also runs on its own (``invoke_without_command``),
so the contract's exact form ``roomshard rules --format X --from-file F``
works next to the ``plan``/``apply`` subcommands. Every error is one line on
standard error and exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from router_rules import kubernetes, model, watch
from router_rules.cloudformation import render_cloudformation
from router_rules.nginx import DEFAULT_LISTEN, render_nginx
from router_rules.nginx import FILE_NAME as NGINX_FILE
from router_rules.registry import Instance, RegistryError
from router_rules.source import load_directory, load_file
from router_rules.terraform import FILE_NAME as TERRAFORM_FILE
from router_rules.terraform import render_terraform

SUMMARY_FILE = "alb-groups.json"


def _fail(message: str) -> NoReturn:
    click.echo(f"roomshard rules: {message}", err=True)
    sys.exit(2)


def _source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--from-file", "from_file", metavar="FILE",
                      help="saved body of GET /v1/admin/instances")(fn)
    fn = click.option("--from-directory", "from_directory", metavar="URL",
                      help="directory base URL; uses ROOMSHARD_ADMIN_TOKEN")(fn)
    return fn


def _common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--name-prefix", default=model.DEFAULT_NAME_PREFIX, show_default=True,
                      help="target group names are <prefix>-iN (unique per account and region)")(fn)
    fn = click.option("--reserved-target-groups", type=click.IntRange(0, 99),
                      default=model.DEFAULT_RESERVED_TARGET_GROUPS, show_default=True,
                      help="target groups the default ALB holds besides the shards (the directory)")(fn)
    fn = click.option("--reserved-rules", type=click.IntRange(0, 99),
                      default=model.DEFAULT_RESERVED_RULES, show_default=True,
                      help="rules the default ALB holds besides the shards' (infra/ has 2)")(fn)
    fn = click.option("--rules-quota", type=click.IntRange(1, 10_000),
                      default=model.DEFAULT_RULES_QUOTA, show_default=True,
                      help="your account's rules-per-ALB quota")(fn)
    return fn


def _load(from_directory: str | None, from_file: str | None) -> list[Instance]:
    if (from_directory is None) == (from_file is None):
        _fail("give exactly one of --from-directory URL or --from-file FILE")
    if from_file is not None:
        return load_file(from_file)
    assert from_directory is not None
    return load_directory(from_directory, os.environ.get("ROOMSHARD_ADMIN_TOKEN"))


def _write(out: str | None, files: dict[str, str]) -> None:
    if out is None:
        for text in files.values():
            click.echo(text, nl=False)
        return
    target = Path(out)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (target / name).write_text(text)
    except OSError as exc:
        _fail(f"cannot write to {out}: {exc.strerror or exc}")
    for name in files:
        click.echo(f"wrote {target / name}", err=True)


#: The formats that are one file, and their default file names: ``--out`` may name the
#: file itself (``--out /etc/nginx/conf.d/roomshard.conf``) instead of its directory.
SINGLE_FILE = {"nginx": (NGINX_FILE, (".conf",)),
               "kubernetes": (kubernetes.FILE_NAME, (".yaml", ".yml"))}


def single_file_path(fmt: str, out: str) -> Path:
    name, suffixes = SINGLE_FILE[fmt]
    return Path(out) if out.endswith(suffixes) else Path(out) / name


def single_file_renderer(fmt: str, *, listen: str, directory_upstream: str | None,
                         ping_interval: float, tls: dict[str, str | None] | None = None,
                         k8s: dict[str, Any] | None = None) -> Callable[[Any], str]:
    if fmt == "kubernetes":
        return lambda instances: kubernetes.render_kubernetes(instances, **(k8s or {}))
    return lambda instances: render_nginx(instances, listen=listen,
                                          directory_url=directory_upstream,
                                          ping_interval=ping_interval, **(tls or {}))


def generate(fmt: str, instances: list[Instance], *, out: str | None, listen: str,
             name_prefix: str, directory_upstream: str | None, ping_interval: float,
             limits: dict[str, int], tls: dict[str, str | None] | None = None,
             k8s: dict[str, Any] | None = None) -> None:
    if fmt in SINGLE_FILE:
        text = single_file_renderer(fmt, listen=listen, directory_upstream=directory_upstream,
                                    ping_interval=ping_interval, tls=tls, k8s=k8s)(instances)
        if out is None:
            _write(None, {SINGLE_FILE[fmt][0]: text})
        else:
            path = single_file_path(fmt, out)
            _write(str(path.parent), {path.name: text})
        return
    rules = model.build(instances, name_prefix=name_prefix, ping_interval=ping_interval, **limits)
    summary = json.dumps(model.groups_summary(rules), indent=2) + "\n"
    if fmt == "terraform":
        files = {TERRAFORM_FILE: render_terraform(rules)}
    else:
        files = render_cloudformation(rules)
        if not files:
            _fail("no instances registered: a CloudFormation template needs at least one resource")
        if out is None and len(files) > 1:
            _fail(f"{len(files)} ALB groups need one CloudFormation stack each: use --out DIR")
    if out is not None:
        files[SUMMARY_FILE] = summary
    elif len(rules.groups) > 1:
        for g in rules.groups:  # say which host serves which instances, off stdout
            click.echo(f"# ALB group {g.ident} ({g.public_base or 'ROOMSHARD_PUBLIC_URL'}): "
                       f"{' '.join(i.id for i in g.instances)}", err=True)
    _write(out, files)


@dataclass(frozen=True)
class WatchOptions:
    watch: bool
    interval: float
    max_backoff: float
    resync: float
    reload_cmd: str | None
    check_cmd: str | None
    metrics_listen: str | None
    ready_file: str | None


def _watch_options(fn: Callable[..., Any], *, commands: bool = True) -> Callable[..., Any]:
    opts = [
        click.option("--watch", is_flag=True,
                     help="keep following the directory and apply every change (Ctrl-C or "
                          "SIGTERM stops)"),
        click.option("--interval", type=click.FloatRange(min=0.1), default=watch.DEFAULT_INTERVAL_S,
                     show_default=True, help="--watch: seconds between reads of the registry"),
        click.option("--max-backoff", type=click.FloatRange(min=0.1),
                     default=watch.DEFAULT_MAX_BACKOFF_S, show_default=True,
                     help="--watch: the longest wait between retries after failures"),
        click.option("--resync", type=click.FloatRange(min=1), default=watch.DEFAULT_RESYNC_S,
                     show_default=True,
                     help="--watch: apply even without a registry change this often (repairs "
                          "changes made by hand)"),
        *([click.option("--reload-cmd", metavar="CMD",
                        help="--watch: run after the file changed, e.g. 'nginx -s reload' "
                             "(split like a shell would, not run by one)"),
           click.option("--check-cmd", metavar="CMD",
                        help="--watch: run after writing the file, e.g. 'nginx -t'; when it "
                             "fails the old file is put back and nothing is reloaded")]
          if commands else []),
        click.option("--metrics-listen", metavar="[ADDR:]PORT",
                     help="--watch: serve Prometheus metrics at http://ADDR:PORT/metrics"),
        click.option("--ready-file", metavar="FILE",
                     help="--watch: write {\"url\": <metrics URL>} here after the first sync"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)

    @functools.wraps(fn)  # keeps the options click collected on fn
    def wrapper(*args: Any, **kw: Any) -> Any:
        kw["watch_opts"] = WatchOptions(**{f: kw.pop(f, None)
                                           for f in WatchOptions.__dataclass_fields__})
        return fn(*args, **kw)

    return wrapper


def _metrics_server(listen: str, metrics: watch.WatchMetrics) -> str:
    from prometheus_client import start_http_server

    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        _fail(f"--metrics-listen {listen!r}: expected [ADDR:]PORT")
    try:
        server, _ = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                      registry=metrics.registry)
    except OSError as exc:
        _fail(f"--metrics-listen {listen}: {exc.strerror or exc}")
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    host_part = f"[{bound_host}]" if ":" in bound_host else bound_host
    return f"http://{host_part}:{bound_port}/metrics"


def run_watch(target: watch.Target, from_directory: str, opts: WatchOptions) -> None:
    """Follow the directory until SIGTERM/SIGINT; exit 0 then."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s roomshard rules: %(message)s")
    token = os.environ.get("ROOMSHARD_ADMIN_TOKEN")
    if not token:
        _fail("ROOMSHARD_ADMIN_TOKEN is not set (the admin API needs it)")
    metrics = watch.WatchMetrics(target.name)
    metrics_url = _metrics_server(opts.metrics_listen, metrics) if opts.metrics_listen else ""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reconciler = watch.Reconciler(lambda: load_directory(from_directory, token),
                                  target, metrics, interval=opts.interval,
                                  max_backoff=opts.max_backoff, resync=opts.resync)

    def ready() -> None:
        if opts.ready_file:
            path = Path(opts.ready_file)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"url": metrics_url}))
            os.replace(tmp, path)

    watch.log.warning("%s: following %s every %.1fs%s", target.name, from_directory,
                      opts.interval, f"; metrics at {metrics_url}" if metrics_url else "")
    reconciler.run(stop, on_first_sync=ready)
    watch.log.warning("%s: stopped", target.name)


@click.group("rules", invoke_without_command=True)
@click.option("--format", "fmt",
              type=click.Choice(["terraform", "cloudformation", "nginx", "kubernetes"]),
              help="what to generate")
@_source_options
@click.option("--out", metavar="DIR|FILE",
              help="write files here instead of standard output (nginx, kubernetes: a DIR, "
                   "or the FILE itself when it ends in .conf / .yaml)")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="ADDR:PORT",
              help="nginx: the server's listen address")
@click.option("--directory-upstream", metavar="URL",
              help="nginx: proxy every non-room path to this directory URL")
@click.option("--server-name", help="nginx: server_name of the server block")
@click.option("--ssl-certificate", metavar="PATH", help="nginx: terminate TLS with this certificate")
@click.option("--ssl-certificate-key", metavar="PATH", help="nginx: ... and this key")
@click.option("--ping-interval", type=click.FloatRange(min=0.1), default=20.0, show_default=True,
              help="the shards' ping interval; proxy timeouts are >= 3 of them")
@click.option("--namespace", default=kubernetes.DEFAULT_NAMESPACE, show_default=True,
              help="kubernetes: the namespace of the Services and HTTPRoutes")
@click.option("--gateway", default=kubernetes.DEFAULT_GATEWAY, show_default=True,
              metavar="[NAMESPACE/]NAME", help="kubernetes: the Gateway the HTTPRoutes attach to")
@click.option("--statefulset", default=kubernetes.DEFAULT_STATEFULSET, show_default=True,
              help="kubernetes: the shards' StatefulSet (pod NAME-N is instance iN)")
@click.option("--service-prefix", default=kubernetes.DEFAULT_SERVICE_PREFIX, show_default=True,
              help="kubernetes: Services are PREFIX-iN, HTTPRoutes PREFIX-shards-K")
@click.option("--hostname", "hostnames", multiple=True,
              help="kubernetes: a host name the HTTPRoutes match (repeatable; none: the "
                   "Gateway listener's)")
@click.option("--routes", "k8s_routes", type=click.Choice(kubernetes.ROUTES), default="gateway",
              show_default=True,
              help="kubernetes: Gateway API HTTPRoutes, or an Ingress per shard for the AWS "
                   "Load Balancer Controller")
@click.option("--ingress-group", default=kubernetes.DEFAULT_INGRESS_GROUP, show_default=True,
              help="kubernetes --routes ingress: the IngressGroup (one ALB; other public_base "
                   "hosts get GROUP-HOST)")
@click.option("--ingress-class", default=kubernetes.DEFAULT_INGRESS_CLASS, show_default=True,
              help="kubernetes --routes ingress: the IngressClass of the controller")
@_watch_options
@_common_options
@click.pass_context
def rules(ctx: click.Context, fmt: str | None, from_directory: str | None,
          from_file: str | None, out: str | None, listen: str,
          directory_upstream: str | None, server_name: str | None, ssl_certificate: str | None,
          ssl_certificate_key: str | None, ping_interval: float, namespace: str, gateway: str,
          statefulset: str, service_prefix: str, hostnames: tuple[str, ...], k8s_routes: str,
          ingress_group: str, ingress_class: str, name_prefix: str,
          watch_opts: WatchOptions, **limits: int) -> None:
    """Load balancer rules for the registered instances (ALB via Terraform or
    CloudFormation, nginx, or Kubernetes Services and Gateway API HTTPRoutes), or
    `plan`/`apply` them on a live ALB listener. With --watch (nginx, kubernetes): keep
    the file equal to the registry and run --reload-cmd after each change."""
    if ctx.invoked_subcommand is not None:
        return
    if fmt is None:
        _fail("--format terraform|cloudformation|nginx|kubernetes is required "
              "(or use `rules plan|apply`)")
    gateway_namespace, _, gateway_name = gateway.rpartition("/")
    tls: dict[str, str | None] = {"server_name": server_name, "ssl_certificate": ssl_certificate,
                                  "ssl_certificate_key": ssl_certificate_key}
    k8s = {"namespace": namespace, "gateway": gateway_name,
           "gateway_namespace": gateway_namespace or None, "statefulset": statefulset,
           "prefix": service_prefix, "hostnames": list(hostnames), "routes": k8s_routes,
           "ingress_group": ingress_group, "ingress_class": ingress_class, "limits": limits,
           "ping_interval": ping_interval}
    try:
        if watch_opts.watch:
            if fmt not in SINGLE_FILE:
                _fail(f"--watch works with --format nginx or kubernetes (for an ALB: "
                      f"`rules apply --watch`), not {fmt}")
            if from_directory is None or from_file is not None:
                _fail("--watch follows a directory: give --from-directory URL")
            if out is None:
                _fail("--watch needs --out FILE (the file nginx or kubectl reads)")
            render = single_file_renderer(fmt, listen=listen, directory_upstream=directory_upstream,
                                          ping_interval=ping_interval, tls=tls, k8s=k8s)
            render([])  # the options are checked once, before the loop
            target = watch.RenderedFile(
                single_file_path(fmt, out), render, name=fmt,
                reload_cmd=watch.parse_command(watch_opts.reload_cmd, "--reload-cmd"),
                check_cmd=watch.parse_command(watch_opts.check_cmd, "--check-cmd"))
            run_watch(target, from_directory, watch_opts)
            return
        generate(fmt, _load(from_directory, from_file), out=out, listen=listen,
                 name_prefix=name_prefix, directory_upstream=directory_upstream,
                 ping_interval=ping_interval, limits=limits, tls=tls, k8s=k8s)
    except RegistryError as exc:
        _fail(str(exc))


def _run_plan(apply: bool, from_directory: str | None, from_file: str | None,
              listener_arn: tuple[str, ...], target: tuple[str, ...], target_type: str,
              region: str | None, endpoint_url: str | None, name_prefix: str,
              watch_opts: WatchOptions | None = None, **limits: int) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError

    from router_rules import aws
    from router_rules.plan import plan

    try:
        overrides = dict(t.split("=", 1) for t in target if "=" in t)
        if len(overrides) != len(target):
            _fail("--target expects iN=ID")
        model.validate_prefix(name_prefix)
        client = boto3.client("elbv2", region_name=region, endpoint_url=endpoint_url)
        if watch_opts is not None and watch_opts.watch:
            if from_directory is None or from_file is not None:
                _fail("--watch follows a directory: give --from-directory URL")
            target_alb = aws.AlbListeners(client, listener_arn, name_prefix=name_prefix,
                                          limits=limits, target_overrides=overrides,
                                          target_type=target_type, say=watch.log.warning)
            run_watch(target_alb, from_directory, watch_opts)
            return
        rules = model.build(_load(from_directory, from_file), name_prefix=name_prefix, **limits)
        listeners = model.listener_map(listener_arn, rules)
        registered = {tg.name for g in rules.groups for tg in g.target_groups}
        for g in rules.groups:
            if g not in listeners:
                click.echo(f"# ALB group {g.ident}: no --listener-arn given, skipped", err=True)
        for g, arn in listeners.items():
            live = aws.read_live(client, arn, name_prefix)
            the_plan = plan(g, live, name_prefix=name_prefix, target_overrides=overrides,
                            registered=registered)
            click.echo(f"# ALB group {g.ident} ({g.public_base or 'ROOMSHARD_PUBLIC_URL'}), "
                       f"listener {arn}")
            click.echo(the_plan.describe())
            if apply and the_plan.actions:
                _, vpc = aws.describe_listener(client, arn)
                aws.execute(client, the_plan, listener_arn=arn, vpc_id=vpc,
                            target_type=target_type,
                            on_step=lambda a: click.echo(f"done: {a.describe()}", err=True))
    except RegistryError as exc:
        _fail(str(exc))
    except BotoCoreError as exc:  # no region/credentials: raised by boto3.client itself
        _fail(f"AWS: {exc}")


def _aws_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--listener-arn", multiple=True, required=True, metavar="[GROUP=]ARN",
                     help="HTTPS listener of an ALB group (bare ARN: the default group)"),
        click.option("--target", multiple=True, metavar="iN=ID",
                     help="target id of an instance (default: the IP of its internal_url)"),
        click.option("--target-type", type=click.Choice(["ip", "instance"]), default="ip",
                     show_default=True, help="type of new target groups"),
        click.option("--region", help="AWS region (default: the AWS environment)"),
        click.option("--endpoint-url", help="ELBv2 endpoint (default: AWS; AWS_ENDPOINT_URL works too)"),
    ]):
        fn = opt(fn)
    return _common_options(_source_options(fn))


@rules.command("plan")
@_aws_options
def plan_cmd(**kw: Any) -> None:
    """Show what `apply` would change on the live listener(s)."""
    _run_plan(False, **kw)


@rules.command("apply")
@_aws_options
@click.option("--dry-run", is_flag=True, help="only print the plan (same as `plan`)")
@functools.partial(_watch_options, commands=False)
def apply_cmd(dry_run: bool, watch_opts: WatchOptions, **kw: Any) -> None:
    """Create target groups and rules first, modify, delete last: no room is ever unroutable.
    With --watch: keep following the directory and apply every change."""
    if dry_run and watch_opts.watch:
        _fail("--dry-run and --watch do not go together (use `rules plan`)")
    _run_plan(not dry_run, watch_opts=watch_opts, **kw)
