"""A recovery set over destinations of two workers (``serve --workers 2``): one set of a part per worker, started
together by the control's two phases (lunsync.provider.cross_recovery).

The pure part first: how the parts' states make the set's, and how a list shows the parts as one set. Then on real
worker processes: ``demo0`` (worker 0) and ``l2`` (worker 1, a second target) snapshotted as one set, each partly
overwritten, restored to that set in one call. It is one set (one id, both pairs, listed once), each pair copies only
the chunks its LUN changed, and a kill -9 of one worker mid-copy, then of the whole daemon, resume its part while the
set stays ``resyncing`` until both are done; both LUNs are then their snapshots byte for byte. A set whose second
part is refused starts nowhere (the first part is cancelled, its LUN untouched), and one whose worker is killed in
its pre-restore hook fails as a one-process set caught in pre-restore by a restart does."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lunsync.provider.cross_recovery import merged_list, merged_state, merged_status, part_id, set_of, unstarted

from tests.e2e.harness import Daemon, require_tools
from tests.provider.test_control import T2, api, qemu, status
from tests.provider.test_remote_snapshot import _wait_workers_up

MiB = 1 << 20


def test_a_sets_state_is_its_parts_merged() -> None:
    assert merged_state(["resyncing", "done"]) == "resyncing"
    assert merged_state(["failed", "resyncing"]) == "resyncing"  # one process: resyncing until its last copier ends
    assert merged_state(["pre-restore", "pending"]) == "pre-restore"
    assert merged_state(["cancelled", "failed"]) == "failed"
    assert merged_state(["done", "cancelled"]) == "cancelled"
    assert merged_state(["done", "done"]) == "done"
    assert set_of(part_id("0123456789ab", 3)) == "0123456789ab" and set_of("0123456789ab") is None
    assert set_of("nothex789abc-1") is None


def test_a_set_that_did_not_start_everywhere_has_its_started_parts_failed() -> None:
    assert unstarted([("x-0", "resyncing", 5.0), ("x-1", "failed", None)]) == ["x-0"]
    assert unstarted([("x-0", "pre-restore", None), ("x-1", "failed", None)]) == ["x-0"]
    # A part that failed while copying leaves the other to finish, as one process's copiers do.
    assert unstarted([("x-0", "resyncing", 5.0), ("x-1", "failed", 6.0)]) == []
    assert unstarted([("x-0", "resyncing", 5.0), ("x-1", "resyncing", 5.0)]) == []
    assert unstarted([("x-0", "done", 5.0), ("x-1", "failed", None)]) == []


def test_the_parts_statuses_and_a_list_merge_into_one_set() -> None:
    def part(pid: str, state: str, done: int, total: int, eta: float | None, fin: str | None) -> dict[str, Any]:
        return {"id": pid, "state": state, "rate_bps": 10.0, "eta_s": eta, "options": {"rate_bps": 1.0},
                "error": None, "hooks": [], "created_at": f"2026-12-03T20:0{pid[-1]}:00Z",
                "started_at": "2026-12-03T20:10:00Z", "finished_at": fin,
                "pairs": [{"destination": f"d{pid[-1]}", "bytes_total": total, "bytes_done": done,
                           "bytes_copied": done, "redirected_reads": 2}]}

    a, b = part("0123456789ab-0", "done", 8, 8, None, "2026-12-03T20:11:00Z"), part(
        "0123456789ab-1", "resyncing", 2, 8, 3.0, None)
    st = merged_status("0123456789ab", [a, b])
    assert (st["id"], st["state"], st["percent"], st["bytes_total"], st["bytes_done"]) == (
        "0123456789ab", "resyncing", 62.5, 16, 10)
    assert (st["eta_s"], st["rate_bps"], st["redirected_reads"], st["finished_at"]) == (3.0, 20.0, 4, None)
    assert [p["destination"] for p in st["pairs"]] == ["d0", "d1"] and st["parts"] == [a["id"], b["id"]]
    b.update(state="failed", error="no space", finished_at="2026-12-03T20:12:00Z")
    st = merged_status("0123456789ab", [a, b])
    assert st["state"] == "failed" and st["error"] == "0123456789ab-1: no space", st
    assert st["finished_at"] == "2026-12-03T20:12:00Z" and st["created_at"] == a["created_at"]
    one = {"id": "fedcba987654", "state": "done", "created_at": "2026-12-03T20:05:00Z"}
    assert [s["id"] for s in merged_list([b, one, a])] == ["0123456789ab", "fedcba987654"]


def _two(daemon_factory: Any, **kw: Any) -> Daemon:
    """demo0 (worker 0, 0x11) and l2 (worker 1, 0x22) snapshotted as one set s, then 8 MiB of each overwritten
    (demo0 at 48 MiB with 0x99, l2 at 0 with 0x77)."""
    require_tools("qemu-io")
    d: Daemon = daemon_factory(workers=2, api=True, demo_size="64MiB", **kw)
    assert api(d, "POST", "/targets", {"iqn": T2}).status_code == 201
    assert api(d, "POST", "/luns", {"name": "l2", "size": "64MiB"}).status_code == 201
    assert api(d, "POST", f"/targets/{T2}/luns", {"name": "l2"}).status_code == 201
    qemu(d.url(0), "write -P 0x11 0 64M", "flush")
    qemu(d.url(0, iqn=T2), "write -P 0x22 0 64M", "flush")
    r = api(d, "POST", "/snapshots", {"snapshots": ["demo0@s", "l2@s"], "set": "s"})
    assert r.status_code == 201, r.text
    qemu(d.url(0), "write -P 0x99 48M 8M", "flush")
    qemu(d.url(0, iqn=T2), "write -P 0x77 0 8M", "flush")
    return d


PAIRS = [{"snapshot": "demo0@s"}, {"snapshot": "l2@s", "destination": "l2"}]


def _show(d: Daemon, rs: str) -> dict[str, Any] | None:
    r = api(d, "GET", f"/recovery/{rs}")  # a part's worker restarting answers 503 for a moment
    if r.status_code == 503:
        return None
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _check_restored(d: Daemon) -> None:
    qemu(d.url(0), "read -P 0x11 0 64M")
    qemu(d.url(0, iqn=T2), "read -P 0x22 0 64M")


@pytest.mark.e2e
def test_a_recovery_set_across_two_workers_is_one_set_and_rides_out_a_worker_and_the_daemon_dying(
        daemon_factory: Any) -> None:
    d = _two(daemon_factory)
    # Counted first: each pair copies only the 8 MiB its LUN changed since the snapshot.
    r = api(d, "POST", "/recovery/resync", {"pairs": PAIRS, "dry_run": True})
    assert r.status_code == 200, r.text
    assert [(p["destination"], p["only_changed"], p["bytes"]) for p in r.json()["pairs"]] == [
        ("demo0", True, 8 * MiB), ("l2", True, 8 * MiB)], r.text
    r = api(d, "POST", "/recovery/resync", {"pairs": PAIRS, "rate_mib_s": 2})
    assert r.status_code == 202, r.text
    st = r.json()
    rs = st["id"]
    assert re.fullmatch(r"[0-9a-f]{12}", rs) and r.headers["location"] == f"/v1/recovery/{rs}", r.text
    assert st["state"] == "resyncing" and st["parts"] == [f"{rs}-0", f"{rs}-1"], st
    assert [(p["destination"], p["state"]) for p in st["pairs"]] == [("demo0", "resyncing"), ("l2", "resyncing")]
    assert st["bytes_total"] == 16 * MiB, st
    # One set in the list, not its parts.
    listed = [s for s in api(d, "GET", "/recovery").json() if s["id"].startswith(rs)]
    assert [(s["id"], len(s["pairs"])) for s in listed] == [(rs, 2)], listed
    # Worker 1 killed mid-copy: its part resumes from its bitmap, and the set stays resyncing meanwhile.
    deadline = time.monotonic() + 30
    while (cur := _show(d, rs)) is None or cur["pairs"][1]["bytes_done"] == 0:
        assert time.monotonic() < deadline, cur
        time.sleep(0.1)
    pid1 = status(d)["workers"][1]["pid"]
    os.kill(pid1, signal.SIGKILL)
    _wait_workers_up(d)
    assert status(d)["workers"][1]["pid"] != pid1
    seen = set()
    deadline = time.monotonic() + 30
    while (cur := _show(d, rs)) is None or cur["pairs"][1]["state"] != "resyncing":
        seen.add(None if cur is None else cur["state"])
        assert time.monotonic() < deadline, cur
        time.sleep(0.1)
    assert seen <= {None, "resyncing"} and cur["state"] == "resyncing", (seen, cur)
    # The whole daemon (control and workers) killed: a new start finds the set's parts in the catalog.
    d.kill9()
    d.start()
    deadline = time.monotonic() + 90
    while (cur := _show(d, rs)) is None or cur["state"] == "resyncing":
        seen.add(None if cur is None else cur["state"])
        assert time.monotonic() < deadline, cur
        time.sleep(0.2)
    assert cur["state"] == "done" and cur["percent"] == 100.0, cur
    assert [(p["destination"], p["state"]) for p in cur["pairs"]] == [("demo0", "done"), ("l2", "done")], cur
    # Only the changed chunks were copied, though each copier started again after a kill.
    assert all(p["bytes_copied"] <= 8 * MiB for p in cur["pairs"]) and cur["bytes_total"] == 16 * MiB, cur
    r = api(d, "POST", f"/recovery/{rs}/wait", None)
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    _check_restored(d)
    d.assert_healthy()


@pytest.mark.e2e
def test_a_recovery_set_across_workers_starts_everywhere_or_nowhere(daemon_factory: Any, tmp_path: Path) -> None:
    hooks = tmp_path / "hooks.toml"
    hooks.write_text('[hook.slow]\ncommand = ["/bin/sleep", "4"]\ntimeout_s = 30\n')
    hooks.chmod(0o600)
    d = _two(daemon_factory, extra_args=["--hooks", str(hooks)])
    # Worker 1's part is refused (no such snapshot): worker 0's, prepared, is cancelled, and demo0 is untouched.
    r = api(d, "POST", "/recovery/resync", {"pairs": [{"snapshot": "demo0@s"}, {"snapshot": "l2@nosuch"}]})
    assert r.status_code == 404 and "l2@nosuch" in r.json()["error"] and "no destination" in r.json()["error"], r.text
    failed = [s for s in api(d, "GET", "/recovery").json() if "parts" in s]
    assert [(s["state"], [p["state"] for p in s["pairs"]]) for s in failed] == [("failed", ["failed"])], failed
    assert "did not start" in failed[0]["error"] and "l2@nosuch" in failed[0]["error"], failed
    qemu(d.url(0), "read -P 0x99 48M 8M")
    # Worker 1 killed while its part runs its pre-restore hook: nothing starts anywhere, and once it is back its
    # part is failed by the restart, as a one-process set caught in pre-restore is.
    pid1 = status(d)["workers"][1]["pid"]
    t0 = time.monotonic()
    answer: list[Any] = []
    post = threading.Thread(target=lambda: answer.append(api(d, "POST", "/recovery/resync", {
        "pairs": PAIRS, "pre_restore": ["slow"]})))
    post.start()
    time.sleep(1.5)
    os.kill(pid1, signal.SIGKILL)
    post.join(60)
    r = answer[0]
    assert r.status_code == 409 and "did not start" in r.json()["error"], r.text
    assert time.monotonic() - t0 < 30
    _wait_workers_up(d)
    sets = [s for s in api(d, "GET", "/recovery").json() if s.get("parts") and len(s["pairs"]) == 2]
    assert len(sets) == 1, sets
    st = sets[0]
    assert st["state"] == "failed" and [p["state"] for p in st["pairs"]] == ["failed", "failed"], st
    assert "did not start" in st["error"] and "restarted during pre-restore" in st["error"], st
    qemu(d.url(0), "read -P 0x99 48M 8M")
    qemu(d.url(0, iqn=T2), "read -P 0x77 0 8M")
    # Both destinations are free: the same set now runs to the end.
    r = api(d, "POST", "/recovery/resync", {"pairs": PAIRS})
    assert r.status_code == 202, r.text
    r = api(d, "POST", f"/recovery/{r.json()['id']}/wait", None)
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    _check_restored(d)
    d.assert_healthy()
