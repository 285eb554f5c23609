"""Unit tests for lunsync.target.scsi.target: dispatch, absent LUNs, UAs, resets and error conversion."""

from __future__ import annotations

from lunsync.snapshots.errors import MediumError, OutOfSpace, Saturated
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.task import ScsiTask, Status, TmfFunction

from tests.target.scsi.memdev import IDENTITY2, NEXUS_A, NEXUS_B, MemDevice, Session, cdb10, make_target, sense_of


def test_first_command_of_a_nexus_gets_power_on_ua() -> None:
    t, _, _ = make_target()
    s = Session(t, clear_ua=False)
    r = s.cmd(bytes(6))
    assert r.status == Status.CHECK_CONDITION and sense_of(r) == (6, 0x29, 0x00)
    assert s.cmd(bytes(6)).status == Status.GOOD


def test_inquiry_does_not_consume_ua() -> None:
    t, _, _ = make_target()
    s = Session(t, clear_ua=False)
    assert s.cmd(bytes([0x12, 0, 0, 0, 36, 0])).status == Status.GOOD
    assert sense_of(s.cmd(bytes(6))) == (6, 0x29, 0x00)


def test_absent_lun() -> None:
    t, _, _ = make_target()
    s = Session(t)
    inq = s.cmd(bytes([0x12, 0, 0, 0, 36, 0]), lun=5)
    assert inq.status == Status.GOOD and inq.data is not None and bytes(inq.data)[0] == 0x7F
    assert sense_of(s.cmd(bytes(6), lun=5)) == (5, 0x25, 0x00)
    rs = s.cmd(bytes([0x03, 0, 0, 0, 18, 0]), lun=5)
    assert rs.status == Status.GOOD and rs.data is not None and bytes(rs.data)[12:14] == b"\x25\x00"
    rl = s.cmd(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), lun=5)
    assert rl.status == Status.GOOD and rl.data is not None and bytes(rl.data)[:4] == b"\x00\x00\x00\x08"


def test_storage_errors_become_sense() -> None:
    t, _, dev = make_target()
    s = Session(t)
    dev.fail_next = MediumError("eio", 3)
    r = s.cmd(cdb10(0x28, 3, 1))
    assert sense_of(r) == (3, 0x11, 0x00) and r.sense is not None and r.sense[3:7] == b"\x00\x00\x00\x03"
    dev.fail_next = OutOfSpace("full")
    assert sense_of(s.cmd(cdb10(0x2A, 0, 1), bytes(512))) == (7, 0x27, 0x07)
    dev.fail_next = MediumError("eio", 9)
    assert sense_of(s.cmd(cdb10(0x2A, 9, 1), bytes(512))) == (3, 0x0C, 0x00)


def test_a_saturated_lun_answers_task_set_full_without_sense() -> None:
    t, _, dev = make_target()
    s = Session(t)
    s.cmd(cdb10(0x28, 0, 1))  # the POWER ON unit attention
    dev.fail_next = Saturated("64 commands wait on its storage")
    r = s.cmd(cdb10(0x2A, 0, 1), bytes(512))
    assert r.status == Status.TASK_SET_FULL and not r.sense
    assert s.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.GOOD


def test_lun_reset_clears_reserve6_and_warns_others() -> None:
    t, lu, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    assert a.cmd(bytes([0x16, 0, 0, 0, 0, 0])).status == Status.GOOD
    assert b.cmd(cdb10(0x28, 0, 1)).status == Status.RESERVATION_CONFLICT
    t.reset(TmfFunction.LOGICAL_UNIT_RESET, NEXUS_A, 0)
    assert lu.legacy_holder is None
    assert sense_of(a.cmd(bytes(6))) == (6, 0x29, 0x03)  # the issuer too (SAM-5 §6.3.3)
    assert sense_of(b.cmd(bytes(6))) == (6, 0x29, 0x03)
    assert b.cmd(cdb10(0x28, 0, 1)).status == Status.GOOD  # the reservation is gone


def test_nexus_lost_releases_reserve6_only() -> None:
    t, lu, _ = make_target()
    a = Session(t, NEXUS_A)
    a.cmd(bytes([0x16, 0, 0, 0, 0, 0]))
    t.nexus_lost(NEXUS_A)
    assert lu.legacy_holder is None
    assert sense_of(a.cmd(bytes(6))) == (6, 0x29, 0x07)


def test_add_remove_lun_reports_luns_changed() -> None:
    t, _, _ = make_target()
    s = Session(t)
    t.add_lun(1, LogicalUnit(MemDevice(), IDENTITY2))
    assert sense_of(s.cmd(bytes(6))) == (6, 0x3F, 0x0E)
    assert sorted(t.luns) == [0, 1]
    t.remove_lun(1)
    assert sense_of(s.cmd(bytes(6))) == (6, 0x3F, 0x0E)


def test_data_out_length() -> None:
    t, _, _ = make_target()
    def task(cdb: bytes) -> ScsiTask:
        return ScsiTask(NEXUS_A, 0, cdb, 1)
    assert t.data_out_length(task(cdb10(0x2A, 0, 3))) == 1536
    assert t.data_out_length(task(cdb10(0x28, 0, 3))) is None
    assert t.data_out_length(task(bytes([0x89, 0]) + bytes(11) + b"\x02\x00\x00")) == 2048
    assert t.data_out_length(task(cdb10(0x2F, 0, 3, flags=0x00))) == 0
    assert t.data_out_length(task(cdb10(0x2F, 0, 3, flags=0x02))) == 1536
