"""`roomshard rules` from the command line: formats, files, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import t

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "instances.json"
MULTI = HERE / "fixtures" / "multi.json"


def rules(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "roomshard", "rules", *args],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          check=False, timeout=t(60))


def assert_one_line_error(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr


@pytest.mark.parametrize("fmt, golden", [("terraform", "instances.tf.json"),
                                         ("cloudformation", "instances.roomshard-rules.default.template.json")])
def test_contract_form_prints_the_golden_output(fmt, golden):
    """`roomshard rules --format X --from-file F` prints the same bytes as the golden file."""
    res = rules("--format", fmt, "--from-file", str(FIXTURE), "--name-prefix", "rs-test")
    assert res.returncode == 0, res.stderr
    assert res.stdout == (HERE / "golden" / golden).read_text()


def test_nginx_listen_flag():
    """--listen sets the nginx server's listen address."""
    res = rules("--format", "nginx", "--from-file", str(FIXTURE), "--listen", "127.0.0.1:8000")
    assert res.returncode == 0, res.stderr
    assert res.stdout == (HERE / "golden" / "instances.nginx.conf").read_text()


def test_out_dir_writes_one_template_per_group_and_the_group_map(tmp_path):
    """--out writes every file plus alb-groups.json saying which host serves which instances."""
    res = rules("--format", "cloudformation", "--from-file", str(MULTI), "--out", str(tmp_path),
                "--name-prefix", "rs-test")
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["alb-groups.json", "roomshard-rules.chat_b_example_com.template.json",
                     "roomshard-rules.chat_c_example_com_8443.template.json",
                     "roomshard-rules.default.template.json"]
    summary = json.loads((tmp_path / "alb-groups.json").read_text())
    assert summary["min_idle_timeout_s"] == 60
    groups = summary["groups"]
    assert [(g["group"], g["public_base"], g["instances"]) for g in groups] == [
        ("default", None, ["i1"]),
        ("chat_b_example_com", "wss://chat-b.example.com", ["i101", "i102"]),
        ("chat_c_example_com_8443", "wss://chat-c.example.com:8443", ["i201"])]


def test_several_groups_on_stdout_are_listed_on_stderr():
    """Terraform to stdout with several groups: the host -> instances map goes to stderr."""
    res = rules("--format", "terraform", "--from-file", str(MULTI))
    assert res.returncode == 0
    json.loads(res.stdout)
    assert "# ALB group chat_b_example_com (wss://chat-b.example.com): i101 i102" in res.stderr


@pytest.mark.parametrize("args, needle", [
    (["--from-file", str(FIXTURE)], "--format"),
    (["--format", "nginx"], "exactly one of"),
    (["--format", "nginx", "--from-file", "/nonexistent.json"], "cannot read /nonexistent.json"),
    (["--format", "terraform", "--from-file", str(FIXTURE), "--name-prefix", "-bad"], "name prefix"),
    (["--format", "nginx", "--from-file", str(FIXTURE), "--listen", "nope"], "--listen"),
    (["--format", "cloudformation", "--from-file", str(MULTI)], "use --out DIR"),
])
def test_usage_errors_are_one_line(args, needle):
    """Missing or wrong options stop with one line and exit 2."""
    assert_one_line_error(rules(*args), needle)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"instances": [{"id": "i1"}]}', "internal_url"),
    ('{"instances": [{"id": "node-1", "internal_url": "http://a:1"}]}', "not i1..i9999"),
    ('{"rooms": []}', "GET /v1/admin/instances"),
])
def test_bad_files_are_one_line(tmp_path, content, needle):
    """Bad JSON or invalid instance data in a file: one line naming the file, exit 2."""
    f = tmp_path / "instances.json"
    f.write_text(content)
    res = rules("--format", "nginx", "--from-file", str(f))
    assert_one_line_error(res, needle)
    assert str(f) in res.stderr


class _Canned(BaseHTTPRequestHandler):
    status = 200
    body = b"{}"

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[tuple[str, type[_Canned]]]:
    """A loopback HTTP server answering every GET with a settable status and body."""
    handler = type("Handler", (_Canned,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=t(5))


@pytest.mark.parametrize("status, body, needle", [
    (200, b"<html>", "not valid JSON"),
    (200, b'{"instances": [{"id": "i1", "internal_url": "ftp://x"}]}', "internal_url"),
    (500, b'{"error": {"code": "internal", "message": "boom"}}', "answered 500: boom"),
    (401, b'{"error": {"code": "unauthorized", "message": "no"}}', "refused ROOMSHARD_ADMIN_TOKEN"),
])
def test_directory_errors_are_one_line(canned, status, body, needle):
    """A directory answering garbage, an error or 401: one line, exit 2."""
    url, handler = canned
    handler.status, handler.body = status, body
    res = rules("--format", "nginx", "--from-directory", url, env={"ROOMSHARD_ADMIN_TOKEN": "x"})
    assert_one_line_error(res, needle)


def test_unreachable_directory_is_one_line(canned):
    """A directory nobody listens on: one line naming the URL, exit 2."""
    url, _ = canned
    dead = url.rsplit(":", 1)[0] + ":1"
    res = rules("--format", "nginx", "--from-directory", dead, env={"ROOMSHARD_ADMIN_TOKEN": "x"})
    assert_one_line_error(res, "cannot reach the directory")


@pytest.mark.e2e
def test_from_directory_reads_the_real_registry(procs: Procs):
    """Against a real directory: registered instances (any state) become rules; a bad token is 401."""
    directory = procs.directory()
    headers = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
    for n, state in ((1, "active"), (2, "draining"), (12, "disabled")):
        resp = httpx.put(f"{directory.url}/v1/admin/instances/i{n}", headers=headers, timeout=t(10),
                         json={"internal_url": f"http://10.0.0.{n}:8081", "state": state})
        assert resp.status_code == 200, resp.text
    res = rules("--format", "terraform", "--from-directory", directory.url,
                env={"ROOMSHARD_ADMIN_TOKEN": TEST_ADMIN_TOKEN})
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert sorted(doc["resource"]["aws_lb_listener_rule"]) == ["i1", "i12", "i2"]
    assert doc["resource"]["aws_lb_listener_rule"]["i12"]["priority"] == 1012
    res = rules("--format", "nginx", "--from-directory", directory.url,
                env={"ROOMSHARD_ADMIN_TOKEN": "wrong"})
    assert_one_line_error(res, "401")
