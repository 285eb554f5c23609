"""Tests for lunsync.snapshots.catalog: durability settings, CRUD and its errors, identities, declarative apply and
export, atomicity and integrity checking."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from lunsync.provider.config import (
    ChapConfig,
    Config,
    LunConfig,
    LunMapping,
    PortalConfig,
    TargetConfig,
    dump_config,
    parse_config,
)
from lunsync.snapshots import catalog
from lunsync.snapshots.catalog import (
    COMPANY_ID,
    SCHEMA_VERSION,
    AlreadyExists,
    Catalog,
    CatalogError,
    CatalogLocked,
    InUse,
    Invalid,
    LunRecord,
    NotFound,
    lun_identity,
    serial_from_naa,
)
from lunsync.snapshots.model import CephConfig, LunIdentity

IQN = "iqn.2026-11.io.lunsync:demo"
IQN_B = "iqn.2026-11.io.lunsync:b"
CLIENT = "iqn.1994-05.com.redhat:client1"
GiB = 1 << 30


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def cat(data_dir: Path) -> Iterator[Catalog]:
    with Catalog(data_dir) as c:
        yield c


def snapshot(c: Catalog) -> tuple[object, ...]:
    """Everything observable, for before/after comparisons."""
    return (c.get_portal(), c.list_luns(), c.list_targets(), c.export())


def demo_config() -> Config:
    return Config(
        portal=PortalConfig(listen=("127.0.0.1:3260", "[::1]:3260"), nop_interval_s=10),
        luns=(
            LunConfig("db0", 10 * GiB),
            LunConfig("db1", GiB, block_size=4096, thin=False),
        ),
        targets=(
            TargetConfig(
                IQN,
                alias="demo",
                acl=(CLIENT,),
                luns=(LunMapping(0, "db0"), LunMapping(1, "db1")),
                chap=ChapConfig("alice", "0123456789ab"),
            ),
            TargetConfig(IQN_B, luns=(LunMapping(5, "db0"),)),  # db0 on two targets: multipath
        ),
    )


# --- the file --------------------------------------------------------------------------------------------------------


def test_catalog_file_is_0600_wal_full_sync_and_versioned(cat: Catalog, data_dir: Path) -> None:
    cat.create_lun("db0", GiB)
    path = data_dir / "catalog.db"
    assert cat.path == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for side in ("catalog.db-wal", "catalog.db-shm"):
        if (data_dir / side).exists():
            assert stat.S_IMODE(os.stat(data_dir / side).st_mode) == 0o600
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        other.close()
    assert cat._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert cat._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert cat.schema_version == SCHEMA_VERSION >= 1


def test_loose_permissions_are_tightened_on_open(data_dir: Path) -> None:
    Catalog(data_dir).close()
    os.chmod(data_dir / "catalog.db", 0o644)
    Catalog(data_dir).close()
    assert stat.S_IMODE(os.stat(data_dir / "catalog.db").st_mode) == 0o600


def test_a_newer_schema_is_refused(data_dir: Path) -> None:
    Catalog(data_dir).close()
    db = sqlite3.connect(data_dir / "catalog.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="newer"):
        Catalog(data_dir)


def test_fresh_catalog_is_empty_with_default_portal(cat: Catalog) -> None:
    assert cat.export() == Config()
    assert cat.list_portals() == ("127.0.0.1:3260",)
    assert cat.integrity_check() == []


def test_state_survives_reopen(data_dir: Path) -> None:
    with Catalog(data_dir) as c:
        c.apply(demo_config())
        c.set_setting("api.token_sha256", "ab" * 32)
        before = c.export()
        luns = c.list_luns()
    with Catalog.open(data_dir) as c:
        assert c.export() == before
        assert c.list_luns() == luns
        assert [r.created_at for r in c.list_luns()] == [r.created_at for r in luns]
        assert c.get_setting("api.token_sha256") == "ab" * 32


def killed_after(script: str, data_dir: Path) -> str:
    """Run ``script`` on ``data_dir`` in a child that ends by kill -9ing itself; return what it printed."""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr
    return proc.stdout.strip()


def test_acknowledged_change_survives_kill_9(data_dir: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from lunsync.snapshots.catalog import Catalog\n"
        "c = Catalog(sys.argv[1])\n"
        "rec = c.create_lun('db0', 1 << 30)\n"
        "print(rec.naa, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    naa = killed_after(script, data_dir)
    with Catalog(data_dir) as c:
        assert c.get_lun("db0").naa == naa
        assert c.integrity_check() == []


def test_the_wal_is_reserved_as_written_zeros_and_reused_not_grown(data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "WAL_AUTOCHECKPOINT_PAGES", 10)  # a checkpoint every few commits
    wal = data_dir / "catalog.db-wal"
    with Catalog(data_dir) as c:
        size = wal.stat().st_size
        assert size >= catalog.WAL_RESERVE_CHECKPOINTS * 10 * 4096
        assert wal.stat().st_blocks * 512 >= size  # written, not a sparse file
        for i in range(60):  # far more frames than the reserve holds: only reuse keeps the size
            c.create_lun(f"l{i}", GiB)
        assert wal.stat().st_size == size
    assert not wal.exists()  # a clean close checkpoints and removes it, as before
    with Catalog(data_dir) as c:
        assert wal.stat().st_size == size and len(c.list_luns()) == 60


def test_acknowledged_changes_in_a_reused_wal_survive_kill_9(data_dir: Path) -> None:
    # The WAL wraps several times within its reserve, so frames of earlier rounds lie past the live ones.
    script = (
        "import os, signal, sys\n"
        "from lunsync.snapshots import catalog\n"
        "catalog.WAL_AUTOCHECKPOINT_PAGES = 10\n"
        "c = catalog.Catalog(sys.argv[1])\n"
        "for i in range(45):\n"
        "    c.create_lun(f'l{i}', 1 << 30)\n"
        "print(c.get_lun('l44').naa, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    naa = killed_after(script, data_dir)
    with Catalog(data_dir) as c:
        assert len(c.list_luns()) == 45
        assert c.get_lun("l44").naa == naa
        assert c.integrity_check() == []


def test_exclusive_open_locks_the_data_dir(data_dir: Path) -> None:
    first = Catalog(data_dir, exclusive=True)
    with pytest.raises(CatalogLocked, match="in use"):
        Catalog(data_dir, exclusive=True)
    first.close()
    Catalog(data_dir, exclusive=True).close()


# --- LUNs and identity -----------------------------------------------------------------------------------------------


def test_create_lun_defaults_and_identity(cat: Catalog, data_dir: Path) -> None:
    rec = cat.create_lun("db0", 10 * GiB)
    assert (rec.name, rec.path, rec.size_bytes, rec.block_size) == ("db0", "luns/db0.img", 10 * GiB, 512)
    assert (rec.thin, rec.read_only, rec.chunk_size_bytes, rec.num_blocks) == (True, False, 64 << 10, 20 * GiB // 1024)
    assert len(rec.naa) == 32 and int(rec.naa, 16) >> 124 == 6
    assert int(rec.naa, 16) >> 100 & 0xFFFFFF == COMPANY_ID
    assert re.fullmatch(r"[A-Z2-7]{20}", rec.serial)  # base32 of the 100 random bits
    assert rec.serial == serial_from_naa(rec.naa)
    ident = lun_identity(rec)
    assert isinstance(ident, LunIdentity)
    assert ident.naa == bytes.fromhex(rec.naa) and len(ident.naa) == 16 and ident.naa[0] >> 4 == 6
    assert ident.serial == rec.serial
    assert cat.get_lun("db0") == rec
    assert cat.lun_path(rec) == str(data_dir / "luns" / "db0.img")
    assert cat.lun_path("db0") == cat.lun_path(rec)


def test_identities_are_unique_and_never_change(cat: Catalog) -> None:
    recs = [cat.create_lun(f"lun{i}", GiB) for i in range(20)]
    assert len({r.naa for r in recs}) == 20 and len({r.serial for r in recs}) == 20
    before = cat.get_lun("lun3")
    cat.resize_lun("lun3", 2 * GiB)
    cat.update_lun("lun3", read_only=True, thin=False)
    after = cat.get_lun("lun3")
    assert (after.naa, after.serial) == (before.naa, before.serial)
    assert (after.size_bytes, after.read_only, after.thin) == (2 * GiB, True, False)


def test_pinned_identity_and_derived_serial(cat: Catalog) -> None:
    naa = "6" + "0a5c51" + "1" * 25
    rec = cat.create_lun("db0", GiB, naa=naa.upper())
    assert rec.naa == naa and rec.serial == serial_from_naa(naa)
    with pytest.raises(AlreadyExists, match="naa"):
        cat.create_lun("db1", GiB, naa=naa)
    with pytest.raises(AlreadyExists, match="serial"):
        cat.create_lun("db2", GiB, serial=rec.serial)


def test_lun_errors(cat: Catalog) -> None:
    cat.create_lun("db0", GiB)
    with pytest.raises(AlreadyExists, match="'db0' already exists"):
        cat.create_lun("db0", GiB)
    with pytest.raises(AlreadyExists, match="already used by lun 'db0'"):
        cat.create_lun("other", GiB, path="luns/./db0.img")
    with pytest.raises(AlreadyExists, match="already used by lun 'db0'"):
        cat.create_lun("abs", GiB, path=os.path.join(cat.data_dir, "luns/db0.img"))
    with pytest.raises(Invalid, match="catalog itself"):
        cat.create_lun("evil", GiB, path="catalog.db")
    with pytest.raises(Invalid, match="invalid LUN name"):
        cat.create_lun("a/b", GiB)
    with pytest.raises(Invalid, match="multiple of the 512-byte"):
        cat.create_lun("odd", 1000)
    with pytest.raises(Invalid, match="size_bytes"):
        cat.create_lun("zero", 0)
    with pytest.raises(NotFound, match="'nope'"):
        cat.get_lun("nope")
    with pytest.raises(NotFound):
        cat.delete_lun("nope")
    assert [r.name for r in cat.list_luns()] == ["db0"]


def test_absolute_paths_are_kept(cat: Catalog) -> None:
    rec = cat.create_lun("raw", GiB, path="/dev/sdz")
    assert rec.path == "/dev/sdz" and cat.lun_path(rec) == "/dev/sdz"


def test_resize_grows_only(cat: Catalog) -> None:
    cat.create_lun("db0", 2 * GiB)
    assert cat.resize_lun("db0", 2 * GiB).size_bytes == 2 * GiB
    with pytest.raises(Invalid, match="cannot shrink from 2GiB to 1GiB"):
        cat.resize_lun("db0", GiB)
    with pytest.raises(Invalid, match="multiple"):
        cat.resize_lun("db0", 2 * GiB + 100)
    assert cat.resize_lun("db0", 3 * GiB).size_bytes == 3 * GiB
    assert cat.get_lun("db0").size_bytes == 3 * GiB


def test_delete_lun(cat: Catalog) -> None:
    cat.create_lun("db0", GiB)
    cat.create_target(IQN)
    cat.map_lun(IQN, "db0", 3)
    with pytest.raises(InUse, match=rf"still mapped \({IQN} lun 3\)"):
        cat.delete_lun("db0")
    cat.unmap_lun(IQN, 3)
    gone = cat.delete_lun("db0")
    assert isinstance(gone, LunRecord) and gone.name == "db0"
    assert cat.list_luns() == ()
    with pytest.raises(NotFound):
        cat.get_lun("db0")


# --- targets, mappings, ACLs, CHAP, portals, settings ----------------------------------------------------------------


def test_target_crud(cat: Catalog) -> None:
    t = cat.create_target(IQN.upper(), alias="demo")
    assert t == TargetConfig(IQN, alias="demo")
    with pytest.raises(AlreadyExists, match="already exists"):
        cat.create_target(IQN)
    with pytest.raises(Invalid, match="invalid"):
        cat.create_target("not-an-iqn")
    assert cat.update_target(IQN, alias="renamed").alias == "renamed"
    cat.create_target(IQN_B)
    assert [x.iqn for x in cat.list_targets()] == [IQN, IQN_B]
    cat.delete_target(IQN_B)
    assert [x.iqn for x in cat.list_targets()] == [IQN]
    with pytest.raises(NotFound, match=IQN_B):
        cat.get_target(IQN_B)
    with pytest.raises(NotFound):
        cat.delete_target(IQN_B)


def test_delete_target_with_luns_needs_force_and_keeps_the_luns(cat: Catalog) -> None:
    cat.create_lun("db0", GiB)
    cat.create_target(IQN)
    cat.map_lun(IQN, "db0")
    cat.add_acl(IQN, CLIENT)
    cat.set_chap(IQN, ChapConfig("u", "0123456789ab"))
    with pytest.raises(InUse, match="still maps 1 LUN"):
        cat.delete_target(IQN)
    cat.delete_target(IQN, force=True)
    assert cat.list_targets() == ()
    assert [r.name for r in cat.list_luns()] == ["db0"]
    # The target's ACL and CHAP went with it: a new target of that name starts clean.
    assert cat.create_target(IQN) == TargetConfig(IQN)
    assert cat.integrity_check() == []


def test_map_assigns_lowest_free_number(cat: Catalog) -> None:
    for name in ("a", "b", "c", "d"):
        cat.create_lun(name, GiB)
    cat.create_target(IQN)
    assert cat.map_lun(IQN, "a") == LunMapping(0, "a")
    assert cat.map_lun(IQN, "b", 2) == LunMapping(2, "b")
    assert cat.map_lun(IQN, "c") == LunMapping(1, "c")
    assert cat.map_lun(IQN, "d") == LunMapping(3, "d")
    assert cat.unmap_lun(IQN, 0) == LunMapping(0, "a")
    assert cat.map_lun(IQN, "a") == LunMapping(0, "a")
    assert cat.list_mappings(IQN) == tuple(LunMapping(n, x) for n, x in enumerate("acbd"))


def test_map_errors_and_multipath(cat: Catalog) -> None:
    cat.create_lun("db0", GiB)
    cat.create_lun("db1", GiB)
    cat.create_target(IQN)
    cat.create_target(IQN_B)
    cat.map_lun(IQN, "db0", 0)
    with pytest.raises(AlreadyExists, match="taken by lun 'db0'"):
        cat.map_lun(IQN, "db1", 0)
    with pytest.raises(AlreadyExists, match="already mapped"):
        cat.map_lun(IQN, "db0", 1)
    with pytest.raises(Invalid, match="16383"):
        cat.map_lun(IQN, "db1", 16384)
    with pytest.raises(NotFound, match="nope"):
        cat.map_lun(IQN, "nope")
    with pytest.raises(NotFound):
        cat.map_lun("iqn.2026-11.io.lunsync:none", "db0")
    with pytest.raises(NotFound, match="no LUN 9"):
        cat.unmap_lun(IQN, 9)
    assert cat.map_lun(IQN_B, "db0", 7) == LunMapping(7, "db0")  # the same LUN on a second target is allowed
    assert cat.lun_mappings("db0") == ((IQN, 0), (IQN_B, 7))
    assert cat.lun_mappings("db1") == ()


def _made(cat: Catalog, set_id: str, at: float, snapshot: str, dest: str, new_lun: bool = True) -> None:
    from lunsync.snapshots.catalog import RecoveryPairRow, RecoverySetRow

    cat.save_recovery_set(RecoverySetRow(set_id, "done", "{}", None, "[]", at, at, at, at),
                          [RecoveryPairRow(snapshot, dest, new_lun, "done", 0, 0, 0, 0, None, None)])


def test_home_target_of_a_lun_made_from_a_snapshot_is_its_origins(cat: Catalog) -> None:
    """serve --workers places a LUN by its home target: the first mapping; unmapped and made from a snapshot, the
    origin's (followed back while unmapped); else none (it lives with the unmapped LUNs)."""
    for name in ("orig", "new", "newer", "plain", "onto"):
        cat.create_lun(name, GiB)
    cat.create_target(IQN)
    cat.create_target(IQN_B)
    cat.map_lun(IQN_B, "orig", 0)
    cat.map_lun(IQN, "orig", 1)
    assert cat.home_target("orig") == IQN  # the first target in catalog order, not the first mapped
    assert cat.home_target("plain") is None
    _made(cat, "r1", 1.0, "orig@s", "new")
    _made(cat, "r2", 2.0, "new@t", "newer")
    _made(cat, "r3", 3.0, "orig@s", "onto", new_lun=False)  # a restore onto an existing LUN does not place it
    _made(cat, "r4", 4.0, "new@u", "new", new_lun=False)  # nor does a later restore of it from its own snapshot
    assert cat.home_target("new") == cat.home_target("newer") == IQN
    assert cat.home_target("onto") is None
    cat.map_lun(IQN_B, "new", 5)
    assert cat.home_target("new") == IQN_B and cat.home_target("newer") == IQN_B  # mapped, it is its target's
    cat.unmap_lun(IQN_B, 5)
    _made(cat, "r5", 5.0, "newer@v", "new")  # a cycle of unmapped LUNs ends with the unmapped ones
    cat.unmap_lun(IQN_B, 0)
    cat.unmap_lun(IQN, 1)
    assert cat.home_target("new") is None and cat.home_target("newer") is None
    cat.delete_lun("orig")  # made from a deleted origin: with the unmapped LUNs
    _made(cat, "r6", 6.0, "orig@s", "plain")
    assert cat.home_target("plain") is None
    with pytest.raises(NotFound):
        cat.home_target("nosuch")


def test_acls(cat: Catalog) -> None:
    cat.create_target(IQN)
    assert cat.list_acls(IQN) == ()
    assert cat.add_acl(IQN, CLIENT.upper()) == CLIENT
    cat.add_acl(IQN, "iqn.1991-05.com.microsoft:win1")
    assert cat.list_acls(IQN) == ("iqn.1991-05.com.microsoft:win1", CLIENT)
    with pytest.raises(AlreadyExists):
        cat.add_acl(IQN, CLIENT)
    with pytest.raises(Invalid):
        cat.add_acl(IQN, "client1")
    cat.remove_acl(IQN, CLIENT)
    with pytest.raises(NotFound, match="not in the ACL"):
        cat.remove_acl(IQN, CLIENT)
    assert cat.list_acls(IQN) == ("iqn.1991-05.com.microsoft:win1",)


def test_chap(cat: Catalog) -> None:
    cat.create_target(IQN)
    assert cat.get_chap(IQN) is None
    with pytest.raises(NotFound, match="no CHAP"):
        cat.clear_chap(IQN)
    one = ChapConfig("alice", "0123456789ab")
    two = ChapConfig("alice", "0123456789ab", "target1", "ba9876543210")
    cat.set_chap(IQN, one)
    assert cat.get_chap(IQN) == one
    cat.set_chap(IQN, two)
    assert cat.get_chap(IQN) == two and cat.get_target(IQN).chap == two
    cat.clear_chap(IQN)
    assert cat.get_chap(IQN) is None
    with pytest.raises(NotFound):
        cat.set_chap(IQN_B, one)


def test_portals(cat: Catalog, data_dir: Path) -> None:
    assert cat.set_portals(["0.0.0.0:3260", "[0::1]:3261"]) == ("0.0.0.0:3260", "[::1]:3261")
    with pytest.raises(Invalid, match="listen"):
        cat.set_portals(["localhost:3260"])
    with pytest.raises(Invalid):
        cat.set_portals([])
    cat.set_portal(replace(cat.get_portal(), nop_interval_s=0, max_sessions=4))
    cat.close()
    with Catalog(data_dir) as again:
        p = again.get_portal()
        assert p.listen == ("0.0.0.0:3260", "[::1]:3261")
        assert (p.nop_interval_s, p.max_sessions) == (0, 4)


def test_advertised_portals_persist_apply_with_a_plan_step_and_export(cat: Catalog, data_dir: Path) -> None:
    want = replace(cat.export(), portal=replace(cat.get_portal(), advertise=("nas.example:3260", "[2001:db8::1]:3260")))
    plan = cat.apply(want)
    assert [str(s) for s in plan.steps if s.kind == "portal"] == [
        "~ portal advertise [] -> [nas.example:3260, [2001:db8::1]:3260]"]
    cat.close()
    with Catalog(data_dir) as again:
        assert again.get_portal().advertise == ("nas.example:3260", "[2001:db8::1]:3260")
        assert again.export() == want
        again.apply(replace(want, portal=replace(want.portal, advertise=())))
        assert again.get_portal().advertise == ()


def test_ceph_settings_persist_apply_with_plan_steps_and_export(cat: Catalog, data_dir: Path) -> None:
    assert cat.get_ceph() == CephConfig()
    ceph = CephConfig(conf_path="/etc/ceph/lab.conf", keyring="/etc/ceph/lab.keyring", client="client.lunsync")
    plan = cat.apply(replace(cat.export(), ceph=ceph))
    assert sorted(str(s) for s in plan.steps if s.kind == "ceph") == [
        "~ ceph client client.admin -> client.lunsync", "~ ceph conf_path /etc/ceph/ceph.conf -> /etc/ceph/lab.conf",
        "~ ceph keyring - -> /etc/ceph/lab.keyring"]
    cat.close()
    with Catalog(data_dir) as again:
        assert again.get_ceph() == ceph and again.export().ceph == ceph
        assert not again.apply(again.export()).steps
        again.set_ceph(CephConfig())
        assert again.get_setting("ceph") is None, "the defaults are no row at all"


def test_rbd_luns_name_pool_and_image_and_own_no_file(cat: Catalog) -> None:
    rec = cat.create_lun("r0", 1 << 20, path="rbd/img0", backend="rbd")
    assert (rec.backend, rec.path, cat.lun_path(rec), rec.owns_file) == ("rbd", "rbd/img0", "rbd/img0", False)
    with pytest.raises(AlreadyExists, match="already used by lun 'r0'"):
        cat.create_lun("r1", 1 << 20, path="rbd/img0", backend="rbd")
    for bad in (None, "img0", "rbd/img@snap", "rbd/a/b"):
        with pytest.raises(Invalid, match="POOL/IMAGE"):
            cat.create_lun("r2", 1 << 20, path=bad, backend="rbd")


def test_settings(cat: Catalog) -> None:
    assert cat.get_setting("k") is None and cat.get_setting("k", "d") == "d"
    cat.set_setting("k", "v1")
    cat.set_setting("k", "v2")
    assert cat.get_setting("k") == "v2"
    assert cat.delete_setting("k") is True
    assert cat.delete_setting("k") is False
    with pytest.raises(Invalid):
        cat.set_setting("", "x")


# --- declarative apply and export ------------------------------------------------------------------------------------


def test_apply_from_empty_then_idempotent(cat: Catalog) -> None:
    plan = cat.apply(demo_config())
    assert plan.lines() == [
        "~ portal listen [127.0.0.1:3260] -> [127.0.0.1:3260, [::1]:3260]",
        "~ portal nop_interval_s 30 -> 10",
        "+ lun db0 10GiB",
        "+ lun db1 1GiB (thick, block_size 4096)",
        f"+ target {IQN} alias 'demo'",
        f"+ acl {IQN} {CLIENT}",
        f"+ chap {IQN} user alice",
        f"+ map {IQN} lun 0 -> db0",
        f"+ map {IQN} lun 1 -> db1",
        f"+ target {IQN_B}",
        f"+ map {IQN_B} lun 5 -> db0",
    ]
    assert not plan.dry_run and bool(plan)
    again = cat.apply(demo_config())
    assert again.steps == () and not again
    exported = cat.export()
    assert exported.targets == demo_config().targets
    assert [replace(lun, naa=None, serial=None) for lun in exported.luns] == list(demo_config().luns)
    assert not cat.apply(exported)  # an export, identities included, is already in effect


def test_apply_changes_and_removals(cat: Catalog) -> None:
    cat.apply(demo_config())
    ident = cat.get_lun("db0").naa
    cfg = demo_config()
    new = Config(
        portal=cfg.portal,
        luns=(replace(cfg.luns[0], size_bytes=20 * GiB, read_only=True), LunConfig("db2", GiB)),
        targets=(
            replace(
                cfg.targets[0],
                alias="",
                acl=("iqn.1991-05.com.microsoft:win1",),
                luns=(LunMapping(0, "db2"), LunMapping(4, "db0")),
                chap=ChapConfig("bob", "0123456789ab-new"),
            ),
        ),
    )
    plan = cat.apply(new)
    assert plan.lines() == [
        f"- map {IQN} lun 0 -> db0",
        f"- map {IQN} lun 1 -> db1",
        f"- map {IQN_B} lun 5 -> db0",
        f"- target {IQN_B}",
        "- lun db1",
        "~ lun db0 size 10GiB -> 20GiB",
        "~ lun db0 read_only false -> true",
        "+ lun db2 1GiB",
        f"~ target {IQN} alias 'demo' -> ''",
        f"- acl {IQN} {CLIENT}",
        f"+ acl {IQN} iqn.1991-05.com.microsoft:win1",
        f"~ chap {IQN} user alice -> bob, secret changed",
        f"+ map {IQN} lun 0 -> db2",
        f"+ map {IQN} lun 4 -> db0",
    ]
    assert "0123456789ab" not in str(plan)  # secrets never appear in a plan
    assert cat.get_lun("db0").naa == ident
    assert [r.name for r in cat.list_luns()] == ["db0", "db2"]
    assert cat.list_targets() == new.targets
    assert not cat.apply(new)
    assert cat.apply(Config()).lines()[-2:] == ["- lun db0", "- lun db2"]
    assert cat.export() == Config()


def test_apply_dry_run_changes_nothing(cat: Catalog) -> None:
    cat.create_lun("old", GiB)
    before = snapshot(cat)
    dry = cat.apply(demo_config(), dry_run=True)
    assert dry.dry_run and "- lun old" in dry.lines() and "+ lun db0 10GiB" in dry.lines()
    assert snapshot(cat) == before
    real = cat.apply(demo_config())
    assert real.lines() == dry.lines()
    assert snapshot(cat) != before


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"size_bytes": 5 * GiB}, "cannot shrink from 10GiB to 5GiB"),
        ({"block_size": 4096}, "block_size is fixed"),
        ({"path": "elsewhere/db0.img"}, "path is fixed"),
        ({"chunk_size_bytes": 128 << 10}, "chunk_size_bytes is fixed"),
        ({"naa": "6" + "f" * 31}, "naa is fixed"),
        ({"serial": "SOMETHINGELSE"}, "serial is fixed"),
    ],
)
def test_apply_refuses_impossible_changes_and_changes_nothing(
    cat: Catalog, change: dict[str, Any], fragment: str
) -> None:
    cat.apply(demo_config())
    cfg = demo_config()
    bad = replace(cfg, luns=(replace(cfg.luns[0], **change), cfg.luns[1]), targets=())  # removals come first...
    before = snapshot(cat)
    with pytest.raises(Invalid, match=fragment):
        cat.apply(bad)
    assert snapshot(cat) == before  # ...yet nothing was removed


def test_failure_half_way_through_apply_leaves_nothing_behind(cat: Catalog) -> None:
    taken = cat.create_lun("a", GiB)
    before = snapshot(cat)
    cfg = Config(
        luns=(
            LunConfig("a", GiB),
            LunConfig("c", GiB),  # created first, and must vanish with the rollback
            LunConfig("b", GiB, naa=taken.naa),  # collides with a's identity while a stays
        ),
        targets=(TargetConfig(IQN, luns=(LunMapping(0, "c"),)),),
    )
    with pytest.raises(AlreadyExists, match="already belongs to lun 'a'"):
        cat.apply(cfg)
    assert snapshot(cat) == before
    assert [r.name for r in cat.list_luns()] == ["a"]
    assert cat.integrity_check() == []


def test_an_unexpected_error_mid_transaction_rolls_back(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(cat)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Catalog, "map_lun", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cat.apply(demo_config())  # LUNs, targets, ACLs and CHAP were already written when map_lun blew up
    assert snapshot(cat) == before
    monkeypatch.undo()
    assert cat.apply(demo_config())  # and the catalog is still usable


def test_export_apply_on_a_fresh_data_dir_reproduces_everything(tmp_path: Path) -> None:
    with Catalog(tmp_path / "one") as one:
        one.apply(demo_config())
        one.create_lun("extra", GiB, path="/dev/sdq", read_only=True)
        text = dump_config(one.export())
        luns, targets, portal = one.list_luns(), one.list_targets(), one.get_portal()
    with Catalog(tmp_path / "two") as two:
        plan = two.apply(parse_config(text))
        assert len(plan) > 0
        assert two.list_luns() == luns
        assert [lun_identity(r) for r in two.list_luns()] == [lun_identity(r) for r in luns]
        assert two.list_targets() == targets
        assert two.get_portal() == portal
        assert dump_config(two.export()) == text
        assert not two.apply(parse_config(text))


def test_renaming_a_lun_through_apply_keeps_path_and_identity(cat: Catalog) -> None:
    cat.create_lun("old", GiB)
    exported = cat.export()
    renamed = replace(exported, luns=(replace(exported.luns[0], name="new"),))
    plan = cat.apply(renamed)
    assert plan.lines() == ["- lun old", "+ lun new 1GiB (at luns/old.img)"]
    rec = cat.get_lun("new")
    assert (rec.path, rec.naa, rec.serial) == (exported.luns[0].path, exported.luns[0].naa, exported.luns[0].serial)


# --- health and concurrency ------------------------------------------------------------------------------------------


def test_integrity_check_reports_dangling_references(cat: Catalog, data_dir: Path) -> None:
    cat.create_target(IQN)
    assert cat.integrity_check() == []
    raw = sqlite3.connect(data_dir / "catalog.db")
    raw.execute("PRAGMA foreign_keys = OFF")
    raw.execute("INSERT INTO mappings VALUES (1, 0, 999)")
    raw.commit()
    raw.close()
    problems = cat.integrity_check()
    assert len(problems) == 1 and "mappings" in problems[0] and "luns" in problems[0]


def test_threads_share_one_catalog(cat: Catalog) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                cat.create_lun(f"t{n}-{i}", GiB)
        except (CatalogError, sqlite3.Error) as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    recs = cat.list_luns()
    assert len(recs) == 80 and len({r.naa for r in recs}) == 80
    assert cat.integrity_check() == []


# --- scale -----------------------------------------------------------------------------------------------------------


def _vm_steps(cat: Catalog, op: Any) -> int:
    """SQLite virtual-machine instructions ``op`` runs: a measure of its work that no other load on the machine
    changes, unlike its time."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    cat._db.set_progress_handler(count, 1)
    try:
        op()
    finally:
        cat._db.set_progress_handler(None, 1)
    return steps


@pytest.mark.faults
def test_creating_the_nth_lun_costs_what_the_tenth_did(cat: Catalog) -> None:
    """No create scans every LUN (it did, to compare paths: 10 000 LUNs went from 226 to 41 creates a second)."""
    with cat.transaction():  # one commit for the filler rows: only the measured creates matter
        for i in range(10):
            cat.create_lun(f"s{i}", 1 << 20)
    early = _vm_steps(cat, lambda: cat.create_lun("tenth", 1 << 20, path="luns/./tenth.img"))
    with cat.transaction():
        for i in range(3000):
            cat.create_lun(f"m{i}", 1 << 20)
    late = _vm_steps(cat, lambda: cat.create_lun("late", 1 << 20, path="luns/./late.img"))
    assert late < early * 1.5, (early, late)
    # still refused: the same file under another spelling
    with pytest.raises(AlreadyExists, match="already used by lun 'tenth'"):
        cat.create_lun("again", 1 << 20, path="luns/tenth.img")


# --- backends ------------------------------------------------------------------------------------------------------


def test_a_lun_keeps_the_backend_its_configuration_names(cat: Catalog) -> None:
    assert cat.create_lun("f", GiB).backend == "file"
    assert cat.create_lun("b", GiB, path="/dev/disk/by-id/x").backend == "block"  # the default for /dev/ paths
    with pytest.raises(Invalid, match="absolute path"):
        cat.create_lun("rel", GiB, path="disks/x", backend="block")
    with pytest.raises(Invalid, match="unknown backend"):
        cat.create_lun("bad", GiB, backend="tape")
    cfg = cat.export()
    assert [lun.backend for lun in cfg.luns] == ["file", "block"]
    with pytest.raises(Invalid, match="backend is fixed"):
        cat.apply(replace(cfg, luns=(replace(cfg.luns[0], backend="block", path="/dev/sdz"), cfg.luns[1])))


@pytest.mark.skipif(os.geteuid() != 0, reason="making a block device node needs root")
def test_the_migration_classifies_existing_luns_once(data_dir: Path, tmp_path: Path) -> None:
    # A catalog from before LUNs named their backend: a file LUN, a LUN on a block device (a device node made here;
    # nothing opens it) and a LUN whose file is gone.
    node = tmp_path / "blockdev"
    os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    data_dir.mkdir()
    (data_dir / "luns").mkdir()
    (data_dir / "luns" / "a.img").write_bytes(b"")
    before = catalog.MIGRATIONS.index(catalog._schema_v5_backends)
    db = sqlite3.connect(data_dir / "catalog.db", isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    for migration in catalog.MIGRATIONS[:before]:
        migration(db)
    for i, (name, path) in enumerate((("a", "luns/a.img"), ("b", str(node)), ("gone", "luns/gone.img"))):
        db.execute("INSERT INTO luns (name, path, size_bytes, block_size, thin, read_only, chunk_size_bytes, naa, "
                   "serial, created_at) VALUES (?, ?, ?, 512, 1, 0, 65536, ?, ?, '2026-11-01T00:00:00Z')",
                   (name, path, GiB, f"6{i:031x}", f"SERIAL{i}"))
    db.execute(f"PRAGMA user_version = {before}")
    db.close()
    with Catalog(data_dir) as c:
        assert {r.name: r.backend for r in c.list_luns()} == {"a": "file", "b": "block", "gone": "file"}
        assert c.integrity_check() == []


def test_the_labels_migration_keeps_v5_rows_and_backs_the_old_file_up(data_dir: Path) -> None:
    from lunsync.snapshots.snapcat import SnapshotCatalog

    assert catalog.MIGRATIONS[5] is catalog._schema_v6_labels
    # A v5 catalog with a LUN and a snapshot, as the older lunsync wrote them.
    _old_catalog(data_dir, 5).close()
    with Catalog(data_dir) as cat:
        assert cat.schema_version == SCHEMA_VERSION >= 6
        assert cat.get_lun("old0").labels == {}
        snaps = SnapshotCatalog(cat)
        assert snaps.get_snapshot("old0", "s1").labels == {}
        assert cat.label_lun("old0", {"env": "prod", "team": "db"}).labels == {"env": "prod", "team": "db"}
        assert cat.label_lun("old0", {"env": "test"}, ["team"]).labels == {"env": "test"}
        assert snaps.label_snapshot("old0", "s1", {"keep": "yes"}).labels == {"keep": "yes"}
        with pytest.raises(Invalid, match="label key"):
            cat.label_lun("old0", {"bad key": "x"})
        with pytest.raises(Invalid, match="both set and removed"):
            cat.label_lun("old0", {"env": "x"}, ["env"])
        assert cat.get_lun("old0").labels == {"env": "test"}, "a refused change changes nothing"
    backups = [b.name for b in (data_dir / catalog.BACKUPS_DIRNAME).iterdir()]
    assert any(b.startswith("catalog-v5-") for b in backups), backups
    copy = sqlite3.connect(next(data_dir / catalog.BACKUPS_DIRNAME / b for b in backups if "-v5-" in b))
    assert copy.execute("PRAGMA user_version").fetchone()[0] == 5
    assert "labels" not in [r[1] for r in copy.execute("PRAGMA table_info(luns)")]
    copy.close()


def test_the_store_snapshot_migration_widens_the_kind_and_keeps_v6_rows_and_exposures(data_dir: Path) -> None:
    from lunsync.snapshots.snapcat import SnapshotCatalog

    assert catalog.MIGRATIONS[6] is catalog._schema_v7_store_snapshots
    # A v6 catalog with a LUN and a snapshot, which an exposure will refer to: the reason why the migration must
    # not rebuild the table.
    old = _old_catalog(data_dir, 6)
    old.execute("BEGIN")
    with pytest.raises(sqlite3.IntegrityError):  # v6 knows no store snapshots
        old.execute("UPDATE snapshots SET kind = 'rbd'")
    old.execute("COMMIT")
    old.close()
    with Catalog(data_dir) as cat:
        assert cat.schema_version == SCHEMA_VERSION >= 7
        cat.create_target("iqn.2026-11.io.lunsync:t")
        snaps = SnapshotCatalog(cat)
        assert snaps.expose("old0", "s1", "iqn.2026-11.io.lunsync:t").exposed_lun == 0
        assert snaps.get_snapshot("old0", "s1").kind == "differential"
        with cat.transaction() as db:
            db.execute("UPDATE snapshots SET kind = 'rbd' WHERE name = 's1'")
        assert snaps.get_snapshot("old0", "s1").kind == "rbd"
        assert not snaps.get_snapshot("old0", "s1").needs_cow, "the store keeps it: no copy-on-write for it"
        with pytest.raises(Exception, match="CHECK"), cat.transaction() as db:
            db.execute("UPDATE snapshots SET kind = 'other' WHERE name = 's1'")
        assert cat.integrity_check() == []


def _old_catalog(data_dir: Path, version: int) -> sqlite3.Connection:
    """A catalog at schema ``version`` with LUN old0 and its snapshot s1, as that version's lunsync wrote them; the
    connection is returned open, outside a transaction."""
    data_dir.mkdir()
    old = sqlite3.connect(data_dir / catalog.CATALOG_FILENAME, isolation_level=None)
    old.execute("PRAGMA foreign_keys = ON")
    old.execute("BEGIN")
    for v in range(version):
        catalog.MIGRATIONS[v](old)
    old.execute(f"PRAGMA user_version = {version}")
    old.execute("""INSERT INTO luns (name, path, size_bytes, block_size, thin, read_only, chunk_size_bytes, naa,
                                     serial, created_at, owns_file, backend)
                   VALUES ('old0', 'luns/old0.img', 8388608, 512, 1, 0, 65536, '6' || printf('%031d', 1),
                           'S0001', '2026-01-01T00:00:00+00:00', 1, 'file')""")
    old.execute("INSERT INTO pools (name, path, created_at) VALUES ('default', 'pool', '2026-01-01T00:00:00Z')")
    old.execute("""INSERT INTO snapshots (lun_id, lun_name, name, kind, state, epoch, pool_id, size_bytes,
                                          block_size, chunk_size_bytes, naa, serial, created_at)
                   VALUES (1, 'old0', 's1', 'differential', 'valid', 1, 1, 8388608, 512, 65536,
                           '6' || printf('%031d', 2), 'S0002', '2026-01-01T00:00:00Z')""")
    old.execute("COMMIT")
    return old
