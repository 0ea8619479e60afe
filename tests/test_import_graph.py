"""The import graph of the installed packages: no cycle anywhere, and imports point one way.

The graph is grimp's (every ``import`` statement, those under
``if TYPE_CHECKING:`` and inside functions included). docs/ARCHITECTURE.md
states the rule: composition on top, I/O adapters below it, the pure core at
the bottom; a module imports its own layer and the layers below, never above.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("roomshard", "shard", "directory", "router_rules")
SERVICES = ("shard", "directory", "router_rules")

#: Composition roots: processes and their wiring. Only composition imports them.
COMPOSITION = ("roomshard.__main__", "roomshard.cli", "directory.main", "directory.app",
               "shard.main", "shard.server", "router_rules.cli")

#: What the services may use of ``roomshard``: the shared bottom, and the adapters both
#: services use (the lingering close, the SQL engine, the message store).
SHARED_BOTTOM = ("roomshard.wire", "roomshard.config", "roomshard.urls", "roomshard.linger",
                 "roomshard.batching",
                 "roomshard.sql", "roomshard.store")

#: The shard's layers, top first (docs/ARCHITECTURE.md).
SHARD_LAYERS: tuple[tuple[str, ...], ...] = (
    # composition: builds the parts and hands each the state it needs
    ("shard.main", "shard.server"),
    # the parts that hold the shard's state, given what they need
    ("shard.live_rooms", "shard.metrics", "shard.routes", "shard.handoff_routes"),
    # I/O: sockets, the write scheduler, the directory client
    ("shard.connection", "shard.writer", "shard.directory_client", "shard.lifecycle"),
    # pure: never awaits, never reads the clock, never touches a socket
    ("shard.room", "shard.frames", "shard.ratelimit", "shard.handoff", "shard.stats",
     "shard.http", "shard.handshake", "shard.admission", "shard.reader"),
)

#: The directory's layers, top first, by package or module (docs/ARCHITECTURE.md).
DIRECTORY_LAYERS: tuple[tuple[str, ...], ...] = (
    # composition: the app factory and the process
    ("directory.main", "directory.app"),
    # the HTTP edge: routes, the caller checks, responses
    ("directory.http",),
    # the per-app state every route reads
    ("directory.context",),
    # operations: the move driver, drains, rebalances
    ("directory.ops",),
    # I/O adapters: the database, the shard client, metrics
    ("directory.db", "directory.shards", "directory.metrics"),
    # pure: placement, instance rules, moves, plans, budgets, errors, the API's bodies
    ("directory.domain",),
)

#: Libraries that do I/O: the pure layers never import them (websockets is used sans I/O there).
IO_LIBRARIES = ("asyncio", "sqlalchemy", "httpx", "starlette", "uvicorn", "socket", "alembic",
                "asyncpg", "aiosqlite", "boto3", "subprocess")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            targets = edges.get(node, [])
            if i < len(targets):
                work.append((node, i + 1))
                target = targets[i]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if work:  # back in the caller: pass the low link up
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_behind_type_checking():
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c", "p.d"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")  # e.g. under `if TYPE_CHECKING:`
    g.add_import(importer="p.d", imported="p.a")
    assert cycles(g) == [["p.a", "p.b", "p.c"]]
    g.remove_import(importer="p.c", imported="p.a")
    assert cycles(g) == []


def test_no_import_cycle_in_any_package(graph):
    assert cycles(graph) == []


def test_every_shard_module_has_a_layer(graph):
    placed = {m for layer in SHARD_LAYERS for m in layer}
    modules = {m for m in graph.find_descendants("shard")}
    assert modules - placed == set(), "put the new module in a layer of SHARD_LAYERS"
    assert placed - modules == set()


def test_shard_imports_point_down(graph):
    rank = {m: i for i, layer in enumerate(SHARD_LAYERS) for m in layer}
    upward = [(m, imported) for m in rank for imported in graph.find_modules_directly_imported_by(m)
              if imported in rank and rank[imported] < rank[m]]
    assert upward == [], "a shard module imports a layer above its own"


def test_the_wire_package_is_the_bottom(graph):
    """What crosses the wire is defined below both services: it imports none of ours."""
    wire = {"roomshard.wire", *graph.find_descendants("roomshard.wire")}
    assert len(wire) >= 3
    outside = [(m, imported) for m in wire for imported in graph.find_modules_directly_imported_by(m)
               if imported not in wire]
    assert outside == []


def test_both_services_use_the_wire_definitions(graph):
    """One definition per body: the shard and the directory both import them."""
    assert graph.direct_import_exists(importer="shard.directory_client",
                                      imported="roomshard.wire.internal")
    assert graph.direct_import_exists(importer="directory.http.internal",
                                      imported="roomshard.wire.internal")
    assert graph.direct_import_exists(importer="shard.http", imported="roomshard.wire.errors")
    assert graph.direct_import_exists(importer="directory.http.edge",
                                      imported="roomshard.wire.errors")


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _ours(module: str) -> bool:
    return _within(module, PACKAGES)


def test_nothing_imports_a_composition_root(graph):
    assert all(m in graph.modules for m in COMPOSITION)
    upward = [(m, imported) for m in graph.modules if not _within(m, COMPOSITION)
              for imported in graph.find_modules_directly_imported_by(m)
              if _within(imported, COMPOSITION)]
    assert upward == [], "only the command line and the app factories import a composition root"


def test_the_services_use_only_the_shared_bottom_of_roomshard(graph):
    used = [(m, imported) for m in graph.modules if _within(m, SERVICES)
            for imported in graph.find_modules_directly_imported_by(m)
            if _within(imported, ("roomshard",)) and not _within(imported, SHARED_BOTTOM)]
    assert used == [], "a service imports the client, the CLI or the test helpers"


def test_the_shared_bottom_imports_no_service(graph):
    up = [(m, imported) for m in graph.modules if _within(m, SHARED_BOTTOM)
          for imported in graph.find_modules_directly_imported_by(m)
          if _ours(imported) and not _within(imported, SHARED_BOTTOM)]
    assert up == []


@pytest.mark.parametrize("package", ["roomshard.client", "roomshard.testing"])
def test_the_client_and_the_test_helpers_speak_only_the_wire(graph, package):
    """They reach the services over the network and through processes, never by import."""
    reached = [(m, imported) for m in graph.modules if _within(m, (package,))
               for imported in graph.find_modules_directly_imported_by(m)
               if _ours(imported) and not _within(imported, (package, "roomshard.wire"))]
    assert reached == []


def test_bench_and_tests_share_helpers_through_roomshard_testing():
    """``bench/`` never imports ``tests/`` (the shared helpers live in roomshard.testing)."""
    g = grimp.build_graph("bench", "tests", *PACKAGES, cache_dir=None)
    assert "bench.handoff" in g.modules and "tests.conftest" in g.modules
    found = [(m, imported) for m in g.find_descendants("bench")
             for imported in g.find_modules_directly_imported_by(m) if _within(imported, ("tests",))]
    assert found == []


def _directory_rank(module: str) -> int | None:
    for i, layer in enumerate(DIRECTORY_LAYERS):
        if _within(module, layer):
            return i
    return None


def test_every_directory_module_has_a_layer(graph):
    modules = {m for m in graph.find_descendants("directory")}
    assert modules, "the directory package is empty?"
    assert {m for m in modules if _directory_rank(m) is None} == set(), \
        "put the new module in a layer of DIRECTORY_LAYERS"


def test_directory_imports_point_down(graph):
    upward = []
    for m in graph.find_descendants("directory"):
        rank = _directory_rank(m)
        for imported in graph.find_modules_directly_imported_by(m):
            theirs = _directory_rank(imported)
            if rank is not None and theirs is not None and theirs < rank:
                upward.append((m, imported))
    assert upward == [], "a directory module imports a layer above its own"


def test_the_pure_layers_import_no_io_library():
    g = grimp.build_graph(*PACKAGES, cache_dir=None, include_external_packages=True)
    pure = [m for m in g.modules if _within(m, ("directory.domain", "roomshard.wire"))
            or m in SHARD_LAYERS[-1]]
    assert len(pure) > 15
    found = [(m, imported) for m in pure for imported in g.find_modules_directly_imported_by(m)
             if imported.split(".")[0] in IO_LIBRARIES]
    assert found == []
