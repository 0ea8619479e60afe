"""Start real ``roomshard`` processes and stop every one of them.

Each process is started with ``--port 0`` and ``--ready-file``; it writes
``{"url": ...}`` to that file once it serves, and the helper waits for the
file (a condition, not a sleep). :class:`Procs` stops everything it started,
SIGTERM first and SIGKILL after a bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from roomshard.testing.timing import t, wait_until

TEST_ADMIN_TOKEN = "test-admin-token"
TEST_CLUSTER_SECRET = "test-cluster-secret"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path
    ready_file: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Procs:
    """A set of started processes; use as a context manager or call ``stop_all``."""

    def __init__(self, base_env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="roomshard-procs-"))
        self.procs: list[Proc] = []
        self.base_env = {
            **os.environ,
            "ROOMSHARD_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
            "ROOMSHARD_CLUSTER_SECRET": TEST_CLUSTER_SECRET,
            "PYTHONUNBUFFERED": "1",
            **(base_env or {}),
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              timeout: float = 30, *, wait_ready: bool = True) -> Proc:
        """Start ``roomshard ARGS --ready-file F``; unless ``wait_ready`` is False, wait
        until it wrote ``F`` and take its URL from there."""
        ready = self.dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log = self.dir / f"{name}.log"
        argv = [sys.executable, "-m", "roomshard", *args, "--ready-file", str(ready)]
        full_env = {**self.base_env, **(env or {})}
        # Appended to: a restarted process's output follows its earlier life's.
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(argv, env=full_env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, "", log, ready, argv, full_env)
        self.procs.append(proc)

        def ready_or_dead() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"{name} exited with {popen.returncode}:\n{proc.output()}")
            return ready.exists() and ready.stat().st_size > 0

        if not wait_ready:
            return proc
        wait_until(ready_or_dead, timeout, f"{name} to be ready")
        proc.url = json.loads(ready.read_text())["url"]
        return proc

    def directory(self, name: str = "directory", database_url: str | None = None,
                  env: dict[str, str] | None = None, extra: list[str] | None = None) -> Proc:
        db = database_url or f"sqlite+aiosqlite:///{self.dir / (name + '.db')}"
        return self.start(name, ["directory", "--port", "0", *(extra or [])],
                          env={"ROOMSHARD_AUTH": "open", "ROOMSHARD_DATABASE_URL": db, **(env or {})})

    def shard(self, instance: str, directory_url: str, env: dict[str, str] | None = None,
              extra: list[str] | None = None) -> Proc:
        return self.start(instance, ["shard", "--instance", instance, "--port", "0",
                                     "--directory-url", directory_url, *(extra or [])], env=env)

    def restart(self, proc: Proc, timeout: float = 30, *, same_port: bool = False) -> Proc:
        """Start the same command again (after ``kill``/``terminate``); ``same_port``:
        on the port it had (its clients know that address)."""
        self.procs.remove(proc)
        args = proc.argv[3:]
        args = args[: args.index("--ready-file")]
        if same_port:
            at = args.index("--port") + 1
            args = [*args[:at], str(proc.port), *args[at + 1:]]
        return self.start(proc.name, args, env=proc.env, timeout=timeout)

    def kill(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(timeout=t(10))

    def terminate(self, proc: Proc, timeout: float = 20) -> int:
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=t(timeout))
            except subprocess.TimeoutExpired:
                self.kill(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.terminate(proc, timeout=10)
        self.procs.clear()
