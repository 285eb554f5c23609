"""The SCSI command table: one entry per (operation code, service action) with its metadata.

Every handler is registered with :func:`command`, which records the data direction, the reservation-conflict rule,
whether the command may run on an absent LUN, the CDB length and the CDB usage mask. The dispatcher in
:mod:`lunsync.target.scsi.target` looks commands up here (a 256-entry list, with a per-opcode service-action map for
the few commands that have one), and REPORT SUPPORTED OPERATION CODES answers from the same metadata, so what is
reported and what is executed can never disagree. A missing entry is INVALID COMMAND OPERATION CODE; a missing
service action of a known opcode is INVALID FIELD IN CDB pointing at the service-action field.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from lunsync.snapshots.device import Buffer
from lunsync.target.scsi.sense import INVALID_FIELD_IN_CDB, CheckCondition, SenseKey, invalid_opcode
from lunsync.target.scsi.task import ScsiResponse, ScsiTask

if TYPE_CHECKING:
    from lunsync.target.scsi.lu import LogicalUnit
    from lunsync.target.scsi.target import ScsiTarget


class Dir(enum.Enum):
    """Data direction of a command."""

    NONE = 0
    IN = 1
    OUT = 2


class Conflict(enum.Enum):
    """How a command fares against a reservation held by someone else (SPC-4 §5.13.1 Table 63, SBC-3 §4.17)."""

    NEVER = 0  # allowed under every reservation (INQUIRY, REPORT LUNS, TEST UNIT READY, ...)
    READ = 1  # a read: conflicts only under the exclusive-access types
    WRITE = 2  # a write or state change: conflicts under every type
    PR = 3  # PERSISTENT RESERVE IN/OUT: their own rules (pr.py); never a persistent-reservation conflict
    LEGACY = 4  # RESERVE/RELEASE (6/10): conflict whenever persistent reservations are in use


class Request:
    """One command on its way through a handler: the target, the logical unit (``None`` only for the commands
    registered with ``allowed_without_lun``), the task and its CDB."""

    __slots__ = ("cdb", "lu", "target", "task")

    def __init__(self, target: ScsiTarget, lu: LogicalUnit | None, task: ScsiTask) -> None:
        self.target = target
        self.lu = lu
        self.task = task
        self.cdb = task.cdb

    @property
    def unit(self) -> LogicalUnit:
        """The logical unit; only ``allowed_without_lun`` handlers may see ``None``, so this never fails elsewhere."""
        lu = self.lu
        if lu is None:  # pragma: no cover - guarded by the dispatcher
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, (0x25, 0x00))
        return lu


Result = Buffer | ScsiResponse | None
Handler = Callable[[Request], Awaitable[Result]]


class _Done:
    """The awaitable of a command that finished inside its handler's call (a WRITE that landed inline)."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator that ends at once: awaiting it yields nothing


# A handler that completed with no result returns this rather than a coroutine, which the dispatcher need not await
# (one coroutine object per command saved); awaiting it anyway is harmless.
DONE: Final = _Done()


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """Everything the dispatcher and REPORT SUPPORTED OPERATION CODES know about one command."""

    opcode: int
    service_action: int | None
    name: str
    handler: Handler
    data: Dir
    conflicts: Conflict
    allowed_without_lun: bool
    legacy_ok: bool  # allowed while another I_T nexus holds a RESERVE(6/10) reservation (SPC-2 §5.5.1)
    reports_ua: bool  # False for INQUIRY, REPORT LUNS, REQUEST SENSE (SAM-5 §5.14)
    sanitize_ok: bool  # served while a SANITIZE runs or after one failed (SBC-3 §4.33): INQUIRY, REPORT LUNS, REQUEST SENSE
    cdb_len: int
    usage: bytes  # CDB USAGE DATA (SPC-4 §6.35.3)
    timeout_s: int  # nominal and recommended command timeout for the RCTD descriptor


def cdb_length(opcode: int) -> int:
    """CDB length by group code (SPC-4 §4.2.5.1)."""
    group = opcode >> 5
    return (6, 10, 10, 0, 16, 12, 0, 0)[group] or 16


# Opcodes whose service action lives in the low five bits of CDB byte 1.
_SA_OPCODES: Final = frozenset({0x48, 0x5E, 0x5F, 0x83, 0x84, 0x9E, 0x9F, 0xA3, 0xA4})

_TABLE: Final[list[CommandSpec | dict[int, CommandSpec] | None]] = [None] * 256


def _default_usage(opcode: int, sa: int | None, n: int) -> bytes:
    usage = bytearray(b"\xff" * n)
    usage[0] = opcode
    usage[-1] = 0x00  # control byte: no NACA, no vendor bits
    if sa is not None:
        usage[1] = 0xE0 | sa  # SPC-4: the service-action bits carry the value, not a mask
    return bytes(usage)


def command(
    opcode: int,
    service_action: int | None = None,
    *,
    data: Dir = Dir.NONE,
    conflicts: Conflict = Conflict.WRITE,
    allowed_without_lun: bool = False,
    legacy_ok: bool = False,
    reports_ua: bool = True,
    sanitize_ok: bool = False,
    usage: bytes | None = None,
    timeout_s: int = 30,
    name: str | None = None,
) -> Callable[[Handler], Handler]:
    """Register ``handler`` for ``opcode`` (and ``service_action``). A duplicate registration is a bug."""

    def register(handler: Handler) -> Handler:
        n = cdb_length(opcode)
        spec = CommandSpec(
            opcode=opcode,
            service_action=service_action,
            name=name or handler.__name__.upper(),
            handler=handler,
            data=data,
            conflicts=conflicts,
            allowed_without_lun=allowed_without_lun,
            legacy_ok=bool(legacy_ok),
            reports_ua=reports_ua,
            sanitize_ok=sanitize_ok,
            cdb_len=n,
            usage=usage if usage is not None else _default_usage(opcode, service_action, n),
            timeout_s=timeout_s,
        )
        if len(spec.usage) != n or spec.usage[0] != opcode:
            raise ValueError(f"bad CDB usage mask for {spec.name}")
        slot = _TABLE[opcode]
        if service_action is None:
            if slot is not None or opcode in _SA_OPCODES:
                raise ValueError(f"opcode {opcode:#04x} registered twice or needs a service action")
            _TABLE[opcode] = spec
        else:
            if opcode not in _SA_OPCODES:
                raise ValueError(f"opcode {opcode:#04x} has no service-action field")
            if slot is None:
                slot = {}
                _TABLE[opcode] = slot
            assert isinstance(slot, dict)
            if service_action in slot:
                raise ValueError(f"{opcode:#04x}/{service_action:#04x} registered twice")
            slot[service_action] = spec
        return handler

    return register


def lookup(cdb: bytes) -> CommandSpec:
    """Find the command for ``cdb``; raise the CHECK CONDITION an unsupported one deserves."""
    if not cdb:
        raise invalid_opcode()
    slot = _TABLE[cdb[0]]
    if slot is None:
        raise invalid_opcode()
    if isinstance(slot, CommandSpec):
        return slot
    if len(cdb) < 2:
        raise invalid_opcode()
    spec = slot.get(cdb[1] & 0x1F)
    if spec is None:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
    return spec


def find(opcode: int, service_action: int | None = None) -> CommandSpec | dict[int, CommandSpec] | None:
    """The table entry for ``opcode``: a spec, the service-action map, or ``None``."""
    slot = _TABLE[opcode & 0xFF]
    if service_action is not None and isinstance(slot, dict):
        return slot.get(service_action)
    return slot


def all_commands() -> Iterator[CommandSpec]:
    """Every registered command, in opcode then service-action order."""
    for slot in _TABLE:
        if slot is None:
            continue
        if isinstance(slot, CommandSpec):
            yield slot
        else:
            for sa in sorted(slot):
                yield slot[sa]


def has_service_actions(opcode: int) -> bool:
    """True when ``opcode`` is dispatched by service action."""
    return isinstance(_TABLE[opcode & 0xFF], dict)
