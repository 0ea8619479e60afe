"""``roomshard shard``: run one shard process until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from roomshard.config import ShardConfig
from roomshard.store.messages import MessageStore
from shard.directory_client import DirectoryClient
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


async def serve(cfg: ShardConfig) -> None:
    from roomshard.wire.tickets import Signer

    directory = DirectoryClient(cfg.directory_url, cfg.instance, Signer(cfg.cluster_secrets))
    store = None if cfg.history_url == "memory" else MessageStore(cfg.history_url)
    server = ShardServer(cfg, directory, store=store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.warning("signal received: stopping shard %s", cfg.instance)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.shutdown(), cfg.shutdown_timeout + 1)

