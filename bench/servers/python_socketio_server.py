"""python-socketio peer server on uvicorn (one process, uvloop + httptools).

The same chat room as ``socketio_server.js``: ``join`` ROOM (answered with
``joined``), then ``msg`` TEXT broadcast to the whole room, sender included.

    python bench/servers/python_socketio_server.py [--host 127.0.0.1] [--port 0] [--ready-file F]
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import socketio
import uvicorn


def make_app() -> socketio.ASGIApp:
    sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"])
    room_of: dict[str, str] = {}

    @sio.on("join")
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)
        room_of[sid] = room
        await sio.emit("joined", to=sid)

    @sio.on("msg")
    async def msg(sid: str, text: str) -> None:
        room = room_of.get(sid)
        if room is not None:
            await sio.emit("msg", text, room=room)

    @sio.on("disconnect")
    async def disconnect(sid: str, *args: object) -> None:
        room_of.pop(sid, None)

    return socketio.ASGIApp(sio)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    # Bind first so the ready file names the real port; the listen backlog
    # holds connections that arrive before uvicorn starts accepting.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)
    url = f"ws://{args.host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(make_app(), log_level="warning", access_log=False,
                            lifespan="off", ws_per_message_deflate=False)
    server = uvicorn.Server(config)
    if args.ready_file:
        Path(args.ready_file).write_text(json.dumps({"url": url}))
    else:
        print(url, flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    cli()
