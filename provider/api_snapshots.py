"""The snapshot part of the management API: pools, snapshots, snapshot sets and exposures under ``/v1``.

This module owns the routes, request and response models of ``/v1/pools`` and ``/v1/snapshots`` and is mounted by
:func:`lunsync.provider.api.create_app`. Snapshots are addressed as one path segment ``LUN@SNAP``. Every change goes
through the :class:`~lunsync.provider.snapshot_service.SnapshotService` of the daemon's array, which commits the
catalog first; errors are the API's usual 4xx ``{"error": ...}`` (the catalog's families map to 404/409/400).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.security import HTTPBearer
from lunsync.provider.api import (
    _ERRORS,
    ApiError,
    LabelFilter,
    Labels,
    LabelsIn,
    Size,
    _size,
    differences,
    existing_or_conflict,
    existing_response,
    label_filter,
)
from lunsync.provider.config import MAX_LUN_NUMBER
from lunsync.snapshots.catalog import AlreadyExists
from lunsync.snapshots.model import labels_match
from lunsync.snapshots.snapcat import PoolRecord, SnapshotCatalog, SnapshotRecord, parse_snapshot_name, validate_name
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from lunsync.provider.api import ApiContext
    from lunsync.provider.snapshot_service import SnapshotService

SnapName = Annotated[str, Path(min_length=3, max_length=129, description="LUN@SNAP")]
FullName = Annotated[str, Field(min_length=3, max_length=129, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}@"
                                r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="LUN@SNAP")]
ShortName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolIn(_In):
    name: ShortName
    path: str = Field(min_length=1, max_length=4096, description="directory; relative paths are inside the data dir")
    capacity: Size | None = Field(None, description="cap on what the pool may hold (default: the filesystem's space)")
    create: bool = Field(False, description="create the directory if it does not exist (otherwise that is a 400)")


class PoolOut(BaseModel):
    name: str
    path: str
    capacity_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    snapshots: int


class SnapshotsIn(_In):
    snapshots: list[FullName] = Field(min_length=1, max_length=64,
                                      description="one point in time across every LUN named (a snapshot set)")
    kind: Literal["differential", "clone"] = "differential"
    pool: ShortName | None = None
    set: ShortName | None = None
    labels: Labels = Field(default_factory=dict, description="set on every snapshot taken")


class ExposureOut(BaseModel):
    target: str
    lun: int


class FillOut(BaseModel):
    done_chunks: int
    total_chunks: int
    percent: float
    complete: bool
    rate_bps: float | None = Field(None, description="bytes filled per second of wall-clock time, recent seconds; "
                                                     "null until measured or when not filling")
    eta_s: float | None = Field(None, description="seconds until filled at that rate; 0 when complete")


class SnapshotOut(BaseModel):
    name: str
    lun: str
    snapshot: str
    kind: str
    state: str
    invalid_reason: str | None
    created_at: str
    set: str | None
    pool: str
    epoch: int
    size_bytes: int
    space_bytes: int
    chunk_size_bytes: int
    naa: str
    serial: str
    origin_present: bool
    exposed: ExposureOut | None
    fill: FillOut | None
    labels: dict[str, str]


class SnapshotsOut(BaseModel):
    snapshots: list[SnapshotOut]
    set: str | None
    hold_ms: float = Field(description="how long new writes were held on the member LUNs, measured in the daemon")


class ExposeIn(_In):
    target: str = Field(min_length=5, max_length=223)
    lun: int | None = Field(None, ge=0, le=MAX_LUN_NUMBER, description="LUN number; the lowest free one if absent")


class BackupIn(_In):
    dir: str = Field(min_length=2, max_length=4096, pattern=r"^/",
                     description="absolute directory on the array's host; created, and must be absent or empty")


class BackupPoolOut(BaseModel):
    name: str
    path: str
    files: list[str]


class BackupOut(BaseModel):
    dir: str
    created_at: str
    schema_version: int
    pools: list[BackupPoolOut]


def retried_set(cat: SnapshotCatalog, specs: list[tuple[str, str]], body: SnapshotsIn
                ) -> tuple[list[SnapshotRecord], list[str]] | None:
    """A create of ``specs`` the catalog refused as existing: when every snapshot it names is there already, it is a
    retried request (no new point in time), and this returns them with how each differs from ``body``; None when
    some are not (a real clash)."""
    existing = {(x.lun_name, x.name): x for x in cat.list_snapshots()}
    if not all(spec in existing for spec in specs):
        return None
    recs = [existing[spec] for spec in specs]
    return recs, [d for rec in recs for d in differences(
        {"kind": body.kind, "pool": body.pool, "set": body.set, "labels": body.labels},
        {"kind": rec.kind, "pool": rec.pool, "set": rec.set_name, "labels": rec.labels})]


def _snapshot_out(svc: SnapshotService, rec: SnapshotRecord) -> SnapshotOut:
    rec = svc.as_known(rec)
    fill = None
    if rec.kind == "clone":
        done, total = svc.fill_progress.get(rec.id, (rec.filled_chunks, rec.total_chunks))
        if rec.filled:
            done = total
        rate, eta = svc.fill_rate(rec)
        fill = FillOut(done_chunks=done, total_chunks=total, percent=round(100.0 * done / max(total, 1), 2),
                       complete=rec.filled, rate_bps=None if rate is None else round(rate, 1),
                       eta_s=None if eta is None else round(eta, 1))
    exposed = None
    if rec.exposed_target is not None and rec.exposed_lun is not None:
        exposed = ExposureOut(target=rec.exposed_target, lun=rec.exposed_lun)
    return SnapshotOut(name=rec.full_name, lun=rec.lun_name, snapshot=rec.name, kind=rec.kind, state=rec.state,
                       invalid_reason=rec.invalid_reason, created_at=rec.created_at, set=rec.set_name, pool=rec.pool,
                       epoch=rec.epoch, size_bytes=rec.size_bytes, space_bytes=svc.space_bytes(rec),
                       chunk_size_bytes=rec.chunk_size_bytes, naa=rec.naa, serial=rec.serial,
                       origin_present=rec.lun_id is not None, exposed=exposed, fill=fill,
                       labels=rec.labels)


def _pool_out(svc: SnapshotService, rec: PoolRecord) -> PoolOut:
    usage = svc.pool_usage(rec)
    count = sum(1 for s in svc.cat.list_snapshots() if s.pool_id == rec.id)
    return PoolOut(name=rec.name, path=rec.path, capacity_bytes=usage["capacity_bytes"],
                   used_bytes=usage["used_bytes"], free_bytes=usage["free_bytes"], snapshots=count)


def snapshot_router(ctx: ApiContext) -> APIRouter:
    """The ``/v1`` routes of pools and snapshots, for :func:`lunsync.provider.api.create_app` to include."""
    bearer = HTTPBearer(auto_error=False, description="the token in <data-dir>/api-token")
    r = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=[Depends(bearer)], tags=["snapshots"])

    def svc() -> SnapshotService:
        s = ctx.array.snapshots
        if s is None:
            raise ApiError(409, "snapshots are not available until the array has loaded")
        return s

    @r.get("/pools", response_model=list[PoolOut], summary="snapshot pools with capacity and use",
           description="Each pool's directory, capacity (a cap, or the file system's space), bytes used and free, and "
                       "snapshot count.")
    async def list_pools() -> list[PoolOut]:
        s = svc()
        return [_pool_out(s, p) for p in s.cat.list_pools()]

    @r.post("/pools", response_model=PoolOut, status_code=201, summary="register a snapshot pool directory",
            description="Where preserved chunks and clones of the LUNs that use this pool are kept. A directory "
                        "that does not exist is refused (400) unless `create` is true.")
    async def create_pool(body: PoolIn) -> PoolOut:
        s = svc()
        rec = s.create_pool(body.name, body.path, _size(body.capacity) if body.capacity is not None else None,
                            create=body.create)
        return _pool_out(s, rec)

    @r.delete("/pools/{name}", status_code=204, response_class=Response, summary="delete a pool",
              description="Refused (409, naming them) while snapshots live in the pool or LUNs keep copies there, and "
                          "for the default pool; 404 when there is no such pool. The directory and its files are "
                          "left in place.")
    async def delete_pool(name: Annotated[str, Path(min_length=1, max_length=64)]) -> Response:
        svc().delete_pool(validate_name("pool", name))
        return Response(status_code=204)

    @r.get("/pools/{name}", response_model=PoolOut, summary="show a pool",
           description="One pool by name, with its capacity and use.")
    async def get_pool(name: Annotated[str, Path(min_length=1, max_length=64)]) -> PoolOut:
        s = svc()
        return _pool_out(s, s.cat.get_pool(validate_name("pool", name)))

    @r.post("/backup", response_model=BackupOut, status_code=201, tags=["backup"],
            summary="write a consistent backup of the catalog and the pools' chunk maps",
            description="SQLite's online backup of the catalog, then each pool's map logs and pool.db, while LUN I/O "
                        "goes on; snapshot operations wait meanwhile. LUN and pool data files are not copied. "
                        "`backup.json` is written last. 409 if the directory exists and is not empty.")
    async def backup(body: BackupIn) -> BackupOut:
        m = await svc().backup(body.dir)
        return BackupOut(dir=os.path.abspath(body.dir), created_at=m.created_at, schema_version=m.schema_version,
                         pools=[BackupPoolOut(name=p.name, path=p.path, files=list(p.files)) for p in m.pools])

    @r.get("/snapshots", response_model=list[SnapshotOut], summary="list snapshots (of one LUN, or all)",
           description="Snapshots with kind, state (an invalid one says why), set, pool, space used, identity, "
                       "exposure and a clone's fill.")
    async def list_snapshots(lun: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
                             label: LabelFilter = None) -> list[SnapshotOut]:
        s = svc()
        wanted = label_filter(label)
        recs = [rec for rec in s.cat.list_snapshots(lun) if labels_match(rec.labels, wanted)]
        await s.measure_store_space(recs)  # RBD snapshots: the cluster says what it keeps for each
        return [_snapshot_out(s, rec) for rec in recs]

    @r.post("/snapshots", response_model=SnapshotsOut, status_code=201,
            responses={**existing_response(SnapshotsOut),
                       202: {"model": SnapshotsOut, "description": "clones: taken, and filling in the background; "
                                                                   "`Location` is the first clone, whose `fill` "
                                                                   "tells the progress"}},
            summary="take snapshots: one point in time across every LUN named",
            description="New writes on every member are held, in-flight writes drain, the epochs are committed in "
                        "one transaction and writes are released. If writes do not drain within the bound (10 s) "
                        "nothing is recorded and the answer is 409.")
    async def create_snapshots(body: SnapshotsIn, response: Response) -> SnapshotsOut:
        s = svc()
        specs = [parse_snapshot_name(n) for n in body.snapshots]
        try:
            recs, hold_ms = await s.create(specs, body.kind, body.pool, body.set, body.labels)
        except AlreadyExists as clash:
            retry = retried_set(s.cat, specs, body)
            if retry is None:
                raise clash from None
            recs, diffs = retry
            existing_or_conflict("snapshot " + ", ".join(rec.full_name for rec in recs), diffs, response)
            hold_ms = 0.0
        else:
            if body.kind == "clone":
                # A clone fills in the background: 202, and where to watch its fill.
                response.status_code = 202
                response.headers["Location"] = f"/v1/snapshots/{recs[0].full_name}"
        return SnapshotsOut(snapshots=[_snapshot_out(s, rec) for rec in recs], set=body.set,
                            hold_ms=round(hold_ms, 3))

    @r.get("/snapshots/{name}", response_model=SnapshotOut, summary="show a snapshot (LUN@SNAP)",
           description="One snapshot by LUN@SNAP. `space_bytes` of an RBD snapshot is what the cluster keeps for it "
                       "alone: its objects written since, up to the next snapshot or the head.")
    async def get_snapshot(name: SnapName) -> SnapshotOut:
        s = svc()
        rec = s.cat.get_snapshot(*parse_snapshot_name(name))
        await s.measure_store_space([rec])
        return _snapshot_out(s, rec)

    @r.patch("/snapshots/{name}/labels", response_model=SnapshotOut, summary="set and remove a snapshot's labels",
             description="`set` adds labels or replaces their values, `remove` takes keys away (an absent key is no "
                         "error); other labels stay. The snapshot's contents are untouched.")
    async def label_snapshot(name: SnapName, body: LabelsIn) -> SnapshotOut:
        s = svc()
        return _snapshot_out(s, s.cat.label_snapshot(*parse_snapshot_name(name), body.set, body.remove))

    @r.delete("/snapshots/{name}", status_code=204, response_class=Response,
              summary="delete a snapshot (any order; refused while exposed)",
              description="Frees its preserved chunks; other snapshots are untouched. 409 while exposed or read by a "
                          "restore; 404 when there is no such snapshot.")
    async def delete_snapshot(name: SnapName) -> Response:
        await svc().delete(*parse_snapshot_name(name))
        return Response(status_code=204)

    @r.post("/snapshots/{name}/expose", response_model=SnapshotOut, status_code=201,
            summary="present a snapshot as a read-only LUN with its own identity",
            description="The snapshot appears on the target as a read-only LUN with its own VPD 0x80/0x83 identity, "
                        "transportable to any host.")
    async def expose(name: SnapName, body: ExposeIn) -> SnapshotOut:
        s = svc()
        rec = await s.expose(*parse_snapshot_name(name), body.target, body.lun)
        return _snapshot_out(s, rec)

    @r.delete("/snapshots/{name}/expose", status_code=204, response_class=Response,
              summary="stop presenting a snapshot",
              description="The snapshot's LUN disappears from the target; the snapshot stays.")
    async def unexpose(name: SnapName) -> Response:
        await svc().unexpose(*parse_snapshot_name(name))
        return Response(status_code=204)

    return r
