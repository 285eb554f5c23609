"""The SCSI target device: a LUN map and the one dispatcher that turns a task into a response.

:class:`ScsiTarget` holds the mutable map of LUN numbers to :class:`~lunsync.target.scsi.lu.LogicalUnit`. Its
:meth:`ScsiTarget.execute` is the only place where sense bytes are built for a command: it looks the CDB up in the
registry, reports pending unit attentions, applies the reservation-conflict rule, awaits the handler, and converts
:class:`~lunsync.target.scsi.sense.CheckCondition`, :class:`~lunsync.target.scsi.sense.ReservationConflict` and
storage errors into a :class:`ScsiResponse`. While a SANITIZE runs (or after one failed) it answers every command but
the few registered ``sanitize_ok`` with the LU's sanitize condition. Absent LUNs answer INQUIRY with peripheral
qualifier 011b, REQUEST SENSE with LOGICAL UNIT NOT SUPPORTED data, REPORT LUNS normally, and everything else with
CHECK CONDITION 25/00. Task management resets and I_T nexus loss land in :meth:`reset` and :meth:`nexus_lost`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from lunsync.snapshots.errors import Saturated, StorageError

# Importing the command modules registers their handlers in the registry.
from lunsync.target.scsi import pr as _pr
from lunsync.target.scsi import sbc as _sbc  # noqa: F401
from lunsync.target.scsi import sense as S
from lunsync.target.scsi import spc as _spc  # noqa: F401
from lunsync.target.scsi import xcopy as _xcopy  # noqa: F401
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.registry import DONE, CommandSpec, Dir, Request, Result, lookup
from lunsync.target.scsi.sense import CheckCondition, ReservationConflict, SenseKey
from lunsync.target.scsi.task import Nexus, ScsiResponse, ScsiTask, Status, TmfFunction

# The commands an absent LUN still answers (SPC-4 §6.6.1, §6.27, §6.33).
_NO_LUN_OPCODES: Final = frozenset({0x12, 0x03, 0xA0})

def _verify_out(blocks: int, cdb: bytes, bs: int) -> int:
    bytchk = (cdb[1] >> 1) & 0x03
    return 0 if bytchk == 0 else bs if bytchk == 0x03 else blocks * bs


def _b10(cdb: bytes) -> int:
    return (cdb[7] << 8) | cdb[8]


def _b12(cdb: bytes) -> int:
    return int.from_bytes(cdb[6:10], "big")


def _b16(cdb: bytes) -> int:
    return int.from_bytes(cdb[10:14], "big")


# Data-Out length by opcode, from the CDB and the block size (SBC-3 §5, SPC-4 §6).
_DATA_OUT: Final[dict[int, Callable[[bytes, int], int]]] = {
    0x0A: lambda c, bs: (c[4] or 256) * bs,
    0x2A: lambda c, bs: _b10(c) * bs,
    0x2E: lambda c, bs: _b10(c) * bs,
    0x2F: lambda c, bs: _verify_out(_b10(c), c, bs),
    0xAA: lambda c, bs: _b12(c) * bs,
    0xAE: lambda c, bs: _b12(c) * bs,
    0xAF: lambda c, bs: _verify_out(_b12(c), c, bs),
    0x8A: lambda c, bs: _b16(c) * bs,
    0x8B: lambda c, bs: _b16(c) * bs,
    0x8E: lambda c, bs: _b16(c) * bs,
    0x8F: lambda c, bs: _verify_out(_b16(c), c, bs),
    0x41: lambda c, bs: bs,
    0x93: lambda c, bs: 0 if c[1] & 0x01 else bs,
    0x89: lambda c, bs: 2 * c[13] * bs if len(c) > 13 else 0,
    0x42: lambda c, bs: _b10(c),
    0x15: lambda c, bs: c[4],
    0x55: lambda c, bs: _b10(c),
    0x5F: lambda c, bs: int.from_bytes(c[5:9], "big"),
    0x83: lambda c, bs: _b16(c),
    0x48: lambda c, bs: _b10(c),
}

_GOOD: Final = Status.GOOD
_CHECK: Final = Status.CHECK_CONDITION
# The answer of every command that finished GOOD with nothing to return (each plain WRITE): one object for all of them,
# as a response is never altered once made.
_GOOD_RESPONSE: Final = ScsiResponse(_GOOD)


class ScsiTarget:
    """A SCSI target device exposing logical units to I_T nexuses.

    ``port_groups`` maps target port group identifiers to the relative target port identifiers in each group (VPD
    0x83 and REPORT TARGET PORT GROUPS report them); by default one group 1 holds relative port 1.
    """

    def __init__(
        self,
        name: str,
        luns: Mapping[int, LogicalUnit] | None = None,
        *,
        port_groups: Mapping[int, tuple[int, ...]] | None = None,
    ) -> None:
        self.name = name
        self._luns: dict[int, LogicalUnit] = dict(luns or {})
        # LUN masking (a restore's "maintenance mode"): an LU listed here is seen only by these initiator names.
        self.masked: dict[LogicalUnit, frozenset[str]] = {}
        self.port_groups: dict[int, tuple[int, ...]] = dict(port_groups or {1: (1,)})
        self._group_of_port = {port: group for group, ports in self.port_groups.items() for port in ports}

    # -- the LUN map ------------------------------------------------------------------------------------------------

    @property
    def luns(self) -> Mapping[int, LogicalUnit]:
        """The live LUN map, read-only by contract (no copy: the portal consults it per command)."""
        return self._luns

    def luns_for(self, nexus: Nexus) -> dict[int, LogicalUnit]:
        """The LUNs visible to ``nexus``: every LUN but those masked from its initiator."""
        if not self.masked:
            return self._luns
        return {n: lu for n, lu in self._luns.items() if self.visible(lu, nexus)}

    def visible(self, lu: LogicalUnit, nexus: Nexus) -> bool:
        allowed = self.masked.get(lu)
        return allowed is None or nexus.initiator_name.lower() in allowed

    def lun(self, n: int) -> LogicalUnit | None:
        return self._luns.get(n)

    def has_lun(self, lun: int) -> bool:
        return lun in self._luns

    def lun_name(self, lun: int) -> str | None:
        """The LU's name (its LUN number as text when it has none), or ``None`` when LUN ``lun`` does not exist."""
        lu = self._luns.get(lun)
        if lu is None:
            return None
        return lu.name or str(lun)

    def add_lun(self, n: int, lu: LogicalUnit) -> None:
        """Expose ``lu`` as LUN ``n``; the other LUNs' nexuses see REPORTED LUNS DATA HAS CHANGED."""
        if not 0 <= n < 16384:
            raise ValueError(f"LUN {n} outside 0..16383")
        if n in self._luns:
            raise ValueError(f"LUN {n} already exists")
        for other in self._luns.values():
            other.add_ua_all(S.REPORTED_LUNS_DATA_HAS_CHANGED)
        self._luns[n] = lu

    def remove_lun(self, n: int) -> LogicalUnit:
        """Stop exposing LUN ``n`` and return it; the remaining LUNs report REPORTED LUNS DATA HAS CHANGED."""
        lu = self._luns.pop(n)
        for other in self._luns.values():
            other.add_ua_all(S.REPORTED_LUNS_DATA_HAS_CHANGED)
        return lu

    def notify_capacity_changed(self, n: int) -> None:
        """LUN ``n`` was resized: its nexuses see CAPACITY DATA HAS CHANGED."""
        self._luns[n].notify_capacity_changed()

    def port_group_of(self, nexus: Nexus) -> int:
        return self._group_of_port.get(nexus.relative_port, nexus.tpgt)

    # -- execution --------------------------------------------------------------------------------------------------

    async def execute(self, task: ScsiTask) -> ScsiResponse:
        """Run one command to completion and return its status, data and sense."""
        now = self.execute_now(task)
        return now if isinstance(now, ScsiResponse) else await now

    def execute_now(self, task: ScsiTask) -> ScsiResponse | Awaitable[ScsiResponse]:
        """Run one command as far as it goes without waiting: its response when it finished within this call (every
        check's CHECK CONDITION, a WRITE that landed inline), else an awaitable of the response. Not a coroutine, so
        a command that never waits costs the per-command path no coroutine object here."""
        lu = self._luns.get(task.lun)
        if lu is not None and self.masked and not self.visible(lu, task.nexus):
            lu = None  # a masked LUN is absent for this initiator
        cdb = task.cdb
        spec = None
        try:
            if lu is None and (not cdb or cdb[0] not in _NO_LUN_OPCODES):
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.LOGICAL_UNIT_NOT_SUPPORTED)
            spec = lookup(cdb)
            if lu is not None:
                if spec.reports_ua:
                    ua = lu.take_ua(task.nexus)
                    if ua is not None:
                        raise CheckCondition(SenseKey.UNIT_ATTENTION, ua)
                sanitize = lu.sanitize
                if sanitize is not None and not spec.sanitize_ok and not (sanitize.failed and cdb[0] == 0x48):
                    raise sanitize.check()
                if lu.legacy_holder is not None or lu.pr.res_type:
                    _pr.check_conflict(lu, spec, task.nexus)
            pending = spec.handler(Request(self, lu, task))
        except (CheckCondition, ReservationConflict, StorageError) as exc:
            return _refused(exc, spec)
        if pending is DONE:  # finished inside the call (a WRITE that landed inline): nothing to await
            return _GOOD_RESPONSE
        return _finish(pending, spec)

    def data_out_length(self, task: ScsiTask) -> int | None:
        """The number of Data-Out bytes the CDB of ``task`` asks for (its SCSI transfer length), or ``None`` when the
        command moves no Data-Out or the LUN is absent.

        The transport needs this, and only this, to set the overflow/underflow residual of a write against the iSCSI
        expected data transfer length without parsing CDBs itself (RFC 7143 §11.4.5.1).
        """
        cdb = task.cdb
        lu = self._luns.get(task.lun)
        if lu is None or not cdb:
            return None
        rule = _DATA_OUT.get(cdb[0])
        if rule is None or len(cdb) < 6:
            return None
        return rule(cdb, lu.block_size)

    # -- task management and nexus events ---------------------------------------------------------------------------

    def reset(self, function: TmfFunction, nexus: Nexus, lun: int | None = None) -> None:
        """Apply the SCSI side effects of a task management function (the transport aborts the tasks itself).

        LOGICAL UNIT RESET clears RESERVE(6/10) reservations and PREVENT on that LU and gives every nexus BUS DEVICE
        RESET FUNCTION OCCURRED (the issuing nexus too); TARGET WARM/COLD RESET does the same on every LU with
        POWER ON, RESET. CLEAR TASK SET
        tells the other nexuses COMMANDS CLEARED BY ANOTHER INITIATOR. Persistent reservations are never affected.
        """
        if function == TmfFunction.LOGICAL_UNIT_RESET:
            lu = self._luns.get(lun) if lun is not None else None
            if lu is not None:
                lu.reset(asc=S.BUS_DEVICE_RESET_FUNCTION)
        elif function in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            for lu in self._luns.values():
                lu.reset(asc=S.POWER_ON_RESET)
        elif function == TmfFunction.CLEAR_TASK_SET:
            lu = self._luns.get(lun) if lun is not None else None
            if lu is not None:
                lu.add_ua_all(S.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR, except_nexus=nexus)

    def take_peer_waits(self) -> list[Awaitable[None]]:
        return [w for lu in self._luns.values() for w in lu.take_peer_waits()]

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus ended (logout, session reinstatement, connection loss without recovery).

        RESERVE(6/10) reservations and PREVENT held by it are released (SPC-2 §5.5.1); persistent reservations and
        registrations survive, as SPC-4 requires. The nexus sees I_T NEXUS LOSS OCCURRED if it comes back.
        """
        for lu in self._luns.values():
            if lu.legacy_holder == nexus:
                lu.legacy_holder = None
            lu.prevent.discard(nexus)
            lu.add_ua(nexus, S.I_T_NEXUS_LOSS)


async def _finish(pending: Awaitable[Result], spec: CommandSpec) -> ScsiResponse:
    """The rest of a command whose handler has to wait: its result, or its refusal, as the response."""
    try:
        result = await pending
    except (CheckCondition, ReservationConflict, StorageError) as exc:
        return _refused(exc, spec)
    if result is None:
        return _GOOD_RESPONSE
    if isinstance(result, ScsiResponse):
        return result
    return ScsiResponse(_GOOD, result)


def _refused(exc: CheckCondition | ReservationConflict | StorageError, spec: CommandSpec | None) -> ScsiResponse:
    # One except clause per caller with one name: mypyc miscompiled a name reused across two except clauses.
    if isinstance(exc, CheckCondition):
        return ScsiResponse(_CHECK, None, exc.sense())
    if isinstance(exc, ReservationConflict):
        return ScsiResponse(Status.RESERVATION_CONFLICT)
    if isinstance(exc, Saturated):
        return ScsiResponse(Status.TASK_SET_FULL)  # SAM-5 §5.3: the LUN's queue is full; retry later
    write = spec is not None and spec.data is Dir.OUT
    return ScsiResponse(_CHECK, None, S.storage_error_to_check(exc, write=write).sense())
