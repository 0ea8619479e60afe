"""The bare ``websockets.broadcast`` server: the Python ceiling.

``ws://HOST:PORT/room/ROOM``; every text frame is relayed verbatim to the
room (the sender included) with :func:`websockets.asyncio.server.broadcast`.
No parsing, no sequence numbers, no history: as little work as Python and the
``websockets`` library can do per delivery. Runs on uvloop, like roomshard.

    python bench/servers/bare_websockets.py [--host 127.0.0.1] [--port 0] [--ready-file F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from websockets.asyncio.server import ServerConnection, broadcast, serve


class Rooms:
    """Room name -> the connections in it."""

    def __init__(self) -> None:
        self.members: dict[str, set[ServerConnection]] = {}

    async def handler(self, ws: ServerConnection) -> None:
        room = ws.request.path.rsplit("/", 1)[-1] if ws.request else ""
        members = self.members.setdefault(room, set())
        members.add(ws)
        try:
            async for frame in ws:
                broadcast(members, frame)
        finally:
            members.discard(ws)
            if not members:
                self.members.pop(room, None)


async def main(host: str, port: int, ready_file: str | None) -> None:
    rooms = Rooms()
    async with serve(rooms.handler, host, port, compression=None, max_queue=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        url = f"ws://{host}:{bound}"
        if ready_file:
            Path(ready_file).write_text(json.dumps({"url": url}))
        else:
            print(url, flush=True)
        await server.serve_forever()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a roomshard dependency on Linux
        asyncio.run(main(args.host, args.port, args.ready_file))
    else:
        uvloop.run(main(args.host, args.port, args.ready_file))


if __name__ == "__main__":
    cli()
