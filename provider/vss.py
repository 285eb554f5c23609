"""The VSS-shaped hardware provider: recovery sets, ResyncLuns, LUN swap, and the IVssHardwareSnapshotProvider(Ex)
methods as operations.

This module owns the recovery-set state machine (one table, :data:`TRANSITIONS`; a missing entry is a
``VSS_E_BAD_STATE``), the requester workflow that diskshadow and vshadow drive (create a set, add pairs, pre-restore,
RecoverSet, status, post-restore, cancel), the named pre/post-restore hooks of the server's hook file, masking the destinations during the
restore, the rule of one resync per destination (``VSS_E_RESYNC_IN_PROGRESS``), the VSS error names, and the JSON form
of ``VDS_LUN_INFORMATION`` by which VSS names LUNs. It drives :class:`~lunsync.snapshots.resync.ResyncVolume` through
an :class:`Engine`: the daemon's adapter over the live array and the snapshot engine (``provider/resync_array.py``),
or a fake in tests. It knows nothing of HTTP; ``provider/api_provider.py`` maps it onto REST.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lunsync.provider.config import HookConfig
from lunsync.snapshots.device import BlockDevice
from lunsync.snapshots.errors import OutOfSpace
from lunsync.snapshots.resync import (
    AdaptiveThrottle,
    FixedRate,
    LatencyMonitor,
    ResyncProgress,
    ResyncState,
    ResyncVolume,
    Throttle,
)

log = logging.getLogger("lunsync.vss")

MiB = 1 << 20


# --- errors ------------------------------------------------------------------------------------------------------


class VssCode(enum.Enum):
    """The VSS HRESULTs lunsync reports, with the HTTP status the API gives each (4xx: the request, not lunsync)."""

    OBJECT_NOT_FOUND = ("VSS_E_OBJECT_NOT_FOUND", 0x80042308, 404)
    PROVIDER_VETO = ("VSS_E_PROVIDER_VETO", 0x80042306, 409)
    INSUFFICIENT_STORAGE = ("VSS_E_INSUFFICIENT_STORAGE", 0x8004231F, 409)
    RESYNC_IN_PROGRESS = ("VSS_E_RESYNC_IN_PROGRESS", 0x800423FF, 409)
    BAD_STATE = ("VSS_E_BAD_STATE", 0x80042301, 409)
    INVALID_ARG = ("E_INVALIDARG", 0x80070057, 400)

    @property
    def vss_name(self) -> str:
        return self.value[0]

    @property
    def hresult(self) -> int:
        return self.value[1]

    @property
    def http_status(self) -> int:
        return self.value[2]


class VssError(Exception):
    """A provider operation refused with a VSS error code."""

    def __init__(self, code: VssCode, message: str) -> None:
        super().__init__(f"{code.vss_name}: {message}")
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, Any]:
        return {"error": str(self), "code": self.code.vss_name, "hresult": f"0x{self.code.hresult:08X}"}


# --- LUN naming: VDS_LUN_INFORMATION -----------------------------------------------------------------------------

# VDS_STORAGE_IDENTIFIER_CODE_SET / _TYPE / _ASSOCIATION values (vds.h), which are SPC-4's VPD 0x83 fields.
CODE_SET_BINARY, CODE_SET_ASCII = 1, 2
ID_TYPE_VENDOR_SPECIFIC, ID_TYPE_T10, ID_TYPE_EUI64, ID_TYPE_NAA = 0, 1, 2, 3
ASSOC_DEVICE = 0
VDS_BUS_TYPE_ISCSI = 9  # VDSBusTypeiScsi


@dataclass(frozen=True, slots=True)
class StorageIdentifier:
    """One VDS_STORAGE_IDENTIFIER: a VPD 0x83 designation descriptor."""

    code_set: int
    type: int
    association: int
    identifier: bytes

    def as_dict(self) -> dict[str, Any]:
        return {"code_set": self.code_set, "type": self.type, "association": self.association,
                "identifier": self.identifier.hex()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StorageIdentifier:
        ident = d.get("identifier", "")
        try:
            raw = bytes.fromhex(ident) if int(d.get("code_set", CODE_SET_BINARY)) == CODE_SET_BINARY \
                else str(ident).encode("ascii")
        except (ValueError, UnicodeEncodeError) as e:
            raise VssError(VssCode.INVALID_ARG, f"bad device-id descriptor {ident!r}: {e}") from None
        return cls(int(d.get("code_set", CODE_SET_BINARY)), int(d.get("type", ID_TYPE_NAA)),
                   int(d.get("association", ASSOC_DEVICE)), raw)


@dataclass(frozen=True, slots=True)
class LunInformation:
    """The JSON form of VDS_LUN_INFORMATION: INQUIRY's vendor/product/revision, VPD 0x80's serial, and VPD 0x83's
    device-ID descriptors. VSS hands these to a provider and expects them back for snapshot LUNs."""

    vendor_id: str = ""
    product_id: str = ""
    product_revision: str = ""
    serial_number: str = ""
    identifiers: tuple[StorageIdentifier, ...] = ()
    device_type: int = 0  # direct-access block device
    bus_type: int = VDS_BUS_TYPE_ISCSI
    command_queueing: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": 1, "device_type": self.device_type, "device_type_modifier": 0,
            "command_queueing": self.command_queueing, "bus_type": self.bus_type, "vendor_id": self.vendor_id,
            "product_id": self.product_id, "product_revision": self.product_revision,
            "serial_number": self.serial_number,
            "device_id_descriptor": {"version": 1, "identifiers": [i.as_dict() for i in self.identifiers]},
            "interconnects": [],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LunInformation:
        if not isinstance(d, dict):
            raise VssError(VssCode.INVALID_ARG, "a LUN is named by a VDS_LUN_INFORMATION object")
        desc = d.get("device_id_descriptor") or {}
        ids = tuple(StorageIdentifier.from_dict(x) for x in (desc.get("identifiers") or []))
        return cls(vendor_id=str(d.get("vendor_id", "")), product_id=str(d.get("product_id", "")),
                   product_revision=str(d.get("product_revision", "")),
                   serial_number=str(d.get("serial_number", "")), identifiers=ids)

    @property
    def naa(self) -> str | None:
        for i in self.identifiers:
            if i.type == ID_TYPE_NAA and i.code_set == CODE_SET_BINARY and i.association == ASSOC_DEVICE:
                return i.identifier.hex()
        return None

    def matches(self, naa: str, serial: str) -> bool:
        """VSS's rule: the device-ID descriptor decides when present; the serial number otherwise."""
        mine = self.naa
        if mine is not None:
            return mine.lower() == naa.lower()
        return bool(self.serial_number) and self.serial_number.strip() == serial.strip()


def lun_information(naa: str, serial: str, *, vendor: str = "LUNSYNC", product: str = "VIRTUAL-DISK",
                    revision: str = "0001") -> LunInformation:
    """What lunsync's INQUIRY and VPD pages say about a LUN with this identity."""
    return LunInformation(vendor_id=vendor, product_id=product, product_revision=revision, serial_number=serial,
                          identifiers=(StorageIdentifier(CODE_SET_BINARY, ID_TYPE_NAA, ASSOC_DEVICE,
                                                         bytes.fromhex(naa)),))


# --- what the provider needs from the array ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LunRef:
    """A LUN as the engine describes it."""

    name: str
    size_bytes: int
    block_size: int
    naa: str
    serial: str
    chunk_size_bytes: int = 64 << 10

    @property
    def info(self) -> LunInformation:
        return lun_information(self.naa, self.serial)


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A snapshot as the engine describes it: ``origin@name``, its geometry and its own (exposed) identity."""

    origin: str
    name: str
    size_bytes: int
    block_size: int
    chunk_size_bytes: int
    naa: str
    serial: str
    id: int = 0

    @property
    def ref(self) -> str:
        return f"{self.origin}@{self.name}"

    @property
    def info(self) -> LunInformation:
        return lun_information(self.naa, self.serial)


class Engine(Protocol):
    """The array, as the provider uses it. Every method raises ``LookupError`` for an unknown name."""

    data_dir: str

    def lun(self, name: str) -> LunRef: ...

    def luns(self) -> Sequence[LunRef]: ...

    def snapshot(self, ref: str) -> SnapshotRef: ...

    def snapshots(self) -> Sequence[SnapshotRef]: ...

    async def snapshot_view(self, snap: SnapshotRef) -> BlockDevice:
        """A read-only device of the snapshot. Awaited: a store's own snapshot (RBD) is opened over the network."""
        ...

    async def changed_chunks(self, snap: SnapshotRef) -> set[int] | None:
        """Chunks of the snapshot's origin changed since it was taken, or None when unknown. Awaited: a store may
        have to be asked (RBD's diff_iterate walks the image)."""
        ...

    async def allocated_chunks(self, snap: SnapshotRef) -> set[int] | None:
        """Chunks of the snapshot that may hold data (the rest reads as zeros), or None when unknown: what a restore
        into a LUN it has just created, empty, has to copy. Awaited, as :meth:`changed_chunks`."""
        ...

    def destination_device(self, name: str) -> BlockDevice:
        """The LUN's own device (with copy-on-write when it has snapshots): what a resync writes."""
        ...

    def install(self, name: str, device: BlockDevice | None) -> None:
        """Serve ``device`` as the LUN from now on (None: its own device again)."""
        ...

    async def create_lun(self, name: str, size_bytes: int, block_size: int, *, like: SnapshotRef | None = None,
                         pool: str | None = None) -> LunRef:
        """A new LUN for a restore to fill, made on the same kind of store as snapshot ``like`` when given (an RBD
        snapshot's: a new image in ``pool``, default the snapshot's own pool)."""
        ...

    async def grow_lun(self, name: str, size_bytes: int) -> LunRef:
        """Grow live; sessions get CAPACITY DATA HAS CHANGED."""
        ...

    def mask(self, name: str, allowed: frozenset[str] | None) -> None:
        """Hide the LUN from every initiator but ``allowed`` (None: unmask)."""
        ...

    async def create_snapshots(self, luns: Sequence[str], set_name: str) -> list[SnapshotRef]: ...

    async def delete_snapshot(self, ref: str) -> None: ...

    async def expose_snapshot(self, ref: str) -> dict[str, Any]: ...

    async def unexpose_snapshot(self, ref: str) -> None: ...

    async def swap_identity(self, ref: str) -> None:
        """Give the snapshot's origin the snapshot's identity (VPD 0x80/0x83) and the snapshot the origin's, so
        hosts that imported the snapshot see their disk (BreakSnapshotSetEx without identity revert)."""
        ...

    def baseline_latency_s(self, name: str) -> float | None: ...

    def free_bytes(self, name: str) -> int | None:
        """Room left where the LUN's backing file lives (None: unknown or a block device)."""
        ...


# --- recovery sets -----------------------------------------------------------------------------------------------


class RecoveryState(enum.StrEnum):
    PENDING = "pending"
    PRE_RESTORE = "pre-restore"
    RESYNCING = "resyncing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Event(enum.StrEnum):
    ADD_PAIR = "add-pair"
    PRE_RESTORE = "pre-restore"
    RECOVER = "recover"
    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"


S, E = RecoveryState, Event
# Every legal move of a recovery set. A (state, event) that is not here is VSS_E_BAD_STATE.
TRANSITIONS: dict[tuple[RecoveryState, Event], RecoveryState] = {
    (S.PENDING, E.ADD_PAIR): S.PENDING,
    (S.PENDING, E.PRE_RESTORE): S.PRE_RESTORE,
    (S.PENDING, E.CANCEL): S.CANCELLED,
    (S.PENDING, E.FAIL): S.FAILED,
    (S.PRE_RESTORE, E.RECOVER): S.RESYNCING,
    (S.PRE_RESTORE, E.CANCEL): S.CANCELLED,
    (S.PRE_RESTORE, E.FAIL): S.FAILED,
    (S.RESYNCING, E.COMPLETE): S.DONE,
    (S.RESYNCING, E.FAIL): S.FAILED,
    (S.RESYNCING, E.CANCEL): S.CANCELLED,
}
TERMINAL = frozenset({S.DONE, S.FAILED, S.CANCELLED})


def next_state(state: RecoveryState, event: Event) -> RecoveryState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise VssError(VssCode.BAD_STATE, f"cannot {event.value} a recovery set that is {state.value}") from None


@dataclass
class Pair:
    """One (snapshot, destination) of a recovery set, with its progress as last committed."""

    snapshot: str  # LUN@SNAP
    destination: str  # LUN name; the snapshot's origin when not given
    new_lun: bool = False  # the destination was created for this restore
    state: str = "pending"  # pending, resyncing, done, failed, cancelled
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_copied: int = 0
    redirected_reads: int = 0
    verified: bool | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "destination": self.destination, "new_lun": self.new_lun,
                "state": self.state, "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "bytes_copied": self.bytes_copied, "redirected_reads": self.redirected_reads,
                "verified": self.verified, "error": self.error}


@dataclass
class Options:
    """How a recovery set restores: throttle, verification, hooks and masking."""

    rate_bps: float | None = None  # None: adaptive throttle
    verify: bool = False
    pre_restore: tuple[str, ...] = ()  # names of hooks the server's hook file defines, run in order
    post_restore: tuple[str, ...] = ()
    mask_except: tuple[str, ...] | None = None  # mask destinations from every initiator but these during the restore
    create_missing: bool = True  # a destination that does not exist is created at the snapshot's size
    consume_snapshot: bool = False  # a swap: the snapshot is deleted once its contents are the LUN's
    pool: str | None = None  # new destinations of RBD snapshots: images in this pool (None: the snapshot's own)

    def as_dict(self) -> dict[str, Any]:
        return {"rate_bps": self.rate_bps, "verify": self.verify, "pre_restore": list(self.pre_restore),
                "post_restore": list(self.post_restore),
                "mask_except": None if self.mask_except is None else list(self.mask_except),
                "create_missing": self.create_missing, "consume_snapshot": self.consume_snapshot, "pool": self.pool}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Options:
        m = d.get("mask_except")
        return cls(rate_bps=d.get("rate_bps"), verify=bool(d.get("verify", False)),
                   pre_restore=tuple(d.get("pre_restore") or ()), post_restore=tuple(d.get("post_restore") or ()),
                   mask_except=None if m is None else tuple(m), create_missing=bool(d.get("create_missing", True)),
                   consume_snapshot=bool(d.get("consume_snapshot", False)), pool=d.get("pool"))


@dataclass
class RecoverySet:
    id: str
    state: RecoveryState = RecoveryState.PENDING
    pairs: list[Pair] = field(default_factory=list)
    options: Options = field(default_factory=Options)
    error: str | None = None
    hooks_run: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None


# --- persistence -------------------------------------------------------------------------------------------------


class RecoveryStore(Protocol):
    """Where recovery sets survive a restart (the catalog in the daemon, a dict in tests)."""

    def save(self, rs: RecoverySet) -> None: ...

    def load_all(self) -> list[RecoverySet]: ...


class MemoryStore:
    def __init__(self) -> None:
        self.sets: dict[str, dict[str, Any]] = {}
        self.saves = 0

    def save(self, rs: RecoverySet) -> None:
        self.saves += 1
        self.sets[rs.id] = to_record(rs)

    def load_all(self) -> list[RecoverySet]:
        return [from_record(r) for r in self.sets.values()]


def to_record(rs: RecoverySet) -> dict[str, Any]:
    return {"id": rs.id, "state": rs.state.value, "pairs": [p.as_dict() for p in rs.pairs],
            "options": rs.options.as_dict(), "error": rs.error, "hooks_run": rs.hooks_run,
            "created_at": rs.created_at, "updated_at": rs.updated_at, "started_at": rs.started_at,
            "finished_at": rs.finished_at}


def from_record(r: dict[str, Any]) -> RecoverySet:
    pairs = [Pair(**{k: v for k, v in p.items() if k in Pair.__dataclass_fields__}) for p in r.get("pairs", [])]
    return RecoverySet(id=r["id"], state=RecoveryState(r["state"]), pairs=pairs,
                       options=Options.from_dict(r.get("options") or {}), error=r.get("error"),
                       hooks_run=list(r.get("hooks_run") or []), created_at=r.get("created_at", 0.0),
                       updated_at=r.get("updated_at", 0.0), started_at=r.get("started_at"),
                       finished_at=r.get("finished_at"))


# --- the manager -------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    pair: Pair
    volume: ResyncVolume
    snapshot: SnapshotRef


class RecoveryManager:
    """Runs recovery sets against an :class:`Engine`. All methods run on the daemon's loop."""

    def __init__(self, engine: Engine, store: RecoveryStore, *, clock: Callable[[], float] = time.time,
                 batch_bytes: int | None = None, commit_interval_s: float | None = None,
                 hooks: Mapping[str, HookConfig] | None = None) -> None:
        self.engine = engine
        self.store = store
        self.hooks: Mapping[str, HookConfig] = hooks or {}  # from the server's hook file (serve --hooks), never the API
        self._clock = clock
        self.sets: dict[str, RecoverySet] = {}
        self._jobs: dict[str, list[_Job]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._busy: dict[str, str] = {}  # destination LUN -> recovery set resyncing it
        self._changed: dict[str, asyncio.Event] = {}
        self._batch_bytes = batch_bytes
        self._commit_interval_s = commit_interval_s
        self._last_persist: dict[str, float] = {}

    # -- bookkeeping --

    def _save(self, rs: RecoverySet) -> None:
        rs.updated_at = self._clock()
        self.store.save(rs)
        ev = self._changed.get(rs.id)
        if ev is not None:
            ev.set()

    def _move(self, rs: RecoverySet, event: Event, error: str | None = None) -> None:
        rs.state = next_state(rs.state, event)
        if error is not None:
            rs.error = error
        if rs.state in TERMINAL:
            rs.finished_at = self._clock()
            for p in rs.pairs:
                if p.state in ("pending", "resyncing"):
                    p.state = rs.state.value if rs.state is not RecoveryState.DONE else "done"
        self._save(rs)
        log.info("recovery %s: %s", rs.id, rs.state.value)

    def reading(self, snapshot: str) -> RecoverySet | None:
        """The unfinished recovery set that restores from ``snapshot`` (``lun@name``), if any: it must stay."""
        return self._unfinished(lambda p: p.snapshot == snapshot)

    def restoring(self, lun: str) -> RecoverySet | None:
        """The unfinished recovery set that restores into ``lun``, if any: the LUN must stay."""
        return self._unfinished(lambda p: p.destination == lun)

    def _unfinished(self, involves: Callable[[Pair], bool]) -> RecoverySet | None:
        for rs in self.sets.values():
            if rs.state not in TERMINAL and any(involves(p) for p in rs.pairs):
                return rs
        return None

    def get(self, set_id: str) -> RecoverySet:
        rs = self.sets.get(set_id)
        if rs is None:
            raise VssError(VssCode.OBJECT_NOT_FOUND, f"no recovery set {set_id}")
        return rs

    def list_sets(self) -> list[RecoverySet]:
        return sorted(self.sets.values(), key=lambda r: r.created_at)

    def bitmap_path(self, set_id: str, destination: str) -> str:
        return os.path.join(self.engine.data_dir, "resync", f"{set_id}-{destination}.bitmap")

    # -- the requester workflow --

    def check_hooks(self, options: Options) -> None:
        """Refuse a restore that names a hook the server does not define, before anything is created."""
        for name in (*options.pre_restore, *options.post_restore):
            if name not in self.hooks:
                defined = ", ".join(sorted(self.hooks)) or "none (see lunsync serve --hooks)"
                raise VssError(VssCode.INVALID_ARG, f"unknown hook {name!r}: the server defines {defined}")

    def create_set(self, options: Options | None = None, *, set_id: str | None = None) -> RecoverySet:
        """A new, empty set; ``set_id`` is given by the control for its part of a set across workers."""
        self.check_hooks(options or Options())
        if set_id is not None and set_id in self.sets:
            raise VssError(VssCode.INVALID_ARG, f"recovery set {set_id} already exists")
        rs = RecoverySet(id=set_id or uuid.uuid4().hex[:12], options=options or Options(), created_at=self._clock())
        self.sets[rs.id] = rs
        self._save(rs)
        return rs

    def _snapshot(self, ref: str) -> SnapshotRef:
        try:
            return self.engine.snapshot(ref)
        except LookupError as e:
            raise VssError(VssCode.OBJECT_NOT_FOUND, f"no snapshot {ref}: {e}") from None

    def add_pair(self, set_id: str, snapshot: str, destination: str | None = None) -> Pair:
        rs = self.get(set_id)
        next_state(rs.state, Event.ADD_PAIR)
        snap = self._snapshot(snapshot)
        dest = destination or snap.origin
        if any(p.destination == dest for p in rs.pairs):
            raise VssError(VssCode.INVALID_ARG, f"{dest} is already a destination in recovery set {set_id}")
        new = False
        try:
            lun = self.engine.lun(dest)
            if lun.block_size != snap.block_size:
                raise VssError(VssCode.PROVIDER_VETO, f"{dest} has {lun.block_size}-byte blocks, {snap.ref} "
                                                      f"{snap.block_size}-byte blocks")
        except LookupError:
            if not rs.options.create_missing:
                raise VssError(VssCode.OBJECT_NOT_FOUND, f"no LUN {dest}") from None
            new = True
        pair = Pair(snapshot=snap.ref, destination=dest, new_lun=new)
        rs.pairs.append(pair)
        self._move(rs, Event.ADD_PAIR)
        return pair

    async def _run_hooks(self, rs: RecoverySet, phase: str, names: Iterable[str]) -> None:
        """Run the named hooks in order, each its argv with no shell, the recovery set in its environment."""
        env = {**os.environ, "LUNSYNC_RECOVERY_ID": rs.id, "LUNSYNC_RECOVERY_PHASE": phase,
               "LUNSYNC_RECOVERY_STATE": rs.state.value,
               "LUNSYNC_DESTINATIONS": " ".join(p.destination for p in rs.pairs),
               "LUNSYNC_SNAPSHOTS": " ".join(p.snapshot for p in rs.pairs)}
        for name in names:
            started = self._clock()
            hook = self.hooks.get(name)
            if hook is None:  # a set recorded before the hook file changed
                out, rc = b"not defined in the server's hook file", -1
            else:
                try:
                    proc = await asyncio.create_subprocess_exec(*hook.command, env=env,
                                                                stdin=asyncio.subprocess.DEVNULL,
                                                                stdout=asyncio.subprocess.PIPE,
                                                                stderr=asyncio.subprocess.STDOUT)
                except OSError as e:
                    out, rc = str(e).encode(), -1
                else:
                    try:
                        out, _ = await asyncio.wait_for(proc.communicate(), hook.timeout_s)
                        rc = -1 if proc.returncode is None else proc.returncode
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
                        out, rc = f"timed out after {hook.timeout_s} s".encode(), -1
            rs.hooks_run.append({"phase": phase, "hook": name, "exit": rc, "started_at": started,
                                 "output": out.decode(errors="replace")[-2000:]})
            self._save(rs)
            if rc != 0:
                raise VssError(VssCode.PROVIDER_VETO, f"{phase} hook {name!r} exited {rc}: "
                                                      f"{out.decode(errors='replace').strip()[-200:]}")

    async def pre_restore(self, set_id: str) -> RecoverySet:
        """PreRestore: check every pair can be restored, run the pre-restore hooks in order, mask destinations."""
        rs = self.get(set_id)
        next_state(rs.state, Event.PRE_RESTORE)
        if not rs.pairs:
            raise VssError(VssCode.INVALID_ARG, f"recovery set {set_id} has no pairs")
        for p in rs.pairs:
            owner = self._busy.get(p.destination)
            if owner is not None and owner != rs.id:
                raise VssError(VssCode.RESYNC_IN_PROGRESS, f"{p.destination} is being resynced by recovery set "
                                                           f"{owner}")
            self._check_storage(p)
        self._move(rs, Event.PRE_RESTORE)
        try:
            await self._run_hooks(rs, "pre-restore", rs.options.pre_restore)
        except VssError as e:
            self._move(rs, Event.FAIL, str(e))
            raise
        return rs

    def _check_storage(self, p: Pair) -> None:
        snap = self._snapshot(p.snapshot)
        try:
            have = self.engine.lun(p.destination).size_bytes
        except LookupError:
            have = 0
        grow = max(0, snap.size_bytes - have)
        free = self.engine.free_bytes(p.destination)
        if grow and free is not None and free < grow:
            raise VssError(VssCode.INSUFFICIENT_STORAGE, f"{p.destination} must grow by {grow} bytes; "
                                                         f"{free} are free")

    async def recover(self, set_id: str) -> RecoverySet:
        """RecoverSet: start one resync per pair. When this returns every destination serves its snapshot."""
        rs = self.get(set_id)
        t0 = time.perf_counter()
        if rs.state is RecoveryState.PENDING:
            await self.pre_restore(set_id)
        t_pre = time.perf_counter()
        next_state(rs.state, Event.RECOVER)
        for p in rs.pairs:
            owner = self._busy.get(p.destination)
            if owner is not None and owner != rs.id:
                raise VssError(VssCode.RESYNC_IN_PROGRESS, f"{p.destination} is being resynced by recovery set "
                                                           f"{owner}")
        for p in rs.pairs:
            self._busy[p.destination] = rs.id
        rs.started_at = self._clock()
        self._move(rs, Event.RECOVER)
        jobs: list[_Job] = []
        try:
            for p in rs.pairs:
                jobs.append(await self._start_pair(rs, p, resume=False))
        except Exception as e:
            for j in jobs:
                await j.volume.cancel()
                self.engine.install(j.pair.destination, None)
            self._release(rs)
            self._move(rs, Event.FAIL, str(e))
            if isinstance(e, VssError):
                raise
            if isinstance(e, (OSError, OutOfSpace)):
                raise VssError(VssCode.INSUFFICIENT_STORAGE, str(e)) from e
            raise VssError(VssCode.PROVIDER_VETO, str(e)) from e
        self._jobs[rs.id] = jobs
        t_live = time.perf_counter()
        self._save(rs)
        self._watchers[rs.id] = asyncio.get_running_loop().create_task(self._watch(rs), name=f"recovery-{rs.id}")
        log.info("recovery %s: destinations serve their snapshots %.1f ms after RecoverSet (pre-restore %.1f ms)",
                 rs.id, (t_live - t0) * 1000, (t_pre - t0) * 1000)
        return rs

    def _throttle(self, rs: RecoverySet, monitor: LatencyMonitor) -> Throttle:
        if rs.options.rate_bps:
            return FixedRate(rs.options.rate_bps)
        return AdaptiveThrottle(monitor)

    async def _start_pair(self, rs: RecoverySet, p: Pair, *, resume: bool) -> _Job:
        snap = self._snapshot(p.snapshot)
        if p.new_lun:
            try:
                self.engine.lun(p.destination)
            except LookupError:
                await self.engine.create_lun(p.destination, snap.size_bytes, snap.block_size, like=snap,
                                             pool=rs.options.pool)
        lun = self.engine.lun(p.destination)
        if lun.size_bytes < snap.size_bytes:
            lun = await self.engine.grow_lun(p.destination, snap.size_bytes)
        if rs.options.mask_except is not None:
            self.engine.mask(p.destination, frozenset(x.lower() for x in rs.options.mask_except))
        pending = None
        if p.destination == snap.origin and not p.new_lun:
            # Regions are the snapshot's chunks, so the changed chunks are the pending regions as they are.
            pending = await self.engine.changed_chunks(snap)
        elif p.new_lun:
            # Created empty for this restore (a resume finds its bitmap instead): what reads as zeros in the
            # snapshot already reads so here.
            pending = await self.engine.allocated_chunks(snap)
        source = await self.engine.snapshot_view(snap)
        dest = self.engine.destination_device(p.destination)
        kwargs: dict[str, Any] = {}
        if self._batch_bytes is not None:
            kwargs["batch_bytes"] = self._batch_bytes
        if self._commit_interval_s is not None:
            kwargs["commit_interval_s"] = self._commit_interval_s
        monitor_baseline = self.engine.baseline_latency_s(p.destination)
        vol = await ResyncVolume.open(source, dest, self.bitmap_path(rs.id, p.destination),
                                      region_bytes=snap.chunk_size_bytes, pending_regions=pending,
                                      baseline_latency_s=monitor_baseline, **kwargs)
        vol.throttle = self._throttle(rs, vol.monitor)
        vol.on_commit = lambda prog, p=p, rs=rs: self._progress(rs, p, prog)
        # From here on the LUN serves the snapshot: the SCSI layer sees only the BlockDevice protocol.
        self.engine.install(p.destination, vol)
        p.state = "resyncing"
        self._apply_progress(p, vol.progress())
        vol.start()
        log.info("recovery %s: %s -> %s %s (%d bytes pending)", rs.id, p.snapshot, p.destination,
                 "resumed" if resume else "started", vol.progress().bytes_total - vol.progress().bytes_done)
        return _Job(p, vol, snap)

    @staticmethod
    def _apply_progress(p: Pair, prog: ResyncProgress) -> None:
        p.bytes_total, p.bytes_done = prog.bytes_total, prog.bytes_done
        p.bytes_copied, p.redirected_reads = prog.bytes_copied, prog.redirected_reads

    def _progress(self, rs: RecoverySet, p: Pair, prog: ResyncProgress) -> None:
        self._apply_progress(p, prog)
        now = self._clock()
        if now - self._last_persist.get(rs.id, 0.0) >= 1.0:
            self._last_persist[rs.id] = now
            self._save(rs)

    def _release(self, rs: RecoverySet) -> None:
        for p in rs.pairs:
            if self._busy.get(p.destination) == rs.id:
                del self._busy[p.destination]

    async def _watch(self, rs: RecoverySet) -> None:
        jobs = self._jobs.get(rs.id, [])
        states = await asyncio.gather(*(j.volume.wait() for j in jobs))
        if rs.state is not RecoveryState.RESYNCING:
            return  # cancelled meanwhile
        if any(s is ResyncState.PAUSED for s in states):
            return  # the daemon is stopping: the catalog keeps "resyncing" and the next start resumes
        failed = [j for j, s in zip(jobs, states, strict=True) if s is not ResyncState.DONE]
        for j in jobs:
            self._apply_progress(j.pair, j.volume.progress())
            if j.volume.state is ResyncState.DONE:
                j.pair.state = "done"
        if not failed and rs.options.verify:
            for j in jobs:
                j.pair.verified = await self.verify_pair(j)
            if not all(j.pair.verified for j in jobs):
                failed = [j for j in jobs if not j.pair.verified]
                for j in failed:
                    j.pair.error = "verification failed: the destination differs from the snapshot"
        for j in jobs:
            self.engine.install(j.pair.destination, None)
        self._unmask(rs)
        self._release(rs)
        self._jobs.pop(rs.id, None)
        if failed:
            for j in failed:
                j.pair.state = "failed"
                j.pair.error = j.pair.error or j.volume.error
            self._move(rs, Event.FAIL, "; ".join(f"{j.pair.destination}: {j.pair.error}" for j in failed))
            return
        self._move(rs, Event.COMPLETE)
        if rs.options.consume_snapshot:
            for p in rs.pairs:
                try:
                    with contextlib.suppress(LookupError):
                        await self.engine.unexpose_snapshot(p.snapshot)
                    await self.engine.delete_snapshot(p.snapshot)
                except Exception as e:  # noqa: BLE001 - the LUN is restored; say why the snapshot is still there
                    rs.error = f"swapped, but {p.snapshot} could not be deleted: {e}"
                    self._save(rs)
        try:
            await self._run_hooks(rs, "post-restore", rs.options.post_restore)
        except VssError as e:
            rs.error = str(e)  # the data is restored; the hook's failure is reported, the state stays done
            self._save(rs)

    def _unmask(self, rs: RecoverySet) -> None:
        if rs.options.mask_except is not None:
            for p in rs.pairs:
                with contextlib.suppress(LookupError):
                    self.engine.mask(p.destination, None)

    async def verify_pair(self, job: _Job) -> bool:
        """Checksum the destination against the snapshot, 8 MiB at a time."""
        src = await self.engine.snapshot_view(job.snapshot)
        dst = self.engine.destination_device(job.pair.destination)
        step = (8 * MiB) // src.block_size
        h1, h2 = hashlib.blake2b(), hashlib.blake2b()
        for lba in range(0, src.num_blocks, step):
            n = min(step, src.num_blocks - lba)
            h1.update(await src.read(lba, n))
            h2.update(await dst.read(lba, n))
        return h1.digest() == h2.digest()

    async def cancel(self, set_id: str, *, failed: str | None = None) -> RecoverySet:
        """Stop the set's copiers; the set is cancelled, or ``failed`` with that reason (a set across workers whose
        other part did not start: :mod:`lunsync.provider.cross_recovery`)."""
        rs = self.get(set_id)
        jobs = self._jobs.pop(rs.id, [])
        # The state moves first, so the watcher that sees the copiers stop knows it was a cancel, not a failure.
        if failed is None:
            self._move(rs, Event.CANCEL, "cancelled by request")
        else:
            self._move(rs, Event.FAIL, failed)
        for j in jobs:
            await j.volume.cancel()
            self._apply_progress(j.pair, j.volume.progress())
            j.pair.state = rs.state.value
            self.engine.install(j.pair.destination, None)
        self._unmask(rs)
        self._release(rs)
        self._save(rs)
        return rs

    async def post_restore(self, set_id: str, timeout_s: float | None = None) -> RecoverySet:
        """PostRestore: wait until the set is finished (the post-restore hooks run at completion)."""
        return await self.wait(set_id, timeout_s)

    async def wait(self, set_id: str, timeout_s: float | None = None) -> RecoverySet:
        rs = self.get(set_id)
        ev = self._changed.setdefault(set_id, asyncio.Event())
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        while rs.state not in TERMINAL or (rs.id in self._watchers and not self._watchers[rs.id].done()):
            ev.clear()
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                break
            w = self._watchers.get(rs.id)
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(ev.wait())]
            if w is not None:
                waits.append(w)
            done, pending = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for f in pending:
                if f is not w:
                    f.cancel()
            if not done:
                break
        return rs

    def status(self, set_id: str) -> dict[str, Any]:
        """What ``recovery show`` prints: state, percent, bytes, rate, ETA and redirected reads, per set and pair."""
        rs = self.get(set_id)
        live = {j.pair.destination: j.volume.progress() for j in self._jobs.get(rs.id, [])}
        pairs = []
        total = done = copied = redirected = 0
        rate = 0.0
        etas: list[float | None] = []  # the pairs copy side by side: the set ends with its slowest
        for p in rs.pairs:
            prog = live.get(p.destination)
            if prog is not None:
                self._apply_progress(p, prog)
                rate += prog.rate_bps
                etas.append(prog.eta_s)
            d = p.as_dict()
            if prog is not None:
                d.update(rate_bps=round(prog.rate_bps, 1), eta_s=prog.eta_s, throttle=prog.throttle,
                         redirected_read_bytes=prog.redirected_read_bytes,
                         foreground_latency_s=prog.foreground_latency_s)
            pairs.append(d)
            total += p.bytes_total
            done += p.bytes_done
            copied += p.bytes_copied
            redirected += p.redirected_reads
        percent = 100.0 if rs.state is RecoveryState.DONE or total == 0 else round(100.0 * done / total, 2)
        eta = None if not etas or None in etas else max(e for e in etas if e is not None)
        if rs.state is RecoveryState.DONE:
            eta = 0.0
        return {"id": rs.id, "state": rs.state.value, "percent": percent, "bytes_total": total, "bytes_done": done,
                "bytes_copied": copied, "rate_bps": round(rate, 1), "eta_s": eta, "redirected_reads": redirected,
                "pairs": pairs, "options": rs.options.as_dict(), "error": rs.error, "hooks": rs.hooks_run,
                "created_at": rs.created_at, "started_at": rs.started_at, "finished_at": rs.finished_at}

    # -- one-shot forms --

    async def prepare(self, pairs: Sequence[tuple[str, str | None]], options: Options | None = None, *,
                      set_id: str | None = None) -> RecoverySet:
        """Create, fill and pre-restore a set: everything of :meth:`resync` before RecoverSet, which is also a
        worker's first phase of a set across workers (:mod:`lunsync.provider.cross_recovery`). A request refused up
        front (unknown snapshot, destination busy) leaves no set behind; one refused later leaves it failed."""
        for ref, dest in pairs:
            d = dest or self._snapshot(ref).origin
            owner = self._busy.get(d)
            if owner is not None:
                raise VssError(VssCode.RESYNC_IN_PROGRESS, f"{d} is being resynced by recovery set {owner}")
        rs = self.create_set(options, set_id=set_id)
        try:
            for snap, dest in pairs:
                self.add_pair(rs.id, snap, dest)
            await self.pre_restore(rs.id)
        except VssError as e:
            if rs.state not in TERMINAL:
                self._move(rs, Event.FAIL, str(e))
            raise
        return rs

    async def resync(self, pairs: Sequence[tuple[str, str | None]], options: Options | None = None) -> RecoverySet:
        """Create, fill, pre-restore and recover a set in one call (ResyncLuns, ``lunsync resync``)."""
        rs = await self.prepare(pairs, options)
        try:
            await self.recover(rs.id)
        except VssError as e:
            if rs.state not in TERMINAL:
                self._move(rs, Event.FAIL, str(e))
            raise
        return rs

    async def new_lun_from(self, ref: str, name: str, rate_bps: float | None = None) -> tuple[RecoverySet, bool]:
        """A new LUN holding a snapshot's data at once (``POST /v1/luns`` with ``from_snapshot``): a resync onto a LUN
        that does not exist yet, which creates it at the snapshot's size and block size and serves the snapshot
        through it while the copier fills it. The same request again answers the set that made the LUN (False:
        nothing started); a LUN of that name that exists otherwise, or was made from another snapshot, is refused.
        ``rate_bps`` is how fast the copy runs, not part of what is asked for (None: the adaptive throttle)."""
        snap = self._snapshot(ref)
        try:
            self.engine.lun(name)
            exists = True
        except LookupError:
            exists = False
        for rs in reversed(list(self.sets.values())):
            made = next((p for p in rs.pairs if p.destination == name and p.new_lun), None)
            if made is None or (not exists and rs.state in TERMINAL):
                continue  # a set that failed before the LUN existed made nothing: a retry starts afresh
            if made.snapshot != snap.ref:
                raise VssError(VssCode.PROVIDER_VETO, f"lun {name!r} was made from {made.snapshot}, not {snap.ref}")
            if not exists:
                raise VssError(VssCode.RESYNC_IN_PROGRESS, f"lun {name!r} is being made from {snap.ref} by "
                                                           f"recovery set {rs.id}; retry in a moment")
            return rs, False
        if exists:
            raise VssError(VssCode.PROVIDER_VETO, f"lun {name!r} already exists and was not made from {snap.ref}")
        return await self.resync([(snap.ref, name)], Options(rate_bps=rate_bps, create_missing=True)), True

    async def dry_run(self, pairs: Sequence[tuple[str, str | None]]) -> dict[str, Any]:
        """How many bytes a resync would copy, pair by pair, without touching anything."""
        out = []
        for ref, dest in pairs:
            snap = self._snapshot(ref)
            d = dest or snap.origin
            owner = self._busy.get(d)
            try:
                lun: LunRef | None = self.engine.lun(d)
            except LookupError:
                lun = None
            if lun is None:
                changed = await self.engine.allocated_chunks(snap)
            else:
                changed = await self.engine.changed_chunks(snap) if d == snap.origin else None
            nbytes = snap.size_bytes if changed is None else min(snap.size_bytes,
                                                                 len(changed) * snap.chunk_size_bytes)
            out.append({"snapshot": snap.ref, "destination": d, "bytes": nbytes,
                        "only_changed": changed is not None and lun is not None,
                        "new_lun": lun is None, "grow_to": snap.size_bytes if lun is None or
                        lun.size_bytes < snap.size_bytes else None, "resync_in_progress": owner})
        return {"dry_run": True, "bytes": sum(x["bytes"] for x in out), "pairs": out}

    async def swap(self, ref: str, identity: str = "keep", options: Options | None = None) -> RecoverySet:
        """BreakSnapshotSetEx: the snapshot becomes the read-write LUN at once, and is used up.

        The origin serves the snapshot's contents from the moment this returns (a resync to the origin, which copies
        back only the chunks that changed); when that is done the snapshot is deleted. With ``identity="snapshot"``
        the LUN also takes the snapshot's identity. It cannot be undone."""
        if identity not in ("keep", "snapshot"):
            raise VssError(VssCode.INVALID_ARG, "identity must be 'keep' or 'snapshot'")
        snap = self._snapshot(ref)
        owner = self._busy.get(snap.origin)
        if owner is not None:
            raise VssError(VssCode.RESYNC_IN_PROGRESS, f"{snap.origin} is being resynced by recovery set {owner}")
        if any(rs.options.consume_snapshot and rs.state not in TERMINAL and rs.pairs[0].snapshot == snap.ref
               for rs in self.sets.values()):
            raise VssError(VssCode.BAD_STATE, f"{snap.ref} is already being swapped in")
        opts = options or Options()
        opts.consume_snapshot = True
        if identity == "snapshot":
            try:
                await self.engine.swap_identity(snap.ref)
            except LookupError as e:
                raise VssError(VssCode.OBJECT_NOT_FOUND, str(e)) from None
        return await self.resync([(snap.ref, snap.origin)], opts)

    # -- lifecycle --

    async def load(self) -> None:
        """Rebuild from the store; resume every set that was resyncing when the daemon stopped (or was killed)."""
        for rs in self.store.load_all():
            self.sets[rs.id] = rs
        for rs in self.list_sets():
            if rs.state in (RecoveryState.PENDING, RecoveryState.PRE_RESTORE):
                # Not yet recovered: its requester was never told the restore started (a one-shot resync's set is
                # recorded at each step before its answer), and a set left pending would hold its destinations
                # for good. VSS fails a restore its provider lost; the requester starts again.
                self._move(rs, Event.FAIL, f"the daemon restarted during {rs.state.value}")
            elif rs.state is RecoveryState.RESYNCING:
                jobs = []
                try:
                    for p in rs.pairs:
                        self._busy[p.destination] = rs.id
                        jobs.append(await self._start_pair(rs, p, resume=True))
                except Exception as e:  # noqa: BLE001 - a set that cannot resume fails with its reason
                    log.error("recovery %s: cannot resume: %s", rs.id, e)
                    for j in jobs:
                        await j.volume.stop()
                        self.engine.install(j.pair.destination, None)
                    self._release(rs)
                    self._move(rs, Event.FAIL, f"cannot resume: {e}")
                    continue
                self._jobs[rs.id] = jobs
                self._watchers[rs.id] = asyncio.get_running_loop().create_task(self._watch(rs))

    async def shutdown(self) -> None:
        """Pause every copier and commit; the sets stay "resyncing" in the store and resume at the next start."""
        for set_id, jobs in list(self._jobs.items()):
            for j in jobs:
                await j.volume.stop()
                self._apply_progress(j.pair, j.volume.progress())
                self.engine.install(j.pair.destination, None)
            self._save(self.sets[set_id])
        for w in self._watchers.values():
            w.cancel()

    def live_progress(self) -> list[tuple[str, str, ResyncProgress]]:
        """(set id, destination, progress) of every running job, for the metrics collector."""
        return [(sid, j.pair.destination, j.volume.progress()) for sid, jobs in self._jobs.items() for j in jobs]


# --- the IVssHardwareSnapshotProvider(Ex) surface ----------------------------------------------------------------


class Capability(enum.IntFlag):
    """VSS_PROVIDER_CAPABILITIES (vsprov.h)."""

    LEGACY = 0x1
    COMPLIANT = 0x2
    LUN_REPOINT = 0x4
    LUN_RESYNC = 0x8
    OFFLINE_CREATION = 0x10
    MULTIPLE_IMPORT = 0x20
    RECYCLING = 0x40
    PLEX = 0x80
    DIFFERENTIAL = 0x100
    CLUSTERED = 0x200


class LunStateFlag(enum.IntFlag):
    """The dwFlags of OnLunStateChange (VSS_HARDWARE_OPTIONS)."""

    NOTIFY_READ_WRITE = 0x100
    NOTIFY_LUN_PRE_RECOVERY = 0x200
    NOTIFY_LUN_POST_RECOVERY = 0x400
    DO_MASK_LUNS = 0x800


CAPABILITIES = Capability.LUN_RESYNC | Capability.LUN_REPOINT | Capability.DIFFERENTIAL


@dataclass
class _PreparedSet:
    """A snapshot set between BeginPrepareSnapshot and Commit/Abort."""

    id: str
    context: int = 0
    luns: dict[str, str] = field(default_factory=dict)  # snapshot id -> LUN name
    state: str = "preparing"  # preparing, prepared, precommitted, committed, aborted
    snapshots: list[SnapshotRef] = field(default_factory=list)


class HardwareProvider:
    """One operation per IVssHardwareSnapshotProvider(Ex) method. LUNs in and out are :class:`LunInformation`."""

    def __init__(self, engine: Engine, recovery: RecoveryManager) -> None:
        self.engine = engine
        self.recovery = recovery
        self.prepared: dict[str, _PreparedSet] = {}
        self.read_write: set[str] = set()  # snapshots a requester made read-write (NOTIFY_READ_WRITE)
        self.recovering: set[str] = set()  # LUNs between PRE_RECOVERY and POST_RECOVERY

    # -- naming --

    def find_lun(self, info: LunInformation) -> LunRef:
        for lun in self.engine.luns():
            if info.matches(lun.naa, lun.serial):
                return lun
        raise VssError(VssCode.OBJECT_NOT_FOUND, f"no LUN with {_describe(info)}")

    def find_snapshot(self, info: LunInformation) -> SnapshotRef:
        for snap in self.engine.snapshots():
            if info.matches(snap.naa, snap.serial):
                return snap
        raise VssError(VssCode.OBJECT_NOT_FOUND, f"no snapshot LUN with {_describe(info)}")

    # -- IVssHardwareSnapshotProvider --

    def are_luns_supported(self, luns: Sequence[LunInformation], context: int = 0) -> dict[str, Any]:
        """AreLunsSupported: true when every LUN is one of ours (so we can snapshot it)."""
        results: list[str | None] = []
        for info in luns:
            try:
                results.append(self.find_lun(info).name)
            except VssError:
                results.append(None)
        return {"supported": all(r is not None for r in results), "luns": results}

    def fill_in_lun_info(self, info: LunInformation) -> dict[str, Any]:
        """FillInLunInfo: complete what Windows read from the device with what only the array knows."""
        for lun in self.engine.luns():
            if info.matches(lun.naa, lun.serial):
                return {"supported": True, "lun_information": lun.info.as_dict(), "name": lun.name}
        for snap in self.engine.snapshots():
            if info.matches(snap.naa, snap.serial):
                return {"supported": True, "lun_information": snap.info.as_dict(), "snapshot": snap.ref}
        return {"supported": False, "lun_information": info.as_dict()}

    def begin_prepare_snapshot(self, snapshot_set_id: str, snapshot_id: str, luns: Sequence[LunInformation],
                               context: int = 0) -> dict[str, Any]:
        ps = self.prepared.setdefault(snapshot_set_id, _PreparedSet(snapshot_set_id, context))
        if ps.state != "preparing":
            raise VssError(VssCode.BAD_STATE, f"snapshot set {snapshot_set_id} is {ps.state}")
        names = [self.find_lun(i).name for i in luns]
        for n in names:
            ps.luns[f"{snapshot_id}:{n}"] = n
        return {"snapshot_set_id": snapshot_set_id, "snapshot_id": snapshot_id, "luns": names}

    def _prepared(self, set_id: str, *want: str) -> _PreparedSet:
        ps = self.prepared.get(set_id)
        if ps is None:
            raise VssError(VssCode.OBJECT_NOT_FOUND, f"no snapshot set {set_id} being prepared")
        if want and ps.state not in want:
            raise VssError(VssCode.BAD_STATE, f"snapshot set {set_id} is {ps.state}")
        return ps

    def end_prepare_snapshots(self, set_id: str) -> dict[str, Any]:
        ps = self._prepared(set_id, "preparing")
        for name in set(ps.luns.values()):
            need = self.engine.lun(name).size_bytes // 100  # a pool with no room at all would fail every COW
            free = self.engine.free_bytes(name)
            if free is not None and free < need:
                raise VssError(VssCode.INSUFFICIENT_STORAGE, f"no room for differential storage of {name}")
        ps.state = "prepared"
        return {"snapshot_set_id": set_id, "state": ps.state}

    def pre_commit_snapshots(self, set_id: str) -> dict[str, Any]:
        ps = self._prepared(set_id, "prepared")
        ps.state = "precommitted"
        return {"snapshot_set_id": set_id, "state": ps.state}

    async def commit_snapshots(self, set_id: str) -> dict[str, Any]:
        """CommitSnapshots: the point in time. Writes on every LUN of the set are held while it is marked."""
        ps = self._prepared(set_id, "precommitted")
        try:
            ps.snapshots = await self.engine.create_snapshots(sorted(set(ps.luns.values())), f"vss-{set_id}")
        except LookupError as e:
            raise VssError(VssCode.OBJECT_NOT_FOUND, str(e)) from None
        except OSError as e:
            raise VssError(VssCode.INSUFFICIENT_STORAGE, str(e)) from None
        ps.state = "committed"
        return {"snapshot_set_id": set_id, "state": ps.state, "snapshots": [s.ref for s in ps.snapshots]}

    def post_commit_snapshots(self, set_id: str, count: int | None = None) -> dict[str, Any]:
        ps = self._prepared(set_id, "committed")
        if count is not None and count != len(ps.luns):
            raise VssError(VssCode.INVALID_ARG, f"snapshot set {set_id} has {len(ps.luns)} snapshots, not {count}")
        return {"snapshot_set_id": set_id, "state": ps.state, "snapshots": [s.ref for s in ps.snapshots]}

    async def abort_snapshots(self, set_id: str) -> dict[str, Any]:
        ps = self._prepared(set_id)
        for s in ps.snapshots:
            with contextlib.suppress(LookupError):
                await self.engine.delete_snapshot(s.ref)
        ps.state = "aborted"
        ps.snapshots = []
        return {"snapshot_set_id": set_id, "state": ps.state}

    def get_target_luns(self, luns: Sequence[LunInformation], snapshot_set_id: str | None = None
                        ) -> dict[str, Any]:
        """GetTargetLuns: for each original LUN, the LUN information of its snapshot (in the given set, or the
        newest)."""
        out = []
        for info in luns:
            lun = self.find_lun(info)
            candidates = [s for s in self.engine.snapshots() if s.origin == lun.name]
            if snapshot_set_id is not None:
                ps = self._prepared(snapshot_set_id, "committed")
                candidates = [s for s in ps.snapshots if s.origin == lun.name]
            if not candidates:
                raise VssError(VssCode.OBJECT_NOT_FOUND, f"{lun.name} has no snapshot")
            snap = candidates[-1]
            out.append({"source": lun.info.as_dict(), "target": snap.info.as_dict(), "snapshot": snap.ref})
        return {"luns": out}

    async def locate_luns(self, luns: Sequence[LunInformation]) -> dict[str, Any]:
        """LocateLuns: make snapshot LUNs visible to this host (expose them on a target)."""
        out = []
        for info in luns:
            snap = self.find_snapshot(info)
            out.append({"snapshot": snap.ref, **(await self.engine.expose_snapshot(snap.ref))})
        return {"luns": out}

    async def on_lun_empty(self, info: LunInformation) -> dict[str, Any]:
        """OnLunEmpty: the snapshot on this LUN is no longer needed: delete it."""
        snap = self.find_snapshot(info)
        with contextlib.suppress(LookupError):
            await self.engine.unexpose_snapshot(snap.ref)
        await self.engine.delete_snapshot(snap.ref)
        return {"deleted": snap.ref}

    # -- IVssHardwareSnapshotProviderEx --

    def get_provider_capabilities(self) -> dict[str, Any]:
        return {"mask": int(CAPABILITIES), "mask_hex": f"0x{int(CAPABILITIES):x}",
                "capabilities": [f"VSS_PRV_CAPABILITY_{c.name}" for c in Capability if c in CAPABILITIES]}

    async def on_lun_state_change(self, snapshot_luns: Sequence[LunInformation],
                                  original_luns: Sequence[LunInformation], flags: int) -> dict[str, Any]:
        """OnLunStateChange: NOTIFY_READ_WRITE (snapshot LUNs made read-write), DO_MASK_LUNS (hide the snapshot
        LUNs), NOTIFY_LUN_PRE_RECOVERY / POST_RECOVERY (originals about to be / done being restored; with
        DO_MASK_LUNS the originals are masked across the recovery)."""
        f = LunStateFlag(flags & sum(LunStateFlag))
        if flags & ~int(sum(LunStateFlag)):
            raise VssError(VssCode.INVALID_ARG, f"unknown OnLunStateChange flags 0x{flags:x}")
        done: list[str] = []
        snaps = [self.find_snapshot(i) for i in snapshot_luns]
        origs = [self.find_lun(i) for i in original_luns]
        if LunStateFlag.NOTIFY_READ_WRITE in f:
            for s in snaps:
                self.read_write.add(s.ref)
                done.append(f"read-write {s.ref}")
        if LunStateFlag.DO_MASK_LUNS in f and not (f & (LunStateFlag.NOTIFY_LUN_PRE_RECOVERY
                                                        | LunStateFlag.NOTIFY_LUN_POST_RECOVERY)):
            for s in snaps:
                with contextlib.suppress(LookupError):
                    await self.engine.unexpose_snapshot(s.ref)
                done.append(f"masked {s.ref}")
        if LunStateFlag.NOTIFY_LUN_PRE_RECOVERY in f:
            for lun in origs:
                self.recovering.add(lun.name)
                if LunStateFlag.DO_MASK_LUNS in f:
                    self.engine.mask(lun.name, frozenset())
                    done.append(f"masked {lun.name}")
                done.append(f"pre-recovery {lun.name}")
        if LunStateFlag.NOTIFY_LUN_POST_RECOVERY in f:
            for lun in origs:
                self.recovering.discard(lun.name)
                self.engine.mask(lun.name, None)
                done.append(f"post-recovery {lun.name}")
        return {"flags": int(f), "flag_names": [x.name for x in LunStateFlag if x in f], "actions": done}

    async def resync_luns(self, source_luns: Sequence[LunInformation], target_luns: Sequence[LunInformation],
                          options: Options | None = None) -> dict[str, Any]:
        """ResyncLuns: each source is a snapshot LUN, each target an ordinary LUN (its origin or another). Returns
        the async handle: the recovery set, which has query (GET), wait and cancel."""
        if len(source_luns) != len(target_luns) or not source_luns:
            raise VssError(VssCode.INVALID_ARG, "ResyncLuns needs as many targets as sources, at least one")
        pairs = [(self.find_snapshot(s).ref, self.find_lun(t).name) for s, t in zip(source_luns, target_luns,
                                                                                      strict=True)]
        rs = await self.recovery.resync(pairs, options)
        return async_handle(rs)

    async def on_reuse_luns(self, snapshot_luns: Sequence[LunInformation],
                            original_luns: Sequence[LunInformation]) -> dict[str, Any]:
        """OnReuseLuns: the snapshot LUNs are about to be reused as ordinary disks: their snapshots are forgotten
        (deleted) so the identities can serve again."""
        freed = []
        for info in snapshot_luns:
            snap = self.find_snapshot(info)
            with contextlib.suppress(LookupError):
                await self.engine.unexpose_snapshot(snap.ref)
            await self.engine.delete_snapshot(snap.ref)
            self.read_write.discard(snap.ref)
            freed.append(snap.ref)
        return {"reused": freed}


def async_handle(rs: RecoverySet) -> dict[str, Any]:
    """The REST form of IVssAsync: where to query, wait and cancel."""
    base = f"/v1/recovery/{rs.id}"
    return {"id": rs.id, "state": rs.state.value, "query": base, "wait": f"{base}/wait", "cancel": f"{base}/cancel"}


def _describe(info: LunInformation) -> str:
    naa = info.naa
    return f"NAA {naa}" if naa else f"serial {info.serial_number!r}"


def parse_snapshot_ref(text: str) -> tuple[str, str]:
    lun, sep, snap = text.partition("@")
    if not sep or not lun or not snap:
        raise VssError(VssCode.INVALID_ARG, f"{text!r} is not LUN@SNAP")
    return lun, snap


__all__ = [
    "CAPABILITIES",
    "TRANSITIONS",
    "Capability",
    "Engine",
    "HardwareProvider",
    "LunInformation",
    "LunRef",
    "LunStateFlag",
    "MemoryStore",
    "Options",
    "Pair",
    "RecoveryManager",
    "RecoverySet",
    "RecoveryState",
    "SnapshotRef",
    "VssCode",
    "VssError",
    "async_handle",
    "from_record",
    "lun_information",
    "next_state",
    "parse_snapshot_ref",
    "to_record",
]
