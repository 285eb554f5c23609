"""Live restores through the real daemon: qemu-io (libiscsi) reads and writes over iSCSI while the ``lunsync`` CLI
drives recovery sets, the VSS provider routes are called one by one over HTTP, and the daemon is killed with -9 in
the middle of a resync."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e.harness import DEMO_IQN, Daemon, PatternReader, describe, lunsync_command, require_tools, run

pytestmark = pytest.mark.e2e
MIB = 1 << 20


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Iterator[Daemon]:
    require_tools("qemu-io")
    yield daemon_factory(api=True, metrics=True)


def env(d: Daemon) -> dict[str, str]:
    return {"LUNSYNC_API": d.api_url, "LUNSYNC_DATA_DIR": str(d.data_dir)}


def cli(d: Daemon, *args: str, ok: bool = True, timeout: float = 120) -> Any:
    p = run([*lunsync_command(), *args, "--json"], env=env(d), timeout=timeout)
    if ok:
        assert p.returncode == 0, describe(p)
        return json.loads(p.stdout)
    assert p.returncode != 0, describe(p)
    return p.stderr


def qemu(d: Daemon, command: str, lun: int = 0, *, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    return run(["qemu-io", "-f", "raw", *(["-r"] if read_only else []), "-c", command, d.url(lun)])


def write(d: Daemon, byte: int, offset: int, length: int, lun: int = 0) -> None:
    p = qemu(d, f"write -P {byte:#x} {offset} {length}", lun)
    assert p.returncode == 0 and "wrote" in p.stdout, describe(p)


def reads(d: Daemon, byte: int, offset: int, length: int, lun: int = 0) -> bool:
    p = qemu(d, f"read -P {byte:#x} {offset} {length}", lun, read_only=True)
    return p.returncode == 0 and "read " in p.stdout and "verification failed" not in p.stdout + p.stderr


def assert_reads(d: Daemon, byte: int, offset: int, length: int, lun: int = 0) -> None:
    p = qemu(d, f"read -P {byte:#x} {offset} {length}", lun, read_only=True)
    assert p.returncode == 0 and "read " in p.stdout and "verification failed" not in p.stdout + p.stderr, \
        describe(p)


def metric(d: Daemon, name: str) -> float:
    text = httpx.get(d.metrics_url, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_abc_restore_to_the_origin_with_a_reader_throughout(daemon: Daemon) -> None:
    d = daemon
    write(d, 0xAA, 0, 256 * MIB)  # A everywhere
    cli(d, "snapshot", "create", "demo0@s1")
    write(d, 0xBB, 0, 64 * MIB)  # B over the first quarter: 64 MiB of changed chunks
    dry = cli(d, "resync", "demo0@s1", "--dry-run")
    assert dry["bytes"] == 64 * MIB  # only what changed
    # One reader runs throughout on a range B never touched; a second starts with the resync, on B's range, and must
    # see A from its first read (redirected to the snapshot) to its last (copied back).
    with PatternReader(d.url(), 0xAA, 128 * MIB, 32 * MIB) as reader:
        started = cli(d, "resync", "demo0@s1", "--rate", "6")
        rid = started["id"]
        assert started["state"] == "resyncing"
        redirected = PatternReader(d.url(), 0xAA, 32 * MIB, 32 * MIB).__enter__()
        assert_reads(d, 0xAA, 0, 64 * MIB)  # at once: the snapshot's contents
        write(d, 0xCC, 8 * MIB, 4 * MIB)  # C during the resync
        shown = cli(d, "recovery", "show", rid)
        assert shown["state"] == "resyncing" and 0 <= shown["percent"] < 100
        assert shown["bytes_total"] == 64 * MIB and shown["bytes_done"] <= 64 * MIB
        first = metric(d, "lunsync_recovery_bytes_copied_total")
        time.sleep(1.5)
        second = metric(d, "lunsync_recovery_bytes_copied_total")
        assert second > first, (first, second)
        final = cli(d, "recovery", "wait", rid, timeout=60)
        assert final["state"] == "done" and final["percent"] == 100.0
        assert final["redirected_reads"] > 0
        redirected.__exit__()
    assert reader.runs >= 2 and not reader.failures, reader.failures[:1]
    assert redirected.runs >= 2 and not redirected.failures, redirected.failures[:1]
    assert_reads(d, 0xCC, 8 * MIB, 4 * MIB)
    assert_reads(d, 0xAA, 0, 8 * MIB)
    assert_reads(d, 0xAA, 12 * MIB, 244 * MIB)
    snap_lun = 5
    cli(d, "snapshot", "expose", "demo0@s1", "--target", DEMO_IQN, "--lun", str(snap_lun))
    assert_reads(d, 0xAA, 0, 256 * MIB, lun=snap_lun)  # the snapshot was never touched
    cli(d, "snapshot", "unexpose", "demo0@s1")
    # Reuse: the same snapshot again; C goes, A everywhere.
    again = cli(d, "resync", "demo0@s1", "--wait", "--verify", timeout=120)
    # The chunk maps remember every chunk that diverged since s1 (B's 64 MiB, C inside it), not which of them a
    # restore made equal again; still never the whole LUN.
    assert again["state"] == "done" and again["bytes_total"] == 64 * MIB
    assert all(p["verified"] for p in again["pairs"])
    assert_reads(d, 0xAA, 0, 256 * MIB)
    d.assert_healthy()


def test_kill9_during_a_resync_then_restart_completes_it(daemon: Daemon) -> None:
    d = daemon
    write(d, 0xAA, 0, 256 * MIB)
    cli(d, "snapshot", "create", "demo0@s1")
    write(d, 0xBB, 0, 256 * MIB)
    rid = cli(d, "resync", "demo0@s1", "--rate", "32")["id"]  # 256 MiB changed: about 8 s
    time.sleep(2.5)
    mid = cli(d, "recovery", "show", rid)
    assert mid["state"] == "resyncing" and 0 < mid["percent"] < 100
    d.kill9()
    d.start()
    resumed = cli(d, "recovery", "show", rid)
    assert resumed["state"] == "resyncing"
    assert_reads(d, 0xAA, 0, 256 * MIB)  # still the snapshot, straight after the restart
    final = cli(d, "recovery", "wait", rid, timeout=90)
    assert final["state"] == "done", final
    assert_reads(d, 0xAA, 0, 256 * MIB)
    assert "resumed with" in d.log_text()


def test_new_lun_smaller_lun_grown_and_masking(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    require_tools("qemu-io")
    hooks = tmp_path / "hooks.log"
    hook_file = tmp_path / "hooks.toml"
    hook_file.write_text("".join(
        f'[hook.{name}]\ncommand = ["/bin/sh", "-c", "echo {words} >> {hooks}"]\n'
        for name, words in (("pre1", "pre1"), ("pre2", "pre2"), ("post", "post $LUNSYNC_RECOVERY_STATE"))))
    hook_file.chmod(0o600)
    d = daemon_factory(api=True, metrics=True, extra_args=["--hooks", str(hook_file)])
    write(d, 0xAA, 0, 256 * MIB)
    cli(d, "snapshot", "create", "demo0@s1")
    # Only names reach the array: a command, or a name the hook file lacks, is refused before anything starts.
    for refused in (f"echo pwned >> {hooks}", "nope"):
        err = cli(d, "resync", "demo0@s1", "--pre-restore", refused, ok=False)
        assert "unknown hook" in err or "pre_restore" in err, err
    assert not hooks.exists()
    assert cli(d, "recovery", "list") == []
    cli(d, "lun", "create", "small", "--size", "64MiB")
    cli(d, "lun", "map", "small", "--target", DEMO_IQN, "--lun", "1")
    write(d, 0x11, 0, 64 * MIB, lun=1)
    rid = cli(d, "resync", "demo0@s1", "demo0@s1", "--to", "small", "--to", "lab", "--rate", "64", "--mask",
              "--pre-restore", "pre1", "--pre-restore", "pre2", "--post-restore", "post")["id"]
    # Masked from every initiator during the restore: qemu-io cannot use LUN 1.
    assert not reads(d, 0xAA, 0, MIB, lun=1)
    final = cli(d, "recovery", "wait", rid, timeout=90)
    assert final["state"] == "done", final
    assert hooks.read_text().splitlines() == ["pre1", "pre2", "post done"]
    assert cli(d, "lun", "show", "small")["size_bytes"] == 256 * MIB  # grown
    assert cli(d, "lun", "show", "lab")["size_bytes"] == 256 * MIB  # created
    assert_reads(d, 0xAA, 0, 256 * MIB, lun=1)  # unmasked, grown, restored
    cli(d, "lun", "map", "lab", "--target", DEMO_IQN, "--lun", "2")
    assert_reads(d, 0xAA, 0, 256 * MIB, lun=2)


def test_in_progress_cancel_and_swap(daemon: Daemon) -> None:
    d = daemon
    write(d, 0xAA, 0, 64 * MIB)
    cli(d, "snapshot", "create", "demo0@s1")
    cli(d, "snapshot", "create", "demo0@s2")
    write(d, 0xBB, 0, 64 * MIB)
    rid = cli(d, "resync", "demo0@s1", "--to", "lab", "--rate", "1")["id"]
    err = cli(d, "resync", "demo0@s2", "--to", "lab", ok=False)
    # In plain words: VSS's error names belong to the provider API, not to the command line.
    assert "lab is being resynced by recovery set" in err and "VSS_E" not in err, err
    # A LUN under restore cannot be snapshotted: its file is half old, half restored.
    assert "being restored" in cli(d, "snapshot", "create", "lab@mid", ok=False)
    # Nor can the snapshot a restore reads from be deleted under it.
    assert "source of recovery" in cli(d, "snapshot", "delete", "demo0@s1", ok=False)
    # Nor the LUN it restores into.
    assert "being restored by recovery" in cli(d, "lun", "delete", "lab", ok=False)
    cancelled = cli(d, "recovery", "cancel", rid)
    assert cancelled["state"] == "cancelled" and cancelled["percent"] < 100
    err = cli(d, "resync", "demo0@nope", ok=False)
    assert "no snapshot demo0@nope" in err and "VSS_E" not in err, err
    # swap --identity keep: the LUN serves the snapshot and keeps its serial; the snapshot is used up.
    serial = cli(d, "lun", "show", "demo0")["serial"]
    out = cli(d, "swap", "demo0@s1", "--identity", "keep", "--wait", timeout=60)
    assert out["state"] == "done"
    assert_reads(d, 0xAA, 0, 64 * MIB)
    assert cli(d, "lun", "show", "demo0")["serial"] == serial
    names = [s["name"] for s in cli(d, "snapshot", "list")]
    assert "demo0@s1" not in names and "demo0@s2" in names
    # swap --identity snapshot: the LUN takes the snapshot's identity.
    snap_serial = cli(d, "snapshot", "show", "demo0@s2")["serial"]
    write(d, 0xDD, 0, MIB)
    out = cli(d, "swap", "demo0@s2", "--identity", "snapshot", "--wait", timeout=60)
    assert out["state"] == "done"
    assert cli(d, "lun", "show", "demo0")["serial"] == snap_serial
    assert_reads(d, 0xAA, 0, 64 * MIB)
    listed = cli(d, "recovery", "list")
    assert [s["state"] for s in listed] == ["cancelled", "done", "done"]


def test_provider_methods_one_by_one(daemon: Daemon) -> None:
    d = daemon
    h = {"Authorization": f"Bearer {d.api_token}"}
    api = httpx.Client(base_url=d.api_url + "/v1/provider", headers=h, timeout=60)
    write(d, 0xAA, 0, 16 * MIB)
    caps = api.get("/capabilities").json()
    assert caps["mask"] & 0x8 and caps["mask"] & 0x4  # LUN_RESYNC, LUN_REPOINT
    luns = api.get("/luns").json()["luns"]
    demo = next(x["lun_information"] for x in luns if x["name"] == "demo0")
    assert demo["vendor_id"] == "LUNSYNC" and demo["device_id_descriptor"]["identifiers"][0]["type"] == 3
    assert api.post("/are-luns-supported", json={"luns": [demo]}).json()["supported"] is True
    filled = api.post("/fill-in-lun-info", json={"lun": {"serial_number": demo["serial_number"]}}).json()
    assert filled["name"] == "demo0"
    sid = "9f1c"
    r = api.post(f"/snapshot-sets/{sid}/begin-prepare", json={"snapshot_id": "a1", "luns": [demo]})
    assert r.status_code == 200, r.text
    assert api.post(f"/snapshot-sets/{sid}/commit").status_code == 409  # VSS_E_BAD_STATE: not prepared yet
    for step in ("end-prepare", "pre-commit", "commit"):
        r = api.post(f"/snapshot-sets/{sid}/{step}")
        assert r.status_code == 200, (step, r.text)
    assert api.post(f"/snapshot-sets/{sid}/post-commit", json={"count": 1}).json()["snapshots"] == [
        f"demo0@vss-{sid}"]
    target = api.post("/get-target-luns", json={"luns": [demo], "snapshot_set_id": sid}).json()["luns"][0]["target"]
    assert target["serial_number"] != demo["serial_number"]
    located = api.post("/locate-luns", json={"luns": [target]}).json()["luns"][0]
    assert located["target"] == DEMO_IQN
    assert_reads(d, 0xAA, 0, 16 * MIB, lun=located["lun"])
    write(d, 0xBB, 0, 16 * MIB)
    state = api.post("/on-lun-state-change", json={"snapshot_luns": [target], "original_luns": [demo],
                                                  "flags": 0x100}).json()
    assert state["flag_names"] == ["NOTIFY_READ_WRITE"]
    bad = api.post("/on-lun-state-change", json={"flags": 0x1})
    assert bad.status_code == 400 and bad.json()["code"] == "E_INVALIDARG"
    handle = api.post("/resync-luns", json={"source_luns": [target], "target_luns": [demo]})
    assert handle.status_code == 202, handle.text
    hid = handle.json()["id"]
    done = httpx.post(f"{d.api_url}{handle.json()['wait']}", params={"timeout_s": 60}, headers=h, timeout=90).json()
    assert done["state"] == "done" and done["bytes_total"] == 16 * MIB, done
    assert httpx.get(f"{d.api_url}/v1/recovery/{hid}", headers=h).json()["state"] == "done"
    # The provider DLL's IVssAsync: the same set under /v1/provider/async, refusals with their VSS names.
    queried = api.get(f"/async/{hid}").json()
    assert queried["state"] == "done" and queried["percent"] == 100, queried
    assert api.post(f"/async/{hid}/wait", params={"timeout_s": 1}).json()["state"] == "done"
    late = api.post(f"/async/{hid}/cancel")
    assert late.status_code == 409 and late.json()["code"] == "VSS_E_BAD_STATE", late.text
    plain = httpx.post(f"{d.api_url}/v1/recovery/{hid}/cancel", headers=h)
    assert plain.status_code == 409 and plain.json().get("code") != "VSS_E_BAD_STATE", plain.text
    unknown = api.get("/async/no-such-set")
    assert unknown.status_code == 404 and unknown.json()["code"] == "VSS_E_OBJECT_NOT_FOUND", unknown.text
    assert_reads(d, 0xAA, 0, 16 * MIB)
    missing = api.post("/on-lun-empty", json={"lun": {"serial_number": "NOPE"}})
    assert missing.status_code == 404 and missing.json()["code"] == "VSS_E_OBJECT_NOT_FOUND"
    assert api.post("/on-reuse-luns", json={"snapshot_luns": [target]}).json()["reused"] == [f"demo0@vss-{sid}"]
    assert api.post("/abort", json={}).status_code in (404, 405)


def test_new_lun_from_a_snapshot_is_usable_at_once(daemon: Daemon) -> None:
    d = daemon
    write(d, 0xAA, 0, 256 * MIB)  # A
    cli(d, "snapshot", "create", "demo0@s1")
    write(d, 0xBB, 0, 256 * MIB)  # B on the origin
    lun = cli(d, "lun", "create", "fromsnap", "--from", "demo0@s1", "--rate", "16")
    assert lun["size_bytes"] == 256 * MIB and lun["block_size"] == 512
    cli(d, "lun", "map", "fromsnap", "--target", DEMO_IQN, "--lun", "3")
    assert_reads(d, 0xAA, 0, 256 * MIB, lun=3)  # the snapshot's data while the copy has barely begun
    write(d, 0xCC, 200 * MIB, MIB, lun=3)  # and writable
    http = httpx.Client(base_url=d.api_url, headers={"Authorization": f"Bearer {d.api_token}"}, timeout=30)
    again = http.post("/v1/luns", json={"name": "fromsnap", "from_snapshot": "demo0@s1"})
    assert again.status_code == 200 and again.json()["name"] == "fromsnap", again.text
    job = again.headers["location"]
    text = run([*lunsync_command(), "lun", "create", "fromsnap", "--from", "demo0@s1"], env=env(d))
    assert text.returncode == 0 and f"recovery set {job.rsplit('/', 1)[-1]}" in text.stdout, describe(text)
    bare = run([*lunsync_command(), "lun", "create", "fromsnap2"], env=env(d))
    assert bare.returncode == 2 and "--size SIZE, or --from LUN@SNAP" in bare.stderr, describe(bare)
    state = http.get(job).json()
    assert state["state"] == "resyncing" and state["pairs"][0]["new_lun"], state
    other = http.post("/v1/luns", json={"name": "fromsnap", "from_snapshot": "demo0@s2"})
    assert other.status_code == 404, other.text  # no such snapshot
    cli(d, "snapshot", "create", "demo0@s2")
    other = http.post("/v1/luns", json={"name": "fromsnap", "from_snapshot": "demo0@s2"})
    assert other.status_code == 409 and "made from demo0@s1" in other.json()["error"], other.text
    plain = http.post("/v1/luns", json={"name": "demo0", "from_snapshot": "demo0@s1"})
    assert plain.status_code == 409 and "already exists" in plain.json()["error"], plain.text
    final = http.post(job + "/wait", params={"timeout_s": 90}, timeout=100).json()
    assert final["state"] == "done" and final["redirected_reads"] > 0, final
    assert_reads(d, 0xAA, 0, 200 * MIB, lun=3)
    assert_reads(d, 0xCC, 200 * MIB, MIB, lun=3)  # the write during the copy stays
    assert_reads(d, 0xAA, 201 * MIB, 55 * MIB, lun=3)
    assert_reads(d, 0xBB, 0, 256 * MIB)  # the origin is untouched
    d.assert_healthy()
