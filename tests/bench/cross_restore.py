"""What a restore costs when its snapshot is served by another worker process, beside one whose snapshot is the
destination worker's own.

Starts ``lunsync serve --workers 2`` with the API: ``demo0`` (worker 0, filled, then snapshotted as ``demo0@s``),
``near`` on the demo target (worker 0 too) and ``far`` on a second target (placed on worker 1), both the LUN's size.
Each destination is then restored from ``demo0@s`` unthrottled (``rate_mib_s`` high enough never to wait), and the
script prints the POST's wall time, the latency of the first redirected 4 KiB read (a raw iSCSI READ(10) at the
LUN's last block, already logged in), and the copy rate (the LUN's size over the time from the POST until the set is
done, as ``recovery show`` would see it).

Usage: python tests/bench/cross_restore.py [--size-mib 512] [--trials 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e.harness import DEMO_IQN, Daemon
from iscsi_scapy import RawInitiator

FAR = "iqn.2026-11.io.lunsync:far"
MIB = 1 << 20
BS = 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--trials", type=int, default=3)
    a = ap.parse_args()
    size = a.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="lunsync-xrestore-") as tmp:
        d = Daemon(Path(tmp), workers=2, api=True, demo_size=f"{a.size_mib}MiB").start()
        try:
            http = httpx.Client(base_url=d.api_url + "/v1", headers={"Authorization": f"Bearer {d.api_token}"},
                                timeout=600)

            def ok(r: httpx.Response) -> httpx.Response:
                if r.is_error:
                    raise SystemExit(f"{r.request.method} {r.request.url}: {r.status_code} {r.text}")
                return r

            ok(http.post("/targets", json={"iqn": FAR}))
            for name, iqn in (("near", DEMO_IQN), ("far", FAR)):
                ok(http.post("/luns", json={"name": name, "size": f"{a.size_mib}MiB"}))
                ok(http.post(f"/targets/{iqn}/luns", json={"name": name}))
            subprocess.run(["qemu-img", "bench", "-w", "-t", "none", "-f", "raw", "-s", "1M", "-c",
                            str(a.size_mib), "-d", "8", d.url(0)], check=True, capture_output=True, timeout=600)
            ok(http.post("/snapshots", json={"snapshots": ["demo0@s"]}))
            workers = ok(http.get("/status")).json()["workers"]
            print(f"# build: {sys.executable}; {a.size_mib} MiB LUN; workers: "
                  + "; ".join(f"{w['index']}: {', '.join(w['luns'])}" for w in workers))
            for name, iqn, lun in (("near", DEMO_IQN, 1), ("far", FAR, 0)):
                posts, firsts, rates = [], [], []
                for trial in range(a.trials):
                    ini = RawInitiator("127.0.0.1", d.port, timeout=60)
                    ini.login(iqn, initiator=f"iqn.2026-11.org.example:bench{trial}", isid=0x23D000000200 + trial)
                    for _ in range(4):
                        if ini.test_unit_ready(lun=lun).status == 0:
                            break
                    t0 = time.perf_counter()
                    r = ok(http.post("/recovery/resync", json={
                        "pairs": [{"snapshot": "demo0@s", "destination": name}], "rate_mib_s": 100000}))
                    t1 = time.perf_counter()
                    res = ini.read10(size // BS - 8, 8, lun=lun)
                    t2 = time.perf_counter()
                    if res.status != 0:
                        raise SystemExit(f"first read of {name}: status {res.status} sense {res.sense.hex()}")
                    rs = r.json()["id"]
                    while ok(http.get(f"/recovery/{rs}")).json()["state"] not in ("done", "failed", "cancelled"):
                        time.sleep(0.02)
                    t3 = time.perf_counter()
                    state = http.get(f"/recovery/{rs}").json()["state"]
                    if state != "done":
                        raise SystemExit(f"restore of {name}: {state}")
                    ini.close()
                    posts.append((t1 - t0) * 1000)
                    firsts.append((t2 - t1) * 1000)
                    rates.append(a.size_mib / (t3 - t0))
                where = "another worker's snapshot" if name == "far" else "the same worker's snapshot"
                print(f"{name} ({where}): POST {statistics.median(posts):.1f} ms, first redirected 4 KiB read "
                      f"{statistics.median(firsts):.2f} ms (min {min(firsts):.2f}, max {max(firsts):.2f}), copy "
                      f"{statistics.median(rates):.0f} MiB/s (min {min(rates):.0f}, max {max(rates):.0f}); medians "
                      f"of {a.trials}")
        finally:
            d.close()


if __name__ == "__main__":
    main()
