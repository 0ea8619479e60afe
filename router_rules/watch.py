"""Keep a load balancer in step with the registry: ``roomshard rules ... --watch``.

The reconciler polls the directory's registry (``GET /v1/admin/instances``)
every ``interval`` seconds and brings a *target* (an nginx include file and
its reload, or the listeners of an ALB) to exactly the registry's routes.

Why this order never leaves a registered room unroutable:

* **Route in before active.** The registry lists an instance from its first
  heartbeat on, while it is still ``pending`` (``ROOMSHARD_ROUTE_CHECK``):
  the reconciler routes it then, and the directory makes it ``active`` (gives
  it rooms) only once its probe answers through the load balancer.
* **Route out only after removal.** Every registered instance keeps its
  route whatever its state (``draining``, ``disabled``, ``down``); an
  instance leaves the registry only through ``DELETE``, which the directory
  refuses while rooms point at it, so a route goes only once its instance
  was drained and removed.

A failure (the directory unreachable, ``nginx -t`` refusing the file, a
reload or an AWS call failing) leaves the load balancer as it was (an nginx
file that does not pass the check is put back); the next attempt comes after
a backoff that doubles from ``interval`` up to ``max_backoff`` (with jitter),
until one succeeds. Each change and each failure is one log line; the state
is exported as Prometheus metrics (:class:`WatchMetrics`).

Pure but for the target and the clock/sleep it is handed; the CLI wires
processes, files and boto3 (``router_rules.cli``).
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from router_rules.registry import Instance, RegistryError

log = logging.getLogger("roomshard.rules")

DEFAULT_INTERVAL_S = 1.0
DEFAULT_MAX_BACKOFF_S = 30.0
DEFAULT_RESYNC_S = 60.0
COMMAND_TIMEOUT_S = 30.0


class SyncError(Exception):
    """One failed step of a sync; ``stage`` names it (registry, render, write, check, reload,
    aws)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class Target(Protocol):
    """A load balancer the reconciler keeps equal to the registry."""

    name: str

    def apply(self, instances: Sequence[Instance]) -> None:
        """Make the load balancer route exactly ``instances``; raises :class:`SyncError`.

        Idempotent: applying the same registry twice changes nothing the second time."""


@dataclass(frozen=True)
class Changes:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def __len__(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)

    def describe(self) -> str:
        parts = [f"+{i}" for i in self.added] + [f"-{i}" for i in self.removed]
        parts += [f"~{i}" for i in self.changed]
        return " ".join(parts) or "no change"


def _route_key(inst: Instance) -> tuple[object, ...]:
    # What a route is made of; a change of any of these is a changed route.
    return (inst.scheme, inst.host, inst.port, inst.public_base)


def diff(applied: dict[str, Instance], desired: dict[str, Instance]) -> Changes:
    def order(ids: set[str]) -> tuple[str, ...]:
        return tuple(sorted(ids, key=lambda i: int(i[1:])))

    return Changes(
        added=order(desired.keys() - applied.keys()),
        removed=order(applied.keys() - desired.keys()),
        changed=order({i for i in desired.keys() & applied.keys()
                       if _route_key(desired[i]) != _route_key(applied[i])}))


class WatchMetrics:
    """The reconciler's Prometheus metrics (one registry per reconciler)."""

    def __init__(self, target: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.last_sync = Gauge("roomshard_rules_last_sync_timestamp_seconds",
                               "when the load balancer was last seen equal to the registry "
                               "(Unix time; 0: never)", ["target"], registry=self.registry)
        self.last_change = Gauge("roomshard_rules_last_change_timestamp_seconds",
                                 "when routes were last changed (Unix time; 0: never)",
                                 ["target"], registry=self.registry)
        self.pending = Gauge("roomshard_rules_pending_changes",
                             "routes the registry asks for that are not applied yet "
                             "(added, removed or changed instances)", ["target"],
                             registry=self.registry)
        self.routes = Gauge("roomshard_rules_routes", "instances routed as last applied",
                            ["target"], registry=self.registry)
        self.changes = Counter("roomshard_rules_route_changes",
                               "route changes applied, by kind (added, removed, changed)",
                               ["target", "kind"], registry=self.registry)
        self.errors = Counter("roomshard_rules_sync_errors",
                              "failed sync attempts, by stage (registry, render, write, "
                              "check, reload, aws)", ["target", "stage"], registry=self.registry)
        for g in (self.last_sync, self.last_change, self.pending, self.routes):
            g.labels(target).set(0)
        for kind in ("added", "removed", "changed"):
            self.changes.labels(target, kind)


@dataclass
class Reconciler:
    """Poll the registry, apply it to ``target`` when it changed (and every ``resync``)."""

    load: Callable[[], list[Instance]]
    target: Target
    metrics: WatchMetrics
    interval: float = DEFAULT_INTERVAL_S
    max_backoff: float = DEFAULT_MAX_BACKOFF_S
    resync: float = DEFAULT_RESYNC_S
    clock: Callable[[], float] = time.time
    applied: dict[str, Instance] | None = None  # None: nothing applied by this process yet
    failures: int = 0  # failed attempts in a row
    _last_apply: float = field(default=float("-inf"))

    def step(self) -> float:
        """One attempt; the seconds to wait before the next one."""
        name = self.target.name
        try:
            try:
                desired = {i.id: i for i in self.load()}
            except RegistryError as exc:
                raise SyncError("registry", str(exc)) from exc
            changes = diff(self.applied or {}, desired)
            self.metrics.pending.labels(name).set(len(changes))
            now = self.clock()
            if self.applied is None or changes or self.failures or now - self._last_apply >= self.resync:
                self.target.apply(list(desired.values()))
                self._last_apply = now
        except SyncError as exc:
            self.failures += 1
            self.metrics.errors.labels(name, exc.stage).inc()
            delay = min(self.max_backoff, self.interval * 2 ** min(self.failures, 30))
            log.warning("%s: %s failed (%d in a row): %s; retrying in %.1fs", name, exc.stage,
                        self.failures, exc, delay)
            return delay * (0.5 + random.random() / 2)
        if self.failures:
            log.warning("%s: in sync again after %d failed attempts", name, self.failures)
        self.failures = 0
        if self.applied is None:  # what was there before this process is not known
            log.warning("%s: routes %s (%d instances)", name,
                        " ".join(sorted(desired, key=lambda i: int(i[1:]))) or "none", len(desired))
        elif changes:
            log.warning("%s: routes %s (%d instances)", name, changes.describe(), len(desired))
        if changes and self.applied is not None:
            for kind in ("added", "removed", "changed"):
                self.metrics.changes.labels(name, kind).inc(len(getattr(changes, kind)))
            self.metrics.last_change.labels(name).set(self.clock())
        self.applied = desired
        self.metrics.pending.labels(name).set(0)
        self.metrics.routes.labels(name).set(len(desired))
        self.metrics.last_sync.labels(name).set(self.clock())
        return self.interval

    def run(self, stop: threading.Event, on_first_sync: Callable[[], None] | None = None) -> None:
        """Until ``stop`` is set (SIGTERM/SIGINT in the CLI)."""
        while not stop.is_set():
            delay = self.step()
            if on_first_sync is not None and self.applied is not None:
                on_first_sync()
                on_first_sync = None
            stop.wait(delay)


# -- a generated file and the command that applies it (nginx, kubectl) ---------
def parse_command(value: str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise RegistryError(f"{what} {value!r}: {exc}") from None
    if not argv:
        raise RegistryError(f"{what}: empty command")
    return argv


def _run(argv: list[str], stage: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SyncError(stage, f"{shlex.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise SyncError(stage, f"{shlex.join(argv)} exited with {done.returncode}"
                               + (f": {said[-1]}" if said else ""))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class RenderedFile:
    """A generated file kept equal to the rendered registry, then its reload command.

    nginx: the include file and ``nginx -s reload``; Kubernetes: the objects
    and ``kubectl apply --prune``.

    The file is replaced atomically (a reload never reads half a file). With
    ``check_cmd`` (``nginx -t``) a file nginx would refuse is put back to
    what it was before the reload is tried. The reload runs whenever the text
    differs from the last text reloaded, so a failed reload is retried even
    though the file is already written.
    """

    path: Path
    render: Callable[[Sequence[Instance]], str]
    reload_cmd: list[str] | None = None
    check_cmd: list[str] | None = None
    name: str = "nginx"
    _reloaded: str | None = None

    def apply(self, instances: Sequence[Instance]) -> None:
        try:
            text = self.render(instances)
        except RegistryError as exc:
            raise SyncError("render", str(exc)) from exc
        try:
            old = self.path.read_text() if self.path.exists() else None
            if text != old:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(self.path, text)
        except OSError as exc:
            raise SyncError("write", f"{self.path}: {exc.strerror or exc}") from exc
        if text != old and self.check_cmd is not None:
            try:
                _run(self.check_cmd, "check")
            except SyncError:
                try:
                    if old is None:
                        self.path.unlink(missing_ok=True)
                    else:
                        _write_atomically(self.path, old)
                except OSError as exc:
                    log.error("%s: could not put %s back: %s", self.name, self.path, exc)
                raise
        if text != self._reloaded:
            if self.reload_cmd is not None:
                _run(self.reload_cmd, "reload")
            self._reloaded = text
