"""Tests for lunsync.provider.snapshot_service in process, on a real catalog and real files: a snapshot set releases
writes before its catalog record commits, a refused commit rolls the in-memory epochs back and frees their copies,
and a preservation that fails while the record commits still marks the snapshot invalid before the write lands."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from lunsync.provider.daemon import Array
from lunsync.provider.snapshot_service import HoldTimeout
from lunsync.snapshots import fsutil
from lunsync.snapshots.catalog import Catalog, CatalogError
from lunsync.snapshots.cow import CowVolume

BS = 512
CS = 64 << 10
SIZE = 4 << 20


def with_array(tmp: Path, luns: int, body: Callable[[Array], Awaitable[None]]) -> None:
    async def go() -> None:
        cat = Catalog(tmp / "data")
        for i in range(luns):
            cat.create_lun(f"l{i}", SIZE)
        array = Array(str(tmp / "data"), cat)
        await array.load()
        assert array.snapshots is not None
        try:
            await body(array)
        finally:
            await array.snapshots.close()
            cat.close()

    asyncio.run(go())


def slow_commit(array: Array, gate: threading.Event, fail: bool = False) -> list[float]:
    """Make the catalog commit of a snapshot wait for ``gate`` (in its thread), then commit or raise."""
    svc = array.snapshots
    assert svc is not None
    real = svc.cat.record_snapshots
    calls: list[float] = []

    def create(*args: Any, **kwargs: Any) -> Any:
        calls.append(1.0)
        assert gate.wait(10)
        if fail:
            raise CatalogError("disk full (injected)")
        return real(*args, **kwargs)

    svc.cat.record_snapshots = create  # type: ignore[method-assign]
    return calls


def test_set_releases_writes_before_the_catalog_commits(tmp_path: Path) -> None:
    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        vols = [svc.volumes["l0"], svc.volumes["l1"]]
        for v in vols:
            await v.write(0, b"\xaa" * CS)
        gate = threading.Event()
        slow_commit(array, gate)
        task = asyncio.create_task(svc.create([("l0", "s"), ("l1", "s")], set_name="set"))
        while not all(v.epochs for v in vols):
            await asyncio.sleep(0.001)
        # The point in time is fixed and writes flow while the record is still being committed.
        for v in vols:
            assert not v.held
            await asyncio.wait_for(v.write(0, b"\xbb" * CS), 5)
        assert not task.done()
        gate.set()
        recs, hold_ms = await task
        assert [r.epoch for r in recs] == [v.epochs[-1] for v in vols]
        assert hold_ms < 1000
        for v, r in zip(vols, recs, strict=True):
            assert bytes(await v.view(r.epoch).read(0, CS // BS)) == b"\xaa" * CS
            assert bytes(await v.read(0, CS // BS)) == b"\xbb" * CS

    with_array(tmp_path, 2, body)


def test_refused_commit_rolls_the_epochs_back_and_frees_their_copies(tmp_path: Path) -> None:
    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        vol = svc.volumes["l0"]
        await vol.write(0, b"\x11" * CS)
        gate = threading.Event()
        slow_commit(array, gate, fail=True)
        task = asyncio.create_task(svc.create([("l0", "s")]))
        while not vol.epochs:
            await asyncio.sleep(0.001)
        failed_epoch = vol.epochs[-1]
        await vol.write(0, b"\x22" * CS)  # preserves chunk 0 for an epoch that will never be recorded
        assert vol.slots_used == 1
        gate.set()
        with pytest.raises(CatalogError):
            await task
        assert vol.epochs == () and vol.slots_used == 0
        assert svc.cat.list_snapshots("l0") == []
        # The next snapshot never reuses the abandoned epoch, and its contents are right.
        del svc.cat.record_snapshots
        (rec,), _ = await svc.create([("l0", "t")])
        assert rec.epoch > failed_epoch
        await vol.write(0, b"\x33" * CS)
        assert bytes(await vol.view(rec.epoch).read(0, CS // BS)) == b"\x22" * CS

    with_array(tmp_path, 1, body)


def test_preservation_failing_while_the_record_commits_marks_the_snapshot_invalid(tmp_path: Path) -> None:
    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        vol = svc.volumes["l0"]
        await vol.write(0, b"\x11" * CS)
        pool = vol.pool
        gate = threading.Event()
        slow_commit(array, gate)
        task = asyncio.create_task(svc.create([("l0", "s")]))
        while not vol.epochs:
            await asyncio.sleep(0.001)
        assert pool is not None or vol.pool is not None
        p = vol.pool
        assert p is not None
        p.capacity_bytes = 1  # the pool is full from now on
        write = asyncio.create_task(vol.write(0, b"\x22" * CS))
        await asyncio.sleep(0.05)
        assert not write.done()  # the write waits until the snapshot is durably invalid, i.e. after its record
        gate.set()
        (rec,), _ = await task
        await write
        assert svc.cat.get_snapshot("l0", "s").state == "invalid"
        assert rec.epoch not in vol.epochs

    with_array(tmp_path, 1, body)


def test_a_set_commits_while_the_default_executor_is_busy_and_records_its_hold_time(tmp_path: Path) -> None:
    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        # Every worker of the default executor stuck, as behind the LUNs' fdatasyncs under load.
        stuck = threading.Event()
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(None, stuck.wait, 30) for _ in range(64)]
        try:
            recs, hold_ms = await asyncio.wait_for(svc.create([("l0", "s"), ("l1", "s")], set_name="set"), 10)
        finally:
            stuck.set()
            await asyncio.gather(*jobs)
        assert [r.set_name for r in recs] == ["set", "set"]
        with array.catalog.transaction(write=False) as db:
            assert db.execute("SELECT hold_ms FROM snapshot_sets WHERE name = 'set'").fetchone()[0] == hold_ms

    with_array(tmp_path, 2, body)


def test_a_view_of_a_filling_clone_stays_right_after_the_fill_finishes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore (or anything else) that opened a clone while it filled keeps its view. When the fill finishes the
    origin stops preserving for the clone and frees its copies; the view must then read the clone's file, not the
    origin's newer data, and the resync copier must copy from it too."""
    from lunsync.provider import snapshot_service
    from lunsync.snapshots.backend import FileBackend
    from lunsync.snapshots.resync import ResyncState, ResyncVolume, Unthrottled

    gate = threading.Event()
    real_copy = snapshot_service._fill_pieces

    def gated_copy(*args: Any) -> None:
        assert gate.wait(10)
        real_copy(*args)

    monkeypatch.setattr(snapshot_service, "_fill_pieces", gated_copy)

    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        dev = array.luns["l0"].lu.device
        a, b, c = (bytes([x]) * SIZE for x in (0xA1, 0xB2, 0xC3))
        await dev.write(0, a)
        (rec,), _ = await svc.create([("l0", "c")], kind="clone")
        view = svc.open_view(rec)  # what a resync started now reads
        await dev.write(0, b)  # preserved for the clone: the fill has not copied anything yet
        vol = svc.volumes["l0"]
        gate.set()
        for _ in range(500):
            if rec.epoch not in vol.epochs:
                break
            await asyncio.sleep(0.01)
        assert rec.epoch not in vol.epochs, "the fill did not finish"
        await dev.write(0, c)  # the origin no longer preserves for the filled clone
        assert bytes(await view.read(0, SIZE // BS)) == a
        dst = FileBackend.create(tmp_path / "dst.img", SIZE, BS)
        rv = await ResyncVolume.open(view, dst, tmp_path / "job.bitmap", region_bytes=CS, throttle=Unthrottled())
        rv.start()
        assert await asyncio.wait_for(rv.wait(), 10) is ResyncState.DONE
        assert bytes(await dst.read(0, SIZE // BS)) == a
        await dst.close()

    with_array(tmp_path, 1, body)


def test_a_filled_clone_is_opened_once_and_closed_when_deleted(tmp_path: Path) -> None:
    """Every reader of a filled clone (exposures, each restore and its verification) shares one descriptor, and
    deleting the clone closes it, so its space really comes back."""
    import os

    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        await array.luns["l0"].lu.device.write(0, bytes([0x5C]) * SIZE)
        await svc.create([("l0", "c")], kind="clone")
        for _ in range(500):
            if not svc._fills:
                break
            await asyncio.sleep(0.01)
        filled = svc.cat.get_snapshot("l0", "c")
        assert filled.filled
        first, second = svc.open_view(filled), svc.open_view(filled)
        assert first is second
        assert bytes(await first.read(0, 8)) == bytes([0x5C]) * 8 * BS
        path = svc._clone_path(filled)
        opened = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")}
        assert path in opened
        await svc.delete("l0", "c")
        opened = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")}
        assert not any(p.startswith(path) for p in opened), "the deleted clone's file is still open"

    with_array(tmp_path, 1, body)


def test_a_lun_under_restore_can_be_neither_deleted_nor_applied_away(tmp_path: Path) -> None:
    """The restore guard is the array's, so every way of removing a LUN meets it: delete, and an apply whose
    configuration no longer names it (or reopens it with other flags). Refused before anything changes."""
    from dataclasses import replace as dc_replace
    from types import SimpleNamespace

    from lunsync.snapshots.catalog import InUse

    async def body(array: Array) -> None:
        running = SimpleNamespace(id="r1", state=SimpleNamespace(value="resyncing"))
        array.recovery = SimpleNamespace(  # type: ignore[assignment]
            restoring=lambda lun: running if lun == "l0" else None)
        config = array.catalog.export()
        others = tuple(lun for lun in config.luns if lun.name != "l0")
        for attempt in (array.delete_lun("l0"), array.apply(dc_replace(config, luns=others)),
                        array.apply(dc_replace(config, luns=others), dry_run=True),
                        array.apply(dc_replace(config, luns=tuple(
                            dc_replace(lun, read_only=True) if lun.name == "l0" else lun for lun in config.luns)))):
            with pytest.raises(InUse, match="being restored by recovery r1"):
                await attempt
        assert {rec.name for rec in array.catalog.list_luns()} == {"l0", "l1"}
        assert not array.catalog.get_lun("l0").read_only
        await array.delete_lun("l1")  # not under restore: goes as before
        assert {rec.name for rec in array.catalog.list_luns()} == {"l0"}

    with_array(tmp_path, 2, body)


def test_a_snapshot_set_includes_the_writes_staged_before_it_and_holds_writes_only_briefly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        cat = Catalog(tmp_path / "data")
        cat.create_lun("l0", SIZE)
        array = Array(str(tmp_path / "data"), cat, write_staging_bytes=1 << 20)
        await array.load()
        svc = array.snapshots
        assert svc is not None
        try:
            vol = svc.volumes["l0"]
            await vol.write(0, b"\x11" * CS)
            (first,), _ = await svc.create([("l0", "s1")])
            gate = threading.Event()
            real = vol._copy_and_commit

            def held_copy(*args: object) -> object:
                gate.wait(30)
                return real(*args)  # type: ignore[arg-type]

            monkeypatch.setattr(vol, "_copy_and_commit", held_copy)
            await vol.write(0, b"\x22" * 4096)  # answered from the staging area: its copy is held
            assert vol.staged == 1
            task = asyncio.create_task(svc.create([("l0", "s2")]))
            for _ in range(20):
                await asyncio.sleep(0.001)
            assert not task.done() and not vol.held  # landing the staged write first, writes not held meanwhile
            direct = asyncio.create_task(vol.write(8 * CS // BS, b"\x33" * 4096))
            for _ in range(5):
                await asyncio.sleep(0.001)
            assert vol.staged == 1 and not direct.done()  # staging paused: it waits for its own copy
            gate.set()
            (second,), hold_ms = await task
            await direct
            assert vol.staged == 0 and hold_ms < 1000
            view1, view2 = vol.view(first.epoch), vol.view(second.epoch)
            assert bytes(await view1.read(0, CS // BS)) == b"\x11" * CS
            assert bytes(await view2.read(0, CS // BS)) == b"\x22" * 4096 + b"\x11" * (CS - 4096)
            assert bytes(await view1.read(8 * CS // BS, 8)) == bytes(4096)
            assert bytes(await vol.read(8 * CS // BS, 8)) == b"\x33" * 4096
        finally:
            await svc.close()
            cat.close()

    asyncio.run(go())


def test_a_snapshot_set_with_nothing_in_flight_holds_writes_without_a_trip_through_the_event_loop(
        tmp_path: Path) -> None:
    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        import time

        loop = asyncio.get_running_loop()
        stop = False

        def hog() -> None:  # every trip through the loop costs 30 ms, as a busy loop's iteration can
            time.sleep(0.03)
            if not stop:
                loop.call_soon(hog)

        loop.call_soon(hog)
        try:
            await asyncio.sleep(0)
            _, hold_ms = await svc.create([("l0", "s"), ("l1", "s")])
        finally:
            stop = True
        assert hold_ms < 10, hold_ms

    with_array(tmp_path, 2, body)


async def unmap_in_flight(vol: CowVolume, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Task[None], threading.Event]:
    """An UNMAP of ``vol`` that stays in flight (a hold must drain it) until the event is set: its work is held in
    the backend's I/O thread at fsutil.zero_range, a seam at the syscall, since the backend may be compiled (its
    methods cannot be replaced on an instance)."""
    unmapped = threading.Event()
    real = fsutil.zero_range

    def slow_zero_range(*args: Any, **kwargs: Any) -> None:
        unmapped.wait(10)
        real(*args, **kwargs)

    monkeypatch.setattr(fsutil, "zero_range", slow_zero_range)
    unmap = asyncio.create_task(vol.unmap([(0, 8)]))
    await asyncio.sleep(0.01)
    return unmap, unmapped


def test_an_abandoned_prepare_takes_nothing_and_writes_resume(tmp_path: Path) -> None:
    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        vols = [svc.volumes["l0"], svc.volumes["l1"]]
        held = await svc.prepare([("l0", "s"), ("l1", "s")], set_name="set")
        assert all(v.held for v in vols)
        write = asyncio.create_task(vols[0].write(0, b"\x44" * CS))
        await asyncio.sleep(0.01)
        assert not write.done()  # held
        await svc.abandon(held)
        await asyncio.wait_for(write, 5)
        assert not any(v.held for v in vols) and all(v.epochs == () for v in vols)
        assert svc.cat.list_snapshots() == []
        with pytest.raises(HoldTimeout):  # a commit after the abandon takes nothing either
            await svc.commit(held)
        recs, _ = await asyncio.wait_for(svc.create([("l0", "s"), ("l1", "s")], set_name="set"), 5)
        assert [r.full_name for r in recs] == ["l0@s", "l1@s"]

    with_array(tmp_path, 2, body)


def test_a_prepare_that_gets_no_commit_releases_by_itself(tmp_path: Path) -> None:
    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        svc.hold_timeout_s = 0.2
        vol = svc.volumes["l0"]
        held = await svc.prepare([("l0", "s")])
        write = asyncio.create_task(vol.write(0, b"\x55" * CS))
        await asyncio.wait_for(write, 5)  # the coordinator never came back: released after 0.2 s
        assert not vol.held and vol.epochs == () and svc.counters.hold_timeouts == 1
        with pytest.raises(HoldTimeout):
            await svc.commit(held)
        assert svc.cat.list_snapshots() == []
        (rec,), _ = await asyncio.wait_for(svc.create([("l0", "s")]), 5)
        assert rec.epoch in vol.epochs

    with_array(tmp_path, 1, body)


def test_cancelling_a_prepare_still_draining_releases_what_it_holds(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(array: Array) -> None:
        svc = array.snapshots
        assert svc is not None
        vol = svc.volumes["l0"]
        other = svc.volumes["l1"]
        unmap, unmapped = await unmap_in_flight(vol, monkeypatch)
        prepare = asyncio.create_task(svc.prepare([("l0", "s"), ("l1", "s")], set_name="set"))
        await asyncio.sleep(0.05)
        assert not prepare.done() and vol.held and other.held  # draining: the unmap is in flight
        prepare.cancel()
        with pytest.raises(asyncio.CancelledError):
            await prepare
        assert not vol.held and not other.held
        await asyncio.wait_for(other.write(0, b"\x66" * CS), 5)
        unmapped.set()
        await asyncio.wait_for(unmap, 5)
        recs, _ = await asyncio.wait_for(svc.create([("l0", "s"), ("l1", "s")], set_name="set"), 5)
        assert len(recs) == 2

    with_array(tmp_path, 2, body)
