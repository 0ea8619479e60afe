"""Fixtures shared by every test package."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    name = "rs_directory_template"
    pg_server.sql(f'CREATE DATABASE "{name}"')
    _migrate(pg_server.url(name))
    return name


@pytest.fixture(scope="session")
def directory_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite file with the directory's schema migrated to head, once a session."""
    path = tmp_path_factory.mktemp("directory-template") / "directory.db"
    _migrate(f"sqlite+aiosqlite:///{path}")
    return path


def _migrate(url: str) -> None:
    """The directory's migrations on ``url``, every connection closed after them (a
    template is copied only while nobody is connected); in a thread of its own, as a
    session fixture may be set up while a test's event loop runs."""
    from directory.db.engine import migrate
    from roomshard.sql import make_engine

    async def build() -> None:
        engine = make_engine(url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    with ThreadPoolExecutor(1) as aside:
        aside.submit(asyncio.run, build()).result()


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
