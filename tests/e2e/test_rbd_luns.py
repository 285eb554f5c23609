"""RBD-backed LUNs end to end: the real daemon pointed at the session's one-node Ceph cluster by its config's
``[ceph]`` section, LUNs made with ``lunsync lun create --backend rbd``, and real initiators on them: libiscsi's
conformance suite (the block-command suites, which are the ones that reach the backend), qemu-io patterns over
``iscsi://``, and kill -9 of the daemon right after FUA and SYNCHRONIZE CACHE writes, with librbd's cache in
write-back mode so that an unflushed write really could be lost."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ceph_cluster import POOL, CephCluster
from crash.stamps import StampClient
from e2e.harness import DEMO_IQN, Daemon, describe, lunsync_command, require_tools, run
from e2e.test_conformance import INHERENTLY_FLAGGED, conformance, failed

pytestmark = pytest.mark.e2e

MiB = 1 << 20
# The conformance suites whose commands reach the block device (everything else is iSCSI and SCSI state the
# backend never sees, and the file-LUN run covers it): reads and writes of every size, FUA, SYNCHRONIZE CACHE, UNMAP,
# WRITE SAME with and without UNMAP, GET LBA STATUS, COMPARE AND WRITE, ORWRITE, VERIFY, PRE-FETCH, READ CAPACITY,
# EXTENDED COPY and SANITIZE.
BLOCK_SUITES = ("Read6", "Read10", "Read12", "Read16", "Write10", "Write12", "Write16", "WriteVerify16", "Verify16",
                "Unmap", "WriteSame10", "WriteSame16", "GetLBAStatus", "CompareAndWrite", "OrWrite", "Prefetch16",
                "ReadCapacity16", "ExtendedCopy", "Sanitize")


def image_exists(cluster: CephCluster, image: str) -> bool:
    p = subprocess.run(["rbd", "-c", str(cluster.conf), "info", f"{POOL}/{image}"], capture_output=True, text=True,
                       timeout=60, check=False)
    return p.returncode == 0


def ceph_section(conf: Path, keyring: Path) -> str:
    return f'[ceph]\nconf_path = "{conf}"\nkeyring = "{keyring}"\nclient = "client.admin"\nconnect_timeout_s = 5\n'


@pytest.fixture(scope="module")
def rbd_daemon(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A demo daemon whose [ceph] section names the test cluster through a ceph.conf of its own that turns librbd's
    cache to write-back from the first write (it would otherwise stay write-through until the first flush): a write
    is then acknowledged from the gateway's memory, and only a flush makes it durable."""
    require_tools("qemu-io")
    work = tmp_path_factory.mktemp("lunsync-rbd")
    conf = work / "ceph.conf"
    conf.write_text(ceph_cluster.conf.read_text() + "\n[client]\nrbd cache = true\n"
                    "rbd cache writethrough until flush = false\nrbd cache max dirty age = 60\n")
    d = Daemon(work, config=ceph_section(conf, ceph_cluster.keyring), demo_size="16MiB", api=True)
    try:
        d.start()
        # The [ceph] section is kept in the catalog, like [portal]: started again without --config (which would make
        # the catalog equal to the file and drop the LUNs the CLI adds), the daemon still reaches the cluster.
        d.terminate()
        d.config_path = None
        d.start()
        yield d
    finally:
        d.close()


def cli(d: Daemon, *args: str, ok: bool = True) -> Any:
    p = run([*lunsync_command(), *args, "--json"], env={"LUNSYNC_API": d.api_url, "LUNSYNC_DATA_DIR": str(d.data_dir)},
            timeout=120)
    if ok:
        assert p.returncode == 0, describe(p)
        return json.loads(p.stdout) if p.stdout.strip() else None
    assert p.returncode != 0, describe(p)
    return p.stderr


def new_image() -> str:
    return f"lun-{uuid.uuid4().hex[:10]}"


def qemu_io(url: str, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for c in commands:
        argv += ["-c", c]
    return run([*argv, url], timeout=120)


def assert_pattern(url: str, byte: int, offset: int, length: int) -> None:
    p = qemu_io(url, f"read -P {byte:#x} {offset} {length}", read_only=True)
    assert p.returncode == 0 and "verification failed" not in p.stdout + p.stderr and "read " in p.stdout, describe(p)


def test_create_attach_refuse_and_delete(rbd_daemon: Daemon, ceph_cluster: CephCluster) -> None:
    d = rbd_daemon
    img = new_image()
    lun = cli(d, "lun", "create", "r-made", "--backend", "rbd", "--pool", POOL, "--image", img, "--size", "32MiB")
    assert (lun["backend"], lun["path"], lun["size_bytes"]) == ("rbd", f"{POOL}/{img}", 32 * MiB)
    assert image_exists(ceph_cluster, img)
    # Deleting the LUN keeps the image; attaching it again without a size takes the image's.
    cli(d, "lun", "delete", "r-made")
    assert image_exists(ceph_cluster, img), "lun delete removed an image it was not asked to"
    again = cli(d, "lun", "create", "r-again", "--backend", "rbd", "--pool", POOL, "--image", img)
    assert again["size_bytes"] == 32 * MiB and again["naa"] != lun["naa"]
    # Bad input: a clear refusal each time, and nothing recorded.
    err = cli(d, "lun", "create", "r-bad", "--backend", "rbd", "--pool", POOL, "--image", img, "--size", "64MiB",
              ok=False)
    assert "already used by lun 'r-again'" in err, err
    cli(d, "lun", "delete", "r-again")
    err = cli(d, "lun", "create", "r-bad", "--backend", "rbd", "--pool", POOL, "--image", img, "--size", "64MiB",
              ok=False)
    assert f"rbd image {POOL}/{img} already exists and holds {32 * MiB} bytes" in err, err
    err = cli(d, "lun", "create", "r-bad", "--backend", "rbd", "--pool", "nosuchpool", "--image", img,
              "--size", "8MiB", ok=False)
    assert "pool 'nosuchpool' does not exist" in err, err
    err = cli(d, "lun", "create", "r-bad", "--backend", "rbd", "--pool", POOL, "--image", new_image(), ok=False)
    assert "does not exist" in err, err
    err = cli(d, "lun", "create", "r-bad", "--backend", "rbd", "--pool", POOL, ok=False)
    assert "--pool POOL --image IMAGE" in err, err
    err = cli(d, "lun", "create", "r-bad", "--backend", "rbd", "--pool", POOL, "--image", "a@b", "--size", "8MiB",
              ok=False)
    assert "image" in err, err
    assert all(x["name"] != "r-bad" for x in cli(d, "lun", "list"))
    # Snapshots of an RBD LUN are the image's own; while one exists, Ceph keeps the image.
    cli(d, "lun", "create", "r-snap", "--backend", "rbd", "--pool", POOL, "--image", img)
    cli(d, "snapshot", "create", "r-snap@s1")
    snaps = run(["rbd", "-c", str(ceph_cluster.conf), "snap", "ls", f"{POOL}/{img}"], check=True).stdout
    assert "lunsync.s1" in snaps, snaps
    cli(d, "snapshot", "delete", "r-snap@s1")
    # --delete-image removes it; on a file LUN it is refused before anything changes.
    cli(d, "lun", "delete", "r-snap", "--delete-image")
    assert not image_exists(ceph_cluster, img)
    err = cli(d, "lun", "delete", "nonexistent-lun", "--delete-image", ok=False)
    assert "nonexistent-lun" in err, err
    # The declarative way: export, add an rbd LUN on an existing image, apply; apply the export again to drop it.
    img2 = new_image()
    run(["rbd", "-c", str(ceph_cluster.conf), "create", "--size", "4M", f"{POOL}/{img2}"], check=True)
    exported = cli(d, "export")["config"]
    assert "[ceph]" in exported and "connect_timeout_s = 5" in exported, exported
    before, after = d.workdir / "before.toml", d.workdir / "after.toml"
    before.write_text(exported)
    after.write_text(exported + f'\n[[lun]]\nname = "r-applied"\nbackend = "rbd"\npath = "{POOL}/{img2}"\n'
                                f'size = "4MiB"\n')
    cli(d, "apply", str(after))
    assert cli(d, "lun", "show", "r-applied")["path"] == f"{POOL}/{img2}"
    cli(d, "apply", str(before))
    assert all(x["name"] != "r-applied" for x in cli(d, "lun", "list"))
    assert image_exists(ceph_cluster, img2), "apply removed the LUN and its image with it"
    run(["rbd", "-c", str(ceph_cluster.conf), "rm", f"{POOL}/{img2}"], check=True)
    d.assert_healthy()


def test_qemu_io_patterns_and_restart(rbd_daemon: Daemon, ceph_cluster: CephCluster) -> None:
    d = rbd_daemon
    img = new_image()
    cli(d, "lun", "create", "r-qemu", "--backend", "rbd", "--pool", POOL, "--image", img, "--size", "64MiB",
        "--block-size", "4096")
    m = cli(d, "lun", "map", "r-qemu", "--target", DEMO_IQN)
    url = d.url(m["lun"])
    info = run(["qemu-img", "info", "--output=json", url], check=True)
    assert json.loads(info.stdout)["virtual-size"] == 64 * MiB
    # Patterns at object boundaries (4 MiB), across them, small and large, then a discard and a zero write.
    p = qemu_io(url, "write -P 0x11 0 1M", "write -P 0x22 4092K 8K", "write -P 0x33 40M 4M",
                "write -P 0x44 63M 1M", "discard 8M 4M", "write -z 40M 64K", "flush")
    assert p.returncode == 0 and "verification failed" not in p.stdout, describe(p)
    assert_pattern(url, 0x11, 0, MiB)
    assert_pattern(url, 0x22, 4092 << 10, 8 << 10)
    assert_pattern(url, 0x00, 40 * MiB, 64 << 10)
    assert_pattern(url, 0x33, 40 * MiB + (64 << 10), 4 * MiB - (64 << 10))
    assert_pattern(url, 0x44, 63 * MiB, MiB)
    assert_pattern(url, 0x00, 8 * MiB, 4 * MiB)
    d.terminate()
    d.start()
    assert_pattern(url, 0x33, 40 * MiB + (64 << 10), 4 * MiB - (64 << 10))
    assert_pattern(url, 0x44, 63 * MiB, MiB)
    # Grown live: the image grows, the initiator sees the new capacity, and the old data stays.
    assert cli(d, "lun", "resize", "r-qemu", "--size", "96MiB")["size_bytes"] == 96 * MiB
    info = run(["qemu-img", "info", "--output=json", url], check=True)
    assert json.loads(info.stdout)["virtual-size"] == 96 * MiB
    rbd_info = run(["rbd", "-c", str(ceph_cluster.conf), "info", "--format", "json", f"{POOL}/{img}"], check=True)
    assert json.loads(rbd_info.stdout)["size"] == 96 * MiB
    p = qemu_io(url, "write -P 0x55 95M 1M")
    assert p.returncode == 0, describe(p)
    assert_pattern(url, 0x55, 95 * MiB, MiB)
    assert_pattern(url, 0x44, 63 * MiB, MiB)
    cli(d, "lun", "unmap", "r-qemu", "--target", DEMO_IQN)
    cli(d, "lun", "delete", "r-qemu", "--delete-image")


def test_fua_and_synchronize_cache_writes_survive_kill_9(rbd_daemon: Daemon) -> None:
    """Writes acknowledged with FUA, or before an acknowledged SYNCHRONIZE CACHE, are on the cluster even when the
    gateway dies the moment after: librbd's write-back cache held them until the flush these commands map to."""
    d = rbd_daemon
    cli(d, "lun", "create", "r-kill", "--backend", "rbd", "--pool", POOL, "--image", new_image(), "--size", "16MiB")
    n = cli(d, "lun", "map", "r-kill", "--target", DEMO_IQN)["lun"]
    fua = {b: bytes([0xA0 + b % 16]) * 4096 for b in range(0, 64, 4)}
    synced = {b: bytes([0x50 + b % 16]) * 4096 for b in range(100, 164, 4)}
    c = StampClient("127.0.0.1", d.port, DEMO_IQN, "iqn.2026-11.io.lunsync:rbd-kill", 0x23)
    try:
        for b, data in fua.items():
            c.write(n, b, data, fua=True)
        for b, data in synced.items():
            c.write(n, b, data)
        c.sync_cache(n)
    finally:
        c.close()
    d.kill9()
    d.start()
    c = StampClient("127.0.0.1", d.port, DEMO_IQN, "iqn.2026-11.io.lunsync:rbd-kill", 0x24)
    try:
        for b, data in {**fua, **synced}.items():
            assert c.read(n, b, 1) == data, f"block {b}: an acknowledged durable write was lost"
    finally:
        c.close()
    cli(d, "lun", "unmap", "r-kill", "--target", DEMO_IQN)
    cli(d, "lun", "delete", "r-kill", "--delete-image")


def test_conformance_block_suites_on_an_rbd_lun(rbd_daemon: Daemon, tmp_path: Path) -> None:
    d = rbd_daemon
    cli(d, "lun", "create", "r-conf", "--backend", "rbd", "--pool", POOL, "--image", new_image(), "--size", "64MiB")
    n = cli(d, "lun", "map", "r-conf", "--target", DEMO_IQN)["lun"]
    report, out = conformance(d.url(n), tmp_path / "rbd-conformance.json", "--test",
                              ",".join(f"ALL.{s}" for s in BLOCK_SUITES), timeout=600)
    counts = report["counts"]
    unexpected = sorted(set(failed(report)) - INHERENTLY_FLAGGED)
    assert not unexpected, f"{counts}: failed {unexpected}\n{out[-4000:]}\n{d.log_tail()}"
    assert counts["passed"] >= 90, f"{counts}: fewer of the block suites passed than on the day they were added"
    d.assert_healthy()
    cli(d, "lun", "unmap", "r-conf", "--target", DEMO_IQN)
    cli(d, "lun", "delete", "r-conf", "--delete-image")


def test_an_image_missing_at_start_answers_not_ready_until_it_returns(rbd_daemon: Daemon,
                                                                         ceph_cluster: CephCluster) -> None:
    """The daemon starts and serves its other LUNs when an RBD LUN's image cannot be opened (a cluster still down
    at boot looks the same); that LUN answers NOT READY, is never recreated empty, and serves again once it opens."""
    d = rbd_daemon
    img = new_image()
    cli(d, "lun", "create", "r-gone", "--backend", "rbd", "--pool", POOL, "--image", img, "--size", "8MiB")
    n = cli(d, "lun", "map", "r-gone", "--target", DEMO_IQN)["lun"]
    d.terminate()
    rbd = ["rbd", "-c", str(ceph_cluster.conf)]
    run([*rbd, "rm", f"{POOL}/{img}"], check=True)
    mark = d.log_mark()
    d.start()
    d.wait_for_log(r"lun r-gone: .*does not exist; it answers NOT READY", since=mark)
    p = qemu_io(d.url(n), "read 0 4k", read_only=True)
    assert p.returncode != 0 and "SENSE KEY:NOT READY(2)" in p.stderr, describe(p)
    assert not image_exists(ceph_cluster, img), "reopening a LUN created its missing image"
    assert qemu_io(d.url(0), "read 0 4k", read_only=True).returncode == 0, "the file LUN beside it is not served"
    run([*rbd, "create", "--size", "8M", f"{POOL}/{img}"], check=True)
    d.wait_for_log(r"lun r-gone: its store opened; serving it", since=mark, timeout=30)
    p = qemu_io(d.url(n), "write -P 0x7e 0 64k", "read -P 0x7e 0 64k")
    assert p.returncode == 0 and "verification failed" not in p.stdout, describe(p)
    cli(d, "lun", "unmap", "r-gone", "--target", DEMO_IQN)
    cli(d, "lun", "delete", "r-gone", "--delete-image")
