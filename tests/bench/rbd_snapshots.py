"""Benchmark of RBD snapshots and restores through the real daemon (not a test; ``make bench`` runs it, or by hand):

    .venv/bin/python tests/bench/rbd_snapshots.py [--sets 20] [--images 8] [--size-mib 256] [--gateways 2]

It starts a one-node Ceph cluster (tests/ceph_cluster.py) and a daemon pointed at it, and reports:

1. write hold of an RBD snapshot set across ``--images`` RBD LUNs, as the engine measures it (``hold_ms`` of each
   ``POST /v1/snapshots``: from closing the first member's write gate to releasing the last, the RBD snapshots
   created in between), while two initiators keep writing 4 KiB blocks, each to two of the LUNs; min, median and
   max over ``--sets`` sets (target: under 10 ms); then each member's own hold (from the daemon's log: a member's
   writes are released as soon as its own snapshot exists), over every member of every set;
2. first redirected read of a resync from an RBD snapshot to its origin: an initiator already logged in sends a
   4 KiB READ of a region the resync has still to copy right after ``POST /v1/recovery/resync`` returns; the time
   from the request to that read's data, which must be the snapshot's (target: under 50 ms), and the bytes the job
   copied against the changed extents ``diff_iterate`` names.

Beside 1., in the same run and on the same cluster, the floor that lunsync cannot go under, librbd alone (plain
``rbd.Image`` calls, no lunsync, lunsync's flags: librbd's quiesce round skipped): how long one snapshot of one image
stalls a writer of that image that librbd itself holds while the monitor commits the new snapshot id, and how long
``--images`` snapshots of as many images take when all are created at once, each on its own thread. The sets and the
baseline alternate, so a busy moment of the machine weighs on both.

With ``--gateways 2`` the daemon is gateway ``gw-a`` and a second gateway (``gw-b``, on 127.0.0.2) serves the same
images, with a writer of its own on two of them: every set then also holds gw-b's writes (a notify round trip through
the cluster), and the figure is that set's hold; gw-b's own hold of its writes, from its log, is printed beside it.
The resync part is skipped then.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import httpx
import rados
import rbd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ceph_cluster import POOL, start_cluster
from e2e.harness import DEMO_IQN, Daemon
from e2e.test_rbd_luns import ceph_section
from iscsi_scapy import RawInitiator
from lunsync.snapshots import rbdsnap

MiB = 1 << 20
CHUNK = 64 << 10


class Looping:
    """A thread running ``_loop`` from ``__enter__`` until ``_stop`` is set at ``__exit__``, then ``_closed``."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def _closed(self) -> None:
        pass

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)
        self._closed()


class Writer(Looping):
    """4 KiB WRITE(10)s in a loop on some LUNs over one session, counting those acknowledged."""

    def __init__(self, port: int, luns: list[int], host: str = "127.0.0.1") -> None:
        super().__init__()
        self.port, self.luns, self.host = port, luns, host
        self.done = 0

    def _loop(self) -> None:
        with RawInitiator(self.host, self.port, timeout=10) as ri:
            # Each writer its own initiator: a second login of the same one would reinstate (end) the first's session.
            ri.login(DEMO_IQN, f"iqn.2026-11.io.lunsync:bench-writer-{self.luns[0]}")
            i = 0
            while not self._stop.is_set():
                lun = self.luns[i % len(self.luns)]
                ri.write10((i * 8) % 65536, b"\x5a" * 4096, lun=lun)
                self.done += 1
                i += 1


def spread(values: list[float]) -> str:
    return f"min {min(values):.2f} / median {statistics.median(values):.2f} / max {max(values):.2f}"


class LibrbdAlone(Looping):
    """The baseline of plain librbd on ``images`` images of its own: a thread writing 4 KiB blocks to the first one
    synchronously (one at a time), and per :meth:`round` one snapshot of that image alone, then one of every image
    at once. ``stalls`` are the longest write that overlapped each single snapshot, ``sets`` the wall time of each
    all-at-once round."""

    def __init__(self, conf: Path, keyring: Path, images: int, size: int) -> None:
        super().__init__()
        self._rados = rados.Rados(conffile=str(conf), name="client.admin", conf={"keyring": str(keyring)})
        self._rados.connect()
        self._ioctx = self._rados.open_ioctx(POOL)
        self.names = [f"alone{i}" for i in range(images)]
        for n in self.names:
            rbd.RBD().create(self._ioctx, n, size, old_format=False)
        self.images = [rbd.Image(self._ioctx, n) for n in self.names]
        self.stalls: list[float] = []
        self.sets: list[float] = []
        self._writes: list[tuple[float, float]] = []

    def _loop(self) -> None:
        image, block, i = self.images[0], b"\x5a" * 4096, 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            image.write(block, (i % 4096) * 4096)
            self._writes.append((t0, time.perf_counter()))
            i += 1

    def _create(self, image: rbd.Image, name: str) -> None:
        image.create_snap(name, rbd.RBD_SNAP_CREATE_SKIP_QUIESCE)

    def round(self, n: int) -> None:
        t0 = time.perf_counter()
        self._create(self.images[0], f"one{n}")
        t1 = time.perf_counter()
        time.sleep(0.05)  # the writer's last write ends inside the window; let one more start and finish after it
        self.stalls.append(max(((e - s) * 1000 for s, e in self._writes if e >= t0 and s <= t1), default=0.0))
        threads = [threading.Thread(target=self._create, args=(im, f"all{n}")) for im in self.images]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.sets.append((time.perf_counter() - t0) * 1000)

    def _closed(self) -> None:
        for image, name in zip(self.images, self.names, strict=True):
            for snap in list(image.list_snaps()):
                image.remove_snap(snap["name"])
            image.close()
            rbd.RBD().remove(self._ioctx, name)
        self._ioctx.close()
        self._rados.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=20)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=256, help="each LUN's size")
    ap.add_argument("--gateways", type=int, choices=(1, 2), default=1,
                    help="2: a second gateway serves the images too, and every set holds its writes")
    a = ap.parse_args()
    cluster = start_cluster()
    print(f"ceph cluster up in {cluster.start_seconds:.1f} s")
    try:
        with tempfile.TemporaryDirectory(prefix="lunsync-bench-rbd-") as tmp:
            gw = ["--gateway-pool", POOL]
            d = Daemon(Path(tmp), config=ceph_section(cluster.conf, cluster.keyring), demo_size="16MiB", api=True,
                       extra_args=["--gateway", "gw-a", "--port-group", "1", *gw] if a.gateways == 2 else [])
            peer = Daemon(Path(tmp) / "b", config=ceph_section(cluster.conf, cluster.keyring), demo=False,
                          host="127.0.0.2", extra_args=["--gateway", "gw-b", "--port-group", "2", *gw])
            d.start()
            try:
                http = httpx.Client(base_url=d.api_url + "/v1", headers={"Authorization": f"Bearer {d.api_token}"},
                                    timeout=120)
                names = [f"b{i}" for i in range(a.images)]
                for i, name in enumerate(names):
                    r = http.post("/luns", json={"name": name, "backend": "rbd", "pool": POOL, "image": name,
                                                 "size": a.size_mib * MiB})
                    r.raise_for_status()
                    http.post(f"/targets/{DEMO_IQN}/luns", json={"name": name, "lun": i + 1}).raise_for_status()
                holds = []
                if a.gateways == 2:
                    peer.start()
                    peer.wait_for_log(rf"lun {names[-1]} imported from the cluster", timeout=60)
                    mark = peer.log_mark()
                own = d.log_mark()
                with LibrbdAlone(cluster.conf, cluster.keyring, a.images, a.size_mib * MiB) as alone, \
                        Writer(d.port, [1, 2]) as w, \
                        Writer(peer.port if a.gateways == 2 else d.port, [3, 4],
                               peer.host if a.gateways == 2 else d.host) as w2:
                    time.sleep(0.5)
                    for s in range(a.sets):
                        r = http.post("/snapshots", json={"snapshots": [f"{n}@set{s}" for n in names],
                                                          "set": f"set{s}"})
                        r.raise_for_status()
                        body = r.json()
                        assert {x["kind"] for x in body["snapshots"]} == {"rbd"}, body
                        holds.append(float(body["hold_ms"]))
                        alone.round(s)
                    writes = w.done + w2.done
                where = "through gw-a on 2 of them and through gw-b on 2 others" if a.gateways == 2 else "on 4 of them"
                print(f"RBD snapshot set of {a.images} images x {a.size_mib} MiB, {a.sets} sets, 4 KiB writes "
                      f"running {where} ({writes} acknowledged): writes held {spread(holds)} ms (engine's "
                      "hold_ms, the longest member's; target < 10 ms)")
                per_lun = [float(ms) for line in re.findall(r"per LUN: ([^)]*)\)", d.log_since(own))
                           for ms in re.findall(r"b\d+ ([0-9.]+)", line)]
                if per_lun:
                    print(f"each member's writes held {spread(per_lun)} ms ({len(per_lun)} member holds: a member's "
                          "writes resume once its own snapshot exists)")
                if a.gateways == 2:
                    peer_holds = [float(x) for x in re.findall(r"of gateway gw-a: writes held ([0-9.]+) ms",
                                                               peer.log_since(mark))]
                    print(f"gw-b held its writes for each set {spread(peer_holds)} ms ({len(peer_holds)} holds, "
                          "from the hold's arrival to its release, by its log)")
                print(f"librbd alone, same cluster, same run: one image's snapshot stalled a writer of that image "
                      f"{spread(alone.stalls)} ms (the write librbd held longest during each); {a.images} images' "
                      f"snapshots created at once took {spread(alone.sets)} ms")
                for s in range(a.sets):
                    for n in names:
                        http.delete(f"/snapshots/{n}@set{s}").raise_for_status()
                if a.gateways == 1:
                    first_read(d, http, cluster.conf)
            finally:
                peer.close()
                d.close()
    finally:
        cluster.stop()
    return 0


def first_read(d: Daemon, http: httpx.Client, conf: Path) -> None:
    with RawInitiator("127.0.0.1", d.port, timeout=10) as ri:
        ri.login(DEMO_IQN)
        for lba in range(0, 32 * MiB // 512, 2048):
            ri.write10(lba, b"\xaa" * MiB, lun=1)
        http.post("/snapshots", json={"snapshots": ["b0@r1"]}).raise_for_status()
        for lba in range(0, 16 * MiB // 512, 2048):
            ri.write10(lba, b"\xbb" * MiB, lun=1)
        http.get("/recovery")  # a warm connection: the figure is the restore, not TCP and the API's first call
        mark = d.log_mark()
        t0 = time.perf_counter()
        r = http.post("/recovery/resync", json={"pairs": [{"snapshot": "b0@r1"}], "rate_mib_s": 1})
        post_ms = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        got = ri.read10(16 * MiB // 512 - 8, 8, lun=1)  # the last 4 KiB of the changed 16 MiB: copied last
        read_ms = (time.perf_counter() - t0) * 1000
        ok = got.status == 0 and got.data == b"\xaa" * 4096
        rid = r.json()["id"]
        inside = d.wait_for_log(r"serve their snapshots ([0-9.]+) ms", since=mark).group(1)
        http.post(f"/recovery/{rid}/cancel")
        http.post(f"/recovery/{rid}/wait", params={"timeout_s": 60})
    print(f"resync from an RBD snapshot to its origin: POST /v1/recovery/resync answered in {post_ms:.1f} ms "
          f"(RecoverSet inside the daemon {inside} ms); the "
          f"first redirected 4 KiB read returned the snapshot's data {'' if ok else '(WRONG DATA) '}{read_ms:.1f} ms "
          "after the request (target < 50 ms)")
    with rados.Rados(conffile=str(conf), name="client.admin") as cluster, cluster.open_ioctx(POOL) as ioctx:
        changed = rbdsnap.changed_extents(ioctx, "b0", rbdsnap.snapshot_name("r1"))
    r = http.post("/recovery/resync", json={"pairs": [{"snapshot": "b0@r1"}]})
    r.raise_for_status()
    final = http.post(f"/recovery/{r.json()['id']}/wait", params={"timeout_s": 300}).json()
    (pair,) = final["pairs"]
    expect = len(rbdsnap.regions_of(changed, CHUNK)) * CHUNK
    print(f"only what changed: {sum(n for _, n in changed)} bytes in {len(changed)} changed extents "
          f"({expect} bytes of {CHUNK >> 10} KiB regions) of a {http.get('/luns/b0').json()['size_bytes']}-byte "
          f"image; the job copied {pair['bytes_copied']} bytes ({final['state']})")


if __name__ == "__main__":
    sys.exit(main())
