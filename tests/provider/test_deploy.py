"""deploy/ is usable as shipped: the unit's readiness protocol works with the real daemon, every command line in the
unit and the container file parses, the example config is valid, and every series the dashboard and the scrape
config rely on is one the daemon exports.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from api_harness import ApiDaemon
from e2e.harness import REPO_ROOT
from lunsync.provider.cli import build_parser
from lunsync.provider.config import load_config

DEPLOY = REPO_ROOT / "deploy"


def recv_until(sock: socket.socket, field: str, timeout: float = 20.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no {field} datagram within {timeout}s") from None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        if field in fields:
            return fields


@pytest.mark.e2e
def test_daemon_tells_systemd_when_ready_and_when_stopping(api_daemon_factory: Callable[..., ApiDaemon],
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("notify") / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        d = api_daemon_factory(env={"NOTIFY_SOCKET": str(path)})
        ready = recv_until(sock, "READY")
        assert ready["READY"] == "1"
        assert d.proc is not None and ready["MAINPID"] == str(d.proc.pid)
        assert "1 LUN(s)" in ready["STATUS"]
        # READY comes after every listener is up: the API answers at once.
        with d.http() as c:
            assert c.get("/v1/status").status_code == 200
        assert d.proc is not None
        d.proc.send_signal(15)
        stopping = recv_until(sock, "STOPPING")
        assert stopping["STOPPING"] == "1"
        assert d.proc.wait(30) == 0


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(DEPLOY / "lunsync.service")
    return cp


def test_unit_is_type_notify_and_its_command_line_parses() -> None:
    u = unit()
    assert u["Service"]["Type"] == "notify"
    exec_start = u["Service"]["ExecStart"]
    opts = re.fullmatch(r'"LUNSYNC_OPTS=(.*)"', u["Service"]["Environment"])
    assert opts is not None
    argv = shlex.split(exec_start.replace("$LUNSYNC_OPTS", opts.group(1)))
    assert Path(argv[0]).name == "lunsync"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.data_dir == "/var/lib/lunsync"
    assert args.config is None, "a declarative config applied at every start would undo API changes"
    assert args.listen == ["0.0.0.0:3260"] and args.api == "127.0.0.1:8080" and args.metrics == "127.0.0.1:9476"
    assert int(u["Service"]["TimeoutStopSec"]) >= 30


def test_unit_passes_systemd_analyze() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    p = subprocess.run([tool, "verify", "--man=no", str(DEPLOY / "lunsync.service")], capture_output=True,
                       text=True, check=False, timeout=60)
    # The binary and the account do not exist on a build machine; anything else is a real mistake in the unit.
    problems = [line for line in (p.stdout + p.stderr).splitlines()
                if line.strip() and "lunsync" in line and "not executable" not in line and "No such file" not in line
                and "Failed to resolve" not in line and "user" not in line.lower()
                and "System has not been booted" not in line]
    assert not [x for x in problems if "Unknown" in x or "Invalid" in x or "bad" in x.lower()], problems


def test_container_entrypoint_parses() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    args = build_parser().parse_args([*entry, *cmd][1:])
    assert args.command == "serve" and args.listen == ["0.0.0.0:3260"]
    exposed = set(re.findall(r"(\d+)/tcp", text))
    assert {"3260", "8080", "9476"} <= exposed
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE), "the container must not run as root"


def test_example_config_is_valid() -> None:
    cfg = load_config(DEPLOY / "lunsync.example.toml")
    assert {lun.name for lun in cfg.luns} == {"db0", "log0", "golden"}
    assert any(t.chap is not None and t.chap.mutual for t in cfg.targets)


def exported_names(metrics_text: str) -> set[str]:
    # A family the daemon declares counts even before its first sample (restores: no series until a recovery set).
    names = {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines() if line.startswith("lunsync_")}
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE lunsync_"):
            names.add(line.split()[2])
    return names


@pytest.mark.e2e
def test_dashboard_and_scrape_config_match_the_daemon(api_daemon: ApiDaemon) -> None:
    exported = exported_names(api_daemon.scrape())
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("iops", "throughput", "latency", "sessions", "login failures"):
        assert topic in titles, topic
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"lunsync_[a-z_]+", e)}
    assert used, "the dashboard queries nothing"
    missing = used - exported
    assert not missing, f"dashboard uses series the daemon does not export: {missing}"

    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "lunsync")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9476"]  # the daemon's default --metrics
