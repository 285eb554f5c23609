"""The metadata backup: SQLite online copies under concurrent writers, the copy written before a schema migration,
and a pool's maps read back from a backup taken while the map log is being appended and checkpointed."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest
from lunsync.snapshots.backup import BACKUP_MANIFEST, backup_database, backup_metadata
from lunsync.snapshots.catalog import BACKUPS_DIRNAME, MIGRATIONS, SCHEMA_VERSION, Catalog
from lunsync.snapshots.cow import FULL, Pool


def test_backup_database_is_one_committed_state_while_another_connection_writes(tmp_path: Path) -> None:
    src_path = tmp_path / "src.db"
    writer = sqlite3.connect(src_path, isolation_level=None, check_same_thread=False)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (a INTEGER, b INTEGER)")
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            # Each transaction inserts a pair; a torn copy would show an odd count.
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO t VALUES (?, 0)", (i,))
            writer.execute("INSERT INTO t VALUES (?, 1)", (i,))
            writer.execute("COMMIT")
            i += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        reader = sqlite3.connect(src_path, isolation_level=None)
        copies = []
        for n in range(5):
            dest = tmp_path / f"copy{n}.db"
            backup_database(reader, str(dest))
            copies.append(dest)
        reader.close()
    finally:
        stop.set()
        t.join()
        writer.close()
    for dest in copies:
        assert stat.S_IMODE(dest.stat().st_mode) == 0o600
        assert not Path(str(dest) + "-wal").exists() and not Path(str(dest) + ".tmp").exists()
        db = sqlite3.connect(dest)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        count = db.execute("SELECT count(*) FROM t").fetchone()[0]
        assert count % 2 == 0
        db.close()
    assert any(sqlite3.connect(c).execute("SELECT count(*) FROM t").fetchone()[0] > 0 for c in copies)


def test_a_schema_migration_first_writes_a_backup_of_the_older_catalog(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "catalog.db", isolation_level=None)
    old.execute("PRAGMA foreign_keys=ON")
    old.execute("BEGIN")
    MIGRATIONS[0](old)
    old.execute("PRAGMA user_version = 1")
    old.execute("COMMIT")
    old.execute("INSERT INTO settings (key, value) VALUES ('marker', 'v1')")
    old.close()
    with Catalog(data, clock=lambda: 1_800_000_000.0) as cat:
        assert cat.schema_version == SCHEMA_VERSION
    backups = list((data / BACKUPS_DIRNAME).iterdir())
    assert [b.name for b in backups] == ["catalog-v1-20270115T080000Z.db"]
    copy = sqlite3.connect(backups[0])
    assert copy.execute("PRAGMA user_version").fetchone()[0] == 1
    assert copy.execute("SELECT value FROM settings WHERE key = 'marker'").fetchone()[0] == "v1"
    copy.close()
    # A catalog already at the current version is not copied again; a new one has nothing to copy.
    Catalog(data).close()
    fresh = tmp_path / "fresh"
    Catalog(fresh).close()
    assert len(list((data / BACKUPS_DIRNAME).iterdir())) == 1
    assert not (fresh / BACKUPS_DIRNAME).exists()


def test_backup_metadata_copies_catalog_then_maps_and_a_restored_pool_loads_every_committed_row(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    cat = Catalog(data)
    cat.create_target("iqn.2026-11.io.lunsync:t")
    pool = Pool("default", str(data / "pool"))
    rows = [(c, 1, c, FULL) for c in range(3000)]
    pool.commit(7, rows[:1000])
    pool.checkpoint(7)  # some rows in pool.db, the rest in the map log (and across a checkpoint meanwhile)
    done = threading.Event()

    def more() -> None:
        for i in range(1000, 3000, 100):
            pool.commit(7, rows[i:i + 100])
            if i == 2000:
                pool.checkpoint(7)
        done.set()

    t = threading.Thread(target=more)
    t.start()
    dest = tmp_path / "backup"
    m = cat.backup_metadata([("default", pool.path)], str(dest))
    t.join()
    assert done.is_set()
    committed_before_end = pool.load(7)
    pool.close()
    cat.close()
    manifest = json.loads((dest / BACKUP_MANIFEST).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION == m.schema_version
    assert manifest["pools"][0]["name"] == "default" and "pool.db" in manifest["pools"][0]["files"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    # Restore the pool's files into an empty directory: what it loads is a prefix of what was committed, and at
    # least what was committed before the backup started.
    restored = tmp_path / "restored-pool"
    restored.mkdir()
    for name in os.listdir(dest / "pools" / "default"):
        (restored / name).write_bytes((dest / "pools" / "default" / name).read_bytes())
    again = Pool("default", str(restored))
    loaded = again.load(7)
    again.close()
    assert rows[:1000] == loaded[:1000]
    assert set(loaded) <= set(committed_before_end)
    copy = sqlite3.connect(dest / "catalog.db")
    assert copy.execute("SELECT iqn FROM targets").fetchall() == [("iqn.2026-11.io.lunsync:t",)]
    copy.close()


def test_backup_refuses_a_destination_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "x").write_text("keep")
    with Catalog(tmp_path / "data") as cat, pytest.raises(FileExistsError, match="not empty"):
        cat.backup_metadata([], str(tmp_path / "dest"))
    assert (tmp_path / "dest" / "x").read_text() == "keep"
    with pytest.raises(FileExistsError):
        backup_metadata(lambda _: 0, str(tmp_path), [], str(tmp_path / "dest" / "x"))
