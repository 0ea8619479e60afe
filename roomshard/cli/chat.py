"""``roomshard chat ROOM --user NAME``: a terminal chat on the client library.

Prints ``[seq] user: text`` for messages, ``* user joined/left`` for presence
and ``~ state`` lines while reconnecting; each line typed on stdin is sent.
stdin is read by a daemon thread (works for terminals, pipes and files alike,
and never blocks exit); the session runs on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import sys
import threading

import click

from roomshard.client import (
    ConnectRefused,
    Gap,
    Message,
    Presence,
    SendRefused,
    ServerError,
    Session,
    SessionClosed,
    State,
    StateChange,
)


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
    loop.call_soon_threadsafe(queue.put_nowait, None)


def _out(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


async def _print_events(session: Session) -> None:
    async for ev in session.events():
        if isinstance(ev, Message):
            _out(f"[{ev.seq}] {ev.user}: {ev.text}")
        elif isinstance(ev, Presence):
            _out(f"* {ev.user} {'joined' if ev.event == 'join' else 'left'}")
        elif isinstance(ev, Gap):
            _out(f"~ some messages after [{ev.after_seq}] were lost (the room restarted)")
        elif isinstance(ev, StateChange):
            if ev.state is State.OPEN:
                _out(f"~ connected to {ev.instance} (epoch {ev.epoch}); members: {', '.join(session.members)}")
            elif ev.state is not State.CLOSED:
                _out(f"~ {ev.state.value}: {ev.reason}")
        elif isinstance(ev, ServerError):
            _out(f"! {ev.code}: {ev.message}")


async def _report_send(fut: asyncio.Future[int]) -> None:
    try:
        await fut
    except SendRefused as exc:
        _out(f"! not sent: {exc}")
    except SessionClosed:
        pass


async def _chat(directory_url: str, room: str, user: str, token: str | None) -> int:
    session = await Session(directory_url, room, user, token=token).start(wait=False)
    _out(f"~ joining {room} as {user} (type a line to send it, Ctrl-D to leave)")
    printer = asyncio.create_task(_print_events(session))
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    threading.Thread(target=_stdin_lines, args=(asyncio.get_running_loop(), lines), daemon=True).start()
    sends: set[asyncio.Task[None]] = set()
    try:
        while True:
            get = asyncio.ensure_future(lines.get())
            await asyncio.wait([get, printer], return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                break  # the session ended
            line = get.result()
            if line is None:
                break
            if line.strip():
                task = asyncio.create_task(_report_send(session.send(line)))
                sends.add(task)
                task.add_done_callback(sends.discard)
        if session.state is not State.CLOSED:
            try:
                await session.flush(timeout=5)
            except TimeoutError:
                _out(f"~ {len(session.outbox)} message(s) not acked yet; leaving anyway")
    finally:
        await session.close()
        printer.cancel()
        try:
            await printer
        except asyncio.CancelledError:
            pass
        except (SessionClosed, ConnectRefused) as exc:
            click.echo(f"roomshard chat: {exc}", err=True)
            return 1
    return 0


@click.command()
@click.argument("room")
@click.option("--user", required=True, help="your user id (open auth mode)")
@click.option("--directory-url", envvar="ROOMSHARD_DIRECTORY_URL", default="http://127.0.0.1:8080",
              show_default=True, help="the directory's URL [ROOMSHARD_DIRECTORY_URL]")
@click.option("--token", envvar="ROOMSHARD_CHAT_TOKEN", default=None,
              help="application JWT for jwt auth mode [ROOMSHARD_CHAT_TOKEN]")
def chat(room: str, user: str, directory_url: str, token: str | None) -> None:
    """Chat in ROOM from the terminal: lines you type are sent, the room's messages are printed."""
    try:
        code = asyncio.run(_chat(directory_url, room, user, token))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)
