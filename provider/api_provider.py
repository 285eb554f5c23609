"""The provider part of the management API: the VSS hardware-provider methods under ``/v1/provider`` and recovery
sets under ``/v1/recovery``.

This module owns those routes and their request models, and the translation of a
:class:`~lunsync.provider.vss.VssError` into a 4xx: under ``/v1/provider`` its body names the VSS error
(``{"error", "code", "hresult"}``), under ``/v1/recovery`` it is the API's plain ``{"error", "code"}``. LUNs travel as the JSON form of VDS_LUN_INFORMATION. It is mounted by
:func:`lunsync.provider.api.create_app`; everything it does goes through the array's
:class:`~lunsync.provider.vss.RecoveryManager` and :class:`~lunsync.provider.vss.HardwareProvider` (built by
:func:`lunsync.provider.resync_array.attach`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, ParamSpec

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from lunsync.provider.api import _ERRORS, ApiError, _error
from lunsync.provider.vss import (
    HardwareProvider,
    LunInformation,
    Options,
    RecoveryManager,
    RecoverySet,
    VssError,
    async_handle,
)
from lunsync.snapshots.model import RBD_NAME_PATTERN
from lunsync.snapshots.model import rfc3339 as model_rfc3339
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from lunsync.provider.api import ApiContext

P = ParamSpec("P")

SnapRef = Annotated[str, Field(min_length=3, max_length=129, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}@"
                               r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="LUN@SNAP")]
LunName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
SetId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
LunInfo = Annotated[dict[str, Any], Field(description="VDS_LUN_INFORMATION as JSON: vendor_id, product_id, "
                                                      "product_revision, serial_number (VPD 0x80), "
                                                      "device_id_descriptor.identifiers (VPD 0x83)")]


HookName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptionsIn(_In):
    rate_mib_s: float | None = Field(None, gt=0, description="fixed copy rate; absent: adaptive throttle")
    verify: bool = False
    pre_restore: list[HookName] = Field(default_factory=list, max_length=16,
                                        description="names of hooks the server's hook file defines (lunsync serve "
                                                    "--hooks), run in order before the restore; an unknown name is "
                                                    "a 400")
    post_restore: list[HookName] = Field(default_factory=list, max_length=16,
                                         description="names of hooks run in order once the restore is done")
    mask_except: list[str] | None = Field(None, max_length=64, description="during the restore, show the "
                                          "destinations only to these initiator IQNs ([] hides them from all)")
    create_missing: bool = True
    pool: str | None = Field(None, pattern=RBD_NAME_PATTERN,
                             description="a destination created for a restore from an RBD snapshot becomes a new "
                                         "image in this pool; absent: the snapshot's own pool")

    def options(self) -> Options:
        return Options(rate_bps=self.rate_mib_s * (1 << 20) if self.rate_mib_s else None, verify=self.verify,
                       pre_restore=tuple(self.pre_restore), post_restore=tuple(self.post_restore),
                       mask_except=None if self.mask_except is None else tuple(self.mask_except),
                       create_missing=self.create_missing, pool=self.pool)


class PairIn(_In):
    snapshot: SnapRef
    destination: LunName | None = Field(None, description="LUN to restore into; absent: the snapshot's origin")


class ResyncIn(OptionsIn):
    pairs: list[PairIn] = Field(min_length=1, max_length=64)
    dry_run: bool = False


class SwapIn(OptionsIn):
    snapshot: SnapRef
    identity: Literal["keep", "snapshot"] = "keep"


class LunsIn(_In):
    luns: list[LunInfo] = Field(min_length=1, max_length=64)
    context: int = 0


class TargetLunsIn(LunsIn):
    snapshot_set_id: str | None = None


class LunIn(_In):
    lun: LunInfo


class PrepareIn(_In):
    snapshot_id: str = Field(min_length=1, max_length=64)
    luns: list[LunInfo] = Field(min_length=1, max_length=64)
    context: int = 0


class PostCommitIn(_In):
    count: int | None = Field(None, ge=0)


class StateChangeIn(_In):
    snapshot_luns: list[LunInfo] = Field(default_factory=list, max_length=64)
    original_luns: list[LunInfo] = Field(default_factory=list, max_length=64)
    flags: int = Field(ge=0, le=0xFFFFFFFF, description="NOTIFY_READ_WRITE 0x100, NOTIFY_LUN_PRE_RECOVERY 0x200, "
                                                        "NOTIFY_LUN_POST_RECOVERY 0x400, DO_MASK_LUNS 0x800")


class ResyncLunsIn(OptionsIn):
    source_luns: list[LunInfo] = Field(min_length=1, max_length=64, description="snapshot LUNs")
    target_luns: list[LunInfo] = Field(min_length=1, max_length=64, description="LUNs to restore into")


class ReuseIn(_In):
    snapshot_luns: list[LunInfo] = Field(min_length=1, max_length=64)
    original_luns: list[LunInfo] = Field(default_factory=list, max_length=64)


# --- response models ---------------------------------------------------------------------------------------------

_VSS_NOTE = " Errors name the VSS error in `code` and its HRESULT in `hresult`."
VdsLun = Annotated[dict[str, Any], Field(description="VDS_LUN_INFORMATION as JSON")]


class _Out(BaseModel):
    # Fields the manager adds later reach the client too: a response model must describe, not truncate.
    model_config = ConfigDict(extra="allow")


def rfc3339(t: float | None) -> str | None:
    """An epoch time as RFC 3339 in UTC, microseconds included (what every other timestamp of the API is)."""
    return None if t is None else model_rfc3339(t)


class PairOut(_Out):
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
    rate_bps: float | None = None
    eta_s: float | None = None


class AsyncHandleOut(_Out):
    """What stands for IVssAsync: the set's id and state, and where to query, wait and cancel."""

    id: str
    state: str
    query: str
    wait: str
    cancel: str


class RecoverySetOut(_Out):
    id: str
    state: str = Field(description="pending, pre-restore, resyncing, done, failed, cancelled")
    percent: float
    bytes_total: int
    bytes_done: int
    bytes_copied: int
    rate_bps: float
    eta_s: float | None
    redirected_reads: int
    pairs: list[PairOut]
    options: dict[str, Any]
    error: str | None
    hooks: list[dict[str, Any]]
    created_at: str = Field(description="RFC 3339")
    started_at: str | None = Field(description="RFC 3339")
    finished_at: str | None = Field(description="RFC 3339")
    handle: AsyncHandleOut | None = None

    @classmethod
    def of(cls, status: dict[str, Any]) -> RecoverySetOut:
        times = {k: rfc3339(status.get(k)) for k in ("created_at", "started_at", "finished_at")}
        return cls.model_validate({**status, **times})


class DryRunPairOut(_Out):
    snapshot: str
    destination: str
    bytes: int
    only_changed: bool
    new_lun: bool
    grow_to: int | None
    resync_in_progress: str | None


class DryRunOut(_Out):
    dry_run: bool
    bytes: int
    pairs: list[DryRunPairOut]


class CapabilitiesOut(_Out):
    mask: int
    mask_hex: str
    capabilities: list[str]


class SupportedOut(_Out):
    supported: bool
    luns: list[Any]


class FillInOut(_Out):
    supported: bool
    lun_information: VdsLun


class PrepareOut(_Out):
    snapshot_set_id: str
    snapshot_id: str
    luns: list[str]


class SetStateOut(_Out):
    snapshot_set_id: str
    state: str
    snapshots: list[str] | None = None


class LunPairsOut(_Out):
    luns: list[dict[str, Any]]


class DeletedOut(_Out):
    deleted: str


class StateChangeOut(_Out):
    flags: int
    flag_names: list[str]
    actions: list[str]


class ReusedOut(_Out):
    reused: list[str]


class ProviderLunsOut(_Out):
    luns: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]



def _infos(items: list[dict[str, Any]]) -> list[LunInformation]:
    return [LunInformation.from_dict(i) for i in items]


def _vss(fn: Callable[P, Awaitable[Any]]) -> Callable[P, Awaitable[Any]]:
    """The VSS provider routes: answer a VssError with its HTTP status and a body naming the VSS error and HRESULT,
    which the Windows provider DLL hands back to VSS."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return await fn(*args, **kwargs)
        except VssError as e:
            return JSONResponse(e.as_dict(), status_code=e.code.http_status)

    return wrapper


def _plain(fn: Callable[P, Awaitable[Any]]) -> Callable[P, Awaitable[Any]]:
    """The recovery routes, which people and scripts use: the same refusal in plain words and the API's usual code
    (``conflict``, ``not_found``); VSS's names belong to the provider routes only."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return await fn(*args, **kwargs)
        except VssError as e:
            return _error(e.code.http_status, e.message)

    return wrapper


def provider_router(ctx: ApiContext) -> APIRouter:
    """``/v1/provider`` and ``/v1/recovery``."""
    bearer = HTTPBearer(auto_error=False, description="the token in <data-dir>/api-token")
    r = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=[Depends(bearer)])

    def manager() -> RecoveryManager:
        m = getattr(ctx.array, "recovery", None)
        if m is None:
            raise ApiError(409, "recovery is not available (the daemon has not finished starting)")
        assert isinstance(m, RecoveryManager)
        return m

    def provider() -> HardwareProvider:
        p = getattr(ctx.array, "provider", None)
        if p is None:
            raise ApiError(409, "the provider is not available (the daemon has not finished starting)")
        assert isinstance(p, HardwareProvider)
        return p

    # -- recovery sets: the requester workflow --

    def status(set_id: str) -> RecoverySetOut:
        return RecoverySetOut.of(manager().status(set_id))

    def accepted(rs: RecoverySet, response: Response) -> RecoverySetOut:
        # Asynchronous work: 202 and where to follow it; the body is its state now, with the VSS-style handle.
        response.headers["Location"] = f"/v1/recovery/{rs.id}"
        return RecoverySetOut.of({**manager().status(rs.id), "handle": async_handle(rs)})

    @r.get("/recovery", response_model=list[RecoverySetOut], summary="list recovery sets",
           description="Every recovery set the catalog holds, running and past, newest last, each with its pairs' "
                       "progress.")
    @_plain
    async def list_sets() -> Any:
        return [status(rs.id) for rs in manager().list_sets()]

    @r.post("/recovery", response_model=RecoverySetOut, status_code=201,
            summary="create an empty recovery set (step 1)",
            description="The requester workflow's first step: a set with these options and no pairs yet. Add pairs, "
                        "then pre-restore and recover it.")
    @_plain
    async def create_set(body: OptionsIn) -> Any:
        return status(manager().create_set(body.options()).id)

    @r.post("/recovery/resync", response_model=RecoverySetOut | DryRunOut, status_code=202,
            responses={200: {"model": DryRunOut, "description": "`dry_run`: the bytes a resync would copy"}},
            summary="resync snapshots onto LUNs in one call",
            description="Creates a set, adds the pairs, runs pre-restore and RecoverSet. Answers 202 at once, with "
                        "`Location` naming the set to follow; the destinations serve the snapshots from then on. "
                        "`dry_run` only counts the bytes (200).")
    @_plain
    async def resync(body: ResyncIn, response: Response) -> Any:
        m = manager()
        pairs = [(p.snapshot, p.destination) for p in body.pairs]
        if body.dry_run:
            response.status_code = 200
            return DryRunOut.model_validate(await m.dry_run(pairs))
        return accepted(await m.resync(pairs, body.options()), response)

    @r.post("/recovery/swap", response_model=RecoverySetOut, status_code=202,
            summary="BreakSnapshotSetEx: the snapshot becomes the LUN",
            description="Irreversible: the LUN serves the snapshot at once, the changed chunks are copied back, and "
                        "the snapshot is deleted. `identity: snapshot` gives the LUN the snapshot's identity. "
                        "Answers 202 with `Location` naming the recovery set that does the copy.")
    @_plain
    async def swap(body: SwapIn, response: Response) -> Any:
        return accepted(await manager().swap(body.snapshot, body.identity, body.options()), response)

    # Status, wait and cancel serve two callers: people and scripts under /v1/recovery (plain refusals), and the
    # provider DLL's IVssAsync under /v1/provider/async (VSS names and HRESULTs, e.g. VSS_E_BAD_STATE for a cancel
    # after the end, which IVssAsync::Cancel turns into VSS_S_ASYNC_FINISHED).
    async def show(set_id: SetId) -> Any:
        return status(set_id)

    async def wait(set_id: SetId, timeout_s: float = Query(60.0, ge=0, le=3600)) -> Any:
        await manager().wait(set_id, timeout_s)
        return status(set_id)

    async def cancel(set_id: SetId) -> Any:
        await manager().cancel(set_id)
        return status(set_id)

    summary_show = "status: state, percent, bytes, rate, ETA, redirected reads"
    summary_wait = "wait until the set is done, failed or cancelled (or the timeout)"
    summary_cancel = "cancel: stop copying; the destination keeps what was done"
    about_show = ("The set's state and, per pair, bytes done and copied, copy rate and ETA, and the reads that "
                  "were redirected to the snapshot because their region was not copied yet.")
    about_wait = "Long-polls up to `timeout_s`; the answer's `state` says whether the set ended."
    about_cancel = ("The copier stops; regions already copied stay on the destination, the rest are no longer "
                    "redirected. The snapshot is untouched, so the same restore can be run again.")
    r.get("/recovery/{set_id}", summary=summary_show, description=about_show, response_model=RecoverySetOut)(_plain(show))
    r.post("/recovery/{set_id}/wait", summary=summary_wait, description=about_wait, response_model=RecoverySetOut)(_plain(wait))
    r.post("/recovery/{set_id}/cancel", summary=summary_cancel, description=about_cancel,
           response_model=RecoverySetOut)(_plain(cancel))
    r.get("/provider/async/{set_id}", summary=f"IVssAsync::QueryStatus of a ResyncLuns: {summary_show}",
          description=about_show + _VSS_NOTE, response_model=RecoverySetOut)(_vss(show))
    r.post("/provider/async/{set_id}/wait", summary=f"IVssAsync::Wait: {summary_wait}",
           description=about_wait + _VSS_NOTE, response_model=RecoverySetOut)(_vss(wait))
    r.post("/provider/async/{set_id}/cancel", summary=f"IVssAsync::Cancel: {summary_cancel}",
           description=about_cancel + _VSS_NOTE, response_model=RecoverySetOut)(_vss(cancel))

    @r.post("/recovery/{set_id}/pairs", response_model=RecoverySetOut, status_code=201,
            summary="add a (snapshot, destination) pair (step 2)",
            description="A destination absent means the snapshot's origin; a missing destination LUN is created at "
                        "recovery, a smaller one grown. Only while the set is pending.")
    @_plain
    async def add_pair(set_id: SetId, body: PairIn) -> Any:
        manager().add_pair(set_id, body.snapshot, body.destination)
        return status(set_id)

    @r.post("/recovery/{set_id}/pre-restore", response_model=RecoverySetOut,
            summary="PreRestore: checks and pre-restore hooks (step 3)",
            description="Checks every pair (snapshot valid, destination free) and runs the named pre-restore hooks "
                        "of the server's hook file, in order; a failing hook fails the set.")
    @_plain
    async def pre_restore(set_id: SetId) -> Any:
        await manager().pre_restore(set_id)
        return status(set_id)

    @r.post("/recovery/{set_id}/recover", response_model=RecoverySetOut, status_code=202,
            summary="RecoverSet: start the resyncs (step 4)",
            description="Every destination serves its snapshot from the moment this answers; the copy runs in the "
                        "background. Answers 202 with `Location` naming the set.")
    @_plain
    async def recover(set_id: SetId, response: Response) -> Any:
        return accepted(await manager().recover(set_id), response)

    @r.post("/recovery/{set_id}/post-restore", response_model=RecoverySetOut,
            summary="PostRestore: wait for the end; post-restore hooks run then",
            description="Waits up to `timeout_s` for the copy to end, then runs the post-restore hooks; the answer "
                        "is the set's state either way.")
    @_plain
    async def post_restore(set_id: SetId, timeout_s: float = Query(60.0, ge=0, le=3600)) -> Any:
        await manager().post_restore(set_id, timeout_s)
        return status(set_id)

    # -- IVssHardwareSnapshotProvider(Ex) --

    def vss(path: str, method: str, model: Any, summary: str, description: str,
            **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        route = r.get if method == "GET" else r.post
        return route(path, response_model=model, summary=summary, description=description + _VSS_NOTE, **kw)

    @vss("/provider/capabilities", "GET", CapabilitiesOut, "GetProviderCapabilities",
         "The VSS_PROVIDER_CAPABILITIES the array implements, as a mask and by name.")
    @_vss
    async def capabilities() -> Any:
        return provider().get_provider_capabilities()

    @vss("/provider/are-luns-supported", "POST", SupportedOut, "AreLunsSupported",
         "Whether every LUN named (by its VPD 0x80/0x83 identity) is one of this array's and can be snapshotted.")
    @_vss
    async def are_luns_supported(body: LunsIn) -> Any:
        return provider().are_luns_supported(_infos(body.luns), body.context)

    @vss("/provider/fill-in-lun-info", "POST", FillInOut, "FillInLunInfo",
         "Completes a VDS_LUN_INFORMATION of one of this array's LUNs or snapshot LUNs from the array's records.")
    @_vss
    async def fill_in_lun_info(body: LunIn) -> Any:
        return provider().fill_in_lun_info(LunInformation.from_dict(body.lun))

    @vss("/provider/snapshot-sets/{set_id}/begin-prepare", "POST", PrepareOut, "BeginPrepareSnapshot",
         "Adds LUNs to the snapshot set being prepared; nothing is held yet.")
    @_vss
    async def begin_prepare(set_id: SetId, body: PrepareIn) -> Any:
        return provider().begin_prepare_snapshot(set_id, body.snapshot_id, _infos(body.luns), body.context)

    @vss("/provider/snapshot-sets/{set_id}/end-prepare", "POST", SetStateOut, "EndPrepareSnapshots",
         "Ends preparation: the set's LUNs are fixed.")
    @_vss
    async def end_prepare(set_id: SetId) -> Any:
        return provider().end_prepare_snapshots(set_id)

    @vss("/provider/snapshot-sets/{set_id}/pre-commit", "POST", SetStateOut, "PreCommitSnapshots",
         "The last step before the point in time; VSS has frozen the applications.")
    @_vss
    async def pre_commit(set_id: SetId) -> Any:
        return provider().pre_commit_snapshots(set_id)

    @vss("/provider/snapshot-sets/{set_id}/commit", "POST", SetStateOut, "CommitSnapshots: the point in time",
         "Holds new writes on every LUN of the set, lets in-flight writes drain, records the snapshots in one "
         "transaction and releases the writes: milliseconds, whatever the LUNs' size.")
    @_vss
    async def commit(set_id: SetId) -> Any:
        return await provider().commit_snapshots(set_id)

    @vss("/provider/snapshot-sets/{set_id}/post-commit", "POST", SetStateOut, "PostCommitSnapshots",
         "Confirms the committed set; `count` is the number of snapshots VSS expects.")
    @_vss
    async def post_commit(set_id: SetId, body: PostCommitIn) -> Any:
        return provider().post_commit_snapshots(set_id, body.count)

    @vss("/provider/snapshot-sets/{set_id}/abort", "POST", SetStateOut, "AbortSnapshots",
         "Drops a set at any step; snapshots it had committed are deleted.")
    @_vss
    async def abort(set_id: SetId) -> Any:
        return await provider().abort_snapshots(set_id)

    @vss("/provider/get-target-luns", "POST", LunPairsOut, "GetTargetLuns",
         "For each original LUN, the VDS_LUN_INFORMATION of its snapshot LUN in the set.")
    @_vss
    async def get_target_luns(body: TargetLunsIn) -> Any:
        return provider().get_target_luns(_infos(body.luns), body.snapshot_set_id)

    @vss("/provider/locate-luns", "POST", LunPairsOut, "LocateLuns: expose snapshot LUNs",
         "Presents the named snapshot LUNs as read-only LUNs with their own identity, so the host can find them.")
    @_vss
    async def locate_luns(body: LunsIn) -> Any:
        return await provider().locate_luns(_infos(body.luns))

    @vss("/provider/on-lun-empty", "POST", DeletedOut, "OnLunEmpty: delete the snapshot on this LUN",
         "VSS no longer needs this snapshot LUN: the snapshot is deleted.")
    @_vss
    async def on_lun_empty(body: LunIn) -> Any:
        return await provider().on_lun_empty(LunInformation.from_dict(body.lun))

    @vss("/provider/on-lun-state-change", "POST", StateChangeOut, "OnLunStateChange",
         "Makes snapshot LUNs read-write, masks LUNs, or marks the start and end of a recovery, by `flags`.")
    @_vss
    async def on_lun_state_change(body: StateChangeIn) -> Any:
        return await provider().on_lun_state_change(_infos(body.snapshot_luns), _infos(body.original_luns),
                                                    body.flags)

    @vss("/provider/resync-luns", "POST", AsyncHandleOut, "ResyncLuns: returns the async handle",
         "Starts a live resync of each source (snapshot) LUN onto its target LUN and answers 202 at once with the "
         "handle VSS polls, and `Location` naming the recovery set.", status_code=202)
    @_vss
    async def resync_luns(body: ResyncLunsIn, response: Response) -> Any:
        handle = await provider().resync_luns(_infos(body.source_luns), _infos(body.target_luns), body.options())
        response.headers["Location"] = str(handle["query"])
        return handle

    @vss("/provider/on-reuse-luns", "POST", ReusedOut, "OnReuseLuns",
         "The snapshot LUNs are to be reused as new LUNs: their snapshots are released.")
    @_vss
    async def on_reuse_luns(body: ReuseIn) -> Any:
        return await provider().on_reuse_luns(_infos(body.snapshot_luns), _infos(body.original_luns))

    @vss("/provider/luns", "GET", ProviderLunsOut, "every LUN and snapshot LUN as VDS_LUN_INFORMATION",
         "What the provider DLL matches VSS's LUN descriptions against.")
    @_vss
    async def luns() -> Any:
        p = provider()
        return {"luns": [{"name": lun.name, "lun_information": lun.info.as_dict()} for lun in p.engine.luns()],
                "snapshots": [{"snapshot": s.ref, "lun_information": s.info.as_dict()}
                              for s in p.engine.snapshots()]}

    return r
