"""Crash trials: kill -9 the daemon during heavy writes with snapshots active, restart it, and check what survived.

This script owns the trial driver behind ``make crash-trials N=50`` (``tests/crash/test_crash.py`` runs a few of the
same trials in CI). Each trial starts a fresh ``lunsync serve`` with two 8 MiB LUNs, half filled, and runs:

- four writers, each its own iSCSI session and owning its own blocks, writing stamped 4 KiB blocks (see
  :mod:`crash.stamps`) at random, one in five with FUA, with a SYNCHRONIZE CACHE every 16 writes; the client logs
  every write as issued, acknowledged and durable (FUA acknowledged, or acknowledged before an acknowledged
  SYNCHRONIZE CACHE);
- a snapshotter that, every few hundred milliseconds, pauses the writers, reads both LUNs and records their
  checksums, takes a snapshot set of both through the API, and lets the writers go again;

and SIGKILLs the daemon at a random moment (during writes, during a snapshot's reads or its creation). Before the
restart both SQLite files pass ``PRAGMA integrity_check``. After it:

- every block of each origin holds a complete stamp (or zeros if never written), never older than its last durable
  write: an older one is a *lost acknowledged write*;
- every snapshot whose creation was answered exists, is valid and reads exactly the checksums recorded before it
  was taken; one whose request was cut by the kill may be absent, but if present it must match too: a mismatch is an
  *altered snapshot*.

Two more kinds of trial kill the daemon during a clone's fill and during a resync (see :class:`LifecycleTrial`).
The ``worker`` kind is the writes trial on ``serve --workers 2`` that kills only the worker serving the two LUNs; the
control restarts it and the same checks read through the new worker. ``--kinds`` picks which kinds run, taken in
turn (by default all four: writes, clone, resync, worker).

Usage: ``python tests/crash/run.py N [--seed S] [--keep DIR] [--kinds writes,clone,resync,worker]``; exit status 1 if
any trial found a problem.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import httpx
from crash.stamps import UNIT, Stamp, StampClient, parse, stamp
from e2e.harness import DEMO_IQN, Daemon, describe, lunsync_command, run
from iscsi_scapy import ConnectionClosed, ProtocolViolation

LUN_BYTES = 8 << 20
BLOCKS = LUN_BYTES // UNIT
LUNS = (0, 1)  # LUN numbers on the demo target: demo0 (the demo LUN) and c1
NAMES = {0: "demo0", 1: "c1"}
WRITERS = 4
FILL_WRITER = WRITERS  # the stamp writer id of the initial fill
FUA_ONE_IN = 5
SYNC_EVERY = 16
SNAP_INTERVAL_S = (0.2, 0.6)
KILL_AFTER_S = (0.8, 4.0)


@dataclass(slots=True)
class Write:
    seq: int
    acked: bool = False
    durable: bool = False


@dataclass
class Log:
    """The client's record of every write, per (lun, block), in issue order (one writer per block)."""

    writes: dict[tuple[int, int], list[Write]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, lun: int, block: int, seq: int) -> Write:
        w = Write(seq)
        with self.lock:
            self.writes.setdefault((lun, block), []).append(w)
        return w


@dataclass
class Snap:
    """What a snapshot must read, recorded with the writers paused just before its request: for each LUN and block,
    the write it holds as an index into that block's history (-1: zeros). Nothing is in flight then, so the index is
    exact (a writer whose session died leaves its last write unknown: both are allowed, ``(lo, hi)``)."""

    name: str
    expect: dict[int, list[tuple[int, int]]]
    answered: bool = False


@dataclass
class Result:
    trial: int
    seed: int
    kind: str = "writes"
    ran_s: float = 0.0
    writes_issued: int = 0
    writes_acked: int = 0
    writes_durable_checked: int = 0
    snapshots_answered: int = 0
    snapshots_checked: int = 0
    lost_acked_writes: int = 0
    damaged_blocks: int = 0
    altered_snapshots: int = 0
    lost_snapshots: int = 0
    integrity_errors: int = 0
    clones_checked: int = 0
    resyncs_checked: int = 0
    killed_mid_fill: int = 0  # the clone was still filling when the kill came (else the kill was too late to test it)
    killed_mid_resync: int = 0
    altered_clones: int = 0
    wrong_resyncs: int = 0
    trial_errors: int = 0  # a CLI or qemu-io step failed before the checks
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost_acked_writes or self.damaged_blocks or self.altered_snapshots or self.lost_snapshots
                    or self.integrity_errors or self.altered_clones or self.wrong_resyncs or self.trial_errors)


class Seq(Protocol):
    seq: int


def which(history: Sequence[Seq], lun: int, b: int, block: bytes) -> int | None:
    """Which write of block ``b``'s history ``block`` holds (-1: zeros); None if none of them (damaged, or another
    block's stamp)."""
    got = parse(block)
    if got is None:
        return -1
    if not isinstance(got, Stamp) or (got.lun, got.block) != (lun, b):
        return None
    return next((i for i in range(len(history) - 1, -1, -1) if history[i].seq == got.seq), None)


def check_integrity(data_dir: Path, res: Result) -> None:
    """SQLite's integrity_check on the catalog and every pool database of a stopped daemon's data dir."""
    for db in [data_dir / "catalog.db", *sorted(data_dir.glob("pool/*.db"))]:
        con = sqlite3.connect(db)
        try:
            got = con.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            con.close()
        if got != "ok":
            res.integrity_errors += 1
            res.problems.append(f"{db.name}: integrity_check says {got}")


class Trial:
    def __init__(self, workdir: Path, trial: int, seed: int, *, kill_worker: bool = False) -> None:
        self.rng = random.Random(seed)
        self.res = Result(trial, seed)
        # kill_worker: the daemon runs with --workers 2 and only the worker serving the demo target is killed; the
        # control restarts it and the checks read through the new worker.
        self.kill_worker = kill_worker
        self.d = Daemon(workdir, api=True, demo=True, demo_size="8MiB", workers=2 if kill_worker else None)
        self.log = Log()
        self.snaps: list[Snap] = []
        self.go = threading.Event()
        self.go.set()
        self.stop = threading.Event()
        self.busy = 0
        self.busy_cond = threading.Condition()
        self.api: httpx.Client | None = None

    # -- running ------------------------------------------------------------------------------------------------

    def client(self, tag: str, n: int) -> StampClient:
        return StampClient("127.0.0.1", self.d.port, DEMO_IQN, f"iqn.2026-11.io.lunsync:crash-{tag}",
                           0x400000D00000 + n)

    def setup(self) -> None:
        self.d.start()
        self.api = httpx.Client(base_url=self.d.api_url + "/v1", timeout=30,
                                headers={"Authorization": f"Bearer {self.d.api_token}"})
        self.api.post("/luns", json={"name": "c1", "size": "8MiB"}).raise_for_status()
        self.api.post(f"/targets/{DEMO_IQN}/luns", json={"name": "c1", "lun": 1}).raise_for_status()
        # Fill the first half of each LUN, so first writes there copy data; the rest are holes (ZERO records).
        c = self.client("fill", 0xFF)
        try:
            for lun in LUNS:
                for base in range(0, BLOCKS // 2, 16):
                    data = b"".join(stamp(Stamp(0, lun, b, FILL_WRITER)) for b in range(base, base + 16))
                    for b in range(base, base + 16):
                        self.log.issue(lun, b, 0)
                    c.write(lun, base, data)
                c.sync_cache(lun)
                for b in range(BLOCKS // 2):
                    w = self.log.writes[(lun, b)][-1]
                    w.acked = w.durable = True
        finally:
            c.close()

    def _enter(self) -> bool:
        """Wait while the snapshotter has the writers paused; False once the trial is over."""
        while not self.go.wait(0.1):
            if self.stop.is_set():
                return False
        with self.busy_cond:
            self.busy += 1
        return not self.stop.is_set()

    def _leave(self) -> None:
        with self.busy_cond:
            self.busy -= 1
            self.busy_cond.notify_all()

    def writer(self, wid: int) -> None:
        rng = random.Random(self.res.seed * 100 + wid)
        try:
            c = self.client(f"w{wid}", wid)
        except (OSError, AssertionError):
            return
        acked_since_sync: dict[int, list[Write]] = {lun: [] for lun in LUNS}
        k = 0
        try:
            while not self.stop.is_set():
                if not self._enter():
                    break
                try:
                    k += 1
                    if k % SYNC_EVERY == 0:
                        for lun in LUNS:
                            pending = acked_since_sync[lun]
                            acked_since_sync[lun] = []
                            c.sync_cache(lun)
                            for w in pending:
                                w.durable = True
                        continue
                    lun = rng.choice(LUNS)
                    block = rng.randrange(0, BLOCKS // WRITERS) * WRITERS + wid
                    seq = k
                    fua = rng.randrange(FUA_ONE_IN) == 0
                    w = self.log.issue(lun, block, seq)
                    c.write(lun, block, stamp(Stamp(seq, lun, block, wid)), fua=fua)
                    w.acked = True
                    w.durable = fua
                    acked_since_sync[lun].append(w)
                finally:
                    self._leave()
        except (OSError, AssertionError, ConnectionError, ConnectionClosed, ProtocolViolation):
            pass  # the daemon was killed
        except Exception as e:  # noqa: BLE001 - anything else is the trial's problem, reported with the results
            self.res.problems.append(f"writer {wid}: {e!r}")
        finally:
            c.close()

    def snapshotter(self) -> None:
        assert self.api is not None
        n = 0
        try:
            while not self.stop.wait(self.rng.uniform(*SNAP_INTERVAL_S)):
                self.go.clear()
                with self.busy_cond:
                    self.busy_cond.wait_for(lambda: self.busy == 0 or self.stop.is_set())
                try:
                    if self.stop.is_set():
                        return
                    snap = Snap(f"t{n}", {lun: [self._expect(lun, b) for b in range(BLOCKS)] for lun in LUNS})
                    self.snaps.append(snap)
                    r = self.api.post("/snapshots", json={"snapshots": [f"{NAMES[lun]}@{snap.name}" for lun in LUNS],
                                                          "set": snap.name})
                    r.raise_for_status()
                    snap.answered = True
                    n += 1
                finally:
                    self.go.set()
        except (OSError, AssertionError, ConnectionError, httpx.HTTPError):
            pass

    def _expect(self, lun: int, block: int) -> tuple[int, int]:
        history = self.log.writes.get((lun, block), [])
        lo = max((i for i, w in enumerate(history) if w.acked), default=-1)
        return lo, len(history) - 1

    def run(self) -> None:
        threads = [threading.Thread(target=self.writer, args=(w,), daemon=True) for w in range(WRITERS)]
        threads.append(threading.Thread(target=self.snapshotter, daemon=True))
        start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(self.rng.uniform(*KILL_AFTER_S))
        if self.kill_worker:
            os.kill(self._worker()["pid"], signal.SIGKILL)
        else:
            self.d.kill9()
        self.res.ran_s = round(time.monotonic() - start, 2)
        self.stop.set()
        self.go.set()
        for t in threads:
            t.join(30)

    # -- checking -----------------------------------------------------------------------------------------------

    def integrity(self) -> None:
        check_integrity(self.d.data_dir, self.res)

    def check_origins(self, c: StampClient) -> None:
        for lun in LUNS:
            data = c.read(lun, 0, BLOCKS)
            for b in range(BLOCKS):
                block = data[b * UNIT:(b + 1) * UNIT]
                history = self.log.writes.get((lun, b), [])
                durable = max((i for i, w in enumerate(history) if w.durable), default=-1)
                if durable >= 0:
                    self.res.writes_durable_checked += 1
                idx = self._which(lun, b, block)
                if idx is None:
                    self.res.damaged_blocks += 1
                    self.res.problems.append(f"lun {lun} block {b}: neither zeros nor a whole stamp written there")
                elif idx < durable:
                    self.res.lost_acked_writes += 1
                    self.res.problems.append(f"lun {lun} block {b}: holds write #{idx}, but #{durable} was durable")

    def _which(self, lun: int, b: int, block: bytes) -> int | None:
        return which(self.log.writes.get((lun, b), []), lun, b, block)

    def check_snapshots(self, c: StampClient) -> None:
        assert self.api is not None
        for snap in self.snaps:
            for lun in LUNS:
                name = f"{NAMES[lun]}@{snap.name}"
                r = self.api.get(f"/snapshots/{name}")
                if r.status_code == 404:
                    if snap.answered:
                        self.res.lost_snapshots += 1
                        self.res.problems.append(f"{name}: created (answered) but gone after the restart")
                    continue
                r.raise_for_status()
                if r.json()["state"] != "valid":
                    self.res.altered_snapshots += 1
                    self.res.problems.append(f"{name}: {r.json()['state']} after the restart")
                    continue
                self.api.post(f"/snapshots/{name}/expose", json={"target": DEMO_IQN, "lun": 9}).raise_for_status()
                try:
                    data = c.read(9, 0, BLOCKS)
                finally:
                    self.api.delete(f"/snapshots/{name}/expose").raise_for_status()
                self.res.snapshots_checked += 1
                bad = []
                for b, (lo, hi) in enumerate(snap.expect[lun]):
                    idx = self._which(lun, b, data[b * UNIT:(b + 1) * UNIT])
                    if idx is None or not lo <= idx <= hi:
                        bad.append(b)
                if bad:
                    self.res.altered_snapshots += 1
                    self.res.problems.append(f"{name}: {len(bad)} block(s) differ from when it was taken, e.g. "
                                             f"{bad[:5]}")

    def _worker(self) -> dict[str, Any]:
        """The worker that serves the demo target (and so both LUNs)."""
        assert self.api is not None
        r = self.api.get("/status")
        r.raise_for_status()
        return next(w for w in r.json()["workers"] if DEMO_IQN in w["targets"])

    def verify(self) -> None:
        self.integrity()
        if self.kill_worker:
            deadline = time.monotonic() + 30
            while not (self._worker()["up"] and self._worker()["restarts"] == 1):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the killed worker was not restarted\n{self.d.log_tail()}")
                time.sleep(0.1)
        else:
            self.d.start()
        c = self.client("verify", 0xFD)
        try:
            self.check_origins(c)
            self.check_snapshots(c)
        finally:
            c.close()
        self.d.assert_healthy()
        writes = [w for h in self.log.writes.values() for w in h if w.seq]
        self.res.writes_issued = len(writes)
        self.res.writes_acked = sum(w.acked for w in writes)
        self.res.snapshots_answered = sum(s.answered for s in self.snaps)

    def close(self) -> None:
        if self.api is not None:
            self.api.close()
        self.d.close()


# -- clone and resync trials ------------------------------------------------------------------------------------------
#
# Two more kinds of trial, driven the way an administrator would, through the ``lunsync`` CLI with qemu-io (libiscsi)
# as the initiator. Each fills one LUN with a known pattern, one byte value per MiB region, so a ``read -P`` per
# region tells which content it holds:
#
# - ``clone``: pattern A, ``snapshot create LUN@c --kind clone``, then a writer keeps overwriting the origin with
#   other bytes while the clone fills, and the daemon is killed at a random moment of the fill. After the restart the
#   fill must resume and complete, and the exposed clone must read A in every region: anything else is an *altered
#   clone*.
# - ``resync``: pattern A, snapshot, pattern B, ``resync LUN@SNAP --rate R``, killed at a random moment of the copy.
#   After the restart ``recovery wait`` must end ``done``, the LUN must read A everywhere and the exposed snapshot
#   too: anything else is a *wrong resync*.

MIB = 1 << 20
KINDS = ("writes", "clone", "resync", "worker")
CLONE_LUN_MIB = 64
RESYNC_LUN_MIB = 32
RESYNC_RATE_MIB_S = 16  # 32 MiB changed: about 2 s of copying
RESYNC_KILL_AFTER_S = (0.1, 1.8)
CLONE_KILL_AFTER_S = (0.0, 0.3)  # after the clone is taken; its fill takes about 0.2 s and more with writes
EXPOSE_LUN = 5


def pattern(base: int, region: int) -> int:
    """The byte of MiB region ``region`` in the pattern starting at ``base`` (never 0, so never a hole's zeros)."""
    return (base + region) % 255 + 1


class LifecycleTrial:
    """One clone or resync trial on a fresh daemon with a single demo LUN (LUN 0, ``demo0``)."""

    def __init__(self, workdir: Path, trial: int, seed: int, kind: str) -> None:
        self.rng = random.Random(seed)
        self.kind = kind
        self.res = Result(trial, seed, kind=kind)
        self.mib = CLONE_LUN_MIB if kind == "clone" else RESYNC_LUN_MIB
        self.d = Daemon(workdir, api=True, demo=True, demo_size=f"{self.mib}MiB")

    # -- clients ------------------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120) -> Any:
        p = run([*lunsync_command(), *args, "--json"], timeout=timeout,
                env={"LUNSYNC_API": self.d.api_url, "LUNSYNC_DATA_DIR": str(self.d.data_dir)})
        if p.returncode != 0:
            raise TrialError(describe(p))
        return json.loads(p.stdout)

    def qemu(self, commands: list[str], lun: int = 0, *, read_only: bool = False) -> str:
        cmd = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
        for c in commands:
            cmd += ["-c", c]
        p = run([*cmd, self.d.url(lun)], timeout=120)
        if p.returncode != 0 and not read_only:
            raise TrialError(describe(p))
        return p.stdout + p.stderr if p.returncode == 0 else f"exit {p.returncode}: {p.stdout}{p.stderr}"

    def fill(self, base: int, lun: int = 0) -> None:
        self.qemu([f"write -P {pattern(base, r):#x} {r * MIB} {MIB}" for r in range(self.mib)], lun)

    def wrong_regions(self, base: int, lun: int) -> list[int]:
        """The MiB regions of ``lun`` that do not read pattern ``base`` (all of them if the read itself failed)."""
        out = self.qemu([f"read -P {pattern(base, r):#x} {r * MIB} {MIB}" for r in range(self.mib)], lun,
                        read_only=True)
        bad = set()
        for line in out.splitlines():  # qemu-io exits 1 when a pattern differs, but still reads every region
            if "verification failed at offset" in line:
                bad.add(int(line.split("offset")[1].split(",")[0].strip().split()[0]) // MIB)
        if out.count("read ") < self.mib or (out.startswith("exit ") and not bad):
            self.res.problems.append(f"lun {lun}: qemu-io read failed: {out[-300:]}")
            return list(range(self.mib))
        return sorted(bad)

    # -- clone --------------------------------------------------------------------------------------------------

    def clone(self) -> None:
        a = self.rng.randrange(200)
        self.fill(a)  # what the clone must hold, region by region
        # A 64 MiB fill takes a fraction of a second, less than the CLI takes to exit: the kill is timed from the
        # daemon's log line that the clone was taken, not from the CLI's answer.
        mark = self.d.log_mark()
        create = subprocess.Popen([*lunsync_command(), "snapshot", "create", "demo0@c", "--kind", "clone", "--json"],
                                  env={**os.environ, "LUNSYNC_API": self.d.api_url,
                                       "LUNSYNC_DATA_DIR": str(self.d.data_dir)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while "snapshot demo0@c taken" not in self.d.log_since(mark):
                if time.monotonic() > deadline or create.poll() not in (None, 0):
                    raise TrialError(f"the clone was not taken: {create.communicate(timeout=30)}")
                time.sleep(0.005)
            stop = threading.Event()
            wrng = random.Random(self.res.seed + 1)
            writing: list[subprocess.Popen[bytes]] = []

            def overwrite() -> None:  # keep the origin changing under the fill: every such write preserves first
                while not stop.is_set():
                    r = wrng.randrange(self.mib)
                    # Popen, not run(): libiscsi retries a dead portal for ever, so this one is killed after the daemon
                    w = subprocess.Popen(["qemu-io", "-f", "raw", "-c",
                                          f"write -P {pattern(a + 100, r):#x} {r * MIB} {MIB}", self.d.url(0)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    writing.append(w)
                    w.wait()

            t = threading.Thread(target=overwrite, daemon=True)
            start = time.monotonic()
            t.start()
            time.sleep(self.rng.uniform(*CLONE_KILL_AFTER_S))
            self.d.kill9()
            self.res.ran_s = round(time.monotonic() - start, 2)
            self.res.killed_mid_fill = int("clone demo0@c filled" not in self.d.log_since(mark))
            stop.set()
            for _ in range(60):  # until the writer thread has seen the stop (it may start one more qemu-io first)
                for w in writing:
                    if w.poll() is None:
                        w.kill()
                        w.wait(10)
                t.join(0.5)
                if not t.is_alive():
                    break
        finally:
            try:
                create.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                create.kill()
                create.communicate(timeout=10)
        self._restart()
        deadline = time.monotonic() + 60
        while True:
            shown = self.cli("snapshot", "show", "demo0@c")
            if shown["state"] != "valid":
                self.res.altered_clones += 1
                self.res.problems.append(f"clone demo0@c is {shown['state']} after the restart: "
                                         f"{shown.get('invalid_reason')}")
                return
            if shown["fill"]["complete"]:
                break
            if time.monotonic() > deadline:
                self.res.altered_clones += 1
                self.res.problems.append(f"clone demo0@c still filling 60 s after the restart: {shown['fill']}")
                return
            time.sleep(0.2)
        self.cli("snapshot", "expose", "demo0@c", "--target", DEMO_IQN, "--lun", str(EXPOSE_LUN))
        bad = self.wrong_regions(a, EXPOSE_LUN)
        self.res.clones_checked += 1
        if bad:
            self.res.altered_clones += 1
            self.res.problems.append(f"clone demo0@c: {len(bad)} MiB region(s) differ from its snapshot, e.g. "
                                     f"{bad[:5]}")

    # -- resync -------------------------------------------------------------------------------------------------

    def resync(self) -> None:
        a = self.rng.randrange(200)
        self.fill(a)
        self.cli("snapshot", "create", "demo0@s")
        self.fill(a + 50)  # B: every region changed
        rid = self.cli("resync", "demo0@s", "--rate", str(RESYNC_RATE_MIB_S))["id"]
        start = time.monotonic()
        time.sleep(self.rng.uniform(*RESYNC_KILL_AFTER_S))
        try:
            with self.api as c:
                self.res.killed_mid_resync = int(c.get(f"/recovery/{rid}").json()["state"] == "resyncing")
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        self.d.kill9()
        self.res.ran_s = round(time.monotonic() - start, 2)
        self._restart()
        final = self.cli("recovery", "wait", rid, timeout=120)
        self.res.resyncs_checked += 1
        if final["state"] != "done":
            self.res.wrong_resyncs += 1
            self.res.problems.append(f"resync {rid} ended {final['state']} after the restart")
        bad = self.wrong_regions(a, 0)
        if bad:
            self.res.wrong_resyncs += 1
            self.res.problems.append(f"demo0 after the resync: {len(bad)} MiB region(s) do not read the snapshot, "
                                     f"e.g. {bad[:5]}")
        self.cli("snapshot", "expose", "demo0@s", "--target", DEMO_IQN, "--lun", str(EXPOSE_LUN))
        bad = self.wrong_regions(a, EXPOSE_LUN)
        if bad:
            self.res.wrong_resyncs += 1
            self.res.problems.append(f"demo0@s after the resync: {len(bad)} MiB region(s) altered, e.g. {bad[:5]}")

    # -- common -------------------------------------------------------------------------------------------------

    @property
    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.d.api_url + "/v1", timeout=10,
                            headers={"Authorization": f"Bearer {self.d.api_token}"})

    def _show(self, name: str) -> Any:
        with self.api as c:
            r = c.get(f"/snapshots/{name}")
            r.raise_for_status()
            return r.json()

    def _restart(self) -> None:
        check_integrity(self.d.data_dir, self.res)
        self.d.start()

    def go(self) -> None:
        self.d.start()
        try:
            self.clone() if self.kind == "clone" else self.resync()
        except TrialError as e:
            self.res.problems.append(str(e)[-1500:])
            self.res.trial_errors += 1
        if self.d.running:
            self.d.assert_healthy()

    def close(self) -> None:
        self.d.close()


class TrialError(AssertionError):
    """A CLI or qemu-io step failed: the trial could not run to its checks."""


def trial(workdir: Path, n: int, seed: int, kind: str = "writes") -> Result:
    if kind in ("clone", "resync"):
        lt = LifecycleTrial(workdir, n, seed, kind)
        try:
            lt.go()
        finally:
            lt.close()
        return lt.res
    t = Trial(workdir, n, seed, kill_worker=kind == "worker")
    try:
        t.setup()
        t.run()
        t.verify()
    finally:
        t.close()
    return t.res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, nargs="?", default=50, help="number of trials")
    ap.add_argument("--seed", type=int, default=None, help="seed of the first trial (random by default)")
    ap.add_argument("--keep", type=Path, default=None, help="keep each trial's data dir and log under DIR")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"comma-separated trial kinds, taken in turn (default {','.join(KINDS)})")
    a = ap.parse_args(argv)
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds: choose from {', '.join(KINDS)}")
    seed0 = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
    results = []
    with tempfile.TemporaryDirectory(prefix="lunsync-crash-") as tmp:
        base = a.keep or Path(tmp)
        for i in range(a.n):
            kind = kinds[i % len(kinds)]
            r = trial(base / f"trial-{i}", i, seed0 + i, kind)
            results.append(r)
            if kind in ("clone", "resync"):
                what = "fill" if kind == "clone" else "resync"
                mid = r.killed_mid_fill if kind == "clone" else r.killed_mid_resync
                print(f"trial {i:3d} seed {r.seed}: {kind}, killed after {r.ran_s:.2f}s "
                      f"({'mid-' + what if mid else 'after the ' + what}), "
                      f"{r.clones_checked + r.resyncs_checked} checked: "
                      f"{'ok' if r.ok else 'FAILED: ' + '; '.join(r.problems[:5])}", flush=True)
                continue
            print(f"trial {i:3d} seed {r.seed}: killed after {r.ran_s:.2f}s, {r.writes_acked}/{r.writes_issued} "
                  f"writes acked, {r.writes_durable_checked} durable blocks checked, {r.snapshots_checked} "
                  f"snapshot LUNs checked ({r.snapshots_answered} sets answered): "
                  f"{'ok' if r.ok else 'FAILED: ' + '; '.join(r.problems[:5])}", flush=True)
    total = {k: sum(getattr(r, k) for r in results) for k in (
        "writes_acked", "writes_durable_checked", "snapshots_checked", "lost_acked_writes", "altered_snapshots",
        "lost_snapshots", "damaged_blocks", "integrity_errors", "clones_checked", "resyncs_checked",
        "killed_mid_fill", "killed_mid_resync", "altered_clones", "wrong_resyncs", "trial_errors")}
    print(json.dumps({"trials": len(results), "failed_trials": sum(not r.ok for r in results), "first_seed": seed0,
                      **total}))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
