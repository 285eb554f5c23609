"""Which worker answers a management API request under ``serve --workers``: the control's routing table.

Each worker serves the existing API over what it owns, and every worker reads the same catalog, so the control only
decides where a request goes; it never re-implements an operation. The rules, in :func:`route`:

- a request about one target (``/v1/targets/IQN/...``) goes to the target's owner; one about one LUN
  (``/v1/luns/NAME/...``, ``/v1/snapshots/LUN@SNAP/...``) to the LUN's: the owner of the targets it is mapped on, or,
  unmapped, that of the LUN whose snapshot it was made from, else worker 0, which holds the other unmapped LUNs;
  exposing a snapshot (and unexposing it) to the owner of the target it is exposed on;
- a new target is placed first (:class:`Place`), then created by its worker; mapping a LUN (:class:`MapLun`) needs
  the control to check or move the LUN;
- lists whose entries carry live state (targets with their sessions, sessions, snapshots with their fill, recovery
  sets) go to every worker and are merged (:class:`FanOut`); lists that are the catalog's alone (LUNs, export,
  pools) go to worker 0;
- status, portals and the logout of a session are the control's own (:class:`Local`);
- a snapshot set whose LUNs live on several workers is :class:`SpansWorkers`, which the control takes by the two-phase
  hold; a restore goes to the worker serving its destinations, wherever the snapshot is (its reads cross to the
  snapshot's worker: :mod:`lunsync.provider.remote_snapshot`); one made in one call whose destinations are on
  several workers, and any request about such a set, is :class:`SpansWorkers` too, which the control runs as one
  set of per-worker parts (:mod:`lunsync.provider.cross_recovery`); a LUN made from a snapshot (a new restore destination, ``POST /v1/luns`` with
  ``from_snapshot``) goes to the snapshot's worker, which serves it;
- recovery sets and VSS snapshot sets live in the worker that made them, so their ids stick to it (``set_owner``); a
  VSS snapshot set may hold LUNs of several workers (its commit goes through the control's two-phase hold).

Pure: the placement is passed in as functions, and the decision is a value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

from lunsync.provider.rpc import Json


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to ``worker``; ``refresh`` asks every worker (and the portal) to re-read the catalog after
    a success, because LUNs may have changed hands; ``forget_target`` drops a deleted target's placement;
    ``remember_set`` binds the id in the answer's ``id`` (or ``handle``) field to ``worker``."""

    worker: int
    refresh: bool = False
    forget_target: str | None = None
    remember_set: bool = False
    bind_set: str | None = None  # this set id now lives on ``worker``


@dataclass(frozen=True, slots=True)
class FanOut:
    """Ask every worker and merge: ``targets`` (each target from its owner), ``snapshots`` (each from its LUN's
    owner), ``concat`` (sessions: every worker's, by ``key``), ``recovery`` (recovery sets: every worker's, the parts of a set
    across workers shown as that set), ``find`` (the first that is not 404)."""

    merge: str
    key: str = "id"


@dataclass(frozen=True, slots=True)
class Local:
    """The control answers itself: ``status``, ``portals``, ``logout`` (``arg`` the TSIH)."""

    what: str
    arg: str = ""


@dataclass(frozen=True, slots=True)
class Place:
    """Create target ``iqn``: place it on a worker, then forward the request there."""

    iqn: str


@dataclass(frozen=True, slots=True)
class MapLun:
    """Map LUN ``name`` on target ``iqn``: fine when the LUN lives with the target, a move when it is unmapped on
    another worker, refused when it is mapped on another worker's target."""

    iqn: str
    name: str


# The SpansWorkers the control carries out: a snapshot set (lunsync.provider.cross_set) and a recovery set, made in
# one call or asked about (lunsync.provider.cross_recovery).
SNAPSHOT_SET = "a snapshot set"
RECOVERY_SET = "a recovery set"
RESYNC_LUNS = "a VSS ResyncLuns"  # a recovery set made from VSS's LUN descriptions
# VSS calls that act on each LUN they name by itself, as one process does one after the other: each worker is asked
# about its own LUNs (LocateLuns, OnLunStateChange, OnReuseLuns, GetTargetLuns without a set, and AreLunsSupported,
# whose one answer about the whole set is true when every worker's answer about its own LUNs is).
PER_LUN_VSS = "a VSS call per LUN"
PER_LUN_ROUTES = frozenset({"locate-luns", "on-lun-state-change", "on-reuse-luns", "get-target-luns",
                            "are-luns-supported"})


@dataclass(frozen=True, slots=True)
class SpansWorkers:
    """An operation over LUNs of several workers: ``members`` by worker."""

    what: str
    members: dict[int, list[str]] = field(default_factory=dict)
    why: str = ""  # what in particular ties the operation to one process

    def message(self) -> str:
        where = "; ".join(f"worker {w}: {', '.join(sorted(m))}" for w, m in sorted(self.members.items()))
        return (f"{self.what} spans workers ({where}): its LUNs are served by different worker processes, which "
                f"this daemon cannot yet do as one operation{self.why}; use LUNs of one worker (lunsync status "
                "shows who serves what)")


# A restore runs in the worker that serves its destinations (the snapshot may be another worker's: its reads go
# there, lunsync.provider.remote_snapshot). A set made step by step lives in one worker; one made in one call
# (POST /v1/recovery/resync) may span workers.
RESTORE_WHY = (" (a recovery set made step by step lives in the worker that serves its destination LUNs, so its "
               "destinations must all be one worker's; give every pair in one POST /v1/recovery/resync for a set "
               "across workers)")


Decision = Forward | FanOut | Local | Place | MapLun | SpansWorkers


@dataclass(frozen=True, slots=True)
class Placement:
    """What routing needs to know: the owner of a target, of a LUN (None: no such LUN), of a recovery or VSS set
    id (None: not seen), the LUN a snapshot ``LUN@SNAP`` or a VSS serial belongs to, and where a snapshot is
    exposed."""

    target_owner: Callable[[str], int | None]
    lun_owner: Callable[[str], int | None]
    set_owner: Callable[[str], int | None]
    serial_lun: Callable[[str], str | None] = lambda _: None
    exposed_on: Callable[[str], str | None] = lambda _: None  # the target a snapshot ``LUN@SNAP`` is exposed on
    spanning_set: Callable[[str], bool] = lambda _: False  # a recovery set whose parts are several workers'


def _lun_of(snapshot: object) -> str | None:
    return snapshot.partition("@")[0] if isinstance(snapshot, str) and "@" in snapshot else None


def _by_worker(names: Iterable[str], where: Placement) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n in names:
        w = where.lun_owner(n)
        if w is not None and n not in out.get(w, []):
            out.setdefault(w, []).append(n)
    return out


def _one_or_spans(what: str, names: Iterable[str], where: Placement, *, remember_set: bool = False,
                  why: str = "") -> Decision:
    """Worker 0 when no LUN named is known (the worker's API says what is wrong with them). A destination that does
    not exist yet is made by the snapshot's worker, which then serves it (Catalog.home_target)."""
    members = _by_worker(names, where)
    if len(members) > 1:
        return SpansWorkers(what, members, why)
    return Forward(next(iter(members), 0), remember_set=remember_set)


def serials(value: Json) -> list[str]:
    """Every ``serial`` (or ``serial_number``) string in a VSS body (VDS_LUN_INFORMATION objects carry the LUN's
    serial number)."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("serial", "serial_number") and isinstance(v, str):
                found.append(v)
            else:
                found += serials(v)
    elif isinstance(value, list):
        for v in value:
            found += serials(v)
    return found


# The calls that may take long and move nothing between workers: the long polls of a recovery set (its own and
# VSS's IVssAsync::Wait) and its post-restore, which runs hooks. The control serialises changes, so that a LUN
# moving between workers is never seen halfway; these must not hold up every other change while they last.
LONG_CALLS = frozenset({"wait", "post-restore"})


def changes_placement(method: str, path: str) -> bool:
    """Whether the control must run the request one at a time with its other changes: every call but a read and
    a recovery set's :data:`LONG_CALLS` (``/v1/recovery/ID/CALL``, ``/v1/provider/async/ID/CALL``)."""
    if method in ("GET", "HEAD"):
        return False
    parts = [unquote(p) for p in path.strip("/").split("/")]
    of_a_set = (len(parts) == 4 and parts[:2] == ["v1", "recovery"]) or (
        len(parts) == 5 and parts[:3] == ["v1", "provider", "async"])
    return method != "POST" or not of_a_set or parts[-1] not in LONG_CALLS


def route(method: str, path: str, body: Json, where: Placement) -> Decision:
    """Where the request ``method path`` (with its JSON ``body``, None if none or not JSON) goes."""
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if parts[:1] != ["v1"] or len(parts) < 2:
        return Forward(0)  # /openapi.json and what no route has: every worker answers alike
    head, rest = parts[1], parts[2:]
    obj = body if isinstance(body, dict) else {}
    write = method not in ("GET", "HEAD")
    if head == "status" and not rest:
        return Local("status")
    if head == "portals" and not rest:
        return Local("portals")
    if head == "targets":
        if not rest:
            if write:
                iqn = obj.get("iqn")
                return Place(iqn) if isinstance(iqn, str) else Forward(0)
            return FanOut("targets")
        iqn = rest[0]
        owner = where.target_owner(iqn)
        if owner is None:
            return Forward(0)  # no such target: any worker says so
        if rest[1:] == ["luns"] and method == "POST":
            name = obj.get("name")
            return MapLun(iqn, name) if isinstance(name, str) else Forward(owner)
        if rest[1:2] == ["luns"] and method == "DELETE":
            return Forward(owner, refresh=True)  # an unmapped LUN goes back to worker 0
        if len(rest) == 1 and method == "DELETE":
            return Forward(owner, refresh=True, forget_target=iqn)
        return Forward(owner)
    if head == "luns":
        if not rest:
            if write:
                # A LUN made from a snapshot is served where the snapshot's LUN is (Catalog.home_target).
                origin = _lun_of(obj.get("from_snapshot"))
                return Forward((where.lun_owner(origin) if origin is not None else None) or 0)
            return Forward(0)
        return Forward(where.lun_owner(rest[0]) or 0)
    if head == "sessions":
        if not rest:
            return FanOut("concat", "tsih")
        return Local("logout", rest[0]) if len(rest) == 1 and method == "DELETE" else Forward(0)
    if head == "snapshots":
        if not rest:
            if write:
                snaps = obj.get("snapshots")
                names = [n for n in (_lun_of(s) for s in snaps) if n] if isinstance(snaps, list) else []
                return _one_or_spans(SNAPSHOT_SET, names, where)
            return FanOut("snapshots")
        lun = _lun_of(rest[0])
        owner = where.lun_owner(lun) if lun is not None else None
        if owner is None:
            return Forward(0)
        if rest[1:] == ["expose"]:
            # An exposure is served by its target's worker, which reads the snapshot from the LUN's worker when they
            # differ (lunsync.provider.remote_snapshot).
            target = obj.get("target") if method == "POST" else where.exposed_on(rest[0])
            t_owner = where.target_owner(target) if isinstance(target, str) else None
            if t_owner is not None:
                return Forward(t_owner)
        return Forward(owner)
    if head == "recovery":
        if not rest:
            return FanOut("recovery") if not write else Forward(0, remember_set=True)
        if where.spanning_set(rest[0]):
            return SpansWorkers(RECOVERY_SET)
        if rest == ["resync"]:
            pairs = obj.get("pairs") if isinstance(obj.get("pairs"), list) else []
            luns = [n for p in pairs or [] if isinstance(p, dict) and (n := runs_on(p, where))]
            return _one_or_spans(RECOVERY_SET, luns, where, remember_set=True, why=RESTORE_WHY)
        if rest == ["swap"]:
            origin = _lun_of(obj.get("snapshot"))
            return Forward((where.lun_owner(origin) if origin else None) or 0, remember_set=True)
        return _sticky(rest[0], method, obj, where, "pairs")
    if head == "provider":
        return _provider(rest, method, body, where)
    return Forward(0)


def runs_on(pair: dict[str, Json], where: Placement) -> str | None:
    """The LUN whose worker runs a restore pair: its destination's, or, for a destination not made yet (or the
    snapshot's own origin), the snapshot's LUN, whose worker creates and serves it."""
    origin = _lun_of(pair.get("snapshot"))
    dest = pair.get("destination")
    if isinstance(dest, str) and where.lun_owner(dest) is not None:
        return dest
    return origin


def _sticky(set_id: str, method: str, obj: dict[str, Json], where: Placement, adds: str) -> Decision:
    """A request about a set that lives in one worker; a pair added must be restored into that worker's LUNs."""
    owner = where.set_owner(set_id)
    if owner is None:
        return FanOut("find")
    if method == "POST" and "snapshot" in obj:
        runs = runs_on(obj, where)
        members = _by_worker([runs] if runs else [], where)
        if any(w != owner for w in members):
            members.setdefault(owner, []).append(f"recovery set {set_id}")
            return SpansWorkers("a restore", members, RESTORE_WHY)
    return Forward(owner)


def _provider(rest: list[str], method: str, body: Json, where: Placement) -> Decision:
    """The VSS provider routes name LUNs by their VDS information; the serial says which LUN (or snapshot). A VSS
    snapshot set lives in the worker its first LUN is served by, which takes LUNs of any worker into it: its commit
    asks the control for the snapshots when they are several workers' (one point in time by the two-phase hold)."""
    names = [n for n in (where.serial_lun(s) for s in serials(body)) if n]
    if rest[:1] == ["snapshot-sets"] and len(rest) >= 2:
        set_id = rest[1]
        owner = where.set_owner(set_id)
        if owner is not None:
            return Forward(owner)
        members = _by_worker(names, where)
        return Forward(next(iter(members), 0), bind_set=set_id)
    if rest[:1] == ["async"] and len(rest) >= 2:
        if where.spanning_set(rest[1]):
            return SpansWorkers(RECOVERY_SET)
        owner = where.set_owner(rest[1])
        return Forward(owner) if owner is not None else FanOut("find")
    if rest == ["resync-luns"] and isinstance(body, dict):
        # Run by the worker serving the LUNs restored into; the snapshots may be another worker's (remote_snapshot).
        names = [n for n in (where.serial_lun(s) for s in serials(body.get("target_luns"))) if n]
        members = _by_worker(names, where)
        if len(members) > 1:
            return SpansWorkers(RESYNC_LUNS, members)
    sid = body.get("snapshot_set_id") if isinstance(body, dict) else None
    if isinstance(sid, str) and (owner := where.set_owner(sid)) is not None:
        return Forward(owner)  # GetTargetLuns of a set: the set's worker knows its snapshots
    if len(rest) == 1 and rest[0] in PER_LUN_ROUTES and len(_by_worker(names, where)) > 1:
        return SpansWorkers(PER_LUN_VSS, _by_worker(names, where))
    return _one_or_spans("a VSS operation", names, where, remember_set=rest == ["resync-luns"])
