"""``roomshard dev``: the whole service on one machine, as child processes.

Theory of operation: the directory starts first (SQLite under the data dir,
open auth), then shards ``i1..iN`` pointed at it; each child writes its
``--ready-file`` once it serves, and the cluster is ready when every shard is
``active`` in ``GET /v1/admin/instances``. Then the supervisor prints the
URLs and waits: a signal (Ctrl-C / SIGTERM) stops everything and exits 0; a
child that dies stops everything and exits 1; a port already in use exits 2
before anything starts.

Children run in their own sessions (``setsid``) so a Ctrl-C reaches only the
supervisor, which then stops them in order (shards and router first, so the
shards can tell the directory they leave, the directory last): SIGTERM to
each process group, a bounded wait, SIGKILL for stragglers. On Linux they
also get ``PR_SET_PDEATHSIG`` so a supervisor killed with SIGKILL does not
leave orphans behind.

``ROOMSHARD_ADMIN_TOKEN`` and ``ROOMSHARD_CLUSTER_SECRET`` come from the
environment when set; otherwise they are generated once and kept in the data
dir (``secrets.json``, mode 0600), so the printed admin token still works
after a restart of ``roomshard dev``.

The pure parts (port plan, environment, banner) are separate functions so
they are tested without starting anything.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx

#: Seconds a shard may spend draining on SIGTERM under ``dev`` (its default is 10).
DEV_SHUTDOWN_TIMEOUT_S = "2"
#: Bounds of the stop sequence: shards/router first, then the directory.
STOP_SHARDS_S = 5.0
STOP_DIRECTORY_S = 3.0
START_TIMEOUT_S = 60.0
#: A dead shard is started again after 1 s, doubling to 30 s while it keeps dying, back
#: to 1 s once it stayed up a minute (``Restarts``).
RESTART_FIRST_S, RESTART_MAX_S, RESTART_STEADY_S = 1.0, 30.0, 60.0
SECRETS_FILE = "secrets.json"


class DevError(Exception):
    """Start-up cannot go on; ``exit_code`` 2 for operator errors (ports, nginx), 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- pure parts ---------------------------------------------------------------


@dataclass(frozen=True)
class PortPlan:
    """Ports of every process; 0 means "pick a free one" (the child reports it)."""

    directory: int
    shards: dict[str, int]
    router: int | None = None

    def fixed(self) -> list[int]:
        ports = [self.directory, *self.shards.values()]
        if self.router is not None:
            ports.append(self.router)
        return [p for p in ports if p]


def plan_ports(port: int, shards: int, router: bool) -> PortPlan:
    """Directory on ``port`` and shard iK on ``port + K``; behind a router, the
    router takes ``port`` and the directory moves to ``port + shards + 1``."""
    names = [f"i{k}" for k in range(1, shards + 1)]
    if port == 0:
        return PortPlan(0, {n: 0 for n in names}, 0 if router else None)
    shard_ports = {n: port + k for k, n in enumerate(names, start=1)}
    if router:
        return PortPlan(port + shards + 1, shard_ports, port)
    return PortPlan(port, shard_ports)


def dev_secrets(env: Mapping[str, str], stored: Mapping[str, str],
                make: Callable[[], str] = lambda: secrets.token_urlsafe(24)) -> dict[str, str]:
    """Admin token and cluster secret: from the environment, else the data dir's, else new."""
    out = {}
    for name in ("ROOMSHARD_ADMIN_TOKEN", "ROOMSHARD_CLUSTER_SECRET"):
        out[name] = env.get(name) or stored.get(name) or make()
    return out


def child_env(base: dict[str, str], *, data_dir: Path, creds: dict[str, str],
              public_url: str | None, history: str | None = None) -> dict[str, str]:
    """The children's environment: the dev defaults under anything the user set.

    ``history`` (``--history``): the message store every process uses; by default
    ``ROOMSHARD_HISTORY_URL`` if set, else a SQLite file in the data dir (chats survive
    restarts); ``memory`` for none.
    """
    env = dict(base)
    env.update(creds)
    env.setdefault("ROOMSHARD_AUTH", "open")
    env.setdefault("ROOMSHARD_DATABASE_URL", f"sqlite+aiosqlite:///{(data_dir / 'roomshard.db').resolve()}")
    if history is not None:
        env["ROOMSHARD_HISTORY_URL"] = history
    env.setdefault("ROOMSHARD_HISTORY_URL",
                   f"sqlite+aiosqlite:///{(data_dir / 'messages.db').resolve()}")
    env.setdefault("ROOMSHARD_SHUTDOWN_TIMEOUT", DEV_SHUTDOWN_TIMEOUT_S)
    if public_url:
        env["ROOMSHARD_PUBLIC_URL"] = public_url
        # Behind nginx a shard gets rooms once nginx routes it (the reconciler's work).
        env.setdefault("ROOMSHARD_ROUTE_CHECK", "on")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def roomshard_command(executable: str, cwd: Path) -> str:
    """How the user types ``roomshard``: a project-local virtualenv (``scripts/dev`` makes
    ``.venv``) is usually not on the user's PATH, so name its script by its relative path."""
    script = Path(executable).absolute().parent / "roomshard"
    try:
        return str(script.relative_to(cwd.absolute())) if script.exists() else "roomshard"
    except ValueError:
        return "roomshard"


def banner(*, page_url: str, directory_url: str, shard_urls: dict[str, str], admin_token: str,
           data_dir: Path, router_url: str | None, cmd: str = "roomshard",
           history_url: str = "memory") -> str:
    q = shlex.quote
    lines = [
        "roomshard dev: the service is up.",
        f"  directory:   {directory_url}",
        *(f"  {'shard ' + name + ':':<13}{url}" for name, url in shard_urls.items()),
    ]
    if router_url:
        lines.append(f"  router:      {router_url} (nginx; room URLs go through it, and a shard you "
                     "add is routed by itself)")
    lines += [
        f"  chat page:   {page_url}",
        f"  admin token: {admin_token}",
        f"  data & logs: {data_dir}",
        "  messages:    " + ("in memory only (--history memory): a restart loses them"
                             if history_url == "memory" else
                             f"stored before they are acked, in {_plain(history_url)}"),
        "",
        "Try:",
        f"  curl -s -X POST {page_url}v1/rooms/lobby/connect -H 'content-type: application/json' -d '{{\"user\": \"alice\"}}'",
        f"  {cmd} chat lobby --user alice --directory-url {page_url.rstrip('/')}",
        f"  ROOMSHARD_ADMIN_TOKEN={q(admin_token)} {cmd} admin --directory-url {page_url.rstrip('/')} instances",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


# -- processes ----------------------------------------------------------------


def _plain(url: str) -> str:
    """A store URL for the banner: a SQLite file by its path, others without a password."""
    if url.startswith("sqlite"):
        return url.split(":///", 1)[-1]
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready_file: Path | None
    url: str = ""

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Cluster:
    host: str
    data_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    stop_requested: threading.Event = field(default_factory=threading.Event)

    def spawn(self, name: str, argv: list[str], ready: bool = True) -> Child:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ready_file = self.data_dir / "run" / f"{name}.ready.json" if ready else None
        if ready_file is not None:
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            ready_file.unlink(missing_ok=True)
            argv = [*argv, "--ready-file", str(ready_file)]
        log = logs / f"{name}.log"
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        child = Child(name, popen, log, ready_file)
        self.children.append(child)
        return child

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.popen.poll() is not None), None)

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        """Poll ``cond`` until true; raise DevError on a dead child, a signal, or the timeout."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.stop_requested.is_set():
                raise KeyboardInterrupt
            if (c := self.dead()) is not None:
                raise DevError(f"{c.name} exited with code {c.popen.returncode} while starting; "
                               f"its log ({c.log}) ends with:\n{c.tail()}")
            if time.monotonic() > deadline:
                raise DevError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.stop_requested.wait(0.05)

    def wait_ready(self, child: Child, timeout: float = START_TIMEOUT_S) -> str:
        assert child.ready_file is not None
        f = child.ready_file
        self.wait_for(f"{child.name} to be ready", lambda: f.exists() and f.stat().st_size > 0, timeout)
        child.url = json.loads(f.read_text())["url"]
        return child.url

    def stop(self) -> None:
        """Shards and router first, then the directory: SIGTERM, bounded wait, SIGKILL."""
        first = [c for c in self.children if c.name != "directory"]
        last = [c for c in self.children if c.name == "directory"]
        for group, bound in ((first, STOP_SHARDS_S), (last, STOP_DIRECTORY_S)):
            for c in group:
                _signal_group(c, signal.SIGTERM)
            deadline = time.monotonic() + bound
            for c in group:
                try:
                    c.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    click.echo(f"roomshard dev: {c.name} did not stop in {bound:.0f}s; killing it", err=True)
            for c in group:
                _signal_group(c, signal.SIGKILL)  # stragglers and any grandchildren
                c.popen.wait()


def _signal_group(c: Child, sig: int) -> None:
    try:
        os.killpg(c.popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def instances_active(directory_url: str, token: str, names: list[str]) -> bool:
    try:
        r = httpx.get(f"{directory_url}/v1/admin/instances",
                      headers={"Authorization": f"Bearer {token}"}, timeout=2)
        states = {i["id"]: i["state"] for i in r.json()["instances"]} if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
    return all(states.get(n) == "active" for n in names)


# -- the nginx router (--router nginx) ---------------------------------------


def nginx_binary(path: str | None = None) -> str | None:
    """nginx on ``path`` (default: $PATH plus the sbin directories a non-root PATH may lack)."""
    if path is None:
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("nginx", path=path)


def nginx_main_conf(include: Path, prefix: Path) -> str:
    """A self-contained nginx.conf around the generated rules: foreground, files in the data dir."""
    tmp = prefix / "tmp"
    return "\n".join([
        "worker_processes 1;",
        "daemon off;",
        "master_process on;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} warn;",
        "events { worker_connections 4096; }",
        "http {",
        f"    access_log {prefix / 'access.log'};",
        *(f"    {k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        f"    include {include};",
        "}",
        "",
    ])


def render_router_rules(instances_doc: dict, listen: str, directory_url: str) -> str:
    """The generated nginx rules (router_rules' own renderer); DevError if it is not installed."""
    try:
        from router_rules.nginx import render_nginx
        from router_rules.registry import parse_instances
    except ImportError as exc:
        raise DevError(f"--router nginx needs the router_rules package ({exc})", 2) from None
    return render_nginx(parse_instances(instances_doc), listen=listen, directory_url=directory_url)


def start_router(cluster: Cluster, binary: str, listen: str, directory_url: str, token: str) -> Child:
    """nginx with the rules of the registry as it is, then the reconciler that keeps them
    in step (``roomshard rules --format nginx --watch``): a shard registered later, by the
    dev cluster or by hand, is routed within a second (and, with the route check the dev
    directory runs behind nginx, gets rooms only then)."""
    prefix = (cluster.data_dir / "nginx").resolve()
    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / k).mkdir(parents=True, exist_ok=True)
    r = httpx.get(f"{directory_url}/v1/admin/instances", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    rules = prefix / "roomshard.conf"
    rules.write_text(render_router_rules(r.json(), listen, directory_url))
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main_conf(rules, prefix))
    nginx = [binary, "-p", str(prefix), "-c", str(conf)]
    check = subprocess.run([*nginx, "-t", "-q"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise DevError(f"nginx refused the generated config: {check.stderr.strip()}")
    router = cluster.spawn("nginx", nginx, ready=False)
    watcher = cluster.spawn("rules", [
        sys.executable, "-m", "roomshard", "rules", "--format", "nginx", "--watch",
        "--from-directory", directory_url, "--out", str(rules), "--listen", listen,
        "--directory-upstream", directory_url, "--interval", "0.5",
        "--check-cmd", shlex.join([*nginx, "-t", "-q"]),
        "--reload-cmd", shlex.join([*nginx, "-s", "reload"])])
    cluster.wait_ready(watcher)
    return router


# -- the command ---------------------------------------------------------------


def _load_stored(data_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((data_dir / SECRETS_FILE).read_text())
        return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(data_dir: Path, creds: dict[str, str]) -> None:
    path = data_dir / SECRETS_FILE
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(json.dumps(creds, indent=2) + "\n")


def _run(host: str, port: int, shards: int, data_dir: Path, router: str | None, cluster: Cluster,
         history: str | None = None, restart: bool = True) -> None:
    plan = plan_ports(port, shards, router is not None)
    busy = [p for p in plan.fixed() if port_in_use(host, p)]
    if busy:
        raise DevError(f"port {busy[0]} on {host} is already in use (pick another --port, or --port 0)", 2)
    binary = None
    if router is not None:
        binary = nginx_binary()
        if binary is None:
            raise DevError("--router nginx: nginx is not installed (apt-get install nginx), "
                           "or run without --router", 2)
    router_port = plan.router if plan.router else (free_port(host) if router else None)
    router_url = f"http://{host}:{router_port}" if router_port else None
    public_url = f"ws://{host}:{router_port}" if router_port else None
    creds = dev_secrets(dict(os.environ), _load_stored(data_dir))
    _store(data_dir, creds)
    cluster.env = child_env(dict(os.environ), data_dir=data_dir, creds=creds, public_url=public_url,
                            history=history)
    me = [sys.executable, "-m", "roomshard"]

    click.echo(f"roomshard dev: starting the directory and {shards} shard(s); logs in {data_dir / 'logs'}")
    d = cluster.spawn("directory", [*me, "directory", "--host", host, "--port", str(plan.directory)])
    directory_url = cluster.wait_ready(d)
    token = creds["ROOMSHARD_ADMIN_TOKEN"]
    page_url = directory_url + "/"
    if binary is not None and router_port:
        # nginx and its reconciler first: the shards become active once nginx routes them.
        start_router(cluster, binary, f"{host}:{router_port}", directory_url, token)
        cluster.wait_for("nginx to listen", lambda: _answers(f"{router_url}/healthz"), START_TIMEOUT_S)
        page_url = f"{router_url}/"
    shard_children = [cluster.spawn(name, [*me, "shard", "--instance", name, "--host", host,
                                           "--port", str(p), "--directory-url", directory_url])
                      for name, p in plan.shards.items()]
    shard_urls = {c.name: cluster.wait_ready(c) for c in shard_children}
    cluster.wait_for("every shard to be active in the directory",
                     lambda: instances_active(directory_url, token, list(plan.shards)), START_TIMEOUT_S)
    click.echo(banner(page_url=page_url, directory_url=directory_url, shard_urls=shard_urls,
                      admin_token=token, data_dir=data_dir, router_url=router_url,
                      cmd=roomshard_command(sys.executable, Path.cwd()),
                      history_url=cluster.env["ROOMSHARD_HISTORY_URL"]))
    shard_argv = {c.name: list(c.popen.args) for c in shard_children}  # type: ignore[arg-type]
    _supervise(cluster, shard_argv, restart=restart)


class Restarts:
    """When to start a dead shard again: 1 s, doubling to 30 s while it keeps dying;
    back to 1 s once it has stayed up a minute (like systemd's ``Restart=on-failure``
    with a growing ``RestartSec``)."""

    def __init__(self, first: float = RESTART_FIRST_S, cap: float = RESTART_MAX_S,
                 steady: float = RESTART_STEADY_S) -> None:
        self.first, self.cap, self.steady = first, cap, steady
        self._delay: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def started(self, name: str, now: float) -> None:
        self._started[name] = now

    def delay(self, name: str, now: float) -> float:
        """The wait before restarting ``name``, which has just died."""
        up = now - self._started.get(name, now)
        delay = self.first if up >= self.steady else self._delay.get(name, self.first / 2) * 2
        self._delay[name] = min(delay, self.cap)
        return self._delay[name]


def how_it_ended(code: int | None) -> str:
    """``-9`` -> ``was killed by SIGKILL``; ``1`` -> ``exited with code 1``."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _supervise(cluster: Cluster, shard_argv: dict[str, list[str]], *, restart: bool) -> None:
    """Until Ctrl-C: a shard that dies is said so and started again (with backoff), or,
    with ``--no-restart``, left down (its rooms move to the others); the directory's
    or nginx's death stops everything."""
    restarts = Restarts()
    now = time.monotonic()
    for name in shard_argv:
        restarts.started(name, now)
    due: dict[str, float] = {}  # shard -> when to start it again
    while not cluster.stop_requested.is_set():
        now = time.monotonic()
        if (c := cluster.dead()) is not None:
            if c.name not in shard_argv:
                raise DevError(f"{c.name} {how_it_ended(c.popen.returncode)}; stopping "
                               f"everything. Its log ({c.log}) ends with:\n{c.tail()}")
            cluster.children.remove(c)
            if restart:
                wait = restarts.delay(c.name, now)
                due[c.name] = now + wait
                click.echo(f"roomshard dev: {c.name} {how_it_ended(c.popen.returncode)}; "
                           f"starting it again in {wait:g} s (its log: {c.log})")
            else:
                click.echo(f"roomshard dev: {c.name} {how_it_ended(c.popen.returncode)}; left "
                           "down (--no-restart): its rooms move to the other shards")
            continue
        for name, at in list(due.items()):
            if now >= at:
                del due[name]
                argv = shard_argv[name]
                cut = argv.index("--ready-file") if "--ready-file" in argv else len(argv)
                cluster.spawn(name, argv[:cut])
                restarts.started(name, now)
                click.echo(f"roomshard dev: {name} started again")
        cluster.stop_requested.wait(0.2)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address every process binds")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="directory port; shard iK gets PORT+K (0 picks free ports)")
@click.option("--shards", default=3, show_default=True, type=click.IntRange(1, 100), help="number of shards")
@click.option("--data-dir", default=".roomshard", show_default=True, type=click.Path(file_okay=False),
              help="SQLite database, logs and generated secrets")
@click.option("--router", type=click.Choice(["nginx"]), default=None,
              help="put a real nginx in front: the whole service on --port")
@click.option("--history", default=None, metavar="URL|memory",
              help="message store: a SQLAlchemy URL, or memory for none [default: "
                   "ROOMSHARD_HISTORY_URL, else DATA_DIR/messages.db]")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="start a shard that dies again (with backoff); --no-restart leaves it "
                   "down to watch its rooms move to the others")
def dev(host: str, port: int, shards: int, data_dir: str, router: str | None,
        history: str | None, restart: bool) -> None:
    """Run the directory and N shards on this machine until Ctrl-C."""
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(host=host, data_dir=path, env={})
    previous = {s: signal.signal(s, lambda *_: cluster.stop_requested.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        _run(host, port, shards, path, router, cluster, history, restart)
        click.echo("roomshard dev: stopping...")
    except KeyboardInterrupt:
        click.echo("roomshard dev: stopping...")
    except DevError as exc:
        click.echo(f"roomshard dev: {exc}", err=True)
        code = exc.exit_code
    finally:
        cluster.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    if code == 0:
        click.echo("roomshard dev: stopped.")
    sys.exit(code)
