"""Power-loss trials: record everything the daemon makes durable, replay only that at many cuts, and check each
replayed image with a restarted daemon.

This script owns the harness behind ``make powerloss [N=50]`` (``tests/powerloss/test_powerloss.py`` runs a short
form in CI). One recording, then N cuts:

- **Recording.** ``lunsync serve`` runs with its whole data directory (catalog, LUN files, the default snapshot pool)
  on the :mod:`fusefs` passthrough, which logs every write and every fsync/fdatasync/fsyncdir with its time. One
  client (an iSCSI session of :mod:`crash.stamps`, one command at a time, so the order is known) drives phases over
  two 8 MiB LUNs: stamped 4 KiB writes (one in four FUA, a SYNCHRONIZE CACHE every ten); snapshot sets of both LUNs,
  each followed by first writes that must preserve (one of them a single WRITE of 1.25 MiB, whose batch flushes its
  copies before their map records); a clone filling under writes; a resync of a snapshot onto its
  origin. Every acknowledgement is timed with the same monotonic clock as the log. The LUNs' write cache is on, so
  the first writes without FUA after a snapshot take the staged path (answered before their copy is durable, landed
  on the LUN after it): the recording counts them from the daemon's metrics, and a recording with none fails.
- **Cuts.** Each cut is an operation of the log; the image is what :func:`powerloss.replay.replay` says a power cut
  there leaves (only what was synced, or, every other cut, that plus a random subset of what was not). Cuts are
  spread over the phases, half of them just after a sync.
- **Checks.** Both SQLite files pass ``integrity_check``; a daemon starts on the image; every block of each LUN
  holds a whole stamp no older than its last write acknowledged durable before the cut (FUA, or followed by an
  acknowledged SYNCHRONIZE CACHE); every snapshot and the clone whose creation was answered before the cut exist,
  are valid and read exactly what the LUN held when they were taken (the clone after its fill resumes and ends),
  and any others present read right too; a resync answered before the cut resumes and ends with the LUN equal to
  its snapshot.
- **Negative controls.** Two images drop writes that *were* synced: the LUN's writes of the first write phase, and
  the pool's slot-file writes. The checks must report lost writes and an altered snapshot; if they do not, the
  harness is blind and the run fails.

Usage: ``python tests/powerloss/run.py N [--seed S] [--keep DIR]``; exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import httpx
from crash.run import Result, check_integrity, which
from crash.stamps import UNIT, Stamp, StampClient, stamp
from e2e.harness import DEMO_IQN, Daemon
from fusefs import FuseMount, LogOp, read_log
from powerloss.replay import replay

LUN_BYTES = 8 << 20
BLOCKS = LUN_BYTES // UNIT
LUNS = (0, 1)
RUN_BLOCKS = (1 << 20) // UNIT + 64  # a first write past the 1 MiB after which a batch takes two flush rounds
NAMES = {0: "demo0", 1: "c1"}
PHASES = ("writes", "snapshots", "clone", "resync")
EXPOSE_LUN = 9
WRITER = 1


@dataclass(slots=True)
class Write:
    seq: int
    acked_t: float = float("inf")
    durable_t: float = float("inf")


@dataclass
class Taken:
    """A snapshot (or the clone) and what each of its blocks must hold: an index into the block's history."""

    name: str
    expect: dict[int, list[int]]
    asked_t: float
    answered_t: float = float("inf")


@dataclass
class Recording:
    writes: dict[tuple[int, int], list[Write]] = field(default_factory=dict)
    snaps: list[Taken] = field(default_factory=list)
    clone: Taken | None = None
    resync_id: str = ""
    resync_of: str = ""
    resync_asked_t: float = float("inf")
    resync_answered_t: float = float("inf")
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)
    ops: list[LogOp] = field(default_factory=list)
    root_ino: int = 0
    lun_ino: int = 0  # demo0's LUN file, as the log names it
    slot_ino: int = 0  # demo0's slot file in the default pool
    staged_writes: int = 0  # first writes the daemon answered from its staging area


@dataclass
class Cut:
    """One checked cut: where, which model, which negative control (if any), and what the checks found (the crash
    trials' counters: ``trial_errors`` counts a check that could not run)."""

    at: int
    phase: str
    mode: str
    control: str
    res: Result

    @property
    def ok(self) -> bool:
        return self.res.ok


@contextmanager
def session(workdir: Path, tag: str, n: int) -> Iterator[tuple[Daemon, httpx.Client, StampClient]]:
    """A daemon on ``workdir/data`` (two 8 MiB LUNs once set up), its API and one iSCSI session; stopped after."""
    d = Daemon(workdir, api=True, demo=True, demo_size="8MiB", metrics=True)
    try:
        d.start()
        with httpx.Client(base_url=d.api_url + "/v1", timeout=60,
                          headers={"Authorization": f"Bearer {d.api_token}"}) as api:
            c = StampClient("127.0.0.1", d.port, DEMO_IQN, f"iqn.2026-11.io.lunsync:powerloss-{tag}",
                            0x400000E00000 + n)
            try:
                yield d, api, c
            finally:
                c.close()
    finally:
        d.close()


# --- recording ------------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, workdir: Path, seed: int) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.rec = Recording()
        self.seq = 0
        self.unsynced: dict[int, list[Write]] = {lun: [] for lun in LUNS}

    def write(self, c: StampClient, lun: int, block: int, fua: bool = False) -> None:
        self.seq += 1
        w = Write(self.seq)
        self.rec.writes.setdefault((lun, block), []).append(w)
        c.write(lun, block, stamp(Stamp(self.seq, lun, block, WRITER)), fua=fua)
        w.acked_t = time.monotonic()
        if fua:
            w.durable_t = w.acked_t
        else:
            self.unsynced[lun].append(w)

    def write_run(self, c: StampClient, lun: int, block: int, n: int) -> None:
        """One WRITE of ``n`` consecutive blocks, each with a stamp of its own."""
        data = b""
        for b in range(block, block + n):
            self.seq += 1
            w = Write(self.seq)
            self.rec.writes.setdefault((lun, b), []).append(w)
            data += stamp(Stamp(self.seq, lun, b, WRITER))
        c.write(lun, block, data)
        now = time.monotonic()
        for b in range(block, block + n):
            w = self.rec.writes[(lun, b)][-1]
            w.acked_t = now
            self.unsynced[lun].append(w)

    def sync(self, c: StampClient, lun: int) -> None:
        c.sync_cache(lun)
        now = time.monotonic()
        for w in self.unsynced[lun]:
            w.durable_t = min(w.durable_t, now)
        self.unsynced[lun] = []

    def some_writes(self, c: StampClient, n: int, luns: tuple[int, ...] = LUNS) -> None:
        for k in range(1, n + 1):
            lun = self.rng.choice(luns)
            self.write(c, lun, self.rng.randrange(BLOCKS), fua=self.rng.randrange(4) == 0)
            if k % 10 == 0:
                self.sync(c, lun)

    def expectation(self, luns: tuple[int, ...] = LUNS) -> dict[int, list[int]]:
        """Each block's latest write (all acknowledged and synced by the caller): what a snapshot now holds."""
        return {lun: [len(self.rec.writes.get((lun, b), [])) - 1 for b in range(BLOCKS)] for lun in luns}

    def run(self) -> Recording:
        rec = self.rec
        fs = FuseMount(self.workdir / "src", self.workdir / "data", record=self.workdir / "fs.log")
        fs.start()
        try:
            with session(self.workdir, "rec", 1) as (d, api, c):
                api.post("/luns", json={"name": "c1", "size": "8MiB"}).raise_for_status()
                api.post(f"/targets/{DEMO_IQN}/luns", json={"name": "c1", "lun": 1}).raise_for_status()
                self._phases(api, c)
                metrics = httpx.get(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=30).text
                rec.staged_writes = int(sum(float(v) for v in re.findall(
                    r'^lunsync_cow_staged_writes_total\{[^}]*\} ([0-9.e+]+)$', metrics, re.MULTILINE)))
                c.close()
                d.terminate()
        finally:
            fs.stop()
        rec.ops = read_log(self.workdir / "fs.log")
        rec.root_ino = os.stat(self.workdir / "src").st_ino
        for op in rec.ops:
            if op.kind == "create" and op.payload.endswith(b"/demo0.img"):
                rec.lun_ino = op.ino
            if op.kind == "create" and op.payload.endswith(b"/lun-1.cow"):
                rec.slot_ino = op.ino
        return rec

    def _phases(self, api: httpx.Client, c: StampClient) -> None:
        rec = self.rec
        for lun in LUNS:  # the first half of each LUN holds data, so first writes there copy it
            for b in range(BLOCKS // 2):
                self.write(c, lun, b)
            self.sync(c, lun)
        t = time.monotonic()
        self.some_writes(c, 150)
        for lun in LUNS:
            self.sync(c, lun)
        rec.phases["writes"] = (t, time.monotonic())

        t = time.monotonic()
        for n in range(3):
            snap = Taken(f"t{n}", self.expectation(), time.monotonic())
            rec.snaps.append(snap)
            api.post("/snapshots", json={"snapshots": [f"{NAMES[lun]}@{snap.name}" for lun in LUNS],
                                         "set": snap.name}).raise_for_status()
            snap.answered_t = time.monotonic()
            # A first write of more than 1 MiB of data: its batch flushes the copies before their map records
            # (records without a CRC), the other order from the 4 KiB first writes' one flush round.
            self.write_run(c, 0, self.rng.randrange(BLOCKS // 2 - RUN_BLOCKS), RUN_BLOCKS)
            self.some_writes(c, 60)
            for lun in LUNS:
                self.sync(c, lun)
        rec.phases["snapshots"] = (t, time.monotonic())

        t = time.monotonic()
        clone = rec.clone = Taken("c", self.expectation((0,)), time.monotonic())
        api.post("/snapshots", json={"snapshots": ["demo0@c"], "kind": "clone"}).raise_for_status()
        clone.answered_t = time.monotonic()
        deadline = time.monotonic() + 120
        while not api.get("/snapshots/demo0@c").json()["fill"]["complete"]:
            self.some_writes(c, 10, (0,))
            if time.monotonic() > deadline:
                raise RuntimeError("the clone did not fill within 120 s")
        self.sync(c, 0)
        rec.phases["clone"] = (t, time.monotonic())

        t = time.monotonic()
        rec.resync_of = "t0"
        rec.resync_asked_t = time.monotonic()
        r = api.post("/recovery/resync", json={"pairs": [{"snapshot": "demo0@t0", "destination": None}]})
        r.raise_for_status()
        rec.resync_answered_t = time.monotonic()
        rec.resync_id = r.json()["id"]
        self.some_writes(c, 30, (1,))  # the other LUN keeps working
        self.sync(c, 1)
        done = api.post(f"/recovery/{rec.resync_id}/wait", params={"timeout_s": 120}).json()
        if done["state"] != "done":
            raise RuntimeError(f"the recorded resync ended {done['state']}: {done}")
        rec.phases["resync"] = (t, time.monotonic())


# --- checking one cut -----------------------------------------------------------------------------------------------


class Check:
    def __init__(self, rec: Recording, workdir: Path, res: Result, cut_t: float) -> None:
        self.rec, self.workdir, self.res, self.cut_t = rec, workdir, res, cut_t

    def which(self, lun: int, b: int, block: bytes) -> int | None:
        return which(self.rec.writes.get((lun, b), []), lun, b, block)

    def durable(self, lun: int, b: int) -> int:
        history = self.rec.writes.get((lun, b), [])
        return max((i for i, w in enumerate(history) if w.durable_t < self.cut_t), default=-1)

    def run(self) -> None:
        data_dir = self.workdir / "data"
        check_integrity(data_dir, self.res)
        with session(self.workdir, "check", 2) as (d, api, c):
            self._check(api, c)
            d.assert_healthy()

    def _check(self, api: httpx.Client, c: StampClient) -> None:
        rec, res = self.rec, self.res
        resynced = False
        if rec.resync_asked_t < self.cut_t:
            r = api.get(f"/recovery/{rec.resync_id}")
            if r.status_code == 200:
                final = api.post(f"/recovery/{rec.resync_id}/wait", params={"timeout_s": 120}).json()
                # A set the cut caught before RecoverSet (pending or pre-restore) is failed by the restart, as VSS
                # fails it (the requester was never answered and starts again): its destination never served the
                # snapshot, so demo0 is checked below as a LUN of its own writes.
                unanswered_unrecovered = (final["state"] == "failed" and rec.resync_answered_t >= self.cut_t
                                          and "the daemon restarted during" in (final.get("error") or ""))
                resynced = not unanswered_unrecovered
                if final["state"] != "done" and not unanswered_unrecovered:
                    res.wrong_resyncs += 1
                    res.problems.append(f"resync {rec.resync_id} ended {final['state']} after the restart")
            elif rec.resync_answered_t < self.cut_t:
                res.wrong_resyncs += 1
                res.problems.append(f"resync {rec.resync_id} was answered but is gone after the restart")
        for lun in LUNS:
            data = c.read(lun, 0, BLOCKS)
            if lun == 0 and resynced:
                target = next(s for s in rec.snaps if s.name == rec.resync_of)
                bad = self._differ(lun, data, target.expect[lun])
                if bad:
                    res.wrong_resyncs += 1
                    res.problems.append(f"demo0 after the resync: {len(bad)} block(s) differ from "
                                        f"@{rec.resync_of}, e.g. {bad[:5]}")
                continue
            for b in range(BLOCKS):
                durable = self.durable(lun, b)
                if durable >= 0:
                    res.writes_durable_checked += 1
                idx = self.which(lun, b, data[b * UNIT:(b + 1) * UNIT])
                if idx is None:
                    res.damaged_blocks += 1
                    res.problems.append(f"lun {lun} block {b}: neither zeros nor a whole stamp written there")
                elif idx < durable:
                    res.lost_acked_writes += 1
                    if res.lost_acked_writes <= 5:
                        res.problems.append(f"lun {lun} block {b}: holds write #{idx}, but #{durable} was durable")
        for snap in rec.snaps:
            if snap.asked_t < self.cut_t:
                for lun in LUNS:
                    self._snapshot(api, c, f"{NAMES[lun]}@{snap.name}", snap, lun)
        if rec.clone is not None and rec.clone.asked_t < self.cut_t:
            self._snapshot(api, c, "demo0@c", rec.clone, 0)

    def _differ(self, lun: int, data: bytes, expect: list[int]) -> list[int]:
        return [b for b, want in enumerate(expect) if self.which(lun, b, data[b * UNIT:(b + 1) * UNIT]) != want]

    def _snapshot(self, api: httpx.Client, c: StampClient, name: str, snap: Taken, lun: int) -> None:
        res = self.res
        r = api.get(f"/snapshots/{name}")
        if r.status_code == 404:
            if snap.answered_t < self.cut_t:
                res.lost_snapshots += 1
                res.problems.append(f"{name}: created (answered) but gone after the restart")
            return
        r.raise_for_status()
        shown = r.json()
        deadline = time.monotonic() + 120
        while shown.get("fill") and not shown["fill"]["complete"] and shown["state"] == "valid":
            if time.monotonic() > deadline:
                res.altered_snapshots += 1
                res.problems.append(f"{name}: still filling 120 s after the restart")
                return
            time.sleep(0.1)
            shown = api.get(f"/snapshots/{name}").json()
        if shown["state"] != "valid":
            res.altered_snapshots += 1
            res.problems.append(f"{name}: {shown['state']} after the restart ({shown.get('invalid_reason')})")
            return
        api.post(f"/snapshots/{name}/expose", json={"target": DEMO_IQN, "lun": EXPOSE_LUN}).raise_for_status()
        try:
            data = c.read(EXPOSE_LUN, 0, BLOCKS)
        finally:
            api.delete(f"/snapshots/{name}/expose").raise_for_status()
        res.snapshots_checked += 1
        bad = self._differ(lun, data, snap.expect[lun])
        if bad:
            res.altered_snapshots += 1
            res.problems.append(f"{name}: {len(bad)} block(s) differ from when it was taken, e.g. {bad[:5]}")


# --- cuts -----------------------------------------------------------------------------------------------------------


def choose_cuts(rec: Recording, n: int, rng: random.Random) -> list[tuple[int, str, str]]:
    """``n`` cuts ``(op index, phase, mode)``: round-robin over the phases, every other one just after a sync, every
    other one keeping a random part of what was not synced."""
    out = []
    for i in range(n):
        phase = PHASES[i % len(PHASES)]
        lo, hi = rec.phases[phase]
        span = [k for k, op in enumerate(rec.ops) if lo <= op.t <= hi]
        if not span:
            continue
        if (i // len(PHASES)) % 2 == 0:
            syncs = [k + 1 for k in span if rec.ops[k].kind in ("fsync", "fdatasync", "fsyncdir")]
            cut = rng.choice(syncs or span)
        else:
            cut = rng.choice(span)
        out.append((cut, phase, "synced" if i % 2 == 0 else "reorder"))
    return out


def check_cut(rec: Recording, base: Path, cut: int, phase: str, mode: str, seed: int, control: str = "",
              keep: bool = False) -> Cut:
    res = Result(cut, seed, kind=phase)
    lose: Callable[[int, LogOp], bool] | None = None
    if control == "lun":
        lo, hi = rec.phases["writes"]
        lose = lambda _j, op: op.ino == rec.lun_ino and lo <= op.t <= hi
    elif control == "pool":
        lose = lambda _j, op: op.ino == rec.slot_ino
    workdir = base / f"cut-{cut}-{mode}{'-' + control if control else ''}"
    image = replay(rec.ops, rec.root_ino, cut, mode=mode, seed=seed, lose=lose)
    image.write_to(workdir / "data")
    cut_t = rec.ops[cut].t if cut < len(rec.ops) else float("inf")
    try:
        Check(rec, workdir, res, cut_t).run()
    except Exception as e:  # noqa: BLE001 - a check that could not run is a problem of this cut, reported
        res.trial_errors += 1
        res.problems.append(f"the check could not run: {e!r}"[:1500])
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return Cut(cut, phase, mode, control, res)


@dataclass
class Summary:
    seed: int
    operations: int
    results: list[Cut]
    controls: dict[str, bool]
    staged_writes: int

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and all(self.controls.values()) and self.staged_writes > 0


def trials(base: Path, n: int, seed: int, keep: bool = False) -> Summary:
    """One recording under ``base``, ``n`` cuts of it checked, then the two negative controls."""
    rng = random.Random(seed)
    started = time.monotonic()
    rec = Recorder(base / "recording", seed).run()
    syncs = sum(op.kind in ("fsync", "fdatasync", "fsyncdir") for op in rec.ops)
    print(f"recorded {len(rec.ops)} operations ({syncs} syncs) in {time.monotonic() - started:.1f}s, seed {seed}; "
          f"{rec.staged_writes} first writes staged", flush=True)
    results = []
    for i, (cut, phase, mode) in enumerate(choose_cuts(rec, n, rng)):
        r = check_cut(rec, base, cut, phase, mode, seed + i, keep=keep)
        results.append(r)
        print(f"cut {i:3d} at op {cut:6d} ({phase}, {mode}): {r.res.writes_durable_checked} durable blocks, "
              f"{r.res.snapshots_checked} snapshot LUNs checked: "
              f"{'ok' if r.ok else 'FAILED: ' + '; '.join(r.res.problems[:5])}", flush=True)
    # The end of the snapshot phase, with synced writes dropped: the checks must see it.
    end = max(k for k, op in enumerate(rec.ops) if op.t <= rec.phases["snapshots"][1]) + 1
    controls = {}
    for control in ("lun", "pool"):
        r = check_cut(rec, base, end, "snapshots", "synced", seed, control=control, keep=keep).res
        controls[control] = r.lost_acked_writes > 0 if control == "lun" else r.altered_snapshots > 0
        print(f"negative control ({control}: synced writes dropped): "
              f"{'detected' if controls[control] else 'NOT DETECTED'}: {'; '.join(r.problems[:3])}", flush=True)
    return Summary(seed, len(rec.ops), results, controls, rec.staged_writes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, nargs="?", default=50, help="number of cuts")
    ap.add_argument("--seed", type=int, default=None, help="seed (random by default)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the recording and each cut's image under DIR")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lunsync-powerloss-") as tmp:
        s = trials(a.keep or Path(tmp), a.n, seed, keep=a.keep is not None)
    total = {k: sum(getattr(r.res, k) for r in s.results) for k in (
        "writes_durable_checked", "snapshots_checked", "lost_acked_writes", "altered_snapshots", "lost_snapshots",
        "damaged_blocks", "integrity_errors", "wrong_resyncs", "trial_errors")}
    print(json.dumps({"cuts": len(s.results), "failed_cuts": sum(not r.ok for r in s.results), "seed": seed,
                      "operations": s.operations, "staged_writes": s.staged_writes, **total,
                      "controls_detected": s.controls,
                      "seconds": round(time.monotonic() - started, 1)}))
    return 0 if s.ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
