"""Recovery sets in the catalog: a :class:`~lunsync.provider.vss.RecoverySet` as the catalog's recovery rows.

This module owns how a recovery set maps onto :class:`~lunsync.snapshots.catalog.RecoverySetRow` and
:class:`~lunsync.snapshots.catalog.RecoveryPairRow` and back; the SQL is the catalog's (migration 3 and
:meth:`~lunsync.snapshots.catalog.Catalog.save_recovery_set`). Each save is one catalog transaction, so a set and its
pairs never disagree after a crash; the partial unique index on resyncing destinations makes the catalog refuse a
second resync of one destination even if the in-memory check were bypassed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lunsync.provider.vss import Options, Pair, RecoverySet, RecoveryState, VssCode, VssError
from lunsync.snapshots.catalog import AlreadyExists, Catalog, RecoveryPairRow, RecoverySetRow


class CatalogRecoveryStore:
    """:class:`~lunsync.provider.vss.RecoveryStore` over the daemon's catalog."""

    def __init__(self, catalog: Catalog, keep: Callable[[RecoverySet], bool] | None = None) -> None:
        self.catalog = catalog
        # A worker of ``serve --workers`` loads only the sets whose destinations it serves: the others are another
        # worker's to resume (or to fail, if they were caught in pre-restore).
        self.keep = keep

    def save(self, rs: RecoverySet) -> None:
        row = RecoverySetRow(rs.id, rs.state.value, json.dumps(rs.options.as_dict()), rs.error,
                             json.dumps(rs.hooks_run), rs.created_at, rs.updated_at, rs.started_at, rs.finished_at)
        pairs = [RecoveryPairRow(p.snapshot, p.destination, p.new_lun, p.state, p.bytes_total, p.bytes_done,
                                 p.bytes_copied, p.redirected_reads, p.verified, p.error) for p in rs.pairs]
        try:
            self.catalog.save_recovery_set(row, pairs)
        except AlreadyExists as e:
            raise VssError(VssCode.RESYNC_IN_PROGRESS, f"a destination of recovery set {rs.id} is already being "
                                                       f"resynced ({e})") from None

    def load_all(self) -> list[RecoverySet]:
        out = []
        for row, pairs in self.catalog.recovery_sets():
            options: dict[str, Any] = json.loads(row.options)
            out.append(RecoverySet(
                id=row.id, state=RecoveryState(row.state), options=Options.from_dict(options), error=row.error,
                hooks_run=json.loads(row.hooks), created_at=row.created_at, updated_at=row.updated_at,
                started_at=row.started_at, finished_at=row.finished_at,
                pairs=[Pair(snapshot=p.snapshot, destination=p.destination, new_lun=p.new_lun, state=p.state,
                            bytes_total=p.bytes_total, bytes_done=p.bytes_done, bytes_copied=p.bytes_copied,
                            redirected_reads=p.redirected_reads, verified=p.verified, error=p.error)
                       for p in pairs]))
        return [rs for rs in out if self.keep is None or self.keep(rs)]
