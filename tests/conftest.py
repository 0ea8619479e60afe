"""Fixtures shared by every test package."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from roomshard.testing.devrun import DevRun
from roomshard.testing.pg import PgServer
from roomshard.testing.procs import Procs


def _have_postgres() -> bool:
    import glob

    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL for the session (the test command installs it)."""
    if not _have_postgres():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing: run the README's test command")
        pytest.skip("PostgreSQL binaries not installed")
    server = PgServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return pg_server.create_database()


@pytest.fixture(scope="session")
def directory_pg_template(pg_server: PgServer) -> str:
    """A PostgreSQL database with the directory's schema migrated to head (once a
    session, from nothing: the migrations run on PostgreSQL in every run), the
    template of :func:`directory_pg_url`."""
    from directory.db.engine import migrate
    from roomshard.sql import make_engine

    name = "rs_directory_template"
    pg_server.sql(f'CREATE DATABASE "{name}"')

    async def build() -> None:
        engine = make_engine(pg_server.url(name))
        try:
            await migrate(engine)
        finally:
            await engine.dispose()  # a template is copied only while nobody is connected

    _run_aside(build)
    return name


@pytest.fixture(scope="session")
def directory_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite file with the directory's schema migrated to head, once a session."""
    from directory.db.engine import migrate
    from roomshard.sql import make_engine

    path = tmp_path_factory.mktemp("directory-template") / "directory.db"

    async def build() -> None:
        engine = make_engine(f"sqlite+aiosqlite:///{path}")
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    _run_aside(build)
    return path


def _run_aside(build: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``asyncio.run(build())`` in a thread of its own: a session fixture may be set up
    while a test's event loop runs."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(build())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the fixture's thread
            failed.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failed:
        raise failed[0]


@pytest.fixture
def directory_pg_url(pg_server: PgServer, directory_pg_template: str) -> str:
    """A fresh PostgreSQL database for one test, the directory's schema already at head
    (a copy of :func:`directory_pg_template`: the directory's start-up finds nothing to
    migrate)."""
    return pg_server.create_database(template=directory_pg_template)


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Real roomshard processes, all stopped at the end of the test."""
    with Procs() as p:
        yield p


@pytest.fixture
def run_dev() -> Iterator[list[DevRun]]:
    """The `roomshard dev` runs a test appends here, stopped at its end."""
    runs: list[DevRun] = []
    yield runs
    for r in runs:
        r.stop()
