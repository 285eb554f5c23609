"""Placement of targets on workers: round-robin in catalog order at start, least-loaded for new ones, moved only when
told (an empty target, by the control)."""

from __future__ import annotations

import pytest
from lunsync.provider.assignment import Assignment, beside


def test_start_deals_round_robin_in_catalog_order() -> None:
    a = Assignment(2, ["iqn.a", "iqn.b", "iqn.c"])
    assert [a.owner(t) for t in ("iqn.a", "iqn.b", "iqn.c")] == [0, 1, 0]
    assert a.owned_by(0) == ["iqn.a", "iqn.c"] and a.owned_by(1) == ["iqn.b"]


def test_names_are_case_insensitive_as_the_directory_keys_them() -> None:
    a = Assignment(2, ["IQN.A"])
    assert a.owner("iqn.a") == 0 and a.place("Iqn.A") == 0


def test_a_new_target_goes_to_the_least_loaded_worker_and_stays() -> None:
    a = Assignment(3, ["t1", "t2", "t3", "t4"])  # loads 2, 1, 1
    assert a.place("t5") == 1
    assert a.place("t6") == 2
    assert a.remove("t1") == 0
    assert a.place("t7") == 0  # the freed place
    assert a.place("t5") == 1  # placed once, placed for good
    assert a.owner("t1") is None and a.remove("t1") is None


def test_n_targets_over_n_workers_give_each_worker_one() -> None:
    for n in range(1, 9):
        a = Assignment(n, [f"t{i}" for i in range(n)])
        assert sorted(a.owner(f"t{i}") or 0 for i in range(n)) == list(range(n))


def test_zero_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        Assignment(0)


def test_a_target_moves_only_when_told_and_only_to_a_worker_that_exists() -> None:
    a = Assignment(2, ["iqn.2026-11.io.lunsync:a", "iqn.2026-11.io.lunsync:b"])
    a.move("IQN.2026-11.io.lunsync:a", 1)
    assert a.owner("iqn.2026-11.io.lunsync:a") == 1 and a.owned_by(0) == []
    with pytest.raises(ValueError):
        a.move("iqn.2026-11.io.lunsync:a", 2)
    with pytest.raises(KeyError):
        a.move("iqn.2026-11.io.lunsync:unknown", 0)


def test_targets_that_show_the_same_lun_go_to_one_worker() -> None:
    # b shows a LUN a shows: it goes with a, and the deal goes on round-robin for the others.
    a = Assignment(2, ["a", "b", "c", "d"], near={"b": "a"})
    assert [a.owner(t) for t in "abcd"] == [0, 0, 1, 0]
    assert a.place("e", near="c") == 1
    assert a.place("f", near="nosuch") == 1  # an unplaced neighbour: the least loaded (1 has c, e; 0 has a, b, d)


def test_a_configuration_splitting_a_lun_over_workers_is_named() -> None:
    a = Assignment(2, ["t0", "t1"])  # t0 on worker 0, t1 on worker 1
    home = {"x": 0, "y": 1, "free": 0}.get
    none = {"-": ""}.get  # nothing is pinned
    # Each LUN on targets of one worker: nothing to say; a new LUN and an unmapped one may go anywhere.
    assert a.split([("t0", ["x", "free"]), ("t1", ["y", "new"])], ["x", "y", "free", "new"], home, none) == []
    # x, worker 0's, shown by worker 1's t1 too: refused, naming both workers' targets.
    [(lun, why)] = a.split([("t0", ["x"]), ("t1", ["y", "x"])], ["x", "y"], home, none)
    assert lun == "x" and "t0 on worker 0; t1 on worker 1" in why, why
    # A new target goes with the earliest target it shares LUNs with (t0), so joining x and y splits y (worker 1's).
    [(lun, why)] = a.split([("t0", ["x"]), ("t1", ["y"]), ("t2", ["x", "y"])], ["x", "y"], home, none)
    assert lun == "y" and "t2 on worker 0; t1 on worker 1" in why, why
    # A new target showing only new LUNs goes to the least loaded worker, with its LUNs: fine.
    assert a.split([("t0", ["x"]), ("t1", ["y"]), ("t2", ["n1"]), ("t3", ["n1"])], ["x", "y", "n1"], home,
                   none) == []
    # An unmapped LUN moves with its first mapping, unless it has snapshots or a restore writes it; unmapping one of
    # worker 1's sends it to worker 0, which is the same move.
    assert a.split([("t1", ["y", "free"])], ["y", "free"], home, none) == []
    [(lun, why)] = a.split([("t1", ["y", "free"])], ["y", "free"], home, {"free": "has snapshots"}.get)
    assert lun == "free" and "from worker 0 to worker 1" in why and "snapshots" in why, why
    [(lun, why)] = a.split([("t1", [])], ["y"], home, {"y": "is being restored by recovery r1"}.get)
    assert lun == "y" and "from worker 1 to worker 0" in why and "recovery r1" in why, why
    # An unmapped LUN made from y's snapshot lives on worker 1 with y and stays there unmapped, even pinned; it
    # follows y if y's mapping goes to worker 0 (and is named if it is pinned), and a cycle ends on worker 0.
    made = {"r": "y", "rr": "r", "c1": "c2", "c2": "c1"}.get
    home2 = {"x": 0, "y": 1, "r": 1, "rr": 1, "c1": 1, "c2": 1}.get
    pinned = {"r": "has snapshots", "rr": "has snapshots", "c1": "has snapshots"}.get
    assert a.split([("t0", ["x"]), ("t1", ["y"])], ["x", "y", "r", "rr"], home2, pinned, made) == []
    refused = a.split([("t0", ["x", "y"]), ("t1", [])], ["x", "y", "r", "rr"], home2, pinned, made)
    assert [n for n, _ in refused] == ["r", "rr"] and "from worker 1 to worker 0" in refused[0][1], refused
    [(lun, why)] = a.split([("t0", ["x"]), ("t1", ["y"])], ["c1", "c2"], home2, pinned, made)
    assert lun == "c1" and "from worker 1 to worker 0" in why, why
    # The placement itself is untouched by the check.
    assert a.owner("t2") is None and a.owned_by(1) == ["t1"]


def test_a_target_joining_two_earlier_targets_luns_ties_all_three_to_one_worker() -> None:
    # c shows x (a's) and y (b's): a, b and c must be one worker's, or one of x and y is not shown by c.
    targets = [("a", ["x"]), ("b", ["y"]), ("c", ["x", "y"]), ("d", ["z"]), ("e", ["w"]), ("f", ["w", "z"])]
    near = beside(targets)
    assert near == {"b": "a", "c": "a", "e": "d", "f": "d"}
    a = Assignment(2, [t for t, _ in targets], near)
    assert a.owned_by(0) == ["a", "b", "c"] and a.owned_by(1) == ["d", "e", "f"]
    assert a.split(targets, ["x", "y", "z", "w"], lambda _: None, lambda _: None) == []
