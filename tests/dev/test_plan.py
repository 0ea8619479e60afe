"""Pure parts of `roomshard dev`: port plan, secrets, child environment, banner."""

from __future__ import annotations

import socket
from pathlib import Path

from roomshard.cli.dev import (
    banner,
    child_env,
    dev_secrets,
    nginx_binary,
    nginx_main_conf,
    plan_ports,
    port_in_use,
)


def test_ports_follow_the_contract_layout() -> None:
    """The directory is on --port and shard iK on --port + K."""
    plan = plan_ports(8080, 3, router=False)
    assert plan.directory == 8080 and plan.shards == {"i1": 8081, "i2": 8082, "i3": 8083}
    assert plan.router is None and plan.fixed() == [8080, 8081, 8082, 8083]


def test_router_takes_the_port_and_the_directory_moves_past_the_shards() -> None:
    """With --router the router answers on --port, the directory on --port + N + 1."""
    plan = plan_ports(9000, 2, router=True)
    assert (plan.router, plan.directory, plan.shards) == (9000, 9003, {"i1": 9001, "i2": 9002})


def test_port_zero_lets_every_process_pick() -> None:
    """--port 0 plans 0 for everyone (each child reports its real port)."""
    plan = plan_ports(0, 2, router=False)
    assert plan.directory == 0 and set(plan.shards.values()) == {0} and plan.fixed() == []


def test_secrets_come_from_env_then_store_then_new() -> None:
    """A set variable wins, a stored value is reused, only a missing one is generated."""
    made = iter(["new1", "new2"])
    got = dev_secrets({"ROOMSHARD_ADMIN_TOKEN": "env"}, {"ROOMSHARD_CLUSTER_SECRET": "stored"},
                      make=lambda: next(made))
    assert got == {"ROOMSHARD_ADMIN_TOKEN": "env", "ROOMSHARD_CLUSTER_SECRET": "stored"}
    assert dev_secrets({}, {}, make=lambda: next(made))["ROOMSHARD_ADMIN_TOKEN"] == "new1"


def test_child_env_defaults_to_open_auth_and_sqlite_under_the_data_dir(tmp_path: Path) -> None:
    """Children get open auth, an SQLite file in the data dir and the secrets; user settings win."""
    creds = {"ROOMSHARD_ADMIN_TOKEN": "a", "ROOMSHARD_CLUSTER_SECRET": "c"}
    env = child_env({"PATH": "/bin"}, data_dir=tmp_path, creds=creds, public_url=None)
    assert env["ROOMSHARD_AUTH"] == "open" and env["ROOMSHARD_ADMIN_TOKEN"] == "a"
    assert env["ROOMSHARD_DATABASE_URL"] == f"sqlite+aiosqlite:///{tmp_path.resolve() / 'roomshard.db'}"
    assert "ROOMSHARD_PUBLIC_URL" not in env
    env = child_env({"ROOMSHARD_AUTH": "jwt"}, data_dir=tmp_path, creds=creds, public_url="ws://h:1")
    assert env["ROOMSHARD_AUTH"] == "jwt" and env["ROOMSHARD_PUBLIC_URL"] == "ws://h:1"
    # The message store: a SQLite file in the data dir unless told otherwise.
    assert env["ROOMSHARD_HISTORY_URL"] == f"sqlite+aiosqlite:///{tmp_path.resolve() / 'messages.db'}"
    env = child_env({"ROOMSHARD_HISTORY_URL": "postgresql://db/x"}, data_dir=tmp_path,
                    creds=creds, public_url=None)
    assert env["ROOMSHARD_HISTORY_URL"] == "postgresql://db/x"
    env = child_env({"ROOMSHARD_HISTORY_URL": "postgresql://db/x"}, data_dir=tmp_path,
                    creds=creds, public_url=None, history="memory")
    assert env["ROOMSHARD_HISTORY_URL"] == "memory"


def test_banner_names_the_page_the_token_and_next_steps(tmp_path: Path) -> None:
    """The banner prints the chat page, the admin token and commands to try."""
    text = banner(page_url="http://127.0.0.1:8080/", directory_url="http://127.0.0.1:8080",
                  shard_urls={"i1": "http://127.0.0.1:8081"}, admin_token="tok",
                  data_dir=tmp_path, router_url=None)
    assert "chat page:   http://127.0.0.1:8080/" in text and "admin token: tok" in text
    assert "roomshard chat lobby --user alice --directory-url http://127.0.0.1:8080" in text
    assert "curl -s -X POST http://127.0.0.1:8080/v1/rooms/lobby/connect" in text


def test_port_in_use_detects_a_bound_port() -> None:
    """A listening socket makes the port busy; a released one is free."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_nginx_main_conf_includes_the_rules_and_keeps_files_in_the_data_dir(tmp_path: Path) -> None:
    """The wrapper runs in the foreground and writes pid, logs and temp files under the prefix."""
    conf = nginx_main_conf(tmp_path / "roomshard.conf", tmp_path)
    assert "daemon off;" in conf and f"include {tmp_path / 'roomshard.conf'};" in conf
    assert f"pid {tmp_path / 'nginx.pid'};" in conf and f"proxy_temp_path {tmp_path / 'tmp' / 'proxy'};" in conf


def test_nginx_binary_is_looked_up_on_the_path(tmp_path: Path) -> None:
    """No nginx on the search path means None (dev then prints one line and exits 2)."""
    assert nginx_binary(str(tmp_path)) is None
    fake = tmp_path / "nginx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert nginx_binary(str(tmp_path)) == str(fake)


def test_banner_names_a_project_venv_script_by_its_path(tmp_path: Path) -> None:
    """A roomshard script in ./.venv is shown as .venv/bin/roomshard (not on the user's PATH)."""
    from roomshard.cli.dev import roomshard_command

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "roomshard").write_text("")
    assert roomshard_command(str(bin_dir / "python"), tmp_path) == ".venv/bin/roomshard"
    assert roomshard_command(str(bin_dir / "python"), tmp_path / "elsewhere") == "roomshard"
    assert roomshard_command("/nonexistent/bin/python", tmp_path) == "roomshard"
    text = banner(page_url="http://h/", directory_url="http://h", shard_urls={}, admin_token="t",
                  data_dir=tmp_path, router_url=None, cmd=".venv/bin/roomshard")
    assert ".venv/bin/roomshard chat lobby" in text and ".venv/bin/roomshard admin" in text
