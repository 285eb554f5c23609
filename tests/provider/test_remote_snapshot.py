"""A restore onto a LUN of another worker, and a snapshot exposed on another worker's target (``serve --workers
2``): the snapshot's worker reads its own snapshot for the other worker (lunsync.provider.remote_snapshot), through
the control.

Worker 0 serves ``demo0`` and its snapshot; worker 1 serves ``l2`` on a second target, the destination. While the
copy runs (at a fixed rate, so it is seen mid-way) the destination's session stays logged in, reads of uncopied
regions give the snapshot's data (preserved copies and the live origin's unpreserved blocks alike), writes land on
the destination; with worker 0 killed (-9) a redirected read is NOT READY (never other data) and the copy goes on
once it is back. The snapshot cannot be deleted and the destination cannot be moved to another worker (its target
deleted with force) while the copy runs. A kill -9 of the destination's worker, and of the whole daemon, resume the copy from its bitmap.
At the end the destination holds the snapshot with the initiator's write, and the snapshot is unaltered."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from tests.e2e.harness import DEMO_IQN, Daemon, describe, require_tools, run
from tests.iscsi_scapy import RawInitiator
from tests.provider.test_control import T2, api, qemu, status

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BS = 512


def _two(daemon_factory: Any) -> Daemon:
    """demo0 (worker 0) filled with 0x11 and snapshotted as demo0@s, then 8 MiB at 48 MiB overwritten with 0x99 (the
    snapshot keeps preserved copies of those); l2 (worker 1) filled with 0x22."""
    require_tools("qemu-io")
    d: Daemon = daemon_factory(workers=2, api=True, demo_size="64MiB")
    assert api(d, "POST", "/targets", {"iqn": T2}).status_code == 201
    assert api(d, "POST", "/luns", {"name": "l2", "size": "64MiB"}).status_code == 201
    assert api(d, "POST", f"/targets/{T2}/luns", {"name": "l2"}).status_code == 201
    qemu(d.url(0), "write -P 0x11 0 64M", "flush")
    r = api(d, "POST", "/snapshots", {"snapshots": ["demo0@s"]})
    assert r.status_code == 201, r.text
    qemu(d.url(0), "write -P 0x99 48M 8M", "flush")
    qemu(d.url(0, iqn=T2), "write -P 0x22 0 64M", "flush")
    return d


def _restore(d: Daemon, rate_mib_s: float) -> str:
    r = api(d, "POST", "/recovery/resync", {"pairs": [{"snapshot": "demo0@s", "destination": "l2"}],
                                            "rate_mib_s": rate_mib_s})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _recovery(d: Daemon, rs: str) -> dict[str, Any]:
    r = api(d, "GET", f"/recovery/{rs}")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _wait_state(d: Daemon, rs: str, states: tuple[str, ...], timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = api(d, "GET", f"/recovery/{rs}")  # a worker restarting answers 503 for a moment
        st: dict[str, Any] = r.json() if r.status_code == 200 else {"state": "?", "answer": r.text}
        if st["state"] in states:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def _wait_done(d: Daemon, rs: str) -> dict[str, Any]:
    return _wait_state(d, rs, ("done", "failed", "cancelled"))


def _wait_workers_up(d: Daemon, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(w["up"] for w in status(d)["workers"]):
        assert time.monotonic() < deadline, status(d)
        time.sleep(0.1)


def _login(d: Daemon) -> RawInitiator:
    ini = RawInitiator("127.0.0.1", d.port, timeout=30)
    ini.login(T2, initiator="iqn.2026-11.org.example:restore", isid=0x23D000000101)
    for _ in range(4):  # the unit attentions of a new nexus and of the LUN that now serves the snapshot
        if ini.test_unit_ready().status == 0:
            break
    return ini


def _check_result(d: Daemon) -> None:
    """l2 is the snapshot (0x11 throughout) but for the initiator's 1 MiB of 0x33 at 56 MiB; demo0 and its
    snapshot are as they were."""
    qemu(d.url(0, iqn=T2), "read -P 0x11 0 56M", "read -P 0x33 56M 1M", "read -P 0x11 57M 7M")
    qemu(d.url(0), "read -P 0x11 0 48M", "read -P 0x99 48M 8M", "read -P 0x11 56M 8M")
    r = api(d, "POST", "/snapshots/demo0@s/expose", {"target": DEMO_IQN})
    assert r.status_code in (200, 201), r.text
    p = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 64M", d.url(int(r.json()["exposed"]["lun"]))],
            timeout=120)
    assert p.returncode == 0 and "verification failed" not in p.stdout, describe(p)


def test_restore_onto_another_workers_lun_serves_the_snapshot_and_rides_out_its_worker_dying(
        daemon_factory: Any) -> None:
    d = _two(daemon_factory)
    ini = _login(d)
    rs = _restore(d, rate_mib_s=6)
    # Uncopied (the copier starts at block 0): the snapshot's preserved copy at 48 MiB, its origin's live blocks at
    # 60 MiB; the destination's own 0x22 never shows.
    for off in (48 * MiB, 52 * MiB, 60 * MiB):
        res = ini.read10(off // BS, 8)
        assert res.status == 0 and res.data == b"\x11" * 4096, (off, res.status, res.sense.hex(), res.data[:8])
    # A write lands on the destination, and reads back from it.
    assert ini.write10(56 * MiB // BS, b"\x33" * MiB).status == 0
    assert ini.read10(56 * MiB // BS, 8).data == b"\x33" * 4096
    st = _recovery(d, rs)
    assert st["state"] == "resyncing" and st["redirected_reads"] >= 3, st
    # The snapshot's worker dies: a redirected read is NOT READY (retryable), never other data; the destination's
    # session stays up.
    pid0 = status(d)["workers"][0]["pid"]
    os.kill(pid0, signal.SIGKILL)
    res = ini.read10(60 * MiB // BS, 8)
    assert res.status == 0x02 and res.sense_key == 0x02, (res.status, res.sense.hex())
    assert ini.read10(56 * MiB // BS, 8).data == b"\x33" * 4096  # the destination's own data still reads
    _wait_workers_up(d)
    assert status(d)["workers"][0]["pid"] != pid0
    deadline = time.monotonic() + 30
    while (res := ini.read10(60 * MiB // BS, 8)).status != 0:
        assert res.sense_key == 0x02 and time.monotonic() < deadline, res.sense.hex()
        time.sleep(0.1)
    assert res.data == b"\x11" * 4096
    # The snapshot cannot be deleted from under the restore, though another worker runs it.
    r = api(d, "DELETE", "/snapshots/demo0@s")
    assert r.status_code == 409 and rs in r.json()["error"], r.text
    # Nor can the destination move to another worker under it: deleting its target with --force (which unmaps it,
    # and an unmapped LUN is worker 0's) is refused, and the target and its session stay.
    r = api(d, "DELETE", f"/targets/{T2}?force=true")
    assert r.status_code == 409 and "'l2' is being restored" in r.json()["error"], r.text
    assert [t["iqn"] for t in api(d, "GET", "/targets").json()] == [DEMO_IQN, T2]
    assert ini.read10(56 * MiB // BS, 8).data == b"\x33" * 4096
    st = _wait_done(d, rs)
    assert st["state"] == "done", st
    ini.close()
    _check_result(d)
    d.assert_healthy()


def test_restore_onto_another_workers_lun_resumes_after_its_own_worker_or_the_daemon_dies(
        daemon_factory: Any) -> None:
    d = _two(daemon_factory)
    rs = _restore(d, rate_mib_s=6)
    qemu(d.url(0, iqn=T2), "write -P 0x33 56M 1M", "flush")
    time.sleep(1.5)
    # The destination's worker: restarted, it resumes the set from its bitmap, reading the snapshot across.
    pid1 = status(d)["workers"][1]["pid"]
    os.kill(pid1, signal.SIGKILL)
    _wait_workers_up(d)
    before = _wait_state(d, rs, ("resyncing",), 30)["bytes_done"]
    time.sleep(1.5)
    assert _recovery(d, rs)["bytes_done"] > before  # copying again, from the other worker's snapshot
    # The whole daemon (control and workers, kill -9), then a new start: the set resumes where it was committed.
    d.kill9()
    d.start()
    st = _wait_done(d, rs)
    assert st["state"] == "done", st
    _check_result(d)
    d.assert_healthy()


def test_a_snapshot_exposed_on_another_workers_target_is_read_from_the_snapshots_worker(
        daemon_factory: Any) -> None:
    d = _two(daemon_factory)
    r = api(d, "POST", "/snapshots/demo0@s/expose", {"target": T2})
    assert r.status_code == 201 and r.json()["exposed"] == {"target": T2, "lun": 1}, r.text
    assert "demo0" not in status(d)["workers"][1]["luns"]  # the origin stays worker 0's alone
    url = d.url(1, iqn=T2)
    # The preserved copy at 48 MiB and the live origin's blocks elsewhere: the snapshot, not what demo0 holds now.
    p = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 64M", url], timeout=120)
    assert p.returncode == 0 and "verification failed" not in p.stdout, describe(p)
    ini = RawInitiator("127.0.0.1", d.port, timeout=30)
    ini.login(T2, initiator="iqn.2026-11.org.example:exposed", isid=0x23D000000102)
    for _ in range(4):
        if ini.test_unit_ready(lun=1).status == 0:
            break
    res = ini.write10(0, b"\x44" * 4096, lun=1)
    assert res.status == 0x02 and res.sense_key == 0x07, res.sense.hex()  # DATA PROTECT: read-only
    # The snapshot's worker down: NOT READY, then the snapshot again once it is back.
    os.kill(status(d)["workers"][0]["pid"], signal.SIGKILL)
    res = ini.read10(48 * MiB // BS, 8, lun=1)
    assert res.status == 0x02 and res.sense_key == 0x02, (res.status, res.sense.hex())
    _wait_workers_up(d)
    deadline = time.monotonic() + 30
    while (res := ini.read10(48 * MiB // BS, 8, lun=1)).status != 0:
        assert res.sense_key == 0x02 and time.monotonic() < deadline, res.sense.hex()
        time.sleep(0.1)
    assert res.data == b"\x11" * 4096
    ini.close()
    # Served again after a restart of the daemon (the target's worker rebuilds it), then unexposed there.
    d.restart()
    p = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 40M 24M", url], timeout=120)
    assert p.returncode == 0 and "verification failed" not in p.stdout, describe(p)
    assert api(d, "DELETE", "/snapshots/demo0@s/expose").status_code in (200, 204)
    assert api(d, "GET", "/snapshots/demo0@s").json()["exposed"] is None
    p = run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", url], timeout=60)
    assert p.returncode != 0, describe(p)  # LUN 1 of the second target is gone
    qemu(d.url(0), "read -P 0x99 48M 8M")
    d.assert_healthy()
