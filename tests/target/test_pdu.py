"""PDU codec: hex vectors laid out by hand from RFC 7143 §11, round trips and garbage input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lunsync.target import pdu


def h(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


# RFC 7143 §11.18: NOP-Out, immediate, ITT 1, TTT reserved, CmdSN 5, ExpStatSN 7.
NOP_OUT = h("40800000 00000000 0000000000000000 00000001 ffffffff 00000005 00000007" + "00" * 16)
# RFC 7143 §11.3: READ(10) on LUN 1, F|R|SIMPLE, ITT 0x10, EDTL 4096, CmdSN 2, ExpStatSN 3.
READ10 = h("01c10000 00000000 0001000000000000 00000010 00001000 00000002 00000003"
           "28000000 00200000 08000000 00000000")
# RFC 7143 §11.12: Login, T=1 CSG=1 NSG=3, ISID 0x23d000000001, TSIH 0, ITT 0, CID 0, CmdSN 0, dlen 0x1c.
LOGIN = h("43870000 0000001c 23d0000000010000 00000000 00000000 00000000 00000000" + "00" * 16)


def test_nop_out_vector() -> None:
    p = pdu.decode(NOP_OUT)
    assert p == pdu.NopOut(True, 0, 1, 0xFFFFFFFF, 5, 7, 0)


def test_scsi_command_vector() -> None:
    p = pdu.decode(READ10)
    assert isinstance(p, pdu.ScsiCommand)
    assert (p.final, p.read, p.write, p.attr) == (True, True, False, 1)
    assert (p.lun, p.itt, p.expected_length, p.cmd_sn, p.exp_stat_sn) == (1, 0x10, 4096, 2, 3)
    assert p.cdb[:10] == h("28000000 00200000 0800")


def test_login_vector() -> None:
    p = pdu.decode(LOGIN)
    assert isinstance(p, pdu.LoginRequest)
    assert (p.transit, p.cont, p.csg, p.nsg) == (True, False, 1, 3)
    assert p.isid == 0x23D000000001 and p.tsih == 0 and p.data_segment_length == 0x1C


def test_frame_length_counts_padding_and_digests() -> None:
    assert pdu.frame_length(LOGIN, False, False) == 48 + 28
    assert pdu.frame_length(LOGIN, True, True) == 48 + 4 + 28 + 4
    odd = bytearray(LOGIN)
    odd[7] = 0x1D  # 29 bytes: 3 bytes of padding
    assert pdu.frame_length(odd, False, False) == 48 + 32


def test_scsi_response_encoding() -> None:
    b = pdu.ScsiResponse(itt=0x10, status=2, stat_sn=9, exp_cmd_sn=3, max_cmd_sn=130, underflow=True,
                         residual=512, data_segment_length=20).encode()
    assert len(b) == 48
    assert b[0] == 0x21 and b[1] == 0x82 and b[3] == 2
    assert b[5:8] == h("000014")
    assert int.from_bytes(b[16:20], "big") == 0x10
    assert int.from_bytes(b[24:28], "big") == 9
    assert int.from_bytes(b[28:32], "big") == 3
    assert int.from_bytes(b[32:36], "big") == 130
    assert int.from_bytes(b[44:48], "big") == 512


def test_data_in_with_status() -> None:
    b = pdu.encode_data_in(7, 1, 2, 8192, 4096, True, status=0, stat_sn=5, exp_cmd_sn=6, max_cmd_sn=100,
                           overflow=True, residual=100)
    assert b[0] == 0x25 and b[1] == 0x80 | 0x04 | 0x01
    assert b[8:10] == h("0001")
    assert int.from_bytes(b[36:40], "big") == 2 and int.from_bytes(b[40:44], "big") == 8192
    assert int.from_bytes(b[44:48], "big") == 100
    plain = pdu.encode_data_in(7, 1, 0, 0, 4096, False, stat_sn=5)
    assert plain[1] == 0 and int.from_bytes(plain[24:28], "big") == 0  # StatSN only with S


def test_login_response_fields() -> None:
    b = pdu.encode_login_response(transit=True, cont=False, csg=1, nsg=3, isid=0x23D000000001, tsih=5, itt=9,
                                  stat_sn=1, exp_cmd_sn=2, max_cmd_sn=3, status_class=2, status_detail=1, length=0)
    assert b[0] == 0x23 and b[1] == 0x87
    assert b[8:14] == h("23d000000001") and b[14:16] == h("0005")
    assert b[36] == 2 and b[37] == 1


def test_lun_encoding_round_trip() -> None:
    for lun in (0, 1, 255, 256, 16383):
        assert pdu.decode_lun(int.from_bytes(pdu.encode_lun(lun), "big")) == lun
    assert pdu.encode_lun(300)[0] == 0x41


def test_crc32c_known_vector() -> None:
    # RFC 3720 §B.4: 32 bytes of zeros give 0x8a9136aa.
    assert pdu.crc32c(bytes(32)) == 0x8A9136AA
    assert pdu.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert pdu.digest_bytes(0x8A9136AA) == h("aa36918a")


def test_frame_adds_padding_and_digests() -> None:
    parts = pdu.frame(b"\0" * 48, b"abcde", True, True)
    assert [len(x) for x in parts] == [48, 4, 5, 3, 4]


@given(st.binary(min_size=48, max_size=48))
def test_garbage_decodes_or_raises_decode_error(raw: bytes) -> None:
    try:
        p = pdu.decode(raw)
    except pdu.DecodeError:
        return
    assert pdu.opcode_of(raw) in pdu.INITIATOR_OPS
    assert p is not None


def test_target_opcode_is_refused() -> None:
    with pytest.raises(pdu.DecodeError):
        pdu.decode(bytes([0x21]) + bytes(47))


def test_encode_scsi_response_matches_the_dataclass_encoding() -> None:
    # The write fast path packs its answer directly; it must be byte for byte what the general encoder gives.
    for status in (0x00, 0x02, 0x18):
        want = pdu.ScsiResponse(0x1234ABCD, status, 7, 8, 40).encode()
        assert pdu.encode_scsi_response(0x1234ABCD, status, 7, 8, 40) == want
        assert len(want) == pdu.BHS_LEN
    # Every field at its widest, and the ExpDataSN of a write that was sent R2Ts.
    want = pdu.ScsiResponse(0xFFFFFFFE, 0x02, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, exp_data_sn=3).encode()
    assert pdu.encode_scsi_response(0xFFFFFFFE, 0x02, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 3) == want


def test_encode_read_answer_matches_the_general_data_in_encoder() -> None:
    for lun in (0, 3, 300):
        want = pdu.encode_data_in(0xABCD, lun, 0, 0, 4096, True, status=0, stat_sn=5, exp_cmd_sn=6, max_cmd_sn=70)
        assert pdu.encode_read_answer(0xABCD, lun, 4096, 5, 6, 70) == want
    want = pdu.encode_data_in(0xFFFFFFFE, 16383, 0, 0, 0xFFFFFC, True, status=0, stat_sn=0xFFFFFFFF,
                              exp_cmd_sn=0x80000000, max_cmd_sn=1)
    assert pdu.encode_read_answer(0xFFFFFFFE, 16383, 0xFFFFFC, 0xFFFFFFFF, 0x80000000, 1) == want


def test_decode_at_an_offset_reads_the_bhs_in_place() -> None:
    # The connection decodes a PDU where it lies in its receive buffer; the answer is the copy's.
    buf = memoryview(b"\xee" * 13 + READ10 + b"\xee" * 7)
    assert pdu.decode(buf, 13) == pdu.decode(READ10)
    for raw in (NOP_OUT, LOGIN[:48]):  # the other opcodes' fields, at their offsets from the BHS
        assert pdu.decode(memoryview(b"\xee" * 5 + raw), 5) == pdu.decode(raw)
    with pytest.raises(pdu.DecodeError):
        pdu.decode(buf, len(buf) - 47)  # fewer than 48 bytes from there
