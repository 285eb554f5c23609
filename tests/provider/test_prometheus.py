"""Prometheus' own checks with Debian's promtool: the daemon's /metrics exposition (with snapshots, a clone and a
restore running, so every family has samples), the shipped scrape config and alert rules, and the rules' unit tests
(lunsync_rules_test.yml). Also: every LUN-scoped query of the Grafana dashboard is filtered by ``$lun``."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from api_harness import ApiDaemon
from e2e.harness import REPO_ROOT, describe, require_tools, run

DEPLOY = REPO_ROOT / "deploy"
MIB = 1 << 20


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    require_tools("promtool")
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, check=False, timeout=60)


def test_shipped_rules_and_config_pass_promtool(tmp_path: Path) -> None:
    p = promtool("check", "rules", str(DEPLOY / "lunsync.rules.yml"))
    assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr
    # check config also loads the rule file it names, relative to itself.
    p = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert p.returncode == 0 and "1 rule files found" in p.stdout, p.stdout + p.stderr
    wanted = {"LunsyncPoolNearlyFull", "LunsyncSnapshotInvalidated", "LunsyncRestoreFailed", "LunsyncRestoreStalled",
              "LunsyncLoginFailureBurst", "LunsyncFlushFailed"}
    assert wanted <= set(re.findall(r"alert: (\w+)", (DEPLOY / "lunsync.rules.yml").read_text()))


def test_alert_rules_fire_on_the_daemons_series() -> None:
    p = promtool("test", "rules", str(Path(__file__).with_name("lunsync_rules_test.yml")))
    assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr


def lun_scoped(metrics_text: str) -> set[str]:
    """Families whose samples name a LUN (a ``lun`` label, or a ``snapshot`` label of the form LUN@SNAP)."""
    return {m[1] for m in re.finditer(r'^(lunsync_[a-z_]+)\{[^}]*\b(?:lun|snapshot)="', metrics_text, re.MULTILINE)}


@pytest.mark.e2e
def test_metrics_pass_promtool_and_the_dashboard_filters_every_lun_panel(
        api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    require_tools("qemu-io", "promtool")
    d = api_daemon_factory(demo_size="64MiB")
    p = run(["qemu-io", "-f", "raw", "-c", f"write -P 0x3c 0 {64 * MIB}", d.url(0)])
    assert p.returncode == 0, describe(p)
    d.cli("snapshot", "create", "demo0@s", check=True)
    d.cli("snapshot", "create", "demo0@c", "--kind", "clone", check=True)
    p = run(["qemu-io", "-f", "raw", "-c", f"write -P 0x3d 0 {MIB}", d.url(0)])  # a copy-on-write copy
    assert p.returncode == 0, describe(p)
    rid = d.cli_json("resync", "demo0@s", "--to", "lab", "--rate", "4")["id"]
    d.cli("recovery", "wait", rid, "--timeout", "2")  # a couple of seconds in: rate and ETA are measured
    text = d.scrape()
    for family in ("lunsync_recovery_size_bytes", "lunsync_recovery_eta_seconds", "lunsync_lun_flush_failed",
                   "lunsync_recovery_copy_rate_bytes_per_second", "lunsync_cow_copies_total"):
        assert re.search(rf"^{family}\{{", text, re.MULTILINE), family
    p = promtool("check", "metrics", stdin=text)
    assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), p.stdout + p.stderr

    scoped = lun_scoped(text)
    assert {"lunsync_read_commands_total", "lunsync_recovery_eta_seconds", "lunsync_clone_fill_ratio"} <= scoped
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    titles = [p_["title"] for p_ in dash["panels"]]
    assert {"Restore state", "Restore ETA", "Restore rate"} <= set(titles)
    unfiltered = []
    for panel in dash["panels"]:
        for t in panel["targets"]:
            for name, labels in re.findall(r"(lunsync_[a-z_]+)\{([^}]*)\}", t["expr"]):
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                if (name in scoped or family in scoped or f"{family}_total" in scoped) and "$lun" not in labels:
                    unfiltered.append(f"{panel['title']}: {name}")
    assert not unfiltered, unfiltered
