"""Metrics summed across processes at scrape time: the control's and each worker's exposition, from the daemon's own
collectors, merged into one that Prometheus' parser and promtool accept."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from lunsync.provider.metrics import ApiCounters, LunInfo, MergedCollector, build_registry, merge_expositions
from lunsync.target.directory import Directory
from lunsync.target.portal import Server
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families


def exposition(server: Server, luns: list[LunInfo]) -> str:
    return generate_latest(build_registry(server, ApiCounters(), lambda: luns)).decode()


def value(text: str, sample: str, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    return None


def processes() -> dict[str, str]:
    control, w0, w1 = Server(Directory()), Server(Directory()), Server(Directory())
    control.counters.logins = 5  # logins run in the control
    control.counters.login_failures["not_found"] = 2
    for w, lun, n in ((w0, "db0", 10), (w1, "db1", 7)):
        for _ in range(n):
            w.stats.record(lun, {}, 0, 0x2A, True, 4096, 0.0001)  # WRITE(10)
        w.counters.rejects["protocol_error"] += 1
    return {"control": exposition(control, []), "0": exposition(w0, [LunInfo("db0", 1 << 30)]),
            "1": exposition(w1, [LunInfo("db1", 2 << 30)])}


def test_series_are_summed_and_each_lun_comes_from_its_worker() -> None:
    texts = processes()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(lambda: texts))
    merged = generate_latest(registry).decode()
    assert value(merged, "lunsync_write_commands_total", lun="db0") == 10
    assert value(merged, "lunsync_write_commands_total", lun="db1") == 7
    assert value(merged, "lunsync_write_bytes_total", lun="db1") == 7 * 4096
    assert value(merged, "lunsync_lun_capacity_bytes", lun="db1") == 2 << 30
    assert value(merged, "lunsync_logins_total") == 5
    assert value(merged, "lunsync_login_failures_total", reason="not_found") == 2
    assert value(merged, "lunsync_rejected_pdus_total", reason="protocol_error") == 2


def test_per_process_families_keep_one_series_per_process() -> None:
    merged = merge_expositions(processes())
    [fds] = [f for f in merged if f.name == "process_open_fds"]
    assert sorted(s.labels["process"] for s in fds.samples) == ["0", "1", "control"]


def test_a_created_timestamp_keeps_the_earliest() -> None:
    def text(total: int, created: int) -> str:  # as prometheus-client writes a counter with its creation time
        return (f"# HELP x_total h\n# TYPE x_total counter\nx_total {total}\n"
                f"# HELP x_created h\n# TYPE x_created gauge\nx_created {created}\n")

    merged = {s.name: s.value for f in merge_expositions({"0": text(1, 200), "1": text(2, 100)}) for s in f.samples}
    assert merged == {"x_total": 3, "x_created": 100}


def test_promtool_accepts_the_merged_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool (Debian: prometheus)")
    registry = CollectorRegistry(auto_describe=False)
    texts = processes()
    registry.register(MergedCollector(lambda: texts))
    p = subprocess.run([promtool, "check", "metrics"], input=generate_latest(registry), capture_output=True,
                       check=False)
    assert p.returncode == 0, (p.stdout + p.stderr).decode()
