"""Tests for lunsync.snapshots.snapcat: planning a snapshot set checks every rule, and recording it writes the plan in
one transaction, refusing (with nothing recorded) what changed underneath since the plan."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lunsync.snapshots.catalog import AlreadyExists, Catalog, InUse, Invalid, NotFound
from lunsync.snapshots.snapcat import SnapshotCatalog

MiB = 1 << 20


@pytest.fixture
def sc(tmp_path: Path) -> Iterator[SnapshotCatalog]:
    with Catalog(tmp_path / "data") as cat:
        for i in range(3):
            cat.create_lun(f"l{i}", 4 * MiB)
        s = SnapshotCatalog(cat)
        s.ensure_default_pool()
        yield s


def test_a_planned_set_is_recorded_with_its_epochs_and_hold_time(sc: SnapshotCatalog) -> None:
    specs = [("l0", "a"), ("l2", "a")]
    plans = sc.plan_snapshots(specs, "differential", None, "s1")
    assert [(p.lun_name, p.name, p.last_epoch, p.pool.name) for p in plans] == [("l0", "a", 0, "default"),
                                                                                  ("l2", "a", 0, "default")]
    sc.record_snapshots(plans, "differential", "s1", [3, 1], hold_ms=0.25)
    recs = sc.get_snapshots(specs)
    assert [(r.full_name, r.epoch, r.set_name, r.state, r.size_bytes) for r in recs] == [
        ("l0@a", 3, "s1", "valid", 4 * MiB), ("l2@a", 1, "s1", "valid", 4 * MiB)]
    assert len({r.naa for r in recs}) == 2
    with sc.catalog.transaction(write=False) as db:
        assert db.execute("SELECT hold_ms FROM snapshot_sets WHERE name = 's1'").fetchone()[0] == 0.25
    # The next plan starts from the recorded epochs.
    assert [p.last_epoch for p in sc.plan_snapshots([("l0", "b"), ("l1", "b")], "differential", None, None)] == [3, 0]


def test_planning_refuses_what_recording_would(sc: SnapshotCatalog) -> None:
    sc.record_snapshots(sc.plan_snapshots([("l0", "a")], "differential", None, "s1"), "differential", "s1", [1])
    with pytest.raises(AlreadyExists, match="l0@a already exists"):
        sc.plan_snapshots([("l1", "a"), ("l0", "a")], "differential", None, None)
    with pytest.raises(AlreadyExists, match="set 's1'"):
        sc.plan_snapshots([("l1", "a")], "differential", None, "s1")
    with pytest.raises(NotFound, match="lun 'nope'"):
        sc.plan_snapshots([("l1", "a"), ("nope", "a")], "differential", None, None)
    with pytest.raises(NotFound, match="pool 'other'"):
        sc.plan_snapshots([("l1", "a")], "differential", "other", None)
    with pytest.raises(Invalid, match="each LUN once"):
        sc.plan_snapshots([("l1", "a"), ("l1", "b")], "differential", None, None)
    sc.create_pool("other", "other")
    with pytest.raises(Invalid, match="another pool"):
        sc.plan_snapshots([("l0", "b")], "differential", "other", None)
    assert [p.pool.name for p in sc.plan_snapshots([("l1", "a")], "differential", "other", None)] == ["other"]


@pytest.mark.parametrize("change, error", [
    ("name", AlreadyExists),  # the same snapshot name, taken meanwhile
    ("set", AlreadyExists),  # the same set name
    ("lun", NotFound),  # a member LUN deleted
    ("epoch", Invalid),  # a newer epoch committed for a member
])
def test_recording_refuses_what_changed_since_the_plan_and_records_nothing(sc: SnapshotCatalog, change: str,
                                                                          error: type[Exception]) -> None:
    specs = [("l0", "a"), ("l1", "a")]
    plans = sc.plan_snapshots(specs, "differential", None, "s1")
    if change == "name":
        sc.record_snapshots(sc.plan_snapshots([("l1", "a")], "differential", None, None), "differential", None, [5])
    elif change == "set":
        sc.record_snapshots(sc.plan_snapshots([("l2", "x")], "differential", None, "s1"), "differential", "s1", [1])
    elif change == "lun":
        sc.catalog.delete_lun("l1")
    else:
        sc.record_snapshots(sc.plan_snapshots([("l1", "z")], "differential", None, None), "differential", None, [7])
    before = sc.list_snapshots()
    with pytest.raises(error):
        sc.record_snapshots(plans, "differential", "s1", [1, 2])
    assert sc.list_snapshots() == before
    if change != "set":
        with sc.catalog.transaction(write=False) as db:
            assert db.execute("SELECT count(*) FROM snapshot_sets").fetchone()[0] == 0
            assert db.execute("SELECT count(*) FROM cow_volumes WHERE lun_id = ?", (plans[0].lun_id,)).fetchone()[0] \
                == 0


def test_get_snapshots_keeps_the_order_asked_and_names_what_is_missing(sc: SnapshotCatalog) -> None:
    specs = [("l2", "a"), ("l0", "a"), ("l1", "a")]
    sc.record_snapshots(sc.plan_snapshots(specs, "differential", None, None), "differential", None, [1, 1, 1])
    assert [r.full_name for r in sc.get_snapshots(specs)] == ["l2@a", "l0@a", "l1@a"]
    with pytest.raises(NotFound, match="l0@zz"):
        sc.get_snapshots([("l0", "a"), ("l0", "zz")])


def test_swap_identity_exchanges_a_lun_and_its_snapshot_identity(sc: SnapshotCatalog) -> None:
    sc.record_snapshots(sc.plan_snapshots([("l0", "s")], "differential", None, None), "differential", None, [1])
    snap = sc.get_snapshot("l0", "s")
    lun = sc.catalog.get_lun("l0")
    sc.swap_identity("l0", snap.id)
    after, moved = sc.catalog.get_lun("l0"), sc.get_snapshot("l0", "s")
    assert (after.naa, after.serial) == (snap.naa, snap.serial)
    assert (moved.naa, moved.serial) == (lun.naa, lun.serial)
    with pytest.raises(NotFound):
        sc.swap_identity("nope", snap.id)


def test_forget_pool_drops_an_unused_pool(sc: SnapshotCatalog, tmp_path: Path) -> None:
    rec = sc.create_pool("spare", str(tmp_path / "spare"))
    sc.forget_pool(rec.id)
    assert "spare" not in [p.name for p in sc.list_pools()]


def test_delete_pool_refuses_while_used_and_names_the_users(sc: SnapshotCatalog, tmp_path: Path) -> None:
    sc.create_pool("spare", str(tmp_path / "spare"))
    sc.record_snapshots(sc.plan_snapshots([("l1", "a")], "differential", "spare", None), "differential", None, [1])
    with pytest.raises(InUse, match=r"l1@a"):
        sc.delete_pool("spare")
    with pytest.raises(InUse, match="default pool"):
        sc.delete_pool("default")
    with pytest.raises(NotFound):
        sc.delete_pool("nope")
    assert "spare" in [p.name for p in sc.list_pools()]
    sc.create_pool("empty", str(tmp_path / "empty"))
    assert sc.delete_pool("empty").name == "empty"
    assert "empty" not in [p.name for p in sc.list_pools()]


def test_a_flatten_record_replaces_the_one_before_and_goes_with_its_lun(sc: SnapshotCatalog) -> None:
    sc.record_flatten("l0", "running", 100.0)
    sc.record_flatten("l1", "running", 200.0)
    sc.record_flatten("l0", "failed", 100.0, finished_at=150.0, done=3, total=8, error="cut")
    assert [(j.lun, j.state, j.started_at, j.finished_at, j.done, j.total, j.error) for j in sc.flatten_jobs()] == [
        ("l0", "failed", 100.0, 150.0, 3, 8, "cut"), ("l1", "running", 200.0, None, 0, 0, None)]
    sc.catalog.delete_lun("l1")
    assert [j.lun for j in sc.flatten_jobs()] == ["l0"]
    sc.record_flatten("gone", "running", 1.0)  # no such LUN: nothing recorded
    assert [j.lun for j in sc.flatten_jobs()] == ["l0"]
