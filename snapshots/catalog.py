"""The catalog: the persistent source of truth the daemon builds its runtime from.

This module owns ``catalog.db`` in the data dir: an embedded SQLite database in WAL mode, mode 0600 (it holds CHAP
secrets), with ``synchronous=FULL`` so that whatever a public method has returned survives ``kill -9`` and power loss.
It holds the portal, targets, LUNs and their identities, LUN mappings, ACLs, CHAP credentials and generic settings;
snapshot, pool and recovery tables are added by appending to :data:`MIGRATIONS`. Every public mutating method is one
transaction: it happens entirely or not at all. :meth:`Catalog.apply` reconciles the catalog with a declarative
:class:`~lunsync.snapshots.model.Config` and :meth:`Catalog.export` produces one. Creating, growing and deleting the
LUNs' backing files is the daemon's job, not this module's; it only says where they are (:meth:`Catalog.lun_path`).

Layering note: the catalog speaks the model of :mod:`lunsync.snapshots.model` (configuration types and
:class:`~lunsync.snapshots.model.LunIdentity`), the bottom layer every package shares, so that there is one typed
model of a LUN, not three, and nothing in ``snapshots/`` imports ``provider/`` or ``target/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Self

from lunsync.snapshots.backup import BackupManifest, backup_database, backup_metadata
from lunsync.snapshots.model import (
    MAX_LUN_NUMBER,
    CephConfig,
    ChapConfig,
    Config,
    ConfigError,
    LunConfig,
    LunIdentity,
    LunMapping,
    PortalConfig,
    TargetConfig,
    check_labels,
    default_lun_path,
    format_size,
    normalize_iscsi_name,
    rfc3339,
)

__all__ = [
    "BACKUPS_DIRNAME",
    "CATALOG_FILENAME",
    "COMPANY_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AlreadyExists",
    "Catalog",
    "CatalogError",
    "CatalogLocked",
    "CatalogUnavailable",
    "InUse",
    "Invalid",
    "LunRecord",
    "NotFound",
    "Plan",
    "PlanStep",
    "RecoveryPairRow",
    "RecoverySetRow",
    "lun_identity",
    "new_identity",
    "serial_from_naa",
]

CATALOG_FILENAME = "catalog.db"
_ADVERTISE_KEY = "portal.advertise"  # settings row: the JSON list of PortalConfig.advertise
_CEPH_KEY = "ceph"  # settings row: the JSON object of CephConfig's fields; absent means the defaults
BACKUPS_DIRNAME = "backups"  # in the data dir: the copy of the catalog written before each schema migration
# Frames between automatic checkpoints (SQLite's default, stated so the WAL reserve below can be sized from it), and
# how many such stretches of WAL are written as zeros when the catalog opens.
WAL_AUTOCHECKPOINT_PAGES = 1000
WAL_RESERVE_CHECKPOINTS = 2

# The 24-bit IEEE company id in every NAA-6 designator lunsync generates. It is not an IEEE assignment: its first
# octet (0x0A) has the local bit set and the group bit clear, the shape of the "CID" block the IEEE reserves for
# identifiers that are not globally registered, so it cannot collide with a real vendor's OUI. Uniqueness comes from
# the 100 random bits that follow it (birthday bound ~2**50 LUNs). Never change it: it is part of every existing
# LUN's identity, and those are stored, not recomputed.
COMPANY_ID = 0x0A5C51

_SERIAL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32: upper case, no 0/1/8/9 look-alikes


# --- errors ----------------------------------------------------------------------------------------------------------


class CatalogError(Exception):
    """Base of every error the catalog raises."""


class NotFound(CatalogError, LookupError):
    """The named object does not exist."""


class AlreadyExists(CatalogError):
    """An object with that name (or path, number, identity) already exists."""


class InUse(CatalogError):
    """The object is still referenced (a LUN still mapped, a target with LUNs, a LUN with snapshots)."""


class Invalid(CatalogError, ValueError):
    """The request is malformed or not allowed (bad name, shrinking a LUN, changing a fixed attribute)."""


class CatalogLocked(CatalogError):
    """Another process holds the data dir (only with ``exclusive=True``)."""


class CatalogUnavailable(CatalogError):
    """The storage under the catalog failed the transaction: the data dir is read-only, full, or failing (EROFS,
    ENOSPC, EIO). Nothing was committed. The file system's own error is in ``os_error`` when a probe could find it;
    the next transaction tries again, so the catalog works again once the file system does."""

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        super().__init__(message)
        self.os_error = os_error


# --- identity --------------------------------------------------------------------------------------------------------


def serial_from_naa(naa: str) -> str:
    """The unit serial number (VPD 0x80) of an NAA-6 designator: its low 100 bits, the random part, as 20 base32
    characters. Deterministic, so a configuration that pins only ``naa`` reproduces the serial too."""
    value = int(naa, 16) & ((1 << 100) - 1)
    return "".join(_SERIAL_ALPHABET[(value >> (5 * (19 - i))) & 31] for i in range(20))


def new_identity() -> tuple[str, str]:
    """A fresh ``(naa, serial)``: NAA IEEE Registered Extended (SPC-4 §7.8.6.6.5): NAA = 6, the 24-bit
    :data:`COMPANY_ID`, a 36-bit vendor specific identifier and a 64-bit extension, the last 100 bits random."""
    value = (6 << 124) | (COMPANY_ID << 100) | secrets.randbits(100)
    naa = f"{value:032x}"
    return naa, serial_from_naa(naa)


# --- records ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecoverySetRow:
    """One recovery set as the catalog stores it (``options`` and ``hooks`` are JSON text); its meaning is
    :class:`lunsync.provider.vss.RecoverySet`'s."""

    id: str
    state: str
    options: str
    error: str | None
    hooks: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class RecoveryPairRow:
    """One (snapshot, destination) pair of a recovery set and its resync progress, as the catalog stores it."""

    snapshot: str
    destination: str
    new_lun: bool
    state: str
    bytes_total: int
    bytes_done: int
    bytes_copied: int
    redirected_reads: int
    verified: bool | None
    error: str | None


@dataclass(frozen=True, slots=True)
class LunRecord:
    """A LUN as the catalog holds it. Unlike a :class:`LunConfig` its identity is always set. ``id`` and
    ``created_at`` are bookkeeping and take no part in equality, so a catalog rebuilt from an export compares equal."""

    name: str
    path: str  # as configured: relative to the data dir unless absolute; see Catalog.lun_path
    size_bytes: int
    block_size: int
    thin: bool
    read_only: bool
    chunk_size_bytes: int
    naa: str  # 32 lowercase hex digits
    serial: str
    created_at: dt.datetime = field(compare=False)
    id: int = field(compare=False)
    backend: str = "file"  # a name in lunsync.snapshots.model.BACKENDS
    # lunsync created the backing file (it did not exist when the LUN was recorded), so deleting the LUN removes it
    owns_file: bool = field(default=False, compare=False)
    # the user's key=value labels; not configuration (export does not write them), so no part of equality either
    labels: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def num_blocks(self) -> int:
        return self.size_bytes // self.block_size

    @property
    def identity(self) -> LunIdentity:
        return lun_identity(self)

    def config(self) -> LunConfig:
        """This LUN as configuration, identity included (what export writes)."""
        return LunConfig(
            name=self.name,
            size_bytes=self.size_bytes,
            path=self.path,
            block_size=self.block_size,
            thin=self.thin,
            read_only=self.read_only,
            chunk_size_bytes=self.chunk_size_bytes,
            naa=self.naa,
            serial=self.serial,
            backend=self.backend,
        )


def lun_identity(lun: LunRecord) -> LunIdentity:
    """The SCSI identity (VPD 0x80 serial, 0x83 NAA designator) of a catalogued LUN."""
    return LunIdentity(naa=bytes.fromhex(lun.naa), serial=lun.serial)


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One change :meth:`Catalog.apply` makes. ``str()`` is the human form: ``~ lun db0 size 10GiB -> 20GiB``.
    ``kind`` is one of portal, ceph, lun, target, map, acl, chap; ``name`` is the LUN name or target IQN. Action ``!`` is
    only in a dry run's plan: a change the real apply would refuse, with why."""

    action: Literal["+", "-", "~", "!"]
    kind: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return " ".join(part for part in (self.action, self.kind, self.name, self.detail) if part)


@dataclass(frozen=True, slots=True)
class Plan:
    """What an apply did (or, with ``dry_run``, would do). Empty when the catalog already matched."""

    steps: tuple[PlanStep, ...] = ()
    dry_run: bool = False

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.steps)

    def lines(self) -> list[str]:
        return [str(s) for s in self.steps]

    @property
    def refused(self) -> list[str]:
        """The steps (action ``!``) a dry run found a real apply would refuse, with why."""
        return [str(s) for s in self.steps if s.action == "!"]


# --- schema ----------------------------------------------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None]


def _schema_v1(db: sqlite3.Connection) -> None:
    # Rows carry integer ids so later tables (snapshots, recovery sets) reference LUNs and targets by something that
    # survives a rename; names and IQNs are UNIQUE alongside.
    statements = (
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        """CREATE TABLE portal (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            nop_interval_s INTEGER NOT NULL,
            nop_timeout_s INTEGER NOT NULL,
            login_timeout_s INTEGER NOT NULL,
            max_sessions INTEGER NOT NULL)""",
        "CREATE TABLE portals (position INTEGER PRIMARY KEY, address TEXT NOT NULL UNIQUE)",
        """CREATE TABLE targets (
            id INTEGER PRIMARY KEY,
            iqn TEXT NOT NULL UNIQUE,
            alias TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL)""",
        """CREATE TABLE luns (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            path TEXT NOT NULL UNIQUE,
            size_bytes INTEGER NOT NULL CHECK (size_bytes > 0),
            block_size INTEGER NOT NULL CHECK (block_size IN (512, 4096)),
            thin INTEGER NOT NULL CHECK (thin IN (0, 1)),
            read_only INTEGER NOT NULL CHECK (read_only IN (0, 1)),
            chunk_size_bytes INTEGER NOT NULL,
            naa TEXT NOT NULL UNIQUE CHECK (length(naa) = 32),
            serial TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            CHECK (size_bytes % block_size = 0))""",
        f"""CREATE TABLE mappings (
            target_id INTEGER NOT NULL REFERENCES targets(id) ON DELETE CASCADE,
            lun INTEGER NOT NULL CHECK (lun BETWEEN 0 AND {MAX_LUN_NUMBER}),
            lun_id INTEGER NOT NULL REFERENCES luns(id) ON DELETE RESTRICT,
            PRIMARY KEY (target_id, lun),
            UNIQUE (target_id, lun_id))""",
        "CREATE INDEX mappings_by_lun ON mappings(lun_id)",
        """CREATE TABLE acls (
            target_id INTEGER NOT NULL REFERENCES targets(id) ON DELETE CASCADE,
            initiator TEXT NOT NULL,
            PRIMARY KEY (target_id, initiator))""",
        """CREATE TABLE chap (
            target_id INTEGER PRIMARY KEY REFERENCES targets(id) ON DELETE CASCADE,
            user TEXT NOT NULL,
            secret TEXT NOT NULL,
            mutual_user TEXT,
            mutual_secret TEXT,
            CHECK ((mutual_user IS NULL) = (mutual_secret IS NULL)))""",
    )
    for sql in statements:
        db.execute(sql)
    p = PortalConfig()
    db.execute(
        "INSERT INTO portal VALUES (1, ?, ?, ?, ?)",
        (p.nop_interval_s, p.nop_timeout_s, p.login_timeout_s, p.max_sessions),
    )
    db.executemany("INSERT INTO portals VALUES (?, ?)", enumerate(p.listen))


def _schema_v2_snapshots(db: sqlite3.Connection) -> None:
    # Snapshots, pools, sets and exposures (lunsync.snapshots.snapcat owns the queries). The chunk maps are not here:
    # they live in each pool's own pool.db, next to the data they describe (see lunsync.snapshots.cow). A snapshot
    # keeps its origin's name as text and its lun_id only while the origin exists: a filled clone outlives its origin.
    statements = (
        """CREATE TABLE pools (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            path TEXT NOT NULL UNIQUE,
            capacity_bytes INTEGER CHECK (capacity_bytes IS NULL OR capacity_bytes > 0),
            created_at TEXT NOT NULL)""",
        """CREATE TABLE cow_volumes (
            lun_id INTEGER PRIMARY KEY REFERENCES luns(id) ON DELETE CASCADE,
            pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE RESTRICT,
            last_epoch INTEGER NOT NULL DEFAULT 0)""",
        """CREATE TABLE snapshot_sets (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            hold_ms REAL,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY,
            lun_id INTEGER REFERENCES luns(id) ON DELETE RESTRICT,
            lun_name TEXT NOT NULL,
            name TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('differential', 'clone')),
            state TEXT NOT NULL CHECK (state IN ('valid', 'invalid')),
            invalid_reason TEXT,
            epoch INTEGER NOT NULL,
            pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE RESTRICT,
            set_id INTEGER REFERENCES snapshot_sets(id) ON DELETE SET NULL,
            size_bytes INTEGER NOT NULL,
            block_size INTEGER NOT NULL,
            chunk_size_bytes INTEGER NOT NULL,
            filled_chunks INTEGER NOT NULL DEFAULT 0,
            filled INTEGER NOT NULL DEFAULT 0 CHECK (filled IN (0, 1)),
            naa TEXT NOT NULL UNIQUE CHECK (length(naa) = 32),
            serial TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            UNIQUE (lun_name, name))""",
        "CREATE INDEX snapshots_by_lun ON snapshots(lun_id)",
        f"""CREATE TABLE snapshot_exposures (
            snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE RESTRICT,
            target_id INTEGER NOT NULL REFERENCES targets(id) ON DELETE CASCADE,
            lun INTEGER NOT NULL CHECK (lun BETWEEN 0 AND {MAX_LUN_NUMBER}),
            UNIQUE (target_id, lun))""",
        # One LUN number per target, whether it shows a LUN or an exposed snapshot.
        """CREATE TRIGGER mappings_vs_exposures BEFORE INSERT ON mappings
           WHEN EXISTS (SELECT 1 FROM snapshot_exposures WHERE target_id = NEW.target_id AND lun = NEW.lun)
           BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: that LUN number shows an exposed snapshot'); END""",
        """CREATE TRIGGER exposures_vs_mappings BEFORE INSERT ON snapshot_exposures
           WHEN EXISTS (SELECT 1 FROM mappings WHERE target_id = NEW.target_id AND lun = NEW.lun)
           BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: that LUN number is already mapped'); END""",
    )
    for sql in statements:
        db.execute(sql)


def _schema_v3_recovery(db: sqlite3.Connection) -> None:
    # Recovery sets and their resync progress (lunsync.provider.recovery_store owns the queries). A pair names its
    # snapshot as LUN@SNAP text, not by id: a swap deletes the snapshot it consumed and the history must stay. The
    # partial unique index is the rule "one resync per destination" (VSS_E_RESYNC_IN_PROGRESS), held by the catalog
    # itself so that no restart or race can break it. Bitmaps live in <data-dir>/resync/, committed after the
    # destination's data; the counters here are progress for people, never what a resume trusts.
    statements = (
        """CREATE TABLE recovery_sets (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('pending', 'pre-restore', 'resyncing', 'done', 'failed',
                                                 'cancelled')),
            options TEXT NOT NULL,
            error TEXT,
            hooks TEXT NOT NULL DEFAULT '[]',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL)""",
        """CREATE TABLE recovery_pairs (
            set_id TEXT NOT NULL REFERENCES recovery_sets(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            snapshot TEXT NOT NULL,
            destination TEXT NOT NULL,
            new_lun INTEGER NOT NULL DEFAULT 0 CHECK (new_lun IN (0, 1)),
            state TEXT NOT NULL CHECK (state IN ('pending', 'resyncing', 'done', 'failed', 'cancelled')),
            bytes_total INTEGER NOT NULL DEFAULT 0,
            bytes_done INTEGER NOT NULL DEFAULT 0,
            bytes_copied INTEGER NOT NULL DEFAULT 0,
            redirected_reads INTEGER NOT NULL DEFAULT 0,
            verified INTEGER CHECK (verified IN (0, 1)),
            error TEXT,
            PRIMARY KEY (set_id, position))""",
        "CREATE UNIQUE INDEX one_resync_per_destination ON recovery_pairs(destination) WHERE state = 'resyncing'",
    )
    for sql in statements:
        db.execute(sql)


def _schema_v4_file_ownership(db: sqlite3.Connection) -> None:
    # Whether lunsync created the LUN's backing file (it did not exist when the LUN was recorded): only such a file
    # is removed with the LUN. Before this column, a relative path's file was removed and an absolute one kept; the
    # existing rows keep that rule.
    db.execute("ALTER TABLE luns ADD COLUMN owns_file INTEGER NOT NULL DEFAULT 0 CHECK (owns_file IN (0, 1))")
    db.execute("UPDATE luns SET owns_file = 1 WHERE substr(path, 1, 1) != '/'")


def _schema_v5_backends(db: sqlite3.Connection) -> None:
    # Each LUN names its backend (lunsync.snapshots.model.BACKENDS) instead of the daemon guessing it with stat at
    # every open. Existing LUNs are classified once, here: a path that is a block device now is "block", everything
    # else (a file, or a path that is gone: it is recreated as a file) is "file". Relative paths are inside the data
    # dir, which is where this database lives.
    db.execute("ALTER TABLE luns ADD COLUMN backend TEXT NOT NULL DEFAULT 'file' CHECK (backend != '')")
    main = next(r for r in db.execute("PRAGMA database_list") if r[1] == "main")
    data_dir = os.path.dirname(main[2])
    for lun_id, path in db.execute("SELECT id, path FROM luns").fetchall():
        try:
            is_block = stat.S_ISBLK(os.stat(os.path.join(data_dir, path)).st_mode)
        except OSError:
            is_block = False
        if is_block:
            db.execute("UPDATE luns SET backend = 'block' WHERE id = ?", (lun_id,))


def _schema_v6_labels(db: sqlite3.Connection) -> None:
    # The user's key=value labels on LUNs and snapshots (lunsync.snapshots.model.check_labels), as one JSON object
    # per row: they are read with the row and filtered in the caller, and no query joins on them. Rows so far have none.
    for table in ("luns", "snapshots"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN labels TEXT NOT NULL DEFAULT '{{}}' CHECK (json_valid(labels))")


def _schema_v7_store_snapshots(db: sqlite3.Connection) -> None:
    # A LUN whose store keeps snapshots itself (RBD) has snapshots of kind 'rbd': the store holds the point in time and
    # lunsync's pools hold nothing for it. Only the kind's CHECK widens, which changes no stored row, so the table's
    # recorded definition is edited in place (SQLite's documented way for such changes, "ALTER TABLE" section 7)
    # rather than rebuilt: a rebuild would have to drop a table that exposures and recovery rows refer to.
    old = "kind TEXT NOT NULL CHECK (kind IN ('differential', 'clone'))"
    new = "kind TEXT NOT NULL CHECK (kind IN ('differential', 'clone', 'rbd'))"
    (sql,) = db.execute("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'snapshots'").fetchone()
    if old not in sql:
        raise CatalogError("the snapshots table does not have the kind constraint this migration widens")
    (version,) = db.execute("PRAGMA schema_version").fetchone()
    db.execute("PRAGMA writable_schema = ON")
    try:
        db.execute("UPDATE sqlite_schema SET sql = ? WHERE type = 'table' AND name = 'snapshots'",
                   (sql.replace(old, new),))
        db.execute(f"PRAGMA schema_version = {int(version) + 1}")  # every connection re-reads the schema
    finally:
        db.execute("PRAGMA writable_schema = OFF")


def _schema_v8_flatten_jobs(db: sqlite3.Connection) -> None:
    # The latest flatten of an RBD clone LUN (lunsync lun flatten), so that a daemon stopped mid-flatten resumes it at
    # start, one that died mid-flatten says so, and both still report it afterwards. One row per LUN, gone with the LUN. Times are Unix seconds.
    db.execute("""CREATE TABLE flatten_jobs (
        lun_id INTEGER PRIMARY KEY REFERENCES luns(id) ON DELETE CASCADE,
        state TEXT NOT NULL CHECK (state IN ('running', 'stopped', 'done', 'failed')),
        started_at REAL NOT NULL,
        finished_at REAL,
        objects_done INTEGER NOT NULL DEFAULT 0 CHECK (objects_done >= 0),
        objects_total INTEGER NOT NULL DEFAULT 0 CHECK (objects_total >= 0),
        error TEXT)""")


# Migration i takes the schema from version i to i + 1 (PRAGMA user_version), inside one transaction with foreign keys
# enforced. Append new ones; never edit one that has shipped. Use db.execute per statement: executescript() would
# commit the enclosing transaction.
MIGRATIONS: tuple[Migration, ...] = (_schema_v1, _schema_v2_snapshots, _schema_v3_recovery,
                                     _schema_v4_file_ownership, _schema_v5_backends, _schema_v6_labels,
                                     _schema_v7_store_snapshots, _schema_v8_flatten_jobs)
SCHEMA_VERSION = len(MIGRATIONS)


class _DryRun(Exception):
    """Raised inside the apply transaction to roll a dry run back."""


def _why(e: ConfigError) -> str:
    """A config-model error as ``field: message`` (the model's key paths name LUNs and targets differently)."""
    names = [p for p in e.path if isinstance(p, str)]
    return f"{names[-1]}: {e.message}" if names else e.message


def _config(what: str, make: Callable[[], object]) -> None:
    """Run a config-model check, reporting its failure as the catalog's :class:`Invalid` about ``what``."""
    try:
        make()
    except ConfigError as e:
        raise Invalid(f"{what}: {_why(e)}") from None


def _iqn(name: str) -> str:
    try:
        normalized: str = normalize_iscsi_name(name)
    except (TypeError, ValueError) as e:
        raise Invalid(str(e)) from None
    return normalized


# --- the catalog -----------------------------------------------------------------------------------------------------


class Catalog:
    """The catalog of one data dir. One connection, shared by the threads of one process under a lock; every call
    is short. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        exclusive: bool = False,
    ) -> None:
        """Open (creating and migrating as needed) the catalog in ``data_dir``. With ``exclusive`` the data dir is
        flock()ed for the life of the catalog, so a second daemon on the same LUN files fails fast
        (:class:`CatalogLocked`) instead of corrupting them."""
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.path = os.path.join(self.data_dir, CATALOG_FILENAME)
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0
        self._dir_fd: int | None = None
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        if exclusive:
            self._dir_fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._dir_fd)
                self._dir_fd = None
                raise CatalogLocked(f"data dir {self.data_dir} is in use by another lunsync process") from None
        # Create the file 0600 before SQLite does (it would honour the umask); SQLite gives the -wal and -shm files
        # the database file's mode. chmod too, in case an older file was looser: it holds CHAP secrets.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise CatalogError(f"{self.path}: cannot use WAL journaling (got {mode!r})")
            # FULL: in WAL mode NORMAL may lose the last commits on power loss; an acknowledged change must not be.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            self._migrate()
            self._reserve_wal()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls, data_dir: str | os.PathLike[str], *, clock: Callable[[], float] = time.time, exclusive: bool = False
    ) -> Catalog:
        """Same as the constructor."""
        return cls(data_dir, clock=clock, exclusive=exclusive)

    def close(self) -> None:
        with self._lock:
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()
                del self._db
            if self._dir_fd is not None:
                os.close(self._dir_fd)  # releases the flock
                self._dir_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Catalog({self.data_dir!r})"

    # --- plumbing ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: BEGIN IMMEDIATE (or DEFERRED for reads), COMMIT on success, ROLLBACK on any error. Nested
        uses join the outer transaction, so composite operations stay atomic."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            # IMMEDIATE takes the write lock up front, so a read-then-write can never fail half way with SQLITE_BUSY.
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            self._depth = 1
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:
                    # A ROLLBACK on a failing disk may fail too; the error worth reporting is the first one.
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.IntegrityError):
                    raise _translate(e) from e
                if isinstance(e, sqlite3.OperationalError) and _is_storage_fault(e):
                    raise self._unavailable(e) from e
                raise
            finally:
                self._depth = 0

    def _unavailable(self, e: sqlite3.OperationalError) -> CatalogUnavailable:
        """SQLite says only "disk I/O error" or "attempt to write a readonly database": ask the file system what is
        wrong, so the message carries the OS error an operator can act on."""
        os_error = probe_writable(self.data_dir, self.path)
        if os_error is not None:
            why = f"{os_error.filename}: {os_error.strerror} ({errno.errorcode.get(os_error.errno or 0, '?')})"
        else:
            why = str(e)
        return CatalogUnavailable(f"the catalog cannot be written: {why}; nothing was changed, retry when the data "
                                  f"dir is writable again", os_error)

    def _reserve_wal(self) -> None:
        """Extend the WAL with written zeros to more than it grows to between checkpoints, once, at open.

        A commit's fdatasync of a WAL that grows must also commit the file system's journal (the file's size
        changed), and on ext4 (data=ordered) that journal commit waits for every other file's newly allocated data
        to reach the disk: under write load on the LUNs, tens to hundreds of milliseconds. Over blocks that are
        already written, the same fdatasync only writes the frames and flushes the disk's cache. SQLite writes each
        frame at its place in the file and never truncates the WAL (journal_size_limit is left at -1), so commits
        land in the reserve, and after each checkpoint the WAL starts again from its beginning, in the same blocks.
        Zeros are no frames: recovery reads frames up to the first one whose salt and checksum do not match the
        header's, and a zero header makes the whole file read as an empty WAL. The write lock (BEGIN IMMEDIATE) is
        held meanwhile, so no frame is written concurrently; only blocks past the WAL's end are touched."""
        page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        want = 32 + WAL_RESERVE_CHECKPOINTS * WAL_AUTOCHECKPOINT_PAGES * (24 + page)  # header, frames
        with self._tx():
            fd = os.open(self.path + "-wal", os.O_WRONLY | os.O_CLOEXEC)
            try:
                have = os.fstat(fd).st_size
                if have >= want:
                    return
                zeros = bytes(1 << 20)
                while have < want:
                    n = os.pwrite(fd, zeros[:want - have], have)
                    if n <= 0:
                        raise OSError(errno.EIO, "write made no progress")
                    have += n
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A read transaction: several queries see one consistent state."""
        return self._tx(write=False)

    def transaction(self, write: bool = True) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One transaction for modules that own tables of their own (lunsync.snapshots.snapcat): same connection,
        same lock, same nesting rules and error translation as every method here."""
        return self._tx(write=write)

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"{self.path} has schema version {version}, newer than this lunsync understands ({SCHEMA_VERSION})"
            )
        if 0 < version < SCHEMA_VERSION:
            # An upgrade is undone by putting this copy back (with the older lunsync): written before any migration.
            stamp = dt.datetime.fromtimestamp(self._clock(), dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            os.makedirs(os.path.join(self.data_dir, BACKUPS_DIRNAME), mode=0o700, exist_ok=True)
            self.backup_to(os.path.join(self.data_dir, BACKUPS_DIRNAME, f"catalog-v{version}-{stamp}.db"))
        for v in range(version, SCHEMA_VERSION):
            with self._tx() as db:
                MIGRATIONS[v](db)
                db.execute(f"PRAGMA user_version = {v + 1}")

    def backup_to(self, dest: str) -> int:
        """A consistent copy of the catalog as a new file ``dest`` (SQLite's online backup API; see
        :func:`lunsync.snapshots.backup.backup_database`); returns the copy's schema version. Other threads' calls
        wait meanwhile; other processes may keep writing."""
        with self._lock:
            backup_database(self._db, dest)
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def backup_metadata(self, pools: Sequence[tuple[str, str]], dest_dir: str) -> BackupManifest:
        """The array's metadata backup into ``dest_dir``: this catalog and the maps of ``pools`` (``(name, path)``);
        see :func:`lunsync.snapshots.backup.backup_metadata` for what the caller must keep still meanwhile."""
        return backup_metadata(self.backup_to, self.data_dir, pools, dest_dir)

    @property
    def schema_version(self) -> int:
        """The schema version of the open file (PRAGMA user_version); :data:`SCHEMA_VERSION` once migrated."""
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _target_id(self, iqn: str) -> int:
        row = self._db.execute("SELECT id FROM targets WHERE iqn = ?", (iqn,)).fetchone()
        if row is None:
            raise NotFound(f"target {iqn} does not exist")
        return int(row[0])

    def _lun_row(self, name: str) -> sqlite3.Row:
        row: sqlite3.Row | None = self._db.execute("SELECT * FROM luns WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"lun {name!r} does not exist")
        return row

    # --- portal ----------------------------------------------------------------------------------------------------

    def get_portal(self) -> PortalConfig:
        """The portal configuration: listen addresses and session timers."""
        with self._read() as db:
            row = db.execute("SELECT * FROM portal WHERE id = 1").fetchone()
            listen = tuple(r[0] for r in db.execute("SELECT address FROM portals ORDER BY position"))
            advertised = db.execute("SELECT value FROM settings WHERE key = ?", (_ADVERTISE_KEY,)).fetchone()
            return PortalConfig(
                listen=listen,
                advertise=tuple(json.loads(advertised[0])) if advertised else (),
                nop_interval_s=row["nop_interval_s"],
                nop_timeout_s=row["nop_timeout_s"],
                login_timeout_s=row["login_timeout_s"],
                max_sessions=row["max_sessions"],
            )

    def set_portal(self, portal: PortalConfig) -> None:
        """Replace the whole portal configuration."""
        with self._tx() as db:
            db.execute(
                "UPDATE portal SET nop_interval_s = ?, nop_timeout_s = ?, login_timeout_s = ?, max_sessions = ?",
                (portal.nop_interval_s, portal.nop_timeout_s, portal.login_timeout_s, portal.max_sessions),
            )
            self._write_portals(portal.listen)
            # A setting, not a column: the portal table's schema stays as it is.
            db.execute("DELETE FROM settings WHERE key = ?", (_ADVERTISE_KEY,))
            if portal.advertise:
                db.execute("INSERT INTO settings (key, value) VALUES (?, ?)",
                           (_ADVERTISE_KEY, json.dumps(list(portal.advertise))))

    # --- ceph --------------------------------------------------------------------------------------------------------

    def get_ceph(self) -> CephConfig:
        """How the daemon reaches the Ceph cluster of its RBD-backed LUNs (the ``[ceph]`` section). Kept here, like
        the portal, so that a daemon started without ``--config`` still reaches the cluster it was given."""
        with self._read() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (_CEPH_KEY,)).fetchone()
        if row is None:
            return CephConfig()
        try:
            return CephConfig(**json.loads(row[0]))
        except (ValueError, TypeError) as e:
            raise Invalid(f"the catalog's ceph settings are unreadable ({e}); set them again with --config") from None

    def set_ceph(self, ceph: CephConfig) -> None:
        """Replace the ``[ceph]`` settings; the defaults are stored as no row at all."""
        with self._tx() as db:
            db.execute("DELETE FROM settings WHERE key = ?", (_CEPH_KEY,))
            if ceph != CephConfig():
                value = {f: getattr(ceph, f) for f in ("conf_path", "keyring", "client", "connect_timeout_s",
                                                       "op_timeout_s")}
                db.execute("INSERT INTO settings (key, value) VALUES (?, ?)", (_CEPH_KEY, json.dumps(value)))

    def list_portals(self) -> tuple[str, ...]:
        """The listen addresses, ``HOST:PORT`` / ``[V6]:PORT``, in order."""
        listen: tuple[str, ...] = self.get_portal().listen
        return listen

    def set_portals(self, listen: Sequence[str]) -> tuple[str, ...]:
        """Replace the listen addresses; returns them normalized. Raises :class:`Invalid`."""
        try:
            portal = replace(self.get_portal(), listen=tuple(listen))
        except ConfigError as e:
            raise Invalid(f"listen: {e.message}") from None
        normalized: tuple[str, ...] = portal.listen
        with self._tx():
            self._write_portals(normalized)
        return normalized

    def _write_portals(self, listen: Sequence[str]) -> None:
        self._db.execute("DELETE FROM portals")
        self._db.executemany("INSERT INTO portals VALUES (?, ?)", enumerate(listen))

    # --- targets ---------------------------------------------------------------------------------------------------

    def create_target(self, iqn: str, alias: str = "") -> TargetConfig:
        """Create an empty target (no LUNs, open to any initiator, no CHAP). Raises :class:`AlreadyExists`,
        :class:`Invalid`."""
        iqn = _iqn(iqn)
        _config(f"target {iqn}", lambda: TargetConfig(iqn, alias=alias))
        with self._tx() as db:
            if db.execute("SELECT 1 FROM targets WHERE iqn = ?", (iqn,)).fetchone():
                raise AlreadyExists(f"target {iqn} already exists")
            db.execute(
                "INSERT INTO targets (iqn, alias, created_at) VALUES (?, ?, ?)", (iqn, alias, rfc3339(self._clock()))
            )
            return self.get_target(iqn)

    def get_target(self, iqn: str) -> TargetConfig:
        """A target with its ACL, LUN mappings and CHAP. Raises :class:`NotFound`."""
        iqn = _iqn(iqn)
        with self._read() as db:
            row = db.execute("SELECT id, alias FROM targets WHERE iqn = ?", (iqn,)).fetchone()
            if row is None:
                raise NotFound(f"target {iqn} does not exist")
            return self._target(row["id"], iqn, row["alias"])

    def _target(self, target_id: int, iqn: str, alias: str) -> TargetConfig:
        acl = tuple(r[0] for r in self._db.execute("SELECT initiator FROM acls WHERE target_id = ?", (target_id,)))
        maps = tuple(
            LunMapping(r[0], r[1])
            for r in self._db.execute(
                "SELECT m.lun, l.name FROM mappings m JOIN luns l ON l.id = m.lun_id WHERE m.target_id = ?",
                (target_id,),
            )
        )
        return TargetConfig(iqn, alias=alias, acl=acl, luns=maps, chap=self._chap(target_id))

    def list_targets(self) -> tuple[TargetConfig, ...]:
        """Every target, in creation order."""
        with self._read() as db:
            rows = db.execute("SELECT id, iqn, alias FROM targets ORDER BY id").fetchall()
            return tuple(self._target(r["id"], r["iqn"], r["alias"]) for r in rows)

    def update_target(self, iqn: str, *, alias: str) -> TargetConfig:
        """Change a target's alias. Raises :class:`NotFound`, :class:`Invalid`."""
        iqn = _iqn(iqn)
        _config(f"target {iqn}", lambda: TargetConfig(iqn, alias=alias))
        with self._tx() as db:
            db.execute("UPDATE targets SET alias = ? WHERE id = ?", (alias, self._target_id(iqn)))
            return self.get_target(iqn)

    def delete_target(self, iqn: str, *, force: bool = False) -> None:
        """Delete a target with its ACL and CHAP. A target that still shows LUNs is :class:`InUse` unless ``force``,
        which unmaps them (the LUNs themselves stay). Raises :class:`NotFound`."""
        iqn = _iqn(iqn)
        with self._tx() as db:
            target_id = self._target_id(iqn)
            mapped = db.execute("SELECT count(*) FROM mappings WHERE target_id = ?", (target_id,)).fetchone()[0]
            if mapped and not force:
                raise InUse(f"target {iqn} still maps {mapped} LUN(s); unmap them first or force")
            db.execute("DELETE FROM targets WHERE id = ?", (target_id,))

    # --- LUNs ------------------------------------------------------------------------------------------------------

    def create_lun(
        self,
        name: str,
        size_bytes: int,
        *,
        path: str | None = None,
        block_size: int = 512,
        thin: bool = True,
        read_only: bool = False,
        chunk_size_bytes: int = 64 << 10,
        naa: str | None = None,
        serial: str | None = None,
        backend: str = "",
        labels: dict[str, str] | None = None,
    ) -> LunRecord:
        """Record a new LUN and give it its identity, generated here once and never changed (unless ``naa``/``serial``
        pin it, as an export does). ``path`` defaults to ``luns/<name>.img`` in the data dir; ``backend`` to
        :func:`~lunsync.snapshots.model.default_backend` of the path. The backing store is the caller's to create. ``labels`` are the user's key=value tags. Raises :class:`AlreadyExists` (name, path or identity taken),
        :class:`Invalid`."""
        checked = valid_labels(f"lun {name!r}", labels or {})
        try:
            cfg = LunConfig(
                name=name,
                size_bytes=size_bytes,
                path=path or "",
                block_size=block_size,
                thin=thin,
                read_only=read_only,
                chunk_size_bytes=chunk_size_bytes,
                naa=naa,
                serial=serial,
                backend=backend,
            )
        except ConfigError as e:
            raise Invalid(f"lun {name!r}: {_why(e)}") from None
        with self._tx():
            return self._insert_lun(cfg, checked)

    def _insert_lun(self, cfg: LunConfig, labels: dict[str, str] | None = None) -> LunRecord:
        db = self._db
        if db.execute("SELECT 1 FROM luns WHERE name = ?", (cfg.name,)).fetchone():
            raise AlreadyExists(f"lun {cfg.name!r} already exists")
        where = self.lun_path(cfg)
        if where in (self.path, self.path + "-wal", self.path + "-shm"):
            raise Invalid(f"lun {cfg.name!r}: path {cfg.path!r} is the catalog itself")
        # The path as written, as resolved, and relative to the data dir: the forms a stored path can take. An index
        # lookup, not a scan: creating the 10 000th LUN must cost what the 10th did.
        forms = {cfg.path} if cfg.backend == "rbd" else {cfg.path, where, os.path.relpath(where, self.data_dir)}
        marks = ", ".join("?" * len(forms))
        other = db.execute(f"SELECT name FROM luns WHERE path IN ({marks})", tuple(forms)).fetchone()
        if other is not None:
            raise AlreadyExists(f"lun {cfg.name!r}: path {where} is already used by lun {other['name']!r}")
        naa = cfg.naa
        serial = cfg.serial
        if naa is None:
            naa, generated = new_identity()
            serial = serial or generated
        elif serial is None:
            serial = serial_from_naa(naa)
        for column, value in (("naa", naa), ("serial", serial)):
            row = db.execute(f"SELECT name FROM luns WHERE {column} = ?", (value,)).fetchone()
            if row is not None:
                raise AlreadyExists(f"lun {cfg.name!r}: {column} {value} already belongs to lun {row[0]!r}")
        db.execute(
            """INSERT INTO luns (name, path, size_bytes, block_size, thin, read_only, chunk_size_bytes, naa, serial,
                                 created_at, owns_file, backend, labels)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                cfg.name,
                cfg.path,
                cfg.size_bytes,
                cfg.block_size,
                int(cfg.thin),
                int(cfg.read_only),
                cfg.chunk_size_bytes,
                naa,
                serial,
                rfc3339(self._clock()),
                # An RBD image is never the LUN's to remove: deleting the LUN keeps it unless the image is asked for.
                int(cfg.backend != "rbd" and not os.path.lexists(where)),
                cfg.backend,
                json.dumps(labels or {}),
            ),
        )
        return _lun(self._lun_row(cfg.name))

    def get_lun(self, name: str) -> LunRecord:
        """Raises :class:`NotFound`."""
        with self._read():
            return _lun(self._lun_row(name))

    def list_luns(self) -> tuple[LunRecord, ...]:
        """Every LUN, in creation order."""
        with self._read() as db:
            return tuple(_lun(r) for r in db.execute("SELECT * FROM luns ORDER BY id"))

    def delete_lun(self, name: str) -> LunRecord:
        """Forget a LUN; returns what it was, so the caller can remove the backing file. A LUN still mapped to a
        target is :class:`InUse` (so is one that later tables still reference). Raises :class:`NotFound`."""
        with self._tx() as db:
            rec = _lun(self._lun_row(name))
            users = self._mapped_by(rec.id)
            if users:
                shown = ", ".join(f"{iqn} lun {n}" for iqn, n in users)
                raise InUse(f"lun {name!r} is still mapped ({shown}); unmap it first")
            db.execute("DELETE FROM luns WHERE id = ?", (rec.id,))
            return rec

    def _snapshots_keeping(self, lun_id: int) -> list[str]:
        """The snapshots (LUN@SNAP) whose rows still reference LUN ``lun_id``, which its removal would break."""
        with self._read() as db:
            return [f"{r[0]}@{r[1]}" for r in db.execute(
                "SELECT lun_name, name FROM snapshots WHERE lun_id = ? ORDER BY name", (lun_id,))]

    def resize_lun(self, name: str, size_bytes: int) -> LunRecord:
        """Grow a LUN (the caller grows the backing file and signals CAPACITY DATA HAS CHANGED). Shrinking would cut
        off data initiators have written, so it is :class:`Invalid`; so is a size that is not a whole number of
        blocks. The same size is a no-op. Raises :class:`NotFound`."""
        with self._tx() as db:
            rec = _lun(self._lun_row(name))
            self._check_resize(rec, size_bytes)
            if size_bytes != rec.size_bytes:
                db.execute("UPDATE luns SET size_bytes = ? WHERE id = ?", (size_bytes, rec.id))
            return _lun(self._lun_row(name))

    @staticmethod
    def _check_resize(rec: LunRecord, size_bytes: int) -> None:
        _config(f"lun {rec.name!r}", lambda: replace(rec.config(), size_bytes=size_bytes))
        if size_bytes < rec.size_bytes:
            raise Invalid(
                f"lun {rec.name!r}: cannot shrink from {format_size(rec.size_bytes)} to {format_size(size_bytes)}: "
                "data beyond the new end would be lost"
            )

    def update_lun(self, name: str, *, read_only: bool | None = None, thin: bool | None = None) -> LunRecord:
        """Change the attributes that may change after creation. Size has :meth:`resize_lun`; path, block size,
        chunk size and identity are fixed for the life of the LUN. Raises :class:`NotFound`, :class:`Invalid`."""
        with self._tx() as db:
            rec = _lun(self._lun_row(name))
            for column, value in (("read_only", read_only), ("thin", thin)):
                if value is None:
                    continue
                if not isinstance(value, bool):
                    raise Invalid(f"lun {name!r}: {column} must be true or false")
                db.execute(f"UPDATE luns SET {column} = ? WHERE id = ?", (int(value), rec.id))
            return _lun(self._lun_row(name))

    def label_lun(self, name: str, set_: dict[str, str], remove: Sequence[str] = ()) -> LunRecord:
        """Set the labels ``set_`` (replacing a key's value) and remove the keys ``remove`` (absent ones are no
        error) on a LUN, in one transaction. Raises :class:`NotFound`, :class:`Invalid`."""
        with self._tx() as db:
            rec = _lun(self._lun_row(name))
            labels = relabel(f"lun {name!r}", rec.labels, set_, remove)
            db.execute("UPDATE luns SET labels = ? WHERE id = ?", (json.dumps(labels), rec.id))
            return _lun(self._lun_row(name))

    def lun_path(self, lun: LunRecord | LunConfig | str) -> str:
        """The absolute path of a LUN's backing store: its configured path, resolved against the data dir when
        relative. Accepts a record, a config, or a LUN name (then :class:`NotFound` if unknown)."""
        if isinstance(lun, str):
            lun = self.get_lun(lun)
        if lun.backend == "rbd":
            return lun.path  # POOL/IMAGE on the cluster, nothing under the data dir
        return self._resolve(lun.path)

    def _resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.data_dir, path))

    def lun_mappings(self, name: str) -> tuple[tuple[str, int], ...]:
        """Every ``(target iqn, LUN number)`` that shows the LUN ``name``. Raises :class:`NotFound`."""
        with self._read():
            return self._mapped_by(int(self._lun_row(name)["id"]))

    def home_target(self, name: str) -> str | None:
        """The target whose process serves LUN ``name`` under ``serve --workers``: the first that maps it (catalog
        order). An unmapped LUN made from a snapshot (:meth:`made_from`) goes where the snapshot's LUN goes, followed
        back while unmapped, because the snapshot's regions not yet copied are read from that live origin. None: the
        LUN lives with the unmapped LUNs. Raises :class:`NotFound` when ``name`` is no LUN."""
        with self._read():
            seen: set[str] = set()
            while True:
                maps = self._mapped_by(int(self._lun_row(name)["id"]))
                if maps:
                    return maps[0][0]
                seen.add(name)
                origin = self.made_from(name)
                if origin is None or origin in seen:
                    return None
                name = origin

    def made_from(self, name: str) -> str | None:
        """The LUN whose snapshot LUN ``name`` was made from (a restore's new destination, a LUN created from a
        snapshot: the newest recovery pair that created it), if that LUN still exists."""
        with self._read() as db:
            made = db.execute(
                "SELECT p.snapshot FROM recovery_pairs p JOIN recovery_sets s ON s.id = p.set_id "
                "WHERE p.destination = ? AND p.new_lun = 1 ORDER BY s.created_at DESC LIMIT 1", (name,)).fetchone()
            origin = str(made[0]).partition("@")[0] if made is not None else None
            if origin is None or db.execute("SELECT 1 FROM luns WHERE name = ?", (origin,)).fetchone() is None:
                return None  # made from nothing, or from a deleted origin (its snapshots stay with the unmapped)
            return origin

    def _mapped_by(self, lun_id: int) -> tuple[tuple[str, int], ...]:
        rows = self._db.execute(
            "SELECT t.iqn, m.lun FROM mappings m JOIN targets t ON t.id = m.target_id WHERE m.lun_id = ? "
            "ORDER BY t.id, m.lun",
            (lun_id,),
        )
        return tuple((r[0], r[1]) for r in rows)

    # --- mappings --------------------------------------------------------------------------------------------------

    def map_lun(self, target: str, lun_name: str, lun: int | None = None) -> LunMapping:
        """Show LUN ``lun_name`` on ``target`` as LUN number ``lun`` (the lowest free number when None). A LUN may be
        mapped on several targets, once per target. Raises :class:`NotFound`, :class:`AlreadyExists`,
        :class:`Invalid`, :class:`InUse` (no free number)."""
        target = _iqn(target)
        if lun is not None:
            number = lun
            _config(f"target {target}", lambda: LunMapping(number, lun_name))
        with self._tx() as db:
            target_id = self._target_id(target)
            lun_id = int(self._lun_row(lun_name)["id"])
            row = db.execute(
                "SELECT lun FROM mappings WHERE target_id = ? AND lun_id = ?", (target_id, lun_id)
            ).fetchone()
            if row is not None:
                raise AlreadyExists(f"lun {lun_name!r} is already mapped on {target} as LUN {row[0]}")
            used = {r[0] for r in db.execute("SELECT lun FROM mappings WHERE target_id = ?", (target_id,))}
            if lun is None:
                lun = next((n for n in range(MAX_LUN_NUMBER + 1) if n not in used), None)
                if lun is None:
                    raise InUse(f"target {target} has no free LUN number")
            elif lun in used:
                other = db.execute(
                    "SELECT l.name FROM mappings m JOIN luns l ON l.id = m.lun_id WHERE m.target_id = ? AND m.lun = ?",
                    (target_id, lun),
                ).fetchone()[0]
                raise AlreadyExists(f"LUN {lun} of {target} is already taken by lun {other!r}")
            db.execute("INSERT INTO mappings VALUES (?, ?, ?)", (target_id, lun, lun_id))
            return LunMapping(lun, lun_name)

    def unmap_lun(self, target: str, lun: int) -> LunMapping:
        """Remove LUN number ``lun`` from ``target``; returns what it showed. Raises :class:`NotFound`."""
        target = _iqn(target)
        with self._tx() as db:
            target_id = self._target_id(target)
            row = db.execute(
                "SELECT l.name FROM mappings m JOIN luns l ON l.id = m.lun_id WHERE m.target_id = ? AND m.lun = ?",
                (target_id, lun),
            ).fetchone()
            if row is None:
                raise NotFound(f"target {target} has no LUN {lun}")
            db.execute("DELETE FROM mappings WHERE target_id = ? AND lun = ?", (target_id, lun))
            return LunMapping(lun, row[0])

    def list_mappings(self, target: str) -> tuple[LunMapping, ...]:
        """The LUNs ``target`` shows, by LUN number. Raises :class:`NotFound`."""
        maps: tuple[LunMapping, ...] = self.get_target(target).luns
        return maps

    # --- ACLs ------------------------------------------------------------------------------------------------------

    def add_acl(self, target: str, initiator: str) -> str:
        """Allow ``initiator`` to log in to ``target`` (a target with no ACL entries admits everyone). Returns the
        name as stored (lowercase). Raises :class:`NotFound`, :class:`AlreadyExists`, :class:`Invalid`."""
        target, initiator = _iqn(target), _iqn(initiator)
        with self._tx() as db:
            target_id = self._target_id(target)
            if db.execute("SELECT 1 FROM acls WHERE target_id = ? AND initiator = ?", (target_id, initiator)).fetchone():
                raise AlreadyExists(f"{initiator} is already in the ACL of {target}")
            db.execute("INSERT INTO acls VALUES (?, ?)", (target_id, initiator))
            return initiator

    def remove_acl(self, target: str, initiator: str) -> None:
        """Raises :class:`NotFound` (target, or initiator not in its ACL)."""
        target, initiator = _iqn(target), _iqn(initiator)
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM acls WHERE target_id = ? AND initiator = ?", (self._target_id(target), initiator)
            )
            if cur.rowcount == 0:
                raise NotFound(f"{initiator} is not in the ACL of {target}")

    def list_acls(self, target: str) -> tuple[str, ...]:
        """The initiator names allowed on ``target``, sorted; empty means any. Raises :class:`NotFound`."""
        acl: tuple[str, ...] = self.get_target(target).acl
        return acl

    # --- CHAP ------------------------------------------------------------------------------------------------------

    def set_chap(self, target: str, chap: ChapConfig) -> None:
        """Require CHAP (and mutual CHAP when ``chap.mutual``) on ``target``, replacing any earlier credentials.
        Raises :class:`NotFound`."""
        target = _iqn(target)
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO chap VALUES (?, ?, ?, ?, ?)",
                (self._target_id(target), chap.user, chap.secret, chap.mutual_user, chap.mutual_secret),
            )

    def clear_chap(self, target: str) -> None:
        """Stop requiring CHAP. Raises :class:`NotFound` (target, or no CHAP set)."""
        target = _iqn(target)
        with self._tx() as db:
            if db.execute("DELETE FROM chap WHERE target_id = ?", (self._target_id(target),)).rowcount == 0:
                raise NotFound(f"target {target} has no CHAP credentials")

    def get_chap(self, target: str) -> ChapConfig | None:
        """The CHAP credentials of ``target``, None when it does not use CHAP. Raises :class:`NotFound`."""
        target = _iqn(target)
        with self._read():
            return self._chap(self._target_id(target))

    def _chap(self, target_id: int) -> ChapConfig | None:
        row = self._db.execute("SELECT * FROM chap WHERE target_id = ?", (target_id,)).fetchone()
        if row is None:
            return None
        return ChapConfig(row["user"], row["secret"], row["mutual_user"], row["mutual_secret"])

    # --- settings --------------------------------------------------------------------------------------------------

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            return default if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise Invalid("a setting needs a non-empty string key and a string value")
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    def delete_setting(self, key: str) -> bool:
        """Returns whether the key existed."""
        with self._tx() as db:
            return db.execute("DELETE FROM settings WHERE key = ?", (key,)).rowcount > 0

    # --- declarative -----------------------------------------------------------------------------------------------

    def export(self) -> Config:
        """The whole catalog as configuration, LUN identities included, so that applying it to an empty data dir
        rebuilds this one with the same identities."""
        with self._read():
            return Config(
                portal=self.get_portal(),
                luns=tuple(rec.config() for rec in self.list_luns()),
                targets=self.list_targets(),
                ceph=self.get_ceph(),
            )

    def apply(self, config: Config, *, dry_run: bool = False) -> Plan:
        """Make the catalog equal to ``config``: create, change and remove (this is declarative: what the config does
        not name is removed) portals, LUNs, targets, mappings, ACLs and CHAP, in one transaction. Applying the same
        config twice gives an empty plan the second time. With ``dry_run`` nothing is changed and the plan says what
        would be. Raises :class:`Invalid` (shrinking a LUN, changing its backend, path, block size, chunk size or
        identity)
        and the other catalog errors, having changed nothing."""
        steps: list[PlanStep] = []
        try:
            with self._tx():
                self._apply(config, steps, dry_run)
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass
        return Plan(tuple(steps), dry_run=dry_run)

    def _apply(self, config: Config, steps: list[PlanStep], dry_run: bool) -> None:
        current_luns = {rec.name: rec for rec in self.list_luns()}
        # Refuse impossible changes before touching anything, so the error names the first real problem.
        for want in config.luns:
            have = current_luns.get(want.name)
            if have is None:
                continue
            for attr in ("backend", "path", "block_size", "chunk_size_bytes", "naa", "serial"):
                wanted, held = getattr(want, attr), getattr(have, attr)
                if wanted is not None and wanted != held:
                    raise Invalid(
                        f"lun {want.name!r}: {attr} is fixed once the LUN exists ({held} in the catalog, {wanted} in "
                        "the configuration)"
                    )
            self._check_resize(have, want.size_bytes)

        portal = self.get_portal()
        if portal != config.portal:
            for attr in ("listen", "advertise", "nop_interval_s", "nop_timeout_s", "login_timeout_s", "max_sessions"):
                old, new = getattr(portal, attr), getattr(config.portal, attr)
                if old != new:
                    shown = (lambda v: "[" + ", ".join(v) + "]") if attr in ("listen", "advertise") else str
                    steps.append(PlanStep("~", "portal", attr, f"{shown(old)} -> {shown(new)}"))
            self.set_portal(config.portal)

        ceph = self.get_ceph()
        if ceph != config.ceph:
            for attr in ("conf_path", "keyring", "client", "connect_timeout_s", "op_timeout_s"):
                old, new = getattr(ceph, attr), getattr(config.ceph, attr)
                if old != new:
                    steps.append(PlanStep("~", "ceph", attr, f"{old or '-'} -> {new or '-'}"))
            self.set_ceph(config.ceph)

        wanted_targets = {t.iqn: t for t in config.targets}
        current_targets = self.list_targets()
        # Removals first, mappings before targets before LUNs, so nothing is removed while still referenced and a
        # renamed LUN can take over its predecessor's path and identity.
        for have_t in current_targets:
            want_t = wanted_targets.get(have_t.iqn)
            keep = set() if want_t is None else set(want_t.luns)
            for m in have_t.luns:
                if m not in keep:
                    steps.append(PlanStep("-", "map", have_t.iqn, f"lun {m.lun} -> {m.name}"))
                    self.unmap_lun(have_t.iqn, m.lun)
            if want_t is None:
                steps.append(PlanStep("-", "target", have_t.iqn))
                self.delete_target(have_t.iqn)
        wanted_luns = {lun.name for lun in config.luns}
        for name, rec in current_luns.items():
            if name not in wanted_luns:
                keepers = self._snapshots_keeping(rec.id)
                if keepers:
                    # Named here, not left to the foreign key: a dry run shows it as a step, a real apply is InUse.
                    why = f"kept by its snapshots ({', '.join(keepers)}): delete them first"
                    if not dry_run:
                        raise InUse(f"lun {name!r} cannot be removed: {why}")
                    steps.append(PlanStep("!", "lun", name, f"cannot be removed, {why}"))
                    continue
                steps.append(PlanStep("-", "lun", name))
                self.delete_lun(name)

        for want in config.luns:
            have = current_luns.get(want.name)
            if have is None:
                steps.append(PlanStep("+", "lun", want.name, _describe_lun(want)))
                self._insert_lun(want)
                continue
            if want.size_bytes != have.size_bytes:
                sizes = f"{format_size(have.size_bytes)} -> {format_size(want.size_bytes)}"
                steps.append(PlanStep("~", "lun", want.name, f"size {sizes}"))
                self.resize_lun(want.name, want.size_bytes)
            for attr in ("read_only", "thin"):
                old, new = getattr(have, attr), getattr(want, attr)
                if old != new:
                    steps.append(PlanStep("~", "lun", want.name, f"{attr} {_b(old)} -> {_b(new)}"))
                    self.update_lun(want.name, **{attr: new})

        current_by_iqn = {t.iqn: t for t in current_targets}
        for want_t in config.targets:
            have_t2 = current_by_iqn.get(want_t.iqn)
            if have_t2 is None:
                steps.append(PlanStep("+", "target", want_t.iqn, f"alias {want_t.alias!r}" if want_t.alias else ""))
                self.create_target(want_t.iqn, want_t.alias)
                have_t2 = TargetConfig(want_t.iqn, alias=want_t.alias)
            elif have_t2.alias != want_t.alias:
                steps.append(PlanStep("~", "target", want_t.iqn, f"alias {have_t2.alias!r} -> {want_t.alias!r}"))
                self.update_target(want_t.iqn, alias=want_t.alias)
            for initiator in have_t2.acl:
                if initiator not in want_t.acl:
                    steps.append(PlanStep("-", "acl", want_t.iqn, initiator))
                    self.remove_acl(want_t.iqn, initiator)
            for initiator in want_t.acl:
                if initiator not in have_t2.acl:
                    steps.append(PlanStep("+", "acl", want_t.iqn, initiator))
                    self.add_acl(want_t.iqn, initiator)
            if have_t2.chap != want_t.chap:
                if want_t.chap is None:
                    steps.append(PlanStep("-", "chap", want_t.iqn))
                    self.clear_chap(want_t.iqn)
                else:
                    steps.append(_chap_step(want_t.iqn, have_t2.chap, want_t.chap))
                    self.set_chap(want_t.iqn, want_t.chap)
            have_maps = set(have_t2.luns)
            for m in want_t.luns:
                if m not in have_maps:
                    steps.append(PlanStep("+", "map", want_t.iqn, f"lun {m.lun} -> {m.name}"))
                    self.map_lun(want_t.iqn, m.name, m.lun)

    # --- recovery sets -------------------------------------------------------------------------------------------

    def save_recovery_set(self, row: RecoverySetRow, pairs: Sequence[RecoveryPairRow]) -> None:
        """Write a recovery set and all its pairs in one transaction, replacing what was stored for it. Raises
        :class:`AlreadyExists` when a pair would make a second resync of one destination (the partial unique index
        holds that rule even if the caller's own check were bypassed)."""
        with self._tx() as db:
            db.execute(
                """INSERT INTO recovery_sets (id, state, options, error, hooks, created_at, updated_at, started_at,
                                              finished_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET state = excluded.state, options = excluded.options,
                       error = excluded.error, hooks = excluded.hooks, updated_at = excluded.updated_at,
                       started_at = excluded.started_at, finished_at = excluded.finished_at""",
                (row.id, row.state, row.options, row.error, row.hooks, row.created_at, row.updated_at,
                 row.started_at, row.finished_at),
            )
            db.execute("DELETE FROM recovery_pairs WHERE set_id = ?", (row.id,))
            db.executemany(
                """INSERT INTO recovery_pairs (set_id, position, snapshot, destination, new_lun, state, bytes_total,
                                               bytes_done, bytes_copied, redirected_reads, verified, error)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [(row.id, i, p.snapshot, p.destination, int(p.new_lun), p.state, p.bytes_total, p.bytes_done,
                  p.bytes_copied, p.redirected_reads, None if p.verified is None else int(p.verified), p.error)
                 for i, p in enumerate(pairs)],
            )

    def recovery_sets(self) -> list[tuple[RecoverySetRow, list[RecoveryPairRow]]]:
        """Every recovery set with its pairs in order, oldest set first."""
        with self._read() as db:
            sets = db.execute("SELECT * FROM recovery_sets ORDER BY created_at").fetchall()
            pairs: dict[str, list[RecoveryPairRow]] = {}
            for r in db.execute("SELECT * FROM recovery_pairs ORDER BY set_id, position"):
                pairs.setdefault(r["set_id"], []).append(RecoveryPairRow(
                    snapshot=r["snapshot"], destination=r["destination"], new_lun=bool(r["new_lun"]),
                    state=r["state"], bytes_total=r["bytes_total"], bytes_done=r["bytes_done"],
                    bytes_copied=r["bytes_copied"], redirected_reads=r["redirected_reads"],
                    verified=None if r["verified"] is None else bool(r["verified"]), error=r["error"]))
        return [(RecoverySetRow(
            id=r["id"], state=r["state"], options=r["options"], error=r["error"], hooks=r["hooks"],
            created_at=r["created_at"], updated_at=r["updated_at"], started_at=r["started_at"],
            finished_at=r["finished_at"]), pairs.get(r["id"], [])) for r in sets]

    # --- health ----------------------------------------------------------------------------------------------------

    def integrity_check(self) -> list[str]:
        """Problems found by SQLite's integrity and foreign-key checks, and rows the model rejects. Empty when
        healthy."""
        with self._read() as db:
            problems = [str(r[0]) for r in db.execute("PRAGMA integrity_check") if r[0] != "ok"]
            for table, rowid, parent, _ in db.execute("PRAGMA foreign_key_check"):
                problems.append(f"{table} row {rowid}: refers to a missing {parent} row")
            for row in db.execute("SELECT * FROM luns"):
                try:
                    _lun(row).config()
                except (ValueError, TypeError) as e:  # ConfigError is a ValueError
                    problems.append(f"luns row {row['id']}: {e}")
            return problems


def _lun(row: sqlite3.Row) -> LunRecord:
    return LunRecord(
        name=row["name"],
        path=row["path"],
        size_bytes=row["size_bytes"],
        block_size=row["block_size"],
        thin=bool(row["thin"]),
        read_only=bool(row["read_only"]),
        chunk_size_bytes=row["chunk_size_bytes"],
        naa=row["naa"],
        serial=row["serial"],
        backend=row["backend"],
        created_at=dt.datetime.fromisoformat(row["created_at"]),
        id=row["id"],
        owns_file=bool(row["owns_file"]),
        labels=json.loads(row["labels"]),
    )


def valid_labels(what: str, labels: dict[str, str]) -> dict[str, str]:
    """``labels`` checked (sorted by key), or :class:`Invalid` naming ``what`` and the bad key or value."""
    try:
        checked: dict[str, str] = check_labels(labels)
        return checked
    except ConfigError as e:
        raise Invalid(f"{what}: {e.message}") from None


def relabel(what: str, have: dict[str, str], set_: dict[str, str], remove: Sequence[str]) -> dict[str, str]:
    """``have`` with ``set_`` set and the keys ``remove`` removed, checked; a key both set and removed is
    :class:`Invalid` (which was meant?)."""
    both = sorted(set(set_) & set(remove))
    if both:
        raise Invalid(f"{what}: label {', '.join(both)} is both set and removed")
    labels = {k: v for k, v in {**have, **set_}.items() if k not in remove}
    return valid_labels(what, labels)


# SQLite's primary result codes that mean the file system under the database failed, not the request.
_STORAGE_FAULTS = ("SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_FULL", "SQLITE_CANTOPEN")


def _is_storage_fault(e: sqlite3.OperationalError) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    return name.startswith(_STORAGE_FAULTS)


def probe_writable(directory: str, existing: str) -> OSError | None:
    """The OS error that keeps ``directory`` from taking a durable write, or None when it takes one now.

    Three probes, in the order a failure explains the others: reopen ``existing`` for writing (EROFS, EACCES),
    write and fsync a new page-sized file (ENOSPC, EDQUOT, EIO), and read the first page of ``existing`` (EIO)."""
    probe = os.path.join(directory, f".probe-{os.getpid()}")
    where = existing
    try:
        os.close(os.open(existing, os.O_RDWR | os.O_CLOEXEC))
        where = directory
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
        where = existing
        fd = os.open(existing, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
    except OSError as e:
        e.filename = where  # the probe file's own name would only confuse
        return e
    return None


def _translate(e: sqlite3.IntegrityError) -> CatalogError:
    """The constraints back up the explicit checks; if one still fires, say which family it belongs to."""
    text = str(e)
    if "FOREIGN KEY" in text:
        return InUse(f"still referenced: {text}")
    if "UNIQUE" in text or "PRIMARY KEY" in text:
        return AlreadyExists(text)
    return Invalid(text)


def _b(value: bool) -> str:
    return "true" if value else "false"


def _describe_lun(lun: LunConfig) -> str:
    extras = []
    if lun.backend != "file":
        extras.append(f"{lun.backend} backend")
    if not lun.thin:
        extras.append("thick")
    if lun.read_only:
        extras.append("read-only")
    if lun.block_size != 512:
        extras.append(f"block_size {lun.block_size}")
    if lun.path != default_lun_path(lun.name):
        extras.append(f"at {lun.path}")
    size: str = format_size(lun.size_bytes)
    return size + (f" ({', '.join(extras)})" if extras else "")


def _chap_step(iqn: str, old: ChapConfig | None, new: ChapConfig) -> PlanStep:
    mutual = " (mutual)" if new.mutual else ""
    if old is None:
        return PlanStep("+", "chap", iqn, f"user {new.user}{mutual}")
    changes = []
    if old.user != new.user:
        changes.append(f"user {old.user} -> {new.user}")
    if old.secret != new.secret:
        changes.append("secret changed")  # never print a secret, not even in a dry run
    if old.mutual_user != new.mutual_user:
        changes.append(f"mutual_user {old.mutual_user or '-'} -> {new.mutual_user or '-'}")
    if old.mutual_secret != new.mutual_secret and new.mutual_secret is not None and old.mutual_secret is not None:
        changes.append("mutual_secret changed")
    return PlanStep("~", "chap", iqn, ", ".join(changes))
