"""Unit tests for lunsync.target.scsi.pr: PR IN/OUT service actions, conflicts, APTPL, RESERVE/RELEASE."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from lunsync.target.scsi.pr import decode_transport_id, encode_transport_id
from lunsync.target.scsi.task import Status

from tests.target.scsi.memdev import NEXUS_A, NEXUS_B, Session, cdb10, make_target, sense_of

K_A, K_B = 0xAAAA, 0xBBBB


def prout(sa: int, key: int = 0, sa_key: int = 0, rtype: int = 0, flags: int = 0) -> tuple[bytes, bytes]:
    params = struct.pack(">QQ4xBx2x", key, sa_key, flags)
    return bytes([0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0]), params


def prin(sa: int) -> bytes:
    return bytes([0x5E, sa, 0, 0, 0, 0, 0, 0x10, 0, 0])


def do(s: Session, sa: int, **kw: int) -> Status:
    cdb, params = prout(sa, **kw)
    return s.cmd(cdb, params).status


def test_register_read_keys_and_generation() -> None:
    t, _, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    assert do(a, 0, sa_key=K_A) == Status.GOOD
    assert do(b, 0, sa_key=K_B) == Status.GOOD
    d = bytes(a.cmd(prin(0)).data or b"")
    gen, length = struct.unpack_from(">II", d)
    assert gen == 2 and length == 16 and struct.unpack_from(">QQ", d, 8) == (K_A, K_B)
    assert do(a, 0, key=0x1234, sa_key=1) == Status.RESERVATION_CONFLICT  # wrong key
    assert do(a, 6, sa_key=0x77) == Status.GOOD  # REGISTER AND IGNORE EXISTING KEY


def test_write_exclusive_conflicts() -> None:
    t, _, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    do(a, 0, sa_key=K_A)
    assert do(a, 1, key=K_A, rtype=1) == Status.GOOD
    assert b.cmd(cdb10(0x28, 0, 1)).status == Status.GOOD
    assert b.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.RESERVATION_CONFLICT
    assert a.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.GOOD
    d = bytes(b.cmd(prin(1)).data or b"")
    assert struct.unpack_from(">IIQ", d)[1:] == (16, K_A) and d[21] == 1
    assert do(b, 1, key=0, rtype=1) == Status.RESERVATION_CONFLICT


def test_exclusive_access_registrants_only() -> None:
    t, _, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    do(a, 0, sa_key=K_A)
    do(a, 1, key=K_A, rtype=6)
    assert b.cmd(cdb10(0x28, 0, 1)).status == Status.RESERVATION_CONFLICT
    assert b.cmd(bytes([0x12, 0, 0, 0, 36, 0])).status == Status.GOOD
    do(b, 0, sa_key=K_B)
    assert b.cmd(cdb10(0x28, 0, 1)).status == Status.GOOD


def test_release_wrong_type_and_release_ua() -> None:
    t, _, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    do(a, 0, sa_key=K_A)
    do(b, 0, sa_key=K_B)
    do(a, 1, key=K_A, rtype=5)
    r = a.cmd(*prout(2, key=K_A, rtype=1))
    assert sense_of(r) == (5, 0x26, 0x04)
    assert do(a, 2, key=K_A, rtype=5) == Status.GOOD
    assert sense_of(b.cmd(bytes(6))) == (6, 0x2A, 0x04)


def test_preempt_removes_registration_and_takes_reservation() -> None:
    t, _, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    do(a, 0, sa_key=K_A)
    do(b, 0, sa_key=K_B)
    do(b, 1, key=K_B, rtype=3)
    assert do(a, 4, key=K_A, sa_key=K_B, rtype=3) == Status.GOOD
    keys = bytes(a.cmd(prin(0)).data or b"")
    assert struct.unpack_from(">I", keys, 4)[0] == 8 and struct.unpack_from(">Q", keys, 8)[0] == K_A
    assert sense_of(b.cmd(bytes(6))) == (6, 0x2A, 0x05)
    assert b.cmd(cdb10(0x28, 0, 1)).status == Status.RESERVATION_CONFLICT


def test_clear_and_capabilities_and_bad_sa() -> None:
    t, _, _ = make_target()
    a = Session(t, NEXUS_A)
    do(a, 0, sa_key=K_A)
    caps = bytes(a.cmd(prin(2)).data or b"")
    assert struct.unpack_from(">H", caps)[0] == 8 and caps[4] == 0xEA and caps[5] == 0x01
    assert do(a, 3, key=K_A) == Status.GOOD
    assert struct.unpack_from(">I", bytes(a.cmd(prin(0)).data or b""), 4)[0] == 0
    assert sense_of(a.cmd(prin(7))) == (5, 0x24, 0x00)
    cdb, params = prout(0, sa_key=1)
    assert sense_of(a.cmd(cdb[:8] + b"\x10\x00", params + bytes(8))) == (5, 0x1A, 0x00)


def test_read_full_status_transport_id() -> None:
    t, _, _ = make_target()
    a = Session(t, NEXUS_A)
    do(a, 0, sa_key=K_A)
    d = bytes(a.cmd(prin(3)).data or b"")
    tid_len = struct.unpack_from(">I", d, 8 + 20)[0]
    name, isid, used = decode_transport_id(d, 8 + 24)
    assert (name, isid, used) == (NEXUS_A.initiator_name, NEXUS_A.isid, tid_len)


def test_transport_id_roundtrip_is_padded() -> None:
    tid = encode_transport_id("iqn.x", 0x1)
    assert tid[0] == 0x45 and len(tid) % 4 == 0 and len(tid) >= 24
    assert decode_transport_id(tid, 0)[:2] == ("iqn.x", 1)


def test_register_and_move() -> None:
    t, lu, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    do(a, 0, sa_key=K_A)
    do(a, 1, key=K_A, rtype=1)
    tid = encode_transport_id(NEXUS_B.initiator_name, NEXUS_B.isid)
    params = struct.pack(">QQxBHI", K_A, K_B, 0x02, 1, len(tid)) + tid
    cdb = bytes([0x5F, 7, 1, 0, 0]) + len(params).to_bytes(4, "big") + b"\0"
    assert a.cmd(cdb, params).status == Status.GOOD
    assert lu.pr.is_holder(NEXUS_B) and lu.pr.find(NEXUS_A) is None
    assert b.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.GOOD


def test_aptpl_persists_atomically(tmp_path: Path) -> None:
    path = str(tmp_path / "pr.json")
    t, _, dev = make_target(aptpl_path=path)
    a = Session(t, NEXUS_A)
    do(a, 0, sa_key=K_A, flags=0x01)
    do(a, 1, key=K_A, rtype=1)
    doc = json.loads(Path(path).read_text())
    assert doc["res_type"] == 1 and doc["registrations"][0]["key"] == K_A
    assert os.listdir(tmp_path) == ["pr.json"]  # no temporary file left beside it
    t2, lu2, _ = make_target(dev, aptpl_path=path)
    assert lu2.pr.res_type == 1 and lu2.pr.is_holder(NEXUS_A)
    do(Session(t2, NEXUS_A), 0, key=K_A, sa_key=K_A)  # APTPL cleared by the next REGISTER
    assert not os.path.exists(path)


def test_reserve6_conflicts_and_release_by_other_is_noop() -> None:
    t, lu, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    assert a.cmd(bytes([0x16, 0, 0, 0, 0, 0])).status == Status.GOOD
    assert b.cmd(bytes([0x16, 0, 0, 0, 0, 0])).status == Status.RESERVATION_CONFLICT
    assert b.cmd(bytes([0x17, 0, 0, 0, 0, 0])).status == Status.GOOD
    assert lu.legacy_holder == NEXUS_A
    assert b.cmd(bytes([0x1A, 0, 0x3F, 0, 255, 0])).status == Status.RESERVATION_CONFLICT
    assert b.cmd(bytes([0x12, 0, 0, 0, 36, 0])).status == Status.GOOD
    assert a.cmd(bytes([0x17, 0, 0, 0, 0, 0])).status == Status.GOOD
    do(a, 0, sa_key=K_A)
    assert b.cmd(bytes([0x16, 0, 0, 0, 0, 0])).status == Status.RESERVATION_CONFLICT  # PR in use
