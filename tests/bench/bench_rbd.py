"""128 KiB sequential write and read on Ceph RBD: ``rbd bench`` straight on librbd, then the same through lunsync.

Starts the one-node test cluster (:mod:`ceph_cluster`), then, in turn for each round, ``rbd bench --io-type write``
and ``--io-type read`` (``--io-size 128K --io-pattern seq``, ``--io-threads`` deep) on one image, and ``qemu-img
bench`` with the same size, pattern and depth over ``iscsi://`` to a ``lunsync serve`` whose LUN is another image of
the same size on the same cluster (librbd's settings the same for both: the cluster's ``ceph.conf``, whose librbd
cache is Ceph's default, on and write-through until the first flush; rbd bench opens its image anew for each run and
flushes once at its end, while the daemon keeps its image open, and the SYNCHRONIZE CACHE qemu-img sends as it
closes its first write run turns the gateway's cache to write-back for the runs after). Prints each run's MiB/s and,
per direction, the ratio of the medians; the target is at least 0.7. ``make bench`` runs it with its
defaults; ``--total 64M --rounds 1`` is a smoke run.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the cluster helper

from ceph_cluster import POOL, CephCluster, start_cluster
from e2e.harness import Daemon
from e2e.test_rbd_luns import ceph_section

PY = sys.executable
IQN = "iqn.2026-11.io.lunsync:rbdbench"
_UNITS = {"": 1, "K": 1 << 10, "Ki": 1 << 10, "M": 1 << 20, "Mi": 1 << 20, "G": 1 << 30, "Gi": 1 << 30}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"a size like 256M, not {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def rbd_bench(cluster: CephCluster, image: str, io_type: str, total: int, threads: int) -> float:
    """MiB/s of one ``rbd bench`` run, from its closing summary line."""
    out = cluster._run("rbd", "-c", str(cluster.conf), "bench", "--io-type", io_type, "--io-size", "128K",
                       "--io-pattern", "seq", "--io-threads", str(threads), "--io-total", str(total),
                       f"{POOL}/{image}", timeout=900)
    m = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)\s+bytes/sec:\s*([\d.]+)\s*(\w*)", out)
    if m is None:
        raise RuntimeError(f"no summary in rbd bench's output:\n{out[-2000:]}")
    value, unit = float(m.group(4)), m.group(5).removesuffix("/s").removesuffix("B")
    return value * _UNITS.get(unit, 1) / (1 << 20)


def qemu_bench(url: str, write: bool, total: int, depth: int) -> float:
    """MiB/s of one ``qemu-img bench`` run (sequential 128 KiB requests, ``depth`` in flight, no host cache)."""
    count = total // (128 << 10)
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-s", "128K", "-d", str(depth), "-c", str(count),
           *(["-w"] if write else []), url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    m = re.search(r"Run completed in ([\d.]+) seconds", p.stdout)
    if p.returncode != 0 or m is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return total / float(m.group(1)) / (1 << 20)


def daemon_config(cluster: CephCluster, image: str, size: int) -> str:
    """The daemon's configuration: the test cluster, and one RBD LUN on ``image`` mapped on :data:`IQN`."""
    return (ceph_section(cluster.conf, cluster.keyring)
            + f'\n[[lun]]\nname = "bench"\nbackend = "rbd"\npath = "{POOL}/{image}"\nsize = {size}\n\n'
            f'[[target]]\niqn = "{IQN}"\nluns = [{{ lun = 0, name = "bench" }}]\n')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=size_bytes, default=size_bytes("512M"), help="bytes per run (default 512M)")
    ap.add_argument("--depth", type=int, default=16, help="requests in flight: rbd bench --io-threads, qemu-img -d")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    size = a.total  # each image is as large as one run, so a sequential run covers it once
    cluster = start_cluster()
    print(f"ceph cluster up in {cluster.start_seconds:.1f} s ({cluster.root})")
    try:
        with tempfile.TemporaryDirectory(prefix="lunsync-rbdbench-") as tmp:
            for image in ("raw", "lun"):
                cluster._run("rbd", "-c", str(cluster.conf), "create", "--size", f"{size >> 20}M", f"{POOL}/{image}")
            with Daemon(Path(tmp), config=daemon_config(cluster, "lun", size), demo=False) as d:
                url = d.url(0, iqn=IQN)
                results: dict[tuple[str, str], list[float]] = {}
                for r in range(a.rounds):
                    for io in ("write", "read"):  # A B per direction; writes first, so the reads find data
                        raw = rbd_bench(cluster, "raw", io, a.total, a.depth)
                        via = qemu_bench(url, io == "write", a.total, a.depth)
                        results.setdefault(("rbd bench", io), []).append(raw)
                        results.setdefault(("lunsync", io), []).append(via)
                        print(f"round {r + 1} {io:5}: rbd bench {raw:8.1f} MiB/s   lunsync {via:8.1f} MiB/s")
    finally:
        cluster.stop()
    print(f"\n128 KiB sequential, {a.depth} in flight, {a.total >> 20} MiB per run, median of {a.rounds} "
          f"(rbd bench --io-size 128K --io-pattern seq --io-threads {a.depth}; qemu-img bench -t none -s 128K "
          f"-d {a.depth} over iscsi://)")
    print(f"{'':6} {'rbd bench':>12} {'lunsync':>12} {'ratio':>7}")
    worst = float("inf")
    for io in ("write", "read"):
        raw = statistics.median(results[("rbd bench", io)])
        via = statistics.median(results[("lunsync", io)])
        worst = min(worst, via / raw)
        print(f"{io:6} {raw:8.1f} MiB/s {via:8.1f} MiB/s {via / raw:6.2f}x")
    print(f"target >= 0.70x: {'met' if worst >= 0.7 else 'NOT met'} (worst {worst:.2f}x)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
