"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

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
