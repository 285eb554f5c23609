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

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from lunsync.provider.api import _ERRORS, ApiError, _error
from lunsync.provider.vss import (
    HardwareProvider,
    LunInformation,
    Options,
    RecoveryManager,
    VssError,
    async_handle,
)
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

    def options(self) -> Options:
        return Options(rate_bps=self.rate_mib_s * (1 << 20) if self.rate_mib_s else None, verify=self.verify,
                       pre_restore=tuple(self.pre_restore), post_restore=tuple(self.post_restore),
                       mask_except=None if self.mask_except is None else tuple(self.mask_except),
                       create_missing=self.create_missing)


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

    @r.get("/recovery", summary="list recovery sets")
    @_plain
    async def list_sets() -> Any:
        m = manager()
        return [m.status(rs.id) for rs in m.list_sets()]

    @r.post("/recovery", status_code=201, summary="create an empty recovery set (step 1)")
    @_plain
    async def create_set(body: OptionsIn) -> Any:
        m = manager()
        return m.status(m.create_set(body.options()).id)

    @r.post("/recovery/resync", status_code=201, summary="resync snapshots onto LUNs in one call",
            description="Creates a set, adds the pairs, runs pre-restore and RecoverSet. Returns at once; the "
                        "destinations serve the snapshots from then on. `dry_run` only counts the bytes.")
    @_plain
    async def resync(body: ResyncIn) -> Any:
        m = manager()
        pairs = [(p.snapshot, p.destination) for p in body.pairs]
        if body.dry_run:
            return m.dry_run(pairs)
        rs = await m.resync(pairs, body.options())
        return {**m.status(rs.id), "handle": async_handle(rs)}

    @r.post("/recovery/swap", status_code=201, summary="BreakSnapshotSetEx: the snapshot becomes the LUN",
            description="Irreversible: the LUN serves the snapshot at once, the changed chunks are copied back, and "
                        "the snapshot is deleted. `identity: snapshot` gives the LUN the snapshot's identity.")
    @_plain
    async def swap(body: SwapIn) -> Any:
        m = manager()
        rs = await m.swap(body.snapshot, body.identity, body.options())
        return {**m.status(rs.id), "handle": async_handle(rs)}

    # Status, wait and cancel serve two callers: people and scripts under /v1/recovery (plain refusals), and the
    # provider DLL's IVssAsync under /v1/provider/async (VSS names and HRESULTs, e.g. VSS_E_BAD_STATE for a cancel
    # after the end, which IVssAsync::Cancel turns into VSS_S_ASYNC_FINISHED).
    async def show(set_id: SetId) -> Any:
        return manager().status(set_id)

    async def wait(set_id: SetId, timeout_s: float = Query(60.0, ge=0, le=3600)) -> Any:
        m = manager()
        await m.wait(set_id, timeout_s)
        return m.status(set_id)

    async def cancel(set_id: SetId) -> Any:
        m = manager()
        await m.cancel(set_id)
        return m.status(set_id)

    summary_show = "status: state, percent, bytes, rate, ETA, redirected reads"
    summary_wait = "wait until the set is done, failed or cancelled (or the timeout)"
    summary_cancel = "cancel: stop copying; the destination keeps what was done"
    r.get("/recovery/{set_id}", summary=summary_show)(_plain(show))
    r.post("/recovery/{set_id}/wait", summary=summary_wait)(_plain(wait))
    r.post("/recovery/{set_id}/cancel", summary=summary_cancel)(_plain(cancel))
    r.get("/provider/async/{set_id}", summary=f"IVssAsync::QueryStatus of a ResyncLuns: {summary_show}")(_vss(show))
    r.post("/provider/async/{set_id}/wait", summary=f"IVssAsync::Wait: {summary_wait}")(_vss(wait))
    r.post("/provider/async/{set_id}/cancel", summary=f"IVssAsync::Cancel: {summary_cancel}")(_vss(cancel))

    @r.post("/recovery/{set_id}/pairs", status_code=201, summary="add a (snapshot, destination) pair (step 2)")
    @_plain
    async def add_pair(set_id: SetId, body: PairIn) -> Any:
        m = manager()
        m.add_pair(set_id, body.snapshot, body.destination)
        return m.status(set_id)

    @r.post("/recovery/{set_id}/pre-restore", summary="PreRestore: checks and pre-restore hooks (step 3)")
    @_plain
    async def pre_restore(set_id: SetId) -> Any:
        m = manager()
        await m.pre_restore(set_id)
        return m.status(set_id)

    @r.post("/recovery/{set_id}/recover", summary="RecoverSet: start the resyncs (step 4)")
    @_plain
    async def recover(set_id: SetId) -> Any:
        m = manager()
        rs = await m.recover(set_id)
        return {**m.status(set_id), "handle": async_handle(rs)}

    @r.post("/recovery/{set_id}/post-restore", summary="PostRestore: wait for the end; post-restore hooks run then")
    @_plain
    async def post_restore(set_id: SetId, timeout_s: float = Query(60.0, ge=0, le=3600)) -> Any:
        m = manager()
        await m.post_restore(set_id, timeout_s)
        return m.status(set_id)

    # -- IVssHardwareSnapshotProvider(Ex) --

    @r.get("/provider/capabilities", summary="GetProviderCapabilities")
    @_vss
    async def capabilities() -> Any:
        return provider().get_provider_capabilities()

    @r.post("/provider/are-luns-supported", summary="AreLunsSupported")
    @_vss
    async def are_luns_supported(body: LunsIn) -> Any:
        return provider().are_luns_supported(_infos(body.luns), body.context)

    @r.post("/provider/fill-in-lun-info", summary="FillInLunInfo")
    @_vss
    async def fill_in_lun_info(body: LunIn) -> Any:
        return provider().fill_in_lun_info(LunInformation.from_dict(body.lun))

    @r.post("/provider/snapshot-sets/{set_id}/begin-prepare", summary="BeginPrepareSnapshot")
    @_vss
    async def begin_prepare(set_id: SetId, body: PrepareIn) -> Any:
        return provider().begin_prepare_snapshot(set_id, body.snapshot_id, _infos(body.luns), body.context)

    @r.post("/provider/snapshot-sets/{set_id}/end-prepare", summary="EndPrepareSnapshots")
    @_vss
    async def end_prepare(set_id: SetId) -> Any:
        return provider().end_prepare_snapshots(set_id)

    @r.post("/provider/snapshot-sets/{set_id}/pre-commit", summary="PreCommitSnapshots")
    @_vss
    async def pre_commit(set_id: SetId) -> Any:
        return provider().pre_commit_snapshots(set_id)

    @r.post("/provider/snapshot-sets/{set_id}/commit", summary="CommitSnapshots: the point in time")
    @_vss
    async def commit(set_id: SetId) -> Any:
        return await provider().commit_snapshots(set_id)

    @r.post("/provider/snapshot-sets/{set_id}/post-commit", summary="PostCommitSnapshots")
    @_vss
    async def post_commit(set_id: SetId, body: PostCommitIn) -> Any:
        return provider().post_commit_snapshots(set_id, body.count)

    @r.post("/provider/snapshot-sets/{set_id}/abort", summary="AbortSnapshots")
    @_vss
    async def abort(set_id: SetId) -> Any:
        return await provider().abort_snapshots(set_id)

    @r.post("/provider/get-target-luns", summary="GetTargetLuns")
    @_vss
    async def get_target_luns(body: TargetLunsIn) -> Any:
        return provider().get_target_luns(_infos(body.luns), body.snapshot_set_id)

    @r.post("/provider/locate-luns", summary="LocateLuns: expose snapshot LUNs")
    @_vss
    async def locate_luns(body: LunsIn) -> Any:
        return await provider().locate_luns(_infos(body.luns))

    @r.post("/provider/on-lun-empty", summary="OnLunEmpty: delete the snapshot on this LUN")
    @_vss
    async def on_lun_empty(body: LunIn) -> Any:
        return await provider().on_lun_empty(LunInformation.from_dict(body.lun))

    @r.post("/provider/on-lun-state-change", summary="OnLunStateChange")
    @_vss
    async def on_lun_state_change(body: StateChangeIn) -> Any:
        return await provider().on_lun_state_change(_infos(body.snapshot_luns), _infos(body.original_luns),
                                                    body.flags)

    @r.post("/provider/resync-luns", status_code=202, summary="ResyncLuns: returns the async handle")
    @_vss
    async def resync_luns(body: ResyncLunsIn) -> Any:
        return await provider().resync_luns(_infos(body.source_luns), _infos(body.target_luns), body.options())

    @r.post("/provider/on-reuse-luns", summary="OnReuseLuns")
    @_vss
    async def on_reuse_luns(body: ReuseIn) -> Any:
        return await provider().on_reuse_luns(_infos(body.snapshot_luns), _infos(body.original_luns))

    @r.get("/provider/luns", summary="every LUN and snapshot LUN as VDS_LUN_INFORMATION")
    @_vss
    async def luns() -> Any:
        p = provider()
        return {"luns": [{"name": lun.name, "lun_information": lun.info.as_dict()} for lun in p.engine.luns()],
                "snapshots": [{"snapshot": s.ref, "lun_information": s.info.as_dict()}
                              for s in p.engine.snapshots()]}

    return r
