"""``lunsync serve --workers 2`` end to end: two targets on two worker processes driven by qemu-io through the one
portal, ``status`` per worker, metrics summed over the processes, the control API's answers (forwarded, merged,
refused with a 4xx that says why), ``apply`` and ``serve --config`` keeping each LUN's targets on one worker, session reinstatement across the hand-off, and a worker killed with -9 in the
middle of qemu-io's writes: restarted, the initiator logs in again, and every acknowledged write is on the LUN."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.harness import DEMO_IQN, Daemon, describe, require_tools, run
from tests.e2e.test_security import xcopy, xcopy_list
from tests.iscsi_scapy import RawInitiator
from tests.provider.test_channel import _recv_pdu
from tests.provider.test_workers import _byte_at
from tests.target.test_connection import login_pdu, scsi_cmd

pytestmark = pytest.mark.e2e

T2 = "iqn.2026-11.io.lunsync:second"
MiB = 1 << 20


def api(d: Daemon, method: str, path: str, body: Any = None, *, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {d.api_token if token is None else token}"}
    return httpx.request(method, d.api_url + "/v1" + path, json=body, headers=headers, timeout=30)


def qemu(url: str, *cmds: str) -> subprocess.CompletedProcess[str]:
    p = run(["qemu-io", "-f", "raw", *(x for c in cmds for x in ("-c", c)), url], timeout=120)
    assert p.returncode == 0 and "verification failed" not in p.stdout, describe(p)
    return p


def status(d: Daemon) -> dict[str, Any]:
    r = api(d, "GET", "/status")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else r"(?:\{\})?") + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no {name}{{{want}}} in\n{text[:3000]}"
    return float(m.group(1))


@pytest.fixture
def two(daemon_factory: Any) -> Daemon:
    """Two workers: the demo target on worker 0, a second target (placed on worker 1) showing LUN ``l2``."""
    require_tools("qemu-io")
    d: Daemon = daemon_factory(workers=2, api=True, metrics=True, demo_size="64MiB")
    assert api(d, "POST", "/targets", {"iqn": T2}).status_code == 201
    assert api(d, "POST", "/luns", {"name": "l2", "size": "64MiB"}).status_code == 201
    r = api(d, "POST", f"/targets/{T2}/luns", {"name": "l2"})
    assert r.status_code == 201, r.text
    return d


def test_two_targets_on_two_workers_serve_io_and_report_per_worker(two: Daemon) -> None:
    d = two
    qemu(d.url(0), "write -P 0x11 0 1M", "flush", "read -P 0x11 0 1M")
    qemu(d.url(0, iqn=T2), "write -P 0x22 0 1M", "write -P 0x23 1M 1M", "flush", "read -P 0x22 0 1M")
    st = status(d)
    workers = st["workers"]
    assert [w["index"] for w in workers] == [0, 1] and all(w["up"] for w in workers), workers
    assert workers[0]["targets"] == [DEMO_IQN] and workers[0]["luns"] == ["demo0"], workers
    assert workers[1]["targets"] == [T2] and workers[1]["luns"] == ["l2"], workers
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and d.proc is not None and d.proc.pid not in pids
    assert st["targets"] == 2 and st["luns"] == 2
    # The data of each LUN is in its own file, written by its own worker.
    assert (d.data_dir / "luns" / "l2.img").read_bytes()[:MiB] == b"\x22" * MiB
    # The CLI shows the same.
    cli = run([*_cli(d), "status"], check=True).stdout
    assert "2 behind a control process" in cli and T2 in cli and str(workers[1]["pid"]) in cli
    # Metrics: every process's exposition summed; each LUN's series from the worker that serves it.
    text = httpx.get(d.metrics_url, timeout=30).text
    assert metric(text, "lunsync_write_commands_total", lun="demo0") >= 1
    assert metric(text, "lunsync_write_commands_total", lun="l2") >= 2
    assert metric(text, "lunsync_logins_total") == 2  # counted by the control's portal, where logins run
    assert metric(text, "process_resident_memory_bytes", process="worker1") > 0
    # Lists are merged from every worker: each target once, with the sessions its worker has.
    targets = api(d, "GET", "/targets").json()
    assert [t["iqn"] for t in targets] == [DEMO_IQN, T2]
    d.assert_healthy()


def _cli(d: Daemon) -> list[str]:
    from tests.e2e.harness import lunsync_command

    return [*lunsync_command(), "--api", d.api_url, "--data-dir", str(d.data_dir)]


def test_the_control_api_routes_moves_and_refuses_with_reasons(two: Daemon) -> None:
    d = two
    # Bad input is still a 4xx from the control: no token, a bad name, an unknown LUN, a body too large.
    assert api(d, "GET", "/status", token="wrong").status_code == 401
    r = api(d, "POST", "/targets", {"iqn": "not-an-iqn"})
    assert r.status_code == 422 and "iSCSI name" in r.json()["error"], r.text
    r = api(d, "POST", f"/targets/{T2}/luns", {"name": "nosuch"})
    assert r.status_code == 404, r.text
    r = httpx.post(d.api_url + "/v1/luns", content=b"x" * (2 * MiB), timeout=30,
                   headers={"Authorization": f"Bearer {d.api_token}", "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    r = api(d, "DELETE", "/sessions/99999")
    assert r.status_code == 422, r.text
    # A LUN mapped on worker 1's target cannot also be shown by worker 0's: one LUN, one process.
    r = api(d, "POST", f"/targets/{DEMO_IQN}/luns", {"name": "l2"})
    assert r.status_code == 409 and "worker 1" in r.json()["error"] and "unmap it first" in r.json()["error"], r.text
    # A snapshot set over LUNs of two workers is taken by the control's two-phase hold, as one set; one whose
    # name is taken is refused (409) before anything is held.
    r = api(d, "POST", "/snapshots", {"snapshots": ["demo0@x", "l2@x"], "set": "x"})
    assert r.status_code == 201, r.text
    assert [(s["name"], s["set"]) for s in r.json()["snapshots"]] == [("demo0@x", "x"), ("l2@x", "x")], r.text
    r = api(d, "POST", "/snapshots", {"snapshots": ["demo0@x", "l2@y"]})
    assert r.status_code == 409 and "demo0@x" in r.json()["error"], r.text
    # Retried as it was, it answers what it took (200); retried with another spec, a 409 naming the difference.
    r = api(d, "POST", "/snapshots", {"snapshots": ["demo0@x", "l2@x"], "set": "x"})
    assert r.status_code == 200 and [s["name"] for s in r.json()["snapshots"]] == ["demo0@x", "l2@x"], r.text
    r = api(d, "POST", "/snapshots", {"snapshots": ["demo0@x", "l2@x"], "set": "x", "labels": {"k": "v"}})
    assert r.status_code == 409 and "different spec" in r.json()["error"], r.text
    # A restore into LUNs of two workers in one call is one set of a part per worker (it runs:
    # tests/provider/test_cross_recovery.py); its dry run is each worker's, in the order asked.
    r = api(d, "POST", "/recovery/resync", {"pairs": [{"snapshot": "demo0@x", "destination": "l2"},
                                                      {"snapshot": "l2@x", "destination": "demo0"}], "dry_run": True})
    assert r.status_code == 200 and [p["destination"] for p in r.json()["pairs"]] == ["l2", "demo0"], r.text
    assert r.json()["bytes"] == sum(p["bytes"] for p in r.json()["pairs"]) > 0, r.text
    # A set made step by step lives in one worker: a pair into another worker's LUN is refused with a 409 that
    # names each worker's part. (A restore onto another worker's LUN runs: tests/provider/test_remote_snapshot.py.)
    r = api(d, "POST", "/recovery", {})
    assert r.status_code == 201, r.text
    step = r.json()["id"]
    r = api(d, "POST", f"/recovery/{step}/pairs", {"snapshot": "demo0@x", "destination": "l2"})
    assert r.status_code == 409 and "spans workers" in r.json()["error"], r.text
    assert "worker 0: recovery set" in r.json()["error"] and "worker 1: l2" in r.json()["error"], r.text
    assert "destination LUNs" in r.json()["error"], r.text
    # A long poll of that set (it has not started, so it lasts its timeout) holds up no change meanwhile.
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        waiting = pool.submit(api, d, "POST", f"/recovery/{step}/wait?timeout_s=4")
        time.sleep(0.3)
        assert api(d, "POST", "/luns", {"name": "l3", "size": "1MiB"}).status_code == 201
        assert not waiting.done(), "the wait ended before the change it should not have held up"
        assert api(d, "DELETE", "/luns/l3").status_code in (200, 204)
        assert waiting.result().status_code == 200 and time.monotonic() - t0 >= 4
    assert api(d, "POST", f"/recovery/{step}/cancel").status_code == 200
    # Exposed on worker 1's target, worker 0's snapshot is served there (read across: test_remote_snapshot.py).
    r = api(d, "POST", "/snapshots/demo0@x/expose", {"target": T2})
    assert r.status_code == 201 and r.json()["exposed"] == {"target": T2, "lun": 1}, r.text
    assert api(d, "DELETE", "/snapshots/demo0@x/expose").status_code in (200, 204)
    # EXTENDED COPY from demo0 into worker 1's l2 (named by its NAA) is COPY ABORTED, COPY TARGET DEVICE NOT
    # REACHABLE: a copy stays inside the target it is sent to, so it never spans workers; inside demo0 it copies.
    naa = {n: api(d, "GET", f"/luns/{n}").json()["naa"] for n in ("demo0", "l2")}
    with RawInitiator("127.0.0.1", d.port) as ini:
        ini.login(DEMO_IQN, initiator="iqn.2026-11.org.example:xcopy", isid=0x23D000000077)
        for _ in range(3):  # the unit attention of a new nexus
            if ini.test_unit_ready().status == 0:
                break
        r = xcopy(ini, xcopy_list(1, naa["demo0"], naa["l2"], 8, 0, 0))
        assert r.status == 0x02 and r.sense_key == 0x0A and r.sense[12:14] == b"\x0d\x02", r.sense.hex()
        assert xcopy(ini, xcopy_list(2, naa["demo0"], naa["demo0"], 8, 0, 64)).status == 0
    # One worker's set is taken by that worker.
    r = api(d, "POST", "/snapshots", {"snapshots": ["l2@s"]})
    assert r.status_code == 201, r.text
    assert sorted(s["name"] for s in api(d, "GET", "/snapshots").json()) == ["demo0@x", "l2@s", "l2@x"]
    # An unmapped LUN lives on worker 0 and moves with its first mapping on another worker's target.
    assert api(d, "POST", "/luns", {"name": "l3", "size": "16MiB"}).status_code == 201
    assert "l3" in status(d)["workers"][0]["luns"]
    r = api(d, "POST", f"/targets/{T2}/luns", {"name": "l3", "lun": 3})
    assert r.status_code == 201, r.text
    w = status(d)["workers"]
    assert "l3" in w[1]["luns"] and "l3" not in w[0]["luns"], w
    qemu(d.url(3, iqn=T2), "write -P 0x33 0 64k", "read -P 0x33 0 64k")
    # Unmapped again, it goes back to worker 0, data and all.
    assert api(d, "DELETE", f"/targets/{T2}/luns/l3").status_code == 204
    w = status(d)["workers"]
    assert "l3" in w[0]["luns"] and "l3" not in w[1]["luns"], w
    assert api(d, "POST", f"/targets/{DEMO_IQN}/luns", {"name": "l3", "lun": 5}).status_code == 201
    qemu(d.url(5), "read -P 0x33 0 64k")
    # ACLs go to the portal, which runs the logins: an initiator not listed is refused there.
    assert api(d, "POST", f"/targets/{T2}/acls", {"initiator": "iqn.2026-11.org.example:only"}).status_code == 201
    p = run(["qemu-io", "-f", "raw", "-c", "read 0 4k", d.url(0, iqn=T2)], timeout=60)
    assert p.returncode != 0, describe(p)
    # An empty target goes to the worker of the first LUN it maps (here from worker 0 to worker 1, which has l2).
    t4 = "iqn.2026-11.io.lunsync:fourth"
    assert api(d, "POST", "/targets", {"iqn": t4}).status_code == 201
    assert status(d)["workers"][0]["targets"] == [DEMO_IQN, t4]
    assert api(d, "POST", f"/targets/{t4}/luns", {"name": "l2"}).status_code == 201
    w = status(d)["workers"]
    assert w[0]["targets"] == [DEMO_IQN] and w[1]["targets"] == [T2, t4], w
    qemu(d.url(0, iqn=t4), "read 0 4k")
    assert api(d, "DELETE", f"/targets/{t4}?force=true").status_code == 204
    # Deleting a target frees its place; a new one goes to the worker with the fewest.
    assert api(d, "DELETE", f"/targets/{T2}?force=true").status_code == 204
    assert api(d, "POST", "/targets", {"iqn": "iqn.2026-11.io.lunsync:third"}).status_code == 201
    assert status(d)["workers"][1]["targets"] == ["iqn.2026-11.io.lunsync:third"]
    d.assert_healthy()



def test_a_lun_made_from_a_snapshot_is_served_by_the_snapshots_worker(two: Daemon, tmp_path: Any) -> None:
    """``resync LUN@SNAP --to NEW`` and ``lun create NEW --from LUN@SNAP`` of worker 1's LUN: the new LUN is created and
    served by worker 1 (which serves the snapshot's origin), holds the
    snapshot's data, serves I/O mapped on worker 1's target, and stays on worker 1 unmapped, across a restart too."""
    d = two
    qemu(d.url(0, iqn=T2), "write -P 0x51 0 2M", "flush")
    assert api(d, "POST", "/snapshots", {"snapshots": ["l2@s"]}).status_code == 201
    qemu(d.url(0, iqn=T2), "write -P 0x52 0 1M", "write -P 0x53 4M 1M", "flush")  # after the snapshot
    p = run([*_cli(d), "resync", "l2@s", "--to", "r1", "--wait"], timeout=120)
    assert p.returncode == 0, describe(p)
    p = run([*_cli(d), "lun", "create", "c1", "--from", "l2@s"], timeout=60)
    assert p.returncode == 0, describe(p)
    w = status(d)["workers"]
    assert {"l2", "r1", "c1"} <= set(w[1]["luns"]) and not {"r1", "c1"} & set(w[0]["luns"]), w
    # A restore into a new LUN still being written is pinned to worker 1: mapping it on worker 0's target is refused.
    p = run([*_cli(d), "resync", "l2@s", "--to", "r2", "--rate", "1"], timeout=60)
    assert p.returncode == 0, describe(p)
    r = api(d, "POST", f"/targets/{DEMO_IQN}/luns", {"name": "r2"})
    assert r.status_code == 409 and "being restored" in r.json()["error"] and "worker 1" in r.json()["error"], r.text
    assert "r2" in status(d)["workers"][1]["luns"]
    # Nor does unmapping its origin from worker 1's target move it (the origin stays mapped).
    r = api(d, "DELETE", f"/targets/{T2}/luns/l2")
    assert r.status_code == 409 and "'r2' is being restored" in r.json()["error"], r.text
    assert {"l2", "r2"} <= set(status(d)["workers"][1]["luns"])
    # apply of the array as it is moves nothing: r2 (unmapped, being restored) stays with its origin's worker.
    exported = run([*_cli(d), "export"], check=True).stdout
    now = tmp_path / "now.toml"
    now.write_text(exported)
    p = run([*_cli(d), "apply", str(now)], timeout=60)
    assert p.returncode == 0 and "refused" not in p.stdout + p.stderr, describe(p)
    # A restore onto an existing LUN of another worker is run by that worker (dry run here: every region of the
    # snapshot, read from worker 1, would be copied).
    r = api(d, "POST", "/recovery/resync", {"pairs": [{"snapshot": "l2@s", "destination": "demo0"}],
                                            "dry_run": True})
    assert r.status_code == 200 and r.json()["bytes"] == 64 * MiB, r.text
    # Mapped on worker 1's target, r1 has the snapshot's data (not what l2 was written after it) and takes writes.
    p = run([*_cli(d), "lun", "map", "r1", "--target", T2, "--lun", "1"], timeout=60)
    assert p.returncode == 0, describe(p)
    assert "r1" in status(d)["workers"][1]["luns"]
    qemu(d.url(1, iqn=T2), "read -P 0x51 0 2M", "read -P 0 4M 1M", "write -P 0x54 1M 64k", "flush",
         "read -P 0x54 1M 64k", "read -P 0x51 0 1M")
    qemu(d.url(0, iqn=T2), "read -P 0x52 0 1M", "read -P 0x53 4M 1M")  # and l2 kept its own
    # A restart deals the LUNs the same way from the catalog: c1 (unmapped) on worker 1 with its origin.
    d.restart()
    w = status(d)["workers"]
    assert {"l2", "r1", "c1", "r2"} <= set(w[1]["luns"]) and not {"r1", "c1", "r2"} & set(w[0]["luns"]), w
    p = run([*_cli(d), "lun", "map", "c1", "--target", T2, "--lun", "2"], timeout=60)
    assert p.returncode == 0, describe(p)
    qemu(d.url(2, iqn=T2), "read -P 0x51 0 2M", "read -P 0 4M 1M", "write -P 0x55 0 4k", "read -P 0x55 0 4k")
    qemu(d.url(1, iqn=T2), "read -P 0x54 1M 64k")
    d.assert_healthy()


def test_apply_maps_across_workers_as_the_map_route_does(two: Daemon, tmp_path: Any) -> None:
    """``lunsync apply`` moves an unmapped LUN to the worker of the target it maps it on, and refuses (409, the dry run
    marking it) a whole plan in which a LUN would be shown by targets of two workers, writing nothing of it."""
    from dataclasses import replace

    from lunsync.provider.config import dump_config, parse_config
    from lunsync.snapshots.model import LunConfig, LunMapping

    d = two
    exported = run([*_cli(d), "export"], check=True).stdout
    cfg = parse_config(exported)
    demo, second = (next(t for t in cfg.targets if t.iqn == iqn) for iqn in (DEMO_IQN, T2))
    # l2 (worker 1's, on the second target) shown by the demo target (worker 0's) as well.
    split = tmp_path / "split.toml"
    split.write_text(dump_config(replace(cfg, targets=(replace(demo, luns=(*demo.luns, LunMapping(7, "l2"))),
                                                       second))))
    p = run([*_cli(d), "apply", "--dry-run", str(split)], timeout=60)
    assert p.returncode == 0, describe(p)
    assert "! lun l2 would be shown by targets of different workers" in p.stdout, describe(p)
    assert f"{DEMO_IQN} on worker 0; {T2} on worker 1" in p.stdout, describe(p)
    assert "apply would be refused: 1 step(s)" in p.stdout, describe(p)
    p = run([*_cli(d), "apply", str(split)], timeout=60)
    assert p.returncode == 4, describe(p)  # the CLI's exit code for a 409
    assert "lun 'l2' would be shown by targets of different workers" in p.stderr, describe(p)
    r = api(d, "POST", "/apply", {"config": split.read_text()})
    assert r.status_code == 409 and "worker 0" in r.json()["error"] and "worker 1" in r.json()["error"], r.text
    assert run([*_cli(d), "export"], check=True).stdout == exported  # nothing of the plan was written
    qemu(d.url(0, iqn=T2), "write -P 0x44 0 64k", "read -P 0x44 0 64k")  # and l2 serves on
    # A new LUN mapped on the second target goes to worker 1 with it, and serves there.
    moved = tmp_path / "moved.toml"
    moved.write_text(dump_config(replace(cfg, luns=(*cfg.luns, LunConfig("l4", 16 * MiB)),
                                         targets=(demo, replace(second, luns=(*second.luns, LunMapping(4, "l4")))))))
    p = run([*_cli(d), "apply", str(moved)], timeout=60)
    assert p.returncode == 0 and "2 change(s) applied" in p.stdout, describe(p)
    w = status(d)["workers"]
    assert "l4" in w[1]["luns"] and "l4" not in w[0]["luns"], w
    qemu(d.url(4, iqn=T2), "write -P 0x45 0 64k", "read -P 0x45 0 64k")
    d.assert_healthy()


def test_serve_config_puts_targets_linked_by_their_luns_on_one_worker(daemon_factory: Any) -> None:
    """``serve --config``: c shows x (a's) and y (b's), so a, b and c are dealt to one worker, and c shows both."""
    from lunsync.provider.config import dump_config
    from lunsync.snapshots.model import Config, LunConfig, LunMapping, TargetConfig

    require_tools("qemu-io")
    a, b, c = (f"iqn.2026-11.io.lunsync:{n}" for n in "abc")
    cfg = Config(luns=(LunConfig("x", 16 * MiB), LunConfig("y", 16 * MiB)),
                 targets=(TargetConfig(a, luns=(LunMapping(0, "x"),)), TargetConfig(b, luns=(LunMapping(0, "y"),)),
                          TargetConfig(c, luns=(LunMapping(0, "x"), LunMapping(1, "y")))))
    d: Daemon = daemon_factory(workers=2, api=True, demo=False, config=dump_config(cfg))
    w = status(d)["workers"]
    assert w[0]["targets"] == [a, b, c] and w[0]["luns"] == ["x", "y"] and w[1]["targets"] == [], w
    qemu(d.url(1, iqn=c), "write -P 0x46 0 64k", "flush")
    qemu(d.url(0, iqn=b), "read -P 0x46 0 64k")
    d.assert_healthy()

def _login(port: int, iqn: str, isid: int) -> tuple[socket.socket, int]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    pairs = [("InitiatorName", "iqn.2026-11.org.example:raw"), ("TargetName", iqn), ("SessionType", "Normal")]
    s.sendall(login_pdu(pairs).replace(bytes.fromhex("23d000000001"), isid.to_bytes(6, "big"), 1))
    bhs = _recv_pdu(s)
    assert bhs[0] == 0x23 and bhs[36:38] == b"\0\0", bhs.hex()
    return s, int.from_bytes(bhs[14:16], "big")


def test_session_reinstatement_across_the_hand_off(two: Daemon) -> None:
    d = two
    old, tsih_old = _login(d.port, T2, 0x23D000000042)
    old.sendall(scsi_cmd(bytes(6), itt=1, cmd_sn=1, edtl=0))
    assert _recv_pdu(old)[0] == 0x21  # TEST UNIT READY answered by worker 1
    sessions = api(d, "GET", "/sessions").json()
    assert [s["tsih"] for s in sessions] == [tsih_old] and sessions[0]["target"] == T2, sessions
    new, tsih_new = _login(d.port, T2, 0x23D000000042)  # same initiator and ISID: the old session is reinstated
    assert tsih_new != tsih_old
    old.settimeout(10)
    assert old.recv(100) == b""  # worker 1 dropped the old connection
    new.sendall(scsi_cmd(bytes(6), itt=1, cmd_sn=1, edtl=0))
    assert _recv_pdu(new)[0] == 0x21
    deadline = time.monotonic() + 10
    while [s["tsih"] for s in api(d, "GET", "/sessions").json()] != [tsih_new]:
        assert time.monotonic() < deadline, api(d, "GET", "/sessions").text
        time.sleep(0.05)
    # A forced logout through the control's API reaches the worker serving the session.
    assert api(d, "DELETE", f"/sessions/{tsih_new}").status_code == 204
    new.settimeout(10)
    assert new.recv(100) == b""
    old.close()
    new.close()


def test_a_worker_killed_mid_write_is_restarted_and_no_acknowledged_write_is_lost(two: Daemon) -> None:
    d = two
    lun = d.data_dir / "luns" / "l2.img"
    victim = status(d)["workers"][1]["pid"]
    writes = [c for i in range(32) for c in ("-c", f"write -P 0x{0x40 + i:02x} {i * MiB} {MiB}")]
    q = subprocess.Popen(["qemu-io", "-f", "raw", *writes, "-c", "flush", d.url(0, iqn=T2)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while _byte_at(lun, 2 * MiB) != 0x42:
        assert time.monotonic() < deadline and q.poll() is None, "qemu-io finished before the kill"
        time.sleep(0.005)
    os.kill(victim, signal.SIGKILL)
    out, _ = q.communicate(timeout=180)
    assert q.returncode == 0, out
    assert out.count("wrote 1048576/1048576 bytes") == 32, out
    w = status(d)["workers"][1]
    assert w["up"] and w["restarts"] == 1 and w["pid"] != victim, w
    # Every write qemu-io was told is done is on the LUN, read back through the restarted worker.
    qemu(d.url(0, iqn=T2), *(f"read -P 0x{0x40 + i:02x} {i * MiB} {MiB}" for i in range(32)))
    # Worker 0 never noticed: the demo target served throughout.
    assert status(d)["workers"][0]["restarts"] == 0
    qemu(d.url(0), "write -P 0x77 0 4k", "read -P 0x77 0 4k")
    assert "worker 1 (pid" in d.log_text() and "SIGKILL" in d.log_text()



def test_a_vss_snapshot_set_over_two_workers_is_taken_by_the_two_phase_hold(two: Daemon) -> None:
    """The provider's snapshot set (BeginPrepare .. Commit) with demo0 (worker 0) and l2 (worker 1): one set, one
    point in time, each snapshot served by its LUN's worker; GetTargetLuns of the set and AbortSnapshots reach both."""
    d = two
    qemu(d.url(0), "write -P 0x61 0 1M", "flush")
    qemu(d.url(0, iqn=T2), "write -P 0x62 0 1M", "flush")
    luns = api(d, "GET", "/provider/luns").json()["luns"]
    info = {x["name"]: x["lun_information"] for x in luns}
    # AreLunsSupported over both workers' LUNs: yes, each named; with a LUN neither serves: no, that one unnamed.
    r = api(d, "POST", "/provider/are-luns-supported", {"luns": [info["l2"], info["demo0"]]})
    assert r.status_code == 200 and r.json() == {"supported": True, "luns": ["l2", "demo0"]}, r.text
    stranger = {**info["l2"], "serial_number": "NOT-OURS", "device_id_descriptor": {"version": 1, "identifiers": []}}
    r = api(d, "POST", "/provider/are-luns-supported", {"luns": [info["demo0"], stranger, info["l2"]]})
    assert r.status_code == 200 and r.json() == {"supported": False, "luns": ["demo0", None, "l2"]}, r.text
    sid = "7e11"
    for snap_id, name in (("a", "demo0"), ("b", "l2")):
        r = api(d, "POST", f"/provider/snapshot-sets/{sid}/begin-prepare", {"snapshot_id": snap_id,
                                                                           "luns": [info[name]]})
        assert r.status_code == 200 and r.json()["luns"] == [name], r.text
    for step in ("end-prepare", "pre-commit", "commit"):
        r = api(d, "POST", f"/provider/snapshot-sets/{sid}/{step}")
        assert r.status_code == 200, (step, r.text)
    assert sorted(r.json()["snapshots"]) == [f"demo0@vss-{sid}", f"l2@vss-{sid}"], r.text
    qemu(d.url(0, iqn=T2), "write -P 0x63 0 1M", "flush")  # after the point in time
    snaps = {s["name"]: s for s in api(d, "GET", "/snapshots").json()}
    one, two_ = snaps[f"demo0@vss-{sid}"], snaps[f"l2@vss-{sid}"]
    assert one["set"] == two_["set"] == f"vss-{sid}" and one["created_at"] == two_["created_at"], (one, two_)
    r = api(d, "POST", f"/provider/snapshot-sets/{sid}/post-commit", {"count": 2})
    assert r.status_code == 200, r.text
    r = api(d, "POST", "/provider/get-target-luns", {"luns": [info["demo0"], info["l2"]], "snapshot_set_id": sid})
    assert r.status_code == 200 and [x["snapshot"] for x in r.json()["luns"]] == [
        f"demo0@vss-{sid}", f"l2@vss-{sid}"], r.text
    # l2's snapshot, kept by worker 1, holds what l2 held at the commit.
    r = api(d, "POST", f"/snapshots/l2@vss-{sid}/expose", {"target": T2})
    assert r.status_code == 201, r.text
    p = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x62 0 1M", d.url(int(r.json()["exposed"]["lun"]),
                                                                            iqn=T2)], timeout=60)
    assert p.returncode == 0 and "verification failed" not in p.stdout, describe(p)
    assert api(d, "DELETE", f"/snapshots/l2@vss-{sid}/expose").status_code in (200, 204)
    # ResyncLuns of both snapshot LUNs onto their LUNs, which two workers serve: one recovery set across workers,
    # followed through VSS's async handle; l2 holds what it held at the commit again.
    targets = api(d, "POST", "/provider/get-target-luns", {
        "luns": [info["demo0"], info["l2"]], "snapshot_set_id": sid}).json()["luns"]
    r = api(d, "POST", "/provider/resync-luns", {"source_luns": [t["target"] for t in targets],
                                                 "target_luns": [info["demo0"], info["l2"]]})
    assert r.status_code == 202 and r.headers["location"] == r.json()["query"], r.text
    rs = r.json()["id"]
    r = api(d, "POST", f"/provider/async/{rs}/wait?timeout_s=25")
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    assert [(p["snapshot"], p["destination"]) for p in r.json()["pairs"]] == [
        (f"demo0@vss-{sid}", "demo0"), (f"l2@vss-{sid}", "l2")], r.text
    qemu(d.url(0, iqn=T2), "read -P 0x62 0 1M")
    r = api(d, "POST", "/provider/resync-luns", {"source_luns": [targets[0]["target"], info["demo0"]],
                                                 "target_luns": [info["demo0"], info["l2"]]})
    assert r.status_code == 404 and r.json()["code"] == "VSS_E_OBJECT_NOT_FOUND", r.text
    # The calls that act LUN by LUN, over both workers' LUNs: each worker does its own, answered in the order asked.
    snap_infos = [t["target"] for t in targets]
    # l2's snapshot is worker 1's to answer for, and is no LUN to snapshot: the set is not supported.
    r = api(d, "POST", "/provider/are-luns-supported", {"luns": [info["demo0"], snap_infos[1]]})
    assert r.status_code == 200 and r.json() == {"supported": False, "luns": ["demo0", None]}, r.text
    r = api(d, "POST", "/provider/locate-luns", {"luns": snap_infos[::-1]})
    assert r.status_code == 200, r.text
    assert [(x["snapshot"], x["target"]) for x in r.json()["luns"]] == [(f"l2@vss-{sid}", T2),
                                                                        (f"demo0@vss-{sid}", DEMO_IQN)], r.text
    p = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x62 0 1M", d.url(int(r.json()["luns"][0]["lun"]),
                                                                            iqn=T2)], timeout=60)
    assert p.returncode == 0 and "verification failed" not in p.stdout, describe(p)
    r = api(d, "POST", "/provider/on-lun-state-change", {"snapshot_luns": snap_infos, "flags": 0x800 | 0x100})
    assert r.status_code == 200 and r.json()["flags"] == 0x900, r.text
    assert sorted(r.json()["actions"]) == sorted([f"read-write demo0@vss-{sid}", f"masked demo0@vss-{sid}",
                                                  f"read-write l2@vss-{sid}", f"masked l2@vss-{sid}"]), r.text
    assert all(s["exposed"] is None for s in api(d, "GET", "/snapshots").json() if s["name"].endswith(f"@vss-{sid}"))
    # AbortSnapshots deletes both, each on its LUN's worker.
    r = api(d, "POST", f"/provider/snapshot-sets/{sid}/abort")
    assert r.status_code == 200 and r.json()["state"] == "aborted", r.text
    assert not [s for s in api(d, "GET", "/snapshots").json() if s["name"].endswith(f"@vss-{sid}")]
    d.assert_healthy()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_workers_0_is_one_per_core_of_the_affinity_and_one_process_on_one_core(daemon_factory: Any) -> None:
    """serve --workers 0 runs a worker per core the daemon may run on (its CPU affinity, not the machine's count);
    pinned to one core (taskset, a cpuset) it is one process, as --workers 1 is: no control, no workers, the status
    says so, and a LUN serves I/O."""
    require_tools("qemu-io")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        d: Daemon = daemon_factory(workers=0, api=True, demo_size="16MiB")
        w = status(d)["workers"]
        assert [x["index"] for x in w] == list(range(len(cores))) and all(x["up"] for x in w), w
        assert d.proc is not None and sorted(_children(d.proc.pid)) == sorted(x["pid"] for x in w)
        d.terminate()
    os.sched_setaffinity(0, {cores[0]})  # the daemon inherits it, as from taskset -c
    try:
        one: Daemon = daemon_factory(workers=0, api=True, demo_size="16MiB")
    finally:
        os.sched_setaffinity(0, cores)
    assert one.proc is not None and os.sched_getaffinity(one.proc.pid) == {cores[0]}
    assert status(one)["workers"] == [] and _children(one.proc.pid) == []
    assert "none: one process" in run([*_cli(one), "status"], check=True).stdout
    qemu(one.url(0), "write -P 0x5a 0 64k", "flush", "read -P 0x5a 0 64k")
    one.assert_healthy()
    single: Daemon = daemon_factory(workers=1, api=True, demo_size="16MiB")
    assert single.proc is not None and status(single)["workers"] == [] and _children(single.proc.pid) == []
