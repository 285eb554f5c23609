"""Sense data: the CheckCondition family and the one function that builds sense bytes.

Handlers never build sense bytes: they raise :class:`CheckCondition` (or one of its helpers below), and the dispatcher
in :mod:`lunsync.target.scsi.target` calls :func:`build_sense`, the single place where fixed-format sense data
(SPC-4 §4.5.3) is laid out, including the INFORMATION field and the sense-key specific bytes (field pointer with
SKSV, SPC-4 §4.5.2.4.2). Storage errors from :mod:`lunsync.snapshots.errors` are turned into sense here too, by
:func:`storage_error_to_check`, so there is exactly one mapping from the storage family to the wire.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from lunsync.snapshots.errors import MediumError, NotReady, OutOfRange, OutOfSpace, ReadOnly, StorageError


class SenseKey(enum.IntEnum):
    """SPC-4 Table 44."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


# (ASC, ASCQ) pairs, SPC-4 Annex D. Only the ones lunsync reports.
Asc = tuple[int, int]
NO_ADDITIONAL_SENSE: Final[Asc] = (0x00, 0x00)
LUN_NOT_READY_CAUSE_NOT_REPORTABLE: Final[Asc] = (0x04, 0x00)
LUN_NOT_READY_MANUAL_INTERVENTION: Final[Asc] = (0x04, 0x03)
LUN_NOT_READY_SANITIZE_IN_PROGRESS: Final[Asc] = (0x04, 0x1B)
WRITE_ERROR: Final[Asc] = (0x0C, 0x00)
UNREACHABLE_COPY_TARGET: Final[Asc] = (0x08, 0x04)
COPY_TARGET_DEVICE_NOT_REACHABLE: Final[Asc] = (0x0D, 0x02)
INVALID_FIELD_IN_INFORMATION_UNIT: Final[Asc] = (0x0E, 0x03)
UNRECOVERED_READ_ERROR: Final[Asc] = (0x11, 0x00)
MISCOMPARE_DURING_VERIFY: Final[Asc] = (0x1D, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Final[Asc] = (0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE: Final[Asc] = (0x20, 0x00)
LBA_OUT_OF_RANGE: Final[Asc] = (0x21, 0x00)
INVALID_FIELD_IN_CDB: Final[Asc] = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED: Final[Asc] = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: Final[Asc] = (0x26, 0x00)
PARAMETER_NOT_SUPPORTED: Final[Asc] = (0x26, 0x01)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Final[Asc] = (0x26, 0x04)
TOO_MANY_TARGET_DESCRIPTORS: Final[Asc] = (0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: Final[Asc] = (0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS: Final[Asc] = (0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: Final[Asc] = (0x26, 0x09)
WRITE_PROTECTED: Final[Asc] = (0x27, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Final[Asc] = (0x27, 0x07)
POWER_ON_RESET: Final[Asc] = (0x29, 0x00)
POWER_ON_OCCURRED: Final[Asc] = (0x29, 0x01)
SCSI_BUS_RESET: Final[Asc] = (0x29, 0x02)
BUS_DEVICE_RESET_FUNCTION: Final[Asc] = (0x29, 0x03)
I_T_NEXUS_LOSS: Final[Asc] = (0x29, 0x07)
PARAMETERS_CHANGED: Final[Asc] = (0x2A, 0x00)
MODE_PARAMETERS_CHANGED: Final[Asc] = (0x2A, 0x01)
RESERVATIONS_PREEMPTED: Final[Asc] = (0x2A, 0x03)
RESERVATIONS_RELEASED: Final[Asc] = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED: Final[Asc] = (0x2A, 0x05)
ASYMMETRIC_ACCESS_STATE_CHANGED: Final[Asc] = (0x2A, 0x06)
CAPACITY_DATA_HAS_CHANGED: Final[Asc] = (0x2A, 0x09)
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Final[Asc] = (0x2F, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED: Final[Asc] = (0x39, 0x00)
MEDIUM_NOT_PRESENT: Final[Asc] = (0x3A, 0x00)
SANITIZE_COMMAND_FAILED: Final[Asc] = (0x31, 0x03)
REPORTED_LUNS_DATA_HAS_CHANGED: Final[Asc] = (0x3F, 0x0E)
INSUFFICIENT_REGISTRATION_RESOURCES: Final[Asc] = (0x55, 0x04)
MEDIUM_REMOVAL_PREVENTED: Final[Asc] = (0x53, 0x02)

FIXED_SENSE_LEN: Final = 18
_FIXED = struct.Struct(">BBBIBIBBB3s")  # SPC-4 §4.5.3 Table 45


class CheckCondition(Exception):
    """A command ends in CHECK CONDITION with this sense.

    ``field_pointer`` is the byte (and ``bit_pointer`` the bit) of the offending field, in the CDB when ``in_cdb`` else
    in the parameter list; it becomes the sense-key specific field with SKSV set. ``information`` fills the INFORMATION
    field with VALID set. ``sks`` overrides the three sense-key specific bytes (used by EXTENDED COPY's segment
    pointer).
    """

    __slots__ = ("asc", "ascq", "bit_pointer", "field_pointer", "in_cdb", "information", "key", "sks")

    def __init__(
        self,
        key: SenseKey,
        asc: Asc,
        *,
        field_pointer: int | None = None,
        bit_pointer: int | None = None,
        in_cdb: bool = True,
        information: int | None = None,
        sks: bytes | None = None,
    ) -> None:
        super().__init__(f"{key.name} {asc[0]:02x}/{asc[1]:02x}")
        self.key = key
        self.asc = asc[0]
        self.ascq = asc[1]
        self.field_pointer = field_pointer
        self.bit_pointer = bit_pointer
        self.in_cdb = in_cdb
        self.information = information
        self.sks = sks

    def sense(self) -> bytes:
        """The fixed-format sense bytes for this condition."""
        return build_sense(
            self.key,
            (self.asc, self.ascq),
            information=self.information,
            field_pointer=self.field_pointer,
            bit_pointer=self.bit_pointer,
            in_cdb=self.in_cdb,
            sks=self.sks,
        )


class ReservationConflict(Exception):
    """The command ends in RESERVATION CONFLICT status (no sense data)."""


def build_sense(
    key: SenseKey,
    asc: Asc,
    *,
    information: int | None = None,
    field_pointer: int | None = None,
    bit_pointer: int | None = None,
    in_cdb: bool = True,
    sks: bytes | None = None,
) -> bytes:
    """Build 18 bytes of fixed-format current sense data (SPC-4 §4.5.3).

    This is the only function in lunsync that lays out sense bytes.
    """
    response_code = 0x70
    info = 0
    if information is not None:
        response_code |= 0x80  # VALID: the INFORMATION field means something
        info = information & 0xFFFFFFFF
    if sks is None:
        if field_pointer is not None:
            # SPC-4 §4.5.2.4.2: SKSV | C/D | BPV | bit pointer, then the 16-bit field pointer.
            b0 = 0x80 | (0x40 if in_cdb else 0)
            if bit_pointer is not None:
                b0 |= 0x08 | (bit_pointer & 0x7)
            sks = bytes((b0, (field_pointer >> 8) & 0xFF, field_pointer & 0xFF))
        else:
            sks = b"\x00\x00\x00"
    return _FIXED.pack(response_code, 0, int(key), info, FIXED_SENSE_LEN - 8, 0, asc[0], asc[1], 0, sks)


# Prebuilt conditions for the hot path (no formatting of messages per command).
def invalid_field(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at ``byte``/``bit`` of the CDB."""
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field_pointer=byte, bit_pointer=bit)


def invalid_param(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing into the parameter list."""
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=byte, bit_pointer=bit, in_cdb=False
    )


def param_list_length_error() -> CheckCondition:
    """ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR."""
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def lba_out_of_range() -> CheckCondition:
    """ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE."""
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def invalid_opcode() -> CheckCondition:
    """ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE, pointing at byte 0."""
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE, field_pointer=0)


def write_protected() -> CheckCondition:
    """DATA PROTECT, WRITE PROTECTED."""
    return CheckCondition(SenseKey.DATA_PROTECT, WRITE_PROTECTED)


def miscompare(offset: int) -> CheckCondition:
    """MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION; ``offset`` (bytes) goes in INFORMATION (SBC-3 §5.3)."""
    return CheckCondition(SenseKey.MISCOMPARE, MISCOMPARE_DURING_VERIFY, information=offset)


def unit_attention(asc: Asc) -> CheckCondition:
    """UNIT ATTENTION with ``asc``."""
    return CheckCondition(SenseKey.UNIT_ATTENTION, asc)


def storage_error_to_check(exc: StorageError, *, write: bool = False) -> CheckCondition:
    """Map a storage error to its sense: the one mapping from :mod:`lunsync.snapshots.errors` to SCSI."""
    if isinstance(exc, MediumError):
        asc = WRITE_ERROR if (exc.write or write) else UNRECOVERED_READ_ERROR
        return CheckCondition(SenseKey.MEDIUM_ERROR, asc, information=exc.lba)
    if isinstance(exc, OutOfSpace):
        return CheckCondition(SenseKey.DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    if isinstance(exc, ReadOnly):
        return CheckCondition(SenseKey.DATA_PROTECT, WRITE_PROTECTED)
    if isinstance(exc, OutOfRange):
        return CheckCondition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    if isinstance(exc, NotReady):
        return CheckCondition(SenseKey.NOT_READY, LUN_NOT_READY_CAUSE_NOT_REPORTABLE)
    return CheckCondition(SenseKey.HARDWARE_ERROR, NO_ADDITIONAL_SENSE)
