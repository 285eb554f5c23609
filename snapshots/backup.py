"""Backups of the array's metadata: the catalog and the pools' chunk maps, copied consistently while the array runs.

This module owns the backup directory's layout and the order in which it is written. A backup holds ``catalog.db``
(targets, LUNs and their identities, ACLs, CHAP, snapshots, sets, recovery sets), and per pool ``pools/<name>/``
with that pool's ``pool.db`` and map logs (``lun-<id>.map``), plus ``backup.json`` saying what was copied from where.
SQLite files are copied with SQLite's online backup API, which gives one committed state of the database however
busy its writers are; never with ``cp``, which can tear a page or miss the WAL. The order makes the parts agree with
one another: the catalog first, so every snapshot it lists already had its maps written; then each pool's map logs
before its ``pool.db``, so a checkpoint that moves log records into ``pool.db`` between the two copies leaves them in
the ``pool.db`` copy (the copied log's records are then of an older generation, which a pool ignores on open). The
LUN files and the pools' preserved-chunk files (``lun-<id>.cow``) are data, not metadata, and are not copied: they
stay where they are, or are copied by whatever backs up the data. :func:`backup_database` is also what a catalog
schema migration calls first, so that an upgrade can be undone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import glob
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from lunsync.snapshots import fsutil

__all__ = ["BACKUP_MANIFEST", "BackupManifest", "BackupPool", "backup_database", "backup_metadata"]

BACKUP_MANIFEST = "backup.json"
_CATALOG = "catalog.db"  # the name lunsync.snapshots.catalog gives its file, the name a restore copies it back to
_POOL_DB = "pool.db"
_MAP_LOGS = "lun-*.map"


@dataclass(frozen=True, slots=True)
class BackupPool:
    """One pool in a backup: where it was, and the files copied from it."""

    name: str
    path: str  # the pool's directory as it was when copied (absolute)
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BackupManifest:
    """What ``backup.json`` records."""

    created_at: str  # RFC 3339, UTC
    data_dir: str
    schema_version: int
    pools: tuple[BackupPool, ...]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def backup_database(src: sqlite3.Connection, dest: str) -> None:
    """Copy the database open on ``src`` into a new file ``dest`` (mode 0600: a catalog holds CHAP secrets) with
    SQLite's online backup API, then make it durable and give it its name in one rename, so ``dest`` is either absent
    or complete. The copy is a plain rollback-journal database with no WAL beside it. ``src`` must not be inside a
    transaction of its own; other connections may keep writing."""
    tmp = dest + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # a copy in WAL mode would need its -wal file beside it
        finally:
            dst.close()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsutil.commit_file(tmp, dest)


def _copy_file(src: str, dest: str) -> None:
    """A byte copy of a file another thread may be appending to, made durable. Used for the map logs only: their
    records are CRC'd, so a record torn by a concurrent append reads as the log's end."""
    with open(src, "rb") as f:
        data = f.read()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fsutil.pwrite_full(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(dest_dir: str) -> None:
    if os.path.exists(dest_dir):
        if not os.path.isdir(dest_dir):
            raise FileExistsError(errno.EEXIST, "the backup destination exists and is not a directory", dest_dir)
        if os.listdir(dest_dir):
            raise FileExistsError(errno.EEXIST, "the backup destination is not empty", dest_dir)
    os.makedirs(dest_dir, mode=0o700, exist_ok=True)
    os.chmod(dest_dir, 0o700)


def backup_metadata(copy_catalog: Callable[[str], int], data_dir: str, pools: Sequence[tuple[str, str]],
                    dest_dir: str) -> BackupManifest:
    """Write a metadata backup of the array into ``dest_dir`` (created 0700; it must be absent or empty).

    ``copy_catalog(dest)`` writes the catalog's copy (:func:`backup_database`) and returns its schema version;
    ``pools`` are ``(name, absolute path)`` of every pool the catalog lists. The caller keeps the
    set of snapshots from changing while this runs (no snapshot taken or deleted), so that the catalog copy and the
    maps copied after it describe the same snapshots; LUN writes may go on. Blocking: run it on a worker thread.
    Raises OSError or sqlite3.Error; a failed backup leaves an incomplete directory without ``backup.json``."""
    dest_dir = os.path.abspath(dest_dir)
    _prepare(dest_dir)
    schema = copy_catalog(os.path.join(dest_dir, _CATALOG))
    copied: list[BackupPool] = []
    for name, path in pools:
        out = os.path.join(dest_dir, "pools", name)
        os.makedirs(out, mode=0o700)
        files: list[str] = []
        for log_path in sorted(glob.glob(os.path.join(path, _MAP_LOGS))):  # the logs before pool.db: see the module
            _copy_file(log_path, os.path.join(out, os.path.basename(log_path)))
            files.append(os.path.basename(log_path))
        pool_db = os.path.join(path, _POOL_DB)
        if os.path.exists(pool_db):
            src = sqlite3.connect(f"file:{pool_db}?mode=ro", uri=True)
            try:
                backup_database(src, os.path.join(out, _POOL_DB))
            finally:
                src.close()
            files.append(_POOL_DB)
        fsutil.fsync_dir(out)
        copied.append(BackupPool(name, path, tuple(files)))
    manifest = BackupManifest(dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                              os.path.abspath(data_dir), schema, tuple(copied))
    # Last: a backup.json means the backup is complete.
    fsutil.atomic_write(os.path.join(dest_dir, BACKUP_MANIFEST), json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest
