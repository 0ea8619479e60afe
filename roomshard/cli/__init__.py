"""The ``roomshard`` command line: the top of the stack.

``roomshard directory`` and ``roomshard shard`` run one process each; the
other commands live next to this module (``dev``, ``admin``, ``chat``) or
with the code they drive (``rules``). Every command is imported when it is
called, so ``roomshard shard`` does not pay for boto3 (``rules``) or rich
(``admin``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from roomshard.config import ConfigError, DirectoryConfig, ShardConfig, click_options, load

#: name -> (module, attribute) of the commands imported when called.
LAZY_COMMANDS = {
    "dev": ("roomshard.cli.dev", "dev"),
    "rules": ("router_rules.cli", "rules"),
    "admin": ("roomshard.cli.admin", "admin"),
    "chat": ("roomshard.cli.chat", "chat"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name]
            cmd: click.Command = getattr(importlib.import_module(module), attr)
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
