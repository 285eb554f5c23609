"""Which files may back a LUN, judged on the real file (symlinks resolved), and which file a LUN's deletion removes.

A LUN's path used to be compared as text, so a symlink could make a new LUN write into another LUN's file, the
catalog or a pool's ``pool.db``, and the later ``lun delete`` removed what the link pointed at. This module owns the
rules: inside the data dir only ``luns/`` may hold LUN files; nothing inside a snapshot pool; never a file another
live LUN already serves (found by device and inode through :class:`BackingIndex`, so hard links and symlinks are
caught and no check scans every LUN). It also decides what a deleted LUN leaves behind: only a regular file that
lunsync created for that LUN, at its own path in the data dir, is removed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from lunsync.snapshots.catalog import AlreadyExists, Invalid, LunRecord

LUNS_DIRNAME = "luns"


def inside(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or below it (both already real and normalised)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def file_key(st: os.stat_result) -> tuple[int, int]:
    """What identifies the storage behind a path: the device number for a block device, else device and inode."""
    if stat.S_ISBLK(st.st_mode):
        return (-1, st.st_rdev)
    return (st.st_dev, st.st_ino)


def real_lun_path(name: str, where: str, data_dir: str, pools: Iterable[tuple[str, str]]) -> str:
    """The real path behind ``where`` (a LUN's configured path, made absolute), or :class:`Invalid` when the rules
    refuse it. ``pools`` are (name, directory) pairs."""
    real = os.path.realpath(where)
    data = os.path.realpath(data_dir)
    shown = where if real == where else f"{where} (which is {real})"
    if inside(real, data) and not (inside(real, os.path.join(data, LUNS_DIRNAME))
                                   and real != os.path.join(data, LUNS_DIRNAME)):
        raise Invalid(f"lun {name!r}: path {shown} is inside the data dir but not under its {LUNS_DIRNAME}/: the "
                      "catalog, the token and the pools live there")
    for pool, directory in pools:
        if inside(real, os.path.realpath(directory)):
            raise Invalid(f"lun {name!r}: path {shown} is inside snapshot pool {pool!r}")
    return real


@dataclass
class BackingIndex:
    """Which live LUN serves which file, by :func:`file_key`. Entries are checked again when hit, so a LUN closed
    without being forgotten here (or a recycled inode) never refuses a new one."""

    _owner: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)

    def add(self, name: str, path: str) -> None:
        try:
            self._owner[file_key(os.stat(path))] = (name, path)
        except OSError:
            pass  # nothing to alias yet

    def refuse_alias(self, name: str, real: str, live: Container[str]) -> None:
        """:class:`AlreadyExists` if ``real`` is the file a LUN in ``live`` (names) already serves."""
        try:
            key = file_key(os.stat(real))
        except FileNotFoundError:
            return
        hit = self._owner.get(key)
        if hit is None:
            return
        other, path = hit
        try:
            still = other in live and file_key(os.stat(path)) == key
        except OSError:
            still = False
        if not still:
            del self._owner[key]
            return
        if other != name:
            raise AlreadyExists(f"lun {name!r}: {real} is the backing file of lun {other!r}")


def removable(rec: LunRecord, path: str) -> bool:
    """Whether deleting ``rec`` removes its backing file at ``path``: lunsync made it, it sits at the LUN's own path
    in the data dir, and it is still a plain file there (not a link to something else)."""
    if not rec.owns_file or os.path.isabs(rec.path):
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode)
