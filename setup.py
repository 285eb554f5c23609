"""Build of lunsync: pyproject.toml holds the metadata; this file adds the native modules.

The iSCSI data path (PDU codec, connection, the per-command task runner and statistics, SCSI dispatch with the
READ/WRITE handlers and the logical unit) and the file and block backends under it are compiled with mypyc from the
same typed sources, which stay the source of truth and run as they are. The rest of the storage engine (snapshots/:
resync, the catalog) is not compiled, except the copy-on-write volume and its pool (snapshots/cow.py), which every
first write after a snapshot runs through; what its tests replace on live objects are attributes it calls for that. LUNSYNC_PURE=1 builds a pure-Python package. An in-place build (an editable install) is always pure: a native
module next to its .py would shadow every later edit of it.

mypyc writes one C file per module (multi_file) and the build compiles them in parallel, one per core of the
build's CPU affinity: the single 313,000-line C file of one group took gcc -O3 1 min 52 s of CPU on one core here,
the split files 1 min 7 s in all, 46 s of wall time on 2 cores. Callgrind counted the same instructions per 4 KiB
WRITE(10) in tests/bench/hotpath.py (41,941 against 41,965) and 1.3 % more per READ(10) (44,046 against 43,479),
which is gcc no longer inlining small functions across modules.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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

    def build_extension(self, ext: Any) -> None:
        """Compile the extension's C files side by side; the compiler runs each as its own process."""
        compile_serially = self.compiler.compile

        def compile_in_parallel(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
            with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
                done = pool.map(lambda source: compile_serially([source], *args, **kwargs), sources)
                return [obj for objs in done for obj in objs]

        self.compiler.compile = compile_in_parallel
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_serially


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

    return list(mypycify([f"build/native/lunsync/{p}" for p in NATIVE], opt_level="3", multi_file=True,
                          target_dir="build/mypyc"))


setup(ext_modules=_native_modules(), cmdclass={"build_ext": _BuildExt})
