"""A throwaway PostgreSQL server in a temporary directory on a loopback port.

Uses the Debian PostgreSQL binaries (``initdb``/``pg_ctl``; the test command
installs them when missing). PostgreSQL refuses to run as root, so when the
tests run as root the server runs as the ``postgres`` system user (created by
the Debian package) and its directory is handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

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

    def psql(self, sql: str, db: str = "postgres") -> None:
        self._run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                   "-d", db, "-v", "ON_ERROR_STOP=1", "-c", sql])

    def create_database(self) -> str:
        """A fresh database; returns its SQLAlchemy URL (asyncpg)."""
        name = "rs_" + uuid.uuid4().hex[:12]
        self.psql(f'CREATE DATABASE "{name}"')
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        # "immediate": the data is thrown away, so skip the shutdown checkpoint
        # (tens of seconds after a suite that created hundreds of databases).
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
