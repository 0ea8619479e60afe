"""The JavaScript client (``js/``, npm ``roomshard``): strict TypeScript, then Node's test
runner against the package, its pure parts, a fake shard frame by frame, and a real
``roomshard dev`` cluster on loopback that the Node tests start and stop themselves.

The README's test command installs the Node packages from ``js/package-lock.json``
(``npm ci``) when they are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from roomshard.testing.timing import SCALE, t

JS = Path(__file__).resolve().parents[2] / "js"

pytestmark = [pytest.mark.e2e]


def _node_ready() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are missing: the JavaScript client's tests need Node 20+")
        pytest.skip("node and npm are not installed")
    if not (JS / "node_modules" / "typescript").is_dir():
        if os.environ.get("CI"):
            pytest.fail("js/node_modules missing: run the README's test command (it runs npm ci)")
        pytest.skip("js/node_modules missing: run scripts/test, or npm ci in js/")


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``js/`` in its own process group; on a timeout the whole group
    (the Node runner and any ``roomshard dev`` it started) is killed."""
    env = {**os.environ, "ROOMSHARD_PYTHON": sys.executable,
           "ROOMSHARD_TEST_TIME_SCALE": str(SCALE)}
    proc = subprocess.Popen(argv, cwd=JS, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout:.0f} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


@pytest.fixture(scope="module")
def built() -> None:
    """``tsc`` (strict, every extra check of js/tsconfig.json) builds dist/ with its .d.ts,
    once for the tests below."""
    _node_ready()
    done = _run(["npm", "run", "--silent", "build"], timeout=t(120))
    assert done.returncode == 0, f"npm run build:\n{done.stdout[-6000:]}"
    assert (JS / "dist" / "index.d.ts").is_file() and (JS / "dist" / "index.js").is_file()


def test_the_package_typechecks_in_strict_mode(built: None) -> None:
    """The sources under ``tsc --noEmit`` (strict), and an application's use of the public
    types (js/test/consumer.ts) against the built .d.ts."""
    done = _run(["npm", "run", "--silent", "typecheck"], timeout=t(120))
    assert done.returncode == 0, f"npm run typecheck:\n{done.stdout[-6000:]}"


@pytest.mark.timeout(600)
def test_node_test_runner_passes_against_a_real_cluster(built: None) -> None:
    """``node --test``: the close-code table, backoff, outbox and inbox; the session against
    a fake shard (every close code, resends, 401 refresh, Retry-After, rate limits,
    offline); and against ``roomshard dev`` (send/ack, presence, resume with and without a
    gap, refusals, a live move and a drain mid-conversation with no loss or duplicate; a
    SIGKILL of the room's shard with its gap announced; a slow consumer closed with 4009
    that resumes without loss; JWT refresh after a 401)."""
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    assert files, "no Node test files"
    # Files in parallel: each cluster test file starts its own roomshard dev on free ports.
    done = _run(["node", "--test", "--test-concurrency=4", f"--test-timeout={int(t(120) * 1000)}",
                 *files], timeout=t(480))
    summary = [line for line in done.stdout.splitlines() if line.startswith(("# pass", "# fail"))]
    assert done.returncode == 0 and "# fail 0" in summary, done.stdout[-8000:]
    assert int(summary[0].split()[-1]) >= 23, summary


def test_npm_pack_makes_a_package_an_app_installs_and_imports(built: None, tmp_path: Path) -> None:
    """``npm pack`` writes a tarball with the built module, its types and sources; an app
    installs it (no registry needed: no runtime dependency) and imports ``connect``."""
    done = _run(["npm", "pack", "--silent", "--ignore-scripts", "--pack-destination", str(tmp_path)],
                timeout=t(120))
    assert done.returncode == 0, done.stdout[-4000:]
    tarball = next(tmp_path.glob("roomshard-*.tgz"))
    listing = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True, check=True)
    files = set(listing.stdout.split())
    assert {"package/dist/index.js", "package/dist/index.d.ts", "package/src/session.ts",
            "package/README.md", "package/package.json"} <= files, sorted(files)
    assert not any("/test/" in f or "node_modules" in f for f in files), sorted(files)
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "private": true, "type": "module"}\n')
    install = subprocess.run(["npm", "install", "--offline", "--no-audit", "--no-fund", str(tarball)],
                             cwd=app, capture_output=True, text=True, timeout=t(120), check=False)
    assert install.returncode == 0, install.stdout + install.stderr
    check = subprocess.run(
        ["node", "--input-type=module", "-e",
         ("import * as rs from 'roomshard'; console.log(typeof rs.connect, typeof rs.Session, "
          "rs.CloseCode.ROOM_MOVED, rs.decide(4010).moving)")],
        cwd=app, capture_output=True, text=True, timeout=t(60), check=False)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["function", "function", "4010", "true"], check.stdout


def test_the_chat_page_serves_the_package_as_built_from_its_sources(tmp_path: Path) -> None:
    """The modules the directory serves to the chat page (directory/http/static/roomshard/)
    are exactly what ``npm run build:page`` makes of js/src: the page and the package never
    drift. After editing js/src, run ``npm run build:page`` in js/ and commit the result."""
    _node_ready()
    done = _run(["npx", "tsc", "-p", "tsconfig.page.json", "--outDir", str(tmp_path)], timeout=t(120))
    assert done.returncode == 0, done.stdout[-4000:]
    served = JS.parent / "directory" / "http" / "static" / "roomshard"
    built = {p.name: p.read_bytes() for p in tmp_path.glob("*.js")}
    committed = {p.name: p.read_bytes() for p in served.glob("*.js")}
    assert sorted(committed) == sorted(built), "run npm run build:page in js/"
    stale = [name for name in built if built[name] != committed[name]]
    assert not stale, f"directory/http/static/roomshard/ is stale ({stale}): run npm run build:page in js/"
