"""How long a snapshot set holds writes when its LUNs are on two worker processes, beside one process.

Starts ``lunsync serve`` (one process, then ``--workers 2``) with the API, a second target (which the control places
on the other worker) and one 256 MiB LUN on each of the two targets, then takes ``--sets`` snapshot sets of both
LUNs through the API, first with no I/O, then with both LUNs under 4 KiB writes at QD8 (one ``qemu-img bench -w``
per LUN, restarted until the sets are done). Prints the ``hold_ms`` the daemon answered (how long new writes were
held on the members: with two workers, the round trips of the two-phase hold) and the request's wall time, as
median, minimum and maximum.

Usage: python tests/bench/cross_set_hold.py [--sets 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e.harness import DEMO_IQN, Daemon

SECOND = "iqn.2026-11.io.lunsync:holdb"


def writes(d: Daemon, url: str, stop: threading.Event) -> None:
    while not stop.is_set():
        subprocess.run(["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-w", "-d", "8", "-s", "4096", "-c",
                        "4000", url], capture_output=True, check=False)


def measure(d: Daemon, api: httpx.Client, sets: int, tag: str) -> tuple[list[float], list[float]]:
    holds, walls = [], []
    for k in range(sets):
        t0 = time.perf_counter()
        r = api.post("/snapshots", json={"snapshots": [f"h0@{tag}{k}", f"h1@{tag}{k}"], "set": f"{tag}{k}"})
        walls.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        holds.append(float(r.json()["hold_ms"]))
    return holds, walls


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f}, {min(xs):.2f}-{max(xs):.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=10)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lunsync-holds-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        for workers in (None, 2):
            with Daemon(Path(tmp) / f"w{workers or 1}", api=True, workers=workers) as d:
                api = httpx.Client(base_url=d.api_url + "/v1", headers={"Authorization": f"Bearer {d.api_token}"},
                                   timeout=60)
                api.post("/targets", json={"iqn": SECOND}).raise_for_status()
                for name, iqn in (("h0", DEMO_IQN), ("h1", SECOND)):
                    api.post("/luns", json={"name": name, "size": "256MiB"}).raise_for_status()
                    api.post(f"/targets/{iqn}/luns", json={"name": name, "lun": 1}).raise_for_status()
                owners = [sorted(w["luns"]) for w in api.get("/status").json().get("workers", [])]
                where = "one process" if workers is None else f"2 workers, LUNs {owners}"
                idle = measure(d, api, a.sets, "idle")
                stop = threading.Event()
                load = [threading.Thread(target=writes, args=(d, d.url(1, iqn=iqn), stop), daemon=True)
                        for iqn in (DEMO_IQN, SECOND)]
                for t in load:
                    t.start()
                time.sleep(1)
                try:
                    busy = measure(d, api, a.sets, "busy")
                finally:
                    stop.set()
                    for t in load:
                        t.join(60)
                print(f"{where}: writes held, ms: no I/O {spread(idle[0])}; under 4 KiB writes {spread(busy[0])} "
                      f"(request ms: {spread(idle[1])} / {spread(busy[1])})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
