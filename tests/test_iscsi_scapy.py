"""The scapy iSCSI layer the malformed-PDU tests rely on: if it builds wrong PDUs, those tests prove nothing.

Layouts are checked against hand-assembled bytes from RFC 7143 §11, digests against the CRC32C vectors of RFC 3720
Appendix B.4 (kept by RFC 7143), and every PDU type round-trips through build and dissect.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iscsi_scapy import (
    BHS,
    BHS_LEN,
    PDU_CLASSES,
    DataIn,
    LoginRequest,
    LoginResponse,
    NopOut,
    Op,
    Reject,
    ScsiCommand,
    ScsiResponse,
    cdb_read10,
    crc32c,
    login_request,
    parse_kv,
    split_pdus,
    text_kv,
)

# RFC 3720 Appendix B.4, in wire order (the digest is sent least significant byte first).
CRC32C_VECTORS = [
    (bytes(32), "aa36918a"),
    (b"\xff" * 32, "43aba862"),
    (bytes(range(32)), "4e79dd46"),
    (bytes(range(31, -1, -1)), "5cdb3f11"),
]


@pytest.mark.parametrize(("data", "wire"), CRC32C_VECTORS)
def test_crc32c_rfc_vectors(data: bytes, wire: str) -> None:
    assert struct.pack("<I", crc32c(data)).hex() == wire


def test_every_pdu_type_is_48_bytes_and_dissects_to_itself() -> None:
    for opcode, cls in PDU_CLASSES.items():
        raw = bytes(cls())
        assert len(raw) == BHS_LEN, cls.__name__
        assert raw[0] & 0x3F == opcode, cls.__name__
        assert type(BHS(raw)) is cls


def test_scsi_command_layout_matches_rfc_7143_section_11_3() -> None:
    cmd = ScsiCommand(flags=0xC1, lun=0x0001_0000_0000_0000, itt=0x11223344, expected_data_transfer_length=4096,
                      cmd_sn=7, exp_stat_sn=9, cdb=cdb_read10(0x1000, 8).ljust(16, b"\0"))
    want = (bytes([0x01, 0xC1, 0, 0, 0, 0, 0, 0]) + bytes.fromhex("0001000000000000") + bytes.fromhex("11223344")
            + struct.pack(">III", 4096, 7, 9) + bytes.fromhex("28000000100000000800") + bytes(6))
    assert bytes(cmd) == want


def test_login_request_layout_matches_rfc_7143_section_11_12() -> None:
    req = LoginRequest(transit=1, csg=0, nsg=3, isid=0x400000000001, tsih=0x1234, itt=5, cid=2, cmd_sn=1,
                       exp_stat_sn=0, data=b"A=B\0")
    raw = bytes(req)
    assert raw[:4] == bytes([0x43, 0x83, 0, 0])
    assert raw[4:8] == bytes([0, 0, 0, 4])
    assert raw[8:16] == bytes.fromhex("4000000000011234")
    assert raw[16:24] == bytes.fromhex("0000000500020000")
    assert raw[48:] == b"A=B\0"


def test_data_segment_padded_to_four_bytes_and_lengths_filled() -> None:
    raw = bytes(NopOut(itt=1, data=b"abcde"))
    assert raw[5:8] == b"\0\0\x05"
    assert len(raw) == BHS_LEN + 8 and raw[-3:] == b"\0\0\0"


def test_lies_are_kept() -> None:
    raw = bytes(NopOut(itt=1, data=b"abcd", data_segment_length=1000, total_ahs_length=3))
    assert raw[4] == 3 and int.from_bytes(raw[5:8], "big") == 1000 and len(raw) == BHS_LEN + 4


def test_digests_cover_header_and_padded_data() -> None:
    pkt = NopOut(itt=1, data=b"abcde").with_digests(True, True)
    raw = bytes(pkt)
    assert len(raw) == BHS_LEN + 4 + 8 + 4
    assert struct.unpack("<I", raw[48:52])[0] == crc32c(raw[:48])
    assert struct.unpack("<I", raw[-4:])[0] == crc32c(b"abcde\0\0\0")
    back = BHS(raw, header_digest_on=True, data_digest_on=True)
    assert back.data == b"abcde" and back.data_digest == crc32c(b"abcde\0\0\0")


def test_no_data_digest_on_an_empty_segment() -> None:
    assert len(bytes(NopOut(itt=1).with_digests(True, True))) == BHS_LEN + 4


def test_stream_splits_into_pdus() -> None:
    stream = bytes(NopOut(itt=1, data=b"x")) + bytes(Reject(reason=4, data=bytes(48))) + bytes(DataIn(itt=3))
    pdus = split_pdus(stream)
    assert [type(p) for p in pdus] == [NopOut, Reject, DataIn]
    assert pdus[1].reason == 4 and pdus[1].rejected_header == bytes(48)


def test_login_request_helper_goes_to_full_feature_phase() -> None:
    req = login_request("iqn.2026-11.io.lunsync:i", "iqn.2026-11.io.lunsync:t", 0x400000000042)
    assert (req.immediate, req.transit, req.csg, req.nsg) == (1, 1, 0, 3)
    keys = parse_kv(req.data)
    assert keys["AuthMethod"] == "None" and keys["TargetName"] == "iqn.2026-11.io.lunsync:t"
    assert keys["SessionType"] == "Normal" and keys["InitiatorName"] == "iqn.2026-11.io.lunsync:i"


def test_text_kv_round_trip() -> None:
    assert text_kv({"A": 1, "B": True, "C": False}) == b"A=1\0B=Yes\0C=No\0"
    assert parse_kv(b"A=1\0B=x=y\0") == {"A": "1", "B": "x=y"}


def test_response_accessors() -> None:
    rsp = ScsiResponse(status=2, data=b"\x00\x12" + bytes([0x70, 0, 6]) + bytes(15))
    assert bytes(BHS(bytes(rsp))).startswith(bytes([Op.SCSI_RESPONSE | 0]))
    assert BHS(bytes(rsp)).sense[:3] == bytes([0x70, 0, 6])
    login = LoginResponse(status_class=2, status_detail=1)
    assert BHS(bytes(login)).status == 0x0201


@settings(max_examples=200, deadline=None)
@given(opcode=st.sampled_from(sorted(PDU_CLASSES)), header=st.binary(min_size=BHS_LEN, max_size=BHS_LEN),
       data=st.binary(max_size=300), hd=st.booleans(), dd=st.booleans())
def test_round_trip(opcode: int, header: bytes, data: bytes, hd: bool, dd: bool) -> None:
    """Any header of a known opcode, with honest lengths and zero padding, dissects and rebuilds to the same bytes."""
    hdr = bytearray(header)
    hdr[0] = (hdr[0] & 0x40) | opcode
    hdr[4] = 0
    hdr[5:8] = len(data).to_bytes(3, "big")
    raw = bytes(hdr)
    if hd:
        raw += struct.pack("<I", crc32c(raw))
    padded = data + bytes((-len(data)) % 4)
    raw += padded
    if dd and data:
        raw += struct.pack("<I", crc32c(padded))
    pkt = BHS(raw, header_digest_on=hd, data_digest_on=dd)
    assert type(pkt) is PDU_CLASSES[opcode]
    assert pkt.data == data
    assert bytes(pkt) == raw
