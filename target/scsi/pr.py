"""Reservations: PERSISTENT RESERVE IN/OUT (SPC-4 §5.13, §6.15, §6.16), RESERVE/RELEASE (6/10) and the conflict rule.

:class:`PrState` holds one logical unit's registrations and persistent reservation, and keeps them in a
:class:`PrStore`. The local :class:`FileStore` writes them (with APTPL only) to the path the LU was given,
atomically (temp file, fsync, rename, directory fsync), so a restart restores exactly what the initiators were told.
A LU that several gateways serve has a shared store instead (one RADOS object, :mod:`lunsync.provider.gateway`):
every PR command then re-reads the state before deciding and commits with compare-and-write, retrying on a lost
race, and the other gateways adopt each commit as it happens (:func:`adopt`), so the conflict check of every command
sees every gateway's reservation. :func:`conflicts` is the one place that decides whether a command from an I_T nexus runs
into someone else's reservation, from the command's registered :class:`~lunsync.target.scsi.registry.Conflict` rule.
Registrations and reservations belong to I_T nexuses named by iSCSI initiator and target port names, so they survive
logout and reconnection with the same ISID, as SPC requires. All PR OUT service actions are supported except
REPLACE LOST RESERVATION; all PR IN service actions are supported. TransportIDs are iSCSI (protocol 5), format 00b or
01b on input and 01b (with ISID) on output.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from lunsync.snapshots import fsutil
from lunsync.target.scsi import sense as S
from lunsync.target.scsi.registry import Conflict, Dir, Request, command
from lunsync.target.scsi.sense import (
    CheckCondition,
    ReservationConflict,
    SenseKey,
    invalid_field,
    invalid_opcode,
    invalid_param,
)
from lunsync.target.scsi.task import Nexus

if TYPE_CHECKING:
    from lunsync.target.scsi.lu import LogicalUnit
    from lunsync.target.scsi.registry import CommandSpec

# Reservation types (SPC-4 Table 173).
WR_EX = 1
EX_AC = 3
WR_EX_RO = 5
EX_AC_RO = 6
WR_EX_AR = 7
EX_AC_AR = 8
_TYPES = frozenset({WR_EX, EX_AC, WR_EX_RO, EX_AC_RO, WR_EX_AR, EX_AC_AR})
_ALL_REGISTRANTS = frozenset({WR_EX_AR, EX_AC_AR})
_REGISTRANTS = frozenset({WR_EX_RO, EX_AC_RO, WR_EX_AR, EX_AC_AR})
_EXCLUSIVE_ACCESS = frozenset({EX_AC, EX_AC_RO, EX_AC_AR})

# PR OUT service actions (SPC-4 Table 170).
SA_REGISTER = 0
SA_RESERVE = 1
SA_RELEASE = 2
SA_CLEAR = 3
SA_PREEMPT = 4
SA_PREEMPT_AND_ABORT = 5
SA_REGISTER_AND_IGNORE = 6
SA_REGISTER_AND_MOVE = 7

_PROTO_ISCSI = 5
_PROUT_PARAMS = struct.Struct(">QQ4xBx2x")  # SPC-4 §6.16.3 Table 176, the 24-byte basic list
_MOVE_PARAMS = struct.Struct(">QQxBHI")  # SPC-4 §6.16.4 Table 178, the 24-byte header of REGISTER AND MOVE
_PRIN_CDB = struct.Struct(">BB5xHB")
_PROUT_CDB = struct.Struct(">BBB2xIB")


@dataclass(slots=True)
class Registration:
    """One registered I_T nexus (or, with ``all_tg_pt``, one initiator port on every target port)."""

    key: int
    initiator_name: str
    isid: int
    target_port: str
    rel_tgt_port: int = 1
    all_tg_pt: bool = False

    @property
    def initiator_port(self) -> str:
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    def matches(self, nexus: Nexus) -> bool:
        return (
            nexus.initiator_name == self.initiator_name
            and nexus.isid == self.isid
            and (self.all_tg_pt or nexus.target_port == self.target_port)
        )


class StalePr(Exception):
    """A shared store refused a commit: another gateway changed the state since it was read. Re-read and retry."""


class PrStore(Protocol):
    """Where a LU's persistent-reservation state lives between commands.

    ``fetch`` returns the stored document when it may differ from what this gateway last committed or adopted (a
    shared store), or ``None`` when memory is authoritative (a local store). ``commit`` makes ``doc`` the state,
    durable on return, or raises :class:`StalePr` when the stored state moved since the last fetch. Neither blocks
    the event loop on the network.
    """

    shared: bool

    async def fetch(self) -> dict[str, Any] | None: ...

    async def commit(self, doc: dict[str, Any]) -> None: ...


class FileStore:
    """The local store: the state in memory, written to ``path`` while APTPL is set and removed when it is cleared
    (without APTPL, SPC-4 §5.13.3 lets a power loss forget it)."""

    shared = False

    def __init__(self, path: str | None) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        if not self.path or not os.path.exists(self.path):
            return None
        with open(self.path) as f:
            doc: dict[str, Any] = json.load(f)
        doc["aptpl"] = True  # only an APTPL state is ever written
        return doc

    async def fetch(self) -> dict[str, Any] | None:
        return None

    async def commit(self, doc: dict[str, Any]) -> None:
        path = self.path
        if not path:
            return
        if not doc.get("aptpl"):
            if os.path.exists(path):
                os.unlink(path)
                fsutil.fsync_dir(os.path.dirname(path) or ".")
            return
        fsutil.atomic_write(path, json.dumps(doc))


class PrState:
    """Registrations and the persistent reservation of one logical unit."""

    def __init__(self, aptpl_path: str | None = None, *, store: PrStore | None = None) -> None:
        self.generation = 0
        self.registrations: list[Registration] = []
        self.res_type = 0  # 0: no persistent reservation
        self.holder: Registration | None = None
        self.aptpl = False
        # PR commands of one LU run one at a time: a commit to a shared store awaits the network, and another
        # command must not change the state under it.
        self.lock = asyncio.Lock()
        if store is None:
            local = FileStore(aptpl_path)
            doc = local.load()
            if doc is not None:
                self.apply(doc)
            store = local
        self.store: PrStore = store

    # -- queries -------------------------------------------------------------------------------------------------------

    @property
    def in_use(self) -> bool:
        """True once any registration or reservation exists: RESERVE/RELEASE (6/10) then conflict."""
        return bool(self.registrations) or self.res_type != 0

    def find(self, nexus: Nexus) -> Registration | None:
        for reg in self.registrations:
            if reg.matches(nexus):
                return reg
        return None

    def is_holder(self, nexus: Nexus) -> bool:
        if not self.res_type:
            return False
        if self.res_type in _ALL_REGISTRANTS:
            return self.find(nexus) is not None
        return self.holder is not None and self.holder.matches(nexus)

    def conflicts(self, nexus: Nexus, rule: Conflict) -> bool:
        """Does a command with ``rule`` from ``nexus`` conflict with the persistent reservation?"""
        t = self.res_type
        if not t or rule is Conflict.NEVER or rule is Conflict.PR:
            return False
        if rule is Conflict.LEGACY:
            return True
        if self.is_holder(nexus):
            return False
        if t in _REGISTRANTS and self.find(nexus) is not None:
            return False
        if t in _EXCLUSIVE_ACCESS:
            return True
        return rule is Conflict.WRITE

    # -- serialisation (pure) ------------------------------------------------------------------------------------------

    def doc(self) -> dict[str, Any]:
        """The whole state as a JSON-able document (what every store holds)."""
        return {
            "generation": self.generation,
            "registrations": [asdict(r) for r in self.registrations],
            "res_type": self.res_type,
            "holder": self.registrations.index(self.holder) if self.holder in self.registrations else None,
            "aptpl": self.aptpl,
        }

    def apply(self, doc: dict[str, Any]) -> None:
        """Replace the state with ``doc`` (from :meth:`doc`, here or on another gateway). A reservation whose holder
        is missing (only all-registrants types have none) is dropped rather than trusted."""
        self.generation = int(doc.get("generation", 0))
        self.registrations = [Registration(**r) for r in doc.get("registrations", [])]
        self.res_type = int(doc.get("res_type", 0))
        idx = doc.get("holder")
        self.holder = self.registrations[idx] if isinstance(idx, int) and 0 <= idx < len(self.registrations) else None
        if self.res_type and self.res_type not in _ALL_REGISTRANTS and self.holder is None:
            self.res_type = 0
        self.aptpl = bool(doc.get("aptpl", False))

    # -- persistence ---------------------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Adopt the stored state if the store is shared (another gateway may have changed it)."""
        doc = await self.store.fetch()
        if doc is not None:
            self.apply(doc)

    async def save(self) -> None:
        """Commit the state to the store; durable when this returns. :class:`StalePr` from a shared store means the
        decision was taken on old state: the caller re-reads and decides again."""
        await self.store.commit(self.doc())


def adopt(lu: LogicalUnit, doc: dict[str, Any]) -> None:
    """Another gateway committed ``doc``: make it this LU's state, and tell the nexuses here what it did to them.

    A local nexus whose registration vanished was preempted from elsewhere (SPC-4 §5.13.11.4): it sees REGISTRATIONS
    PREEMPTED, or RESERVATIONS PREEMPTED when every registration went (a CLEAR, §5.13.11.6); a registrants-only
    reservation that vanished while its registrants remain was released: they see RESERVATIONS RELEASED.
    """
    pr = lu.pr
    before = list(pr.registrations)
    released = pr.res_type in _REGISTRANTS
    pr.apply(doc)
    after = {(r.initiator_name, r.isid, r.target_port) for r in pr.registrations}
    why = S.REGISTRATIONS_PREEMPTED if pr.registrations else S.RESERVATIONS_PREEMPTED
    for n in lu.known_nexuses():
        lost = any(r.matches(n) and (r.initiator_name, r.isid, r.target_port) not in after for r in before)
        if lost:
            lu.add_ua(n, why)
        elif released and not pr.res_type and pr.find(n) is not None:
            lu.add_ua(n, S.RESERVATIONS_RELEASED)


_CAS_TRIES = 8
_H = TypeVar("_H")


def _serialised(handler: Callable[[Request], Awaitable[_H]]) -> Callable[[Request], Awaitable[_H]]:
    """Run a PR command alone on its LU, on fresh state, and again when a shared store says another gateway won a
    race (its :class:`StalePr`); each try re-reads before deciding, so the decision is always on the current state."""

    @functools.wraps(handler)
    async def run(req: Request) -> _H:
        pr = req.unit.pr
        async with pr.lock:
            for _ in range(_CAS_TRIES - 1):
                await pr.refresh()
                try:
                    return await handler(req)
                except StalePr:
                    continue
            await pr.refresh()
            try:
                return await handler(req)
            except StalePr:
                # Eight lost races in a row: the other gateways are busier than this command is patient.
                raise CheckCondition(SenseKey.ABORTED_COMMAND, S.NO_ADDITIONAL_SENSE) from None

    return run


def check_conflict(lu: LogicalUnit, spec: CommandSpec, nexus: Nexus) -> None:
    """Raise :class:`ReservationConflict` when ``spec`` from ``nexus`` runs into a reservation on ``lu``."""
    holder = lu.legacy_holder
    if holder is not None and holder != nexus and not spec.legacy_ok:
        raise ReservationConflict()
    if lu.pr.res_type and lu.pr.conflicts(nexus, spec.conflicts):
        raise ReservationConflict()


# -- TransportIDs (SPC-4 §7.6.4.6) -------------------------------------------------------------------------------------


def encode_transport_id(initiator_name: str, isid: int) -> bytes:
    """An iSCSI TransportID, format 01b (name plus ISID), NUL-terminated and padded to a multiple of four."""
    name = f"{initiator_name},i,0x{isid:012x}".encode() + b"\x00"
    name += b"\x00" * (-len(name) % 4)
    if len(name) < 20:
        name += b"\x00" * (20 - len(name))
    return bytes((0x40 | _PROTO_ISCSI, 0)) + len(name).to_bytes(2, "big") + name


def decode_transport_id(buf: bytes, offset: int) -> tuple[str, int | None, int]:
    """Parse an iSCSI TransportID at ``offset``: (initiator name, ISID or None for any, bytes consumed)."""
    if len(buf) < offset + 4:
        raise S.param_list_length_error()
    b0 = buf[offset]
    if b0 & 0x0F != _PROTO_ISCSI:
        raise invalid_param(offset, 3)
    fmt = b0 >> 6
    length = int.from_bytes(buf[offset + 2 : offset + 4], "big")
    end = offset + 4 + length
    if len(buf) < end:
        raise S.param_list_length_error()
    text = bytes(buf[offset + 4 : end]).split(b"\x00", 1)[0].decode("utf-8", "replace")
    if fmt == 0:
        return text, None, 4 + length
    if fmt == 1:
        name, sep, rest = text.partition(",i,0x")
        if not sep:
            raise invalid_param(offset + 4)
        try:
            isid = int(rest, 16)
        except ValueError:
            raise invalid_param(offset + 4) from None
        return name, isid, 4 + length
    raise invalid_param(offset, 7)


# -- PERSISTENT RESERVE IN -----------------------------------------------------------------------------------------------


@command(0x5E, 0x00, data=Dir.IN, conflicts=Conflict.PR, legacy_ok=True, name="PERSISTENT RESERVE IN/READ KEYS")
@_serialised
async def prin_read_keys(req: Request) -> bytes:
    pr = req.unit.pr
    keys = b"".join(r.key.to_bytes(8, "big") for r in pr.registrations)
    return _alloc(req.cdb, struct.pack(">II", pr.generation, len(keys)) + keys)


@command(0x5E, 0x01, data=Dir.IN, conflicts=Conflict.PR, legacy_ok=True, name="PERSISTENT RESERVE IN/READ RESERVATION")
@_serialised
async def prin_read_reservation(req: Request) -> bytes:
    pr = req.unit.pr
    if not pr.res_type:
        return _alloc(req.cdb, struct.pack(">II", pr.generation, 0))
    key = 0 if pr.res_type in _ALL_REGISTRANTS or pr.holder is None else pr.holder.key
    body = struct.pack(">QIxBH", key, 0, pr.res_type & 0x0F, 0)
    return _alloc(req.cdb, struct.pack(">II", pr.generation, len(body)) + body)


@command(0x5E, 0x02, data=Dir.IN, conflicts=Conflict.PR, legacy_ok=True, name="PERSISTENT RESERVE IN/REPORT CAPABILITIES")
@_serialised
async def prin_report_capabilities(req: Request) -> bytes:
    pr = req.unit.pr
    # CRH 1, SIP_C 1, ATP_C 1, PTPL_C 1 | TMV 1, ALLOW COMMANDS 001b (SPC-4 Table 186), PTPL_A
    flags = 0x10 | 0x08 | 0x04 | 0x01
    flags2 = 0x80 | 0x10 | (0x01 if pr.aptpl else 0)
    mask = 0x80 | 0x40 | 0x20 | 0x08 | 0x02  # WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX
    return _alloc(req.cdb, struct.pack(">HBBBBH", 8, flags, flags2, mask, 0x01, 0))


@command(0x5E, 0x03, data=Dir.IN, conflicts=Conflict.PR, legacy_ok=True, name="PERSISTENT RESERVE IN/READ FULL STATUS")
@_serialised
async def prin_read_full_status(req: Request) -> bytes:
    pr = req.unit.pr
    out = bytearray()
    for reg in pr.registrations:
        tid = encode_transport_id(reg.initiator_name, reg.isid)
        holder = pr.res_type in _ALL_REGISTRANTS or (pr.res_type != 0 and reg is pr.holder)
        flags = (0x02 if reg.all_tg_pt else 0) | (0x01 if holder else 0)
        out += struct.pack(">Q4xBB4xHI", reg.key, flags, (pr.res_type & 0x0F) if holder else 0, reg.rel_tgt_port, len(tid))
        out += tid
    return _alloc(req.cdb, struct.pack(">II", pr.generation, len(out)) + bytes(out))


def _alloc(cdb: bytes, data: bytes) -> bytes:
    return data[: int.from_bytes(cdb[7:9], "big")]


# -- PERSISTENT RESERVE OUT ----------------------------------------------------------------------------------------------


def _prout_params(req: Request, *, variable: bool = False) -> tuple[bytes, int, int, int, int]:
    """Check the CDB and the parameter list; return (list, key, sa_key, flags byte, type)."""
    cdb = req.cdb
    scope_type = cdb[2]
    length = int.from_bytes(cdb[5:9], "big")
    data = bytes(req.task.data_out or b"")[:length]
    if len(data) < length:
        raise S.param_list_length_error()
    if not variable and length != 24:
        raise S.param_list_length_error()
    if length < 24:
        raise S.param_list_length_error()
    key, sa_key, flags = _PROUT_PARAMS.unpack_from(data, 0)
    return data, key, sa_key, flags, scope_type


def _holder_of_key(pr: PrState, nexus: Nexus, key: int) -> Registration:
    """The registration of ``nexus`` if ``key`` is its reservation key; otherwise RESERVATION CONFLICT (SPC-4
    §5.13.2: a PERSISTENT RESERVE OUT with a key the nexus is not registered with conflicts)."""
    reg = pr.find(nexus)
    if reg is None or reg.key != key:
        raise ReservationConflict()
    return reg


def _check_type(cdb: bytes) -> int:
    scope, rtype = cdb[2] >> 4, cdb[2] & 0x0F
    if scope != 0:
        raise invalid_field(2, 7)
    if rtype not in _TYPES:
        raise invalid_field(2, 3)
    return rtype


def _legacy_guard(lu: LogicalUnit, nexus: Nexus) -> None:
    if lu.legacy_holder is not None and lu.legacy_holder != nexus:
        raise ReservationConflict()


def _release_reservation(lu: LogicalUnit, nexus: Nexus | None, *, notify: bool) -> None:
    pr = lu.pr
    released_type = pr.res_type
    pr.res_type = 0
    pr.holder = None
    if notify and released_type in _REGISTRANTS:
        # SPC-4 §5.13.11.2.2: registrants other than the releaser learn of it.
        for reg in pr.registrations:
            for n in lu.known_nexuses():
                if reg.matches(n) and n != nexus:
                    lu.add_ua(n, S.RESERVATIONS_RELEASED)


def _unregister(lu: LogicalUnit, reg: Registration, nexus: Nexus | None) -> None:
    pr = lu.pr
    pr.registrations.remove(reg)
    if not pr.res_type:
        return
    if pr.res_type in _ALL_REGISTRANTS:
        if not pr.registrations:
            _release_reservation(lu, nexus, notify=False)
    elif pr.holder is reg:
        _release_reservation(lu, nexus, notify=True)


@command(0x5F, SA_REGISTER, data=Dir.OUT, conflicts=Conflict.PR, name="PERSISTENT RESERVE OUT/REGISTER")
@_serialised
async def prout_register(req: Request) -> None:
    await _register(req, ignore_key=False)


@command(0x5F, SA_REGISTER_AND_IGNORE, data=Dir.OUT, conflicts=Conflict.PR,
         name="PERSISTENT RESERVE OUT/REGISTER AND IGNORE EXISTING KEY")
@_serialised
async def prout_register_and_ignore(req: Request) -> None:
    await _register(req, ignore_key=True)


async def _register(req: Request, *, ignore_key: bool) -> None:
    lu = req.unit
    nexus = req.task.nexus
    _legacy_guard(lu, nexus)
    data, key, sa_key, flags, _ = _prout_params(req, variable=True)
    spec_i_pt = bool(flags & 0x08)
    all_tg_pt = bool(flags & 0x04)
    aptpl = bool(flags & 0x01)
    if not spec_i_pt and len(data) != 24:
        raise S.param_list_length_error()
    pr = lu.pr
    reg = pr.find(nexus)
    if reg is None:
        if not ignore_key and key != 0:
            raise ReservationConflict()
        if sa_key == 0:
            return  # SPC-4 §5.13.7: unregistering an unregistered nexus is a no-op
        extra: list[tuple[str, int | None]] = []
        if spec_i_pt:
            if ignore_key:
                raise invalid_param(20, 3)
            extra = _spec_i_pt_list(data, nexus)
        pr.registrations.append(
            Registration(sa_key, nexus.initiator_name, nexus.isid, nexus.target_port, nexus.relative_port, all_tg_pt)
        )
        for name, isid in extra:
            if isid is None:
                continue  # a name-only TransportID names no port we could address; ignore it
            probe = Nexus(name, isid, nexus.target_name, nexus.tpgt, nexus.relative_port)
            if pr.find(probe) is None:
                pr.registrations.append(
                    Registration(sa_key, name, isid, nexus.target_port, nexus.relative_port, all_tg_pt)
                )
    else:
        if spec_i_pt:
            raise invalid_param(20, 3)
        if not ignore_key and key != reg.key:
            raise ReservationConflict()
        if sa_key == 0:
            _unregister(lu, reg, nexus)
        else:
            reg.key = sa_key
    pr.generation += 1
    pr.aptpl = aptpl
    await pr.save()


def _spec_i_pt_list(data: bytes, nexus: Nexus) -> list[tuple[str, int | None]]:
    if len(data) < 28:
        raise S.param_list_length_error()
    total = int.from_bytes(data[24:28], "big")
    if 28 + total > len(data):
        raise S.param_list_length_error()
    out: list[tuple[str, int | None]] = []
    off = 28
    while off < 28 + total:
        name, isid, used = decode_transport_id(data, off)
        out.append((name, isid))
        off += used
    return out


@command(0x5F, SA_RESERVE, data=Dir.OUT, conflicts=Conflict.PR, name="PERSISTENT RESERVE OUT/RESERVE")
@_serialised
async def prout_reserve(req: Request) -> None:
    lu = req.unit
    nexus = req.task.nexus
    _legacy_guard(lu, nexus)
    _, key, _, _, _ = _prout_params(req)
    rtype = _check_type(req.cdb)
    pr = lu.pr
    reg = _holder_of_key(pr, nexus, key)
    if pr.res_type:
        if pr.is_holder(nexus) and pr.res_type == rtype:
            return
        raise ReservationConflict()
    pr.res_type = rtype
    pr.holder = reg
    await pr.save()


@command(0x5F, SA_RELEASE, data=Dir.OUT, conflicts=Conflict.PR, name="PERSISTENT RESERVE OUT/RELEASE")
@_serialised
async def prout_release(req: Request) -> None:
    lu = req.unit
    nexus = req.task.nexus
    _legacy_guard(lu, nexus)
    _, key, _, _, _ = _prout_params(req)
    pr = lu.pr
    _holder_of_key(pr, nexus, key)
    if not pr.res_type or not pr.is_holder(nexus):
        return  # SPC-4 §5.13.11.2.1: nothing to release is not an error
    scope, rtype = req.cdb[2] >> 4, req.cdb[2] & 0x0F
    if scope != 0 or rtype != pr.res_type:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    _release_reservation(lu, nexus, notify=True)
    await pr.save()


@command(0x5F, SA_CLEAR, data=Dir.OUT, conflicts=Conflict.PR, name="PERSISTENT RESERVE OUT/CLEAR")
@_serialised
async def prout_clear(req: Request) -> None:
    lu = req.unit
    nexus = req.task.nexus
    _legacy_guard(lu, nexus)
    _, key, _, _, _ = _prout_params(req)
    pr = lu.pr
    _holder_of_key(pr, nexus, key)
    for other in pr.registrations:
        for n in lu.known_nexuses():
            if other.matches(n) and n != nexus:
                lu.add_ua(n, S.RESERVATIONS_PREEMPTED)
    pr.registrations.clear()
    pr.res_type = 0
    pr.holder = None
    pr.generation += 1
    await pr.save()


@command(0x5F, SA_PREEMPT, data=Dir.OUT, conflicts=Conflict.PR, name="PERSISTENT RESERVE OUT/PREEMPT")
@_serialised
async def prout_preempt(req: Request) -> None:
    await _preempt(req)


@command(0x5F, SA_PREEMPT_AND_ABORT, data=Dir.OUT, conflicts=Conflict.PR,
         name="PERSISTENT RESERVE OUT/PREEMPT AND ABORT")
@_serialised
async def prout_preempt_and_abort(req: Request) -> None:
    # Tasks run to completion in this target (there is no queue to abort), so PREEMPT AND ABORT is PREEMPT plus the
    # COMMANDS CLEARED unit attention the preempted nexuses would have seen.
    await _preempt(req, abort=True)


async def _preempt(req: Request, *, abort: bool = False) -> None:
    lu = req.unit
    nexus = req.task.nexus
    _legacy_guard(lu, nexus)
    _, key, sa_key, _, _ = _prout_params(req)
    pr = lu.pr
    reg = _holder_of_key(pr, nexus, key)
    new_type = req.cdb[2] & 0x0F
    scope = req.cdb[2] >> 4
    victims: list[Registration]
    take_reservation = False
    if pr.res_type in _ALL_REGISTRANTS:
        if sa_key == 0:
            victims = [r for r in pr.registrations if r is not reg]
            take_reservation = True
        else:
            victims = [r for r in pr.registrations if r.key == sa_key]
    elif pr.res_type and pr.holder is not None and pr.holder.key == sa_key:
        victims = [r for r in pr.registrations if r.key == sa_key and r is not reg]
        take_reservation = True
    else:
        if sa_key == 0:
            raise invalid_param(8)
        victims = [r for r in pr.registrations if r.key == sa_key]
        if not victims:
            raise ReservationConflict()
    if take_reservation:
        if scope != 0:
            raise invalid_field(2, 7)
        if new_type not in _TYPES:
            raise invalid_field(2, 3)
    for victim in victims:
        pr.registrations.remove(victim)
        for n in lu.known_nexuses():
            if victim.matches(n) and n != nexus:
                lu.add_ua(n, S.REGISTRATIONS_PREEMPTED)
                if abort:
                    lu.add_ua(n, S.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
    if take_reservation:
        pr.res_type = new_type
        pr.holder = reg
    elif pr.holder is not None and pr.holder not in pr.registrations and pr.res_type not in _ALL_REGISTRANTS:
        pr.res_type = 0
        pr.holder = None
    if pr.res_type in _ALL_REGISTRANTS and not pr.registrations:
        pr.res_type = 0
        pr.holder = None
    pr.generation += 1
    await pr.save()


@command(0x5F, SA_REGISTER_AND_MOVE, data=Dir.OUT, conflicts=Conflict.PR,
         name="PERSISTENT RESERVE OUT/REGISTER AND MOVE")
@_serialised
async def prout_register_and_move(req: Request) -> None:
    lu = req.unit
    nexus = req.task.nexus
    _legacy_guard(lu, nexus)
    cdb = req.cdb
    length = int.from_bytes(cdb[5:9], "big")
    data = bytes(req.task.data_out or b"")[:length]
    if length < 24 or len(data) < length:
        raise S.param_list_length_error()
    key, sa_key, flags, rel_port, tid_len = _MOVE_PARAMS.unpack_from(data, 0)
    if 24 + tid_len > len(data):
        raise S.param_list_length_error()
    pr = lu.pr
    reg = _holder_of_key(pr, nexus, key)
    if not pr.res_type or pr.res_type in _ALL_REGISTRANTS or pr.holder is not reg:
        raise ReservationConflict()
    if sa_key == 0:
        raise invalid_param(8)
    name, isid, _ = decode_transport_id(data, 24)
    if isid is None:
        raise invalid_param(24, 7)
    dest = Nexus(name, isid, nexus.target_name, nexus.tpgt, rel_port or nexus.relative_port)
    if dest.initiator_port == nexus.initiator_port and rel_port in (0, nexus.relative_port):
        raise invalid_param(24)
    target = pr.find(dest)
    if target is None:
        target = Registration(sa_key, name, isid, nexus.target_port, rel_port or nexus.relative_port, False)
        pr.registrations.append(target)
    else:
        target.key = sa_key
    pr.holder = target
    if flags & 0x02:  # UNREG
        pr.registrations.remove(reg)
    pr.aptpl = bool(flags & 0x01)
    pr.generation += 1
    await pr.save()


@command(0x5F, 0x08, data=Dir.OUT, conflicts=Conflict.PR, name="PERSISTENT RESERVE OUT/REPLACE LOST RESERVATION")
@_serialised
async def prout_replace_lost(req: Request) -> None:
    # Reservations are never lost here (they live in memory and, with APTPL, on disk), so there is nothing to replace.
    raise invalid_field(1, 4)


# -- RESERVE / RELEASE (6) and (10), SPC-2 §7.21, §7.17 ------------------------------------------------------------------
# On a LU several gateways serve (a shared PR store) they are refused as unsupported (INVALID COMMAND OPERATION CODE):
# their reservation would hold on one gateway only, so another path would write through a reservation the initiator
# believes it has. Clusters use persistent reservations, which every gateway shares.


def _refuse_if_shared(lu: LogicalUnit) -> None:
    if lu.pr.store.shared:
        raise invalid_opcode()


async def _reserve(req: Request) -> None:
    lu = req.unit
    nexus = req.task.nexus
    _refuse_if_shared(lu)
    if lu.pr.in_use:
        raise ReservationConflict()
    if lu.legacy_holder is not None and lu.legacy_holder != nexus:
        raise ReservationConflict()
    lu.legacy_holder = nexus


async def _release(req: Request) -> None:
    lu = req.unit
    nexus = req.task.nexus
    _refuse_if_shared(lu)
    if lu.pr.in_use:
        raise ReservationConflict()
    if lu.legacy_holder == nexus:
        lu.legacy_holder = None


@command(0x16, conflicts=Conflict.LEGACY, legacy_ok=True, name="RESERVE(6)", usage=b"\x16\x00\x00\x00\x00\x00")
async def reserve_6(req: Request) -> None:
    if req.cdb[1] & 0x1F:  # third-party and extent reservations are obsolete
        raise invalid_field(1, 4)
    await _reserve(req)


@command(0x17, conflicts=Conflict.LEGACY, legacy_ok=True, name="RELEASE(6)", usage=b"\x17\x00\x00\x00\x00\x00")
async def release_6(req: Request) -> None:
    if req.cdb[1] & 0x1F:
        raise invalid_field(1, 4)
    await _release(req)


@command(0x56, conflicts=Conflict.LEGACY, legacy_ok=True, name="RESERVE(10)",
         usage=b"\x56\x00\x00\x00\x00\x00\x00\x00\x00\x00")
async def reserve_10(req: Request) -> None:
    if req.cdb[1] & 0x12:  # 3RDPTY, LONGID: third-party reservations are not supported
        raise invalid_field(1, 4)
    await _reserve(req)


@command(0x57, conflicts=Conflict.LEGACY, legacy_ok=True, name="RELEASE(10)",
         usage=b"\x57\x00\x00\x00\x00\x00\x00\x00\x00\x00")
async def release_10(req: Request) -> None:
    if req.cdb[1] & 0x12:
        raise invalid_field(1, 4)
    await _release(req)
