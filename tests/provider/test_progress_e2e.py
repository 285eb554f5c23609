"""Restore progress that is true: under ``--rate`` the rate the daemon reports (status, API, metrics) matches the rate
measured from bytes done over wall-clock time, and its ETA matches the time the restore then really takes. The CLI's
``--wait`` forms print plain progress lines with that rate and ETA when not on a terminal."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from api_harness import ApiDaemon
from e2e.harness import describe, require_tools, run

pytestmark = pytest.mark.e2e
MIB = 1 << 20
RATE_MIB_S = 8


def metric(text: str, name: str, recovery: str) -> float | None:
    m = re.search(rf'^{name}{{lun="lab",recovery="{recovery}"}} (\S+)$', text, re.MULTILINE)
    return None if m is None else float(m[1])


def written_and_snapshotted(factory: Callable[..., ApiDaemon], size: int) -> ApiDaemon:
    """A daemon whose demo LUN of ``size`` bytes is written through (every chunk real data) and snapshotted as s."""
    require_tools("qemu-io")
    d = factory(demo_size=str(size))
    p = run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {size}", d.url(0)])
    assert p.returncode == 0, describe(p)
    d.cli("snapshot", "create", "demo0@s", check=True)
    return d


def test_rate_and_eta_under_rate_are_measured_truths(api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    d = written_and_snapshotted(api_daemon_factory, 64 * MIB)
    rid = d.cli_json("resync", "demo0@s", "--to", "lab", "--rate", str(RATE_MIB_S))["id"]
    http = d.http()

    def status() -> tuple[float, dict[str, object]]:
        r = http.get(f"/v1/recovery/{rid}")
        assert r.status_code == 200, r.text
        return time.monotonic(), r.json()

    time.sleep(2.0)
    t1, s1 = status()
    time.sleep(2.5)
    t2, s2 = status()
    scraped = d.scrape()
    assert s2["state"] == "resyncing", s2
    measured = (int(s2["bytes_done"]) - int(s1["bytes_done"])) / (t2 - t1)  # type: ignore[call-overload]
    assert abs(measured - RATE_MIB_S * MIB) <= 0.25 * RATE_MIB_S * MIB, measured / MIB  # the throttle holds
    reported = float(s2["rate_bps"])  # type: ignore[arg-type]
    assert abs(reported - measured) <= 0.25 * measured, (reported / MIB, measured / MIB)
    # The metric is the same number, read at scrape time; the pair's figures are the set's (one pair).
    rate_metric = metric(scraped, "lunsync_recovery_copy_rate_bytes_per_second", rid)
    eta_metric = metric(scraped, "lunsync_recovery_eta_seconds", rid)
    assert rate_metric is not None and abs(rate_metric - measured) <= 0.25 * measured, rate_metric
    assert metric(scraped, "lunsync_recovery_size_bytes", rid) == 64 * MIB
    eta = float(s2["eta_s"])  # type: ignore[arg-type]
    assert eta_metric is not None and abs(eta_metric - eta) <= 0.25 * eta + 0.5, (eta_metric, eta)
    shown = d.cli("recovery", "show", rid, check=True).stdout
    assert "/s" in shown and "ETA" in shown, shown
    while True:
        t, s = status()
        if s["state"] != "resyncing":
            break
        time.sleep(0.05)
    assert s["state"] == "done", s
    remaining = t - t2
    assert abs(eta - remaining) <= 0.25 * remaining, (eta, remaining)


def test_wait_forms_print_plain_progress_lines_off_a_terminal(api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    d = written_and_snapshotted(api_daemon_factory, 32 * MIB)
    p = d.cli("resync", "demo0@s", "--to", "lab", "--rate", "8", "--wait", check=True)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("recovery ")]
    assert len(lines) >= 2, p.stderr
    assert re.search(r"resyncing \d+\.\d% \(\S+ of 32MiB\), \d+(\.\d)?MiB/s, ETA 0:0\d", p.stderr), p.stderr
    assert "done" in p.stdout and "\x1b[" not in p.stderr + p.stdout  # no terminal codes in a pipe
    j = d.cli("recovery", "wait", p.stdout.split()[1].rstrip(":"), "--json", check=True)
    assert '"state": "done"' in j.stdout and not j.stderr  # --json: only the JSON, no progress lines
    # A clone fill, followed to the end.
    c = d.cli("snapshot", "create", "demo0@full", "--kind", "clone", "--wait", check=True)
    assert "filled: demo0@full" in c.stdout, describe(c)
    assert re.search(r"clone demo0@full: (filling|filled) \d+\.\d% \(", c.stderr), c.stderr
    shown = d.cli_json("snapshot", "show", "demo0@full")
    assert shown["fill"]["complete"] and shown["fill"]["eta_s"] in (0.0, None)
