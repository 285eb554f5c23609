"""Benchmark of RBD snapshots and restores through the real daemon (not a test; ``make bench`` runs it, or by hand):

    .venv/bin/python tests/bench/rbd_snapshots.py [--sets 20] [--images 8] [--size-mib 256]

It starts a one-node Ceph cluster (tests/ceph_cluster.py) and a daemon pointed at it, and reports:

1. write hold of an RBD snapshot set across ``--images`` RBD LUNs, as the engine measures it (``hold_ms`` of each
   ``POST /v1/snapshots``: from closing the first member's write gate to releasing the last, the RBD snapshots
   created in between), while an initiator keeps writing 4 KiB blocks to two of the LUNs; min, median and max over
   ``--sets`` sets (target: under 10 ms);
2. first redirected read of a resync from an RBD snapshot to its origin: an initiator already logged in sends a
   4 KiB READ of a region the resync has still to copy right after ``POST /v1/recovery/resync`` returns; the time
   from the request to that read's data, which must be the snapshot's (target: under 50 ms), and the bytes the job
   copied against the changed extents ``diff_iterate`` names.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import httpx
import rados

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ceph_cluster import POOL, start_cluster
from e2e.harness import DEMO_IQN, Daemon
from e2e.test_rbd_luns import ceph_section
from iscsi_scapy import RawInitiator
from lunsync.snapshots import rbdsnap

MiB = 1 << 20
CHUNK = 64 << 10


class Writer:
    """4 KiB WRITE(10)s in a loop on some LUNs over one session, counting those acknowledged."""

    def __init__(self, port: int, luns: list[int]) -> None:
        self.port, self.luns = port, luns
        self.done = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with RawInitiator("127.0.0.1", self.port, timeout=10) as ri:
            ri.login(DEMO_IQN)
            i = 0
            while not self._stop.is_set():
                lun = self.luns[i % len(self.luns)]
                ri.write10((i * 8) % 65536, b"\x5a" * 4096, lun=lun)
                self.done += 1
                i += 1

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=20)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=256, help="each LUN's size")
    a = ap.parse_args()
    cluster = start_cluster()
    print(f"ceph cluster up in {cluster.start_seconds:.1f} s")
    try:
        with tempfile.TemporaryDirectory(prefix="lunsync-bench-rbd-") as tmp:
            d = Daemon(Path(tmp), config=ceph_section(cluster.conf, cluster.keyring), demo_size="16MiB", api=True)
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
                with Writer(d.port, [1, 2]) as w:
                    time.sleep(0.5)
                    for s in range(a.sets):
                        r = http.post("/snapshots", json={"snapshots": [f"{n}@set{s}" for n in names],
                                                          "set": f"set{s}"})
                        r.raise_for_status()
                        body = r.json()
                        assert {x["kind"] for x in body["snapshots"]} == {"rbd"}, body
                        holds.append(float(body["hold_ms"]))
                    writes = w.done
                print(f"RBD snapshot set of {a.images} images x {a.size_mib} MiB, {a.sets} sets, 4 KiB writes "
                      f"running on 2 of them ({writes} acknowledged): writes held min {min(holds):.2f} / median "
                      f"{statistics.median(holds):.2f} / max {max(holds):.2f} ms (engine's hold_ms; target < 10 ms)")
                for s in range(a.sets):
                    for n in names:
                        http.delete(f"/snapshots/{n}@set{s}").raise_for_status()
                first_read(d, http, cluster.conf)
            finally:
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
