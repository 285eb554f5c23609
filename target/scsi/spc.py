"""SPC-4 primary commands: INQUIRY and its VPD pages, REPORT LUNS, TEST UNIT READY, REQUEST SENSE, MODE SENSE/SELECT
(6/10), LOG SENSE, REPORT SUPPORTED OPERATION CODES, REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS and REPORT TARGET PORT
GROUPS.

Each handler decodes its CDB, raises :class:`~lunsync.target.scsi.sense.CheckCondition` with a field pointer for a bad
field, and returns the full parameter data cut to the CDB's allocation length; the transport reports any shortfall
against the iSCSI expected length as a residual. Identity comes from the LU's :class:`LunIdentity`, port data from the
I_T nexus and the target's port groups.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from lunsync.target.scsi import registry
from lunsync.target.scsi import sense as S
from lunsync.target.scsi.alua import PortGroup, encode_rtpg
from lunsync.target.scsi.lu import PAGE_ALL, PAGE_CACHING, PAGE_CONTROL, PAGE_IEC, LogicalUnit
from lunsync.target.scsi.registry import CommandSpec, Conflict, Dir, Request, command
from lunsync.target.scsi.sense import CheckCondition, SenseKey, invalid_field, invalid_param

if TYPE_CHECKING:
    from lunsync.target.scsi.task import Nexus

# Version descriptors (SPC-4 Table 29): SAM-5, SPC-4, SBC-3, iSCSI (RFC 7143).
_VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0, 0x0960)
SUPPORTED_VPD = (0x00, 0x80, 0x83, 0x86, 0x8F, 0xB0, 0xB1, 0xB2)
_PROTO_ISCSI = 0x5

# XCOPY limits, shared with xcopy.py through these names (RECEIVE COPY RESULTS and VPD 0x8F report the same).
XCOPY_MAX_CSCD = 16
XCOPY_MAX_SEGMENTS = 64
XCOPY_MAX_DESC_LIST = XCOPY_MAX_CSCD * 32 + XCOPY_MAX_SEGMENTS * 28  # CSCD plus segment descriptor bytes
XCOPY_MAX_SEGMENT_BYTES = 32 << 20


def _alloc16(cdb: bytes, at: int) -> int:
    return (cdb[at] << 8) | cdb[at + 1]


def _alloc32(cdb: bytes, at: int) -> int:
    return int.from_bytes(cdb[at : at + 4], "big")


def _ascii(text: str, n: int) -> bytes:
    return text.encode("ascii", "replace")[:n].ljust(n, b" ")


# -- INQUIRY (SPC-4 §6.6) --------------------------------------------------------------------------------------------


def standard_inquiry(lu: LogicalUnit | None) -> bytes:
    """Standard INQUIRY data; for an absent LUN, peripheral qualifier 011b and device type 1Fh (SPC-4 §6.6.2)."""
    data = bytearray(96)
    if lu is None:
        data[0] = 0x7F
        vendor, product, revision = "LUNSYNC", "NO-LUN", "0001"
    else:
        data[0] = 0x00  # connected, direct-access block device
        ident = lu.identity
        vendor, product, revision = ident.vendor, ident.product, ident.revision
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HISUP, response data format 2
    data[4] = len(data) - 5
    data[5] = 0x10 | 0x08  # TPGS 01b (implicit ALUA), 3PC (EXTENDED COPY)
    data[7] = 0x02  # CMDQUE
    data[8:16] = _ascii(vendor, 8)
    data[16:32] = _ascii(product, 16)
    data[32:36] = _ascii(revision, 4)
    for i, v in enumerate(_VERSION_DESCRIPTORS):
        struct.pack_into(">H", data, 58 + 2 * i, v)
    return bytes(data)


def _designator(code_set: int, piv_assoc_type: int, value: bytes, proto: int = 0) -> bytes:
    return bytes((proto << 4 | code_set, piv_assoc_type, 0, len(value))) + value


def device_identification(lu: LogicalUnit, nexus: Nexus, tpg: int) -> bytes:
    """VPD 0x83 designators (SPC-4 §7.8.6): NAA IEEE Registered Extended, T10 vendor ID, relative target port,
    target port group and the target port's SCSI name string."""
    ident = lu.identity
    out = bytearray()
    out += _designator(0x1, 0x03, bytes(ident.naa))  # binary, LU, NAA
    out += _designator(0x2, 0x01, _ascii(ident.vendor, 8) + ident.serial.encode("ascii", "replace"))  # T10 vendor ID
    out += _designator(0x1, 0x80 | 0x10 | 0x04, struct.pack(">HH", 0, nexus.relative_port), _PROTO_ISCSI)
    out += _designator(0x1, 0x80 | 0x10 | 0x05, struct.pack(">HH", 0, tpg), _PROTO_ISCSI)
    name = nexus.target_port.encode() + b"\x00"
    name += b"\x00" * (-len(name) % 4)
    out += _designator(0x3, 0x80 | 0x10 | 0x08, name, _PROTO_ISCSI)
    return bytes(out)


def _vpd(page: int, body: bytes) -> bytes:
    return bytes((0x00, page)) + len(body).to_bytes(2, "big") + body


def block_limits(lu: LogicalUnit) -> bytes:
    """VPD 0xB0 (SBC-3 §6.5.3), 0x3C bytes of page data."""
    body = bytearray(0x3C)
    body[0] = 0x00  # WSNZ 0: WRITE SAME with zero blocks runs to the end of the medium, within MAXIMUM WRITE SAME LENGTH
    body[1] = lu.max_compare_and_write_blocks
    struct.pack_into(">H", body, 2, lu.granularity_blocks)  # OPTIMAL TRANSFER LENGTH GRANULARITY
    struct.pack_into(">I", body, 4, lu.max_transfer_blocks)
    struct.pack_into(">I", body, 8, lu.optimal_transfer_blocks)
    struct.pack_into(">I", body, 12, lu.max_transfer_blocks)  # MAXIMUM PREFETCH LENGTH
    if lu.thin:
        struct.pack_into(">I", body, 16, lu.max_unmap_blocks)
        struct.pack_into(">I", body, 20, lu.max_unmap_descriptors)
        if lu.block_size < 4096:
            struct.pack_into(">I", body, 24, lu.granularity_blocks)  # OPTIMAL UNMAP GRANULARITY: one 4 KiB page
            struct.pack_into(">I", body, 28, 0x80000000)  # UGAVALID, alignment 0
        # On 4096-byte LUNs the granularity stays unreported (0): a reported 4 KiB-16 MiB granularity makes QEMU's
        # iSCSI driver (7.2, Debian 12) keep an allocation map whose probe asks block status for a length that is
        # only 512-aligned, and it aborts on its own alignment assertion. One block is the granularity anyway.
    struct.pack_into(">Q", body, 32, lu.max_write_same_blocks)
    return _vpd(0xB0, bytes(body))


def third_party_copy(lu: LogicalUnit) -> bytes:
    """VPD 0x8F (SPC-4 §7.8.17): supported commands and the EXTENDED COPY (LID1) parameter limits."""
    cmds = bytes((0x83, 1, 0x00, 0x84, 2, 0x00, 0x03))
    sup = bytes((len(cmds),)) + cmds
    sup += b"\x00" * (-(len(sup) + 4) % 4)
    out = struct.pack(">HH", 0x0001, len(sup)) + sup
    params = struct.pack(">2xHHII14x", XCOPY_MAX_CSCD, XCOPY_MAX_SEGMENTS, XCOPY_MAX_DESC_LIST, 0)
    out += struct.pack(">HH", 0x0008, len(params)) + params
    descs = bytes((2, 0x02, 0xE4))  # supported descriptor codes: block->block segments, identification CSCDs
    descs += b"\x00" * (-(len(descs) + 4) % 4)
    out += struct.pack(">HH", 0x0004, len(descs)) + descs
    return _vpd(0x8F, out)


def vpd_page(lu: LogicalUnit, page: int, nexus: Nexus, tpg: int) -> bytes:
    """Build VPD ``page`` or raise INVALID FIELD IN CDB for a page we do not have."""
    if page == 0x00:
        return _vpd(0x00, bytes(SUPPORTED_VPD))
    if page == 0x80:
        return _vpd(0x80, lu.identity.serial.encode("ascii", "replace"))
    if page == 0x83:
        return _vpd(0x83, device_identification(lu, nexus, tpg))
    if page == 0x86:
        body = bytearray(0x3C)
        body[1] = 0x07  # HEADSUP, ORDSUP, SIMPSUP
        body[3] = 0x00
        return _vpd(0x86, bytes(body))
    if page == 0x8F:
        return third_party_copy(lu)
    if page == 0xB0:
        return block_limits(lu)
    if page == 0xB1:
        body = bytearray(0x3C)
        body[1] = 0x01  # MEDIUM ROTATION RATE 0001h: non-rotating medium
        body[3] = 0x40  # WABEREQ 01b: reads after SANITIZE BLOCK ERASE succeed; WACEREQ 00b: no CRYPTO ERASE
        return _vpd(0xB1, bytes(body))
    if page == 0xB2:
        body = bytearray(4)
        if lu.thin:
            body[1] = 0x80 | 0x40 | 0x20 | 0x04  # LBPU, LBPWS, LBPWS10, LBPRZ
            body[2] = 0x02  # PROVISIONING TYPE: thin
        return _vpd(0xB2, bytes(body))
    raise invalid_field(2)


@command(0x12, data=Dir.IN, conflicts=Conflict.NEVER, allowed_without_lun=True, reports_ua=False, legacy_ok=True,
         sanitize_ok=True, usage=b"\x12\x01\xff\xff\xff\x00")
async def inquiry(req: Request) -> bytes:
    cdb = req.cdb
    if cdb[1] & 0xFE:  # CMDDT and reserved bits
        raise invalid_field(1, 1)
    alloc = _alloc16(cdb, 3)
    lu = req.lu
    if not cdb[1] & 0x01:
        if cdb[2]:
            raise invalid_field(2)
        return standard_inquiry(lu)[:alloc]
    if lu is None:
        # SPC-4 §6.6.1: an absent LUN answers VPD requests with qualifier 011b as well.
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.LOGICAL_UNIT_NOT_SUPPORTED)
    nexus = req.task.nexus
    return vpd_page(lu, cdb[2], nexus, req.target.port_group_of(nexus))[:alloc]


# -- REPORT LUNS, TEST UNIT READY, REQUEST SENSE --------------------------------------------------------------------


def encode_lun(n: int) -> bytes:
    """SAM-5 §4.7: peripheral addressing below 256, flat space addressing up to 16383."""
    if n < 256:
        return bytes((0, n)) + b"\x00" * 6
    return bytes((0x40 | (n >> 8), n & 0xFF)) + b"\x00" * 6


@command(0xA0, data=Dir.IN, conflicts=Conflict.NEVER, allowed_without_lun=True, reports_ua=False, legacy_ok=True,
         sanitize_ok=True, usage=b"\xa0\x00\xff\x00\x00\x00\xff\xff\xff\xff\x00\x00")
async def report_luns(req: Request) -> bytes:
    cdb = req.cdb
    select = cdb[2]
    if select not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
        raise invalid_field(2)
    alloc = _alloc32(cdb, 6)
    if alloc < 16:
        raise invalid_field(6)
    if select in (0x01, 0x10):
        luns: list[int] = []  # no well-known or administrative logical units
    else:
        luns = sorted(req.target.luns_for(req.task.nexus))
    body = b"".join(encode_lun(n) for n in luns)
    return (struct.pack(">I4x", len(body)) + body)[:alloc]


@command(0x00, conflicts=Conflict.NEVER, usage=b"\x00\x00\x00\x00\x00\x00")
async def test_unit_ready(req: Request) -> None:
    return None


@command(0x03, data=Dir.IN, conflicts=Conflict.NEVER, allowed_without_lun=True, reports_ua=False, legacy_ok=True,
         sanitize_ok=True, usage=b"\x03\x01\x00\x00\xff\x00")
async def request_sense(req: Request) -> bytes:
    cdb = req.cdb
    if cdb[1] & 0x01:  # DESC: only fixed-format sense is implemented
        raise invalid_field(1, 0)
    alloc = cdb[4]
    lu = req.lu
    if lu is None:
        return S.build_sense(SenseKey.ILLEGAL_REQUEST, S.LOGICAL_UNIT_NOT_SUPPORTED)[:alloc]
    ua = lu.take_ua(req.task.nexus)
    if ua is not None:
        return S.build_sense(SenseKey.UNIT_ATTENTION, ua)[:alloc]
    if lu.sanitize is not None:  # the sanitize condition, with its progress indication (SBC-3 §4.33)
        return lu.sanitize.check().sense()[:alloc]
    return S.build_sense(SenseKey.NO_SENSE, S.NO_ADDITIONAL_SENSE)[:alloc]


# -- MODE SENSE / MODE SELECT (SPC-4 §6.11-6.14) -------------------------------------------------------------------


def _mode_pages(lu: LogicalUnit, pc: int, page: int, subpage: int) -> bytes:
    if pc == 3:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.SAVING_PARAMETERS_NOT_SUPPORTED, field_pointer=2, bit_pointer=7)
    source = (lu.mode.current, lu.mode.changeable, lu.mode.default)[pc]
    if page == PAGE_ALL:
        if subpage not in (0x00, 0xFF):
            raise invalid_field(3)
        return b"".join(bytes(source[p]) for p in (PAGE_CACHING, PAGE_CONTROL, PAGE_IEC))
    if page not in source:
        raise invalid_field(2, 5)
    if subpage not in (0x00, 0xFF):
        raise invalid_field(3)
    return bytes(source[page])


def _block_descriptor(lu: LogicalUnit, long: bool) -> bytes:
    if long:
        return struct.pack(">Q4xI", lu.num_blocks, lu.block_size)
    return struct.pack(">IxBH", min(lu.num_blocks, 0xFFFFFFFF), (lu.block_size >> 16) & 0xFF, lu.block_size & 0xFFFF)


def _device_specific(lu: LogicalUnit) -> int:
    return (0x80 if lu.write_protected else 0) | 0x10  # WP, DPOFUA


@command(0x1A, data=Dir.IN, conflicts=Conflict.NEVER, name="MODE SENSE(6)", usage=b"\x1a\x08\xff\xff\xff\x00")
async def mode_sense_6(req: Request) -> bytes:
    cdb = req.cdb
    lu = req.unit
    dbd = bool(cdb[1] & 0x08)
    pages = _mode_pages(lu, cdb[2] >> 6, cdb[2] & 0x3F, cdb[3])
    bd = b"" if dbd else _block_descriptor(lu, False)
    header = bytes((3 + len(bd) + len(pages), 0, _device_specific(lu), len(bd)))
    return (header + bd + pages)[: cdb[4]]


@command(0x5A, data=Dir.IN, conflicts=Conflict.NEVER, name="MODE SENSE(10)",
         usage=b"\x5a\x18\xff\xff\x00\x00\x00\xff\xff\x00")
async def mode_sense_10(req: Request) -> bytes:
    cdb = req.cdb
    lu = req.unit
    dbd = bool(cdb[1] & 0x08)
    llbaa = bool(cdb[1] & 0x10)
    pages = _mode_pages(lu, cdb[2] >> 6, cdb[2] & 0x3F, cdb[3])
    bd = b"" if dbd else _block_descriptor(lu, llbaa)
    header = struct.pack(">HBBBxH", 6 + len(bd) + len(pages), 0, _device_specific(lu), 0x01 if llbaa and bd else 0,
                         len(bd))
    return (header + bd + pages)[: _alloc16(cdb, 7)]


def _mode_select(req: Request, data: bytes, header_len: int, bd_len: int) -> None:
    lu = req.unit
    cdb = req.cdb
    if not cdb[1] & 0x10:  # PF: only the standard page format is understood
        raise invalid_field(1, 4)
    if cdb[1] & 0x01:  # SP: saved pages are not implemented
        raise invalid_field(1, 0)
    pos = header_len
    if bd_len:
        if bd_len not in (8, 16) or len(data) < pos + bd_len:
            raise invalid_param(header_len - 1)
        block_len = int.from_bytes(data[pos + bd_len - 3 : pos + bd_len], "big")
        if block_len not in (0, lu.block_size):
            raise invalid_param(pos + bd_len - 3)
        pos += bd_len
    staged: list[tuple[int, bytes]] = []
    while pos < len(data):
        if len(data) < pos + 2:
            raise S.param_list_length_error()
        code = data[pos] & 0x3F
        if data[pos] & 0x40:  # SPF: no subpages here
            raise invalid_param(pos, 6)
        cur = lu.mode.current.get(code)
        if cur is None:
            raise invalid_param(pos, 5)
        length = data[pos + 1]
        if length != len(cur) - 2:
            raise invalid_param(pos + 1)
        if len(data) < pos + 2 + length:
            raise S.param_list_length_error()
        new = bytearray(data[pos : pos + 2 + length])
        new[0] &= 0x3F  # PS is reserved in MODE SELECT
        mask = lu.mode.changeable[code]
        for i in range(2, len(new)):
            if (new[i] ^ cur[i]) & ~mask[i] & 0xFF:
                raise invalid_param(pos + i)
        staged.append((code, bytes(new)))
        pos += 2 + length
    # All pages validated before any is applied: MODE SELECT is all or nothing.
    for code, page in staged:
        lu.apply_mode_page(code, page, save=False, nexus=req.task.nexus)


def _param_data(req: Request, length: int) -> bytes:
    data = bytes(req.task.data_out or b"")[:length]
    if len(data) < length:
        raise S.param_list_length_error()
    return data


@command(0x15, data=Dir.OUT, conflicts=Conflict.WRITE, name="MODE SELECT(6)", usage=b"\x15\x11\x00\x00\xff\x00")
async def mode_select_6(req: Request) -> None:
    length = req.cdb[4]
    if length == 0:
        return
    data = _param_data(req, length)
    if length < 4:
        raise S.param_list_length_error()
    _mode_select(req, data, 4, data[3])


@command(0x55, data=Dir.OUT, conflicts=Conflict.WRITE, name="MODE SELECT(10)",
         usage=b"\x55\x11\x00\x00\x00\x00\x00\xff\xff\x00")
async def mode_select_10(req: Request) -> None:
    length = _alloc16(req.cdb, 7)
    if length == 0:
        return
    data = _param_data(req, length)
    if length < 8:
        raise S.param_list_length_error()
    _mode_select(req, data, 8, _alloc16(data, 6))


# -- LOG SENSE (SPC-4 §6.8) -------------------------------------------------------------------------------------------

_LOG_PAGES = (0x00, 0x0C, 0x2F)


def _mapped_blocks(lu: LogicalUnit, limit: int = 4096) -> int:
    """Count mapped blocks through lba_status; bounded so LOG SENSE never walks an enormous map."""
    lba, mapped, nb = 0, 0, lu.num_blocks
    for _ in range(limit):
        if lba >= nb:
            break
        extents = lu.device.lba_status(lba, 64)
        if not extents:
            break
        for e in extents:
            if e.mapped:
                mapped += e.blocks
            lba = e.lba + e.blocks
    return mapped


def _log_param(code: int, value: bytes, control: int = 0x03) -> bytes:
    return struct.pack(">HBB", code, control, len(value)) + value


@command(0x4D, data=Dir.IN, conflicts=Conflict.NEVER, usage=b"\x4d\x00\xff\xff\x00\xff\xff\xff\xff\x00")
async def log_sense(req: Request) -> bytes:
    cdb = req.cdb
    lu = req.unit
    if cdb[1] & 0x01:  # SP: log parameters are not saved
        raise invalid_field(1, 0)
    if cdb[1] & 0x02:  # PPC: parameter pointer control is not supported
        raise invalid_field(1, 1)
    page, subpage = cdb[2] & 0x3F, cdb[3]
    if subpage != 0:
        raise invalid_field(3)
    if page == 0x00:
        body = bytes(_LOG_PAGES)
    elif page == 0x0C:
        if not lu.thin:
            raise invalid_field(2, 5)
        used = _mapped_blocks(lu)
        body = _log_param(0x0002, struct.pack(">I3xB", min(used, 0xFFFFFFFF), 0x01))
    elif page == 0x2F:
        body = _log_param(0x0000, bytes((0x00, 0x00, 0xFF, 0x00)))  # no exception, temperature not reported
    else:
        raise invalid_field(2, 5)
    return (struct.pack(">BBH", page, 0, len(body)) + body)[: _alloc16(cdb, 7)]


# -- REPORT SUPPORTED OPERATION CODES, TASK MANAGEMENT FUNCTIONS, TARGET PORT GROUPS ---------------------------------


def _timeouts(spec: CommandSpec) -> bytes:
    return struct.pack(">HxBII", 0x0A, 0, spec.timeout_s, spec.timeout_s)


def _one_command(spec: CommandSpec | None, rctd: bool) -> bytes:
    if spec is None:
        return bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    flags = 0x03 | (0x80 if rctd else 0)
    out = bytes((0, flags)) + len(spec.usage).to_bytes(2, "big") + spec.usage
    if rctd:
        out += _timeouts(spec)
    return out


@command(0xA3, 0x0C, data=Dir.IN, conflicts=Conflict.NEVER, legacy_ok=True, name="REPORT SUPPORTED OPERATION CODES",
         usage=b"\xa3\x0c\x87\xff\xff\xff\xff\xff\xff\xff\x00\x00")
async def report_supported_opcodes(req: Request) -> bytes:
    cdb = req.cdb
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    sa = _alloc16(cdb, 4)
    alloc = _alloc32(cdb, 6)
    if options == 0:
        out = bytearray()
        for spec in registry.all_commands():
            has_sa = spec.service_action is not None
            flags = (0x02 if rctd else 0) | (0x01 if has_sa else 0)
            out += struct.pack(">BxHxBH", spec.opcode, spec.service_action or 0, flags, spec.cdb_len)
            if rctd:
                out += _timeouts(spec)
        return (len(out).to_bytes(4, "big") + bytes(out))[:alloc]
    slot = registry.find(opcode)
    has_sas = isinstance(slot, dict)
    if options == 1:
        if has_sas:
            raise invalid_field(2, 2)
        return _one_command(slot if isinstance(slot, CommandSpec) else None, rctd)[:alloc]
    if options == 2:
        if slot is not None and not has_sas:
            raise invalid_field(2, 2)
        return _one_command(slot.get(sa) if isinstance(slot, dict) else None, rctd)[:alloc]
    if options == 3:
        if isinstance(slot, dict):
            return _one_command(slot.get(sa), rctd)[:alloc]
        if isinstance(slot, CommandSpec) and sa == 0:
            return _one_command(slot, rctd)[:alloc]
        return _one_command(None, rctd)[:alloc]
    raise invalid_field(2, 2)


@command(0xA3, 0x0D, data=Dir.IN, conflicts=Conflict.NEVER, legacy_ok=True, name="REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
         usage=b"\xa3\x0d\x80\x00\x00\x00\xff\xff\xff\xff\x00\x00")
async def report_supported_tmfs(req: Request) -> bytes:
    cdb = req.cdb
    # ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET (warm and cold via iSCSI)
    data = bytes((0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0x00, 0x00, 0x00))
    if cdb[2] & 0x80:  # REPD: the extended 16-byte format
        data = data + bytes((0x0C,)) + b"\x00" * 11
    return data[: _alloc32(cdb, 6)]


@command(0xA3, 0x0A, data=Dir.IN, conflicts=Conflict.NEVER, legacy_ok=True, name="REPORT TARGET PORT GROUPS",
         usage=b"\xa3\xea\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00")
async def report_target_port_groups(req: Request) -> bytes:
    cdb = req.cdb
    lu = req.unit
    if lu.alua is not None:
        groups = lu.alua.descriptors()
        transition = lu.alua.transition_time_s
    else:  # one daemon: each of its groups is active/optimized
        groups = [PortGroup(g, ports, preferred=True) for g, ports in sorted(req.target.port_groups.items())]
        transition = 0
    data = encode_rtpg(groups, extended=(cdb[1] >> 5) == 1, transition_time_s=transition)
    return data[: _alloc32(cdb, 6)]
