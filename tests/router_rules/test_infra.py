"""infra/: Terraform module, CloudFormation templates, systemd units and the nginx example."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import t, wait_until
from roomshard.wire.protocol import DEFAULT_PING_INTERVAL_S
from router_rules.model import RULE_PRIORITY_BASE
from tests.router_rules.nginx_proc import Nginx

INFRA = Path(__file__).parents[2] / "infra"
TF = INFRA / "terraform"
CFN = INFRA / "cloudformation"
SYSTEMD = INFRA / "systemd"


def _tf_text() -> str:
    return "\n".join(p.read_text() for p in sorted(TF.glob("*.tf")))


# No checkpoint call home: tests only talk to loopback.
TF_ENV = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}
needs_terraform = pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform not on PATH")


def terraform(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["terraform", *args], cwd=cwd, env=TF_ENV, check=False,
                          capture_output=True, text=True, timeout=t(60))


@needs_terraform
def test_terraform_module_is_formatted():
    """`terraform fmt -check` passes (providers cannot be downloaded here, so no validate)."""
    res = terraform("fmt", "-check", "-recursive", str(TF), cwd=TF)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_terraform
def test_terraform_parses_the_module_and_the_generated_json(tmp_path):
    """`terraform providers` (which parses every file, needing no provider) accepts them all."""
    res = terraform("providers", "-no-color", cwd=TF)
    assert res.returncode == 0, res.stderr
    golden = sorted((Path(__file__).parent / "golden").glob("*.tf.json"))
    assert golden
    for path in golden:
        work = tmp_path / path.stem
        work.mkdir()
        (work / "rules.tf.json").write_text(path.read_text())
        res = terraform("providers", "-no-color", cwd=work)
        assert res.returncode == 0, res.stderr
        assert "hashicorp/aws" in res.stdout


@needs_terraform
def test_terraform_parse_check_can_fail(tmp_path):
    """The parse check is not a no-op: an unknown variable argument is refused."""
    doc = json.loads((Path(__file__).parent / "golden" / "instances.tf.json").read_text())
    doc["variable"]["vpc_id"]["bogus"] = 1
    (tmp_path / "rules.tf.json").write_text(json.dumps(doc))
    res = terraform("providers", "-no-color", cwd=tmp_path)
    assert res.returncode != 0 and "bogus" in res.stderr


def test_terraform_references_are_declared():
    """Every var.X is a declared variable, every file()/templatefile() path exists."""
    text = _tf_text()
    declared = set(re.findall(r'^variable "([a-z_]+)"', text, flags=re.MULTILINE))
    used = set(re.findall(r"\bvar\.([a-z_]+)", text))
    assert used <= declared, used - declared
    for rel in re.findall(r'(?:file|templatefile)\("\$\{path\.module\}/([^"]+)"', text):
        assert (TF / rel).exists(), rel
    # templatefile() gets exactly the variables the template uses.
    template = (TF / "templates" / "user_data.sh.tftpl").read_text()
    loop_vars = set(re.findall(r"%\{ for (\w+) in", template))
    used_in_template = (set(re.findall(r"\$\{([a-z_]+)", template)) | set(
        re.findall(r"%\{ (?:if|for \w+ in) ([a-z_]+)", template))) - loop_vars
    # Each call is merge(local.BASE, {...}); a local may merge another one in turn.
    def keys(block: str) -> set[str]:
        return set(re.findall(r"^\s+([a-z_]+)\s+=", block, flags=re.MULTILINE))

    base = re.search(r"^  user_data_base = \{(.*?)\n  \}", text, re.MULTILINE | re.DOTALL)
    assert base is not None
    locals_ = {"user_data_base": keys(base.group(1))}
    for name, parent, block in re.findall(
            r"^  (\w+) += merge\(local\.(\w+), \{(.*?)\}\)$", text, re.MULTILINE):
        locals_[name] = locals_[parent] | set(re.findall(r"(\w+) =", block))
    calls = re.findall(r"templatefile\([^,]+, merge\(local\.(\w+), \{(.*?)\n  \}\)\)",
                       text, flags=re.DOTALL)
    assert len(calls) == 3  # the directories, the fixed shards, the Auto Scaling group's
    for parent, block in calls:
        given = locals_[parent] | keys(block)
        assert used_in_template <= given, used_in_template - given


def test_terraform_alb_facts():
    """Idle timeout >= 2 pings, fixed 404 default, infra priorities below the shards' 1000 + N."""
    text = _tf_text()
    default = int(re.search(r'variable "idle_timeout" \{.*?default\s+=\s+(\d+)', text, re.DOTALL).group(1))
    assert default >= 2 * DEFAULT_PING_INTERVAL_S
    https = re.search(r'resource "aws_lb_listener" "https" \{(.*?)\n\}', text, re.DOTALL).group(1)
    assert 'type = "fixed-response"' in https and 'status_code  = "404"' in https
    priorities = [int(p) for p in re.findall(r"priority\s+=\s+(\d+)", text)]
    assert priorities and all(p < RULE_PRIORITY_BASE for p in priorities)
    assert 'values = ["/v1/*", "/", "/openapi.json", "/static/*", "/healthz"]' in text


def _load(name: str) -> dict:
    return yaml.safe_load((CFN / name).read_text())


def test_cloudformation_base_alb_facts():
    """base.yaml: idle timeout >= 2 pings, fixed 404 default, listener ARN exported, priorities < 1000."""
    doc = _load("base.yaml")
    assert doc["Parameters"]["IdleTimeout"]["Default"] >= 2 * DEFAULT_PING_INTERVAL_S
    assert doc["Parameters"]["IdleTimeout"]["MinValue"] >= 2 * DEFAULT_PING_INTERVAL_S
    res = doc["Resources"]
    (default,) = res["HttpsListener"]["Properties"]["DefaultActions"]
    assert default["FixedResponseConfig"]["StatusCode"] == "404"
    rules = [r["Properties"]["Priority"] for r in res.values()
             if r["Type"] == "AWS::ElasticLoadBalancingV2::ListenerRule"]
    assert rules and all(p < RULE_PRIORITY_BASE for p in rules)
    assert doc["Outputs"]["ListenerArn"]["Value"] == {"Ref": "HttpsListener"}


@pytest.mark.parametrize("template, path, unit", [
    ("base.yaml", ("DirectoryLaunchTemplate", "LaunchTemplateData"), "roomshard-directory.service"),
    ("shard.yaml", ("Shard",), "roomshard-shard@.service"),
    ("shard-group.yaml", ("ShardLaunchTemplate", "LaunchTemplateData"), "roomshard-shard@.service"),
])
def test_templates_embed_the_systemd_units_verbatim(template, path, unit):
    """The units inside CloudFormation user data are exact copies of infra/systemd."""
    props = _load(template)["Resources"][path[0]]["Properties"]
    for key in path[1:]:
        props = props[key]
    sub = props["UserData"]["Fn::Base64"]["Fn::Sub"]
    script = sub[0] if isinstance(sub, list) else sub
    embedded = re.search(r"<<'UNIT'\n(.*?)UNIT\n", script, re.DOTALL).group(1)
    assert embedded == (SYSTEMD / unit).read_text()


def _verify_units(tmp_path: Path, extra: str = "") -> str:
    roomshard = shutil.which("roomshard") or "/bin/true"
    for unit in ("roomshard-directory.service", "roomshard-shard@.service",
                 "roomshard-alb-rules.service"):
        text = (SYSTEMD / unit).read_text().replace("/opt/roomshard/venv/bin/roomshard", roomshard)
        (tmp_path / unit).write_text(text + extra)
    (tmp_path / "roomshard-shard@i1.service").write_text((tmp_path / "roomshard-shard@.service").read_text())
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "roomshard-directory.service"),
                          str(tmp_path / "roomshard-shard@i1.service"),
                          str(tmp_path / "roomshard-alb-rules.service")],
                         capture_output=True, text=True, check=False, timeout=t(60))
    return (res.stdout + res.stderr).strip()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify_clean(tmp_path):
    """`systemd-analyze verify` has nothing to say about the units (and does flag a bad key)."""
    assert _verify_units(tmp_path) == ""
    bad = tmp_path / "bad"
    bad.mkdir()
    assert "Unknown key" in _verify_units(bad, "[Service]\nNoSuchKey=1\n")


def test_shard_unit_stops_gracefully_within_the_drain_budget():
    """SIGTERM, and TimeoutStopSec longer than the shutdown timeout the env files set."""
    unit = (SYSTEMD / "roomshard-shard@.service").read_text()
    assert "KillSignal=SIGTERM" in unit
    stop = int(re.search(r"TimeoutStopSec=(\d+)s", unit).group(1))
    shutdown = int(re.search(r"ROOMSHARD_SHUTDOWN_TIMEOUT=(\d+)",
                             (SYSTEMD / "shard-i1.env.example").read_text()).group(1))
    assert stop > shutdown
    assert "EnvironmentFile=/etc/roomshard/shard-%i.env" in unit
    assert f"ROOMSHARD_SHUTDOWN_TIMEOUT={shutdown}" in (CFN / "shard.yaml").read_text()
    assert f"ROOMSHARD_SHUTDOWN_TIMEOUT={shutdown}" in (TF / "compute.tf").read_text()


def test_the_shard_group_waits_for_its_shards_to_leave():
    """Terraform and CloudFormation: the termination hook's name is the one the shards are
    given, it waits longer than a shard's whole stop, the machines run `--instance auto`
    with IMDSv2, and the reconciler runs on one directory machine with its permissions."""
    text = _tf_text()
    group = (TF / "autoscaling.tf").read_text()
    assert 'name                 = "${var.name}-shard-drain"' in group
    assert '"ROOMSHARD_ASG_LIFECYCLE_HOOK=${var.name}-shard-drain"' in group
    assert 'lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"' in group
    assert "shard_group_hook_timeout = 3 * var.shard_group_shutdown_timeout" in group
    assert 'instance       = "auto"' in group and 'http_tokens   = "required"' in group
    assert 'rules_listener = count.index == 0 ? aws_lb_listener.https.arn : ""' in text
    assert '"autoscaling:CompleteLifecycleAction"' in group
    assert '"elasticloadbalancing:CreateRule"' in (TF / "reconciler.tf").read_text()

    doc = _load("shard-group.yaml")
    params, res = doc["Parameters"], doc["Resources"]
    assert params["HookTimeout"]["Default"] >= 3 * params["ShutdownTimeout"]["Default"]
    (hook,) = res["ShardGroup"]["Properties"]["LifecycleHookSpecificationList"]
    assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["LifecycleHookName"] == {"Fn::Sub": "${AWS::StackName}-shard-drain"}
    script = res["ShardLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"][
        "Fn::Base64"]["Fn::Sub"][0]
    assert "ROOMSHARD_ASG_LIFECYCLE_HOOK=${AWS::StackName}-shard-drain" in script
    assert "roomshard-shard@auto.service" in script
    actions = {a for st in res["ShardRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
               for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert "autoscaling:CompleteLifecycleAction" in actions
    # The shard's stop must fit: the unit's stop timeout is above ROOMSHARD_SHUTDOWN_TIMEOUT.
    unit_stop = int(re.search(r"TimeoutStopSec=(\d+)s", (SYSTEMD / "roomshard-shard@.service")
                              .read_text()).group(1))
    assert unit_stop > params["ShutdownTimeout"]["Default"]


@pytest.mark.nginx
@pytest.mark.e2e
def test_nginx_watch_script_writes_checks_and_keeps_the_previous_file(procs: Procs, tmp_path: Path):
    """rules-watch.sh (the systemd service's command): writes and reloads on a change, and
    when the real `nginx -t` refuses a new file, puts the old one back and says so."""
    directory = procs.directory()
    admin = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
    httpx.put(f"{directory.url}/v1/admin/instances/i1", headers=admin, timeout=t(10),
              json={"internal_url": "http://127.0.0.1:9"}).raise_for_status()
    rules_dir = tmp_path / "rules"
    nginx = Nginx(tmp_path / "nginx")
    (tmp_path / "nginx").mkdir()
    marker = tmp_path / "reloads"
    ready = tmp_path / "ready.json"
    env = {**os.environ, "ROOMSHARD_DIRECTORY_URL": directory.url,
           "ROOMSHARD_ADMIN_TOKEN": TEST_ADMIN_TOKEN, "ROOMSHARD_NGINX_DIR": str(rules_dir),
           "ROOMSHARD_NGINX_LISTEN": "127.0.0.1:18443", "ROOMSHARD_RULES_METRICS": "127.0.0.1:0",
           "ROOMSHARD_BIN": str(Path(sys.executable).parent / "roomshard"),
           "NGINX_TEST": nginx.command(rules_dir / "roomshard.conf", "-q", "-t"),
           "NGINX_RELOAD": f"sh -c 'echo reload >> {marker}'"}
    log = tmp_path / "watch.log"
    with log.open("wb") as out:
        watcher = subprocess.Popen([str(INFRA / "nginx" / "rules-watch.sh"), "--interval", "0.2",
                                    "--max-backoff", "1", "--ready-file", str(ready)], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: ready.exists() and marker.exists(), 30, "the first sync and reload")
        assert "location /i1/room/" in (rules_dir / "roomshard.conf").read_text()
        metrics_url = json.loads(ready.read_text())["url"]

        # A new shard whose host nginx cannot resolve: nginx -t refuses, the old file stays.
        before = (rules_dir / "roomshard.conf").read_text()
        httpx.put(f"{directory.url}/v1/admin/instances/i2", headers=admin, timeout=t(10),
                  json={"internal_url": "http://no-such-host.invalid:8081"}).raise_for_status()
        wait_until(lambda: 'stage="check"' in httpx.get(metrics_url, timeout=t(5)).text, 20,
                   "the refused check to be counted")
        assert "nginx: check failed (1 in a row)" in log.read_text()
        assert (rules_dir / "roomshard.conf").read_text() == before
        assert marker.read_text() == "reload\n"  # nothing reloaded since the first sync

        # Fixed in the registry: the next attempt goes through.
        httpx.put(f"{directory.url}/v1/admin/instances/i2", headers=admin, timeout=t(10),
                  json={"internal_url": "http://127.0.0.1:10"}).raise_for_status()
        wait_until(lambda: marker.read_text() == "reload\nreload\n", 40, "the reload after the fix")
        assert "location /i2/room/" in (rules_dir / "roomshard.conf").read_text()
        assert "nginx: in sync again after" in log.read_text()
    finally:
        os.killpg(watcher.pid, signal.SIGTERM)
        assert watcher.wait(timeout=t(10)) == 0, log.read_text()
    assert log.read_text().rstrip().endswith("nginx: stopped")


def test_nginx_example_main_config_passes_nginx_t(tmp_path: Path):
    """infra/nginx/nginx.conf with a generated include passes `nginx -t` (paths moved to a temp dir)."""
    from router_rules.nginx import render_nginx

    nginx = Nginx(tmp_path)
    include = tmp_path / "roomshard.conf"
    include.write_text(render_nginx([{"id": "i1", "internal_url": "http://127.0.0.1:9001"}],
                                    listen="127.0.0.1:18444", directory_url="http://127.0.0.1:9000"))
    text = (INFRA / "nginx" / "nginx.conf").read_text()
    text = (text.replace("/etc/nginx/roomshard/roomshard.conf", str(include))
                .replace("/run/nginx.pid", str(tmp_path / "nginx.pid"))
                .replace("/var/log/nginx/", str(tmp_path) + "/")
                .replace("user www-data;", "user root;" if os.geteuid() == 0 else "")
                .replace("listen 80 default_server;", "listen 127.0.0.1:18445 default_server;")
                .replace("listen [::]:80 default_server;", ""))
    conf = tmp_path / "main.conf"
    conf.write_text(text)
    res = subprocess.run([nginx.binary, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "err.log"),
                          "-c", str(conf)], capture_output=True, text=True, check=False, timeout=t(30))
    assert res.returncode == 0, res.stderr
