"""Run a real nginx (the Debian package) on loopback with a generated include file.

Everything lives in a temporary prefix: config, pid file, logs and temp
paths; ``daemon off`` so the test owns the process and stops it. As root,
``user root;`` keeps the workers able to read the temp prefix.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from roomshard.testing.timing import t, wait_until

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")


def nginx_binary() -> str:
    for cand in NGINX_CANDIDATES:
        found = shutil.which(cand) or (cand if os.access(cand, os.X_OK) else None)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("nginx missing: run the README's test command (it installs the Debian package)")
    pytest.skip("nginx not installed")


def free_port() -> int:
    """A port the kernel just handed out for 127.0.0.1 (nginx cannot report a port 0 bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    def __init__(self, prefix: Path) -> None:
        self.binary = nginx_binary()
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def main_conf(self, include: Path) -> Path:
        tmp = self.prefix / "tmp"
        lines = ["user root;" if os.geteuid() == 0 else "", "worker_processes 1;", "daemon off;",
                 f"pid {self.prefix / 'nginx.pid'};", f"error_log {self.prefix / 'error.log'} info;",
                 "events { worker_connections 256; }", "http {",
                 f"    access_log {self.prefix / 'access.log'};"]
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / kind).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {kind}_temp_path {tmp / kind};")
        lines += [f"    include {include};", "}", ""]
        conf = self.prefix / "nginx.conf"
        conf.write_text("\n".join(lines))
        return conf

    def _argv(self, conf: Path, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                "-c", str(conf), *extra]

    def command(self, include: Path, *extra: str) -> str:
        """The shell words of ``nginx ... -c CONF EXTRA`` (``-t``, ``-s reload``) for this prefix."""
        return shlex.join(self._argv(self.main_conf(include), *extra))

    def check(self, include: Path) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the main config that includes ``include``."""
        return subprocess.run(self._argv(self.main_conf(include), "-t"), check=False, capture_output=True,
                              text=True, timeout=t(30))

    def start(self, include: Path, port: int) -> None:
        conf = self.main_conf(include)
        self.port = port
        self.proc = subprocess.Popen(self._argv(conf), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

        def accepting() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"nginx exited: {self.error_log()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(accepting, 20, "nginx to accept connections")

    def error_log(self) -> str:
        log = self.prefix / "error.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGQUIT)  # graceful: master and workers
        try:
            self.proc.wait(timeout=t(10))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=t(10))
