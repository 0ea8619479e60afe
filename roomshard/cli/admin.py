"""``roomshard admin``: the directory's admin API from the terminal.

Every command is one or two HTTP calls with ``Authorization: Bearer
$ROOMSHARD_ADMIN_TOKEN``; answers are rendered as rich tables. Any HTTP
error prints the contract's ``code: message`` on one line and exits 1; a
directory that cannot be reached, or a missing token, exits 2. No traceback
either way.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, NoReturn

import click
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from roomshard.wire.probe import route_gone, route_probe_url

#: A drain or rebalance moves rooms one by one; give it time.
LONG_CALL_TIMEOUT_S = 600.0


class AdminError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def error_line(resp: httpx.Response) -> str:
    """``code: message`` from the contract's error body (or the HTTP status when it is not one)."""
    try:
        err = resp.json()["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        text = resp.text.strip().splitlines()[0][:200] if resp.text.strip() else resp.reason_phrase
        return f"http_{resp.status_code}: {text}"


class Api:
    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None,
             timeout: float = 30.0) -> Any:
        """One request; returns the decoded JSON body or raises AdminError."""
        if not self.token:
            raise AdminError("ROOMSHARD_ADMIN_TOKEN is not set (roomshard dev prints it)", 2)
        try:
            resp = httpx.request(method, self.base_url + path, json=json, params=params, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.token}"})
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the directory at {self.base_url}: {exc}", 2) from None
        if resp.status_code >= 400:
            raise AdminError(error_line(resp))
        try:
            return resp.json() if resp.content else {}
        except ValueError:
            raise AdminError(f"unexpected answer from {path}: {resp.text[:200]!r}") from None


def _fail(exc: AdminError) -> NoReturn:
    click.echo(f"roomshard admin: {exc}", err=True)
    sys.exit(exc.exit_code)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "-"
    return str(v)


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title, title_justify="left", min_width=len(title) + 2)  # keep the title on one line
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(_fmt(v) for v in row))
    return t


def load_table(title: str, loads: dict[str, Any]) -> Table:
    """``{"i1": {"load": .., "share": ..}}`` as one row per instance, one column per figure."""
    keys = list(dict.fromkeys(k for v in loads.values() if isinstance(v, dict) for k in v))
    if not keys:
        return table(title, ["instance", "load"], sorted(loads.items()))
    return table(title, ["instance", *keys],
                 ([iid, *((v or {}).get(k) for k in keys)] for iid, v in sorted(loads.items())))


def moves_table(title: str, moves: list[dict[str, Any]]) -> Table:
    return table(title, ["room", "from", "to"], ([m.get("room"), m.get("from"), m.get("to")] for m in moves))


@click.group()
@click.option("--directory-url", envvar="ROOMSHARD_DIRECTORY_URL", default="http://127.0.0.1:8080",
              show_default=True, help="the directory's URL [ROOMSHARD_DIRECTORY_URL]")
@click.pass_context
def admin(ctx: click.Context, directory_url: str) -> None:
    """Operate the directory (token from ROOMSHARD_ADMIN_TOKEN)."""
    import os

    ctx.obj = Api(directory_url, os.environ.get("ROOMSHARD_ADMIN_TOKEN"))


def _console() -> Console:
    return Console(width=max(120, Console().width))


@admin.command()
@click.pass_obj
def instances(api: Api) -> None:
    """List the registered instances with their state and load."""
    try:
        doc = api.call("GET", "/v1/admin/instances")
    except AdminError as exc:
        _fail(exc)
    rows = [[i.get("id"), i.get("state"), i.get("capacity"), i.get("internal_url"), i.get("public_base"),
             i.get("last_heartbeat"), (i.get("load") or {}).get("rooms"),
             (i.get("load") or {}).get("connections"), (i.get("load") or {}).get("messages_per_s")]
            for i in doc.get("instances", [])]
    _console().print(table("instances", ["id", "state", "capacity", "internal url", "public base",
                                         "last heartbeat", "rooms", "conns", "msg/s"], rows))


@admin.command()
@click.option("--instance", default=None, help="only the rooms on this instance (iN)")
@click.pass_obj
def rooms(api: Api, instance: str | None) -> None:
    """List room assignments and their live load."""
    try:
        doc = api.call("GET", "/v1/admin/rooms", params={"instance": instance} if instance else None)
    except AdminError as exc:
        _fail(exc)
    rows = []
    for r in doc.get("rooms", []):
        r = r if isinstance(r, dict) else {"room": r}
        load = r.get("load") or {}
        rows.append([r.get("room"), r.get("instance"), r.get("epoch"), r.get("state"),
                     load.get("connections"), load.get("members"), load.get("seq"), load.get("messages_per_s")])
    _console().print(table(f"rooms{' on ' + instance if instance else ''} ({len(rows)})",
                           ["room", "instance", "epoch", "state", "conns", "members", "seq", "msg/s"], rows))


@admin.command()
@click.argument("room_id", metavar="ROOM")
@click.pass_obj
def room(api: Api, room_id: str) -> None:
    """Show one room's assignment and load."""
    try:
        doc = api.call("GET", f"/v1/admin/rooms/{room_id}")
    except AdminError as exc:
        _fail(exc)
    _console().print(table(f"room {room_id}", ["field", "value"], sorted(doc.items())))


@admin.command()
@click.argument("room_id", metavar="ROOM")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True,
              help="messages per page")
@click.option("--before", type=click.IntRange(min=1), default=None,
              help="only messages with a lower seq")
@click.option("--all", "every", is_flag=True, help="every retained message (page back to the first)")
@click.pass_obj
def history(api: Api, room_id: str, limit: int, before: int | None, every: bool) -> None:
    """Show ROOM's latest messages (with a message store: every stored one; without: what
    its shard holds in memory), oldest first."""
    shown: list[list[Any]] = []
    more = False
    try:
        while True:
            params = {"limit": str(limit), **({"before": str(before)} if before else {})}
            page = api.call("GET", f"/v1/rooms/{room_id}/messages", params=params)
            shown[:0] = [[m.get("seq"), _when(m.get("ts")), m.get("user"), m.get("text")]
                         for m in page.get("messages", [])]
            more = bool(page.get("more"))
            if not (every and more and page.get("messages")):
                break
            before = page["messages"][0]["seq"]
    except AdminError as exc:
        _fail(exc)
    title = f"{room_id}: {len(shown)} message(s)" + (", older ones exist" if more else "")
    _console().print(table(title, ["seq", "time (UTC)", "user", "text"], shown))


def _when(ts: Any) -> str:
    import datetime

    if not isinstance(ts, (int, float)):
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


@admin.command()
@click.argument("room_id", metavar="ROOM")
@click.argument("text")
@click.option("--user", required=True, help="the user the message is from")
@click.option("--id", "msg_id", default=None,
              help="the message's id (default: a new one); the same id again is the same message")
@click.pass_obj
def publish(api: Api, room_id: str, text: str, user: str, msg_id: str | None) -> None:
    """Send TEXT into ROOM as --user (the server API); prints its seq."""
    import uuid

    body = {"id": msg_id or uuid.uuid4().hex, "user": user, "text": text}
    try:
        doc = api.call("POST", f"/v1/rooms/{room_id}/messages", json=body)
    except AdminError as exc:
        _fail(exc)
    click.echo(f"published to {doc.get('room')}: seq {doc.get('seq')} (id {doc.get('id')})")


@admin.group()
def instance() -> None:
    """Change one instance in the registry."""


@instance.command("set")
@click.argument("instance_id", metavar="iN")
@click.option("--state", type=click.Choice(["active", "draining", "disabled"]), default=None)
@click.option("--capacity", type=click.IntRange(min=1), default=None)
@click.option("--internal-url", default=None, help="where the directory reaches the shard")
@click.option("--public-base", default=None, help="public ws(s):// base of its room URLs")
@click.pass_obj
def instance_set(api: Api, instance_id: str, state: str | None, capacity: int | None,
                 internal_url: str | None, public_base: str | None) -> None:
    """Register or update instance iN (only the given fields change)."""
    body = {k: v for k, v in {"state": state, "capacity": capacity, "internal_url": internal_url,
                              "public_base": public_base}.items() if v is not None}
    if not body:
        raise click.UsageError("nothing to change: give --state, --capacity, --internal-url or --public-base")
    try:
        doc = api.call("PUT", f"/v1/admin/instances/{instance_id}", json=body)
    except AdminError as exc:
        _fail(exc)
    _console().print(table(f"instance {instance_id}", ["field", "value"], sorted(doc.items())))


@instance.command("remove")
@click.argument("instance_id", metavar="iN")
@click.pass_obj
def instance_remove(api: Api, instance_id: str) -> None:
    """Remove iN from the registry (refused while rooms point at it)."""
    try:
        api.call("DELETE", f"/v1/admin/instances/{instance_id}")
    except AdminError as exc:
        _fail(exc)
    click.echo(f"removed {instance_id}")


@admin.command()
@click.argument("room_id", metavar="ROOM")
@click.option("--private/--public", default=True, help="private to its members, or public again")
@click.option("--member", "members", multiple=True, help="a user allowed in (repeat)")
@click.pass_obj
def access(api: Api, room_id: str, private: bool, members: tuple[str, ...]) -> None:
    """Make ROOM private to --member users (or --public again)."""
    try:
        api.call("PUT", f"/v1/admin/rooms/{room_id}/access", json={"private": private, "members": list(members)})
    except AdminError as exc:
        _fail(exc)
    click.echo(f"{room_id}: private to {', '.join(members) or 'nobody'}" if private else f"{room_id}: public")


def _report(title: str, doc: dict[str, Any]) -> None:
    _console().print(table(title, ["field", "value"], sorted(doc.items())))


@admin.command()
@click.argument("room_id", metavar="ROOM")
@click.option("--to", "to", required=True, help="target instance iM")
@click.pass_obj
def move(api: Api, room_id: str, to: str) -> None:
    """Live-move ROOM to instance iM."""
    try:
        doc = api.call("POST", f"/v1/admin/rooms/{room_id}/move", json={"to": to}, timeout=LONG_CALL_TIMEOUT_S)
    except AdminError as exc:
        _fail(exc)
    _report(f"moved {room_id}", doc)


def _room_count(api: Api, instance_id: str) -> int | None:
    try:
        return len(api.call("GET", "/v1/admin/rooms", params={"instance": instance_id}).get("rooms", []))
    except AdminError:
        return None


_PARALLELISM = click.option(
    "--parallelism", type=click.IntRange(1, 256), default=None,
    help="Moves in flight at once (directory default 32): more drains faster, each room "
         "pauses a little longer.")


def _drain(api: Api, instance_id: str, parallelism: int | None) -> None:
    """Drain with a progress bar, print the report; exit 1 when rooms failed to move."""
    try:
        total = len(api.call("GET", "/v1/admin/rooms", params={"instance": instance_id}).get("rooms", []))
    except AdminError as exc:
        _fail(exc)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            body = None if parallelism is None else {"parallelism": parallelism}
            result["doc"] = api.call("POST", f"/v1/admin/instances/{instance_id}/drain", json=body,
                                     timeout=LONG_CALL_TIMEOUT_S)
        except AdminError as exc:
            result["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    console = _console()
    with Progress(TextColumn(f"draining {instance_id}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("rooms", total=max(total, 1))
        while worker.is_alive():
            worker.join(0.25)  # poll the room count while the drain runs
            left = _room_count(api, instance_id)
            if left is not None:
                bar.update(task, completed=max(0, total - left))
        bar.update(task, completed=max(total, 1))
    if "error" in result:
        _fail(result["error"])
    doc = result.get("doc") or {}
    moves = doc.get("moves") if isinstance(doc, dict) else None
    if isinstance(moves, list):
        console.print(moves_table(f"drained {instance_id}: {len(moves)} room(s) moved", moves))
        rest = {k: v for k, v in doc.items() if k not in ("moves", "failed")}
        if rest:
            _report("drain report", rest)
    else:
        _report(f"drained {instance_id}", doc)
    _exit_on_failures(f"drain of {instance_id}", doc)


@admin.command()
@click.argument("instance_id", metavar="iN")
@_PARALLELISM
@click.pass_obj
def drain(api: Api, instance_id: str, parallelism: int | None) -> None:
    """Live-move every room off iN, then disable it (progress shown while rooms leave)."""
    _drain(api, instance_id, parallelism)


def _probe(http: httpx.Client, url: str) -> tuple[int | None, Any]:
    try:
        resp = http.get(url)
    except httpx.HTTPError:
        return None, None
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, None


@admin.command()
@click.argument("instance_id", metavar="iN")
@_PARALLELISM
@click.option("--route-timeout", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="seconds to wait for the load balancer to drop iN's route (0: do not wait)")
@click.pass_obj
def retire(api: Api, instance_id: str, parallelism: int | None, route_timeout: float) -> None:
    """Take iN out for good: drain it, remove it from the registry, and wait until the load
    balancer no longer routes it (the reconciler drops the route of a removed instance).
    Then its process or machine can be stopped; its heartbeats cannot register it again."""
    try:
        view = api.call("GET", f"/v1/admin/instances/{instance_id}")
    except AdminError as exc:
        _fail(exc)
    route = view.get("route_url") if isinstance(view, dict) else None
    probe = None if route is None else route_probe_url(route)
    with httpx.Client(timeout=5.0, follow_redirects=False) as http:
        # Which process the route reaches now: once another one (or none) answers, it is gone.
        status, body = (None, None) if probe is None else _probe(http, probe)
        boot_id = body.get("boot_id") if status == 200 and isinstance(body, dict) \
            and body.get("instance") == instance_id else None
        _drain(api, instance_id, parallelism)
        try:
            api.call("DELETE", f"/v1/admin/instances/{instance_id}")
        except AdminError as exc:
            _fail(exc)
        click.echo(f"removed {instance_id} from the registry")
        if probe is None:
            click.echo(f"{instance_id} has no route_url (no public_base, no ROOMSHARD_PUBLIC_URL "
                       "on the directory): not waiting for a load balancer")
        elif route_timeout > 0:
            click.echo(f"waiting for the load balancer to drop {route} (GET {probe})")
            deadline = time.monotonic() + route_timeout
            while True:
                status, body = _probe(http, probe)
                if route_gone(status, body, instance=instance_id, boot_id=boot_id):
                    click.echo(f"the load balancer no longer routes {route} to it "
                               f"(it answered {status})")
                    break
                if time.monotonic() > deadline:
                    _fail(AdminError(
                        f"the load balancer still routes {route} after {route_timeout:.0f}s "
                        f"(it answered {status or 'nothing'}): is the rules reconciler "
                        "(`roomshard rules ... --watch`) running?"))
                time.sleep(0.5)
    click.echo(f"retired {instance_id}: no room and no route left; stop its process")


def _exit_on_failures(what: str, doc: dict[str, Any]) -> None:
    """A report that lists failed rooms (or says it is not complete) ends with exit 1."""
    failed = doc.get("failed") if isinstance(doc, dict) else None
    if failed:
        _console().print(table("failed", ["room", "error"],
                               ([f.get("room"), f.get("error")] if isinstance(f, dict) else [f, ""]
                                for f in failed)))
    if failed or (isinstance(doc, dict) and doc.get("complete") is False):
        _fail(AdminError(f"{what} incomplete: {len(failed or [])} room(s) failed"))


@admin.command()
@click.option("--max-moves", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--dry-run", is_flag=True, help="only show the plan")
@click.option("--yes", "-y", is_flag=True, help="do not ask before moving rooms")
@click.pass_obj
def rebalance(api: Api, max_moves: int, dry_run: bool, yes: bool) -> None:
    """Plan the fewest moves that even out the load; show them and ask before moving."""
    console = _console()
    try:
        plan = api.call("POST", "/v1/admin/rebalance", json={"dry_run": True, "max_moves": max_moves})
    except AdminError as exc:
        _fail(exc)
    moves = plan.get("moves", [])
    if moves:
        console.print(moves_table(f"rebalance plan: {len(moves)} move(s)", moves))
    for key in ("before", "after"):
        if isinstance(plan.get(key), dict):
            console.print(load_table(f"load {key}", plan[key]))
    if not moves:
        click.echo("the load is already balanced; nothing to do")
        return
    if dry_run:
        return
    if not yes and not click.confirm(f"move {len(moves)} room(s) now?", default=False):
        click.echo("nothing moved")
        return
    try:
        done = api.call("POST", "/v1/admin/rebalance", json={"dry_run": False, "max_moves": max_moves},
                        timeout=LONG_CALL_TIMEOUT_S)
    except AdminError as exc:
        _fail(exc)
    console.print(moves_table(f"rebalanced: {len(done.get('moves', []))} move(s) done", done.get("moves", [])))
    if isinstance(done.get("after"), dict):
        console.print(load_table("load after", done["after"]))
    _exit_on_failures("rebalance", done)
