"""Two gateways, one LUN: two real daemons (gateway A on 127.0.0.1, gateway B on 127.0.0.2, as two hosts) serving the
same RBD image of the test cluster. A is configured with the LUN; B has only the cluster and learns the LUN from
RADOS. Real clients drive them: libiscsi's multipath suite with one path through each gateway, a Windows-cluster PR
cycle split across them, and qemu-io writing through B while A is killed (-9), with ALUA ownership moving to B. B
runs split into worker processes (``serve --workers 2``), so its LUN's lease, ALUA state and PR store live in the
worker serving it while its control follows the cluster's index."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from ceph_cluster import POOL, CephCluster
from crash.stamps import Stamp, StampClient, Turns, parse
from e2e.harness import Daemon, describe, lunsync_command, require_tools, run
from e2e.test_conformance import MULTIPATH_SUITE, MULTIPATH_TESTS, conformance
from iscsi_scapy import RawInitiator, cdb_inquiry

pytestmark = [pytest.mark.e2e]

SIZE = 64 << 20
LEASE_S = 3
NODE1, NODE2 = "iqn.1991-05.com.microsoft:node1", "iqn.1991-05.com.microsoft:node2"
K1, K2 = 0x1111, 0x2222
RTPG = bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])


def ceph_section(cluster: CephCluster) -> str:
    return f"""[ceph]
conf_path = "{cluster.conf}"
keyring = "{cluster.keyring}"
client = "client.admin"
"""


class Gateway(Daemon):
    iqn = ""
    image = ""  # POOL/IMAGE of the shared LUN
    ceph_conf = ""


@pytest.fixture
def gateways(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    """Gateway A (port group 1) with the LUN in its configuration, then gateway B (port group 2) with none. Each
    test has its own image and target; its entry leaves the cluster's LUN index afterwards, as a delete would."""
    require_tools("rbd", "rados")
    image = f"gw-{uuid.uuid4().hex[:8]}"
    iqn = f"iqn.2026-11.io.lunsync:{image}"
    p = subprocess.run(["rbd", "-c", str(ceph_cluster.conf), "create", "--size", f"{SIZE >> 20}M",
                        f"{POOL}/{image}"], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, describe(p)
    config_a = ceph_section(ceph_cluster) + f"""
[[lun]]
name = "{image}"
backend = "rbd"
path = "{POOL}/{image}"
size = {SIZE}

[[target]]
iqn = "{iqn}"
luns = [{{ lun = 0, name = "{image}" }}]
"""
    common = ["--gateway-pool", POOL, "--lease", str(LEASE_S)]
    a = Gateway(tmp_path / "a", config=config_a, demo=False, host="127.0.0.1", api=True,
                extra_args=["--gateway", "gw-a", "--port-group", "1", *common])
    # B is split into a control and two workers (serve --workers 2), A is as the run makes every daemon (one
    # process, unless LUNSYNC_E2E_WORKERS): a gateway is one gateway to the others and to initiators either way.
    b = Gateway(tmp_path / "b", config=ceph_section(ceph_cluster), demo=False, host="127.0.0.2", api=True,
                metrics=True, workers=2, extra_args=["--gateway", "gw-b", "--port-group", "2", *common])
    for g in (a, b):
        g.iqn, g.image, g.ceph_conf = iqn, f"{POOL}/{image}", str(ceph_cluster.conf)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.close()
        b.close()
        subprocess.run(["rados", "-c", str(ceph_cluster.conf), "-p", POOL, "-N", "lunsync", "rmomapkey",
                        "lunsync.luns", image], capture_output=True, timeout=60, check=False)


def session(d: Gateway, initiator: str, isid: int = 0x400001370000) -> RawInitiator:
    ini = RawInitiator(d.host, d.port, timeout=10).connect()
    ini.login(d.iqn, initiator, isid=isid)
    return ini


def clear_ua(ini: RawInitiator) -> None:
    for _ in range(8):
        if ini.scsi(bytes(6)).status == 0:
            return
    raise AssertionError("unit attentions never cleared")


def rtpg_states(ini: RawInitiator) -> dict[int, int]:
    """Port group -> asymmetric access state, from REPORT TARGET PORT GROUPS (unit attentions consumed first)."""
    clear_ua(ini)
    r = ini.scsi(RTPG, read_length=256)
    assert r.status == 0, r
    d, out, off = r.data, {}, 4
    while off + 8 <= 4 + struct.unpack_from(">I", d)[0]:
        state, group, count = d[off] & 0x0F, struct.unpack_from(">H", d, off + 2)[0], d[off + 7]
        out[group] = state
        off += 8 + 4 * count
    return out


def wait_for(what: Callable[[], bool], timeout: float, message: str) -> float:
    t0 = time.monotonic()
    while not what():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(message)
        time.sleep(0.2)
    return time.monotonic() - t0


def vpd83(ini: RawInitiator) -> bytes:
    clear_ua(ini)
    r = ini.scsi(cdb_inquiry(255, 1, 0x83), read_length=255)
    assert r.status == 0
    return r.data


def designators(page: bytes) -> dict[int, bytes]:
    """VPD 0x83's designators by type (SPC-4 §7.8.6: 3 NAA, 4 relative target port, 5 target port group)."""
    out, off = {}, 4
    while off + 4 <= len(page):
        kind, length = page[off + 1] & 0x0F, page[off + 3]
        out.setdefault(kind, page[off + 4:off + 4 + length])
        off += 4 + length
    return out


def test_same_identity_alua_and_multipath_suite(gateways: tuple[Gateway, Gateway], tmp_path: Path) -> None:
    a, b = gateways
    with session(a, NODE1) as ia, session(b, NODE1) as ib:
        da, db = designators(vpd83(ia)), designators(vpd83(ib))
        assert da[3] == db[3], "the NAA designator differs between the gateways"  # same LU, same NAA
        # Relative target port (type 4) and target port group (type 5): each gateway its own, its port group.
        assert (da[4], da[5]) == (b"\x00\x00\x00\x01", b"\x00\x00\x00\x01")
        assert (db[4], db[5]) == (b"\x00\x00\x00\x02", b"\x00\x00\x00\x02")
        serials = []
        for ini in (ia, ib):
            r = ini.scsi(cdb_inquiry(255, 1, 0x80), read_length=255)
            serials.append(r.data[4:])
        assert serials[0] == serials[1]
        wait_for(lambda: rtpg_states(ia) == {1: 0, 2: 1}, 3 * LEASE_S, f"A: {rtpg_states(ia)}")
        assert rtpg_states(ib) == {1: 0, 2: 1}  # both gateways agree: A owns the LUN (A/O), B is A/N-O
    report, out = conformance(a.url(0, iqn=a.iqn), tmp_path / "multipath.json", "--multipath", b.url(0, iqn=b.iqn),
                              "--test", MULTIPATH_SUITE, timeout=600)
    ran = {name.rsplit(".", 1)[-1]: v for name, v in report["tests"].items() if "MultipathIO" in name}
    assert set(MULTIPATH_TESTS) <= set(ran), f"MultipathIO tests missing: {sorted(ran)}\n{out[-3000:]}"
    not_passed = {k: v for k, v in ran.items() if v != "passed"}
    assert not not_passed, f"MultipathIO across gateways: {not_passed}\n{out[-4000:]}\n{a.log_tail()}\n{b.log_tail()}"
    a.assert_healthy()
    b.assert_healthy()


def prout(ini: RawInitiator, sa: int, key: int = 0, sa_key: int = 0, rtype: int = 0) -> int:
    params = struct.pack(">QQ4xBx2x", key, sa_key, 0)
    return ini.scsi(bytes([0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0]), write_data=params).status


def write1(ini: RawInitiator) -> int:
    return ini.scsi(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), write_data=bytes(512)).status


GOOD, CHECK, CONFLICT = 0x00, 0x02, 0x18


def test_windows_pr_cycle_split_across_gateways(gateways: tuple[Gateway, Gateway]) -> None:
    """The Failover Cluster validation sequence (register, reserve Write Exclusive - Registrants Only, arbitrate by
    preempting, release), with node 1 on gateway A and node 2 on gateway B."""
    a, b = gateways
    with session(a, NODE1) as n1, session(b, NODE2) as n2:
        clear_ua(n1)
        clear_ua(n2)
        assert prout(n1, 0, sa_key=K1) == GOOD  # REGISTER on A
        assert prout(n2, 0, sa_key=K2) == GOOD  # REGISTER on B
        keys = n1.scsi(bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]), read_length=0x1000).data
        assert struct.unpack_from(">IIQQ", keys) == (2, 16, K1, K2)  # A sees B's registration
        assert prout(n1, 1, key=K1, rtype=5) == GOOD  # RESERVE WERO on A
        res = n2.scsi(bytes([0x5E, 1, 0, 0, 0, 0, 0, 0x10, 0, 0]), read_length=0x1000).data
        assert struct.unpack_from(">IIQ", res)[1:] == (16, K1) and res[21] == 5  # B reports A's reservation
        assert write1(n2) == GOOD  # a registrant writes under WERO, through the other gateway
        with session(b, "iqn.2026-01.test:stranger") as other:
            clear_ua(other)
            assert write1(other) == CONFLICT  # the conflict check on B sees A's reservation
            assert other.scsi(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), read_length=512).status == GOOD
        # Node 2 arbitrates: PREEMPT node 1's key from B, taking a Write Exclusive reservation.
        assert prout(n2, 4, key=K2, sa_key=K1, rtype=1) == GOOD
        r = n1.scsi(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), write_data=bytes(512))
        assert r.status == CHECK and r.sense[12:14] == b"\x2a\x05", r  # REGISTRATIONS PREEMPTED, on A
        assert write1(n1) == CONFLICT
        assert prout(n1, 1, key=K1, rtype=1) == CONFLICT  # its key is gone
        assert write1(n2) == GOOD
        # Node 1 rejoins and node 2 releases from B; A's next write passes.
        assert prout(n1, 0, sa_key=K1) == GOOD
        assert prout(n2, 2, key=K2, rtype=1) == GOOD  # RELEASE on B
        assert write1(n1) == GOOD
        assert prout(n2, 3, key=K2) == GOOD  # CLEAR from B
        r = n1.scsi(bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]), read_length=0x1000)
        assert r.status == CHECK and r.sense[12:14] == b"\x2a\x03", r  # RESERVATIONS PREEMPTED, on A
        keys = n1.scsi(bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]), read_length=0x1000).data
        assert struct.unpack_from(">II", keys)[1] == 0
    a.assert_healthy()
    b.assert_healthy()


def qemu_io(url: str, *cmds: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout, check=False)


def scrape(d: Daemon) -> str:
    with urllib.request.urlopen(d.metrics_url, timeout=10) as r:
        return str(r.read().decode())


def _write_through_b_while_a_dies(a: Gateway, url_b: str) -> int:
    """qemu-io writes 1 MiB stripes, each with its own pattern, through B; A is killed once the first is
    acknowledged, so the rest run while it dies and after. Returns the number of stripes, all acknowledged."""
    stripes = 48
    writes = [arg for i in range(stripes) for arg in ("-c", f"write -P 0x{0x40 + i:02x} {i}M 1M")] + ["-c", "flush"]
    writer = subprocess.Popen(["qemu-io", "-f", "raw", *writes, url_b], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, bufsize=0)
    assert writer.stdout is not None
    first = b""
    while not first.endswith(b"\n"):  # unbuffered, byte by byte: what follows stays in the pipe for communicate()
        c = writer.stdout.read(1)
        assert c, "qemu-io wrote nothing"
        first += c
    assert first.startswith(b"wrote 1048576/1048576 bytes"), first
    a.kill9()
    raw_out, raw_err = writer.communicate(timeout=120)
    out, err = raw_out.decode(errors="replace"), raw_err.decode(errors="replace")
    assert writer.returncode == 0 and "error" not in (out + err).lower(), f"{out[-2000:]}\n{err[-2000:]}"
    assert out.count("wrote 1048576/1048576 bytes") == stripes - 1, out[-2000:]  # those after the kill too
    return stripes


def test_gateway_a_killed_while_qemu_writes_through_b(gateways: tuple[Gateway, Gateway]) -> None:
    require_tools("qemu-io", "promtool")
    a, b = gateways
    url_b = b.url(0, iqn=b.iqn)
    # A nexus on B that stays logged in across the failover, to be told of it.
    watcher = session(b, NODE2)
    try:
        wait_for(lambda: rtpg_states(watcher) == {1: 0, 2: 1}, 3 * LEASE_S, "A never became the owner")
        lun = b.image.split("/", 1)[1]  # the LUN is named after its image
        assert f'lunsync_lun_alua_optimized{{lun="{lun}"}} 0.0' in scrape(b)
        stripes = _write_through_b_while_a_dies(a, url_b)

        def told() -> bool:
            r = watcher.scsi(bytes(6))
            return r.status == CHECK and r.sense[12:14] == b"\x2a\x06"  # ASYMMETRIC ACCESS STATE CHANGED

        took = wait_for(told, 4 * LEASE_S, "B's nexus was never told that the access states changed")
        assert took < 3 * LEASE_S
        assert rtpg_states(watcher) == {1: 1, 2: 0}  # B is active/optimized now, A's group active/non-optimized
        text = scrape(b)
        assert f'lunsync_lun_alua_optimized{{lun="{lun}"}} 1.0' in text  # and its metrics say so
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=60, check=False)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
    finally:
        watcher.close()
    # Every acknowledged write is there, read back through B (a fresh qemu-io: nothing cached).
    p = qemu_io(url_b, *(f"read -P 0x{0x40 + i:02x} {i}M 1M" for i in range(stripes)))
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, describe(p)
    assert p.stdout.count("read 1048576/1048576 bytes") == stripes, describe(p)
    # And they are in the image itself, read from the cluster without any gateway (SYNCHRONIZE CACHE made them so).
    exported = subprocess.run(["rbd", "-c", b.ceph_conf, "export", "--no-progress", b.image, "-"],
                              capture_output=True, timeout=120, check=False)
    assert exported.returncode == 0, exported.stderr[-2000:]
    for i in range(stripes):
        assert exported.stdout[i << 20:(i + 1) << 20] == bytes([0x40 + i]) * (1 << 20), f"stripe {i} lost"
    b.assert_healthy()


def test_lun_created_on_a_while_running_appears_on_b(gateways: tuple[Gateway, Gateway]) -> None:
    """``lun create --backend rbd`` and ``lun map`` on gateway A; gateway B serves the LUN within its sync period,
    with the same identity, and without having been told anything."""
    a, b = gateways
    image = f"{a.iqn.rsplit(':', 1)[1]}-more"
    env = {"LUNSYNC_API": a.api_url, "LUNSYNC_DATA_DIR": str(a.data_dir)}
    for args in (["lun", "create", image, "--backend", "rbd", "--pool", POOL, "--image", image, "--size", "16MiB"],
                 ["lun", "map", image, "--target", a.iqn, "--lun", "1"]):
        p = run([*lunsync_command(), *args, "--json"], env=env, timeout=120)
        assert p.returncode == 0, describe(p)
        if args[1] == "create":
            time.sleep(2.5)  # longer than B's sync period: B must wait for the mapping, then take it with the LUN
    created = json.loads(run([*lunsync_command(), "lun", "list", "--json"], env=env, timeout=60).stdout)
    naa = next(x for x in created if x["name"] == image)["naa"]

    def on_b() -> bool:
        with session(b, NODE1) as ini:
            clear_ua(ini)
            r = ini.scsi(cdb_inquiry(255, 1, 0x83), lun=1, read_length=255)
            return r.status == 0 and r.data[8:24].hex() == naa

    took = wait_for(on_b, 15, f"B never served {image} as LUN 1\n{b.log_tail()}")
    assert took < 10
    a.assert_healthy()
    b.assert_healthy()


def test_gateway_without_its_pool_refuses_to_start(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text(ceph_section(ceph_cluster))
    p = run([*lunsync_command(), "serve", "--data-dir", str(tmp_path / "data"), "--config", str(conf), "--listen",
             "127.0.0.1:0", "--api", "off", "--metrics", "off", "--workers", "1", "--gateway", "gw-x", "--port-group", "9",
             "--gateway-pool", "no-such-pool"], timeout=120)
    assert p.returncode == 1, describe(p)
    assert "gateway gw-x: cannot join through the cluster" in p.stderr and "no-such-pool" in p.stderr, describe(p)
    assert "Traceback" not in p.stderr, describe(p)


def report_luns(ini: RawInitiator) -> set[int]:
    """The LUN numbers REPORT LUNS lists (SPC-4 §6.33; single-level peripheral addresses)."""
    clear_ua(ini)
    r = ini.scsi(bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 4096) + bytes(2), read_length=4096)
    assert r.status == 0, r
    n = struct.unpack_from(">I", r.data)[0] // 8
    return {struct.unpack_from(">H", r.data, 8 + 8 * i)[0] & 0x3FFF for i in range(n)}


def test_unmap_map_and_delete_on_a_reach_b(gateways: tuple[Gateway, Gateway], ceph_cluster: CephCluster) -> None:
    """A shared LUN unmapped on gateway A disappears from B too, mapped again under another number it appears
    there so, and deleted on A it is forgotten by B, through the cluster's index alone; the image stays."""
    a, b = gateways
    image = f"{a.iqn.rsplit(':', 1)[1]}-gone"
    env = {"LUNSYNC_API": a.api_url, "LUNSYNC_DATA_DIR": str(a.data_dir)}

    def on_a(*args: str) -> None:
        p = run([*lunsync_command(), *args, "--json"], env=env, timeout=120)
        assert p.returncode == 0, describe(p)

    def luns_on_b() -> set[int]:
        with session(b, NODE1) as ini:
            return report_luns(ini)

    on_a("lun", "create", image, "--backend", "rbd", "--pool", POOL, "--image", image, "--size", "16MiB")
    on_a("lun", "map", image, "--target", a.iqn, "--lun", "3")
    wait_for(lambda: luns_on_b() == {0, 3}, 15, f"B never served {image} as LUN 3\n{b.log_tail()}")
    on_a("lun", "unmap", image, "--target", a.iqn)
    took = wait_for(lambda: luns_on_b() == {0}, 15, f"B kept serving {image} after A unmapped it\n{b.log_tail()}")
    assert took < 10
    on_a("lun", "map", image, "--target", a.iqn, "--lun", "5")
    wait_for(lambda: luns_on_b() == {0, 5}, 15, f"B never followed A's new mapping\n{b.log_tail()}")
    on_a("lun", "unmap", image, "--target", a.iqn)
    on_a("lun", "delete", image)
    wait_for(lambda: "was deleted on another gateway: unmapped and forgotten here" in b.log_text(), 15,
             f"B never forgot {image}\n{b.log_tail()}")
    assert luns_on_b() == {0}
    with session(b, NODE1) as ini:  # the LUN both still share is served as before
        clear_ua(ini)
        assert write1(ini) == 0
    p = run(["rbd", "-c", str(ceph_cluster.conf), "info", f"{POOL}/{image}"], timeout=60)
    assert p.returncode == 0, describe(p)  # deleting the LUN kept its image
    a.assert_healthy()
    b.assert_healthy()


# Writers of the set test: (gateway, LUN number). One in four goes through A, so that while A holds its writes the
# shared sequence runs on through B for several writes, across both LUNs, while A's snapshots are being created.
SET_WRITERS = [("a", 1), ("b", 2), ("b", 1), ("b", 2), ("a", 2), ("b", 1), ("b", 2), ("b", 1)]
SET_REGION = 512  # stamped blocks per writer (each writer has its own region of its LUN)


def _layering_luns(a: Gateway, b: Gateway, count: int) -> list[str]:
    """``count`` more shared LUNs (LUN 1, 2, ...), each an image made with the layering feature alone and attached
    on A, served by B once its sync has imported them. Without exclusive-lock nothing in librbd serializes the
    gateways' writes to an image, so nothing but lunsync's hold keeps B's writes out of A's snapshots."""
    env = {"LUNSYNC_API": a.api_url, "LUNSYNC_DATA_DIR": str(a.data_dir)}
    names = [f"{a.iqn.rsplit(':', 1)[1]}-{i}" for i in range(1, count + 1)]
    for i, name in enumerate(names, 1):
        p = run(["rbd", "-c", a.ceph_conf, "create", "--size", "32M", "--image-feature", "layering",
                 f"{POOL}/{name}"], timeout=60)
        assert p.returncode == 0, describe(p)
        for args in (["lun", "create", name, "--backend", "rbd", "--pool", POOL, "--image", name],
                     ["lun", "map", name, "--target", a.iqn, "--lun", str(i)]):
            p = run([*lunsync_command(), *args, "--json"], env=env, timeout=120)
            assert p.returncode == 0, describe(p)

    def on_b() -> bool:
        with session(b, NODE1) as ini:
            return set(range(1, count + 1)) <= report_luns(ini)

    wait_for(on_b, 15, f"B never served {names}\n{b.log_tail()}")
    return names


def hold_watchers(g: Gateway) -> int:
    """How many watches the cluster keeps on the gateways' shared object: one per gateway, and for up to a lease
    those of gateways killed since (an earlier test's)."""
    p = run(["rados", "-c", g.ceph_conf, "-p", POOL, "-N", "lunsync", "listwatchers", "lunsync.gateways"], timeout=60)
    assert p.returncode == 0, describe(p)
    return p.stdout.count("watcher=")


def serving_processes(g: Gateway) -> int:
    """How many processes of ``g`` serve LUNs, as its status says: each worker behind a control, or the one process
    (what the daemon was started with is not the count: a default or ``--workers 0`` is a number of cores)."""
    st = httpx.get(g.api_url + "/v1/status", headers={"Authorization": f"Bearer {g.api_token}"}, timeout=30)
    assert st.status_code == 200, st.text
    return len(st.json()["workers"]) or 1


def no_stale_watches(*gateways: Gateway) -> None:
    """Wait until the only watches are these gateways' (one per process that serves LUNs: each worker)."""
    want = sum(serving_processes(g) for g in gateways)
    wait_for(lambda: hold_watchers(gateways[0]) == want, 4 * LEASE_S,
             f"{hold_watchers(gateways[0])} watches on lunsync.gateways, not {want}")


def test_a_set_taken_on_a_holds_the_writes_on_b_too(gateways: tuple[Gateway, Gateway]) -> None:
    """Two shared LUNs written through both gateways on one causal sequence (write n + 1 is issued once n is
    acknowledged, whichever gateway and LUN took it). Sets taken through A's API: each set's two RBD snapshots
    together must hold a gap-free prefix of the sequence, which they do only if B held its writes too while A
    snapshotted; B's log says it held them. A releases each member's writes once that member's own snapshot
    exists (its log gives each member's hold), so a write let through on an early member while the other is still
    being snapshotted must stay out of the set, or the prefix would have a gap."""
    a, b = gateways
    luns = _layering_luns(a, b, 2)  # LUN 1 and LUN 2
    api = httpx.Client(base_url=a.api_url + "/v1", headers={"Authorization": f"Bearer {a.api_token}"}, timeout=60)
    by_name = {"a": a, "b": b}
    turns, writers = Turns(), len(SET_WRITERS)
    clients = [StampClient(by_name[g].host, by_name[g].port, a.iqn, f"iqn.2026-11.io.lunsync:gw-setw{i}",
                           0x400000D00000 + i) for i, (g, _) in enumerate(SET_WRITERS)]
    threads = [threading.Thread(target=turns.write_turns, args=(c, lun, i, writers, i * SET_REGION), daemon=True)
               for i, (c, (_, lun)) in enumerate(zip(clients, SET_WRITERS, strict=True))]
    no_stale_watches(a, b)
    mark, a_mark = b.log_mark(), a.log_mark()
    for t in threads:
        t.start()
    bounds: list[tuple[int, int]] = []
    sets, gap = 4, 48
    try:
        for k in range(sets):
            turns.wait_acked((k + 1) * gap + (bounds[-1][1] if bounds else 0))
            before = turns.acked
            r = api.post("/snapshots", json={"snapshots": [f"{n}@g{k}" for n in luns], "set": f"g{k}"})
            assert r.is_success, r.text
            bounds.append((before, turns.acked))
        turns.wait_acked(bounds[-1][1] + gap)
    finally:
        turns.finish()
        for t in threads:
            t.join(30)
    assert turns.error is None, repr(turns.error)
    held = re.findall(r"hold \w+ of gateway gw-a: writes held ([0-9.]+) ms", b.log_since(mark))
    assert len(held) == sets, f"B held {len(held)} times for {sets} sets\n{b.log_tail()}"
    # On A each member's writes were released as soon as its own snapshot existed, not when the last one did: the
    # prefix checks below are what show that this early release kept every set one point in time.
    taken = re.findall(r"snapshot set g\d+ .*writes held ([0-9.]+) ms \(per LUN: ([^)]*)\)", a.log_since(a_mark))
    assert len(taken) == sets, f"A logged {len(taken)} per-LUN holds for {sets} sets\n{a.log_tail()}"
    for whole, per_lun in taken:
        own = dict(re.findall(r"(\S+) ([0-9.]+)", per_lun))
        assert set(own) == set(luns) and max(map(float, own.values())) <= float(whole), (whole, per_lun)
    per_writer = -(-(turns.acked + 1) // writers)
    reader = StampClient(a.host, a.port, a.iqn, "iqn.2026-11.io.lunsync:gw-setr", 0x400000D000FF)
    try:
        for k, (before, after) in enumerate(bounds):
            seen: set[int] = set()
            for j, name in enumerate(luns):
                api.post(f"/snapshots/{name}@g{k}/expose", json={"target": a.iqn, "lun": 11 + j}).raise_for_status()
            for i, (_, lun) in enumerate(SET_WRITERS):
                data = reader.read(10 + lun, i * SET_REGION, per_writer)
                for off in range(per_writer):
                    got = parse(data[off * 4096:(off + 1) * 4096])
                    assert got != "damaged", f"g{k}: writer {i}'s block {off} is damaged"
                    if got is not None:
                        assert isinstance(got, Stamp) and (got.writer, got.block) == (i, i * SET_REGION + off), got
                        seen.add(got.seq)
            for j, name in enumerate(luns):
                api.delete(f"/snapshots/{name}@g{k}/expose").raise_for_status()
            last = max(seen)
            missing = sorted(set(range(last + 1)) - seen)
            assert not missing, f"g{k}: not one point in time: {missing[:10]} missing below {last}"
            assert before <= last <= after + 1, (k, before, last, after)
    finally:
        reader.close()
    a.assert_healthy()
    b.assert_healthy()


def test_a_set_fails_cleanly_while_a_gateway_does_not_hold(gateways: tuple[Gateway, Gateway]) -> None:
    """Gateway B stopped (SIGSTOP: its watch stays registered, it answers nothing): a set on A over the shared LUN
    is refused within the acknowledgement bound, nothing is taken, and A's writes go on; once B runs again, it holds
    for the next set and its writes, held or not meanwhile, go on too."""
    a, b = gateways
    lun = a.image.split("/", 1)[1]
    api = httpx.Client(base_url=a.api_url + "/v1", headers={"Authorization": f"Bearer {a.api_token}"}, timeout=60)
    assert b.proc is not None
    no_stale_watches(a, b)
    with session(a, NODE1) as ia:
        clear_ua(ia)
        os.killpg(b.proc.pid, signal.SIGSTOP)  # the control and its workers
        try:
            t0 = time.monotonic()
            r = api.post("/snapshots", json={"snapshots": [f"{lun}@stopped"], "set": "stopped"})
            took = time.monotonic() - t0
            assert r.status_code == 409 and "not every gateway held its writes" in r.text, r.text
            assert took < 5, took  # the acknowledgement bound (2 s), not the hold's (10 s)
            assert write1(ia) == GOOD  # A's own hold was released with the set
        finally:
            os.killpg(b.proc.pid, signal.SIGCONT)
    assert not [s for s in api.get("/snapshots").json() if s["name"] == f"{lun}@stopped"]
    p = run(["rbd", "-c", a.ceph_conf, "snap", "ls", a.image], timeout=60)
    assert p.returncode == 0 and "lunsync.stopped" not in p.stdout, describe(p)
    mark = b.log_mark()
    r = api.post("/snapshots", json={"snapshots": [f"{lun}@after"], "set": "after"})
    assert r.is_success, r.text
    b.wait_for_log(r"hold \w+ of gateway gw-a: writes held", since=mark, timeout=10)
    with session(b, NODE2) as ib:
        clear_ua(ib)
        assert write1(ib) == GOOD
    a.assert_healthy()
    b.assert_healthy()


def test_apply_dropping_a_shared_lun_reaches_b(gateways: tuple[Gateway, Gateway]) -> None:
    """``lunsync apply`` of a configuration without the shared LUN removes it on A and leaves a tombstone, as
    ``lun delete`` does: B unmaps and forgets it at its next round."""
    a, b = gateways
    assert "was deleted on another gateway" not in b.log_text()
    conf = a.workdir / "without.toml"
    conf.write_text(f'[[target]]\niqn = "{a.iqn}"\nluns = []\n')
    env = {"LUNSYNC_API": a.api_url, "LUNSYNC_DATA_DIR": str(a.data_dir)}
    p = run([*lunsync_command(), "apply", str(conf), "--json"], env=env, timeout=120)
    assert p.returncode == 0, describe(p)
    wait_for(lambda: "was deleted on another gateway: unmapped and forgotten here" in b.log_text(), 15,
             f"B never forgot the LUN\n{b.log_tail()}")
    a.assert_healthy()
    b.assert_healthy()
