"""Build of lunsync: pyproject.toml holds the metadata; this file adds the native modules.

The iSCSI data path (PDU codec, connection, the per-command task runner and statistics, SCSI dispatch with the
READ/WRITE handlers and the logical unit) and the file and block backends under it are compiled with mypyc from the
same typed sources, which stay the source of truth and run as they are. The rest of the storage engine (snapshots/:
resync, the catalog) is not compiled, except the copy-on-write volume and its pool (snapshots/cow.py), which every
first write after a snapshot runs through; what its tests replace on live objects are attributes it calls for that. LUNSYNC_PURE=1 builds a pure-Python package. An in-place build (an editable install) is always pure: a native
module next to its .py would shadow every later edit of it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent

# Source files compiled to native modules, as the package they install into names them (see package-dir).
NATIVE = [
    "target/pdu.py",
    "target/sequencing.py",
    "target/events.py",
    "target/transfer.py",
    "target/control.py",
    "target/connection.py",
    "target/scsi/task.py",
    "target/scsi/sense.py",
    "target/scsi/registry.py",
    "target/scsi/lu.py",
    "target/scsi/sbc.py",
    "target/scsi/target.py",
    "target/stats.py",
    "target/execution.py",
    "snapshots/backend.py",
    "snapshots/cow.py",
]


class _BuildExt(build_ext):
    def run(self) -> None:
        if self.inplace:
            print("lunsync: in-place build (editable install): native modules skipped, the sources run as they are",
                  file=sys.stderr)
            self.extensions = []
            return
        super().run()


def _native_modules() -> list[object]:
    if os.environ.get("LUNSYNC_PURE", "") not in ("", "0"):
        return []
    # mypyc names a module after the package directories above its file. The sources live in target/, snapshots/
    # and provider/ but install as lunsync.target, ...: build/native holds a lunsync/ of symlinks, the same map.
    root = HERE / "build" / "native" / "lunsync"
    root.mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").touch()
    for d in ("target", "snapshots", "provider"):
        link = root / d
        if not link.is_symlink():
            link.symlink_to(HERE / d, target_is_directory=True)
    from mypyc.build import mypycify

    return list(mypycify([f"build/native/lunsync/{p}" for p in NATIVE], opt_level="3", target_dir="build/mypyc"))


setup(ext_modules=_native_modules(), cmdclass={"build_ext": _BuildExt})
