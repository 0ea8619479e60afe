"""``roomshard shard``: run one shard process until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import random
import secrets
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from roomshard.config import AUTO_INSTANCE, ShardConfig
from roomshard.store.messages import MessageStore
from roomshard.wire.internal import UNNUMBERED, InstanceLoad
from shard.directory_client import DirectoryClient, DirectoryError, DirectoryRefused
from shard.lifecycle import AsgLifecycle, LifecycleError
from shard.server import ShardServer

log = logging.getLogger("roomshard.shard")


#: glibc: blocks of at least this size are mapped on their own and given back when freed.
MMAP_THRESHOLD = 16 * 1024
#: glibc: free memory at the top of the heap past this is given back (fixing the mmap
#: threshold would otherwise leave it at 128 KiB: a brk() call in every churn of the heap).
TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def bound_allocator() -> bool:
    """Keep the shard's memory at what it holds, not at what it once held (glibc only).

    Message history is a FIFO of blobs of up to tens of KiB, interleaved with
    short-lived frames and texts of the same sizes. glibc serves such blocks
    from its heap and, by default, raises its mmap threshold each time a
    large block is freed, so the heap fragments and the process grows round
    after round although the history it holds stays within
    ``history_bytes_total`` (measured: +66 MiB over six rounds of
    ``tests/shard/test_history_memory.py``'s attack at a 16 MiB bound; with a
    fixed threshold, +8 MiB). A fixed threshold maps blocks of 16 KiB and
    more on their own, returned to the system when freed. Small frames, the
    common case, are unaffected. True when set.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its allocator, its own policy
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def run(cfg: ShardConfig) -> None:
    """Serve until a signal; exits 2 with one line on a setting we cannot honour."""
    bound_allocator()
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the message store's migrations
    if cfg.permessage_deflate:
        # Broadcast frames are built once and shared by every member; a
        # per-connection compression context would defeat that. Not offered.
        print("roomshard: ROOMSHARD_PERMESSAGE_DEFLATE is not supported by the shard "
              "(broadcast frames are shared uncompressed); unset it", file=sys.stderr)
        sys.exit(2)
    try:
        run_loop(serve(cfg))
    except OSError as exc:
        print(f"roomshard: shard {cfg.instance} cannot serve: {exc}", file=sys.stderr)
        sys.exit(2)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed (its transports write ~2x faster), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)


#: Retries of the claim of an instance number while the directory cannot answer.
CLAIM_RETRY_S, CLAIM_RETRY_MAX_S = 0.25, 5.0


async def claim_number(cfg: ShardConfig, directory: DirectoryClient, sock: socket.socket,
                       boot_id: str, stop: asyncio.Event) -> str | None:
    """``--instance auto``: ask the directory for a number until it answers (None: stopped).

    The claim carries the address the directory will reach this process at (the bound
    socket's, or ``--advertise-url``): a process restarted at the same address takes back
    the number its predecessor had, once that one is gone."""
    host, port = sock.getsockname()[:2]
    internal_url = cfg.advertise_url or f"http://{host}:{port}"
    delay, attempt = CLAIM_RETRY_S, 0
    while True:
        attempt += 1
        try:
            answer = await directory.claim(internal_url=internal_url, public_base=cfg.public_base,
                                           capacity=cfg.capacity, boot_id=boot_id,
                                           load=InstanceLoad())
        except DirectoryRefused:
            raise
        except DirectoryError as exc:
            if attempt in (1, 5) or attempt % 30 == 0:
                log.warning("cannot claim an instance number yet (%d tries): %s", attempt, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay * (1 + random.random() / 2))
            if stop.is_set():
                return None
            delay = min(delay * 2, CLAIM_RETRY_MAX_S)
            continue
        log.warning("the directory numbered this shard %s (at %s)", answer.instance.id,
                    internal_url)
        return answer.instance.id


async def serve(cfg: ShardConfig) -> None:
    from roomshard.wire.tickets import Signer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    auto = cfg.instance == AUTO_INSTANCE
    directory = DirectoryClient(cfg.directory_url, UNNUMBERED if auto else cfg.instance,
                                Signer(cfg.cluster_secrets))
    sock, boot_id = None, secrets.token_hex(8)
    if auto:
        sock = socket.create_server((cfg.host, cfg.port), backlog=4096)
        try:
            number = await claim_number(cfg, directory, sock, boot_id, stop)
        except DirectoryRefused as exc:
            sock.close()
            await directory.aclose()
            raise SystemExit(f"roomshard: the directory refused to number this shard: {exc}")
        if number is None:
            sock.close()
            await directory.aclose()
            return
        cfg = dataclasses.replace(cfg, instance=number)
    store = None if cfg.history_url == "memory" else MessageStore(cfg.history_url)
    remove = auto if cfg.remove_on_stop is None else cfg.remove_on_stop
    server = ShardServer(cfg, directory, store=store, boot_id=boot_id, remove_on_leave=remove)
    await server.start(sock)
    lifecycle = watcher = None
    if cfg.asg_lifecycle_hook:
        lifecycle = AsgLifecycle(cfg.asg_lifecycle_hook, imds_url=cfg.imds_url,
                                 poll=cfg.lifecycle_poll)
        watcher = loop.create_task(lifecycle.watch(stop))
    await stop.wait()
    if lifecycle is None or not lifecycle.terminating:
        log.warning("signal received: stopping shard %s", cfg.instance)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.shutdown(), cfg.shutdown_timeout + 1)
    if lifecycle is not None and watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        try:
            if lifecycle.terminating:  # every room has moved: the machine may go
                await lifecycle.complete()
        except LifecycleError as exc:
            # The group terminates the machine anyway when the hook's timeout runs out.
            log.error("could not complete the lifecycle hook: %s", exc)
        finally:
            await lifecycle.aclose()

