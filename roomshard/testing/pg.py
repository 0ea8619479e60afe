"""A throwaway PostgreSQL server in a temporary directory on a loopback port.

Uses the Debian PostgreSQL binaries (``initdb``/``pg_ctl``; the test command
installs them when missing). PostgreSQL refuses to run as root, so when the
tests run as root the server runs as the ``postgres`` system user (created by
the Debian package) and its directory is handed to that user.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from roomshard.testing.timing import t, wait_until


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    raise RuntimeError(f"{name} not found: install PostgreSQL (scripts/test does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster; ``stop()``/``start()`` simulate an outage."""

    def __init__(self, *, durable: bool = False, fsync: bool = False) -> None:
        """``durable``: commits reach the WAL before they are acknowledged
        (``synchronous_commit = on``), so an immediate stop (a crash of the server)
        keeps every committed transaction; the default trades that for speed.
        ``fsync``: and the WAL is flushed to the disk at each commit, as in
        production (benchmarks); tests leave it off (the machine does not crash)."""
        self.root = Path(tempfile.mkdtemp(prefix="roomshard-pg-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self.user: str | None = None
        self._admin: _AdminConnection | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run([_pg_bin("initdb"), "-D", str(self.datadir), "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--no-sync"])
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\nfsync = {'on' if fsync else 'off'}\n"
                f"synchronous_commit = {'on' if durable else 'off'}\n"
                f"full_page_writes = {'on' if fsync else 'off'}\n"
                "max_connections = 300\n"
            )

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(cmd, user=self.user, check=check, capture_output=True,
                              cwd=self.root, timeout=t(60))

    def start(self) -> None:
        self._run([_pg_bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "log"),
                   "-w", "-t", str(int(t(30))), "start"])
        wait_until(self.accepting, 30, "PostgreSQL to accept connections")

    def stop(self, mode: str = "fast") -> None:
        self._run([_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
                  check=False)

    def accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def sql(self, statement: str) -> None:
        """Run ``statement`` in the ``postgres`` database (on a kept connection: a psql
        process per statement cost ~0.1 s)."""
        if self._admin is None:
            self._admin = _AdminConnection(self.port)
        self._admin.execute(statement)

    def create_database(self, template: str | None = None) -> str:
        """A fresh database, a copy of ``template`` (nobody may be connected to it) or
        empty; returns its SQLAlchemy URL (asyncpg). Copied file by file (``FILE_COPY``:
        ~0.08 s, where the WAL-logged copy of even an empty template takes ~0.18 s)."""
        name = "rs_" + uuid.uuid4().hex[:12]
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template or "template1"}" '
                 "STRATEGY FILE_COPY")
        return self.url(name)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL (asyncpg) of ``database`` on this server."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        # "immediate": the data is thrown away, so skip the shutdown checkpoint
        # (tens of seconds after a suite that created hundreds of databases).
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class _AdminConnection:
    """One asyncpg connection to a server's ``postgres`` database, driven from a thread
    of its own, so that sync code can use it inside or outside an event loop; opened
    again when the server was stopped or the connection terminated."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._conn: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="pg-admin", daemon=True)
        self._thread.start()

    def execute(self, statement: str) -> None:
        asyncio.run_coroutine_threadsafe(self._execute(statement), self._loop).result(t(60))

    async def _execute(self, statement: str) -> None:
        for attempt in (1, 2):
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(host="127.0.0.1", port=self.port,
                                                   user="postgres", database="postgres",
                                                   timeout=t(10))
            try:
                await self._conn.execute(statement)
                return
            except Exception as exc:
                statement_failed = (isinstance(exc, asyncpg.PostgresError)
                                    and not isinstance(exc, asyncpg.exceptions.AdminShutdownError)
                                    and not self._conn.is_closed())
                if statement_failed or attempt == 2:
                    raise
                self._conn.terminate()  # gone with a restart or a terminate: a new one

    def close(self) -> None:
        async def close() -> None:
            if self._conn is not None and not self._conn.is_closed():
                self._conn.terminate()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(t(10))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(t(10))
        self._loop.close()
