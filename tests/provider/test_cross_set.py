"""Snapshot sets over LUNs of two worker processes (lunsync.provider.cross_set), with real processes: two workers
(tests/provider/hold_worker.py) share the data dir's catalog, each serves its own target over iSCSI on loopback and
answers the hold calls on its channel; the test is the control, which coordinates and records the set.

The consistency check is the set-consistency test's: writers take turns on one global sequence across the LUNs of
both workers (write ``n + 1`` issued only once ``n`` is acknowledged), and every set's snapshots together must hold
a prefix of the sequence with no gap, bounded by what was acknowledged before the request and after the answer. The
abort paths: a member that cannot hold, and a worker killed between its prepare and the commit; then nothing is
taken anywhere and writes resume."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from crash.stamps import Stamp, StampClient, Turns, parse, stamp
from e2e.harness import free_port
from lunsync.provider import cross_set
from lunsync.provider.channel import Channel
from lunsync.provider.daemon import Array
from lunsync.provider.rpc import Json, Message, Notice
from lunsync.provider.snapshot_service import HoldTimeout
from lunsync.snapshots.catalog import Catalog, CatalogError, Invalid, NotFound
from lunsync.snapshots.snapcat import SnapshotCatalog, SnapshotRecord

from tests.provider.test_snapshot_service import unmap_in_flight

REPO_ROOT = Path(__file__).resolve().parents[2]
IQN = "iqn.2026-11.io.lunsync:xw{}"
# LUN name -> (worker, LUN number on that worker's target)
LUNS = {"a0": (0, 0), "b0": (1, 0), "a1": (0, 1)}
ORDER = ["a0", "b0", "a1"]  # write n goes to ORDER[n % 3]: consecutive writes alternate between the workers
SETS = 3
GAP = 40


class Workers:
    """The control's end: two worker processes and their channels."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.ports = [free_port(), free_port()]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.channels: list[Channel] = []
        self.generation = [0, 0]  # new processes started in each place

    async def start(self, luns: dict[int, list[str]]) -> None:
        self.luns = luns
        for w in (0, 1):
            mine = self.spawn(w, luns[w])
            ready = asyncio.Event()

            def on_message(msg: Message, sock: socket.socket | None, ready: asyncio.Event = ready) -> None:
                if isinstance(msg, Notice) and msg.event == "ready":
                    ready.set()

            self.channels.append(Channel(mine, on_message))
            await asyncio.wait_for(ready.wait(), 30)

    async def restart(self, w: int) -> None:
        """Kill worker ``w`` with -9 and start a new process in its place, as the control's pool does."""
        self.procs[w].send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.procs[w].wait, 10)
        self.channels[w].close()
        ready = asyncio.Event()

        def on_message(msg: Message, sock: socket.socket | None) -> None:
            if isinstance(msg, Notice) and msg.event == "ready":
                ready.set()

        mine = self.spawn(w, self.luns[w], at=w)
        self.channels[w] = Channel(mine, on_message)
        self.generation[w] += 1
        await asyncio.wait_for(ready.wait(), 30)

    def spawn(self, w: int, luns: list[str], at: int | None = None) -> socket.socket:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = (subprocess.Popen(
            [sys.executable, "-m", "tests.provider.hold_worker", str(theirs.fileno()), str(self.data),
             str(self.ports[w]), IQN.format(w) if luns else "-", ",".join(luns)], pass_fds=[theirs.fileno()],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}))
        if at is None:
            self.procs.append(proc)
        else:
            self.procs[at] = proc
        theirs.close()
        return mine

    async def call(self, w: int, method: str, params: dict[str, Json]) -> Json:
        return await self.channels[w].call(method, params)

    async def stop(self) -> None:
        for ch in self.channels:
            ch.close()
        for p in self.procs:
            try:
                await asyncio.to_thread(p.wait, 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@asynccontextmanager
async def two_workers(tmp: Path, luns: dict[int, list[str]] | None = None) -> AsyncIterator[tuple[Workers,
                                                                                                 SnapshotCatalog]]:
    data = tmp / "data"
    cat = Catalog(data)
    for name, (w, n) in LUNS.items():
        cat.create_lun(name, 16 << 20)
    for w in (0, 1):
        cat.create_target(IQN.format(w))
    for name, (w, n) in LUNS.items():
        cat.map_lun(IQN.format(w), name, n)
    workers = Workers(data)
    try:
        await workers.start(luns or {0: ["a0", "a1"], 1: ["b0"]})
        yield workers, SnapshotCatalog(cat)
    finally:
        await workers.stop()
        cat.close()


def owner(lun: str) -> int | None:
    return LUNS[lun][0] if lun in LUNS else None


def writer(workers: Workers, i: int, turns: Turns) -> None:
    w, lun = LUNS[ORDER[i]]
    client = StampClient("127.0.0.1", workers.ports[w], IQN.format(w), f"iqn.2026-11.io.lunsync:xww{i}",
                         0x400000D00000 + i)
    turns.write_turns(client, lun, i, len(ORDER))


async def read_snapshots(data: Path, recs: list[SnapshotRecord], blocks: int) -> dict[str, bytes]:
    """Each snapshot's first ``blocks`` stamps, read through a daemon Array opened on the data dir afterwards."""
    cat = Catalog(data)
    array = Array(str(data), cat)
    await array.load()
    assert array.snapshots is not None
    try:
        out = {}
        for rec in recs:
            view = array.snapshots.open_view(rec)
            out[rec.lun_name] = bytes(await view.read(0, blocks * 8))
        return out
    finally:
        await array.snapshots.close()
        for live in array.luns.values():
            await live.device.close()
        cat.close()


@pytest.mark.e2e  # worker processes serving iSCSI to a real client
def test_a_set_across_two_workers_holds_a_prefix_of_one_sequence(tmp_path: Path) -> None:
    async def go() -> None:
        bounds: list[tuple[int, int]] = []
        sets: list[list[SnapshotRecord]] = []
        async with two_workers(tmp_path) as (workers, cat):
            turns = Turns()
            threads = [threading.Thread(target=writer, args=(workers, i, turns), daemon=True)
                       for i in range(len(ORDER))]
            for t in threads:
                t.start()
            try:
                for k in range(SETS):
                    await asyncio.to_thread(turns.wait_acked, (k + 1) * GAP + (bounds[-1][1] if bounds else 0))
                    before = turns.acked
                    recs, hold_ms = await cross_set.create_set(cat, [(n, f"set{k}") for n in ORDER], owner,
                                                               workers.call, set_name=f"set{k}")
                    after = turns.acked
                    bounds.append((before, after))
                    sets.append(recs)
                    assert hold_ms < 1000
                await asyncio.to_thread(turns.wait_acked, bounds[-1][1] + GAP)
            finally:
                turns.finish()
                for t in threads:
                    await asyncio.to_thread(t.join, 30)
            assert turns.error is None, repr(turns.error)
            listed = cat.list_snapshots()
        total = turns.acked + 1
        # One record per member, each set once, with its members from both workers.
        assert sorted((r.set_name, r.lun_name) for r in listed) == sorted(
            (f"set{k}", n) for k in range(SETS) for n in ORDER)
        for recs in sets:
            assert len({r.created_at for r in recs}) == 1
        for k, ((before, after), recs) in enumerate(zip(bounds, sets, strict=True)):
            blocks = -(-total // len(ORDER))
            data = await read_snapshots(tmp_path / "data", recs, blocks)
            seen: set[int] = set()
            for i, name in enumerate(ORDER):
                for b in range(blocks):
                    got = parse(data[name][b * 4096:(b + 1) * 4096])
                    assert got != "damaged", f"set{k}: lun {name} block {b} is damaged"
                    if got is not None:
                        assert isinstance(got, Stamp) and (got.lun, got.block) == (i, b), (k, name, b, got)
                        seen.add(got.seq)
            last = max(seen)
            assert seen == set(range(last + 1)), f"set{k}: a gap below {last}: {sorted(set(range(last + 1)) - seen)}"
            assert before <= last <= after + 1, (k, before, last, after)

    asyncio.run(go())


async def write_once(workers: Workers, name: str, block: int, timeout: float = 5.0) -> None:
    """One stamped write to ``name`` over iSCSI, which must be acknowledged within ``timeout`` (not held)."""
    w, lun = LUNS[name]

    def go() -> None:
        c = StampClient("127.0.0.1", workers.ports[w], IQN.format(w), "iqn.2026-11.io.lunsync:xwprobe",
                        0x400000D000FF)
        try:
            c.write(lun, block, stamp(Stamp(10_000 + block, 9, block, 9)))
        finally:
            c.close()

    await asyncio.wait_for(asyncio.to_thread(go), timeout)


@pytest.mark.e2e  # worker processes serving iSCSI to a real client
def test_a_member_that_cannot_hold_aborts_the_set_everywhere(tmp_path: Path) -> None:
    async def go() -> None:
        # Worker 1 does not serve b0 (as when its store could not be opened): its prepare fails.
        async with two_workers(tmp_path, {0: ["a0", "a1"], 1: []}) as (workers, cat):
            with pytest.raises(HoldTimeout, match="worker 1"):
                await cross_set.create_set(cat, [(n, "s") for n in ORDER], owner, workers.call, set_name="s")
            assert cat.list_snapshots() == []
            await write_once(workers, "a0", 0)  # worker 0 held its members, and released them
            recs, _ = await cross_set.create_set(cat, [("a0", "t"), ("a1", "t")], owner, workers.call, set_name="t")
            assert [r.full_name for r in recs] == ["a0@t", "a1@t"]

    asyncio.run(go())


@pytest.mark.e2e  # worker processes serving iSCSI to a real client
def test_a_worker_killed_between_prepare_and_commit_leaves_nothing_taken(tmp_path: Path) -> None:
    async def go() -> None:
        async with two_workers(tmp_path) as (workers, cat):
            await write_once(workers, "a0", 0)

            async def call(w: int, method: str, params: dict[str, Json]) -> Json:
                answer = await workers.call(w, method, params)
                if method == cross_set.PREPARE and w == 1:
                    workers.procs[1].send_signal(signal.SIGKILL)
                    await asyncio.to_thread(workers.procs[1].wait, 10)
                return answer

            started = time.monotonic()
            with pytest.raises(HoldTimeout, match="worker 1"):
                await cross_set.create_set(cat, [(n, "s") for n in ORDER], owner, call, set_name="s")
            assert time.monotonic() - started < 5
            assert cat.list_snapshots() == []
            await write_once(workers, "a0", 1)  # worker 0 committed, then took its part back: writes flow
            # Worker 0 keeps nothing of it: its next set takes epochs of its own and is recorded.
            recs, _ = await cross_set.create_set(cat, [("a0", "t"), ("a1", "t")], owner, workers.call, set_name="t")
            assert [r.full_name for r in recs] == ["a0@t", "a1@t"]

    asyncio.run(go())


def test_members_are_grouped_by_the_worker_serving_each_lun() -> None:
    assert cross_set.by_worker([("a0", "s"), ("b0", "s"), ("a1", "s")], owner) == {
        0: [("a0", "s"), ("a1", "s")], 1: [("b0", "s")]}
    with pytest.raises(NotFound, match="zz"):
        cross_set.by_worker([("zz", "s")], owner)


def in_process(tmp: Path, body: Callable[[Array, cross_set.HoldParticipant], Awaitable[None]]) -> None:
    async def go() -> None:
        cat = Catalog(tmp / "data")
        for name in LUNS:
            cat.create_lun(name, 4 << 20)
        array = Array(str(tmp / "data"), cat)
        await array.load()
        assert array.snapshots is not None
        try:
            await body(array, cross_set.HoldParticipant(lambda: array.snapshots))
        finally:
            await array.snapshots.close()
            cat.close()

    asyncio.run(go())


def test_an_abort_while_the_prepare_drains_releases_it_and_the_prepare_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(array: Array, holds: cross_set.HoldParticipant) -> None:
        assert array.snapshots is not None
        vol = array.snapshots.volumes["a0"]
        unmap, unmapped = await unmap_in_flight(vol, monkeypatch)
        prepare = asyncio.create_task(holds.call(cross_set.PREPARE, {"op": "x", "specs": [["a0", "s"]]}))
        await asyncio.sleep(0.05)
        assert vol.held and not prepare.done()
        await holds.call(cross_set.ABORT, {"op": "x"})
        with pytest.raises(HoldTimeout, match="abandoned while its writes drained"):
            await prepare
        assert not vol.held
        with pytest.raises(HoldTimeout):
            await holds.call(cross_set.COMMIT, {"op": "x"})
        with pytest.raises(Invalid):  # an aborted operation cannot be prepared again
            await holds.call(cross_set.PREPARE, {"op": "x", "specs": [["a0", "s"]]})
        unmapped.set()
        await unmap

    in_process(tmp_path, body)


def test_a_lost_control_completes_a_recorded_set_and_abandons_an_unrecorded_one(tmp_path: Path) -> None:
    async def body(array: Array, holds: cross_set.HoldParticipant) -> None:
        svc = array.snapshots
        assert svc is not None
        vol = svc.volumes["a0"]
        await holds.call(cross_set.PREPARE, {"op": "gone", "specs": [["a0", "s"]]})
        answer = await holds.call(cross_set.COMMIT, {"op": "gone"})
        epoch = answer["epochs"]["a0"]
        assert epoch in vol.epochs
        await holds.lost()  # never recorded: abandoned
        assert vol.epochs == () and svc.cat.list_snapshots() == []
        await holds.call(cross_set.PREPARE, {"op": "kept", "specs": [["a0", "t"]], "set_name": "t"})
        answer = await holds.call(cross_set.COMMIT, {"op": "kept"})
        plans = svc.cat.plan_snapshots([("a0", "t")], "differential", None, "t")
        svc.cat.record_snapshots(plans, "differential", "t", [answer["epochs"]["a0"]])  # by the control, then it died
        await holds.lost()
        assert [r.full_name for r in svc.cat.list_snapshots()] == ["a0@t"]
        assert vol.epochs == (answer["epochs"]["a0"],)
        await holds.call(cross_set.PREPARE, {"op": "held", "specs": [["a1", "u"]]})
        assert svc.volumes["a1"].held
        await holds.lost()
        assert not svc.volumes["a1"].held
        (rec,), _ = await asyncio.wait_for(svc.create([("a1", "u")]), 5)  # the service's lock is free again
        assert rec.full_name == "a1@u"

    in_process(tmp_path, body)


@pytest.mark.e2e  # worker processes serving iSCSI to a real client
def test_a_set_the_catalog_refuses_after_the_commit_is_taken_back_on_every_worker(tmp_path: Path) -> None:
    async def go() -> None:
        async with two_workers(tmp_path) as (workers, cat):
            real = cat.record_snapshots

            def refuse(*args: Any, **kwargs: Any) -> None:
                raise CatalogError("disk full (injected)")

            cat.record_snapshots = refuse  # type: ignore[method-assign]
            with pytest.raises(CatalogError, match="injected"):
                await cross_set.create_set(cat, [(n, "s") for n in ORDER], owner, workers.call, set_name="s")
            cat.record_snapshots = real  # type: ignore[method-assign]
            assert cat.list_snapshots() == []
            await write_once(workers, "a0", 0)
            await write_once(workers, "b0", 0)
            # Each worker settled it (its snapshot operations would wait for the news otherwise): the same set again.
            recs, _ = await asyncio.wait_for(cross_set.create_set(cat, [(n, "s") for n in ORDER], owner,
                                                                  workers.call, set_name="s"), 10)
            assert sorted(r.full_name for r in recs) == ["a0@s", "a1@s", "b0@s"]

    asyncio.run(go())


@pytest.mark.e2e  # worker processes serving iSCSI to a real client
def test_a_worker_restarted_after_its_commit_gets_no_silently_wrong_snapshot(tmp_path: Path) -> None:
    async def go() -> None:
        async with two_workers(tmp_path) as (workers, cat):
            # Restarted before the record: nothing is recorded, and worker 0 takes its part back.
            async def call(w: int, method: str, params: dict[str, Json]) -> Json:
                answer = await workers.call(w, method, params)
                if method == cross_set.COMMIT and w == 1:
                    await workers.restart(1)
                return answer

            with pytest.raises(HoldTimeout, match="restarted after the commit"):
                await cross_set.create_set(cat, [(n, "s") for n in ORDER], owner, call, set_name="s",
                                           generation=workers.generation.__getitem__)
            assert cat.list_snapshots() == []
            # Restarted while the record commits: its members are recorded invalid, the others valid.
            real = cat.record_snapshots

            def record_while_1_restarts(*args: Any, **kwargs: Any) -> None:
                real(*args, **kwargs)
                workers.generation[1] += 1

            cat.record_snapshots = record_while_1_restarts  # type: ignore[method-assign]
            recs, _ = await asyncio.wait_for(cross_set.create_set(
                cat, [(n, "t") for n in ORDER], owner, workers.call, set_name="t",
                generation=workers.generation.__getitem__), 10)
            assert {r.full_name: r.state for r in recs} == {"a0@t": "valid", "b0@t": "invalid", "a1@t": "valid"}
            assert "worker 1 restarted" in (cat.get_snapshot("b0", "t").invalid_reason or "")

    asyncio.run(go())


@pytest.mark.e2e  # worker processes serving iSCSI to a real client
def test_clones_across_two_workers_are_filled_by_the_worker_of_each_lun(tmp_path: Path) -> None:
    async def go() -> None:
        async with two_workers(tmp_path) as (workers, cat):
            await write_once(workers, "a0", 3)
            await write_once(workers, "b0", 5)
            recs, _ = await cross_set.create_set(cat, [("a0", "c"), ("b0", "c")], owner, workers.call, kind="clone",
                                                 set_name="c")
            assert {r.kind for r in recs} == {"clone"}
            deadline = time.monotonic() + 20
            while not all(cat.get_snapshot(r.lun_name, r.name).filled for r in recs):
                assert time.monotonic() < deadline, [cat.get_snapshot(r.lun_name, r.name) for r in recs]
                await asyncio.sleep(0.1)
            filled = [cat.get_snapshot(r.lun_name, r.name) for r in recs]
        data = await read_snapshots(tmp_path / "data", filled, 6)  # from the clones' own files
        assert parse(data["a0"][3 * 4096:4 * 4096]) == Stamp(10_003, 9, 3, 9)
        assert parse(data["b0"][5 * 4096:6 * 4096]) == Stamp(10_005, 9, 5, 9)

    asyncio.run(go())
