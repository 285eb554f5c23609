"""Unit tests for lunsync.target.sequencing: serial arithmetic, the CmdSN window, StatSN and tags."""

from __future__ import annotations

from lunsync.target.sequencing import CMD_WINDOW, MASK32, Admit, Sequencer, sn_le, sn_lt


def view(b: bytes = b"") -> memoryview:
    return memoryview(b)


def test_serial_arithmetic_wraps() -> None:
    assert sn_lt(MASK32, 0) and not sn_lt(0, MASK32)
    assert sn_lt(5, 6) and not sn_lt(6, 6) and sn_le(6, 6)
    assert not sn_lt(0, 1 << 31) and not sn_lt(1 << 31, 0)  # undefined half-way: neither is less


def test_in_order_commands_run_now_and_move_exp_cmd_sn() -> None:
    s: Sequencer[str] = Sequencer()
    s.start(cmd_sn=10, exp_stat_sn=3)
    assert (s.exp_cmd_sn, s.max_cmd_sn, s.stat_sn) == (10, 10 + CMD_WINDOW - 1, 3)
    assert s.admit("a", 10, False, view()) is Admit.NOW
    assert s.exp_cmd_sn == 11
    assert s.admit("i", 99, True, view()) is Admit.NOW  # immediate: no CmdSN turn
    assert s.exp_cmd_sn == 11
    assert [s.next_stat_sn(), s.next_stat_sn(), s.stat_sn] == [3, 4, 5]


def test_early_command_waits_for_its_turn_with_a_copy_of_its_data() -> None:
    s: Sequencer[str] = Sequencer()
    s.start(cmd_sn=1, exp_stat_sn=0)
    buf = bytearray(b"late")
    assert s.admit("c3", 3, False, memoryview(buf)) is Admit.QUEUED
    buf[:] = b"XXXX"  # the receive buffer is reused; the queued PDU must keep its own bytes
    assert s.next_queued() is None  # CmdSN 1 and 2 have not arrived
    assert s.admit("c1", 1, False, view()) is Admit.NOW
    assert s.next_queued() is None
    assert s.admit("c2", 2, False, view()) is Admit.NOW
    assert s.next_queued() == ("c3", b"late")
    assert s.exp_cmd_sn == 4 and s.next_queued() is None


def test_outside_the_window_is_discarded() -> None:
    s: Sequencer[str] = Sequencer()
    s.start(cmd_sn=100, exp_stat_sn=0)
    assert s.admit("old", 99, False, view()) is Admit.DISCARDED
    assert s.admit("far", s.max_cmd_sn + 1, False, view()) is Admit.DISCARDED
    assert s.admit("edge", s.max_cmd_sn, False, view()) is Admit.QUEUED


def test_window_narrows_with_tasks_in_flight_and_never_moves_back() -> None:
    s: Sequencer[str] = Sequencer()
    s.start(cmd_sn=MASK32, exp_stat_sn=0)  # across the 32-bit wrap
    for sn in (MASK32, 0, 1):
        assert s.admit("c", sn, False, view()) is Admit.NOW
        s.inflight += 1
    s.update_window()
    top = s.max_cmd_sn
    assert top == (MASK32 + CMD_WINDOW - 1) & MASK32  # three in flight use up the three slots freed
    s.task_done()
    assert s.max_cmd_sn == (top + 1) & MASK32
    s.inflight += 5
    s.update_window()
    assert s.max_cmd_sn == (top + 1) & MASK32  # MaxCmdSN never decreases


def test_target_transfer_tags_skip_zero_and_the_reserved_tag() -> None:
    s: Sequencer[str] = Sequencer()
    assert s.next_ttt() == 1
    s._ttt = 0x7FFFFFFE
    assert [s.next_ttt(), s.next_ttt()] == [0x7FFFFFFF, 1]
