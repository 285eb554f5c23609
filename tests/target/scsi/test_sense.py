"""Unit tests for lunsync.target.scsi.sense: the fixed-format layout and the storage-error mapping."""

from __future__ import annotations

from lunsync.snapshots.errors import MediumError, NotReady, OutOfRange, OutOfSpace, ReadOnly
from lunsync.target.scsi import sense as S
from lunsync.target.scsi.sense import SenseKey, build_sense, storage_error_to_check


def test_fixed_format_layout_spc4_table_45() -> None:
    # ILLEGAL REQUEST / INVALID FIELD IN CDB, field pointer byte 2 bit 5 (SKSV|C/D|BPV|bit 5, then 0x0002).
    got = build_sense(SenseKey.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=5)
    assert got.hex() == "700005000000000a00000000240000cd0002"


def test_information_sets_valid() -> None:
    got = build_sense(SenseKey.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, information=0x1234)
    assert got[0] == 0xF0
    assert got[3:7] == bytes.fromhex("00001234")
    assert (got[2], got[12], got[13]) == (0x0E, 0x1D, 0x00)


def test_parameter_list_pointer_clears_cd() -> None:
    got = S.invalid_param(5, 3).sense()
    assert got[15] == 0x80 | 0x08 | 0x03
    assert got[16:18] == b"\x00\x05"
    assert (got[12], got[13]) == (0x26, 0x00)


def test_no_pointer_leaves_sks_zero() -> None:
    assert S.lba_out_of_range().sense()[15:18] == b"\x00\x00\x00"
    assert len(S.lba_out_of_range().sense()) == S.FIXED_SENSE_LEN


def test_storage_error_mapping() -> None:
    def triple(exc: Exception, write: bool = False) -> tuple[int, int, int]:
        cc = storage_error_to_check(exc, write=write)  # type: ignore[arg-type]
        return int(cc.key), cc.asc, cc.ascq

    assert triple(MediumError("eio", 7)) == (0x3, 0x11, 0x00)
    assert triple(MediumError("eio", 7, write=True)) == (0x3, 0x0C, 0x00)
    assert triple(MediumError("eio"), write=True) == (0x3, 0x0C, 0x00)
    assert triple(OutOfSpace("full")) == (0x7, 0x27, 0x07)
    assert triple(ReadOnly("ro")) == (0x7, 0x27, 0x00)
    assert triple(OutOfRange("oob")) == (0x5, 0x21, 0x00)
    assert triple(NotReady("gone")) == (0x2, 0x04, 0x00)
    assert storage_error_to_check(MediumError("eio", 42)).information == 42
