"""The ``lunsync`` command line: ``serve`` runs the daemon; every other command is a client of the REST API.

Besides the parser, this module owns how results look: rich tables with human sizes by default, the API's JSON
unchanged with ``--json``, and every error as one line on stderr with exit status 1 (argparse's usage errors exit 2).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from lunsync.snapshots.model import ConfigError, parse_label


def _size(text: str) -> int:
    from lunsync.provider.config import parse_size

    try:
        n: int = parse_size(text)
        return n
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lunsync", description="iSCSI target with snapshots and live LUN resync",
                                 parents=[_common()])
    ap.add_argument("--version", action="version", version=f"lunsync {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--data-dir", default="./lunsync-data", help="where the catalog and LUN files live")
    s.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                   help="iSCSI portal (repeatable; IPv6 as [::1]:3260); default 127.0.0.1:3260")
    s.add_argument("--config", metavar="FILE", help="TOML file applied to the catalog at start")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="least severe log records written (default info)")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text lines, or one JSON object per line: time, level, logger, message (default text)")
    s.add_argument("--hooks", metavar="FILE",
                   help="TOML file of named restore hooks ([hook.NAME] command = [...]); the only commands a restore "
                        "can run")
    s.add_argument("--demo", action="store_true", help="create the demo target and LUN 0 when missing")
    s.add_argument("--demo-size", type=_size, default=1 << 30, metavar="SIZE", help="demo LUN size (default 1GiB)")
    # Defaults live in daemon.ServeOptions; importing the daemon here would slow every client command by 0.4 s.
    s.add_argument("--api", metavar="HOST:PORT|unix:PATH",
                   help="management API address (default 127.0.0.1:8080; 'off' disables it)")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="Prometheus /metrics address (default 127.0.0.1:9476; 'off' disables it)")
    s.add_argument("--api-tls-cert", metavar="FILE", help="serve the API over TLS with this certificate (PEM)")
    s.add_argument("--api-tls-key", metavar="FILE", help="the private key of --api-tls-cert (PEM)")
    s.add_argument("--api-max-body", type=_size, default=1 << 20, metavar="SIZE",
                   help="largest API request body; larger ones get 413 unread (default 1MiB)")
    g = s.add_argument_group("gateways", "serve the rbd LUNs together with other lunsync daemons (ALUA, shared "
                                         "persistent reservations and configuration in the [ceph] cluster)")
    g.add_argument("--gateway", metavar="ID", help="this daemon's gateway id, unique among the gateways")
    g.add_argument("--port-group", type=int, metavar="N",
                   help="this gateway's ALUA target port group, TPGT and relative port id (1-65535), unique among "
                        "the gateways; required with --gateway")
    g.add_argument("--gateway-pool", default="rbd", metavar="POOL",
                   help="the RADOS pool that holds the gateways' shared objects (default rbd)")
    g.add_argument("--lease", type=int, default=10, metavar="SECONDS",
                   help="how long a dead gateway keeps a LUN's ownership before another takes it (2-300, default 10)")
    s.add_argument("--workers", type=int, metavar="N",
                   help="serve with N worker processes, one event loop each, each serving whole targets, behind a "
                        "control process that runs the portals and the API (0: one per core this process may run "
                        "on; default and 1: one process)")
    s.add_argument("--write-staging", type=_size, metavar="SIZE",
                   help="per LUN, first writes after a snapshot held in memory while their old data is preserved, "
                        "when the LUN's write cache is on (default 64MiB; 0 makes every one wait for its copy)")
    _client_commands(sub)
    return ap


# --- client commands -------------------------------------------------------------------------------------------------

Handler = Callable[[Any, argparse.Namespace], int]

# The CHAP secret lengths the Microsoft iSCSI Initiator accepts (it refuses the rest with a dialog, not at login).
CHAP_SECRET_MIN, CHAP_SECRET_MAX = 12, 16


class UsageError(ValueError):
    """A command line the CLI refuses before sending anything (exit status 2, like argparse's own)."""


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: options given before the command (lunsync --json lun list) must not be reset by the subparser.
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_argument_group("connection")
    g.add_argument("--api", default=argparse.SUPPRESS, metavar="URL",
                   help="API address: http(s)://HOST:PORT or unix:PATH (default $LUNSYNC_API or "
                        "http://127.0.0.1:8080)")
    g.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE", help="file holding the API token")
    g.add_argument("--data-dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="daemon data dir whose api-token to use (default $LUNSYNC_DATA_DIR or ./lunsync-data)")
    g.add_argument("--cacert", default=argparse.SUPPRESS, metavar="FILE", help="CA certificate for an https API")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON")
    return c


def _client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = _common()

    def leaf(group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: Handler,
             help_: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    def noun(name: str, help_: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        p = sub.add_parser(name, help=help_, description=help_)
        return p.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = noun("target", "iSCSI targets")
    p = leaf(t, "create", _target_create, "create a target")
    p.add_argument("iqn", metavar="IQN")
    p.add_argument("--alias", default="", help="TargetAlias shown to initiators")
    leaf(t, "list", _target_list, "list targets")
    p = leaf(t, "show", _target_show, "show one target")
    p.add_argument("iqn", metavar="IQN")
    p = leaf(t, "delete", _target_delete, "delete a target (refused while it maps LUNs, unless --force)")
    p.add_argument("iqn", metavar="IQN")
    p.add_argument("--force", action="store_true", help="unmap its LUNs first (the LUNs themselves stay)")

    lun = noun("lun", "logical units")
    p = leaf(lun, "create", _lun_create, "create a LUN and its backing file (or RBD image)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", type=_size, metavar="SIZE", help="e.g. 256MiB, 10GiB, 1TiB, 512M or bytes")
    p.add_argument("--from", dest="from_snapshot", metavar="LUN@SNAP",
                   help="instead of --size: a LUN with the snapshot's data, usable at once while it is copied in")
    p.add_argument("--rate", type=float, metavar="MIB_S", help="with --from: copy at this rate (default: adaptive)")
    p.add_argument("--backend", choices=("file", "block", "rbd"),
                   help="a regular file, a raw block device (default: block for a /dev/ path, else file) or a Ceph "
                        "RBD image (--pool, --image)")
    p.add_argument("--pool", help="with --backend rbd: the image's RADOS pool")
    p.add_argument("--image", help="with --backend rbd: the image; created when missing and --size is given, "
                                   "else attached at its own size; with --from an RBD snapshot: the clone's name "
                                   "(default NAME)")
    p.add_argument("--flatten", action="store_true", help="with --from an RBD snapshot: copy the clone's data in, "
                                                          "in the background, so it no longer needs the snapshot")
    p.add_argument("--wait", action="store_true", help="with --flatten: return once the flatten is done")
    p.add_argument("--path", help="backing file or block device (default <data-dir>/luns/NAME.img)")
    p.add_argument("--block-size", type=int, choices=(512, 4096), default=512)
    p.add_argument("--thick", action="store_true", help="allocate every block now instead of a sparse file")
    p.add_argument("--read-only", action="store_true")
    add_label_option(p, "label the LUN (repeatable)")
    p = leaf(lun, "label", _lun_label, "set labels (KEY=VALUE) and remove them (KEY-) on a LUN")
    p.add_argument("name", metavar="NAME")
    add_label_changes(p)
    p = leaf(lun, "map", _lun_map, "show a LUN on a target")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--target", required=True, metavar="IQN")
    p.add_argument("--lun", type=int, metavar="N", help="LUN number (default: the lowest free one)")
    p = leaf(lun, "unmap", _lun_unmap, "remove a LUN from a target")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--target", required=True, metavar="IQN")
    p = leaf(lun, "resize", _lun_resize, "grow a LUN live (initiators are told; shrinking is refused)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", required=True, type=_size, metavar="SIZE")
    add_label_option(leaf(lun, "list", _lun_list, "list LUNs"), "only LUNs with this label (repeatable: all must match)")
    p = leaf(lun, "show", _lun_show, "show one LUN")
    p.add_argument("name", metavar="NAME")
    p = leaf(lun, "flatten", _lun_flatten, "copy an RBD clone's data in, in the background, so it no longer needs "
                                             "its snapshot")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--wait", action="store_true", help="follow it to the end; exit 1 unless it is done")
    p = leaf(lun, "delete", _lun_delete, "delete a LUN (refused while mapped); an RBD image stays unless asked")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--delete-image", action="store_true", help="with an rbd LUN: delete its image too")

    acl = noun("acl", "which initiators may log in to a target (an empty ACL admits any)")
    for action, handler, text in (("add", _acl_add, "allow an initiator"),
                                  ("remove", _acl_remove, "disallow an initiator (its sessions are logged out)")):
        p = leaf(acl, action, handler, text)
        p.add_argument("initiator", metavar="INITIATOR_IQN")
        p.add_argument("--target", required=True, metavar="IQN")
    p = leaf(acl, "list", _acl_list, "list ACLs (of one target, or all)")
    p.add_argument("--target", metavar="IQN")

    chap = noun("chap", "CHAP authentication of a target")
    p = leaf(chap, "set", _chap_set, "require CHAP on a target (secrets are read from a prompt, a file or stdin)")
    p.add_argument("--target", required=True, metavar="IQN")
    p.add_argument("--user", required=True)
    p.add_argument("--secret", help="the secret (visible in ps and shell history; prefer --secret-file or the prompt)")
    p.add_argument("--secret-file", metavar="FILE", help="read the secret from FILE ('-' for stdin)")
    p.add_argument("--mutual-user", help="mutual CHAP: the name the target answers with")
    p.add_argument("--mutual-secret", help="mutual CHAP: the target's secret")
    p.add_argument("--mutual-secret-file", metavar="FILE")
    p.add_argument("--force", action="store_true",
                   help=f"accept secrets outside {CHAP_SECRET_MIN}-{CHAP_SECRET_MAX} characters, which Windows' "
                        "initiator refuses (Linux's accepts them)")
    p = leaf(chap, "clear", _chap_clear, "stop requiring CHAP")
    p.add_argument("--target", required=True, metavar="IQN")
    p = leaf(chap, "show", _chap_show, "show CHAP settings (never the secrets)")
    p.add_argument("--target", required=True, metavar="IQN")

    sess = noun("session", "logged-in iSCSI sessions")
    leaf(sess, "list", _session_list, "list sessions with per-LUN counters")
    p = leaf(sess, "logout", _session_logout, "force a session out")
    p.add_argument("tsih", type=int, metavar="TSIH")

    p = sub.add_parser("status", parents=[common], help="daemon status")
    p.set_defaults(handler=_status)
    p = sub.add_parser("portals", parents=[common], help="the iSCSI portals the daemon listens on")
    p.set_defaults(handler=_portals)
    p = sub.add_parser("apply", parents=[common], help="make the array match a TOML file (prints the plan)")
    p.add_argument("file", metavar="FILE", help="the configuration ('-' for stdin)")
    p.add_argument("--dry-run", action="store_true", help="only print what would change")
    p.set_defaults(handler=_apply)
    p = sub.add_parser("export", parents=[common], help="print the array as TOML (CHAP secrets included)")
    p.set_defaults(handler=_export)
    p = sub.add_parser("backup", parents=[common],
                       help="write a consistent copy of the catalog and the pools' chunk maps into DIR")
    p.add_argument("dir", metavar="DIR", help="a directory on the array's host that is absent or empty")
    p.set_defaults(handler=_backup)
    from lunsync.provider.cli_snapshots import add_snapshot_commands  # imports this module: not at the top

    add_snapshot_commands(noun, leaf)
    from lunsync.provider.cli_resync import add_resync_commands  # imports this module: not at the top

    add_resync_commands(sub, noun, leaf, common)


# --- output ----------------------------------------------------------------------------------------------------------


def human_size(n: int) -> str:
    """A size for people, in the largest binary unit it reaches: exact when the unit divides it (10GiB), else three
    significant digits (252GiB, 95.4MiB, 1.5KiB), never a count of thousands of a small unit."""
    for unit, scale in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            if n % scale == 0:
                return f"{n // scale}{unit}"
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"
    return f"{n}B"


def _table(title: str | None, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows:
        table.add_row(*row)
    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError  # main() answers a closed pipe, the same way for every kind of output

    # Piped output gets a wide console: rich would otherwise fold IQNs at 80 columns.
    _Console(width=None if sys.stdout.isatty() else 200).print(table)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _done(args: argparse.Namespace, result: Any, text: str) -> int:
    if getattr(args, "json", False):
        _print_json(result if result is not None else {"ok": True})
    else:
        print(text)
    return 0


def _q(segment: str) -> str:
    from lunsync.provider.client import quote

    quoted: str = quote(segment)
    return quoted


def _read_text(file: str) -> str:
    """A file's text, or stdin's for '-'; a ValueError saying which file when it cannot be read."""
    try:
        if file == "-":
            return sys.stdin.read()
        with open(file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text") from None


# --- handlers --------------------------------------------------------------------------------------------------------


def _target_rows(targets: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for t in targets:
        luns = ", ".join(f"{m['lun']}:{m['name']}" for m in t["luns"]) or "-"
        chap = ("mutual" if t["chap"]["mutual"] else t["chap"]["user"]) if t["chap"]["enabled"] else "-"
        rows.append([t["iqn"], t["alias"] or "-", luns, ", ".join(t["acl"]) or "any", chap, str(t["sessions"])])
    return rows


_TARGET_COLUMNS = ["IQN", "Alias", "LUNs", "ACL", "CHAP", "Sessions"]


def _target_create(c: Any, a: argparse.Namespace) -> int:
    t = c.post("/targets", {"iqn": a.iqn, "alias": a.alias})
    return _done(a, t, f"created target {t['iqn']}")


def _target_list(c: Any, a: argparse.Namespace) -> int:
    targets = c.get("/targets")
    if getattr(a, "json", False):
        _print_json(targets)
    else:
        _table(None, _TARGET_COLUMNS, _target_rows(targets))
    return 0


def _target_show(c: Any, a: argparse.Namespace) -> int:
    t = c.get(f"/targets/{_q(a.iqn)}")
    if getattr(a, "json", False):
        _print_json(t)
    else:
        _table(None, _TARGET_COLUMNS, _target_rows([t]))
    return 0


def _target_delete(c: Any, a: argparse.Namespace) -> int:
    r = c.delete(f"/targets/{_q(a.iqn)}", **({"force": "true"} if a.force else {}))
    return _done(a, r, f"deleted target {a.iqn}")


def _label_arg(text: str) -> str:
    try:
        parse_label(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return text


def add_label_option(p: argparse.ArgumentParser, help_: str) -> None:
    """``--label KEY=VALUE``, repeatable, checked as the API checks it."""
    p.add_argument("--label", dest="labels", action="append", default=[], type=_label_arg, metavar="KEY=VALUE",
                   help=help_)


def _label_change(text: str) -> str:
    if "=" not in text and text.endswith("-") and len(text) > 1:
        return text
    return _label_arg(text)


def add_label_changes(p: argparse.ArgumentParser) -> None:
    p.add_argument("changes", nargs="+", type=_label_change, metavar="KEY=VALUE|KEY-",
                   help="KEY=VALUE sets a label, KEY- removes one")


def label_body(changes: list[str]) -> dict[str, Any]:
    """The PATCH body of ``lun label`` and ``snapshot label``."""
    pairs = [parse_label(x) for x in changes if "=" in x]
    return {"set": dict(pairs), "remove": [x[:-1] for x in changes if "=" not in x]}


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) or "-"


def with_labels(columns: list[str], rows: list[list[str]], objs: list[dict[str, Any]]) -> tuple[list[str],
                                                                                              list[list[str]]]:
    """A Labels column at the end, when any of ``objs`` has labels (most arrays use none)."""
    if not any(o["labels"] for o in objs):
        return columns, rows
    return [*columns, "Labels"], [[*r, labels_text(o["labels"])] for r, o in zip(rows, objs, strict=True)]


def _lun_rows(luns: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for lun in luns:
        flags = [lun["backend"], "thin" if lun["thin"] else "thick"] + (["ro"] if lun["read_only"] else [])
        maps = ", ".join(f"{m['target']} lun {m['lun']}" for m in lun["mappings"]) or "-"
        rows.append([lun["name"], human_size(lun["size_bytes"]), str(lun["block_size"]), ",".join(flags), maps,
                     lun["serial"], lun["path"]])
    return rows


_LUN_COLUMNS = ["Name", "Size", "Block", "Type", "Mapped on", "Serial", "Path"]


def _lun_create(c: Any, a: argparse.Namespace) -> int:
    if a.from_snapshot:
        if (a.size is not None or a.backend or a.path or a.block_size != 512 or a.thick or a.read_only or a.labels
                or a.pool):
            raise UsageError("--from takes the snapshot's size and block size: give no other option but --rate "
                             "(or, for an RBD snapshot, --image and --flatten)")
        body: dict[str, Any] = {"name": a.name, "from_snapshot": a.from_snapshot}
        if a.rate is not None:
            body["rate_mib_s"] = a.rate
        if a.image:
            body["image"] = a.image
        if a.flatten:
            body["flatten"] = True
        elif a.wait:
            raise UsageError("--wait: only with --flatten")
        lun = c.post("/luns", body)
        if lun["backend"] == "rbd":
            if a.flatten and a.wait:
                return _follow_flatten(c, a, lun)
            return _done(a, lun, f"created lun {lun['name']} as an RBD clone of {a.from_snapshot} at {lun['path']}"
                                 f"{', flattening in the background' if a.flatten else ''}: "
                                 f"{human_size(lun['size_bytes'])}, serial {lun['serial']}")
        job = (c.location or "").rsplit("/", 1)[-1]
        return _done(a, lun, f"created lun {lun['name']} from {a.from_snapshot}: {human_size(lun['size_bytes'])}, "
                             f"serial {lun['serial']}; usable now, copied in by recovery set {job} "
                             f"(lunsync recovery wait {job})")
    if a.rate is not None or a.flatten or a.wait:
        raise UsageError(f"{'--rate' if a.rate is not None else '--flatten' if a.flatten else '--wait'}: only with "
                         "--from")
    rbd = a.backend == "rbd"
    if rbd and (not a.pool or not a.image or a.path or a.thick):
        raise UsageError("--backend rbd: give --pool POOL --image IMAGE (no --path; an image is always thin)")
    if not rbd and (a.pool or a.image):
        raise UsageError("--pool/--image: only with --backend rbd")
    if a.size is None and not rbd:
        raise UsageError("give --size SIZE, or --from LUN@SNAP")
    body = {"name": a.name, "block_size": a.block_size, "thin": not a.thick,
            "read_only": a.read_only, "labels": dict(parse_label(x) for x in a.labels)}
    if a.size is not None:
        body["size"] = a.size
    if a.backend:
        body["backend"] = a.backend
    if rbd:
        body["pool"], body["image"] = a.pool, a.image
    if a.path:
        # Relative paths on the command line are the user's working dir, not the daemon's data dir.
        body["path"] = os.path.abspath(a.path)
    lun = c.post("/luns", body)
    return _done(a, lun, f"created lun {lun['name']}: {human_size(lun['size_bytes'])}, serial {lun['serial']}")


def _lun_label(c: Any, a: argparse.Namespace) -> int:
    lun = c.patch(f"/luns/{_q(a.name)}/labels", label_body(a.changes))
    return _done(a, lun, f"lun {lun['name']} labels: {labels_text(lun['labels'])}")


def _lun_map(c: Any, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": a.name}
    if a.lun is not None:
        body["lun"] = a.lun
    m = c.post(f"/targets/{_q(a.target)}/luns", body)
    return _done(a, m, f"mapped lun {m['name']} on {a.target} as LUN {m['lun']}")


def _lun_unmap(c: Any, a: argparse.Namespace) -> int:
    r = c.delete(f"/targets/{_q(a.target)}/luns/{_q(a.name)}")
    return _done(a, r, f"unmapped lun {a.name} from {a.target}")


def _lun_resize(c: Any, a: argparse.Namespace) -> int:
    lun = c.post(f"/luns/{_q(a.name)}/resize", {"size": a.size})
    return _done(a, lun, f"lun {lun['name']} is now {human_size(lun['size_bytes'])}")


def _lun_list(c: Any, a: argparse.Namespace) -> int:
    luns = c.get("/luns", **({"label": a.labels} if a.labels else {}))
    if getattr(a, "json", False):
        _print_json(luns)
    else:
        _table(None, *with_labels(_LUN_COLUMNS, _lun_rows(luns), luns))
    return 0


def _lun_show(c: Any, a: argparse.Namespace) -> int:
    lun = c.get(f"/luns/{_q(a.name)}")
    if getattr(a, "json", False):
        _print_json(lun)
    else:
        _table(None, _LUN_COLUMNS + ["NAA", "Labels"], [_lun_rows([lun])[0] + [lun["naa"], labels_text(lun["labels"])]])
    return 0


def _lun_flatten(c: Any, a: argparse.Namespace) -> int:
    lun = c.post(f"/luns/{_q(a.name)}/flatten", {})
    if a.wait:
        return _follow_flatten(c, a, lun)
    job = lun["flatten"]
    return _done(a, lun, f"flattening lun {lun['name']} in the background ({job['percent']:.0f}%; lunsync lun show "
                         f"{lun['name']} --json shows it)")


def _follow_flatten(c: Any, a: argparse.Namespace, lun: dict[str, Any]) -> int:
    """Poll the LUN until its flatten is no longer running; 0 once done, 1 otherwise."""
    import time

    from lunsync.provider.cli_progress import ProgressDisplay, Step

    with ProgressDisplay(f"flatten {lun['name']}", enabled=not getattr(a, "json", False)) as shown:
        while True:
            job = lun["flatten"]
            size = lun["size_bytes"]  # the bar counts bytes: the objects done, as a share of the image
            shown.update(Step(size * job["objects_done"] // max(1, job["objects_total"]), size, None, None,
                              job["state"]))
            if job["state"] != "running":
                break
            time.sleep(0.2)
            lun = c.get(f"/luns/{_q(lun['name'])}")
    ok = job["state"] == "done"
    _done(a, lun, f"lun {lun['name']} flattened: it no longer needs its snapshot" if ok else
          f"lun {lun['name']}: flatten {job['state']}{': ' + job['error'] if job['error'] else ''}")
    return 0 if ok else 1


def _lun_delete(c: Any, a: argparse.Namespace) -> int:
    if a.delete_image:
        r = c.delete(f"/luns/{_q(a.name)}", delete_image="true")
        return _done(a, r, f"deleted lun {a.name} and its rbd image")
    r = c.delete(f"/luns/{_q(a.name)}")
    return _done(a, r, f"deleted lun {a.name}")


def _acl_add(c: Any, a: argparse.Namespace) -> int:
    acl = c.post(f"/targets/{_q(a.target)}/acls", {"initiator": a.initiator})
    return _done(a, acl, f"{a.initiator} may log in to {a.target}")


def _acl_remove(c: Any, a: argparse.Namespace) -> int:
    r = c.delete(f"/targets/{_q(a.target)}/acls/{_q(a.initiator)}")
    return _done(a, r, f"{a.initiator} removed from the ACL of {a.target}")


def _acl_list(c: Any, a: argparse.Namespace) -> int:
    if a.target:
        acls = {a.target: c.get(f"/targets/{_q(a.target)}/acls")}
    else:
        acls = {t["iqn"]: t["acl"] for t in c.get("/targets")}
    if getattr(a, "json", False):
        _print_json(acls)
    else:
        _table(None, ["Target", "Allowed initiators"], [[iqn, "\n".join(names) or "any"] for iqn, names in acls.items()])
    return 0


def _read_secret(value: str | None, file: str | None, prompt: str) -> str | None:
    if value is not None:
        return value
    if file is not None:
        return _read_text(file).strip("\r\n")
    return None


def _chap_set(c: Any, a: argparse.Namespace) -> int:
    secret = _read_secret(a.secret, a.secret_file, "CHAP secret: ")
    if secret is None:
        secret = getpass.getpass("CHAP secret: ") if sys.stdin.isatty() else sys.stdin.readline().strip("\r\n")
    body: dict[str, Any] = {"user": a.user, "secret": secret}
    mutual_secret = _read_secret(a.mutual_secret, a.mutual_secret_file, "mutual CHAP secret: ")
    if a.mutual_user is not None:
        if mutual_secret is None:
            mutual_secret = getpass.getpass("mutual CHAP secret: ")
        body.update(mutual_user=a.mutual_user, mutual_secret=mutual_secret)
    elif mutual_secret is not None:
        raise ValueError("--mutual-secret needs --mutual-user")
    if not a.force:
        for what, value in (("--secret", secret), ("--mutual-secret", body.get("mutual_secret"))):
            if value is not None and not CHAP_SECRET_MIN <= len(value) <= CHAP_SECRET_MAX:
                raise UsageError(f"{what} has {len(value)} characters: the Microsoft iSCSI Initiator accepts only "
                                 f"{CHAP_SECRET_MIN} to {CHAP_SECRET_MAX}; choose another, or pass --force to use "
                                 "it anyway")
    r = c.put(f"/targets/{_q(a.target)}/chap", body)
    return _done(a, r, f"CHAP required on {a.target} for user {a.user}" + (" (mutual)" if a.mutual_user else ""))


def _chap_clear(c: Any, a: argparse.Namespace) -> int:
    r = c.delete(f"/targets/{_q(a.target)}/chap")
    return _done(a, r, f"CHAP no longer required on {a.target}")


def _chap_show(c: Any, a: argparse.Namespace) -> int:
    chap = c.get(f"/targets/{_q(a.target)}/chap")
    if getattr(a, "json", False):
        _print_json(chap)
    elif not chap["enabled"]:
        print(f"{a.target}: no CHAP")
    else:
        print(f"{a.target}: CHAP user {chap['user']}" + (f", mutual user {chap['mutual_user']}" if chap["mutual"]
                                                        else ""))
    return 0


def _session_list(c: Any, a: argparse.Namespace) -> int:
    sessions = c.get("/sessions")
    if getattr(a, "json", False):
        _print_json(sessions)
        return 0
    rows = []
    for s in sessions:
        io = ", ".join(f"{x['lun']}: {x['reads']}r/{x['writes']}w {human_size(x['read_bytes'])}/"
                       f"{human_size(x['write_bytes'])}" for x in s["luns"]) or "-"
        rows.append([str(s["tsih"]), s["initiator"], s["address"], s["target"] or "(discovery)", s["isid"],
                     s["auth"], io])
    _table(None, ["TSIH", "Initiator", "Address", "Target", "ISID", "Auth", "I/O per LUN (read/write)"], rows)
    return 0


def _session_logout(c: Any, a: argparse.Namespace) -> int:
    r = c.delete(f"/sessions/{a.tsih}")
    return _done(a, r, f"session {a.tsih} logged out")


def _status(c: Any, a: argparse.Namespace) -> int:
    st = c.get("/status")
    if getattr(a, "json", False):
        _print_json(st)
        return 0
    uptime = int(st["uptime_s"])
    rows = [["version", st["version"]], ["uptime", f"{uptime // 3600}h{uptime % 3600 // 60:02d}m{uptime % 60:02d}s"],
            ["data dir", st["data_dir"]], ["portals", ", ".join(st["portals"]) or "-"], ["api", st["api"]],
            ["metrics", st["metrics"] or "off"], ["targets", str(st["targets"])], ["luns", str(st["luns"])],
            ["sessions", str(st["sessions"])], ["connections", str(st["connections"])]]
    workers = st.get("workers") or []
    # Without --workers, with --workers 1, or with 0 on a single core, the daemon is one process.
    rows.append(["workers", f"{len(workers)} behind a control process" if workers else "none: one process"])
    rows += [["attention", line] for line in st.get("attention", [])]
    _table(None, ["", ""], rows)
    if workers:
        _table("workers", ["Worker", "PID", "State", "Restarts", "Sessions", "Targets", "LUNs"],
               [[str(w["index"]), str(w["pid"] or "-"), "up" if w["up"] else "down", str(w["restarts"]),
                 str(w["sessions"]), ", ".join(w["targets"]) or "-", ", ".join(w["luns"]) or "-"] for w in workers])
    return 0


def _portals(c: Any, a: argparse.Namespace) -> int:
    portals = c.get("/portals")
    if getattr(a, "json", False):
        _print_json(portals)
    else:
        _table(None, ["Address", "TPGT"], [[p["address"], str(p["tpgt"])] for p in portals])
    return 0


def _apply(c: Any, a: argparse.Namespace) -> int:
    text = _read_text(a.file)
    r = c.post("/apply", {"config": text, "dry_run": a.dry_run, "source": a.file})
    if getattr(a, "json", False):
        _print_json(r)
        return 0
    for line in r["plan"]:
        print(line)
    refused = len(r["refused"])
    n = len(r["plan"]) - refused
    if not n and not refused:
        print("no changes: the array already matches " + a.file)
    elif a.dry_run:
        print(f"dry run: {n} change(s) would be made")
        if refused:
            print(f"apply would be refused: {refused} step(s) marked '!' cannot be carried out")
    else:
        print(f"{n} change(s) applied")
    return 0


def _export(c: Any, a: argparse.Namespace) -> int:
    r = c.get("/export")
    if getattr(a, "json", False):
        _print_json(r)
    else:
        sys.stdout.write(r["config"])
    return 0


def _backup(c: Any, a: argparse.Namespace) -> int:
    r = c.post("/backup", {"dir": os.path.abspath(a.dir)})
    pools = ", ".join(p["name"] for p in r["pools"]) or "none"
    return _done(a, r, f"backup written to {r['dir']} (catalog schema {r['schema_version']}; pools: {pools})")


# Exit statuses by class of failure, so scripts can tell "already gone" from "try again" (documented in the README).
EXIT_OK = 0
EXIT_REFUSED = 1  # the request is invalid (400, 422), or a local file could not be read
EXIT_USAGE = 2  # the command line is wrong (argparse's own status)
EXIT_NOT_FOUND = 3  # 404: the object does not exist
EXIT_CONFLICT = 4  # 409: it exists already, is in use, or its state forbids it
EXIT_SERVER = 5  # 5xx: the daemon failed, or its storage did (503); retrying later may succeed
EXIT_UNREACHABLE = 6  # no daemon answered, or it refused the token (401, 403)


def exit_status(status: int | None, code: str) -> int:
    """The exit status of a failed request, from its HTTP status (None: no answer) and code word."""
    if status is None:
        return EXIT_USAGE if code == "usage" else EXIT_UNREACHABLE
    if status in (401, 403):
        return EXIT_UNREACHABLE
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if status >= 500:
        return EXIT_SERVER
    return EXIT_REFUSED


def _fail(args: argparse.Namespace, message: str, rc: int, body: dict[str, Any] | None = None) -> int:
    """Report a failure on stderr: one line, or under ``--json`` the error body as one JSON line, so stdout holds only
    results and a program can parse either stream."""
    if getattr(args, "json", False):
        print(json.dumps(body if body is not None else {"error": message, "code": "invalid"}, sort_keys=True),
              file=sys.stderr)
    else:
        print(f"lunsync: {message}", file=sys.stderr)
    return rc


def _run_client(args: argparse.Namespace) -> int:
    from lunsync.provider.client import Client, ClientError, Endpoint, find_token

    try:
        endpoint = Endpoint.parse(getattr(args, "api", None))
        token = find_token(getattr(args, "token_file", None), getattr(args, "data_dir", None))
        with Client(endpoint, token, cacert=getattr(args, "cacert", None) or os.environ.get("LUNSYNC_CACERT")) as c:
            rc: int = args.handler(c, args)
            return rc
    except ClientError as e:
        return _fail(args, str(e), exit_status(e.status, e.code), e.as_dict())
    except UsageError as e:
        return _fail(args, str(e), EXIT_USAGE, {"error": str(e), "code": "usage"})
    except BrokenPipeError:
        raise  # not a failure of the request: main() ends quietly
    except (ValueError, OSError) as e:
        return _fail(args, str(e), EXIT_REFUSED)
    except KeyboardInterrupt:
        return 130


# What `serve` imports that the client does not; pyproject gives each the marker sys_platform == 'linux'.
SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client", "aiofiles", "crc32c")


def serve_unavailable() -> str | None:
    """Why the daemon cannot run here, or None. It needs Linux (preadv with RWF_NOWAIT, copy_file_range, fcntl
    locks); elsewhere pip installs only the client. uvloop is optional: without it the daemon uses asyncio's loop."""
    if not sys.platform.startswith("linux"):
        return (f"lunsync serve runs on Linux only (this is {sys.platform}); the other commands are clients and work "
                "here against a daemon's --api URL")
    import importlib.util

    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"lunsync serve needs {', '.join(missing)}, which are not installed (pip install lunsync on Linux)"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`lunsync lun list | head -1`): what it wanted it has. Point stdout at /dev/null so
        # the interpreter's final flush does not fail again, and exit as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lunsync")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from lunsync.provider.api import VERSION

        return VERSION


def _main(argv: list[str] | None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "serve":
        refusal = serve_unavailable()
        if refusal:
            print(f"lunsync: {refusal}", file=sys.stderr)
            return 2
        from lunsync.provider import daemon
        from lunsync.snapshots.cow import DEFAULT_STAGING_BYTES

        gateway = None
        if args.gateway is not None or args.port_group is not None:
            from lunsync.provider.shared_luns import GatewaySettings

            if args.gateway is None or args.port_group is None:
                ap.error("--gateway and --port-group go together")
            try:
                gateway = GatewaySettings(args.gateway, args.port_group, args.gateway_pool, args.lease)
            except ValueError as e:
                ap.error(str(e))
        opts = daemon.ServeOptions(data_dir=args.data_dir, listen=args.listen, config=args.config, demo=args.demo,
                                   demo_size=args.demo_size, api=args.api or daemon.DEFAULT_API,
                                   metrics=args.metrics or daemon.DEFAULT_METRICS, api_tls_cert=args.api_tls_cert,
                                   api_tls_key=args.api_tls_key, api_max_body_bytes=args.api_max_body,
                                   hooks=args.hooks, log_level=args.log_level, log_format=args.log_format,
                                   gateway=gateway, workers=args.workers,
                                   write_staging_bytes=DEFAULT_STAGING_BYTES if args.write_staging is None
                                   else args.write_staging)
        from lunsync.snapshots.catalog import CatalogError

        try:
            rc: int = daemon.run(opts)
            return rc
        except (ValueError, OSError, CatalogError) as e:
            print(f"lunsync: {e}", file=sys.stderr)
            return 1
    if hasattr(args, "handler"):
        return _run_client(args)
    ap.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
