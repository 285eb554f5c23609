"""Unit tests for lunsync.target.session: TSIH assignment, reinstatement and every TMF function, with plain objects
for sessions and target and the clock passed in."""

from __future__ import annotations

import pytest
from lunsync.target import keys
from lunsync.target.directory import TargetEntry
from lunsync.target.login import LoginResult
from lunsync.target.pdu import TaskMgmtRequest
from lunsync.target.scsi.target import ScsiTarget
from lunsync.target.scsi.task import Nexus, TmfFunction
from lunsync.target.session import SessionTable, TmfResponse

IQN = "iqn.2026-11.io.lunsync:t"
OTHER = "iqn.2026-11.io.lunsync:other"
INI = "iqn.2026-11.org.example:host"


class FakeSession:
    def __init__(self, tasks: dict[int, int] | None = None) -> None:
        self.tasks = dict(tasks or {})  # tag -> LUN
        self.closed = False
        self.aborted: list[int] = []

    @property
    def login_result(self) -> LoginResult | None:
        return None

    def abort(self, tag: int) -> bool:
        if self.tasks.pop(tag, None) is None:
            return False
        self.aborted.append(tag)
        return True

    def abort_lun(self, lun: int | None) -> int:
        tags = [t for t, n in self.tasks.items() if lun is None or n == lun]
        for t in tags:
            self.abort(t)
        return len(tags)

    def close(self) -> None:
        self.closed = True


class FakeTarget:
    def __init__(self, luns: set[int]) -> None:
        self.luns = luns
        self.resets: list[tuple[TmfFunction, int | None]] = []

    def has_lun(self, lun: int) -> bool:
        return lun in self.luns

    def reset(self, function: TmfFunction, nexus: Nexus, lun: int | None = None) -> None:
        self.resets.append((function, lun))


def result(tsih: int, *, isid: int = 1, initiator: str = INI, target: str | None = IQN) -> LoginResult:
    entry = TargetEntry(target, ScsiTarget(target)) if target is not None else None
    return LoginResult(initiator, "", isid, tsih, 0, target is None, entry, keys.NegotiatedParams.defaults(), "None")


def tmf(function: TmfFunction, *, lun: int = 0, rtt: int = 0, cmd_sn: int = 10, ref_cmd_sn: int = 0
        ) -> TaskMgmtRequest:
    return TaskMgmtRequest(True, int(function), lun, 0x99, rtt, cmd_sn, 0, ref_cmd_sn, 0)


NEXUS = Nexus(INI, 1, IQN)


def table_with(*sessions: tuple[FakeSession, LoginResult]) -> SessionTable[FakeSession]:
    t: SessionTable[FakeSession] = SessionTable(max_sessions=8)
    for s, r in sessions:
        assert t.register(s, r, now=5.0) == []
    return t


def test_tsih_allocation_skips_used_values_and_stops_at_the_limit() -> None:
    t: SessionTable[FakeSession] = SessionTable(max_sessions=2)
    a = t.allocate_tsih()
    t.register(FakeSession(), result(a), now=0.0)
    b = t.allocate_tsih()
    assert a != b and a != 0 and b != 0
    t.register(FakeSession(), result(b, isid=2), now=0.0)
    assert t.allocate_tsih() == 0  # max_sessions reached


def test_tsih_wraps_without_zero_and_skips_live_sessions() -> None:
    t: SessionTable[FakeSession] = SessionTable()
    t.register(FakeSession(), result(1), now=0.0)
    t._tsih = 0xFFFE
    assert t.allocate_tsih() == 0xFFFF
    assert t.allocate_tsih() == 2  # 0 is reserved, 1 is taken


def test_login_with_same_isid_initiator_and_target_reinstates_the_old_session() -> None:
    old, new, bystander = FakeSession(), FakeSession(), FakeSession()
    t = table_with((old, result(1)), (bystander, result(2, isid=2)))
    assert t.register(new, result(3), now=9.0) == [old]
    assert t.get(1) is None and t.get(3) is new and t.get(2) is bystander
    entry = t.entry(3)
    assert entry is not None and entry.since == 9.0


def test_other_initiator_or_target_is_not_reinstated() -> None:
    a, b, c = FakeSession(), FakeSession(), FakeSession()
    t = table_with((a, result(1)))
    assert t.register(b, result(2, initiator="iqn.2026-11.org.example:other"), now=0.0) == []
    assert t.register(c, result(3, target=OTHER), now=0.0) == []
    assert len(t) == 3


def test_remove_keeps_a_tsih_taken_over_by_another_session() -> None:
    a, b = FakeSession(), FakeSession()
    t = table_with((a, result(1)))
    assert not t.remove(1, b)
    assert 1 in t
    assert t.remove(1, a)
    assert 1 not in t and len(t) == 0


def test_items_in_tsih_order_and_of_target() -> None:
    a, b, d = FakeSession(), FakeSession(), FakeSession()
    t = table_with((b, result(7, isid=2)), (a, result(3)), (d, result(5, isid=3, target=None)))
    assert [tsih for tsih, _ in t.items()] == [3, 5, 7]
    assert t.of_target(IQN) == [b, a]
    assert t.of_target(OTHER) == []


def test_abort_task_found_and_not_found() -> None:
    s = FakeSession({5: 0})
    t = table_with((s, result(1)))
    tgt = FakeTarget({0})
    out = t.task_management(s, tmf(TmfFunction.ABORT_TASK, rtt=5), target=tgt, nexus=NEXUS, exp_cmd_sn=10)
    assert out.response is TmfResponse.FUNCTION_COMPLETE and s.aborted == [5]
    out = t.task_management(s, tmf(TmfFunction.ABORT_TASK, rtt=6, ref_cmd_sn=3), target=tgt, nexus=NEXUS,
                            exp_cmd_sn=10)
    assert out.response is TmfResponse.TASK_DOES_NOT_EXIST


def test_abort_task_of_a_command_not_yet_received_is_complete() -> None:
    # RFC 7143 §11.5.1: RefCmdSN inside [ExpCmdSN, CmdSN) was never received; consider it received and aborted.
    s = FakeSession()
    t = table_with((s, result(1)))
    out = t.task_management(s, tmf(TmfFunction.ABORT_TASK, rtt=6, ref_cmd_sn=12, cmd_sn=14), target=FakeTarget({0}),
                            nexus=NEXUS, exp_cmd_sn=11)
    assert out.response is TmfResponse.FUNCTION_COMPLETE
    # Across the 32-bit wrap too.
    out = t.task_management(s, tmf(TmfFunction.ABORT_TASK, rtt=6, ref_cmd_sn=0, cmd_sn=2), target=FakeTarget({0}),
                            nexus=NEXUS, exp_cmd_sn=0xFFFFFFFF)
    assert out.response is TmfResponse.FUNCTION_COMPLETE


def test_abort_task_set_touches_only_the_issuing_session_and_the_lun() -> None:
    me, other = FakeSession({1: 0, 2: 1}), FakeSession({3: 0})
    t = table_with((me, result(1)), (other, result(2, isid=2)))
    tgt = FakeTarget({0, 1})
    out = t.task_management(me, tmf(TmfFunction.ABORT_TASK_SET, lun=0), target=tgt, nexus=NEXUS, exp_cmd_sn=10)
    assert out.response is TmfResponse.FUNCTION_COMPLETE
    assert me.aborted == [1] and other.aborted == [] and tgt.resets == []


@pytest.mark.parametrize("function", [TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET])
def test_clear_task_set_and_lu_reset_reach_every_session_of_the_target(function: TmfFunction) -> None:
    me, other, elsewhere = FakeSession({1: 0}), FakeSession({3: 0, 4: 1}), FakeSession({5: 0})
    t = table_with((me, result(1)), (other, result(2, isid=2)), (elsewhere, result(3, target=OTHER)))
    tgt = FakeTarget({0, 1})
    out = t.task_management(me, tmf(function, lun=0), target=tgt, nexus=NEXUS, exp_cmd_sn=10)
    assert out.response is TmfResponse.FUNCTION_COMPLETE and out.close_after == ()
    assert me.aborted == [1] and other.aborted == [3] and elsewhere.aborted == []
    assert tgt.resets == [(function, 0)]


def test_lun_that_does_not_exist() -> None:
    s = FakeSession({1: 0})
    t = table_with((s, result(1)))
    tgt = FakeTarget({0})
    out = t.task_management(s, tmf(TmfFunction.LOGICAL_UNIT_RESET, lun=9), target=tgt, nexus=NEXUS, exp_cmd_sn=1)
    assert out.response is TmfResponse.LUN_DOES_NOT_EXIST
    out = t.task_management(s, tmf(TmfFunction.ABORT_TASK_SET, lun=9), target=tgt, nexus=NEXUS, exp_cmd_sn=1)
    assert out.response is TmfResponse.FUNCTION_COMPLETE  # nothing to abort there
    assert s.aborted == [] and tgt.resets == []


@pytest.mark.parametrize("function", [TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET])
def test_target_resets_abort_everything_and_cold_closes_the_sessions(function: TmfFunction) -> None:
    me, other, elsewhere = FakeSession({1: 0}), FakeSession({3: 1}), FakeSession({5: 0})
    t = table_with((me, result(1)), (other, result(2, isid=2)), (elsewhere, result(3, target=OTHER)))
    tgt = FakeTarget({0, 1})
    out = t.task_management(me, tmf(function), target=tgt, nexus=NEXUS, exp_cmd_sn=1)
    assert out.response is TmfResponse.FUNCTION_COMPLETE
    assert me.aborted == [1] and other.aborted == [3] and elsewhere.aborted == []
    assert tgt.resets == [(function, None)]
    cold = function is TmfFunction.TARGET_COLD_RESET
    assert set(map(id, out.close_after)) == ({id(me), id(other)} if cold else set())
    assert not me.closed  # closing is the caller's, after the response is queued


@pytest.mark.parametrize(("function", "response"), [
    (TmfFunction.CLEAR_ACA, TmfResponse.FUNCTION_NOT_SUPPORTED),
    (TmfFunction.TASK_REASSIGN, TmfResponse.REASSIGNMENT_NOT_SUPPORTED),
    (99, TmfResponse.REJECTED),
])
def test_unsupported_functions(function: int, response: TmfResponse) -> None:
    s = FakeSession({1: 0})
    t = table_with((s, result(1)))
    req = TaskMgmtRequest(True, function, 0, 0x99, 0, 1, 0, 0, 0)
    assert t.task_management(s, req, target=FakeTarget({0}), nexus=NEXUS, exp_cmd_sn=1).response is response
    assert s.aborted == []


def test_discovery_session_has_no_task_management() -> None:
    s = FakeSession()
    t = table_with((s, result(1, target=None)))
    out = t.task_management(s, tmf(TmfFunction.ABORT_TASK_SET), target=None, nexus=None, exp_cmd_sn=1)
    assert out.response is TmfResponse.REJECTED
