"""Start the servers under test, pinned to their CPU, and stop every one of them.

Each benchmark target is a set of real processes on loopback: roomshard's
directory and shards (``python -m roomshard``), the Node Socket.IO and ``ws``
servers, the Python peers, ``redis-server`` for the Socket.IO adapter. Every
process is started under ``taskset -c CPU`` in its own session, announces its
URL in a ready file (the same ``--ready-file`` convention roomshard uses), and
is stopped with SIGTERM, then SIGKILL after a bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ADMIN_TOKEN = "bench-admin-token"
CLUSTER_SECRET = "bench-cluster-secret"


class StartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


@dataclass
class Running:
    """A started target: what the load generator connects to and which pids to watch."""

    name: str
    protocol: str  # raw | socketio | roomshard
    targets: list[str] = field(default_factory=list)  # ws:// bases (raw, socketio)
    directories: list[str] = field(default_factory=list)  # http:// bases (roomshard)
    pids: list[int] = field(default_factory=list)  # every server process, redis included
    # The message store's database server (roomshard with PostgreSQL): its CPU is reported
    # beside the servers', not in it (the comparison is the shard's work per delivery).
    database_pids: list[int] = field(default_factory=list)
    processes: dict[str, int] = field(default_factory=dict)  # role -> pid, for the report
    metrics_urls: dict[str, str] = field(default_factory=dict)  # role -> GET /metrics (roomshard)

    @property
    def directory(self) -> str | None:
        """The first directory (roomshard): where shards register."""
        return self.directories[0] if self.directories else None

    def scrape_metrics(self, keep: tuple[str, ...] = ("roomshard_",)) -> dict[str, list[str]]:
        """Counter lines of every roomshard process, to explain dropped clients afterwards."""
        out: dict[str, list[str]] = {}
        for role, url in self.metrics_urls.items():
            try:
                text = httpx.get(url, timeout=5).text
            except httpx.HTTPError as exc:
                out[role] = [f"unreachable: {exc}"]
                continue
            out[role] = [line for line in text.splitlines()
                         if line.startswith(keep) and "_bucket" not in line
                         and "_created" not in line
                         and not line.rstrip().endswith(" 0.0")][:200]
        return out


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until true; a bounded wait for a condition, not a sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise StartError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of ``pid`` in clock ticks (``os.sysconf("SC_CLK_TCK")`` a second)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def nice_prefix(nice: int) -> list[str]:
    """``nice -n N`` (only root may raise priority; others run at their own)."""
    if nice == 0 or (nice < 0 and os.geteuid() != 0):
        return []
    return ["nice", "-n", str(nice)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launcher:
    """Processes of one target; ``stop_all`` ends every one it started."""

    def __init__(self, server_cpus: str = "1", nice: int = 0,
                 roomshard_tree: Path | None = None) -> None:
        self.server_cpus = server_cpus
        self.nice = nice
        # roomshard's code is run from here (an export of a commit), so edits
        # in progress in the work tree do not leak into a measurement.
        self.roomshard_tree = roomshard_tree or ROOT
        self.dir = Path(tempfile.mkdtemp(prefix="roomshard-bench-"))
        self.popens: list[subprocess.Popen[bytes]] = []
        self.cleanups: list[Callable[[], None]] = []  # after the processes (a database)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              ready: bool = True, timeout: float = 60, cwd: Path = ROOT) -> tuple[int, str | None]:
        ready_file = self.dir / f"{name}.ready.json"
        log = self.dir / f"{name}.log"
        full = [*nice_prefix(self.nice), "taskset", "-c", self.server_cpus, *argv]
        if ready:
            full += ["--ready-file", str(ready_file)]
        with log.open("wb") as out:  # the child keeps its own descriptor
            popen = subprocess.Popen(full, env={**os.environ, **(env or {})}, cwd=cwd,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.popens.append(popen)
        if not ready:
            return popen.pid, None

        def up() -> bool:
            if popen.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise StartError(f"{name} exited with {popen.returncode}:\n{tail}")
            return ready_file.exists() and ready_file.stat().st_size > 0

        wait_for(up, timeout, f"{name} to be ready")
        return popen.pid, json.loads(ready_file.read_text())["url"]

    def log_tails(self, chars: int = 1500) -> dict[str, str]:
        """The end of every process's output (kept in the results when something went wrong)."""
        return {log.stem: log.read_text(errors="replace")[-chars:]
                for log in sorted(self.dir.glob("*.log")) if log.stat().st_size}

    def stop_all(self) -> None:
        for popen in reversed(self.popens):
            if popen.poll() is None:
                try:
                    os.killpg(popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for popen in reversed(self.popens):
            try:
                popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10)
        self.popens.clear()
        for cleanup in reversed(self.cleanups):
            cleanup()
        self.cleanups.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def node() -> str:
    return shutil.which("node") or "node"


def start_raw(launcher: Launcher, name: str, script: list[str]) -> Running:
    pid, url = launcher.spawn(name, script)
    return Running(name, "raw", targets=[url or ""], pids=[pid], processes={name: pid})


def start_ws_node(launcher: Launcher) -> Running:
    return start_raw(launcher, "ws-node", [node(), str(BENCH / "servers" / "ws_broadcast.js")])


def start_bare_websockets(launcher: Launcher) -> Running:
    return start_raw(launcher, "bare-websockets",
                     [sys.executable, str(BENCH / "servers" / "bare_websockets.py")])


def start_python_socketio(launcher: Launcher) -> Running:
    pid, url = launcher.spawn("python-socketio",
                              [sys.executable, str(BENCH / "servers" / "python_socketio_server.py")])
    return Running("python-socketio", "socketio", targets=[url or ""], pids=[pid],
                   processes={"python-socketio": pid})


def start_redis(launcher: Launcher) -> tuple[int, str]:
    port = free_port()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    pid, _ = launcher.spawn("redis", [redis, "--port", str(port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], ready=False)

    def pong() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_for(pong, 20, "redis-server to answer PING")
    return pid, f"redis://127.0.0.1:{port}"


def start_socketio(launcher: Launcher, nodes: int) -> Running:
    name = f"socketio-{nodes}" if nodes == 1 else f"socketio-{nodes}-redis"
    run = Running(name, "socketio")
    env: dict[str, str] = {}
    if nodes > 1:
        redis_pid, redis_url = start_redis(launcher)
        run.pids.append(redis_pid)
        run.processes["redis"] = redis_pid
        env["REDIS_URL"] = redis_url
    for n in range(1, nodes + 1):
        pid, url = launcher.spawn(f"node{n}", [node(), str(BENCH / "servers" / "socketio_server.js")],
                                  env=env)
        run.pids.append(pid)
        run.processes[f"node{n}"] = pid
        run.targets.append(url or "")
    return run


def roomshard_env(db: Path) -> dict[str, str]:
    return {
        "ROOMSHARD_ADMIN_TOKEN": ADMIN_TOKEN,
        "ROOMSHARD_CLUSTER_SECRET": CLUSTER_SECRET,
        "ROOMSHARD_AUTH": "open",
        "ROOMSHARD_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "ROOMSHARD_LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
    }


def start_postgres(launcher: Launcher, run: Running) -> str:
    """A throwaway PostgreSQL as production runs it (synchronous commits, fsync on), pinned
    to the servers' CPU; returns a new database's URL."""
    from roomshard.testing.pg import PgServer

    pg = PgServer(durable=True, fsync=True)
    pg.start()
    launcher.cleanups.append(pg.destroy)
    pid = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    subprocess.run(["taskset", "-a", "-p", "-c", launcher.server_cpus, str(pid)],
                   check=False, capture_output=True)
    run.database_pids.append(pid)
    run.processes["postgres"] = pid
    return pg.create_database()


def start_store(launcher: Launcher, store: str, run: Running) -> str:
    """The message store of a ``roomshard-1-<store>`` target: a SQLite file or PostgreSQL."""
    if store == "sqlite":
        return f"sqlite+aiosqlite:///{launcher.dir / 'messages.db'}"
    return start_postgres(launcher, run)


def start_roomshard(launcher: Launcher, shards: int, store: str | None = None,
                    directories: int = 1) -> Running:
    """``directories`` > 1: that many directory processes on one PostgreSQL database
    (production's layout; the load generator spreads each room's members over them)."""
    name = f"roomshard-{shards}" + (f"-{store}" if store else "")
    run = Running(name if directories == 1 else f"{name}-{directories}dirs-pg", "roomshard")
    tree = launcher.roomshard_tree
    env = {**roomshard_env(launcher.dir / "directory.db"), "PYTHONPATH": str(tree)}
    if store is not None:
        env["ROOMSHARD_HISTORY_URL"] = start_store(launcher, store, run)
    if directories > 1:
        env["ROOMSHARD_DATABASE_URL"] = start_postgres(launcher, run)
    for d in range(1, directories + 1):
        role = "directory" if d == 1 else f"directory{d}"
        pid, url = launcher.spawn(role, [sys.executable, "-m", "roomshard", "directory",
                                         "--port", "0"], env=env, cwd=tree)
        run.directories.append(url or "")
        run.pids.append(pid)
        run.processes[role] = pid
        run.metrics_urls[role] = f"{url}/metrics"
    url = run.directories[0]
    for n in range(1, shards + 1):
        spid, surl = launcher.spawn(f"i{n}", [sys.executable, "-m", "roomshard", "shard",
                                             "--instance", f"i{n}", "--port", "0",
                                             "--directory-url", url or ""], env=env, cwd=tree)
        run.pids.append(spid)
        run.processes[f"i{n}"] = spid
        run.metrics_urls[f"i{n}"] = f"{surl}/metrics"

    def all_active() -> bool:
        try:
            r = httpx.get(f"{url}/v1/admin/instances", timeout=2,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        active = [i for i in r.json().get("instances", []) if i.get("state") == "active"]
        return len(active) == shards

    wait_for(all_active, 30, f"{shards} active shard(s) in the directory")
    return run


def export_tree(rev: str, dest: Path) -> str:
    """``git archive REV`` into ``dest``; returns the commit id measured."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


STARTERS: dict[str, Callable[[Launcher], Running]] = {
    "ws-node": start_ws_node,
    "bare-websockets": start_bare_websockets,
    "python-socketio": start_python_socketio,
    "socketio-1": lambda la: start_socketio(la, 1),
    "socketio-2-redis": lambda la: start_socketio(la, 2),
    "roomshard-1": lambda la: start_roomshard(la, 1),
    "roomshard-2": lambda la: start_roomshard(la, 2),
    "roomshard-1-sqlite": lambda la: start_roomshard(la, 1, "sqlite"),
    "roomshard-1-pg": lambda la: start_roomshard(la, 1, "pg"),
    "roomshard-1-2dirs-pg": lambda la: start_roomshard(la, 1, directories=2),
}
