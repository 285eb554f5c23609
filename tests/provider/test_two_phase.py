"""The two-phase hold: nobody commits before everybody holds, any failure before that releases everyone, the deadline
aborts, and the driver waits for every abort before it reports."""

from __future__ import annotations

import asyncio

import pytest
from lunsync.provider.two_phase import TRANSITIONS, HoldFailed, Phase, Send, Step, TwoPhaseHold, Verb, run

MEMBERS = {0: ["a", "b"], 1: ["c"]}


def verbs(sends: list[Send]) -> list[tuple[str, int]]:
    return [(s.verb.name, s.worker) for s in sends]


def test_commits_go_out_only_when_every_worker_holds() -> None:
    h = TwoPhaseHold(MEMBERS, now=0.0, timeout_s=5)
    assert verbs(h.start()) == [("PREPARE", 0), ("PREPARE", 1)]
    assert h.prepared(1, 1.0) == []
    assert h.prepared(1, 1.0) == []  # a repeated answer changes nothing
    sends = h.prepared(0, 2.0)
    assert verbs(sends) == [("COMMIT", 0), ("COMMIT", 1)] and sends[0].members == ("a", "b")
    assert h.phase is Phase.COMMITTING
    h.commit_done(0)
    assert h.phase is Phase.COMMITTING
    h.commit_done(1)
    assert h.phase is Phase.DONE and not h.failures


def test_a_failure_before_the_commit_point_releases_every_worker() -> None:
    h = TwoPhaseHold(MEMBERS, now=0.0, timeout_s=5)
    h.start()
    h.prepared(0, 1.0)
    assert verbs(h.failed(1, "lun c is being restored")) == [("ABORT", 0), ("ABORT", 1)]
    assert h.phase is Phase.ABORTED and h.failures == {1: "lun c is being restored"}
    assert h.prepared(1, 1.5) == []  # a late "held" after the abort commits nothing


def test_the_deadline_aborts_and_a_late_hold_is_a_failure() -> None:
    h = TwoPhaseHold(MEMBERS, now=0.0, timeout_s=5)
    h.start()
    h.prepared(0, 1.0)
    assert h.tick(4.9) == []
    assert verbs(h.tick(5.0)) == [("ABORT", 0), ("ABORT", 1)] and 1 in h.failures
    h2 = TwoPhaseHold(MEMBERS, now=0.0, timeout_s=5)
    h2.start()
    h2.prepared(0, 1.0)
    assert verbs(h2.prepared(1, 6.0)) == [("ABORT", 0), ("ABORT", 1)]


def test_a_commit_failure_is_reported_but_the_outcome_stays_decided() -> None:
    h = TwoPhaseHold(MEMBERS, now=0.0, timeout_s=5)
    h.start()
    h.prepared(0, 1.0)
    h.prepared(1, 1.0)
    assert h.failed(1, "disk full") == []
    h.commit_done(0)
    assert h.phase is Phase.DONE and h.failures == {1: "disk full"}


def test_the_table_has_no_way_back_from_an_outcome() -> None:
    assert {p for p, _ in TRANSITIONS} == {Phase.PREPARING, Phase.COMMITTING}
    h = TwoPhaseHold({0: ["a"]}, now=0.0, timeout_s=1)
    h.start()
    h.prepared(0, 0.0)
    with pytest.raises(KeyError):
        h._enter(Step.FAILED)  # committing is decided: a bug may not turn it into an abort
    with pytest.raises(ValueError):
        TwoPhaseHold({0: []}, now=0.0, timeout_s=1)


class Workers:
    """Fake workers that record the order of what they were told, with a chosen delay or failure per verb."""

    def __init__(self, delay: dict[tuple[Verb, int], float] | None = None,
                 fail: dict[tuple[Verb, int], str] | None = None) -> None:
        self.log: list[tuple[str, int]] = []
        self.delay = delay or {}
        self.fail = fail or {}

    async def call(self, s: Send) -> object:
        await asyncio.sleep(self.delay.get((s.verb, s.worker), 0.0))
        self.log.append((s.verb.name, s.worker))
        why = self.fail.get((s.verb, s.worker))
        if why:
            raise RuntimeError(why)
        return {"worker": s.worker, "members": list(s.members)}


def test_run_commits_after_the_slowest_hold() -> None:
    w = Workers(delay={(Verb.PREPARE, 1): 0.05})
    answers = asyncio.run(run(MEMBERS, w.call, timeout_s=5))
    assert answers == {0: {"worker": 0, "members": ["a", "b"]}, 1: {"worker": 1, "members": ["c"]}}
    assert w.log[:2] == [("PREPARE", 0), ("PREPARE", 1)] and sorted(w.log[2:]) == [("COMMIT", 0), ("COMMIT", 1)]


def test_run_aborts_everywhere_on_a_failed_prepare() -> None:
    w = Workers(fail={(Verb.PREPARE, 1): "lun c is being restored"})
    with pytest.raises(HoldFailed, match="worker 1: lun c is being restored") as e:
        asyncio.run(run(MEMBERS, w.call, timeout_s=5))
    assert e.value.failures == {1: "lun c is being restored"}
    assert sorted(x for x in w.log if x[0] == "ABORT") == [("ABORT", 0), ("ABORT", 1)]
    assert not any(x[0] == "COMMIT" for x in w.log)


def test_run_aborts_at_the_deadline() -> None:
    w = Workers(delay={(Verb.PREPARE, 0): 1.0})
    with pytest.raises(HoldFailed, match="deadline"):
        asyncio.run(run(MEMBERS, w.call, timeout_s=0.1))
    assert ("ABORT", 0) in w.log and ("ABORT", 1) in w.log and not any(x[0] == "COMMIT" for x in w.log)
