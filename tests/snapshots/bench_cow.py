"""Benchmarks for the README figures (not a test): copy-on-write write IOPS and snapshot-set hold time.

``python tests/snapshots/bench_cow.py iops [SECONDS [ROUNDS]]`` drives the real :class:`~lunsync.snapshots.cow.CowVolume` on a 1 GiB
sparse file with 4 KiB random writes (32 in flight, page-cache writes as the daemon does them) for a fixed time in
each case: no snapshot, 1 snapshot, 8 snapshots, and 1 snapshot after every chunk is preserved. Each case starts from
a fresh LUN filled with data, so first writes really preserve; a last case takes 1 snapshot of a LUN never written
(thin), where every first write lands on a hole. The cases alternate for ROUNDS rounds (3) and each figure is the
median of its runs.

``python tests/snapshots/bench_cow.py iscsi [SIZE_MIB [ROUNDS]]`` measures the same through iSCSI, as an initiator
sees it: ``lunsync serve`` on loopback, and ``qemu-img bench`` (QEMU's libiscsi driver, 32 in flight) writing 4 KiB
at a 68 KiB stride, so that each write of a pass lands in a chunk of its own: on a filled LUN after a snapshot,
every one is a first write that must preserve. Each case gets a fresh LUN of SIZE_MIB (1024), filled through iSCSI
with 128 KiB writes and flushed: ``none`` (twice: ``none`` against ``none-again`` is the A/A noise of the bench),
``one`` and ``eight`` snapshots, ``preserved`` (1 snapshot, every chunk already preserved), and 128 KiB sequential
writes with no snapshot and with one. The daemon's staging bound (``--write-staging``, first writes answered before
their copy is durable: qemu's writes carry no FUA and the write cache is on) is set to an eighth of a pass's bytes,
or ``STAGING_MIB`` if given: each 4 KiB case reports its burst (the first eighth of a pass, which fills the staging
area) and its sustained rate (the other seven eighths: 7x the bound, written with the staging full). The run prints
the bound, the daemon's count of staged writes and of writes that waited for room, and the daemon's CPU time (user
and system, every thread, from /proc) per sustained write of each 4 KiB case. The cases alternate for ROUNDS rounds
(3) and each figure is the median. ``CASES`` (comma-separated, ``none`` and ``none-again`` among them) runs only
those cases. ``BENCH_DIR`` places the daemon's data dir, and with it the LUNs and the pool, on one file system (the
run names its type): on XFS or btrfs the large copies of a preservation batch are reflinks.

``python tests/snapshots/bench_cow.py set`` starts ``lunsync serve``, creates 8 thin LUNs of 10 GiB, runs 4 KiB
random writes on them through the daemon's own volumes via qemu-io, and creates a snapshot set of all 8 through the
API several times; it prints what the daemon measured: how long writes were held, and how long after the request the
set's record was durable in the catalog (its COMMIT returned) and the call returned, and how many writes stalled
the event loop (those LUNs' writes then go to their I/O threads, and may be landing there when a set closes its
hold). ``BENCH_DIR`` places the data dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BS = 512
SIZE = 1 << 30
CS = 64 << 10


async def _iops(case: str, seconds: float, tmp: Path) -> float:
    from lunsync.snapshots.backend import FileBackend
    from lunsync.snapshots.cow import CowVolume, Pool

    origin = FileBackend.create(tmp / f"{case}.img", SIZE, BS, overwrite=True)
    # Fill so that preservation copies real data (a hole is preserved as a ZERO record, with no copy): except in
    # the "thin" case, which measures exactly that.
    # 128 KiB writes, as the shared bench fills its LUNs: the size of the fill's writes sets the page-cache folios
    # the benchmark's 4 KiB overwrites land in, and with 1 MiB ones the kernel alone costs ~50 us per overwrite here.
    block = os.urandom(128 << 10)
    if case != "thin":
        for off in range(0, SIZE, len(block)):
            os.pwrite(origin.fileno(), block, off)
        os.fsync(origin.fileno())  # the fill's writeback is not the benchmark's
    vol = CowVolume(origin, Pool(case, str(tmp / f"pool-{case}")), 1, CS, name=case)
    snaps = {"none": 0, "one": 1, "eight": 8, "preserved": 1, "thin": 1}[case]
    for e in range(1, snaps + 1):
        await vol.hold()
        vol.add_snapshot(e)
        vol.release()
    if case == "preserved":
        for c in range(SIZE // CS):  # every unit of every chunk (copies are per 4 KiB unit)
            await vol.write(c * CS // BS, block[:CS])
        os.fsync(origin.fileno())
    rng = random.Random(1)
    data = os.urandom(4096)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await vol.write(rng.randrange(0, SIZE // 4096) * 8, data)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(32)))
    rate = done / (time.perf_counter() - start)
    await vol.close()
    return rate


def iops(seconds: float = 5.0, rounds: int = 3) -> None:
    """Each case ``rounds`` times, the cases alternating (A B C A B C ...), and the median of each: on a shared machine
    one slow moment then costs one sample, not one case."""
    cases = ("none", "one", "eight", "preserved", "thin")
    runs: dict[str, list[float]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        for n in range(rounds):
            # Each round starts one case later, so no case always follows the same one: deleting the previous
            # case's gigabytes (with the discards that go with it) weighs on whatever runs next.
            for case in cases[n % len(cases):] + cases[:n % len(cases)]:
                run_dir = Path(d) / f"{case}-{n}"  # a fresh LUN and pool each time
                run_dir.mkdir()
                runs[case].append(asyncio.run(_iops(case, seconds, run_dir)))
                shutil.rmtree(run_dir)
                os.sync()
    rates = {case: statistics.median(r) for case, r in runs.items()}
    for case, r in rates.items():
        print(f"{case:10s} {r:10.0f} IOPS  (runs: {', '.join(f'{x:.0f}' for x in runs[case])})")
    print(f"1 snapshot / none      = {rates['one'] / rates['none']:.2f}  (target >= 0.5)")
    print(f"8 snapshots / 1        = {rates['eight'] / rates['one']:.2f}  (target >= 0.9)")
    print(f"preserved / none       = {rates['preserved'] / rates['none']:.2f}  (target >= 0.95)")
    print(f"1 snapshot, thin LUN (first writes to holes) / none = {rates['thin'] / rates['none']:.2f}")


STRIDE = 68 << 10  # 4 KiB writes 68 KiB apart: each in a 64 KiB chunk of its own, for a whole pass of the LUN
ISCSI_CASES = ("none", "one", "eight", "preserved", "none-again", "seq-none", "seq-one")


def _qemu_bench(url: str, count: int, size: int, step: int, depth: int = 32, offset: int = 0) -> float:
    """Writes per second of one ``qemu-img bench`` run (its own timing of the run)."""
    p = subprocess.run(["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-d", str(depth), "-c", str(count),
                        "-s", str(size), "-S", str(step), "-o", str(offset), url], capture_output=True, text=True,
                       timeout=900, check=False)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    if p.returncode or not m:
        raise RuntimeError(f"qemu-img bench failed: {p.stdout[-500:]} {p.stderr[-500:]}")
    return count / float(m[1])


COUNTERS = ("lunsync_cow_staged_writes_total", "lunsync_cow_stage_waits_total", "lunsync_cow_copy_batch_seconds_count",
            "lunsync_cow_copy_batch_seconds_sum")


def _count(daemon: Any, lun: str, into: dict[str, float]) -> None:
    """Add LUN ``lun``'s staging counters (from the daemon's /metrics) to ``into``."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=30).text
    for name in COUNTERS:
        m = re.search(rf'^{name}{{lun="{lun}"}} ([0-9.e+]+)$', text, re.MULTILINE)
        into[name] = into.get(name, 0.0) + (float(m[1]) if m else 0.0)
    if os.environ.get("BENCH_VERBOSE"):
        print(f"  {lun}: " + ", ".join(f"{k} {v:g}" for k, v in into.items()), flush=True)


def _cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process ``pid`` has used so far, its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _iscsi_case(c: Any, daemon: Any, case: str, n: int, size_mib: int, counters: dict[str, float]
                ) -> dict[str, float]:
    """One case on a fresh LUN ``b<n>`` (the API client ``c`` of the harness's ``daemon``), deleted after."""
    from e2e.harness import DEMO_IQN

    name = f"b{n}"
    c.post("/luns", json={"name": name, "size": f"{size_mib}MiB"}).raise_for_status()
    c.post(f"/targets/{DEMO_IQN}/luns", json={"name": name, "lun": 1}).raise_for_status()
    url = daemon.url(1)
    size = size_mib << 20
    try:
        _qemu_bench(url, size // (128 << 10), 128 << 10, 128 << 10, depth=16)  # fill: first writes copy data
        subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", url], capture_output=True, timeout=300, check=True)
        snaps = {"one": 1, "eight": 8, "preserved": 1, "seq-one": 1}.get(case, 0)
        for i in range(snaps):
            c.post("/snapshots", json={"snapshots": [f"{name}@s{i}"]}).raise_for_status()
        passes = size // STRIDE
        if case == "preserved":
            _qemu_bench(url, passes, 4096, STRIDE)
            subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", url], capture_output=True, timeout=300,
                           check=True)
        if case.startswith("seq"):
            return {"sustained": _qemu_bench(url, min(size, 256 << 20) // (128 << 10), 128 << 10, 128 << 10)}
        # The burst: the first eighth of a pass; then the rest of it, every write still a first write.
        burst = _qemu_bench(url, passes // 8, 4096, STRIDE)
        assert daemon.proc is not None
        cpu = _cpu_seconds(daemon.proc.pid)
        rest = _qemu_bench(url, passes - passes // 8, 4096, STRIDE, offset=passes // 8 * STRIDE)
        cpu = _cpu_seconds(daemon.proc.pid) - cpu
        return {"burst": burst, "sustained": rest, "cpu_us": cpu / (passes - passes // 8) * 1e6}
    finally:
        _count(daemon, name, counters)
        for i in range(8):
            c.delete(f"/snapshots/{name}@s{i}")
        c.delete(f"/targets/{DEMO_IQN}/luns/{name}").raise_for_status()
        c.delete(f"/luns/{name}").raise_for_status()


def iscsi(size_mib: int = 1024, rounds: int = 3) -> None:
    """Every case ``rounds`` times, alternating, through the daemon; the medians and their ratios to ``none``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import httpx
    from e2e.harness import Daemon

    # CASES (comma-separated, some of ISCSI_CASES with none and none-again among them): a shorter run of those only.
    cases = tuple(os.environ["CASES"].split(",")) if os.environ.get("CASES") else ISCSI_CASES
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
    passes = (size_mib << 20) // STRIDE
    staging = int(os.environ["STAGING_MIB"]) << 20 if os.environ.get("STAGING_MIB") else passes // 8 * 4096
    counters: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", d], capture_output=True, text=True,
                                check=False).stdout.strip() or "?"
        daemon = Daemon(Path(d), api=True, demo_size="64MiB", metrics=True,
                        extra_args=["--write-staging", str(staging)])
        daemon.start()
        try:
            with httpx.Client(base_url=daemon.api_url + "/v1", timeout=300,
                              headers={"Authorization": f"Bearer {daemon.api_token}"}) as c:
                n = 0
                for r in range(rounds):
                    for case in cases:
                        n += 1
                        got = _iscsi_case(c, daemon, case, n, size_mib, counters)
                        runs[case].append(got)
                        print(f"round {r + 1} {case}: " + ", ".join(
                            f"daemon CPU {v:.1f} us per sustained write" if k == "cpu_us" else f"{k} {v:,.0f}/s"
                            for k, v in got.items()), flush=True)
        finally:
            daemon.close()
    med = {case: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for case, rs in runs.items()}
    none, noise = med["none"], med["none-again"]
    print(f"through iSCSI (qemu-img bench, QD32, 4 KiB at a {STRIDE >> 10} KiB stride; {size_mib} MiB filled LUN, "
          f"median of {rounds}; data dir and pool on {fstype}); staging bound {staging / (1 << 20):.2f} MiB per LUN: burst = the first "
          f"{passes // 8 * 4096 / (1 << 20):.2f} MiB of first writes, sustained = the next "
          f"{(passes - passes // 8) * 4096 / staging:.1f}x the bound")
    print(f"  daemon: {counters['lunsync_cow_staged_writes_total']:,.0f} writes staged, "
          f"{counters['lunsync_cow_stage_waits_total']:,.0f} waited for room")
    for kind in ("burst", "sustained"):
        aa = noise[kind] / none[kind]
        print(f"  {kind}: none {none[kind]:,.0f}/s; A/A noise (none again / none) {aa:.2f}")
        if "one" in med:
            print(f"    1 snapshot / none        = {med['one'][kind] / none[kind]:.2f}")
        if "eight" in med and "one" in med:
            print(f"    8 snapshots / 1          = {med['eight'][kind] / med['one'][kind]:.2f}")
        if "preserved" in med:
            print(f"    all preserved / none     = {med['preserved'][kind] / none[kind]:.2f}")
    print("  daemon CPU per sustained write: " + ", ".join(
        f"{case} {m['cpu_us']:.1f} us" for case, m in med.items() if "cpu_us" in m))
    if "seq-one" in med and "seq-none" in med:
        print(f"  128 KiB sequential, 1 snapshot / none = "
              f"{med['seq-one']['sustained'] / med['seq-none']['sustained']:.2f} "
              f"({med['seq-one']['sustained'] * 128 / 1024:,.0f} vs {med['seq-none']['sustained'] * 128 / 1024:,.0f} "
              f"MiB/s)")
    print(json.dumps({"size_mib": size_mib, "rounds": rounds, "fs": fstype, "staging_bytes": staging,
                      "medians": med, "counters": counters}))


def set_hold(rounds: int = 5) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import httpx
    from e2e.harness import DEMO_IQN, Daemon, free_port

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        api = free_port()
        daemon = Daemon(Path(d), extra_args=["--api", f"127.0.0.1:{api}", "--metrics", "off"])
        daemon.start()
        try:
            token = (daemon.data_dir / "api-token").read_text().strip()
            c = httpx.Client(base_url=f"http://127.0.0.1:{api}/v1", headers={"Authorization": f"Bearer {token}"},
                             timeout=60)
            for i in range(8):
                c.post("/luns", json={"name": f"big{i}", "size": "10GiB"}).raise_for_status()
                c.post(f"/targets/{DEMO_IQN}/luns", json={"name": f"big{i}", "lun": i + 1}).raise_for_status()
            writers = []
            for i in range(8):
                cmds = []
                for _ in range(2000):
                    cmds += ["-c", f"aio_write -P 0x5a {random.randrange(0, (10 << 30) // 4096) * 4096} 4k"]
                writers.append(subprocess.Popen(["qemu-io", "-f", "raw", *cmds, "-c", "aio_flush",
                                                 daemon.url(i + 1)], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL))
            time.sleep(1.0)
            holds = []
            for r in range(rounds):
                body = {"snapshots": [f"big{i}@r{r}" for i in range(8)], "set": f"set{r}"}
                t0 = time.perf_counter()
                resp = c.post("/snapshots", json=body)
                resp.raise_for_status()
                holds.append((resp.json()["hold_ms"], (time.perf_counter() - t0) * 1000,
                              sum(w.poll() is None for w in writers)))
                time.sleep(0.2)
            for w in writers:
                w.wait(120)
            log_lines = daemon.log_text().splitlines()
            lines = [line for line in log_lines if "writes held" in line]
            print("\n".join(lines))
            # After such a stall a LUN's writes go to its I/O threads for a while, and are still landing there when
            # a hold closes: the case the hold must not wait for.
            stalls = sum("held the event loop" in line for line in log_lines)
            print(f"{stalls} write(s) stalled the daemon's event loop during the run")
            durable = [float(m[1]) for line in lines if (m := re.search(r"durable in the catalog ([0-9.]+) ms", line))]
            returned = [float(m[1]) for line in lines if (m := re.search(r"returned after ([0-9.]+) ms", line))]
            for (hold, total, running), dur, ret in zip(holds, durable, returned, strict=True):
                print(f"set of 8 x 10 GiB: writes held {hold:.2f} ms, durable {dur:.1f} ms and returned {ret:.1f} ms "
                      f"after the request, in the daemon; {total:.1f} ms round trip; {running} writers running")
            print(json.dumps({"hold_ms": [h for h, _, _ in holds], "durable_ms": durable, "returned_ms": returned}))
        finally:
            daemon.close()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "iops"
    if what == "iops":
        iops(float(sys.argv[2]) if len(sys.argv) > 2 else 5.0, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    elif what == "iscsi":
        iscsi(int(sys.argv[2]) if len(sys.argv) > 2 else 1024, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    elif what == "set":
        set_hold()
    else:
        sys.exit(f"usage: {sys.argv[0]} iops [SECONDS [ROUNDS]] | iscsi [SIZE_MIB [ROUNDS]] | set")
