"""The logical unit: a BlockDevice plus everything SPC/SBC keeps per LU.

A :class:`LogicalUnit` owns the state the command handlers share: the mode pages (current, changeable, default and
saved copies of caching 0x08, control 0x0A and informational exceptions 0x1C), the unit-attention queues of every
I_T nexus that has talked to it (a new nexus first sees POWER ON, RESET), the write-cache setting (with WCE off every
write is forced to FUA), the software write protect (SWP), the RESERVE(6/10) holder, the persistent-reservation
state (:class:`lunsync.target.scsi.pr.PrState`, persisted when APTPL is set), the EXTENDED COPY results, the
:class:`WriteGate` that makes COMPARE AND WRITE atomic against every other write, and the state of a SANITIZE
(:class:`SanitizeState`). It knows nothing of CDBs; the handlers in spc/sbc/pr/xcopy do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lunsync.snapshots.device import BlockDevice, Buffer, InlineWrite
from lunsync.snapshots.model import LunIdentity
from lunsync.target.scsi import sense as S
from lunsync.target.scsi.alua import AluaGroups
from lunsync.target.scsi.pr import PrState
from lunsync.target.scsi.task import Nexus

# Mode page codes (SPC-4 §7.5, SBC-3 §6.4).
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_IEC = 0x1C
PAGE_ALL = 0x3F

# Bytes of the pages that carry state the handlers read.
_CACHING_WCE = 0x04  # byte 2
_CACHING_RCD = 0x01  # byte 2
_CONTROL_SWP = 0x08  # byte 4
_IEC_DEXCPT = 0x08  # byte 2

_MAX_UA = 16  # SAM-5 lets a device drop UAs beyond what it can queue; keep memory bounded per nexus


def _default_pages() -> dict[int, bytearray]:
    caching = bytearray(20)
    caching[0], caching[1] = PAGE_CACHING, 18
    caching[2] = _CACHING_WCE  # write-back by default: page-cache writes, flushed by SYNCHRONIZE CACHE
    caching[12] = 0x20  # DRA clear, NV_DIS clear; FSW-ish hints are vendor noise, keep the byte conservative
    control = bytearray(12)
    control[0], control[1] = PAGE_CONTROL, 10
    control[2] = 0x00  # TST 000b: one task set for all initiators; D_SENSE clear: fixed-format sense only
    control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering; QERR 00b
    control[5] = 0x40  # TAS: aborted tasks of other nexuses end in TASK ABORTED
    control[8], control[9] = 0xFF, 0xFF  # BUSY TIMEOUT PERIOD: unlimited
    iec = bytearray(12)
    iec[0], iec[1] = PAGE_IEC, 10
    iec[2] = _IEC_DEXCPT  # no informational exceptions are ever raised
    return {PAGE_CACHING: caching, PAGE_CONTROL: control, PAGE_IEC: iec}


def _changeable_pages() -> dict[int, bytearray]:
    caching = bytearray(20)
    caching[0], caching[1] = PAGE_CACHING, 18
    caching[2] = _CACHING_WCE
    control = bytearray(12)
    control[0], control[1] = PAGE_CONTROL, 10
    control[4] = _CONTROL_SWP
    iec = bytearray(12)
    iec[0], iec[1] = PAGE_IEC, 10
    iec[2] = _IEC_DEXCPT
    iec[3] = 0x0F  # MRIE
    return {PAGE_CACHING: caching, PAGE_CONTROL: control, PAGE_IEC: iec}


@dataclass(slots=True)
class CopyResult:
    """What RECEIVE COPY RESULTS (COPY STATUS) reports for one EXTENDED COPY list identifier."""

    status: int  # COPY MANAGER STATUS: 0x01 completed without errors, 0x02 with errors
    segments_processed: int
    transfer_count: int  # blocks
    sense: bytes = b""


class _Hold:
    """One registered range in a :class:`WriteGate`: blocks ``start``..``end`` (exclusive), shared or exclusive."""

    __slots__ = ("end", "exclusive", "start")

    def __init__(self, start: int, end: int, exclusive: bool) -> None:
        self.start = start
        self.end = end
        self.exclusive = exclusive


class WriteGate:
    """Makes COMPARE AND WRITE, ORWRITE and SANITIZE atomic against every other write to the blocks they touch
    (SBC-3 §5.3: the read, compare and write happen as one uninterrupted operation).

    The hot path pays one integer test: while no exclusive holder exists (``active == 0``) a plain write only bumps
    ``untracked`` around its device call and is never queued. Once an exclusive holder registers, every new write
    registers its range too, in arrival order, and a range may proceed when no earlier overlapping range blocks it
    (two shared ranges never block each other). An exclusive holder additionally waits for the untracked writes that
    began before it; none can begin after it, so that count only falls and cannot starve it.
    """

    __slots__ = ("_changed", "_queue", "active", "untracked")

    def __init__(self) -> None:
        self.active = 0  # exclusive holders registered (waiting or holding)
        self.untracked = 0  # writes begun while ``active`` was 0, still in their device call
        self._queue: list[_Hold] = []
        self._changed: asyncio.Event | None = None

    def _blocked(self, hold: _Hold) -> bool:
        if hold.exclusive and self.untracked:
            return True
        for other in self._queue:
            if other is hold:
                return False
            if other.start < hold.end and hold.start < other.end and (other.exclusive or hold.exclusive):
                return True
        return False  # pragma: no cover - a hold is always in the queue while it waits

    def wake(self) -> None:
        """Something was released: let every waiter look again."""
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.set()

    async def _enter(self, start: int, end: int, exclusive: bool) -> _Hold:
        hold = _Hold(start, end, exclusive)
        if exclusive:
            self.active += 1
        self._queue.append(hold)
        try:
            while self._blocked(hold):
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
        except BaseException:
            self._leave(hold)
            raise
        return hold

    def _leave(self, hold: _Hold) -> None:
        self._queue.remove(hold)
        if hold.exclusive:
            self.active -= 1
        self.wake()

    def done_untracked(self) -> None:
        """An untracked write finished (the hot path calls this only when an exclusive holder may be waiting)."""
        if not self.untracked:
            self.wake()

    def write(self, lba: int, blocks: int) -> GateHold:
        """``async with gate.write(lba, blocks)``: hold the blocks for a plain write (shared with other plain
        writes)."""
        return GateHold(self, lba, lba + blocks, False)

    def exclusive(self, lba: int, blocks: int) -> GateHold:
        """``async with gate.exclusive(lba, blocks)``: hold the blocks alone; no other write to them starts or is in
        flight until release."""
        return GateHold(self, lba, lba + blocks, True)


class GateHold:
    """One use of a :class:`WriteGate`, as an async context manager. A class rather than an
    ``@asynccontextmanager`` generator: it costs the per-write path less, and mypyc compiles it."""

    __slots__ = ("end", "exclusive", "gate", "hold", "start")

    def __init__(self, gate: WriteGate, start: int, end: int, exclusive: bool) -> None:
        self.gate = gate
        self.start = start
        self.end = end
        self.exclusive = exclusive
        self.hold: _Hold | None = None  # None: an untracked plain write (no exclusive holder existed)

    async def __aenter__(self) -> None:
        gate = self.gate
        if not self.exclusive and not gate.active:
            gate.untracked += 1
            return
        self.hold = await gate._enter(self.start, self.end, self.exclusive)

    async def __aexit__(self, *exc_info: object) -> None:
        gate = self.gate
        hold = self.hold
        if hold is None:
            gate.untracked -= 1
            if gate.active:
                gate.done_untracked()
        else:
            gate._leave(hold)


@dataclass(slots=True)
class SanitizeState:
    """A SANITIZE in progress, or the failure mode a failed one left behind (SBC-3 §4.33, §5.27).

    While ``task`` runs, every command but INQUIRY, REPORT LUNS and REQUEST SENSE ends in NOT READY, SANITIZE IN
    PROGRESS with ``done``/``total`` as the progress indication. After a failure (``failed``) they end in MEDIUM
    ERROR, SANITIZE COMMAND FAILED until a SANITIZE completes without error or, when the failed one had AUSE set,
    EXIT FAILURE MODE is requested.
    """

    task: asyncio.Task[None] | None
    ause: bool
    total: int = 1
    done: int = 0
    failed: bool = False

    def progress(self) -> int:
        """PROGRESS INDICATION: the fraction done, as a numerator over 65536 (SPC-4 §4.5.2.4.4)."""
        return min(0xFFFF, self.done * 0x10000 // max(1, self.total))

    def check(self) -> S.CheckCondition:
        """The condition a command other than the exempt ones meets."""
        if self.failed:
            return S.CheckCondition(S.SenseKey.MEDIUM_ERROR, S.SANITIZE_COMMAND_FAILED)
        p = self.progress()
        return S.CheckCondition(S.SenseKey.NOT_READY, S.LUN_NOT_READY_SANITIZE_IN_PROGRESS,
                                sks=bytes((0x80, p >> 8, p & 0xFF)))


@dataclass(slots=True)
class ModePages:
    """The four copies of every supported mode page (SPC-4 §6.11 PC field)."""

    current: dict[int, bytearray] = field(default_factory=_default_pages)
    changeable: dict[int, bytearray] = field(default_factory=_changeable_pages)
    default: dict[int, bytearray] = field(default_factory=_default_pages)
    saved: dict[int, bytearray] = field(default_factory=_default_pages)


def _inline_write(device: BlockDevice) -> Callable[[int, Buffer], bool] | None:
    # Looked up once per device, not per WRITE: an isinstance check of a runtime protocol costs microseconds.
    return device.write_inline if isinstance(device, InlineWrite) else None


class LogicalUnit:
    """One logical unit exposed by a :class:`lunsync.target.scsi.target.ScsiTarget`."""

    def __init__(self, device: BlockDevice, identity: LunIdentity, *, aptpl_path: str | None = None, name: str = "") -> None:
        self._device = device
        self.inline_write: Callable[[int, Buffer], bool] | None = _inline_write(device)
        self.identity = identity
        self.name = name
        self.aptpl_path = aptpl_path
        self.mode = ModePages()
        self.wce = True
        self.swp = False
        # Per I_T nexus unit-attention queue; presence of the key means the nexus has been seen.
        self._ua: dict[Nexus, list[S.Asc]] = {}
        # RESERVE(6/10) holder (SPC-2 §7.21), cleared by RELEASE, LUN RESET and target resets.
        self.legacy_holder: Nexus | None = None
        self.pr = PrState(aptpl_path)
        self.gate = WriteGate()
        self.sanitize: SanitizeState | None = None
        self.copy_results: dict[tuple[str, int], CopyResult] = {}
        self.prevent: set[Nexus] = set()
        self.stopped = False
        # The port groups of a LU shared by several gateways (None: this daemon's groups, all active/optimized).
        self.alua: AluaGroups | None = None
        # Set on a LU shared by several gateways: tells the others of a reset; what it returns completes once they
        # have applied it, and the TMF response waits for it (take_peer_waits).
        self.on_reset: Callable[[S.Asc], Awaitable[None] | None] | None = None
        self._peer_waits: list[Awaitable[None]] = []

    @property
    def device(self) -> BlockDevice:
        """The block device behind this LU (a volume, a volume under resync, a snapshot view)."""
        return self._device

    @device.setter
    def device(self, device: BlockDevice) -> None:
        # A resync or a swap puts another device here; its inline write (or its lack of one) comes with it.
        self._device = device
        self.inline_write = _inline_write(device)

    # -- geometry ---------------------------------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.device.block_size

    @property
    def num_blocks(self) -> int:
        return self.device.num_blocks

    @property
    def thin(self) -> bool:
        return self.device.thin

    @property
    def write_protected(self) -> bool:
        """True when writes must fail with DATA PROTECT: a read-only device or SWP set in the control page."""
        return self.swp or self.device.read_only

    @property
    def max_transfer_blocks(self) -> int:
        """MAXIMUM TRANSFER LENGTH of VPD 0xB0: 8 MiB per command keeps a single READ from pinning huge buffers."""
        return (8 << 20) // self.device.block_size

    @property
    def optimal_transfer_blocks(self) -> int:
        return (128 << 10) // self.device.block_size

    # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0: with a larger exponent libiscsi's GET LBA STATUS test
    # expects physical-block-aligned extents, which SBC-3 §5.6 forbids (the first descriptor starts at the requested
    # LBA). The 4 KiB page preference is still conveyed by the granularity fields of VPD 0xB0.
    physical_exponent = 0

    @property
    def granularity_blocks(self) -> int:
        """Blocks per backing page (4 KiB): OPTIMAL TRANSFER LENGTH GRANULARITY and OPTIMAL UNMAP GRANULARITY."""
        return max(1, 4096 // self.device.block_size)

    max_unmap_descriptors = 256
    max_compare_and_write_blocks = 255  # one-byte NUMBER OF LOGICAL BLOCKS field
    max_write_same_blocks = 0xFFFF  # below 65536 so WRITE SAME never outgrows what one WRITE(16) may carry

    max_unmap_blocks = 1 << 20  # per descriptor and per command; bounds the time one UNMAP holds the device

    # -- unit attentions ----------------------------------------------------------------------------------------------

    def take_ua(self, nexus: Nexus) -> S.Asc | None:
        """Pop the oldest unit attention for ``nexus``; a nexus seen for the first time gets POWER ON, RESET."""
        q = self._ua.get(nexus)
        if q is None:
            self._ua[nexus] = []
            return S.POWER_ON_RESET
        if q:
            return q.pop(0)
        return None

    def peek_ua(self, nexus: Nexus) -> bool:
        """True when ``nexus`` has a unit attention waiting (or has never been seen)."""
        q = self._ua.get(nexus)
        return q is None or bool(q)

    def add_ua(self, nexus: Nexus, asc: S.Asc) -> None:
        """Queue ``asc`` for ``nexus`` (once; bounded)."""
        q = self._ua.get(nexus)
        if q is None:
            # It will see POWER ON, RESET first, which subsumes anything that happened before it arrived.
            return
        if asc not in q and len(q) < _MAX_UA:
            q.append(asc)

    def add_ua_all(self, asc: S.Asc, *, except_nexus: Nexus | None = None) -> None:
        """Queue ``asc`` for every known nexus but ``except_nexus``."""
        for nexus in self._ua:
            if nexus != except_nexus:
                self.add_ua(nexus, asc)

    def add_ua_initiator_port(self, initiator_port: str, asc: S.Asc, *, except_nexus: Nexus | None = None) -> None:
        """Queue ``asc`` for every known nexus of one initiator port (persistent reservations act per port)."""
        for nexus in self._ua:
            if nexus.initiator_port == initiator_port and nexus != except_nexus:
                self.add_ua(nexus, asc)

    def known_nexuses(self) -> list[Nexus]:
        return list(self._ua)

    def forget_nexus(self, nexus: Nexus) -> None:
        """Drop the unit-attention state of ``nexus`` (I_T nexus loss). Reservations are not touched."""
        self._ua.pop(nexus, None)
        self.prevent.discard(nexus)

    # -- events -------------------------------------------------------------------------------------------------------

    def set_alua_owner(self, owner: int | None) -> None:
        """The LU's owning port group changed (a failover, or the first lease): every nexus sees ASYMMETRIC ACCESS
        STATE CHANGED (SPC-4 §5.15.2.4), so initiators re-read REPORT TARGET PORT GROUPS and move their I/O."""
        if self.alua is not None and self.alua.set_owner(owner):
            self.add_ua_all(S.ASYMMETRIC_ACCESS_STATE_CHANGED)

    def notify_capacity_changed(self) -> None:
        """The device was resized: every nexus sees CAPACITY DATA HAS CHANGED."""
        self.add_ua_all(S.CAPACITY_DATA_HAS_CHANGED)

    def reset(self, *, asc: S.Asc = S.BUS_DEVICE_RESET_FUNCTION, from_peer: bool = False) -> None:
        """LUN RESET or a target reset: drop RESERVE(6/10) and PREVENT, and establish the reset unit attention on
        every I_T nexus, the issuer's included (SAM-5 §6.3.3). A multipath host sees it on each of its paths, which
        is what lets it notice that other paths' commands were aborted. A LU shared by several gateways tells the
        others (``on_reset``), whose nexuses are this LU's too; ``from_peer`` is such a reset arriving."""
        self.legacy_holder = None
        self.prevent.clear()
        self.stopped = False
        for q in self._ua.values():
            q.clear()  # a reset supersedes older attentions
            q.append(asc)
        if self.on_reset is not None and not from_peer:
            wait = self.on_reset(asc)
            if wait is not None:
                self._peer_waits.append(wait)

    def take_peer_waits(self) -> list[Awaitable[None]]:
        """What the response to the task management function that just reset this LU must wait for."""
        waits, self._peer_waits = self._peer_waits, []
        return waits

    def apply_mode_page(self, page: int, data: bytes | bytearray, *, save: bool, nexus: Nexus) -> None:
        """Install a validated page as current (and saved), refresh derived state, and tell the other nexuses."""
        cur = self.mode.current[page]
        changed = bytes(cur) != bytes(data)
        cur[:] = data
        if save:
            self.mode.saved[page][:] = data
        self._refresh_mode_state()
        if changed:
            self.add_ua_all(S.MODE_PARAMETERS_CHANGED, except_nexus=nexus)

    def _refresh_mode_state(self) -> None:
        self.wce = bool(self.mode.current[PAGE_CACHING][2] & _CACHING_WCE)
        self.swp = bool(self.mode.current[PAGE_CONTROL][4] & _CONTROL_SWP)
