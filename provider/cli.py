"""The ``lunsync`` command line: ``serve`` runs the daemon; every other command is a client of the REST API."""

from __future__ import annotations

import argparse
import sys

from lunsync.provider import daemon


def _size(text: str) -> int:
    from lunsync.provider.config import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lunsync", description="iSCSI target with snapshots and live LUN resync")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--data-dir", default="./lunsync-data", help="where the catalog and LUN files live")
    s.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                   help="iSCSI portal (repeatable; IPv6 as [::1]:3260); default 127.0.0.1:3260")
    s.add_argument("--config", metavar="FILE", help="TOML file applied to the catalog at start")
    s.add_argument("--demo", action="store_true", help="create the demo target and LUN 0 when missing")
    s.add_argument("--demo-size", type=_size, default=1 << 30, metavar="SIZE", help="demo LUN size (default 1GiB)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "serve":
        opts = daemon.ServeOptions(data_dir=args.data_dir, listen=args.listen, config=args.config, demo=args.demo,
                                   demo_size=args.demo_size)
        try:
            return daemon.run(opts)
        except (ValueError, OSError) as e:
            print(f"lunsync: {e}", file=sys.stderr)
            return 1
    ap.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
