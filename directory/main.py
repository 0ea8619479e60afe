"""``roomshard directory``: one directory process on uvicorn.

Binds the socket itself (so ``--port 0`` works and the real port is known),
migrates the database before serving (a bad or unreachable database stops
start-up with one line, exit 2), logs ``roomshard directory listening on
http://HOST:PORT``, writes ``{"url": ...}`` to ``--ready-file`` once serving
and stops cleanly (exit 0) on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from roomshard.config import ConfigError, DirectoryConfig, linger_limits


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal after a graceful stop; we exit 0 instead. ``on_stop``
    runs first when it stops (before uvicorn waits for the open requests to end)."""

    on_stop: Any = None

    async def shutdown(self, sockets: Any = None) -> None:
        if self.on_stop is not None:
            self.on_stop()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def _fail(message: str) -> None:
    print(f"roomshard: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def _check_database(cfg: DirectoryConfig) -> None:
    from directory.db.engine import migrate
    from roomshard.sql import make_engine

    engine = make_engine(cfg.database_url, pool_size=1)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
        await _driver_threads_done()


async def _driver_threads_done(bound_s: float = 2.0) -> None:
    """Let aiosqlite's worker threads finish while this event loop still runs.

    A failed connect leaves its worker thread a last call that answers on
    the loop; once ``asyncio.run`` has closed the loop, that thread dies with
    a traceback ("Event loop is closed") after our one-line error.
    """
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline and any(
            th.is_alive() and th.name.endswith("(_connection_worker_thread)")
            for th in threading.enumerate()):
        await asyncio.sleep(0.005)


def _loop_setup() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return "asyncio"
    return "uvloop"


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


#: The interpreter's thread switch interval in the directory (the default is 5 ms). The
#: event loop's thread is CPU-bound under load, and every statement that goes through
#: aiosqlite's thread (heartbeats, moves, admin writes on SQLite) hands the GIL over and
#: back several times: at 5 ms a handoff, a heartbeat's write took seconds behind a connect
#: storm, long enough for the shards to lose their leases (docs/benchmarks/connect.md).
SWITCH_INTERVAL_S = 0.0005


def run(cfg: DirectoryConfig) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if cfg.log_level.lower() not in LOG_LEVELS:
        _fail(f"ROOMSHARD_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS[:5])}, got {cfg.log_level!r}")
    level = cfg.log_level.upper()
    logging.basicConfig(level="DEBUG" if level == "TRACE" else level, format="%(message)s",
                        stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per start, not ten
    from directory.app import create_app

    try:
        app = create_app(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        asyncio.run(_check_database(cfg))
    except Exception as exc:  # noqa: BLE001 - any driver error: one line, no traceback
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        _fail(f"ROOMSHARD_DATABASE_URL: cannot open the database: {detail[:300]}")
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    from directory.http.server import ConnectAdmission, uvicorn_options

    def shed() -> None:  # counted with the connects the handlers shed
        app.state.metrics.connects.labels("overloaded").inc()

    admission = ConnectAdmission(cfg.connects_in_flight, shed, app.connect_now)
    app.state.metrics.connects_in_flight.set_function(lambda: admission.in_flight)

    config = uvicorn.Config(app, loop=_loop_setup(), lifespan="on",
                            **uvicorn_options(linger_limits(cfg), admission),
                            log_level=cfg.log_level.lower(), access_log=False, server_header=False,
                            timeout_graceful_shutdown=5, proxy_headers=False)
    server = _Server(config)

    def end_channels() -> None:  # the shards' control channels end now, not after 5 s
        ctx = getattr(app.state, "ctx", None)
        if ctx is not None:
            ctx.failover.stop()

    server.on_stop = end_channels

    async def serve() -> None:
        async def announce() -> None:
            while not server.started:
                if server.should_exit:
                    return
                await asyncio.sleep(0.01)
            # Always shown, whatever the log level: operators and scripts look for it.
            print(f"roomshard directory listening on {url}", file=sys.stderr, flush=True)
            if cfg.ready_file:
                tmp = Path(cfg.ready_file + ".tmp")
                tmp.write_text(json.dumps({"url": url}))
                os.replace(tmp, cfg.ready_file)  # readers never see a half-written file

        announcer = asyncio.create_task(announce())
        try:
            await server.serve(sockets=[sock])
        finally:
            announcer.cancel()

    if _loop_setup() == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:  # pragma: no cover
        asyncio.run(serve())
    sock.close()
