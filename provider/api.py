"""The management API: HTTP and JSON under ``/v1``, described at ``/openapi.json``, served inside the daemon's loop.

This module owns the REST surface (targets, portals, LUNs, mappings, ACLs, CHAP, sessions, status, apply/export),
its request and response models, the bearer-token check and the token file, the translation of every catalog,
configuration and storage error into a 4xx ``{"error": "..."}`` that names the problem, and the small runner that
serves an ASGI app with uvicorn on the daemon's own event loop (also used for the metrics port). Handlers are
``async def`` on purpose: they run on the loop thread, so they never race the data path over the live
:class:`~lunsync.provider.daemon.Array`. Each change goes through an ``Array`` method, which commits the catalog
transaction first and then applies it live. CHAP secrets go in and never come out, and are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, Self

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from lunsync.provider.api_guard import DEFAULT_MAX_BODY_BYTES, BodyLimit, auth_throttle, client_source
from lunsync.provider.config import MAX_LUN_NUMBER, ChapConfig, ConfigError, format_size, parse_config, parse_size
from lunsync.provider.metrics import ApiCounters
from lunsync.provider.vss import VssError
from lunsync.snapshots import catalog as cat
from lunsync.snapshots.errors import NotReady, OutOfSpace, ReadOnly, StorageError
from lunsync.snapshots.fsutil import atomic_write
from lunsync.snapshots.model import RBD_NAME_PATTERN, check_labels, labels_match, parse_label, rfc3339
from lunsync.snapshots.snapcat import parse_snapshot_name
from lunsync.target.throttle import LoginThrottle
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

if TYPE_CHECKING:
    from lunsync.provider.daemon import Array
    from lunsync.target.portal import IscsiProtocol, Server

log = logging.getLogger("lunsync.api")

VERSION = "0.1.0"
TOKEN_FILENAME = "api-token"
# The monitoring token: GET requests only, for dashboards and scrapers that must never change the array.
READ_ONLY_TOKEN_FILENAME = "api-token-readonly"
READ_METHODS = (b"GET", b"HEAD")
DEFAULT_API = "127.0.0.1:8080"
MAX_CONFIG_BYTES = 1 << 20
MAX_SIZE_BYTES = (1 << 63) - 1

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- the token -------------------------------------------------------------------------------------------------------


def ensure_token(data_dir: str, filename: str = TOKEN_FILENAME) -> str:
    """The API token in ``<data_dir>/api-token`` (or the read-only one in ``filename``), generated (256 random bits,
    mode 0600) on first start."""
    path = os.path.join(data_dir, filename)
    token = secrets.token_urlsafe(32)
    try:
        # Written whole or not at all: a crash while creating it must not leave an empty token file behind.
        atomic_write(path, token + "\n", exclusive=True)
    except FileExistsError:
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            # A token others can read is a token others can use; tighten rather than refuse to start.
            log.warning("%s was readable by others; setting mode 0600", path)
            os.chmod(path, 0o600)
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
        if len(token) < 16:
            raise ValueError(f"{path} holds no usable token (delete it to generate a new one)")
        return token
    log.info("generated a new API token in %s", path)
    return token


# --- models ----------------------------------------------------------------------------------------------------------

LUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LunName = Annotated[str, Field(min_length=1, max_length=64, pattern=LUN_NAME_PATTERN,
                               description="1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")]
# RFC 3720 §3.2.6.3 names, any case (they are compared in lowercase). The model validator stays the authority (it
# also checks the month); the pattern lets clients and fuzzers know the shape.
ISCSI_NAME_PATTERN = (
    r"^(?:[iI][qQ][nN]\.[0-9]{4}-[0-9]{2}\.[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[A-Za-z0-9.:_-]+)?"
    r"|[eE][uU][iI]\.[0-9A-Fa-f]{16}|[nN][aA][aA]\.(?:[0-9A-Fa-f]{16}|[0-9A-Fa-f]{32}))$"
)
IscsiName = Annotated[str, Field(max_length=223, pattern=ISCSI_NAME_PATTERN,
                                 description="iqn., eui. or naa. name (RFC 3720)")]
SNAPSHOT_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}@[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SIZE_PATTERN = r"^[0-9]+(?:\.[0-9]+)?\s*(?:[KkMmGgTtPp](?:[Ii][Bb])?|[Bb])?$"
# What a pattern means, for error messages: quoting a 200-character regex at a user explains nothing.
_PATTERN_MEANS: dict[str, str] = {
    ISCSI_NAME_PATTERN: "not an iSCSI name: expected iqn.YYYY-MM.reversed.domain[:id] (e.g. "
                        "iqn.2026-11.io.lunsync:demo), eui. + 16 hex digits, or naa. + 16 or 32 hex digits",
    SIZE_PATTERN: "not a size: write bytes or a number with a binary unit, e.g. 512MiB, 10GiB, 1TiB, 512M "
                  "(KB/MB/GB are ambiguous)",
    LUN_NAME_PATTERN: "not a valid name: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or "
                      "digit",
    SNAPSHOT_REF_PATTERN:
        "not a snapshot name: write LUN@SNAP, each side 1-64 characters from A-Z a-z 0-9 . _ -, starting with a "
        "letter or digit",
    r"^[A-Za-z0-9_-]+$": "not an id: use letters, digits, _ and -",
    r"^/": "not an absolute path: start it with /",
}
Size = Annotated[
    Annotated[StrictInt, Field(ge=512, le=MAX_SIZE_BYTES, multiple_of=512)]
    | Annotated[StrictStr, Field(min_length=1, max_length=32, pattern=SIZE_PATTERN)],
    Field(description="bytes (a multiple of the block size), or a number with a binary unit: '256MiB', '10GiB', "
                      "'1TiB', '512M'"),
]


def _checked_labels(labels: dict[str, str]) -> dict[str, str]:
    try:
        checked: dict[str, str] = check_labels(labels)
    except ConfigError as e:
        raise ValueError(e.message) from None
    return checked


Labels = Annotated[dict[str, str], AfterValidator(_checked_labels),
                   Field(description="the user's key=value tags: key 1-63 characters from A-Z a-z 0-9 . _ / -, "
                                     "value at most 63 of the same; at most 64 labels")]
LabelFilter = Annotated[list[str] | None, Query(
    description="key=value: only objects with this label; repeat it for several (all must match)")]


def label_filter(label: list[str] | None) -> list[tuple[str, str]]:
    """The ``?label=key=value`` filters of a list route, checked (422 in words when one is not key=value)."""
    try:
        return [parse_label(x) for x in label or ()]
    except ConfigError as e:
        raise ApiError(422, f"label filter: {e.message}") from None


class LabelsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    set: Labels = Field(default_factory=dict, description="labels to add, or whose value to replace")
    remove: list[Annotated[str, Field(min_length=1, max_length=63)]] = Field(
        default_factory=list, max_length=64, description="label keys to remove (an absent key is no error)")


class _In(BaseModel):
    # strict: 0 is not false and "5" is not 5; a client that sends the wrong type has a bug worth hearing about.
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorOut(BaseModel):
    """The one error body of every route. ``code`` is a stable word for programs; the VSS provider routes
    (``/v1/provider``) put the VSS error there and add its HRESULT."""

    error: str = Field(description="what went wrong, in words, naming the object or argument")
    code: str = Field(description="not_found, conflict, invalid, unauthorized, forbidden, too_large, unavailable, "
                                  "internal; or, from /v1/provider, the VSS error (VSS_E_OBJECT_NOT_FOUND, ...)")
    hresult: Annotated[str | None, Field(description="the VSS HRESULT, as 0x%08X (VSS provider routes only)")] = None


class TargetIn(_In):
    iqn: IscsiName
    alias: str = Field("", max_length=255)


class MappingOut(BaseModel):
    lun: int
    name: str


class ChapOut(BaseModel):
    """CHAP settings of a target. Secrets are write-only: they are never returned."""

    enabled: bool
    user: str | None = None
    mutual: bool = False
    mutual_user: str | None = None


class TargetOut(BaseModel):
    iqn: str
    alias: str
    acl: list[str]
    luns: list[MappingOut]
    chap: ChapOut
    sessions: int


class LunIn(_In):
    name: LunName
    size: Size | None = Field(None, description="required, unless the LUN is made from a snapshot or attaches an "
                                                "existing RBD image (then the image's size)")
    from_snapshot: str | None = Field(
        None, min_length=3, max_length=129, pattern=SNAPSHOT_REF_PATTERN,
        description="LUN@SNAP: the new LUN has the snapshot's size and block size and serves its data at once, "
                    "readable and writable, while a recovery set copies it in (202, `Location` names the set)")
    rate_mib_s: float | None = Field(None, gt=0, description="with from_snapshot: a fixed rate for the copy "
                                                         "(absent: the adaptive throttle)")
    flatten: bool = Field(False, description="with from_snapshot of an RBD snapshot: copy the clone's data in "
                                             "before answering, so that it no longer depends on the snapshot")

    @model_validator(mode="after")
    def _size_or_snapshot(self) -> Self:
        if self.from_snapshot is None:
            if self.size is None and self.backend != "rbd":
                raise PydanticCustomError("missing", "size: required (or from_snapshot, to make it from a snapshot)")
            if self.backend == "rbd" and (self.pool is None or self.image is None or self.path is not None):
                raise PydanticCustomError("invalid", "backend rbd: give pool and image (and no path)")
            if self.backend != "rbd" and (self.pool is not None or self.image is not None):
                raise PydanticCustomError("invalid", "pool, image: only with backend rbd")
            if self.rate_mib_s is not None:
                raise PydanticCustomError("invalid", "rate_mib_s: only with from_snapshot")
        elif extra := sorted(self.model_fields_set - {"name", "from_snapshot", "rate_mib_s", "image", "flatten"}):
            raise PydanticCustomError("invalid", "{fields}: not with from_snapshot (the LUN takes the snapshot's)",
                                      {"fields": ", ".join(extra)})
        return self
    backend: Literal["file", "block", "rbd"] | None = Field(
        None, description="where the LUN lives: a regular file, a raw block device (default: block for a /dev/ path) "
                          "or a Ceph RBD image (with pool and image)")
    pool: str | None = Field(None, min_length=1, max_length=128, pattern=RBD_NAME_PATTERN,
                             description="with backend rbd: the RADOS pool of the image")
    image: str | None = Field(None, min_length=1, max_length=128, pattern=RBD_NAME_PATTERN,
                              description="with backend rbd: the image, created when missing and a size is given, "
                                          "else attached at its own size")
    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="backing file or block device; relative paths are inside the data dir")
    block_size: Literal[512, 4096] = 512
    thin: bool = True
    read_only: bool = False
    labels: Labels = Field(default_factory=dict)


class LunMappingOut(BaseModel):
    target: str
    lun: int


class FlattenOut(BaseModel):
    state: Literal["running", "done", "failed", "stopped"] = Field(
        description="stopped: the LUN's device closed before it was done; it goes on when the LUN is served again "
                    "(a restarted daemon resumes it)")
    percent: float
    objects_done: int
    objects_total: int
    started_at: str
    finished_at: str | None
    error: str | None


class LunOut(BaseModel):
    name: str
    backend: str
    path: str
    size_bytes: int
    size: str
    block_size: int
    thin: bool
    read_only: bool
    naa: str
    serial: str
    mappings: list[LunMappingOut]
    labels: dict[str, str]
    flatten: FlattenOut | None = Field(None, description="an RBD clone's latest flatten (kept in the catalog across restarts)")


class ResizeIn(_In):
    size: Size


class MapIn(_In):
    name: LunName
    lun: int | None = Field(None, ge=0, le=MAX_LUN_NUMBER, description="LUN number; the lowest free one if absent")


class AclIn(_In):
    initiator: IscsiName


class ChapIn(_In):
    user: str = Field(min_length=1, max_length=255)
    secret: str = Field(min_length=1, max_length=255)
    mutual_user: str | None = Field(None, min_length=1, max_length=255)
    mutual_secret: str | None = Field(None, min_length=1, max_length=255)


class PortalOut(BaseModel):
    address: str
    host: str
    port: int
    tpgt: int


class SessionLunOut(BaseModel):
    lun: int
    name: str | None
    reads: int
    writes: int
    read_bytes: int
    write_bytes: int


class SessionOut(BaseModel):
    tsih: int
    isid: str
    initiator: str
    initiator_alias: str
    address: str
    target: str | None
    discovery: bool
    auth: str
    luns: list[SessionLunOut]


class WorkerOut(BaseModel):
    """One worker process of ``serve --workers``: whether it is up, and the targets and LUNs it serves."""

    index: int
    pid: int | None
    up: bool
    restarts: int
    targets: list[str]
    luns: list[str]
    sessions: int
    connections: int


class StatusOut(BaseModel):
    version: str
    uptime_s: float
    data_dir: str
    targets: int
    luns: int
    sessions: int
    connections: int
    portals: list[str]
    api: str
    metrics: str | None
    attention: list[str] = Field(default_factory=list,
                                 description="problems an operator must look at (a read-only pool, with its error)")
    workers: list[WorkerOut] = Field(default_factory=list,
                                     description="with serve --workers: each worker process and what it serves")


class ApplyIn(_In):
    config: str = Field(max_length=MAX_CONFIG_BYTES, description="the TOML configuration, as `lunsync export` writes")
    dry_run: bool = False
    source: str = Field("<api>", max_length=4096, description="file name shown in error messages")


class ApplyOut(BaseModel):
    dry_run: bool
    changed: bool
    plan: list[str]
    refused: list[str] = Field(description="a dry run's steps (also in `plan`, marked `!`) that the real apply would "
                                           "refuse with a 409, with why; empty otherwise")


class ExportOut(BaseModel):
    config: str


# --- context ---------------------------------------------------------------------------------------------------------


@dataclass
class ApiContext:
    """What the handlers act on."""

    array: Array
    server: Server
    token: str
    counters: ApiCounters = field(default_factory=ApiCounters)
    started: float = field(default_factory=time.monotonic)
    api_address: str = ""
    metrics_address: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    auth_throttle: LoginThrottle = field(default_factory=auth_throttle)
    read_token: str | None = None  # allowed GET and HEAD only


# --- errors ----------------------------------------------------------------------------------------------------------


# errno values that mean the storage under the daemon's state failed, not the request: 503, try again later.
_STORAGE_FAULT_ERRNOS = (errno.EROFS, errno.EIO)


def _status_of(exc: BaseException) -> int:
    """The one place an exception becomes an HTTP status. Requests that cannot be carried out get a 4xx; a storage
    fault under the data dir (read-only, full or failing) is a 503, since the same request succeeds once the file
    system does; a 500 is reserved for lunsync's own bugs."""
    if isinstance(exc, cat.CatalogUnavailable):
        return 503
    if isinstance(exc, OSError) and exc.errno in _STORAGE_FAULT_ERRNOS:
        return 503
    if isinstance(exc, cat.NotFound):
        return 404
    if isinstance(exc, (cat.AlreadyExists, cat.InUse, cat.CatalogLocked)):
        return 409
    if isinstance(exc, (ReadOnly, OutOfSpace, NotReady)):
        return 409
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EBUSY, errno.EEXIST):
        return 409
    if isinstance(exc, sqlite3.Error):
        return 503  # the storage under a pool's metadata (full, failing), not lunsync's bug
    return 400


_CODES = {400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
          413: "too_large", 422: "invalid", 429: "too_many_requests", 503: "unavailable"}
# How long a client should wait before retrying a 503: a remount or a freed disk takes a person some seconds.
RETRY_AFTER_S = 5


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The :class:`ErrorOut` body with the status's code word."""
    body = ErrorOut(error=message, code=_CODES.get(status, "internal" if status >= 500 else "invalid"))
    if status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


# Union members appear in pydantic's error locations ("size.constrained-int"); they are not fields.
_UNION_TAGS = ("int", "str", "constrained-int", "constrained-str")


def _describe_validation(exc: RequestValidationError) -> str:
    """One line naming each offending field once, in words."""
    parts: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "path", "query")]
        tag = loc[-1] if loc and loc[-1] in _UNION_TAGS else None
        if tag is not None:
            loc = loc[:-1]
            value = err.get("input")
            # Report the union member the client was aiming at: a number's multiple-of error, a string's syntax.
            if (isinstance(value, str) and tag.endswith("int")) or (isinstance(value, int) and tag.endswith("str")):
                continue
        # snapshots[0], not snapshots.0: the argument as a person would point at it.
        field_name = "".join(f"[{x}]" if x.isdigit() and i else (f".{x}" if i else x) for i, x in enumerate(loc)) \
            or "body"
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "value_error":  # our own validators' words, without pydantic's "Value error, "
            msg = str((err.get("ctx") or {}).get("error", msg))
        if err.get("type") == "string_pattern_mismatch":
            pattern = str((err.get("ctx") or {}).get("pattern", ""))
            msg = _PATTERN_MEANS.get(pattern, f"does not match {pattern}")
            value = err.get("input")
            if isinstance(value, str):  # a name, never a secret: secrets have no pattern
                field_name += f" {value[:80]!r}"
        parts.setdefault(field_name, f"{field_name}: {msg}")
        if len(parts) == 5:
            break
    return "; ".join(parts.values()) or "invalid request"


def differences(asked: dict[str, Any], have: dict[str, Any]) -> list[str]:
    """``field asked X, exists with Y`` for each field whose asked value differs (None in ``asked``: not asked)."""
    return [f"{k} {v!r} asked, it has {have[k]!r}" for k, v in asked.items() if v is not None and have[k] != v]


def existing_response(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a create's 200: the object already existed with the asked spec."""
    return {200: {"model": model, "description": "it already exists with this spec (an idempotent retry): the "
                                                 "existing object, unchanged"}}


def existing_or_conflict(what: str, diffs: list[str], response: Response) -> None:
    """The rule of idempotent creates, for CSI-style drivers that retry: the object exists with the asked spec, so
    answer 200 with it; or it exists with another spec, which is a 409 naming every difference."""
    if diffs:
        raise ApiError(409, f"{what} already exists with a different spec: {'; '.join(diffs)}")
    response.status_code = 200


class ApiError(Exception):
    """A request the API refuses on its own account (the catalog and storage raise their own families)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- auth ------------------------------------------------------------------------------------------------------------


class AuthSettings(Protocol):
    """What the token check needs: an :class:`ApiContext`, or the control process's of ``serve --workers``."""

    token: str
    read_token: str | None
    counters: ApiCounters
    auth_throttle: LoginThrottle


class TokenAuth:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``. It sits in front of routing
    and body parsing, so an unauthenticated request learns nothing (not even whether its body would parse)."""

    def __init__(self, app: AsgiApp, ctx: AuthSettings) -> None:
        self.app = app
        self.ctx = ctx
        self.expected = f"Bearer {ctx.token}".encode()
        self.read_only = f"Bearer {ctx.read_token}".encode() if ctx.read_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.ctx.counters.requests += 1
        source = client_source(scope)
        loop = asyncio.get_running_loop()
        hold = self.ctx.auth_throttle.delay(source, loop.time())
        if hold > 0:
            # This address keeps presenting wrong tokens: answer nothing for a while (see lunsync.provider.api_guard).
            self.ctx.counters.auth_throttled += 1
            await asyncio.sleep(hold)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        admin = secrets.compare_digest(given, self.expected)
        # Both comparisons run whatever the first said, so the time taken does not tell which token was close.
        reader = self.read_only is not None and secrets.compare_digest(given, self.read_only)
        if reader and not admin and scope.get("method", "").encode() not in READ_METHODS:
            log.warning("API: refused %s %s: the read-only token may only read", scope.get("method"), scope.get("path"))
            response = _error(403, "the read-only token may only read (GET); changes need the admin token in "
                                   "<data-dir>/api-token")
            await response(scope, receive, send)
            return
        if not (admin or reader):
            self.ctx.counters.unauthorized += 1
            self.ctx.auth_throttle.record_failure(source, loop.time())
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "unix socket"
            # Never log the presented value: a mistyped token is often a real one for another system.
            log.warning("API: refused %s %s from %s: %s", scope.get("method"), scope.get("path"), who,
                        "no bearer token" if not given else "wrong token")
            response = _error(401, "missing or wrong bearer token (see <data-dir>/api-token)",
                              {"WWW-Authenticate": 'Bearer realm="lunsync"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- views -----------------------------------------------------------------------------------------------------------


def _lun_out(array: Array, rec: cat.LunRecord) -> LunOut:
    maps = array.catalog.lun_mappings(rec.name)
    job = array.snapshots.flattens.get(rec.name) if array.snapshots is not None else None
    flat = None if job is None else FlattenOut(
        state=job.state, percent=round(job.percent, 1), objects_done=job.done, objects_total=job.total,  # type: ignore[arg-type]
        started_at=rfc3339(job.started_at), finished_at=None if job.finished_at is None else rfc3339(job.finished_at),
        error=job.error)
    return LunOut(name=rec.name, backend=rec.backend, path=rec.path, size_bytes=rec.size_bytes, size=format_size(rec.size_bytes),
                  block_size=rec.block_size, thin=rec.thin, read_only=rec.read_only, naa=rec.naa, serial=rec.serial,
                  mappings=[LunMappingOut(target=iqn, lun=n) for iqn, n in maps], labels=rec.labels, flatten=flat)


def _target_out(ctx: ApiContext, t: Any) -> TargetOut:
    chap = t.chap
    return TargetOut(
        iqn=t.iqn, alias=t.alias, acl=list(t.acl), luns=[MappingOut(lun=m.lun, name=m.name) for m in t.luns],
        chap=ChapOut(enabled=chap is not None, user=chap.user if chap else None, mutual=bool(chap and chap.mutual),
                     mutual_user=chap.mutual_user if chap else None),
        sessions=len(ctx.server.sessions.of_target(t.iqn)),
    )


def _session_out(tsih: int, proto: IscsiProtocol) -> SessionOut | None:
    r = proto.conn.result if proto.conn is not None else None
    if r is None:
        return None
    target = r.target
    luns = []
    for n, io in sorted(proto.lun_io.items()):
        lu = target.scsi.luns.get(n) if target is not None else None
        luns.append(SessionLunOut(lun=n, name=lu.name if lu is not None else None, **io.as_dict()))
    return SessionOut(tsih=tsih, isid=f"{r.isid:012x}", initiator=r.initiator_name,
                      initiator_alias=r.initiator_alias, address=proto.peer,
                      target=target.name if target is not None else None, discovery=r.discovery, auth=r.auth,
                      luns=luns)


def _size(value: int | str) -> int:
    n: int = parse_size(value)
    if n <= 0:
        raise ApiError(400, "size must be greater than zero")
    if n > MAX_SIZE_BYTES:
        raise ApiError(400, f"size {value!r} is larger than the 64-bit maximum")
    return n


# --- the app ---------------------------------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the request is invalid; `error` says why"},
    401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
    403: {"model": ErrorOut, "description": "the read-only token was presented for a change"},
    404: {"model": ErrorOut, "description": "no such object"},
    409: {"model": ErrorOut, "description": "conflicts with the current state (exists, in use, read-only, full)"},
    422: {"model": ErrorOut, "description": "the body or a parameter does not match the schema"},
    503: {"model": ErrorOut, "description": "the data dir cannot be written now (read-only, full, failing); the "
                                            "message carries the OS error and nothing was changed; retry later"},
}

TargetPath = Annotated[str, Path(max_length=223, pattern=ISCSI_NAME_PATTERN, description="target IQN")]
LunPath = Annotated[str, Path(min_length=1, max_length=64, pattern=LUN_NAME_PATTERN,
                              description="LUN name")]


def create_app(ctx: ApiContext) -> FastAPI:
    """The FastAPI application for one daemon, wrapped in the token check by :func:`asgi_app`."""
    app = FastAPI(title="lunsync", version=VERSION, docs_url=None, redoc_url=None,
                  description="Management API of the lunsync iSCSI target. Every route needs "
                              "`Authorization: Bearer <token>`; the token is in `<data-dir>/api-token`.")
    # Declares the scheme in the OpenAPI document; the check itself is TokenAuth, ahead of routing.
    bearer = HTTPBearer(auto_error=False, description="the token in <data-dir>/api-token")
    v1 = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=[Depends(bearer)])
    array = ctx.array

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _error(422, _describe_validation(exc))

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return _error(exc.status, str(exc))

    for family in (cat.CatalogError, ConfigError, StorageError, ValueError, TypeError, OSError, sqlite3.Error):
        @app.exception_handler(family)
        async def refused(request: Request, exc: Exception) -> Response:
            status = _status_of(exc)
            if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
                message = f"{exc.filename}: {exc.strerror}"  # no "[Errno 2]": the words are the message
                if status == 503:
                    message += f" ({errno.errorcode.get(exc.errno or 0, '?')}); nothing was changed, retry later"
            else:
                message = str(exc) or type(exc).__name__
            # A storage fault is the operator's to fix, and worth a warning; a refused request is the client's.
            log.log(logging.WARNING if status == 503 else logging.INFO, "API: %s %s -> %d: %s", request.method,
                    request.url.path, status, message)
            return _error(status, message)

    # -- status and portals --

    @v1.get("/status", response_model=StatusOut, summary="daemon status",
            description="Version, uptime, data dir, counts of targets, LUNs, sessions and connections, and where the "
                        "portals, API and metrics listen.")
    async def status() -> StatusOut:
        return StatusOut(
            version=VERSION, uptime_s=round(time.monotonic() - ctx.started, 3), data_dir=array.data_dir,
            targets=len(array.catalog.list_targets()), luns=len(array.luns), sessions=len(ctx.server.sessions),
            connections=ctx.server.counters.connections, portals=[p.text() for p in array.directory.portals],
            api=ctx.api_address, metrics=ctx.metrics_address,
            attention=array.snapshots.attention() if array.snapshots is not None else [],
        )

    @v1.get("/portals", response_model=list[PortalOut], summary="the iSCSI portals the daemon listens on",
            description="Each listening address with its target portal group tag, as SendTargets reports them.")
    async def portals() -> list[PortalOut]:
        return [PortalOut(address=p.text().rsplit(",", 1)[0], host=p.host, port=p.port, tpgt=p.tpgt)
                for p in array.directory.portals]

    # -- targets --

    @v1.get("/targets", response_model=list[TargetOut], summary="list targets",
            description="Every target with its ACL, mapped LUNs, CHAP settings (never secrets) and session count.")
    async def list_targets() -> list[TargetOut]:
        return [_target_out(ctx, t) for t in array.catalog.list_targets()]

    @v1.post("/targets", response_model=TargetOut, status_code=201, responses=existing_response(TargetOut),
             summary="create a target",
             description="An idempotent create: the same IQN and alias again answers 200 with the target; another alias is "
                         "409.")
    async def create_target(body: TargetIn, response: Response) -> TargetOut:
        try:
            t = await array.create_target(body.iqn, body.alias)
        except cat.AlreadyExists:
            t = array.catalog.get_target(body.iqn)
            existing_or_conflict(f"target {t.iqn}", differences({"alias": body.alias}, {"alias": t.alias}), response)
        return _target_out(ctx, t)

    @v1.get("/targets/{iqn}", response_model=TargetOut, summary="show a target",
            description="One target by IQN (compared in lowercase).")
    async def get_target(iqn: TargetPath) -> TargetOut:
        return _target_out(ctx, array.catalog.get_target(iqn))

    @v1.delete("/targets/{iqn}", status_code=204, response_class=Response, summary="delete a target",
               description="Refused (409) while the target maps LUNs, unless `force`, which unmaps them first. "
                           "Sessions of the target are logged out.")
    async def delete_target(iqn: TargetPath, force: bool = Query(False)) -> Response:
        await array.delete_target(iqn, force=force)
        return Response(status_code=204)

    # -- mappings --

    @v1.get("/targets/{iqn}/luns", response_model=list[MappingOut], summary="LUNs a target shows",
            description="The target's LUN numbers and the LUN each shows.")
    async def list_mappings(iqn: TargetPath) -> list[MappingOut]:
        return [MappingOut(lun=m.lun, name=m.name) for m in array.catalog.list_mappings(iqn)]

    @v1.post("/targets/{iqn}/luns", response_model=MappingOut, status_code=201, responses=existing_response(MappingOut),
             summary="map a LUN into a target",
             description="Shows a LUN on a target, at the number asked or the lowest free one. The LUN already shown there "
                         "(at any number, or the number asked) answers 200; another number is 409.")
    async def map_lun(iqn: TargetPath, body: MapIn, response: Response) -> MappingOut:
        try:
            m = await array.map_lun(iqn, body.name, body.lun)
        except cat.AlreadyExists:
            # Already shown on this target: the same mapping again (any number, or the one it has) is done.
            have = next((x for x in array.catalog.list_mappings(iqn) if x.name == body.name), None)
            if have is None:
                raise
            if body.lun is not None and body.lun != have.lun:
                raise ApiError(409, f"lun {body.name!r} is already mapped on {iqn} as LUN {have.lun}, not "
                                    f"{body.lun}: unmap it first")
            existing_or_conflict(f"mapping of lun {body.name!r} on {iqn}", [], response)
            m = have
        return MappingOut(lun=m.lun, name=m.name)

    @v1.delete("/targets/{iqn}/luns/{name}", status_code=204, response_class=Response,
               summary="unmap a LUN (by name) from a target",
               description="Sessions see REPORTED LUNS DATA HAS CHANGED. 404 when the LUN is not mapped there.")
    async def unmap_lun(iqn: TargetPath, name: LunPath) -> Response:
        await array.unmap_lun(iqn, name)
        return Response(status_code=204)

    # -- ACLs --

    @v1.get("/targets/{iqn}/acls", response_model=list[str], summary="initiators allowed on a target (empty: any)",
            description="The initiator IQNs allowed to log in; an empty list admits any initiator.")
    async def list_acls(iqn: TargetPath) -> list[str]:
        return list(array.catalog.list_acls(iqn))

    @v1.post("/targets/{iqn}/acls", response_model=list[str], status_code=201, summary="allow an initiator",
             description="Adds an initiator IQN to the target's ACL and answers the whole ACL.")
    async def add_acl(iqn: TargetPath, body: AclIn) -> list[str]:
        await array.add_acl(iqn, body.initiator)
        return list(array.catalog.list_acls(iqn))

    @v1.delete("/targets/{iqn}/acls/{initiator}", status_code=204, response_class=Response,
               summary="disallow an initiator; its sessions on the target are logged out",
               description="Removes an initiator from the ACL; its open sessions on the target end at once.")
    async def remove_acl(iqn: TargetPath, initiator: Annotated[str, Path(max_length=223,
                                                                          pattern=ISCSI_NAME_PATTERN)]) -> Response:
        await array.remove_acl(iqn, initiator)
        return Response(status_code=204)

    # -- CHAP --

    @v1.get("/targets/{iqn}/chap", response_model=ChapOut, summary="CHAP settings (never the secrets)",
            description="Whether CHAP is required, the user name, and the mutual user name.")
    async def get_chap(iqn: TargetPath) -> ChapOut:
        return _target_out(ctx, array.catalog.get_target(iqn)).chap

    @v1.put("/targets/{iqn}/chap", response_model=ChapOut, summary="require CHAP (mutual when mutual_* are given)",
            description="Sets CHAP credentials; new logins must authenticate. Secrets are stored with mode 0600 and "
                        "never returned.")
    async def set_chap(iqn: TargetPath, body: ChapIn) -> ChapOut:
        try:
            chap = ChapConfig(body.user, body.secret, body.mutual_user, body.mutual_secret)
        except ConfigError as e:
            # ConfigError's message names the key, never the value.
            raise ApiError(400, f"chap: {e}") from None
        await array.set_chap(iqn, chap)
        return _target_out(ctx, array.catalog.get_target(iqn)).chap

    @v1.delete("/targets/{iqn}/chap", status_code=204, response_class=Response, summary="stop requiring CHAP",
               description="Removes the target's CHAP credentials; sessions already logged in stay.")
    async def clear_chap(iqn: TargetPath) -> Response:
        await array.clear_chap(iqn)
        return Response(status_code=204)

    # -- LUNs --

    @v1.get("/luns", response_model=list[LunOut], summary="list LUNs",
            description="Every LUN with its size, block size, backend, identity (NAA, serial) and where it is mapped.")
    async def list_luns(label: LabelFilter = None) -> list[LunOut]:
        wanted = label_filter(label)
        return [_lun_out(array, rec) for rec in array.catalog.list_luns() if labels_match(rec.labels, wanted)]

    @v1.post("/luns", response_model=LunOut, status_code=201,
             responses={**existing_response(LunOut), 202: {"model": LunOut, "description": "made from a snapshot: "
                                                           "the LUN serves it now, `Location` names the copy"}},
             summary="create a LUN and its backing file, empty or from a snapshot",
             description="Creates the backing file (sparse unless `thin` is false) or takes a block device. With "
                         "`from_snapshot` (and no other field but `name` and `rate_mib_s`) the LUN is created at the snapshot's size "
                         "and block size and is usable at once: it serves the snapshot's data while a recovery set "
                         "copies it in (202; `Location` names the set). An idempotent create: the same spec again "
                         "answers 200 with the LUN; another spec is 409 naming each difference.")
    async def create_lun(body: LunIn, response: Response) -> LunOut:
        if body.from_snapshot is not None:
            return await lun_from_snapshot(body, response)
        size = _size(body.size) if body.size is not None else None  # None: an existing rbd image's own
        path = f"{body.pool}/{body.image}" if body.backend == "rbd" else body.path
        try:
            rec = await array.create_lun(body.name, size, path=path, block_size=body.block_size,
                                         thin=body.thin, read_only=body.read_only, backend=body.backend or "",
                                         labels=body.labels)
        except cat.AlreadyExists as clash:
            try:
                rec = array.catalog.get_lun(body.name)
            except cat.NotFound:
                raise clash from None  # it was another LUN's path or identity that clashed: that error stands
            if body.backend == "rbd":
                where: str | None = path
            else:
                where = os.path.realpath(os.path.join(array.catalog.data_dir, body.path)) if body.path else None
            asked = {"size_bytes": size if size is not None else rec.size_bytes, "block_size": body.block_size, "thin": body.thin,
                     "read_only": body.read_only, "backend": body.backend, "path": where, "labels": body.labels}
            have = {"size_bytes": rec.size_bytes, "block_size": rec.block_size, "thin": rec.thin,
                    "read_only": rec.read_only, "backend": rec.backend, "labels": rec.labels,
                    "path": rec.path if rec.backend == "rbd" else os.path.realpath(array.catalog.lun_path(rec))}
            existing_or_conflict(f"lun {rec.name!r}", differences(asked, have), response)
        return _lun_out(array, rec)

    async def lun_from_snapshot(body: LunIn, response: Response) -> LunOut:
        assert body.from_snapshot is not None
        lun, snap = parse_snapshot_name(body.from_snapshot)
        svc = array.snapshots
        if svc is not None and svc.cat.get_snapshot(lun, snap).kind == "rbd":
            # An RBD snapshot becomes an RBD clone: instant, nothing to copy (unless flattened).
            if body.rate_mib_s is not None:
                raise ApiError(400, "rate_mib_s: an RBD snapshot is cloned, not copied in")
            made = await svc.clone(lun, snap, body.name, image=body.image, flatten=body.flatten)
            if body.flatten:  # the copy runs on in the background: the LUN's `flatten` shows it
                response.status_code = 202
                response.headers["Location"] = f"/v1/luns/{made.name}"
            return _lun_out(array, made)
        if body.image is not None or body.flatten:
            raise ApiError(400, "image, flatten: only with from_snapshot of an RBD snapshot (it is cloned)")
        manager = array.recovery
        if manager is None:
            raise ApiError(409, "recovery is not available (the daemon has not finished starting)")
        try:
            rate = body.rate_mib_s * (1 << 20) if body.rate_mib_s else None
            rs, started = await manager.new_lun_from(body.from_snapshot, body.name, rate)
        except VssError as e:
            raise ApiError(e.code.http_status, e.message) from None
        response.status_code = 202 if started else 200
        response.headers["Location"] = f"/v1/recovery/{rs.id}"
        return _lun_out(array, array.catalog.get_lun(body.name))

    @v1.post("/luns/{name}/flatten", response_model=LunOut, status_code=202,
             summary="flatten an RBD clone in the background",
             description="Starts copying into the LUN's image (an RBD clone) what it still reads from its parent "
                         "snapshot, while the LUN serves I/O, and answers 202 at once; the LUN's `flatten` shows the "
                         "progress (`Location`). A flatten already running is answered as it is; one that stopped "
                         "goes on from where it was. Once `flatten.state` is `done` the snapshot may be deleted. 400 "
                         "for a LUN that is not on an RBD image.")
    async def flatten_lun(name: LunPath, response: Response) -> LunOut:
        rec = array.catalog.get_lun(name)
        if array.snapshots is None:
            raise ApiError(409, "snapshots are not available (the daemon has not finished starting)")
        array.snapshots.start_flatten(rec.name)
        response.headers["Location"] = f"/v1/luns/{rec.name}"
        return _lun_out(array, rec)

    @v1.get("/luns/{name}", response_model=LunOut, summary="show a LUN",
            description="One LUN by name.")
    async def get_lun(name: LunPath) -> LunOut:
        return _lun_out(array, array.catalog.get_lun(name))

    @v1.patch("/luns/{name}/labels", response_model=LunOut, summary="set and remove a LUN's labels",
              description="`set` adds labels or replaces their values, `remove` takes keys away (an absent key is "
                          "no error); other labels stay. The LUN's data and identity are untouched.")
    async def label_lun(name: LunPath, body: LabelsIn) -> LunOut:
        return _lun_out(array, array.catalog.label_lun(name, body.set, body.remove))

    @v1.delete("/luns/{name}", status_code=204, response_class=Response,
               summary="delete a LUN (refused while mapped); a backing file lunsync created in the data dir is removed",
               description="409 while mapped, with snapshots, or restored into; 404 when there is no such LUN. An RBD "
                           "image stays on the cluster unless `delete_image=true`.")
    async def delete_lun(name: LunPath, delete_image: Annotated[bool, Query(
            description="with an rbd LUN: delete its image too (refused by the cluster while the image has "
                        "snapshots)")] = False) -> Response:
        await array.delete_lun(name, delete_image=delete_image)
        ctx.server.stats.forget(name)
        return Response(status_code=204)

    @v1.post("/luns/{name}/resize", response_model=LunOut, summary="grow a LUN live (shrinking is refused)",
             description="Sessions see CAPACITY DATA HAS CHANGED on their next command.")
    async def resize_lun(name: LunPath, body: ResizeIn) -> LunOut:
        rec = await array.resize_lun(name, _size(body.size))
        return _lun_out(array, rec)

    # -- sessions --

    @v1.get("/sessions", response_model=list[SessionOut], summary="logged-in sessions with per-LUN counters",
            description="Each session's initiator, address, target, authentication and per-LUN commands and bytes.")
    async def list_sessions() -> list[SessionOut]:
        out = (_session_out(tsih, p) for tsih, p in sorted(ctx.server.sessions.items()))
        return [s for s in out if s is not None]

    @v1.delete("/sessions/{tsih}", status_code=204, response_class=Response,
               summary="force a session out: abort its tasks and close its connections",
               description="404 when no session has that TSIH.")
    async def logout_session(tsih: Annotated[int, Path(ge=1, le=0xFFFF)]) -> Response:
        if not ctx.server.force_logout(tsih):
            raise ApiError(404, f"no session with TSIH {tsih}")
        log.info("API: forced logout of session tsih=%d", tsih)
        return Response(status_code=204)

    # -- declarative --

    @v1.post("/apply", response_model=ApplyOut, summary="make the array match a TOML configuration",
             description="Declarative: what the configuration does not name is removed. Idempotent; `dry_run` only "
                         "plans. Portal changes are recorded and take effect at the next start. Removing a LUN that "
                         "snapshots still reference is refused (409, naming them); a dry run lists it in `refused`. "
                         "Under `serve --workers`, so is a plan that would show a LUN on targets of two workers, or "
                         "move a LUN with snapshots, or one a restore writes, to another worker.")
    async def apply(body: ApplyIn) -> ApplyOut:
        cfg = parse_config(body.config, source=body.source)
        plan = await array.apply(cfg, dry_run=body.dry_run)
        return ApplyOut(dry_run=body.dry_run, changed=len(plan) > len(plan.refused), plan=plan.lines(),
                        refused=plan.refused)

    @v1.get("/export", response_model=ExportOut, summary="the whole array as TOML (CHAP secrets included)",
            description="What `apply` reads: applied to an empty data dir it rebuilds this array, LUN identities "
                        "included. It carries the CHAP secrets, so treat it like the token.")
    async def export() -> ExportOut:
        from lunsync.provider.config import dump_config

        return ExportOut(config=dump_config(array.catalog.export()))

    app.include_router(v1)
    from lunsync.provider.api_snapshots import snapshot_router  # imports this module: not at the top

    app.include_router(snapshot_router(ctx))
    from lunsync.provider.api_provider import provider_router  # imports this module: not at the top

    app.include_router(provider_router(ctx))
    return app


def asgi_app(ctx: ApiContext) -> AsgiApp:
    """The API as served: the FastAPI app behind the body limit, behind the token check (an unauthenticated client
    learns nothing, not even the limit)."""
    return TokenAuth(body_limit(create_app(ctx), ctx.max_body_bytes), ctx)


def body_limit(app: AsgiApp, max_body_bytes: int) -> AsgiApp:
    """``app`` behind the body limit; ``apply`` carries a whole configuration, so its limit is the configuration's
    plus room for JSON escaping."""
    return BodyLimit(app, max_body_bytes, {"/v1/apply": max(max_body_bytes, 2 * MAX_CONFIG_BYTES + 4096)})


# --- serving inside the daemon's loop --------------------------------------------------------------------------------


class _LoopServer(uvicorn.Server):
    """uvicorn without its signal handling: the daemon owns SIGTERM/SIGINT and stops us itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn releases
        return None


def parse_api_address(spec: str, default_port: int) -> tuple[str, str, int]:
    """``unix:PATH`` -> ("unix", PATH, 0); ``HOST:PORT`` / ``[V6]:PORT`` / ``HOST`` -> ("tcp", HOST, PORT)."""
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise ValueError(f"bad address {spec!r}: unix: needs a path")
        return "unix", os.path.abspath(path), 0
    from lunsync.provider.daemon import parse_hostport

    host, port = parse_hostport(spec, default_port)
    return "tcp", host, port


def _bind(kind: str, host: str, port: int) -> socket.socket:
    if kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(host).st_mode):
                os.unlink(host)  # a stale socket from a crashed daemon
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: only the daemon's user may even try a token
        try:
            sock.bind(host)
        finally:
            os.umask(old)
        sock.listen(128)
        return sock
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


@dataclass
class HttpServer:
    """One ASGI app served by uvicorn on the running loop, on a socket bound by us (so a bind error is an OSError
    the daemon reports, not uvicorn's ``sys.exit``)."""

    name: str
    server: _LoopServer
    task: asyncio.Task[None]
    address: str
    sock: socket.socket
    unix_path: str | None = None

    @classmethod
    async def start(cls, name: str, app: AsgiApp, spec: str, default_port: int, *, certfile: str | None = None,
                    keyfile: str | None = None) -> HttpServer:
        # uvicorn's "Started server process" lines say nothing the daemon's own log does not.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        kind, host, port = parse_api_address(spec, default_port)
        sock = _bind(kind, host, port)
        if kind == "unix":
            address = f"unix:{host}"
        else:
            bound = sock.getsockname()
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            address = f"{'https' if certfile else 'http'}://{shown}:{bound[1]}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                proxy_headers=False, ssl_certfile=certfile, ssl_keyfile=keyfile,
                                timeout_graceful_shutdown=2, interface="asgi3")
        server = _LoopServer(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name=f"http-{name}")
        while not server.started:
            if task.done():
                sock.close()
                exc = task.exception()
                raise OSError(f"{name} server on {address} failed to start: {exc!r}")
            await asyncio.sleep(0.01)
        log.info("%s listening on %s", name, address)
        return cls(name, server, task, address, sock, host if kind == "unix" else None)

    async def stop(self) -> None:
        self.server.should_exit = True
        done, _ = await asyncio.wait({self.task}, timeout=5)
        if not done:
            self.task.cancel()
        elif not self.task.cancelled() and self.task.exception() is not None:
            log.warning("%s server ended with %r", self.name, self.task.exception())
        self.sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
