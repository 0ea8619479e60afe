"""The ``roomshard`` command line.

Subcommands live next to the code they drive and are imported lazily, so
``roomshard rules`` does not pay for the shard's imports and a broken optional
dependency of one command cannot break the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import click

from roomshard.config import ConfigError, DirectoryConfig, ShardConfig, click_options, load

LAZY_COMMANDS = {
    "dev": ("roomshard.devcluster", "dev"),
    "rules": ("router_rules.cli", "rules"),
    "admin": ("roomshard.admin_cli", "admin"),
    "chat": ("roomshard.client.chat_cli", "chat"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [n for n in LAZY_COMMANDS if importlib.util.find_spec(LAZY_COMMANDS[n][0]) is not None]
        return sorted([*super().list_commands(ctx), *names])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name]
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
                return None  # not built into this installation
            cmd: click.Command = getattr(mod, attr)
            return cmd
        return super().get_command(ctx, name)


def fail(message: str) -> None:
    """Stop with one clear line (exit 2), never a traceback."""
    click.echo(f"roomshard: {message}", err=True)
    sys.exit(2)


def load_or_exit(cls: type, flags: dict[str, Any]) -> Any:
    try:
        return load(cls, flags, os.environ)
    except ConfigError as exc:
        fail(str(exc))


@click.group(cls=LazyGroup)
@click.version_option(package_name="roomshard")
def main() -> None:
    """roomshard: room-sharded WebSocket chat."""


@main.command()
@click_options(DirectoryConfig)
def directory(**flags: Any) -> None:
    """Run one directory process (rooms -> instances, tickets, admin API)."""
    cfg = load_or_exit(DirectoryConfig, flags)
    from directory.main import run

    run(cfg)


@main.command()
@click_options(ShardConfig)
def shard(**flags: Any) -> None:
    """Run one shard process (owns its rooms in memory)."""
    cfg = load_or_exit(ShardConfig, flags)
    from shard.main import run

    run(cfg)


if __name__ == "__main__":  # pragma: no cover
    main()
