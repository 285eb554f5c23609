"""Creating many LUNs through the API: the last create costs about what the first did, and another LUN's reads stay
on time meanwhile.

One API client creates ``LUN_SCALE_N`` LUNs (2 000 in ``make test``) one after the other, as a provisioning script
does, from a process of its own (threads of this one would hold its GIL against the reader and count their Python
time as the target's latency). Meanwhile a raw iSCSI session reads 4 KiB blocks of the demo LUN continuously. The
median create of the last 200 must stay within three times that of the first 200 (plus 10 ms), and the reads' p99
under 20 ms. The array's target is 10 ms for a LUN the management traffic does not touch, and it holds on a quiet
machine (below); the test's bound is twice that, because this machine is shared: once, with another engineer's load
making every create four times slower (18 ms), the p99 reached 12.1 ms.

Measured on the shared two-core test machine (p99 of the reads; median creates, first / last 200): no creates at all,
0.6-1.4 ms; 2 000 creates, 3-6 ms (creates 3-6 ms throughout), 12.1 ms under the load above; 5 000, 9.9-10.0 ms
twice; 10 000, 4.4 ms (3.9 / 2.6 ms). The catalog that scanned every LUN per create fails at ``LUN_SCALE_N=10000``
(creates 2.8 / 32.8 ms, p99 30.6 ms), not yet at 2 000 (4.4 / 6.3 ms, p99 7.1 ms): that per-create work is counted
exactly, at any size, by ``tests/snapshots/test_catalog.py``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from api_harness import ApiDaemon, raw_session
from iscsi_scapy import cdb_read10

pytestmark = [pytest.mark.e2e]

N = int(os.environ.get("LUN_SCALE_N", "2000"))

# The creating client: LUNs 0 to N - 1; prints "index seconds" per create, exits 1 on a refusal.
CREATE = """
import sys, time, httpx
url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
    for i in range(n):
        t0 = time.monotonic()
        r = c.post("/v1/luns", json={"name": f"scale{i}", "size": "1MiB"})
        if r.status_code != 201:
            sys.exit(r.text)
        print(i, time.monotonic() - t0)
"""


def test_the_last_of_many_creates_costs_what_the_first_did_and_other_luns_reads_stay_on_time(tmp_path: Path) -> None:
    d = ApiDaemon(tmp_path / "daemon", demo_size="16MiB")
    d.start()
    try:
        reader = raw_session(d, isid=0x11)
        assert reader.write10(0, b"\x5a" * 4096).status == 0
        lat: list[float] = []
        bad: list[int] = []  # statuses of reads that failed or returned other data (an assert would end the thread)
        done = threading.Event()

        def read_loop() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                res = reader.scsi(cdb_read10(0, 8), lun=0, read_length=4096)
                lat.append(time.monotonic() - t0)
                if res.status != 0 or res.data != b"\x5a" * 4096:
                    bad.append(res.status)
                time.sleep(0.002)

        t = threading.Thread(target=read_loop)
        t.start()
        time.sleep(0.5)
        started = time.monotonic()
        creator = subprocess.Popen([sys.executable, "-c", CREATE, f"http://127.0.0.1:{d.api_port}", d.token, str(N)],
                                   stdout=subprocess.PIPE, text=True)
        out = creator.communicate(timeout=600)[0]
        took = time.monotonic() - started
        done.set()
        t.join(10)
        reader.close()
        assert creator.returncode == 0, out[-2000:]
        rate = [(int(i), float(s)) for i, s in (line.split() for line in out.splitlines())]
        assert not bad and len(lat) > 100, (bad[:10], len(lat))
        q = statistics.quantiles(lat, n=100)
        first = statistics.median(s for i, s in rate if i < 200)
        last = statistics.median(s for i, s in rate if i >= N - 200)
        print(f"{N} creates in {took:.1f} s; create median first 200 {first * 1e3:.1f} ms, last 200 "
              f"{last * 1e3:.1f} ms; reads {len(lat)}: p50 {q[49] * 1e3:.2f} ms p99 {q[98] * 1e3:.2f} ms "
              f"max {max(lat) * 1e3:.1f} ms")
        assert last < 3 * first + 0.010, f"median create: first 200 {first * 1e3:.1f} ms, last 200 {last * 1e3:.1f} ms"
        assert q[98] < 0.020, f"4 KiB reads of another LUN: p99 {q[98] * 1e3:.1f} ms over {len(lat)} reads"
    finally:
        d.close()
