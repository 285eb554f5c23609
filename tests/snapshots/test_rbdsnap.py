"""RBD snapshots and clones through :mod:`lunsync.snapshots.rbdsnap`, on the test cluster: a snapshot keeps its point in
time while the head moves on, ``diff_iterate`` finds exactly the regions written since, a leftover lunsync snapshot
of the same name is replaced, a snapshot with a clone cannot be removed until the clone is flattened, and the
region arithmetic the resync uses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import rados
import rbd
from ceph_cluster import POOL, CephCluster
from lunsync.snapshots import rbdsnap
from lunsync.snapshots.errors import SnapshotInUse

MiB = 1 << 20
KiB = 1 << 10


def test_regions_of_covers_every_region_an_extent_touches() -> None:
    assert rbdsnap.regions_of([], 64 * KiB) == set()
    assert rbdsnap.regions_of([(0, 1)], 64 * KiB) == {0}
    assert rbdsnap.regions_of([(64 * KiB - 1, 2)], 64 * KiB) == {0, 1}
    assert rbdsnap.regions_of([(128 * KiB, 128 * KiB), (10 * MiB, 0)], 64 * KiB) == {2, 3}
    assert rbdsnap.regions_of([(4 * MiB, 4 * MiB)], 4 * MiB) == {1}


@pytest.fixture
def ioctx(ceph_cluster: CephCluster) -> Iterator[Any]:
    with rados.Rados(conffile=str(ceph_cluster.conf), name="client.admin") as cluster, \
            cluster.open_ioctx(POOL) as ctx:
        yield ctx


def _read(ioctx: Any, name: str, offset: int, length: int, snap: str | None = None) -> bytes:
    with rbd.Image(ioctx, name, snapshot=snap, read_only=True) as image:
        data: bytes = image.read(offset, length)
        return data


def _remove(ioctx: Any, name: str) -> None:
    """Remove a test image with whatever snapshots a failed test left on it."""
    try:
        with rbd.Image(ioctx, name) as image:
            for s in list(image.list_snaps()):
                if image.is_protected_snap(s["name"]):
                    image.unprotect_snap(s["name"])
                image.remove_snap(s["name"])
        rbd.RBD().remove(ioctx, name)
    except rbd.ImageNotFound:
        pass


@pytest.mark.e2e
def test_a_snapshot_keeps_its_point_in_time_and_the_diff_names_only_what_changed(ioctx: Any) -> None:
    rbd.RBD().create(ioctx, "snapdiff", 32 * MiB)
    try:
        with rbd.Image(ioctx, "snapdiff") as image:
            image.write(b"\x11" * MiB, 0)
            snap = rbdsnap.snapshot_name("s1")
            assert snap == "lunsync.s1"
            rbdsnap.create_snapshot(image, snap)
            image.write(b"\x22" * (64 * KiB), 5 * MiB)  # region 80 of 64 KiB
            image.write(b"\x33" * 4096, 20 * MiB + 4096)  # inside region 320
        assert _read(ioctx, "snapdiff", 0, MiB, snap) == b"\x11" * MiB
        assert _read(ioctx, "snapdiff", 5 * MiB, 64 * KiB, snap) == bytes(64 * KiB), "the snapshot is unaltered"
        extents = rbdsnap.changed_extents(ioctx, "snapdiff", snap)
        # librbd names a write in an object the snapshot did not have from the object's start to its end; each
        # extent lies in the 4 MiB object of one write and covers it, and nothing else is named.
        assert len(extents) == 2, extents
        for (off, length), write in zip(extents, ((5 * MiB, 64 * KiB), (20 * MiB + 4096, 4096)), strict=True):
            assert off <= write[0] and write[0] + write[1] <= off + length, (extents, write)
            assert off // (4 * MiB) == (off + length - 1) // (4 * MiB) == write[0] // (4 * MiB)
        regions = rbdsnap.regions_of(extents, 64 * KiB)
        assert {80, 320} <= regions and len(regions) == sum(-(-length // (64 * KiB)) for _, length in extents)
        # A leftover of a create whose record never committed is lunsync's own, and is replaced.
        with rbd.Image(ioctx, "snapdiff") as image:
            rbdsnap.create_snapshot(image, snap)
        assert rbdsnap.changed_extents(ioctx, "snapdiff", snap) == []
        assert _read(ioctx, "snapdiff", 5 * MiB, 4, snap) == b"\x22" * 4
        with rbd.Image(ioctx, "snapdiff") as image:
            assert rbdsnap.remove_snapshot(image, snap) is True
            assert rbdsnap.remove_snapshot(image, snap) is False, "an interrupted delete can be repeated"
    finally:
        _remove(ioctx, "snapdiff")


@pytest.mark.e2e
def test_a_clone_depends_on_its_snapshot_until_flattened(ioctx: Any) -> None:
    rbd.RBD().create(ioctx, "parent", 16 * MiB)
    snap = rbdsnap.snapshot_name("base")
    try:
        with rbd.Image(ioctx, "parent") as image:
            image.write(b"\x5a" * MiB, 2 * MiB)
            rbdsnap.create_snapshot(image, snap)
            image.write(b"\xa5" * MiB, 2 * MiB)  # the head moves on; the clone has the snapshot's data
        rbdsnap.clone_snapshot(ioctx, "parent", snap, ioctx, "child")
        with rbd.Image(ioctx, "parent") as image:
            assert image.is_protected_snap(snap)
        with rbd.Image(ioctx, "child") as child:
            assert child.parent_info()[1:] == ("parent", snap)
        assert _read(ioctx, "child", 2 * MiB, MiB) == b"\x5a" * MiB
        with rbd.Image(ioctx, "parent") as image, pytest.raises(SnapshotInUse, match="clones"):
            rbdsnap.remove_snapshot(image, snap)
        rbdsnap.flatten(ioctx, "child")
        with rbd.Image(ioctx, "child") as child, pytest.raises(rbd.ImageNotFound):
            child.parent_info()
        with rbd.Image(ioctx, "parent") as image:
            assert rbdsnap.remove_snapshot(image, snap) is True
        assert _read(ioctx, "child", 2 * MiB, MiB) == b"\x5a" * MiB, "a flattened clone keeps its data"
    finally:
        _remove(ioctx, "child")
        _remove(ioctx, "parent")


@pytest.mark.e2e
def test_held_bytes_counts_the_objects_written_since_up_to_the_next_snapshot(ioctx: Any) -> None:
    obj = 4 * MiB  # the default object size
    rbd.RBD().create(ioctx, "held", 8 * obj)
    try:
        with rbd.Image(ioctx, "held") as image:
            for i in range(4):  # objects 0-3 exist at s1; 4-7 do not
                image.write(b"\x01" * 4096, i * obj)
            image.create_snap("s1")
            assert rbdsnap.held_bytes(ioctx, "held", "s1") == 0, "nothing written since: the snapshot shares all"
            image.write(b"\x02" * 4096, 0)  # object 0, which s1 has
            image.write(b"\x02" * 4096, 5 * obj)  # object 5, which s1 did not have: nothing for s1 to keep
            assert rbdsnap.held_bytes(ioctx, "held", "s1") == obj
            image.create_snap("s2")
            image.write(b"\x03" * 4096, 1 * obj)  # after s2: s2 keeps it, s1 still only object 0
            image.write(b"\x03" * 4096, 2 * obj + 8192)
            image.write(b"\x03" * 4096, 5 * obj)
            assert rbdsnap.held_bytes(ioctx, "held", "s1") == obj
            assert rbdsnap.held_bytes(ioctx, "held", "s2") == 3 * obj
            with pytest.raises(rbdsnap.RbdSnapshotError):
                rbdsnap.held_bytes(ioctx, "held", "nope")
    finally:
        _remove(ioctx, "held")
