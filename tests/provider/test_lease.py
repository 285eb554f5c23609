"""Unit tests for lunsync.provider.lease: the ownership lease's state machine, driven with a fake clock."""

from __future__ import annotations

import pytest
from lunsync.provider.lease import Lease, Role, View


def test_acquire_then_renew_each_period() -> None:
    lease = Lease("a", 9.0)
    assert lease.view(0.0) == View(Role.UNKNOWN, None) and lease.due(0.0)
    sent = lease.sent(0.0)
    assert not lease.due(0.0)  # one request in flight at a time
    lease.acquired(sent, 0.1)
    assert lease.view(0.2) == View(Role.OWNER, "a")
    assert not lease.due(3.0) and lease.due(3.1)  # renew every third of the duration
    assert lease.next_deadline(0.2) == pytest.approx(3.1)


def test_owner_steps_down_before_the_cluster_can_expire_it() -> None:
    lease = Lease("a", 10.0, margin_s=2.0)
    lease.acquired(lease.sent(100.0), 105.0)  # the reply was slow: the claim counts from the send time
    assert lease.view(107.9).role is Role.OWNER
    lease.failed(lease.sent(108.0) + 0.5)  # renewal failed: still owner until the claim runs out
    assert lease.view(107.99).role is Role.OWNER
    assert lease.view(108.0) == View(Role.UNKNOWN, None)  # 100 + 10 - 2: before any other gateway could take it
    assert lease.next_deadline(107.0) == pytest.approx(108.0)


def test_standby_sees_owner_and_takes_over_after_expiry() -> None:
    b = Lease("b", 6.0)
    b.busy("a", b.sent(0.0))
    assert b.view(0.0) == View(Role.STANDBY, "a")
    assert not b.due(1.9) and b.due(2.0)
    b.busy("a", b.sent(2.0))
    b.acquired(b.sent(4.0), 4.0)  # the cluster expired a's lock
    assert b.view(4.0) == View(Role.OWNER, "b")


def test_cluster_says_busy_while_we_thought_we_owned_it() -> None:
    a = Lease("a", 6.0)
    a.acquired(a.sent(0.0), 0.0)
    a.busy("b", a.sent(2.0))  # our lock expired at the OSD (we were cut off) and b took it
    assert a.view(2.1) == View(Role.STANDBY, "b")


def test_unknown_after_failure_when_not_owner() -> None:
    a = Lease("a", 6.0)
    a.busy("b", a.sent(0.0))
    a.failed(a.sent(2.0))
    assert a.view(2.0) == View(Role.UNKNOWN, None) and a.due(3.0)
    with pytest.raises(ValueError):
        Lease("a", 0)
