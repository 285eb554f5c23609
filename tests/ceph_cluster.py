"""A throw-away one-node Ceph cluster for the tests: one monitor, one manager and one OSD, from Debian's packages.

Everything lives under one temporary directory: its own ``ceph.conf``, keyrings (cephx on, as on a real cluster),
monitor store, OSD data, sockets and logs. Every daemon binds 127.0.0.1 only. The OSD uses ``memstore`` (objects in
the OSD's memory): no device, no mkfs of a file-backed store, the leanest store for a 2-core machine, and a test
cluster's data is meant to vanish with it. Pools are size 1 without autoscaling, so the cluster is HEALTH_OK-enough
to serve RBD with one OSD. :meth:`CephCluster.start` brings it up and makes an ``rbd`` pool; :meth:`stop` kills the
daemons and removes the directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

POOL = "rbd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CephCluster:
    """A running cluster: point librados at ``conf`` with ``keyring`` as ``client.admin``."""

    root: Path
    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))
    mon_port: int = field(default_factory=_free_port)
    mon_port_v1: int = field(default_factory=_free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    start_seconds: float = 0.0

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def keyring(self) -> Path:
        return self.root / "keyring"

    @property
    def mon_addr(self) -> str:
        return f"[v2:127.0.0.1:{self.mon_port},v1:127.0.0.1:{self.mon_port_v1}]"

    def _run(self, *argv: str, timeout: float = 60) -> str:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return p.stdout

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", "20", *args, timeout=timeout)

    def _daemon(self, *argv: str) -> None:
        log = open(self.root / f"{argv[0]}.{argv[2]}.out", "wb")  # noqa: SIM115 - the daemon keeps it
        self.procs.append(subprocess.Popen([*argv, "-f", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = {self.mon_addr}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
keyring = {self.keyring}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {r}/run
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
pid file = {r}/run/$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
# An RBD snapshot waits for the monitors to commit its id; by default they batch commits a second apart, which
# would hold a snapshot set's writes for most of a second. A one-node test cluster can commit at once.
paxos propose interval = 0.01
paxos min wait = 0.001
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {2 << 30}
osd op num shards = 1
osd op num threads per shard = 1
osd memory target = {512 << 20}
mgr initial modules =
ms async op threads = 1

[mon.a]
mon data = {r}/mon.a

[mgr.x]
mgr data = {r}/mgr.x
keyring = {r}/mgr.x/keyring

[osd.0]
osd data = {r}/osd.0
keyring = {r}/osd.0/keyring
""")

    def start(self) -> None:
        t0 = time.monotonic()
        r = self.root
        for d in ("run", "log", "mon.a", "mgr.x", "osd.0"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        kr = str(self.keyring)
        self._run("ceph-authtool", "--create-keyring", kr, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", kr, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd",
                  "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *")
        monmap = str(r / "monmap")
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", self.mon_addr, monmap)
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", kr)
        self._daemon("ceph-mon", "-i", "a")
        self.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *",
                  "-o", str(r / "mgr.x" / "keyring"))
        self._daemon("ceph-mgr", "-i", "x")
        osd_uuid = str(uuid.uuid4())
        self.ceph("osd", "new", osd_uuid, "0")
        self.ceph("auth", "get-or-create", "osd.0", "osd", "allow *", "mon", "allow profile osd", "mgr",
                  "allow profile osd", "-o", str(r / "osd.0" / "keyring"))
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=60)
        self._daemon("ceph-osd", "-i", "0")
        self.ceph("osd", "pool", "create", POOL, "8", "8")
        self._wait_osd_up()
        self._run("rbd", "-c", str(self.conf), "pool", "init", POOL, timeout=120)
        self.start_seconds = time.monotonic() - t0

    def _wait_osd_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"num_up_osds":1' in self.ceph("osd", "stat", "-f", "json").replace(" ", ""):
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see {self.root}/log")
            time.sleep(0.5)
        raise RuntimeError(f"the OSD did not come up in {timeout} s; see {self.root}/log")

    def stop(self, keep: bool = False) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(10)
        self.procs.clear()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _root_parent() -> str | None:
    """Where the cluster's directory goes: tmpfs (/dev/shm) when there is one, else the usual temporary directory.
    The monitor syncs its store on every commit, and each RBD snapshot waits for one (its id); an fdatasync costs
    nothing on tmpfs and about 4 ms on this machine's disk, where one snapshot stalled librbd's own writes 17 ms
    (median) against 9 ms on tmpfs."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def start_cluster() -> CephCluster:
    cluster = CephCluster(Path(tempfile.mkdtemp(prefix="lunsync-ceph-", dir=_root_parent())))
    try:
        cluster.start()
    except BaseException:
        cluster.stop(keep=bool(os.environ.get("LUNSYNC_KEEP_CEPH")))  # keep: leave the logs for a look
        raise
    return cluster


if __name__ == "__main__":  # a manual check: start, report the time, stop
    c = start_cluster()
    print(f"cluster up in {c.start_seconds:.1f} s at {c.mon_addr} ({c.root})")
    print(c.ceph("-s"))
    c.stop()
