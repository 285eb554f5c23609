"""libiscsi's conformance suite (iscsi-test-cu) against the real daemon, scored by the shared tool.

The shared ``conformance.py`` classifies every test as passed, failed or skipped (CUnit alone counts a skip as a pass).
The single-portal run must have no failure and at least :data:`MIN_PASSED` passes; the multipath run drives the same
LUN through two portals of one daemon and must pass every MultipathIO test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e.harness import Daemon, require_tools, shared_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MIN_PASSED = 190  # the score the target is held to on a thin demo LUN; raise it as the target improves
SUITE_TIMEOUT_S = 600  # the full suite takes 2-3 minutes here; a hang must not eat the CI budget
MULTIPATH_SUITE = "ALL.MultipathIO"
MULTIPATH_TESTS = ("Simple", "Reset", "CompareAndWrite", "CompareAndWriteAsync")


def conformance(url: str, json_path: Path, *extra: str, timeout: int = SUITE_TIMEOUT_S) -> tuple[dict, str]:
    require_tools("iscsi-test-cu")
    tool = shared_dir() / "tools" / "conformance.py"
    if not tool.exists():
        pytest.skip(f"{tool} not found (set LUNSYNC_SHARED)")
    p = subprocess.run([sys.executable, str(tool), url, "--json", str(json_path), "--timeout", str(timeout), *extra],
                       capture_output=True, text=True, errors="replace", timeout=timeout + 60, check=False)
    assert p.returncode in (0, 1), f"the conformance suite could not run (exit {p.returncode}):\n{p.stdout[-3000:]}" \
                                   f"\n{p.stderr[-3000:]}"
    return json.loads(json_path.read_text()), p.stdout


def failed(report: dict) -> list[str]:
    return sorted(name for name, verdict in report["tests"].items() if verdict == "failed")


# Two tests print "[FAILED]" while all of their CUnit assertions pass, so the shared tool flags them on a correct
# target. They are accepted only when CUnit's own assertions for them pass, which the test below checks separately.
# - iSCSIDataSnInvalid sends Data-Out PDUs with broken DataSNs through a helper that expects GOOD and prints
#   "[FAILED]" for any other answer, while the test's own assertion requires the write to fail.
# - Reserve6.LUNReset passes; then its teardown's PERSISTENT RESERVE IN on the nexus that issued the LUN RESET meets
#   the reset's unit attention, which SAM-5 §6.3.3 establishes on every I_T nexus and MultipathIO.Reset requires on
#   the issuing path too. The two libiscsi tests cannot both be silent; the standard decides.
INHERENTLY_FLAGGED = {"iSCSIdatasn.iSCSIDataSnInvalid", "Reserve6.LUNReset"}


def cunit_asserts_failed(url: str, test: str) -> int:
    p = subprocess.run(["iscsi-test-cu", "--dataloss", "-t", test, url], capture_output=True, text=True,
                       errors="replace", timeout=120, check=False)
    for line in p.stdout.splitlines():
        fields = line.split()
        if fields[:1] == ["asserts"] and len(fields) >= 5:
            return int(fields[4])
    raise AssertionError(f"no CUnit summary for {test}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")


def test_conformance_suite_on_thin_demo_lun(daemon_factory, tmp_path: Path) -> None:
    daemon: Daemon = daemon_factory()
    report, out = conformance(daemon.url(0), tmp_path / "conformance.json")
    counts = report["counts"]
    unexpected = sorted(set(failed(report)) - INHERENTLY_FLAGGED)
    assert not unexpected, f"{counts}: failed {unexpected}\n{out[-4000:]}\n{daemon.log_tail()}"
    for name in sorted(set(failed(report)) & INHERENTLY_FLAGGED):
        assert cunit_asserts_failed(daemon.url(0), "ALL." + name) == 0, f"{name}: CUnit assertions failed"
    assert counts["passed"] >= MIN_PASSED, f"{counts}: fewer than {MIN_PASSED} passed"
    daemon.assert_healthy()
    daemon.terminate()


def test_multipath_io_through_two_portals(daemon_factory, tmp_path: Path) -> None:
    daemon: Daemon = daemon_factory(portals=2)
    url2 = daemon.url(0, portal=1)
    report, out = conformance(daemon.url(0), tmp_path / "multipath.json", "--multipath", url2,
                              "--test", MULTIPATH_SUITE, timeout=600)
    tests = report["tests"]
    ran = {name.rsplit(".", 1)[-1]: verdict for name, verdict in tests.items() if "MultipathIO" in name}
    assert set(MULTIPATH_TESTS) <= set(ran), f"MultipathIO tests missing from the run: {sorted(ran)}\n{out[-3000:]}"
    not_passed = {k: v for k, v in ran.items() if v != "passed"}
    assert not not_passed, f"MultipathIO: {not_passed}\n{out[-4000:]}\n{daemon.log_tail()}"
    daemon.assert_healthy()
