"""The reconciler (``roomshard rules ... --watch``): when it applies, how it fails and
retries, what it counts; the file target with real commands; the CLI's refusals."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest

from roomshard.cli import main as cli_main
from router_rules.registry import Instance, RegistryError, parse_instance
from router_rules.watch import (
    Reconciler,
    RenderedFile,
    SyncError,
    WatchMetrics,
    diff,
    parse_command,
)


def inst(n: int, port: int | None = None) -> Instance:
    return parse_instance({"id": f"i{n}", "internal_url": f"http://10.0.0.{n}:{port or 8000 + n}"})


class FakeTarget:
    name = "fake"

    def __init__(self) -> None:
        self.applied: list[list[str]] = []
        self.fail: SyncError | None = None

    def apply(self, instances: Sequence[Instance]) -> None:
        if self.fail is not None:
            raise self.fail
        self.applied.append([i.id for i in instances])


class Registry:
    def __init__(self, *numbers: int) -> None:
        self.instances = [inst(n) for n in numbers]
        self.error: RegistryError | None = None

    def __call__(self) -> list[Instance]:
        if self.error is not None:
            raise self.error
        return list(self.instances)


def metric(metrics: WatchMetrics, line_start: str) -> float:
    text = generate_latest(metrics.registry).decode()
    found = [ln for ln in text.splitlines() if ln.startswith(line_start)]
    assert len(found) == 1, (line_start, text)
    return float(found[0].rsplit(" ", 1)[1])


def test_diff_names_added_removed_and_changed_routes_in_number_order() -> None:
    old = {i.id: i for i in (inst(1), inst(2), inst(10))}
    new = {i.id: i for i in (inst(2, port=9999), inst(3), inst(10), inst(11))}
    changes = diff(old, new)
    assert (changes.added, changes.removed, changes.changed) == (("i3", "i11"), ("i1",), ("i2",))
    assert changes.describe() == "+i3 +i11 -i1 ~i2" and len(changes) == 4
    assert not diff(new, dict(new))


def test_applies_on_start_on_every_change_and_on_resync_only() -> None:
    now = [1000.0]
    reg, target = Registry(1, 2), FakeTarget()
    metrics = WatchMetrics("fake")
    r = Reconciler(reg, target, metrics, interval=1.0, resync=60, clock=lambda: now[0])
    assert r.step() == 1.0
    assert target.applied == [["i1", "i2"]]  # the first sync always applies
    now[0] += 1
    r.step()
    assert len(target.applied) == 1  # nothing changed: no call to the load balancer
    reg.instances.append(inst(3))
    now[0] += 1
    r.step()
    assert target.applied[-1] == ["i1", "i2", "i3"]
    assert metric(metrics, 'roomshard_rules_route_changes_total{kind="added",target="fake"}') == 1
    assert metric(metrics, 'roomshard_rules_routes{target="fake"}') == 3
    assert metric(metrics, 'roomshard_rules_last_sync_timestamp_seconds{target="fake"}') == now[0]
    now[0] += 61
    r.step()
    assert len(target.applied) == 3  # the resync repairs a load balancer changed by hand


def test_a_failure_keeps_what_was_applied_and_retries_with_growing_bounded_backoff() -> None:
    reg, target = Registry(1), FakeTarget()
    metrics = WatchMetrics("fake")
    r = Reconciler(reg, target, metrics, interval=1.0, max_backoff=8.0)
    r.step()
    reg.instances.append(inst(2))
    target.fail = SyncError("reload", "nginx -s reload exited with 1")
    delays = [r.step() for _ in range(6)]
    # Full jitter over the upper half: 2, 4, 8, 8, ... seconds, never above max_backoff.
    for delay, bound in zip(delays, [2, 4, 8, 8, 8, 8], strict=True):
        assert bound / 2 <= delay <= bound
    assert metric(metrics, 'roomshard_rules_sync_errors_total{stage="reload",target="fake"}') == 6
    assert metric(metrics, 'roomshard_rules_pending_changes{target="fake"}') == 1
    assert target.applied == [["i1"]] and r.applied is not None and list(r.applied) == ["i1"]
    target.fail = None
    assert r.step() == 1.0
    assert target.applied[-1] == ["i1", "i2"]
    assert metric(metrics, 'roomshard_rules_pending_changes{target="fake"}') == 0
    # An unreadable registry is an error too, and never empties the load balancer.
    reg.error = RegistryError("cannot reach the directory")
    r.step()
    assert target.applied[-1] == ["i1", "i2"]
    assert metric(metrics, 'roomshard_rules_sync_errors_total{stage="registry",target="fake"}') == 1


def _render(instances: Sequence[Instance]) -> str:
    return "".join(f"route {i.id}\n" for i in instances)


def _script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(body)
    return [sys.executable, str(path)]


def test_the_file_is_written_checked_and_reloaded_and_a_refused_file_is_put_back(
        tmp_path: Path) -> None:
    out = tmp_path / "conf" / "roomshard.conf"
    reloads = tmp_path / "reloads"
    reload = _script(tmp_path, "reload.py",
                     f"open({str(reloads)!r}, 'a').write(open({str(out)!r}).read() + '--\\n')\n")
    # The check refuses any file routing i13, as nginx -t refuses a broken file.
    check = _script(tmp_path, "check.py",
                    f"import sys\nsys.exit('i13 is bad' if 'i13' in open({str(out)!r}).read() else 0)\n")
    target = RenderedFile(out, _render, reload_cmd=reload, check_cmd=check)
    target.apply([inst(1)])
    assert out.read_text() == "route i1\n" and reloads.read_text() == "route i1\n--\n"
    target.apply([inst(1)])
    assert reloads.read_text().count("--") == 1  # no change: no reload
    with pytest.raises(SyncError) as refused:
        target.apply([inst(1), inst(13)])
    assert refused.value.stage == "check" and "i13 is bad" in str(refused.value)
    assert out.read_text() == "route i1\n"  # what nginx serves stays what it can load
    assert reloads.read_text().count("--") == 1
    assert [p.name for p in out.parent.iterdir()] == ["roomshard.conf"]  # no temporary left


def test_a_failed_reload_is_tried_again_though_the_file_is_already_written(tmp_path: Path) -> None:
    out = tmp_path / "roomshard.conf"
    flag = tmp_path / "reload-works"
    reload = _script(tmp_path, "reload.py",
                     f"import os, sys\nsys.exit(0 if os.path.exists({str(flag)!r}) else 'not running')\n")
    target = RenderedFile(out, _render, reload_cmd=reload)
    with pytest.raises(SyncError) as failed:
        target.apply([inst(1)])
    assert failed.value.stage == "reload" and "not running" in str(failed.value)
    assert out.read_text() == "route i1\n"
    flag.touch()
    target.apply([inst(1)])  # same text, but never reloaded: reload now
    flag.unlink()
    target.apply([inst(1)])  # reloaded once already: nothing to run (it would fail)


def test_commands_are_split_like_a_shell_and_a_missing_program_is_a_sync_error(tmp_path: Path) -> None:
    assert parse_command("nginx -p '/a b' -s reload", "--reload-cmd") == ["nginx", "-p", "/a b", "-s", "reload"]
    for bad in ("", "nginx 'unclosed"):
        with pytest.raises(RegistryError):
            parse_command(bad, "--reload-cmd")
    target = RenderedFile(tmp_path / "x.conf", _render, reload_cmd=[str(tmp_path / "no-such")])
    with pytest.raises(SyncError) as missing:
        target.apply([])
    assert missing.value.stage == "reload"


@pytest.mark.parametrize(("args", "says"), [
    (["--format", "terraform", "--from-directory", "http://127.0.0.1:9", "--watch", "--out", "x"],
     "--watch works with --format nginx or kubernetes"),
    (["--format", "nginx", "--from-file", "x.json", "--watch", "--out", "x.conf"],
     "--watch follows a directory: give --from-directory URL"),
    (["--format", "nginx", "--from-directory", "http://127.0.0.1:9", "--watch"],
     "--watch needs --out FILE"),
    (["--format", "nginx", "--from-directory", "http://127.0.0.1:9", "--watch", "--out", "x.conf",
      "--reload-cmd", "nginx 'x"], "--reload-cmd"),
    (["--format", "nginx", "--from-directory", "http://127.0.0.1:9", "--watch", "--out", "x.conf",
      "--listen", "nope"], "--listen 'nope'"),
])
def test_the_cli_refuses_a_watch_it_cannot_run_in_one_line(args: list[str], says: str,
                                                           tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_main, ["rules", *args], env={"ROOMSHARD_ADMIN_TOKEN": "t"})
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output


def test_out_may_name_the_file_itself(tmp_path: Path) -> None:
    doc = tmp_path / "instances.json"
    doc.write_text('{"instances": [{"id": "i1", "internal_url": "http://10.0.0.1:8001"}]}')
    for fmt, name in (("nginx", "edge.conf"), ("kubernetes", "shards.yaml")):
        result = CliRunner().invoke(cli_main, ["rules", "--format", fmt, "--from-file", str(doc),
                                               "--out", str(tmp_path / "out" / name)])
        assert result.exit_code == 0, result.output
        assert "i1" in (tmp_path / "out" / name).read_text()
    result = CliRunner().invoke(cli_main, ["rules", "--format", "nginx", "--from-file", str(doc),
                                           "--out", str(tmp_path / "dir")])
    assert result.exit_code == 0 and (tmp_path / "dir" / "roomshard.conf").exists()
