"""Tests for lunsync.provider.vss: the recovery-set state machine, the requester workflow and the VSS provider
methods, against a fake engine whose LUNs and snapshots are real FileBackends in tmp_path."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from lunsync.provider.config import HookConfig
from lunsync.provider.vss import (
    CAPABILITIES,
    TRANSITIONS,
    Capability,
    Event,
    HardwareProvider,
    LunInformation,
    LunRef,
    LunStateFlag,
    MemoryStore,
    Options,
    RecoveryManager,
    RecoveryState,
    SnapshotRef,
    VssCode,
    VssError,
    lun_information,
    next_state,
)
from lunsync.snapshots.backend import FileBackend
from lunsync.snapshots.device import BlockDevice
from lunsync.snapshots.resync import ResyncVolume

T = TypeVar("T")
MiB = 1 << 20
CHUNK = 64 << 10


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def pattern(nbytes: int, seed: int) -> bytes:
    block = bytes((seed * 31 + i) % 251 + 1 for i in range(4096))
    return (block * (nbytes // 4096 + 1))[:nbytes]


class FakeEngine:
    """LUNs are files; a snapshot is a read-only copy of its origin's file taken at creation."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = str(root / "data")
        self._luns: dict[str, tuple[LunRef, FileBackend]] = {}
        self._snaps: dict[str, tuple[SnapshotRef, str]] = {}
        self.changed: dict[str, set[int]] = {}
        self.installed: dict[str, BlockDevice | None] = {}
        self.masks: dict[str, frozenset[str] | None] = {}
        self.mask_log: list[tuple[str, frozenset[str] | None]] = []
        self.grown: list[tuple[str, int]] = []
        self.free: int | None = None
        self.exposed: set[str] = set()
        self.identity_swaps: list[str] = []
        self._n = 0

    def _ident(self) -> tuple[str, str]:
        self._n += 1
        return f"6a5c51{self._n:026x}", f"SER{self._n:017d}"

    def add_lun(self, name: str, data: bytes) -> LunRef:
        path = self.root / f"{name}.img"
        path.write_bytes(data)
        naa, serial = self._ident()
        ref = LunRef(name, len(data), 512, naa, serial, CHUNK)
        self._luns[name] = (ref, FileBackend.open(path, 512))
        return ref

    def write_lun(self, name: str, offset: int, data: bytes) -> None:
        with open(self._luns[name][1].path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        snaps = [r for r, (s, _) in self._snaps.items() if s.origin == name]
        for r in snaps:
            self.changed.setdefault(r, set()).update(range(offset // CHUNK, (offset + len(data) - 1) // CHUNK + 1))

    def lun_bytes(self, name: str) -> bytes:
        return Path(self._luns[name][1].path).read_bytes()

    def take(self, lun: str, name: str) -> SnapshotRef:
        ref, dev = self._luns[lun]
        path = self.root / f"{lun}@{name}.snap"
        shutil.copyfile(dev.path, path)
        naa, serial = self._ident()
        snap = SnapshotRef(lun, name, ref.size_bytes, 512, CHUNK, naa, serial, self._n)
        self._snaps[snap.ref] = (snap, str(path))
        self.changed[snap.ref] = set()
        return snap

    # -- Engine --

    def lun(self, name: str) -> LunRef:
        if name not in self._luns:
            raise LookupError(name)
        return self._luns[name][0]

    def luns(self) -> Sequence[LunRef]:
        return [r for r, _ in self._luns.values()]

    def snapshot(self, ref: str) -> SnapshotRef:
        if ref not in self._snaps:
            raise LookupError(ref)
        return self._snaps[ref][0]

    def snapshots(self) -> Sequence[SnapshotRef]:
        return [s for s, _ in self._snaps.values()]

    async def snapshot_view(self, snap: SnapshotRef) -> BlockDevice:
        return FileBackend.open(self._snaps[snap.ref][1], 512, read_only=True)

    async def changed_chunks(self, snap: SnapshotRef) -> set[int] | None:
        return set(self.changed[snap.ref])

    async def allocated_chunks(self, snap: SnapshotRef) -> set[int] | None:
        return None

    def destination_device(self, name: str) -> BlockDevice:
        return self._luns[name][1]

    def install(self, name: str, device: BlockDevice | None) -> None:
        self.installed[name] = device

    def serving(self, name: str) -> BlockDevice:
        return self.installed.get(name) or self._luns[name][1]

    async def create_lun(self, name: str, size_bytes: int, block_size: int, *, like: SnapshotRef | None = None,
                         pool: str | None = None) -> LunRef:
        return self.add_lun(name, bytes(size_bytes))

    async def grow_lun(self, name: str, size_bytes: int) -> LunRef:
        ref, dev = self._luns[name]
        await dev.resize(size_bytes // 512)
        new = LunRef(name, size_bytes, 512, ref.naa, ref.serial, CHUNK)
        self._luns[name] = (new, dev)
        self.grown.append((name, size_bytes))
        return new

    def mask(self, name: str, allowed: frozenset[str] | None) -> None:
        self.masks[name] = allowed
        self.mask_log.append((name, allowed))

    async def create_snapshots(self, luns: Sequence[str], set_name: str) -> list[SnapshotRef]:
        return [self.take(lun, set_name) for lun in luns]

    async def delete_snapshot(self, ref: str) -> None:
        if ref not in self._snaps:
            raise LookupError(ref)
        del self._snaps[ref]

    async def expose_snapshot(self, ref: str) -> dict[str, Any]:
        self.exposed.add(ref)
        return {"target": "iqn.2026-11.io.lunsync:snaps", "lun": len(self.exposed) - 1}

    async def unexpose_snapshot(self, ref: str) -> None:
        self.exposed.discard(ref)

    async def swap_identity(self, ref: str) -> None:
        self.snapshot(ref)
        self.identity_swaps.append(ref)

    def baseline_latency_s(self, name: str) -> float | None:
        return None

    def free_bytes(self, name: str) -> int | None:
        return self.free


SIZE = 2 * MiB
A, B = pattern(SIZE, 1), pattern(SIZE, 2)


def setup(tmp_path: Path, **kw: Any) -> tuple[FakeEngine, RecoveryManager, MemoryStore]:
    eng = FakeEngine(tmp_path)
    eng.add_lun("db0", A)
    eng.take("db0", "s1")
    eng.write_lun("db0", 0, B[: 3 * CHUNK])  # three chunks changed since the snapshot
    store = MemoryStore()
    return eng, RecoveryManager(eng, store, commit_interval_s=0.0, **kw), store


# --- the state machine ---------------------------------------------------------------------------------------------


def test_transition_table_is_the_authority() -> None:
    assert next_state(RecoveryState.PENDING, Event.PRE_RESTORE) is RecoveryState.PRE_RESTORE
    assert next_state(RecoveryState.RESYNCING, Event.COMPLETE) is RecoveryState.DONE
    for terminal in (RecoveryState.DONE, RecoveryState.FAILED, RecoveryState.CANCELLED):
        assert not [k for k in TRANSITIONS if k[0] is terminal]
        with pytest.raises(VssError) as ei:
            next_state(terminal, Event.CANCEL)
        assert ei.value.code is VssCode.BAD_STATE
    with pytest.raises(VssError):
        next_state(RecoveryState.PENDING, Event.COMPLETE)


def test_requester_workflow_with_hooks_in_order_and_masking(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, store = setup(tmp_path)
        log = tmp_path / "hooks.log"
        mgr.hooks = {name: HookConfig(name, ("/bin/sh", "-c", cmd)) for name, cmd in (
            ("pre1", f"echo pre1 $LUNSYNC_RECOVERY_ID >> {log}"), ("pre2", f"echo pre2 >> {log}"),
            ("post1", f"echo post1 $LUNSYNC_RECOVERY_STATE >> {log}"))}
        opts = Options(pre_restore=("pre1", "pre2"), post_restore=("post1",),
                       mask_except=("iqn.2026-11.io.example:backup",))
        rs = mgr.create_set(opts)
        assert rs.state is RecoveryState.PENDING
        pair = mgr.add_pair(rs.id, "db0@s1")
        assert pair.destination == "db0"  # no destination: the snapshot's own origin
        await mgr.pre_restore(rs.id)
        assert rs.state is RecoveryState.PRE_RESTORE
        assert log.read_text().splitlines() == [f"pre1 {rs.id}", "pre2"]
        await mgr.recover(rs.id)
        assert rs.state is RecoveryState.RESYNCING
        vol = eng.installed["db0"]
        assert isinstance(vol, ResyncVolume)
        assert eng.masks["db0"] == frozenset({"iqn.2026-11.io.example:backup"})
        assert bytes(await vol.read(0, SIZE // 512)) == A  # the snapshot's contents at once
        assert mgr.status(rs.id)["bytes_total"] == 3 * CHUNK  # only what changed
        await asyncio.wait_for(mgr.wait(rs.id), 10)
        assert rs.state is RecoveryState.DONE
        assert eng.installed["db0"] is None and eng.masks["db0"] is None
        assert log.read_text().splitlines()[-1] == "post1 done"
        assert eng.lun_bytes("db0") == A
        st = mgr.status(rs.id)
        assert st["percent"] == 100.0 and st["bytes_copied"] == 3 * CHUNK and st["redirected_reads"] >= 1
        assert store.sets[rs.id]["state"] == "done"
        assert [h["phase"] for h in st["hooks"]] == ["pre-restore", "pre-restore", "post-restore"]
        assert [h["hook"] for h in st["hooks"]] == ["pre1", "pre2", "post1"]

    run(main())


def test_second_resync_of_a_destination_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, _ = setup(tmp_path)
        eng.add_lun("lab", bytes(SIZE))
        first = await mgr.resync([("db0@s1", "lab")], Options(rate_bps=256 << 10))
        with pytest.raises(VssError) as ei:
            await mgr.resync([("db0@s1", "lab")])
        assert ei.value.code is VssCode.RESYNC_IN_PROGRESS
        assert "VSS_E_RESYNC_IN_PROGRESS" in str(ei.value)
        await asyncio.sleep(0.4)
        await mgr.cancel(first.id)
        assert first.state is RecoveryState.CANCELLED and eng.installed["lab"] is None
        assert 0 < mgr.status(first.id)["bytes_done"] < SIZE
        again = await mgr.resync([("db0@s1", "lab")])  # the destination is free again
        await asyncio.wait_for(mgr.wait(again.id), 10)
        assert again.state is RecoveryState.DONE and eng.lun_bytes("lab") == A

    run(main())


def test_unknown_objects_are_vss_e_object_not_found(tmp_path: Path) -> None:
    async def main() -> None:
        _, mgr, _ = setup(tmp_path)
        with pytest.raises(VssError) as ei:
            await mgr.resync([("db0@nope", None)])
        assert ei.value.code is VssCode.OBJECT_NOT_FOUND
        with pytest.raises(VssError) as ei:
            mgr.get("missing")
        assert ei.value.code is VssCode.OBJECT_NOT_FOUND
        rs = mgr.create_set(Options(create_missing=False))
        with pytest.raises(VssError) as ei:
            mgr.add_pair(rs.id, "db0@s1", "nolun")
        assert ei.value.code is VssCode.OBJECT_NOT_FOUND

    run(main())


def test_failing_pre_restore_hook_vetoes(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, _ = setup(tmp_path)
        mgr.hooks = {"veto": HookConfig("veto", ("/bin/sh", "-c", "echo not now; exit 3"))}
        rs = mgr.create_set(Options(pre_restore=("veto",)))
        mgr.add_pair(rs.id, "db0@s1")
        with pytest.raises(VssError) as ei:
            await mgr.recover(rs.id)
        assert ei.value.code is VssCode.PROVIDER_VETO
        assert rs.state is RecoveryState.FAILED and "exited 3" in (rs.error or "")
        assert "not now" in (rs.error or "")  # the hook's own words reach whoever asked
        assert "db0" not in eng.installed  # nothing was started
        assert eng.lun_bytes("db0")[: 3 * CHUNK] == B[: 3 * CHUNK]

    run(main())


def test_a_restore_can_only_name_hooks_the_server_defines(tmp_path: Path) -> None:
    async def main() -> None:
        _, mgr, _ = setup(tmp_path)
        marker = tmp_path / "ran"
        mgr.hooks = {"quiesce": HookConfig("quiesce", ("/bin/touch", str(marker)), timeout_s=5)}
        for bad in (Options(pre_restore=(f"touch {marker}",)), Options(post_restore=("quiesce", "nope"))):
            with pytest.raises(VssError) as ei:
                mgr.create_set(bad)
            assert ei.value.code is VssCode.INVALID_ARG and "unknown hook" in str(ei.value)
            assert "quiesce" in str(ei.value)  # the message names what is defined
        with pytest.raises(VssError) as ei:
            await mgr.resync([("db0@s1", None)], Options(pre_restore=("rm -rf /",)))
        assert ei.value.code is VssCode.INVALID_ARG and not mgr.sets  # refused before any set exists
        assert not marker.exists()
        rs = await mgr.resync([("db0@s1", None)], Options(pre_restore=("quiesce",)))
        assert marker.exists()  # argv, no shell
        await asyncio.wait_for(mgr.wait(rs.id), 10)
        assert rs.state is RecoveryState.DONE

    run(main())


def test_a_hook_that_outlives_its_timeout_vetoes(tmp_path: Path) -> None:
    async def main() -> None:
        _, mgr, _ = setup(tmp_path)
        mgr.hooks = {"slow": HookConfig("slow", ("/bin/sleep", "30"), timeout_s=1)}
        rs = mgr.create_set(Options(pre_restore=("slow",)))
        mgr.add_pair(rs.id, "db0@s1")
        with pytest.raises(VssError) as ei:
            await mgr.pre_restore(rs.id)
        assert ei.value.code is VssCode.PROVIDER_VETO and "timed out after 1 s" in str(ei.value)

    run(main())


def test_insufficient_storage_to_grow(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, _ = setup(tmp_path)
        eng.add_lun("small", bytes(MiB))
        eng.free = 1024
        with pytest.raises(VssError) as ei:
            await mgr.resync([("db0@s1", "small")])
        assert ei.value.code is VssCode.INSUFFICIENT_STORAGE

    run(main())


def test_resync_to_a_new_lun_and_to_a_smaller_one(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, _ = setup(tmp_path)
        eng.add_lun("small", pattern(MiB, 9))
        rs = await mgr.resync([("db0@s1", "fresh"), ("db0@s1", "small")], Options(verify=True))
        assert [p.new_lun for p in rs.pairs] == [True, False]
        await asyncio.wait_for(mgr.wait(rs.id), 10)
        assert rs.state is RecoveryState.DONE, rs.error
        assert eng.grown == [("small", SIZE)]
        assert eng.lun_bytes("fresh") == A and eng.lun_bytes("small") == A
        assert all(p.verified for p in rs.pairs)
        # Not the origin: every region was pending, not just the changed ones.
        assert mgr.status(rs.id)["bytes_total"] == 2 * SIZE

    run(main())


def test_restart_resumes_a_resyncing_set(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, store = setup(tmp_path)
        eng.add_lun("lab", bytes(SIZE))
        rs = await mgr.resync([("db0@s1", "lab")], Options(rate_bps=512 << 10))
        await asyncio.sleep(0.5)
        await mgr.shutdown()
        assert store.sets[rs.id]["state"] == "resyncing"
        assert 0 < store.sets[rs.id]["pairs"][0]["bytes_done"] < SIZE
        again = RecoveryManager(eng, store, commit_interval_s=0.0)
        await again.load()
        resumed = again.get(rs.id)
        assert isinstance(eng.installed["lab"], ResyncVolume)
        resumed.options.rate_bps = None
        vol = eng.installed["lab"]
        assert isinstance(vol, ResyncVolume) and vol.bitmap.pending < SIZE // CHUNK  # not from scratch
        vol.throttle = __import__("lunsync.snapshots.resync", fromlist=["Unthrottled"]).Unthrottled()
        await asyncio.wait_for(again.wait(rs.id), 20)
        assert resumed.state is RecoveryState.DONE
        assert eng.lun_bytes("lab") == A

    run(main())


def test_restart_fails_a_set_not_yet_recovered_and_frees_its_destination(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, store = setup(tmp_path)
        eng.add_lun("lab", bytes(SIZE))
        waiting = mgr.create_set()
        mgr.add_pair(waiting.id, "db0@s1", "lab")  # a one-shot resync cut here was never answered
        masked = mgr.create_set()
        mgr.add_pair(masked.id, "db0@s1", "db0")
        await mgr.pre_restore(masked.id)
        again = RecoveryManager(eng, store, commit_interval_s=0.0)
        await again.load()
        for rs, during in ((waiting, "pending"), (masked, "pre-restore")):
            got = again.get(rs.id)
            assert got.state is RecoveryState.FAILED
            assert got.error == f"the daemon restarted during {during}"
            assert [p.state for p in got.pairs] == ["failed"]
        assert again.restoring("lab") is None and again.restoring("db0") is None
        assert store.sets[waiting.id]["state"] == "failed"

    run(main())


def test_dry_run_counts_only_changed_chunks_for_the_origin(tmp_path: Path) -> None:
    _, mgr, _ = setup(tmp_path)
    out = asyncio.run(mgr.dry_run([("db0@s1", None), ("db0@s1", "elsewhere")]))
    assert out["pairs"][0]["bytes"] == 3 * CHUNK and out["pairs"][0]["only_changed"]
    assert out["pairs"][1]["bytes"] == SIZE and out["pairs"][1]["new_lun"]
    assert out["bytes"] == 3 * CHUNK + SIZE


def test_swap_is_refused_during_a_resync_and_uses_the_snapshot_up(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, _ = setup(tmp_path)
        eng.add_lun("lab", bytes(SIZE))
        busy = await mgr.resync([("db0@s1", "db0")], Options(rate_bps=64 << 10))
        with pytest.raises(VssError) as ei:
            await mgr.swap("db0@s1", "keep")
        assert ei.value.code is VssCode.RESYNC_IN_PROGRESS
        await mgr.cancel(busy.id)
        with pytest.raises(VssError):
            await mgr.swap("db0@s1", "other")
        rs = await mgr.swap("db0@s1", "snapshot")
        assert eng.identity_swaps == ["db0@s1"]
        vol = eng.installed["db0"]
        assert isinstance(vol, ResyncVolume)
        assert bytes(await vol.read(0, SIZE // 512)) == A  # the snapshot is the LUN at once
        await asyncio.wait_for(mgr.wait(rs.id), 10)
        assert rs.state is RecoveryState.DONE and eng.lun_bytes("db0") == A
        with pytest.raises(LookupError):
            eng.snapshot("db0@s1")  # used up
        with pytest.raises(VssError) as ei:
            await mgr.swap("db0@s1", "keep")
        assert ei.value.code is VssCode.OBJECT_NOT_FOUND

    run(main())


# --- the provider methods ------------------------------------------------------------------------------------------


def test_lun_information_round_trip_and_matching() -> None:
    info = lun_information("6a5c51" + "0" * 25 + "1", "SERIAL1")
    d = info.as_dict()
    assert d["vendor_id"] == "LUNSYNC" and d["serial_number"] == "SERIAL1"
    assert d["device_id_descriptor"]["identifiers"][0] == {"code_set": 1, "type": 3, "association": 0,
                                                           "identifier": "6a5c51" + "0" * 25 + "1"}
    back = LunInformation.from_dict(d)
    assert back == info and back.matches("6A5C51" + "0" * 25 + "1", "other")
    assert not back.matches("6a5c51" + "0" * 25 + "2", "SERIAL1")  # the descriptor decides when present
    assert LunInformation(serial_number="SERIAL1").matches("ff" * 16, "SERIAL1")
    with pytest.raises(VssError):
        LunInformation.from_dict({"device_id_descriptor": {"identifiers": [{"identifier": "zz"}]}})


def test_capabilities() -> None:
    eng_caps = HardwareProvider.__new__(HardwareProvider).get_provider_capabilities()
    assert eng_caps["mask"] == int(CAPABILITIES)
    assert Capability.LUN_RESYNC in CAPABILITIES and Capability.LUN_REPOINT in CAPABILITIES
    assert eng_caps["mask"] & 0x8 and eng_caps["mask"] & 0x4
    assert "VSS_PRV_CAPABILITY_LUN_RESYNC" in eng_caps["capabilities"]


def test_snapshot_set_methods_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, _ = setup(tmp_path)
        prov = HardwareProvider(eng, mgr)
        db0 = eng.lun("db0").info
        assert prov.are_luns_supported([db0])["supported"]
        assert not prov.are_luns_supported([db0, lun_information("ff" * 16, "X")])["supported"]
        assert prov.fill_in_lun_info(LunInformation(serial_number=eng.lun("db0").serial))["name"] == "db0"
        prov.begin_prepare_snapshot("set1", "snapA", [db0])
        with pytest.raises(VssError) as ei:
            await prov.commit_snapshots("set1")  # not prepared yet
        assert ei.value.code is VssCode.BAD_STATE
        prov.end_prepare_snapshots("set1")
        prov.pre_commit_snapshots("set1")
        out = await prov.commit_snapshots("set1")
        assert out["snapshots"] == ["db0@vss-set1"]
        assert prov.post_commit_snapshots("set1", 1)["state"] == "committed"
        targets = prov.get_target_luns([db0], "set1")["luns"]
        snap_info = LunInformation.from_dict(targets[0]["target"])
        assert snap_info.naa == eng.snapshot("db0@vss-set1").naa
        located = await prov.locate_luns([snap_info])
        assert located["luns"][0]["snapshot"] == "db0@vss-set1" and "db0@vss-set1" in eng.exposed
        await prov.abort_snapshots("set1")
        with pytest.raises(LookupError):
            eng.snapshot("db0@vss-set1")
        with pytest.raises(VssError) as ei:
            prov.end_prepare_snapshots("unknown")
        assert ei.value.code is VssCode.OBJECT_NOT_FOUND

    run(main())


def test_on_lun_state_change_flags(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, _ = setup(tmp_path)
        prov = HardwareProvider(eng, mgr)
        snap = eng.snapshot("db0@s1").info
        orig = eng.lun("db0").info
        out = await prov.on_lun_state_change([snap], [orig], int(LunStateFlag.NOTIFY_READ_WRITE))
        assert out["flag_names"] == ["NOTIFY_READ_WRITE"] and "db0@s1" in prov.read_write
        await prov.on_lun_state_change([snap], [orig], int(LunStateFlag.NOTIFY_LUN_PRE_RECOVERY
                                                          | LunStateFlag.DO_MASK_LUNS))
        assert eng.masks["db0"] == frozenset() and "db0" in prov.recovering
        await prov.on_lun_state_change([snap], [orig], int(LunStateFlag.NOTIFY_LUN_POST_RECOVERY))
        assert eng.masks["db0"] is None and "db0" not in prov.recovering
        with pytest.raises(VssError) as ei:
            await prov.on_lun_state_change([snap], [orig], 0x1)
        assert ei.value.code is VssCode.INVALID_ARG

    run(main())


def test_resync_luns_returns_an_async_handle_and_reuse_frees(tmp_path: Path) -> None:
    async def main() -> None:
        eng, mgr, _ = setup(tmp_path)
        prov = HardwareProvider(eng, mgr)
        snap = eng.snapshot("db0@s1").info
        handle = await prov.resync_luns([snap], [eng.lun("db0").info])
        assert handle["query"] == f"/v1/recovery/{handle['id']}" and handle["cancel"].endswith("/cancel")
        await asyncio.wait_for(mgr.wait(handle["id"]), 10)
        assert mgr.get(handle["id"]).state is RecoveryState.DONE and eng.lun_bytes("db0") == A
        with pytest.raises(VssError) as ei:
            await prov.resync_luns([snap], [])
        assert ei.value.code is VssCode.INVALID_ARG
        out = await prov.on_reuse_luns([snap], [eng.lun("db0").info])
        assert out["reused"] == ["db0@s1"]
        with pytest.raises(VssError) as ei:
            await prov.on_lun_empty(snap)
        assert ei.value.code is VssCode.OBJECT_NOT_FOUND

    run(main())
