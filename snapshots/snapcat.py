"""The catalog side of snapshots: pools, snapshots, snapshot sets and exposures, as catalog transactions.

This module owns the queries on the tables that migration 2 of :mod:`lunsync.snapshots.catalog` creates, and the
rules they enforce: names (``LUN@SNAP``, no path separators), one pool per LUN for its copy-on-write area while it has
differential snapshots, epochs that only grow per LUN, an identity (NAA, serial) per snapshot minted once at creation
so that an exposed snapshot shows the same VPD 0x80/0x83 every time, no deleting an exposed snapshot, LUN numbers
shared between mappings and exposures, and a clone outliving its origin only once it is filled. Every public
mutating method is one transaction through :meth:`Catalog.transaction`, so the chunk maps (in the pools) are the only
snapshot state outside the catalog.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lunsync.snapshots.catalog import (
    AlreadyExists,
    Catalog,
    InUse,
    Invalid,
    NotFound,
    new_identity,
    relabel,
    valid_labels,
)
from lunsync.snapshots.model import MAX_LUN_NUMBER, LunIdentity, rfc3339

__all__ = ["DEFAULT_POOL", "FlattenRecord", "Kind", "PoolRecord", "SnapshotCatalog", "SnapshotPlan", "SnapshotRecord",
           "parse_snapshot_name", "validate_name"]

DEFAULT_POOL = "default"
DEFAULT_POOL_PATH = "pool"  # inside the data dir
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# What a snapshot is: lunsync's copy-on-write ("differential"), lunsync's full copy ("clone"), or a snapshot its
# LUN's store keeps itself ("rbd": an RBD snapshot, for which lunsync's pools hold nothing).
Kind = Literal["differential", "clone", "rbd"]


def validate_name(what: str, name: str) -> str:
    """1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit: never a path."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise Invalid(f"{what} name {name!r} must be 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter "
                      "or digit")
    return name


def parse_snapshot_name(text: str) -> tuple[str, str]:
    """``LUN@SNAP`` -> (lun, snap), both validated."""
    lun, sep, snap = text.partition("@")
    if not sep:
        raise Invalid(f"{text!r} is not LUN@SNAP")
    return validate_name("lun", lun), validate_name("snapshot", snap)


def _now() -> str:
    return rfc3339(time.time())


@dataclass(frozen=True, slots=True)
class PoolRecord:
    id: int
    name: str
    path: str  # absolute
    capacity_bytes: int | None
    created_at: str


@dataclass(frozen=True, slots=True)
class SnapshotPlan:
    """A snapshot about to be taken: checked against the catalog, not yet recorded."""

    lun_id: int
    lun_name: str
    name: str
    pool: PoolRecord
    last_epoch: int  # the LUN's newest committed epoch (0: none yet)


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    id: int
    lun_id: int | None  # None once the origin is gone (a filled clone)
    lun_name: str
    name: str
    kind: Kind
    state: Literal["valid", "invalid"]
    invalid_reason: str | None
    epoch: int
    pool_id: int
    pool: str
    set_name: str | None
    size_bytes: int
    block_size: int
    chunk_size_bytes: int
    filled_chunks: int
    filled: bool
    naa: str
    serial: str
    created_at: str
    exposed_target: str | None
    exposed_lun: int | None
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # a dict: equality, not the hash

    @property
    def full_name(self) -> str:
        return f"{self.lun_name}@{self.name}"

    @property
    def identity(self) -> LunIdentity:
        return LunIdentity(naa=bytes.fromhex(self.naa), serial=self.serial)

    @property
    def total_chunks(self) -> int:
        return -(-self.size_bytes // self.chunk_size_bytes)

    @property
    def needs_cow(self) -> bool:
        """Whether the origin must still preserve for it: valid, and not a clone that is complete."""
        return (self.state == "valid" and self.lun_id is not None and self.kind != "rbd"
                and not (self.kind == "clone" and self.filled))


_SNAP_SELECT = """
    SELECT s.*, p.name AS pool_name, ss.name AS set_name, t.iqn AS exposed_target, e.lun AS exposed_lun
    FROM snapshots s JOIN pools p ON p.id = s.pool_id
    LEFT JOIN snapshot_sets ss ON ss.id = s.set_id
    LEFT JOIN snapshot_exposures e ON e.snapshot_id = s.id
    LEFT JOIN targets t ON t.id = e.target_id
"""


@dataclass(frozen=True, slots=True)
class FlattenRecord:
    """A LUN's latest flatten as the catalog holds it (:meth:`SnapshotCatalog.record_flatten`)."""

    lun: str
    state: str  # running, stopped, done, failed
    started_at: float
    finished_at: float | None
    done: int
    total: int
    error: str | None


def _names(n: int) -> str:
    """``n`` (LUN, snapshot) name pairs as parameters, joined to ``snapshots s`` through its unique index."""
    return (f"(VALUES {', '.join(['(?, ?)'] * n)}) v "
            "JOIN snapshots s ON s.lun_name = v.column1 AND s.name = v.column2")


def _snap(row: sqlite3.Row) -> SnapshotRecord:
    return SnapshotRecord(
        id=row["id"], lun_id=row["lun_id"], lun_name=row["lun_name"], name=row["name"], kind=row["kind"],
        state=row["state"], invalid_reason=row["invalid_reason"], epoch=row["epoch"], pool_id=row["pool_id"],
        pool=row["pool_name"], set_name=row["set_name"], size_bytes=row["size_bytes"], block_size=row["block_size"],
        chunk_size_bytes=row["chunk_size_bytes"], filled_chunks=row["filled_chunks"], filled=bool(row["filled"]),
        naa=row["naa"], serial=row["serial"], created_at=row["created_at"], exposed_target=row["exposed_target"],
        exposed_lun=row["exposed_lun"], labels=json.loads(row["labels"]),
    )


class SnapshotCatalog:
    """Snapshot, pool, set and exposure records in one data dir's catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def _resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.catalog.data_dir, path))

    # --- pools -----------------------------------------------------------------------------------------------------

    def _pool(self, row: sqlite3.Row) -> PoolRecord:
        return PoolRecord(row["id"], row["name"], self._resolve(row["path"]), row["capacity_bytes"],
                          row["created_at"])

    def ensure_default_pool(self) -> PoolRecord:
        with self.catalog.transaction() as db:
            row = db.execute("SELECT * FROM pools WHERE name = ?", (DEFAULT_POOL,)).fetchone()
            if row is None:
                return self.create_pool(DEFAULT_POOL, DEFAULT_POOL_PATH)
            return self._pool(row)

    def create_pool(self, name: str, path: str, capacity_bytes: int | None = None) -> PoolRecord:
        """Register a pool directory (relative paths are inside the data dir). Raises AlreadyExists, Invalid."""
        validate_name("pool", name)
        if not isinstance(path, str) or not path or "\0" in path:
            raise Invalid("a pool needs a directory path")
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise Invalid("pool capacity must be positive")
        if not os.path.isabs(path) and ".." in path.replace("\\", "/").split("/"):
            # A relative path is inside the data dir by contract; '..' would let it reach anywhere.
            raise Invalid(f"a relative pool path may not contain '..': {path!r} (use an absolute path)")
        where = self._resolve(path)
        data = os.path.realpath(self.catalog.data_dir)
        real = os.path.realpath(where)
        luns = os.path.join(data, "luns")
        if real == data or real == luns or real.startswith(luns + os.sep):
            raise Invalid(f"pool path {where} would mix pool files with the data dir's own files")
        with self.catalog.transaction() as db:
            if db.execute("SELECT 1 FROM pools WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"pool {name!r} already exists")
            for other in db.execute("SELECT name, path FROM pools"):
                if self._resolve(other["path"]) == where:
                    raise AlreadyExists(f"pool path {where} is already used by pool {other['name']!r}")
            db.execute("INSERT INTO pools (name, path, capacity_bytes, created_at) VALUES (?, ?, ?, ?)",
                       (name, path, capacity_bytes, _now()))
            return self.get_pool(name)

    def forget_pool(self, pool_id: int) -> None:
        """Drop a pool's record that nothing uses yet (a pool whose directory turned out unusable just after
        :meth:`create_pool`). Raises InUse while a LUN keeps snapshots in it."""
        with self.catalog.transaction() as db:
            db.execute("DELETE FROM pools WHERE id = ?", (pool_id,))

    def delete_pool(self, name: str) -> PoolRecord:
        """Drop a pool's record. Raises NotFound, and InUse (naming the users) while a snapshot lives in it or a LUN
        keeps its copies there, or for the default pool, which every LUN without a pool of its own falls back on."""
        with self.catalog.transaction() as db:
            rec = self.get_pool(name)
            if name == DEFAULT_POOL:
                raise InUse(f"pool {name!r} is the default pool: LUNs without a pool of their own use it")
            snaps = [f"{r[0]}@{r[1]}" for r in db.execute(
                "SELECT lun_name, name FROM snapshots WHERE pool_id = ? ORDER BY lun_name, name", (rec.id,))]
            luns = [r[0] for r in db.execute(
                "SELECT l.name FROM cow_volumes c JOIN luns l ON l.id = c.lun_id WHERE c.pool_id = ? ORDER BY l.name",
                (rec.id,))]
            if snaps or luns:
                users = ([f"snapshots {', '.join(snaps[:5])}" + (" ..." if len(snaps) > 5 else "")] if snaps else []) \
                    + ([f"LUNs {', '.join(luns[:5])}" + (" ..." if len(luns) > 5 else "")] if luns else [])
                raise InUse(f"pool {name!r} is still used by {' and '.join(users)}")
            db.execute("DELETE FROM pools WHERE id = ?", (rec.id,))
            return rec

    def swap_identity(self, lun_name: str, snap_id: int) -> None:
        """Exchange the NAA designator and serial of a LUN and one of its snapshots, in one transaction (a LUN swap
        that keeps the host's view of which disk is which). Raises NotFound."""
        with self.catalog.transaction() as db:
            lun = db.execute("SELECT id, naa, serial FROM luns WHERE name = ?", (lun_name,)).fetchone()
            snap = db.execute("SELECT naa, serial FROM snapshots WHERE id = ?", (snap_id,)).fetchone()
            if lun is None or snap is None:
                raise NotFound(f"lun {lun_name!r} or snapshot {snap_id} does not exist")
            db.execute("UPDATE luns SET naa = ?, serial = ? WHERE id = ?", (snap["naa"], snap["serial"], lun["id"]))
            db.execute("UPDATE snapshots SET naa = ?, serial = ? WHERE id = ?", (lun["naa"], lun["serial"], snap_id))

    def get_pool(self, name: str) -> PoolRecord:
        with self.catalog.transaction(write=False) as db:
            row = db.execute("SELECT * FROM pools WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"pool {name!r} does not exist")
            return self._pool(row)

    def list_pools(self) -> list[PoolRecord]:
        with self.catalog.transaction(write=False) as db:
            return [self._pool(r) for r in db.execute("SELECT * FROM pools ORDER BY id")]

    def volume_pool(self, lun_id: int) -> PoolRecord | None:
        """The pool holding ``lun_id``'s copy-on-write area, if it has one."""
        with self.catalog.transaction(write=False) as db:
            row = db.execute("SELECT p.* FROM cow_volumes v JOIN pools p ON p.id = v.pool_id WHERE v.lun_id = ?",
                             (lun_id,)).fetchone()
            return None if row is None else self._pool(row)

    # --- snapshots -------------------------------------------------------------------------------------------------

    def _check_specs(self, db: sqlite3.Connection, specs: Sequence[tuple[str, str]], kind: Kind, pool: str | None,
                     set_name: str | None) -> list[tuple[sqlite3.Row, sqlite3.Row]]:
        """Every rule a new snapshot (set) must pass, read-only: ``(lun, pool)`` per spec, the LUN's row carrying its
        copy-on-write record as ``cow_pool_id`` and ``last_epoch`` (NULL without one). A handful of queries for the
        whole set, not a few per member: it runs on the daemon's event loop, before writes are held."""
        if kind not in ("differential", "clone"):
            raise Invalid(f"kind must be differential or clone, not {kind!r}")
        if not specs:
            raise Invalid("name at least one LUN@SNAP")
        luns = [lun for lun, _ in specs]
        if len(set(luns)) != len(luns):
            raise Invalid("a set takes each LUN once")
        if set_name is not None:
            validate_name("set", set_name)
            if db.execute("SELECT 1 FROM snapshot_sets WHERE name = ?", (set_name,)).fetchone():
                raise AlreadyExists(f"snapshot set {set_name!r} already exists")
        marks = ", ".join("?" * len(luns))
        rows = {r["name"]: r for r in db.execute(
            "SELECT l.*, v.pool_id AS cow_pool_id, v.last_epoch AS last_epoch FROM luns l "
            f"LEFT JOIN cow_volumes v ON v.lun_id = l.id WHERE l.name IN ({marks})", luns)}
        taken = {(r[0], r[1]) for r in db.execute(
            "SELECT s.lun_name, s.name FROM " + _names(len(specs)), [x for spec in specs for x in spec])}
        pools = db.execute("SELECT * FROM pools").fetchall()
        by_id = {p["id"]: p for p in pools}
        by_name = {p["name"]: p for p in pools}
        out = []
        for lun_name, snap_name in specs:
            validate_name("lun", lun_name)
            validate_name("snapshot", snap_name)
            lun = rows.get(lun_name)
            if lun is None:
                raise NotFound(f"lun {lun_name!r} does not exist")
            if (lun_name, snap_name) in taken:
                raise AlreadyExists(f"snapshot {lun_name}@{snap_name} already exists")
            name = pool if pool is not None else None if lun["cow_pool_id"] is not None else DEFAULT_POOL
            prow = by_id[lun["cow_pool_id"]] if name is None else by_name.get(name)
            if prow is None:
                raise NotFound(f"pool {name!r} does not exist")
            if lun["cow_pool_id"] is not None and lun["cow_pool_id"] != prow["id"]:
                live = db.execute("SELECT count(*) FROM snapshots WHERE lun_id = ?", (lun["id"],)).fetchone()[0]
                if live:
                    raise Invalid(f"lun {lun_name!r} keeps its copy-on-write area in another pool while it has "
                                  "snapshots there; delete them or use that pool")
            out.append((lun, prow))
        return out

    def plan_snapshots(self, specs: Sequence[tuple[str, str]], kind: Kind, pool: str | None,
                       set_name: str | None) -> list[SnapshotPlan]:
        """What :meth:`record_snapshots` would record, checked without writing: each LUN, the pool its copies go to
        and its newest committed epoch. Raises NotFound, AlreadyExists, Invalid."""
        with self.catalog.transaction(write=False) as db:
            return [SnapshotPlan(lun["id"], lun["name"], snap, self._pool(prow), lun["last_epoch"] or 0)
                    for (lun, prow), (_, snap) in zip(self._check_specs(db, specs, kind, pool, set_name), specs,
                                                      strict=True)]

    def record_snapshots(self, plans: Sequence[SnapshotPlan], kind: Kind | Sequence[Kind], set_name: str | None,
                         epochs: Sequence[int], hold_ms: float | None = None,
                         labels: dict[str, str] | None = None) -> None:
        """Record the snapshots :meth:`plan_snapshots` planned, with the epochs the daemon chose, in one
        transaction (the point in time of a set), with the set's hold time when there is a set. Durable when this
        returns. Raises AlreadyExists, NotFound, Invalid; nothing is recorded then. ``kind`` is one for every member, or
        one per plan (a set mixing LUNs whose stores keep their own snapshots with lunsync's).

        Writes only, one statement per table: the daemon commits in a thread that must win the GIL back after every
        SQLite call, and under I/O load each such wait can cost milliseconds. The rules the plan checked are not
        read again (the daemon plans and records under its snapshot lock, so no other snapshot is taken or deleted
        in between); what can still change underneath is caught here: a name taken meanwhile by the constraints
        (AlreadyExists), a LUN deleted or renamed by the join on its id and name (NotFound), and an epoch that is
        not newer than the LUN's last by the guarded upsert (Invalid)."""
        if len(epochs) != len(plans):
            raise Invalid("one epoch per snapshot")
        if not plans:
            raise Invalid("name at least one LUN@SNAP")
        n = len(plans)
        kinds = [kind] * n if isinstance(kind, str) else list(kind)
        if len(kinds) != n:
            raise Invalid("one kind per snapshot")
        now = _now()
        tags = json.dumps(valid_labels("snapshot", labels or {}))
        with self.catalog.transaction() as db:
            set_id = None
            if set_name is not None:
                set_id = db.execute("INSERT INTO snapshot_sets (name, hold_ms, created_at) VALUES (?, ?, ?)",
                                    (set_name, hold_ms, now)).lastrowid
            rows: list[object] = []
            for plan, epoch, k in zip(plans, epochs, kinds, strict=True):
                rows += [plan.lun_id, plan.lun_name, plan.name, epoch, plan.pool.id, k, *new_identity()]
            made = db.execute(
                """INSERT INTO snapshots (lun_id, lun_name, name, kind, state, epoch, pool_id, set_id, size_bytes,
                                          block_size, chunk_size_bytes, naa, serial, created_at, labels)
                   SELECT l.id, l.name, v.column3, v.column6, 'valid', v.column4, v.column5, ?, l.size_bytes,
                          l.block_size, l.chunk_size_bytes, v.column7, v.column8, ?, ?
                   FROM (VALUES """ + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n) + """) v
                   JOIN luns l ON l.id = v.column1 AND l.name = v.column2""",
                [set_id, now, tags, *rows]).rowcount
            if made != n:
                raise NotFound("a LUN of the set was deleted or renamed while the snapshots were being taken")
            bumped = db.execute(
                "INSERT INTO cow_volumes (lun_id, pool_id, last_epoch) VALUES " + ", ".join(["(?, ?, ?)"] * n)
                + " ON CONFLICT (lun_id) DO UPDATE SET pool_id = excluded.pool_id, last_epoch = excluded.last_epoch "
                  "WHERE last_epoch < excluded.last_epoch",
                [x for plan, epoch in zip(plans, epochs, strict=True) for x in (plan.lun_id, plan.pool.id, epoch)],
            ).rowcount
            if bumped != n:
                raise Invalid("an epoch of the set is not newer than its LUN's last snapshot")

    def get_snapshots(self, names: Sequence[tuple[str, str]]) -> list[SnapshotRecord]:
        """The snapshots ``(lun, snap)``, in that order, in one query. Raises NotFound."""
        with self.catalog.transaction(write=False) as db:
            found = {(r.lun_name, r.name): r for r in map(_snap, db.execute(
                _SNAP_SELECT + " WHERE s.id IN (SELECT s.id FROM " + _names(len(names)) + ")",
                [x for pair in names for x in pair]))}
        missing = [f"{a}@{b}" for a, b in names if (a, b) not in found]
        if missing:
            raise NotFound(f"snapshot {', '.join(missing)} does not exist")
        return [found[pair] for pair in names]

    def get_snapshot(self, lun: str, name: str) -> SnapshotRecord:
        with self.catalog.transaction(write=False) as db:
            r = db.execute(_SNAP_SELECT + " WHERE s.lun_name = ? AND s.name = ?", (lun, name)).fetchone()
            if r is None:
                raise NotFound(f"snapshot {lun}@{name} does not exist")
            return _snap(r)

    def list_snapshots(self, lun: str | None = None) -> list[SnapshotRecord]:
        with self.catalog.transaction(write=False) as db:
            if lun is None:
                rows = db.execute(_SNAP_SELECT + " ORDER BY s.lun_name, s.epoch")
            else:
                rows = db.execute(_SNAP_SELECT + " WHERE s.lun_name = ? ORDER BY s.epoch", (lun,))
            return [_snap(r) for r in rows]

    def label_snapshot(self, lun: str, name: str, set_: dict[str, str], remove: Sequence[str] = ()
                       ) -> SnapshotRecord:
        """Set and remove labels on a snapshot (see :meth:`Catalog.label_lun`): labels are no part of the snapshot's
        contents, which stay as they are. Raises NotFound, Invalid."""
        with self.catalog.transaction() as db:
            rec = self.get_snapshot(lun, name)
            labels = relabel(f"snapshot {rec.full_name}", rec.labels, set_, remove)
            db.execute("UPDATE snapshots SET labels = ? WHERE id = ?", (json.dumps(labels), rec.id))
            return self.get_snapshot(lun, name)

    def delete_snapshot(self, lun: str, name: str) -> SnapshotRecord:
        """Forget a snapshot; refused (InUse) while it is exposed."""
        with self.catalog.transaction() as db:
            rec = self.get_snapshot(lun, name)
            if rec.exposed_target is not None:
                raise InUse(f"snapshot {rec.full_name} is exposed on {rec.exposed_target} as LUN {rec.exposed_lun}; "
                            "unexpose it first")
            db.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
            # A set whose last member is gone goes too.
            db.execute("DELETE FROM snapshot_sets WHERE id NOT IN (SELECT set_id FROM snapshots WHERE set_id IS NOT "
                       "NULL)")
            return rec

    def mark_invalid(self, lun_id: int, epochs: Sequence[int], reason: str) -> None:
        with self.catalog.transaction() as db:
            db.executemany("UPDATE snapshots SET state = 'invalid', invalid_reason = ? WHERE lun_id = ? AND epoch = ?",
                           [(reason[:500], lun_id, e) for e in epochs])

    def set_fill(self, snap_id: int, filled_chunks: int, filled: bool) -> None:
        with self.catalog.transaction() as db:
            db.execute("UPDATE snapshots SET filled_chunks = ?, filled = ? WHERE id = ?",
                       (filled_chunks, int(filled), snap_id))

    def record_flatten(self, lun_name: str, state: str, started_at: float, *, finished_at: float | None = None,
                       done: int = 0, total: int = 0, error: str | None = None) -> None:
        """Record LUN ``lun_name``'s latest flatten (replacing the one before): ``running`` from its start until it
        ends ``done``, ``failed`` or ``stopped`` (its device closed first); a LUN deleted meanwhile takes its row
        with it."""
        with self.catalog.transaction() as db:
            db.execute("""INSERT OR REPLACE INTO flatten_jobs
                          (lun_id, state, started_at, finished_at, objects_done, objects_total, error)
                          SELECT id, ?, ?, ?, ?, ?, ? FROM luns WHERE name = ?""",
                       (state, started_at, finished_at, done, total, error, lun_name))

    def flatten_jobs(self) -> list[FlattenRecord]:
        """Every LUN's latest flatten, as last recorded."""
        with self.catalog.transaction(write=False) as db:
            rows = db.execute("""SELECT l.name, f.state, f.started_at, f.finished_at, f.objects_done, f.objects_total,
                                        f.error FROM flatten_jobs f JOIN luns l ON l.id = f.lun_id ORDER BY l.name""")
            return [FlattenRecord(*r) for r in rows.fetchall()]

    def release_origin(self, lun_name: str) -> list[SnapshotRecord]:
        """Before the LUN ``lun_name`` is deleted: detach its filled clones (they no longer need it) and drop its
        copy-on-write record. Refused (InUse) while any other snapshot of it exists."""
        with self.catalog.transaction() as db:
            lun = db.execute("SELECT id FROM luns WHERE name = ?", (lun_name,)).fetchone()
            if lun is None:
                raise NotFound(f"lun {lun_name!r} does not exist")
            snaps = [s for s in self.list_snapshots(lun_name) if s.lun_id == lun["id"]]
            blocking = [s.full_name for s in snaps if not (s.kind == "clone" and s.filled)]
            if blocking:
                raise InUse(f"lun {lun_name!r} still has snapshots that depend on it ({', '.join(blocking)}); "
                            "delete them first")
            db.execute("UPDATE snapshots SET lun_id = NULL WHERE lun_id = ?", (lun["id"],))
            db.execute("DELETE FROM cow_volumes WHERE lun_id = ?", (lun["id"],))
            return snaps

    # --- exposures -------------------------------------------------------------------------------------------------

    def expose(self, lun: str, name: str, target: str, number: int | None = None) -> SnapshotRecord:
        """Show a snapshot on ``target`` as LUN ``number`` (the lowest number free of LUNs and snapshots when None).
        Raises NotFound, AlreadyExists, InUse, Invalid (an invalid snapshot)."""
        if number is not None and not 0 <= number <= MAX_LUN_NUMBER:
            raise Invalid(f"LUN number {number} outside 0..{MAX_LUN_NUMBER}")
        with self.catalog.transaction() as db:
            rec = self.get_snapshot(lun, name)
            if rec.state != "valid":
                raise Invalid(f"snapshot {rec.full_name} is invalid ({rec.invalid_reason}); it cannot be exposed")
            if rec.exposed_target is not None:
                raise AlreadyExists(f"snapshot {rec.full_name} is already exposed on {rec.exposed_target} as LUN "
                                    f"{rec.exposed_lun}")
            iqn = self.catalog.get_target(target).iqn
            tid = db.execute("SELECT id FROM targets WHERE iqn = ?", (iqn,)).fetchone()[0]
            used = {r[0] for r in db.execute("SELECT lun FROM mappings WHERE target_id = ? UNION "
                                             "SELECT lun FROM snapshot_exposures WHERE target_id = ?", (tid, tid))}
            if number is None:
                number = next((n for n in range(MAX_LUN_NUMBER + 1) if n not in used), None)
                if number is None:
                    raise InUse(f"target {iqn} has no free LUN number")
            elif number in used:
                raise AlreadyExists(f"LUN {number} of {iqn} is already taken")
            db.execute("INSERT INTO snapshot_exposures VALUES (?, ?, ?)", (rec.id, tid, number))
            return self.get_snapshot(lun, name)

    def unexpose(self, lun: str, name: str) -> SnapshotRecord:
        """Stop showing a snapshot; returns it as it was (with its target and LUN number)."""
        with self.catalog.transaction() as db:
            rec = self.get_snapshot(lun, name)
            if rec.exposed_target is None:
                raise NotFound(f"snapshot {rec.full_name} is not exposed")
            db.execute("DELETE FROM snapshot_exposures WHERE snapshot_id = ?", (rec.id,))
            return rec

    def exposures_on(self, target: str) -> list[SnapshotRecord]:
        with self.catalog.transaction(write=False) as db:
            rows = db.execute(_SNAP_SELECT + " WHERE t.iqn = ? ORDER BY e.lun", (target,))
            return [_snap(r) for r in rows]
