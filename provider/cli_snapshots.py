"""The ``lunsync snapshot`` and ``lunsync pool`` commands: clients of ``/v1/snapshots`` and ``/v1/pools``.

This module owns the words and the tables of those two nouns; :mod:`lunsync.provider.cli` registers them and owns
the connection options, ``--json`` and error reporting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from lunsync.provider.cli import (
    _done,
    _print_json,
    _q,
    _size,
    _table,
    add_label_changes,
    add_label_option,
    human_size,
    label_body,
    labels_text,
    with_labels,
)
from lunsync.snapshots.model import parse_label

Leaf = Callable[..., argparse.ArgumentParser]
Noun = Callable[[str, str], "argparse._SubParsersAction[argparse.ArgumentParser]"]


def add_snapshot_commands(noun: Noun, leaf: Leaf) -> None:
    snap = noun("snapshot", "snapshots (LUN@SNAP): differential or clone, single or as a set")
    p = leaf(snap, "create", _create, "take snapshots: one point in time across every LUN named")
    p.add_argument("names", nargs="+", metavar="LUN@SNAP")
    p.add_argument("--kind", choices=("differential", "clone"), default="differential",
                   help="differential (copy-on-write, the default) or clone (a full copy filled in the background)")
    p.add_argument("--pool", metavar="NAME", help="pool for the preserved data (default: the LUN's, else 'default')")
    p.add_argument("--set", metavar="NAME", help="name the snapshot set")
    p.add_argument("--wait", action="store_true", help="with --kind clone: wait until every clone is filled")
    add_label_option(p, "label every snapshot taken (repeatable)")
    p = leaf(snap, "list", _list, "list snapshots (of one LUN, or all)")
    p.add_argument("lun", nargs="?", metavar="LUN")
    add_label_option(p, "only snapshots with this label (repeatable: all must match)")
    p = leaf(snap, "label", _label, "set labels (KEY=VALUE) and remove them (KEY-) on a snapshot")
    p.add_argument("name", metavar="LUN@SNAP")
    add_label_changes(p)
    p = leaf(snap, "show", _show, "show one snapshot")
    p.add_argument("name", metavar="LUN@SNAP")
    p = leaf(snap, "delete", _delete, "delete a snapshot (any order; refused while exposed)")
    p.add_argument("name", metavar="LUN@SNAP")
    p = leaf(snap, "expose", _expose, "present a snapshot as a read-only LUN with its own identity")
    p.add_argument("name", metavar="LUN@SNAP")
    p.add_argument("--target", required=True, metavar="IQN")
    p.add_argument("--lun", type=int, metavar="N", help="LUN number (default: the lowest free one)")
    p = leaf(snap, "unexpose", _unexpose, "stop presenting a snapshot")
    p.add_argument("name", metavar="LUN@SNAP")

    pool = noun("pool", "snapshot pools: where preserved chunks and clones live")
    p = leaf(pool, "create", _pool_create, "register a pool directory")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--path", required=True, metavar="DIR", help="directory for the pool (it must exist)")
    p.add_argument("--create", action="store_true", help="create the directory if it does not exist")
    p.add_argument("--capacity", type=_size, metavar="SIZE", help="cap on what the pool may hold")
    leaf(pool, "list", _pool_list, "list pools with capacity and use")
    p = leaf(pool, "delete", _pool_delete, "forget an unused pool (refused while snapshots or LUNs use it)")
    p.add_argument("name", metavar="NAME")


def _ok(a: argparse.Namespace, result: Any, text: str) -> int:
    rc: int = _done(a, result, text)
    return rc


_COLUMNS = ["Snapshot", "Kind", "State", "Created", "Set", "Pool", "Space", "Exposed", "Serial"]


def _rows(snaps: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in snaps:
        state = s["state"]
        if s["fill"] is not None and not s["fill"]["complete"]:
            state += f" (filling {s['fill']['percent']:.0f}%)"
        if s["state"] == "invalid" and s["invalid_reason"]:
            state += f": {s['invalid_reason']}"
        exposed = f"{s['exposed']['target']} lun {s['exposed']['lun']}" if s["exposed"] else "-"
        rows.append([s["name"], s["kind"], state, s["created_at"][:19].replace("T", " "), s["set"] or "-",
                     s["pool"], human_size(s["space_bytes"]), exposed, s["serial"]])
    return rows


def _create(c: Any, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {"snapshots": a.names, "kind": a.kind, "labels": dict(parse_label(x) for x in a.labels)}
    if a.pool:
        body["pool"] = a.pool
    if a.set:
        body["set"] = a.set
    r = c.post("/snapshots", body)
    names = ", ".join(s["name"] for s in r["snapshots"])
    what = f"snapshot set {r['set']}: " if r["set"] else ""
    if not a.wait or a.kind != "clone":
        return _ok(a, r, f"{what}{names} ({a.kind}), writes held {r['hold_ms']:.2f} ms")
    as_json = bool(getattr(a, "json", False))
    if not as_json:
        print(f"{what}{names} ({a.kind}), writes held {r['hold_ms']:.2f} ms", flush=True)
    r["snapshots"] = [_fill_wait(c, as_json, s) for s in r["snapshots"]]
    if as_json:
        _print_json(r)
    bad = [s["name"] for s in r["snapshots"] if not (s["fill"] and s["fill"]["complete"])]
    if bad:
        print(f"lunsync: not filled: {', '.join(bad)}", file=sys.stderr)
        return 1
    if not as_json:
        print(f"filled: {names}")
    return 0


def _fill_wait(c: Any, as_json: bool, s: dict[str, Any]) -> dict[str, Any]:
    """Follow one clone's fill until it is complete (or the snapshot turns invalid), showing its progress."""
    from lunsync.provider.cli_progress import ProgressDisplay, Step

    path = f"/snapshots/{_q(s['name'])}"
    with ProgressDisplay(f"clone {s['name']}", enabled=not as_json) as shown:
        while True:
            fill = s["fill"] or {"done_chunks": 0, "complete": False, "rate_bps": None, "eta_s": None}
            done = s["size_bytes"] if fill["complete"] else min(s["size_bytes"],
                                                                 fill["done_chunks"] * s["chunk_size_bytes"])
            state = "filled" if fill["complete"] else ("filling" if s["state"] == "valid" else s["state"])
            shown.update(Step(done, s["size_bytes"], fill["rate_bps"], fill["eta_s"], state))
            if fill["complete"] or s["state"] != "valid":
                return s
            time.sleep(0.5)
            s = c.get(path)


def _list(c: Any, a: argparse.Namespace) -> int:
    params: dict[str, Any] = {"lun": a.lun} if a.lun else {}
    if a.labels:
        params["label"] = a.labels
    snaps = c.get("/snapshots", **params)
    if getattr(a, "json", False):
        _print_json(snaps)
    else:
        _table(None, *with_labels(_COLUMNS, _rows(snaps), snaps))
    return 0


def _label(c: Any, a: argparse.Namespace) -> int:
    s = c.patch(f"/snapshots/{_q(a.name)}/labels", label_body(a.changes))
    return _ok(a, s, f"snapshot {s['name']} labels: {labels_text(s['labels'])}")


def _show(c: Any, a: argparse.Namespace) -> int:
    s = c.get(f"/snapshots/{_q(a.name)}")
    if getattr(a, "json", False):
        _print_json(s)
    else:
        _table(None, [*_COLUMNS, "NAA", "Labels"], [_rows([s])[0] + [s["naa"], labels_text(s["labels"])]])
    return 0


def _delete(c: Any, a: argparse.Namespace) -> int:
    r = c.delete(f"/snapshots/{_q(a.name)}")
    return _ok(a, r, f"deleted snapshot {a.name}")


def _expose(c: Any, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {"target": a.target}
    if a.lun is not None:
        body["lun"] = a.lun
    s = c.post(f"/snapshots/{_q(a.name)}/expose", body)
    return _ok(a, s, f"exposed {s['name']} on {s['exposed']['target']} as LUN {s['exposed']['lun']} (read-only, "
                       f"serial {s['serial']})")


def _unexpose(c: Any, a: argparse.Namespace) -> int:
    r = c.delete(f"/snapshots/{_q(a.name)}/expose")
    return _ok(a, r, f"unexposed snapshot {a.name}")


def _pool_create(c: Any, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": a.name, "path": os.path.abspath(a.path)}
    if a.capacity is not None:
        body["capacity"] = a.capacity
    if a.create:
        body["create"] = True
    p = c.post("/pools", body)
    return _ok(a, p, f"created pool {p['name']} at {p['path']}")


def _pool_delete(c: Any, a: argparse.Namespace) -> int:
    r = c.delete(f"/pools/{_q(a.name)}")
    return _ok(a, r, f"deleted pool {a.name} (its directory is left in place)")


def _pool_list(c: Any, a: argparse.Namespace) -> int:
    pools = c.get("/pools")
    if getattr(a, "json", False):
        _print_json(pools)
        return 0

    def size(n: int | None) -> str:
        return "-" if n is None else human_size(n)

    _table(None, ["Pool", "Path", "Capacity", "Used", "Free", "Snapshots"],
           [[p["name"], p["path"], size(p["capacity_bytes"]), size(p["used_bytes"]), size(p["free_bytes"]),
             str(p["snapshots"])] for p in pools])
    return 0
