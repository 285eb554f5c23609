"""The ``lunsync resync``, ``lunsync recovery`` and ``lunsync swap`` commands: clients of ``/v1/recovery``.

This module owns the words, the progress bar and the tables of restores; :mod:`lunsync.provider.cli` registers them
and owns the connection options, ``--json`` and error reporting. ``resync`` prints the recovery id at once; with
``--wait`` it follows the set to its end and exits 1 unless it is done.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from lunsync.provider.cli import _print_json, _q, _table, human_size

Leaf = Callable[..., argparse.ArgumentParser]
Noun = Callable[[str, str], "argparse._SubParsersAction[argparse.ArgumentParser]"]

_FINAL = ("done", "failed", "cancelled")


def add_resync_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], noun: Noun, leaf: Leaf,
                        common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("resync", parents=[common], help="restore LUNs from snapshots, live (a recovery set)",
                       description="Start a recovery set: each destination serves its snapshot at once while the "
                                   "blocks are copied back in the background. Prints the recovery id.")
    p.add_argument("snapshots", nargs="+", metavar="LUN@SNAP")
    p.add_argument("--to", action="append", default=[], metavar="DEST",
                   help="destination LUN of the snapshot in the same position (default: the snapshot's origin; a "
                        "missing LUN is created, a smaller one grown)")
    p.add_argument("--pool", metavar="POOL", help="a missing destination of an RBD snapshot becomes a new image in "
                                                  "this pool (default: the snapshot's own pool)")
    _options(p)
    p.add_argument("--dry-run", action="store_true", help="only report how many bytes would be copied")
    p.set_defaults(handler=_resync)

    rec = noun("recovery", "recovery sets: restores in progress and past")
    leaf(rec, "list", _list, "list recovery sets")
    q = leaf(rec, "show", _show, "state, percent, bytes, rate, ETA and redirected reads of a set")
    q.add_argument("id", metavar="ID")
    q = leaf(rec, "wait", _wait_cmd, "wait for a set to finish (exit 1 unless it is done)")
    q.add_argument("id", metavar="ID")
    q.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 2)")
    q = leaf(rec, "cancel", _cancel, "cancel a set (the destination keeps what was already copied)")
    q.add_argument("id", metavar="ID")

    p = sub.add_parser("swap", parents=[common], help="turn a snapshot into the read-write LUN (irreversible)",
                       description="BreakSnapshotSetEx: the LUN serves the snapshot at once; the snapshot is used "
                                   "up. It cannot be undone.")
    p.add_argument("snapshot", metavar="LUN@SNAP")
    p.add_argument("--identity", choices=("keep", "snapshot"), default="keep",
                   help="keep: the LUN keeps its identity (VPD 0x80/0x83); snapshot: it takes the snapshot's")
    _options(p)
    p.set_defaults(handler=_swap)


def _local_time(rfc3339: str) -> str:
    """An API timestamp (RFC 3339) in the local time zone, to the second."""
    import datetime as dt

    return dt.datetime.fromisoformat(rfc3339).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="follow it to the end with a progress bar; exit 1 on failure")
    p.add_argument("--rate", type=float, metavar="MiB/s", help="fixed copy rate (default: adaptive, slows down "
                                                               "while initiators' latency rises)")
    p.add_argument("--verify", action="store_true", help="checksum each destination against its snapshot at the end")
    p.add_argument("--pre-restore", action="append", default=[], metavar="HOOK",
                   help="a hook the server's hook file names, run before (repeatable)")
    p.add_argument("--post-restore", action="append", default=[], metavar="HOOK",
                   help="a hook the server's hook file names, run after (repeatable)")
    p.add_argument("--mask-except", action="append", metavar="IQN",
                   help="during the restore, hide the destinations from every initiator but this one (repeatable)")
    p.add_argument("--mask", action="store_true", help="during the restore, hide the destinations from everyone")


def _body(a: argparse.Namespace) -> dict[str, Any]:
    mask = a.mask_except if a.mask_except else ([] if a.mask else None)
    return {"rate_mib_s": a.rate, "verify": a.verify, "pre_restore": a.pre_restore,
            "post_restore": a.post_restore, "mask_except": mask}


def _json(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "json", False))


def _resync(c: Any, a: argparse.Namespace) -> int:
    if len(a.to) > len(a.snapshots):
        raise ValueError(f"{len(a.to)} --to for {len(a.snapshots)} snapshot(s)")
    dests = a.to + [None] * (len(a.snapshots) - len(a.to))
    pairs = [{"snapshot": s, "destination": d} for s, d in zip(a.snapshots, dests, strict=True)]
    pool = {"pool": a.pool} if a.pool is not None else {}
    r = c.post("/recovery/resync", {"pairs": pairs, "dry_run": a.dry_run, **pool, **_body(a)})
    if a.dry_run:
        if _json(a):
            _print_json(r)
        else:
            for p in r["pairs"]:
                what = "changed chunks" if p["only_changed"] else ("new LUN" if p["new_lun"] else "whole snapshot")
                print(f"{p['snapshot']} -> {p['destination']}: {human_size(p['bytes'])} ({what})")
            print(f"dry run: {human_size(r['bytes'])} ({r['bytes']} bytes) would be copied")
        return 0
    return _started(c, a, r)


def _swap(c: Any, a: argparse.Namespace) -> int:
    r = c.post("/recovery/swap", {"snapshot": a.snapshot, "identity": a.identity, **_body(a)})
    return _started(c, a, r)


def _started(c: Any, a: argparse.Namespace, r: dict[str, Any]) -> int:
    if not a.wait:
        if _json(a):
            _print_json(r)
        else:
            dests = ", ".join(f"{p['snapshot']} -> {p['destination']}" for p in r["pairs"])
            print(f"recovery {r['id']} {r['state']}: {dests} (serving the snapshot now)")
        return 0
    if not _json(a):
        print(f"recovery {r['id']} {r['state']}", flush=True)
    return _follow(c, a, r["id"], None)


def _follow(c: Any, a: argparse.Namespace, set_id: str, timeout: float | None) -> int:
    from lunsync.provider.cli_progress import ProgressDisplay, Step

    deadline = None if timeout is None else time.monotonic() + timeout
    path = f"/recovery/{_q(set_id)}"
    status = c.get(path)
    with ProgressDisplay(f"recovery {set_id}", enabled=not _json(a)) as shown:
        while True:
            shown.update(Step(status["bytes_done"], status["bytes_total"], status["rate_bps"] or None,
                              status["eta_s"], status["state"]))
            if status["state"] in _FINAL or (deadline is not None and time.monotonic() >= deadline):
                break
            wait_s = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            status = c.post(f"{path}/wait?timeout_s={wait_s:.2f}")
    if _json(a):
        _print_json(status)
    else:
        _print_status(status)
    if status["state"] == "done":
        return 0
    return 2 if status["state"] not in _FINAL else 1


def _print_status(s: dict[str, Any]) -> None:
    eta = f", ETA {s['eta_s']:.0f} s" if s.get("eta_s") else ""
    print(f"recovery {s['id']}: {s['state']}, {s['percent']:.1f}% ({human_size(s['bytes_done'])} of "
          f"{human_size(s['bytes_total'])}), {human_size(s['bytes_copied'])} copied, "
          f"{human_size(int(s['rate_bps']))}/s{eta}, {s['redirected_reads']} redirected reads")
    for p in s["pairs"]:
        v = "" if p.get("verified") is None else (", verified" if p["verified"] else ", VERIFY FAILED")
        print(f"  {p['snapshot']} -> {p['destination']}: {p['state']}, {human_size(p['bytes_done'])} of "
              f"{human_size(p['bytes_total'])}{v}" + (f" ({p['error']})" if p.get("error") else ""))
    if s.get("error"):
        print(f"  error: {s['error']}")


def _list(c: Any, a: argparse.Namespace) -> int:
    sets = c.get("/recovery")
    if _json(a):
        _print_json(sets)
        return 0
    rows = [[s["id"], s["state"], f"{s['percent']:.1f}%", human_size(s["bytes_done"]), human_size(s["bytes_total"]),
             ", ".join(f"{p['snapshot']}->{p['destination']}" for p in s["pairs"]) or "-",
             _local_time(s["created_at"])] for s in sets]
    _table(None, ["Recovery", "State", "Done", "Bytes", "Of", "Pairs", "Created"], rows)
    return 0


def _show(c: Any, a: argparse.Namespace) -> int:
    s = c.get(f"/recovery/{_q(a.id)}")
    if _json(a):
        _print_json(s)
    else:
        _print_status(s)
    return 0


def _wait_cmd(c: Any, a: argparse.Namespace) -> int:
    return _follow(c, a, a.id, a.timeout)


def _cancel(c: Any, a: argparse.Namespace) -> int:
    s = c.post(f"/recovery/{_q(a.id)}/cancel")
    if _json(a):
        _print_json(s)
    else:
        print(f"recovery {s['id']} cancelled at {s['percent']:.1f}%; the destination holds a mix until resynced "
              "again")
    return 0
