"""`roomshard dev` as a user runs it, for tests: a real subprocess tree and its output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import psutil

from roomshard.testing.timing import t, wait_until


class DevRun:
    """A running `roomshard dev`, its output collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", "roomshard", "dev", *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for raw in self.popen.stdout:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def field(self, label: str) -> str:
        m = re.search(rf"^\s*{re.escape(label)}:\s+(\S+)", self.output, re.MULTILINE)
        assert m, f"{label!r} not printed:\n{self.output}"
        return m.group(1)

    def wait_up(self) -> None:
        def up() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"roomshard dev exited with {self.popen.returncode}:\n{self.output}")
            return "Ctrl-C stops everything." in self.output
        wait_until(up, 60, "roomshard dev to print its URLs")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=t(20))
            except subprocess.TimeoutExpired:
                for p in self.descendants():
                    p.kill()
                self.popen.kill()
                self.popen.wait()
        self._reader.join(timeout=t(5))


def instance_process(children: list[psutil.Process], name: str) -> psutil.Process:
    return next(p for p in children if "--instance" in p.cmdline() and name in p.cmdline())
