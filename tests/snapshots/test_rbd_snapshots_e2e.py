"""Snapshots, sets and live resync of RBD-backed LUNs, end to end: the real daemon on the session's one-node Ceph
cluster, LUNs made with ``lunsync lun create --backend rbd``, qemu-io over ``iscsi://`` reading and writing, the CLI
taking RBD snapshots (alone and in a set with a file LUN), exposing one read-only, restoring the origin from it live
with only the changed extents copied, kill -9 in the middle of that restore, and an RBD clone flattened."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import rados
import rbd
from ceph_cluster import POOL, CephCluster
from e2e.harness import DEMO_IQN, Daemon, PatternReader, describe, lunsync_command, require_tools, run
from e2e.test_rbd_luns import ceph_section
from lunsync.snapshots import rbdsnap

pytestmark = pytest.mark.e2e

MiB = 1 << 20
CHUNK = 64 << 10  # the LUNs' chunk size: the resync's regions


@pytest.fixture(scope="module")
def rbd_daemon(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require_tools("qemu-io")
    d = Daemon(tmp_path_factory.mktemp("lunsync-rbdsnap"), config=ceph_section(ceph_cluster.conf, ceph_cluster.keyring),
               demo_size="16MiB", api=True)
    try:
        d.start()
        # Restarts (kill -9) go without --config, which would make the catalog equal to the file and drop the LUNs
        # the CLI adds; the [ceph] section stays in the catalog.
        d.terminate()
        d.config_path = None
        yield d.start()
    finally:
        d.close()


@pytest.fixture(scope="module")
def ioctx(ceph_cluster: CephCluster) -> Iterator[Any]:
    with rados.Rados(conffile=str(ceph_cluster.conf), name="client.admin") as cluster, \
            cluster.open_ioctx(POOL) as ctx:
        yield ctx


def cli(d: Daemon, *args: str, ok: bool = True, timeout: float = 120) -> Any:
    p = run([*lunsync_command(), *args, "--json"], env={"LUNSYNC_API": d.api_url, "LUNSYNC_DATA_DIR": str(d.data_dir)},
            timeout=timeout)
    if ok:
        assert p.returncode == 0, describe(p)
        return json.loads(p.stdout) if p.stdout.strip() else None
    assert p.returncode != 0, describe(p)
    return p.stderr


def qemu(d: Daemon, lun: int, command: str, *, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    return run(["qemu-io", "-f", "raw", *(["-r"] if read_only else []), "-c", command, d.url(lun)], timeout=120)


def write(d: Daemon, lun: int, byte: int, offset: int, length: int) -> None:
    p = qemu(d, lun, f"write -P {byte:#x} {offset} {length}")
    assert p.returncode == 0 and "wrote" in p.stdout, describe(p)


def reads(d: Daemon, lun: int, byte: int, offset: int, length: int) -> bool:
    p = qemu(d, lun, f"read -P {byte:#x} {offset} {length}", read_only=True)
    return p.returncode == 0 and "read " in p.stdout and "verification failed" not in p.stdout + p.stderr


def assert_reads(d: Daemon, lun: int, byte: int, offset: int, length: int) -> None:
    p = qemu(d, lun, f"read -P {byte:#x} {offset} {length}", read_only=True)
    assert p.returncode == 0 and "read " in p.stdout and "verification failed" not in p.stdout + p.stderr, describe(p)


def rbd_lun(d: Daemon, name: str, number: int, size: str = "64MiB") -> str:
    """An RBD LUN on a new image, shown on the demo target as LUN ``number``; returns the image's name."""
    image = f"{name}-{uuid.uuid4().hex[:8]}"
    cli(d, "lun", "create", name, "--backend", "rbd", "--pool", POOL, "--image", image, "--size", size)
    cli(d, "lun", "map", name, "--target", DEMO_IQN, "--lun", str(number))
    return image


def allocated_bytes(img: Any) -> int:
    """Bytes of the open image that hold data (``diff_iterate`` against nothing)."""
    held: list[int] = []
    img.diff_iterate(0, img.size(), None, lambda _offset, length, _exists: held.append(length))
    return sum(held)


def rbd_snaps(ioctx: Any, image: str) -> set[str]:
    with rbd.Image(ioctx, image, read_only=True) as img:
        return {s["name"] for s in img.list_snaps()}


def test_a_snapshot_is_an_rbd_snapshot_exposed_read_only_and_deleted_with_it(rbd_daemon: Daemon, ioctx: Any) -> None:
    d = rbd_daemon
    image = rbd_lun(d, "ra", 1)
    write(d, 1, 0xAA, 0, 4 * MiB)
    made = cli(d, "snapshot", "create", "ra@s1")
    (snap,) = made["snapshots"]
    assert snap["kind"] == "rbd" and snap["state"] == "valid", snap
    assert made["hold_ms"] < 1000, made
    assert rbd_snaps(ioctx, image) == {"lunsync.s1"}
    assert cli(d, "snapshot", "list", "ra")[0]["space_bytes"] == 0  # it shares everything with the head
    write(d, 1, 0xBB, 0, MiB)  # the head moves on
    # The cluster now keeps the snapshot's copy of the one 4 MiB object written since.
    assert cli(d, "snapshot", "show", "ra@s1")["space_bytes"] == 4 * MiB
    exp = cli(d, "snapshot", "expose", "ra@s1", "--target", DEMO_IQN, "--lun", "7")
    assert exp["exposed"] == {"target": DEMO_IQN, "lun": 7}, exp
    assert_reads(d, 7, 0xAA, 0, 4 * MiB)  # the point in time, not the head
    assert_reads(d, 1, 0xBB, 0, MiB)
    p = qemu(d, 7, "write -P 0xcc 0 4096")
    assert "wrote" not in p.stdout, describe(p)  # read-only: DATA PROTECT
    assert_reads(d, 7, 0xAA, 0, 4 * MiB)
    assert "exposed" in cli(d, "snapshot", "delete", "ra@s1", ok=False)
    cli(d, "snapshot", "unexpose", "ra@s1")
    assert "--from" in cli(d, "snapshot", "create", "ra@c1", "--kind", "clone", ok=False)
    cli(d, "snapshot", "delete", "ra@s1")
    assert rbd_snaps(ioctx, image) == set(), "deleting the snapshot removes the RBD snapshot"
    assert cli(d, "snapshot", "list", "ra") == []
    d.assert_healthy()


def test_a_set_across_rbd_and_file_luns_is_one_point_in_time(rbd_daemon: Daemon, ioctx: Any) -> None:
    d = rbd_daemon
    images = [rbd_lun(d, "rs1", 2, "16MiB"), rbd_lun(d, "rs2", 3, "16MiB")]
    for lun in (0, 2, 3):
        write(d, lun, 0x10 + lun, 0, MiB)
    made = cli(d, "snapshot", "create", "demo0@set1", "rs1@set1", "rs2@set1", "--set", "set1")
    kinds = {s["lun"]: s["kind"] for s in made["snapshots"]}
    assert kinds == {"demo0": "differential", "rs1": "rbd", "rs2": "rbd"}, kinds
    assert made["set"] == "set1" and made["hold_ms"] > 0
    for image in images:
        assert rbd_snaps(ioctx, image) == {"lunsync.set1"}
    for lun in (0, 2, 3):
        write(d, lun, 0xEE, 0, MiB)
    for n, (lun, name) in enumerate((("demo0", 0), ("rs1", 2), ("rs2", 3))):
        cli(d, "snapshot", "expose", f"{lun}@set1", "--target", DEMO_IQN, "--lun", str(20 + n))
        assert_reads(d, 20 + n, 0x10 + name, 0, MiB)
        cli(d, "snapshot", "unexpose", f"{lun}@set1")
        cli(d, "snapshot", "delete", f"{lun}@set1")
    for image in images:
        assert rbd_snaps(ioctx, image) == set()


def test_live_resync_to_the_origin_copies_only_the_changed_extents(rbd_daemon: Daemon, ioctx: Any) -> None:
    d = rbd_daemon
    image = rbd_lun(d, "rr", 4)
    write(d, 4, 0x11, 0, 64 * MiB)
    cli(d, "snapshot", "create", "rr@s1")
    write(d, 4, 0x22, 8 * MiB, 8 * MiB)  # 8 MiB changed, in objects the snapshot has
    write(d, 4, 0x23, 40 * MiB + 4096, 4096)  # and one block
    changed = rbdsnap.changed_extents(ioctx, image, "lunsync.s1")
    expect = len(rbdsnap.regions_of(changed, CHUNK)) * CHUNK
    assert expect < 16 * MiB, changed  # only what changed, not the image
    dry = cli(d, "resync", "rr@s1", "--dry-run")
    assert dry["bytes"] == expect, (dry, changed)
    with PatternReader(d.url(4), 0x11, 32 * MiB, 8 * MiB) as untouched:
        started = cli(d, "resync", "rr@s1", "--rate", "1")  # about 8 s
        rid = started["id"]
        assert started["state"] == "resyncing"
        shown = cli(d, "recovery", "show", rid)
        assert shown["state"] == "resyncing" and shown["percent"] < 100, shown
        with PatternReader(d.url(4), 0x11, 8 * MiB, 8 * MiB) as redirected:  # the snapshot's data from the first read on
            write(d, 4, 0x33, 48 * MiB, MiB)  # a write during the resync, outside what it copies
            assert_reads(d, 4, 0x11, 40 * MiB, MiB)
            final = cli(d, "recovery", "wait", rid, timeout=90)
    assert final["state"] == "done", final
    (pair,) = final["pairs"]
    assert pair["bytes_total"] == expect and pair["bytes_copied"] == expect, (pair, expect)
    assert pair["redirected_reads"] > 0
    assert untouched.runs >= 2 and not untouched.failures, untouched.failures[:1]
    assert redirected.runs >= 2 and not redirected.failures, redirected.failures[:1]
    # The destination equals the snapshot but for the write made during the resync.
    assert_reads(d, 4, 0x11, 0, 48 * MiB)
    assert_reads(d, 4, 0x33, 48 * MiB, MiB)
    assert_reads(d, 4, 0x11, 49 * MiB, 15 * MiB)
    # The RBD snapshot was never altered: its contents, and the head now differs from it only where written.
    with rbd.Image(ioctx, image, snapshot="lunsync.s1", read_only=True) as snap:
        assert snap.read(0, 64 * MiB) == b"\x11" * (64 * MiB)
    after = rbdsnap.changed_extents(ioctx, image, "lunsync.s1")
    assert rbdsnap.regions_of(after, CHUNK) >= rbdsnap.regions_of([(48 * MiB, MiB)], CHUNK)
    d.assert_healthy()


def test_kill9_mid_resync_then_restart_resumes_to_completion(rbd_daemon: Daemon, ioctx: Any) -> None:
    d = rbd_daemon
    image = rbd_lun(d, "rk", 5)
    write(d, 5, 0x55, 0, 64 * MiB)
    cli(d, "snapshot", "create", "rk@s1")
    # What a crash between taking an RBD snapshot and recording it leaves: lunsync's, and recorded nowhere.
    with rbd.Image(ioctx, image) as img:
        img.create_snap("lunsync.unrecorded")
    write(d, 5, 0x66, 0, 24 * MiB)
    rid = cli(d, "resync", "rk@s1", "--rate", "4")["id"]  # 24 MiB: about 6 s
    time.sleep(2.0)
    mid = cli(d, "recovery", "show", rid)
    assert mid["state"] == "resyncing" and 0 < mid["percent"] < 100, mid
    d.kill9()
    d.start()
    assert cli(d, "recovery", "show", rid)["state"] == "resyncing"
    assert_reads(d, 5, 0x55, 0, 24 * MiB)  # the snapshot's data straight after the restart
    final = cli(d, "recovery", "wait", rid, timeout=90)
    assert final["state"] == "done", final
    assert_reads(d, 5, 0x55, 0, 64 * MiB)
    assert "resumed with" in d.log_text()
    # Removed in the background after the start, once the image's lock passed from the killed daemon to this one
    # (the copier's first write waited for that too).
    deadline = time.monotonic() + 60
    while rbd_snaps(ioctx, image) != {"lunsync.s1"} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rbd_snaps(ioctx, image) == {"lunsync.s1"}, "the unrecorded snapshot is removed after a start"
    d.assert_healthy()


def test_a_clone_is_an_rbd_clone_and_flatten_frees_the_snapshot(rbd_daemon: Daemon, ioctx: Any) -> None:
    d = rbd_daemon
    image = rbd_lun(d, "rc", 6, "16MiB")
    write(d, 6, 0x77, 0, 16 * MiB)
    cli(d, "snapshot", "create", "rc@base")
    write(d, 6, 0x78, 0, MiB)  # the head moves on; clones have the snapshot's data
    clone = cli(d, "lun", "create", "rcc", "--from", "rc@base")
    assert (clone["backend"], clone["path"], clone["size_bytes"]) == ("rbd", f"{POOL}/rcc", 16 * MiB), clone
    with rbd.Image(ioctx, "rcc", read_only=True) as img:
        assert img.parent_info()[1:] == (image, "lunsync.base")  # shares the snapshot's data: nothing was copied
    with rbd.Image(ioctx, image, read_only=True) as img:
        assert img.is_protected_snap("lunsync.base")
    cli(d, "lun", "map", "rcc", "--target", DEMO_IQN, "--lun", "8")
    assert_reads(d, 8, 0x77, 0, 16 * MiB)
    write(d, 8, 0x79, 0, MiB)  # a clone is writable; neither the origin nor the snapshot sees it
    assert_reads(d, 6, 0x78, 0, MiB)
    assert "clones" in cli(d, "snapshot", "delete", "rc@base", ok=False)
    flat = cli(d, "lun", "create", "rcf", "--from", "rc@base", "--image", "rcf-img", "--flatten")
    assert flat["path"] == f"{POOL}/rcf-img", flat
    assert flat["flatten"]["state"] in ("running", "done"), flat  # a background job: the create did not wait for it
    deadline = time.monotonic() + 60
    while (job := cli(d, "lun", "show", "rcf")["flatten"])["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job["state"] == "done" and job["percent"] == 100 and job["error"] is None, job
    assert job["objects_done"] == job["objects_total"] == 4, job  # 16 MiB in 4 MiB objects
    with rbd.Image(ioctx, "rcf-img", read_only=True) as img, pytest.raises(rbd.ImageNotFound):
        img.parent_info()  # flattened: it no longer depends on the snapshot
    # A clone made without --flatten is flattened later, in the background too; --wait follows it to the end.
    assert cli(d, "lun", "flatten", "rcc", "--wait")["flatten"]["state"] == "done"
    with rbd.Image(ioctx, "rcc", read_only=True) as img, pytest.raises(rbd.ImageNotFound):
        img.parent_info()
    assert_reads(d, 8, 0x79, 0, MiB)  # its own write kept
    assert_reads(d, 8, 0x77, MiB, 15 * MiB)  # and the snapshot's data, now its own
    assert "not on a store that clones" in cli(d, "lun", "flatten", "demo0", ok=False)
    cli(d, "lun", "map", "rcf", "--target", DEMO_IQN, "--lun", "9")
    assert_reads(d, 9, 0x77, 0, 16 * MiB)
    assert "rate" in cli(d, "lun", "create", "rcx", "--from", "rc@base", "--rate", "5", ok=False)
    cli(d, "lun", "unmap", "rcc", "--target", DEMO_IQN)
    cli(d, "lun", "delete", "rcc", "--delete-image")
    cli(d, "snapshot", "delete", "rc@base")  # only flattened clones were left: the snapshot may go
    assert rbd_snaps(ioctx, image) == set()
    assert_reads(d, 9, 0x77, 0, 16 * MiB)
    d.assert_healthy()


def test_a_resync_to_a_new_lun_from_an_rbd_snapshot_makes_a_new_image(rbd_daemon: Daemon, ioctx: Any,
                                                                       ceph_cluster: CephCluster) -> None:
    d = rbd_daemon
    rbd_lun(d, "rn", 12, "16MiB")
    write(d, 12, 0x41, 0, 8 * MiB)  # the second half of the image is never written: the new LUNs get none of it
    cli(d, "snapshot", "create", "rn@s1")
    write(d, 12, 0x42, 0, MiB)  # the head moves on; the new LUN gets the snapshot's data
    # An image of the new LUN's name is somebody's: it is never taken over, and nothing is left of the attempt.
    rbd.RBD().create(ioctx, "rn-taken", 16 * MiB)
    assert "exists already" in cli(d, "resync", "rn@s1", "--to", "rn-taken", ok=False)
    assert "does not exist" in cli(d, "resync", "rn@s1", "--to", "rn-x", "--pool", "no-such-pool", ok=False)
    cli(d, "snapshot", "create", "demo0@rn-file")  # a file LUN's snapshot makes a file LUN: no pool to name
    assert "only a restore from an RBD snapshot" in cli(d, "resync", "demo0@rn-file", "--to", "rn-f", "--pool", POOL,
                                                        ok=False)
    cli(d, "snapshot", "delete", "demo0@rn-file")
    dry = cli(d, "resync", "rn@s1", "--to", "rn-dry", "--dry-run")
    assert dry["bytes"] == 8 * MiB and dry["pairs"][0]["new_lun"], dry  # what the snapshot holds, not its size
    # Into the snapshot's own pool by default, and into another pool when named.
    with rados.Rados(conffile=str(ceph_cluster.conf), name="client.admin") as cluster:
        cluster.create_pool("rbd-b")
        with cluster.open_ioctx("rbd-b") as other:
            rbd.RBD().pool_init(other, False)
            for dest, pool in (("rn-same", None), ("rn-other", "rbd-b")):
                rid = cli(d, "resync", "rn@s1", "--to", dest, *(["--pool", pool] if pool else []))["id"]
                final = cli(d, "recovery", "wait", rid, timeout=90)
                assert final["state"] == "done", final
                (pair,) = final["pairs"]
                assert pair["new_lun"] and pair["bytes_total"] == pair["bytes_copied"] == 8 * MiB, pair
                with rbd.Image(other if pool else ioctx, dest, read_only=True) as img:
                    # In the image itself, not a file; what the snapshot never held was not written at all.
                    assert img.read(0, 16 * MiB) == b"\x41" * (8 * MiB) + bytes(8 * MiB)
                    assert allocated_bytes(img) <= 8 * MiB  # the image holds data only where the snapshot did
            luns = {lun["name"]: lun for lun in cli(d, "lun", "list")}
            assert not {"rn-taken", "rn-x", "rn-f"} & set(luns), sorted(luns)  # the refused ones left no LUN
            assert (luns["rn-same"]["backend"], luns["rn-same"]["path"]) == ("rbd", f"{POOL}/rn-same")
            assert (luns["rn-other"]["backend"], luns["rn-other"]["path"]) == ("rbd", "rbd-b/rn-other")
            cli(d, "lun", "map", "rn-same", "--target", DEMO_IQN, "--lun", "13")  # served like any RBD LUN
            assert_reads(d, 13, 0x41, 0, 8 * MiB)
            assert_reads(d, 13, 0x00, 8 * MiB, 8 * MiB)
            write(d, 13, 0x43, 0, MiB)  # the new LUN is writable; the origin does not see it
            assert_reads(d, 12, 0x42, 0, MiB)
            cli(d, "lun", "unmap", "rn-same", "--target", DEMO_IQN)
            for dest in ("rn-same", "rn-other"):
                cli(d, "lun", "delete", dest, "--delete-image")
    d.assert_healthy()


def _until_settled(d: Daemon, lun: str) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    shown = cli(d, "lun", "show", lun)["flatten"]
    while shown["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        shown = cli(d, "lun", "show", lun)["flatten"]
    return dict(shown)


def test_a_flatten_is_kept_across_restarts(rbd_daemon: Daemon, ioctx: Any) -> None:
    """The flatten is in the catalog. Stopped with the daemon (SIGTERM: librbd stops it between objects), the
    restarted daemon goes on with it by itself and reports it with its first start's time; done, it stays reported
    across a restart. Cut by kill -9, it is reported failed after the restart, saying so, and not run again: the
    clone keeps its parent and reads the snapshot's data through it."""
    d = rbd_daemon
    image = f"rfs-{uuid.uuid4().hex[:8]}"
    rbd.RBD().create(ioctx, image, 128 * MiB)  # written here, straight through librbd: 32 objects to flatten
    with rbd.Image(ioctx, image) as img:
        for i in range(32):
            img.write(bytes([i + 1]) * (4 * MiB), i * 4 * MiB)
    cli(d, "lun", "create", "rfs", "--backend", "rbd", "--pool", POOL, "--image", image)
    cli(d, "snapshot", "create", "rfs@base")
    for clone in ("rfsc", "rfsk"):
        cli(d, "lun", "create", clone, "--from", "rfs@base")
    mark = d.log_mark()
    job = cli(d, "lun", "flatten", "rfsc")["flatten"]
    d.terminate()  # exits 0: a running flatten is stopped at its next object, not left running under the close
    stopped = "lun rfsc: flatten stopped at" in d.log_since(mark)
    assert stopped or "lun rfsc flattened in" in d.log_since(mark), d.log_tail()
    d.start()
    shown = cli(d, "lun", "show", "rfsc")["flatten"]
    assert shown is not None and shown["started_at"] == job["started_at"], shown
    if stopped:
        assert "lun rfsc: flatten resumed" in d.log_text(), d.log_tail()
    done = _until_settled(d, "rfsc")
    assert done["state"] == "done" and done["objects_done"] == done["objects_total"] == 32, done
    d.terminate()
    d.start()
    again = cli(d, "lun", "show", "rfsc")["flatten"]
    assert (again["state"], again["started_at"], again["finished_at"]) == ("done", job["started_at"],
                                                                           done["finished_at"]), again
    with rbd.Image(ioctx, "rfsc", read_only=True) as img:
        with pytest.raises(rbd.ImageNotFound):
            img.parent_info()
        for i in (0, 15, 31):
            assert img.read(i * 4 * MiB, 4096) == bytes([i + 1]) * 4096
    # kill -9 mid-flatten.
    mark = d.log_mark()
    cli(d, "lun", "flatten", "rfsk")
    d.kill9()
    finished = "lun rfsk flattened in" in d.log_since(mark)
    d.start()
    cut = cli(d, "lun", "show", "rfsk")["flatten"]
    if not finished:
        assert cut["state"] == "failed" and "the daemon died while flattening" in cut["error"], cut
        with rbd.Image(ioctx, "rfsk", read_only=True) as img:
            assert img.parent_info()[1] == image  # still a clone of its snapshot
            for i in range(32):
                assert img.read(i * 4 * MiB, 4096) == bytes([i + 1]) * 4096, i
    # The killed daemon's watches keep the images open for the cluster's watch timeout: the LUNs go, the images
    # stay with the test cluster.
    for clone in ("rfsc", "rfsk"):
        cli(d, "lun", "delete", clone)
    d.assert_healthy()
