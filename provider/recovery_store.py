"""Recovery sets in the catalog: the queries over the ``recovery_sets`` and ``recovery_pairs`` tables.

This module owns how a :class:`~lunsync.provider.vss.RecoverySet` is written to and read back from the catalog (the
schema is migration 3 in :mod:`lunsync.snapshots.catalog`). Each save is one catalog transaction, so a set and its
pairs never disagree after a crash; the partial unique index on resyncing destinations makes the catalog refuse a
second resync of one destination even if the in-memory check were bypassed.
"""

from __future__ import annotations

import json
from typing import Any

from lunsync.provider.vss import Options, Pair, RecoverySet, RecoveryState, VssCode, VssError
from lunsync.snapshots.catalog import AlreadyExists, Catalog


class CatalogRecoveryStore:
    """:class:`~lunsync.provider.vss.RecoveryStore` over the daemon's catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def save(self, rs: RecoverySet) -> None:
        try:
            with self.catalog.transaction() as db:
                db.execute(
                    """INSERT INTO recovery_sets (id, state, options, error, hooks, created_at, updated_at, started_at,
                                                  finished_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(id) DO UPDATE SET state = excluded.state, options = excluded.options,
                           error = excluded.error, hooks = excluded.hooks, updated_at = excluded.updated_at,
                           started_at = excluded.started_at, finished_at = excluded.finished_at""",
                    (rs.id, rs.state.value, json.dumps(rs.options.as_dict()), rs.error, json.dumps(rs.hooks_run),
                     rs.created_at, rs.updated_at, rs.started_at, rs.finished_at),
                )
                db.execute("DELETE FROM recovery_pairs WHERE set_id = ?", (rs.id,))
                db.executemany(
                    """INSERT INTO recovery_pairs (set_id, position, snapshot, destination, new_lun, state, bytes_total,
                                                   bytes_done, bytes_copied, redirected_reads, verified, error)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [(rs.id, i, p.snapshot, p.destination, int(p.new_lun), p.state, p.bytes_total, p.bytes_done,
                      p.bytes_copied, p.redirected_reads, None if p.verified is None else int(p.verified), p.error)
                     for i, p in enumerate(rs.pairs)],
                )
        except AlreadyExists as e:
            raise VssError(VssCode.RESYNC_IN_PROGRESS, f"a destination of recovery set {rs.id} is already being "
                                                       f"resynced ({e})") from None

    def load_all(self) -> list[RecoverySet]:
        with self.catalog.transaction(write=False) as db:
            sets = db.execute("SELECT * FROM recovery_sets ORDER BY created_at").fetchall()
            pairs: dict[str, list[Pair]] = {}
            for row in db.execute("SELECT * FROM recovery_pairs ORDER BY set_id, position"):
                pairs.setdefault(row["set_id"], []).append(Pair(
                    snapshot=row["snapshot"], destination=row["destination"], new_lun=bool(row["new_lun"]),
                    state=row["state"], bytes_total=row["bytes_total"], bytes_done=row["bytes_done"],
                    bytes_copied=row["bytes_copied"], redirected_reads=row["redirected_reads"],
                    verified=None if row["verified"] is None else bool(row["verified"]), error=row["error"]))
        out = []
        for row in sets:
            options: dict[str, Any] = json.loads(row["options"])
            out.append(RecoverySet(
                id=row["id"], state=RecoveryState(row["state"]), pairs=pairs.get(row["id"], []),
                options=Options.from_dict(options), error=row["error"], hooks_run=json.loads(row["hooks"]),
                created_at=row["created_at"], updated_at=row["updated_at"], started_at=row["started_at"],
                finished_at=row["finished_at"]))
        return out
