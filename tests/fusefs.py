"""A FUSE passthrough file system for tests: it mirrors a source directory, can fail chosen operations with a chosen
errno, and can record every change and every sync for a power-loss replay.

This module owns the one FUSE layer of the test suite (pyfuse3, libfuse 3's maintained binding). A test mounts it
with :class:`FuseMount`, which runs ``python tests/fusefs.py SOURCE MOUNTPOINT`` as a child process and unmounts it
at the end. Two uses:

- **Faults.** :meth:`FuseMount.fail` makes the named operations (``write``, ``fsync``, ``create``, ``truncate``,
  ``mkdir``, ``unlink``, ``rename``) answer an errno (``EIO``, ``EROFS``, ``ENOSPC``...) from then on, for paths
  under an optional prefix; :meth:`FuseMount.heal` ends that. The rule travels in a small JSON control file beside
  the mount, which the file system rereads whenever its mtime changes.
- **Slow, stuck and partial faults.** :meth:`FuseMount.inject` adds a rule for one file (or everything under a
  prefix) and optionally one byte range of it: the ``read``, ``write`` or ``fsync`` calls it covers answer an errno,
  wait ``delay_s`` first, or hang until :meth:`FuseMount.heal`. A hang waits without holding the file system, so
  other files keep their speed (the mount serves requests concurrently).
- **Recording.** With ``record=PATH`` every change that reaches the file system (a write with its bytes, a size
  change, a create, link, unlink, rename, mkdir or rmdir) and every fsync/fdatasync/fsyncdir is appended, in the order the
  file system answered them, to a log with the monotonic time it was received (CLOCK_MONOTONIC is system-wide, so a
  client can compare its own acknowledgement times). Files are named in the log by the source's inode number,
  which a rename keeps. :func:`read_log` reads it back. Nothing is cached above this layer for writes: the mount
  has no writeback cache, so every ``write(2)`` of the daemon reaches the log when it is made.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

__all__ = ["FuseMount", "LogOp", "fuse_available", "read_log"]

# One record: kind, the monotonic time it was received, the file's source inode, an offset or size, the payload's
# length; the payload follows (a write's bytes, or a name: "parent_ino/name" for namespace changes, NUL-separated
# pairs for a rename).
_REC = struct.Struct("<BdQQI")
KINDS = ("write", "truncate", "create", "unlink", "rename", "mkdir", "rmdir", "fsync", "fdatasync", "fsyncdir",
         "link")
_KIND_NO = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True, slots=True)
class LogOp:
    """One recorded operation (see the module docstring): ``arg`` is a write's offset or a truncate's size."""

    kind: str
    t: float
    ino: int
    arg: int
    payload: bytes


def read_log(path: Path) -> list[LogOp]:
    raw = path.read_bytes()
    out = []
    off = 0
    while off + _REC.size <= len(raw):
        k, t, ino, arg, n = _REC.unpack_from(raw, off)
        off += _REC.size
        out.append(LogOp(KINDS[k], t, ino, arg, raw[off:off + n]))
        off += n
    return out


def fuse_available() -> str | None:
    """Why a FUSE mount cannot be made here (None: it can)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "mounting FUSE needs root here"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    return None


class FuseMount:
    """``SOURCE`` mirrored at ``MOUNTPOINT`` by a child process; a context manager that unmounts at the end."""

    def __init__(self, source: Path, mountpoint: Path, *, record: Path | None = None) -> None:
        self.source = Path(source)
        self.mountpoint = Path(mountpoint)
        self.record = record
        self.control = self.mountpoint.with_name(self.mountpoint.name + ".ctl.json")
        self._rules: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FuseMount:
        self.source.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.control.write_text("{}")
        args = [sys.executable, __file__, str(self.source), str(self.mountpoint), "--control", str(self.control)]
        if self.record is not None:
            args += ["--record", str(self.record)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.stop()
                raise RuntimeError(f"fusefs did not mount {self.mountpoint}: {err[-2000:]}")
            time.sleep(0.02)
        return self

    def fail(self, errname: str, ops: tuple[str, ...] = ("write", "fsync", "create", "truncate"),
             under: str = "") -> None:
        """From now on the ``ops`` on paths under ``under`` (relative to the mount) answer ``errno.<errname>``."""
        self._control({"errno": errname, "ops": list(ops), "under": under})

    def inject(self, ops: tuple[str, ...], *, file: str = "", under: str = "", start: int = 0, end: int | None = None,
               errname: str | None = None, delay_s: float = 0.0, hang: bool = False) -> None:
        """Add a rule: ``ops`` (``read``, ``write``, ``fsync``) on ``file`` (relative to the mount; or every path under
        ``under``) touching bytes ``[start, end)`` wait ``delay_s``, hang until :meth:`heal` (``hang``), and/or then
        answer ``errno.<errname>``. Rules add up until :meth:`heal`."""
        self._rules.append({"ops": list(ops), "file": file, "under": under, "start": start, "end": end,
                            "errno": errname, "delay_s": delay_s, "hang": hang})
        self._control({"rules": self._rules})

    def heal(self) -> None:
        self._rules = []
        self._control({})

    def _control(self, rule: dict[str, Any]) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(rule))
        os.replace(tmp, self.control)
        # The file system rereads the rule when the control file's mtime changes; make sure it does change.
        st = os.stat(self.control)
        os.utime(self.control, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    def stop(self) -> None:
        """Unmount (lazily if something still holds it) and wait for the child, which flushes the record."""
        if os.path.ismount(self.mountpoint) and subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                                               capture_output=True, check=False).returncode:
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, check=False)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the file system (runs in the child process) ------------------------------------------------------------------


def _serve(source: str, mountpoint: str, control: str, record: str | None) -> None:
    import pyfuse3
    import trio

    class Recorder:
        """Buffers records and writes them out in large pieces (the log is read only after unmount)."""

        def __init__(self, path: str) -> None:
            self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
            self.lock = threading.Lock()

        def add(self, kind: str, ino: int, arg: int = 0, payload: bytes = b"", t: float | None = None) -> None:
            with self.lock:
                self.f.write(_REC.pack(_KIND_NO[kind], time.monotonic() if t is None else t, ino, arg,
                                       len(payload)))
                if payload:
                    self.f.write(payload)

        def close(self) -> None:
            self.f.close()

    rec = Recorder(record) if record else None

    class Passthrough(pyfuse3.Operations):
        """Inode numbers are the source's (the root's is FUSE's ROOT_INODE); each inode maps to one path."""

        def __init__(self) -> None:
            super().__init__()
            self.root_ino = os.lstat(source).st_ino
            self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
            self.fds: dict[int, tuple[int, int]] = {}  # fh -> (fd, inode)
            self.rule: dict[str, Any] = {}
            self.rule_mtime = -1

        # -- helpers ------------------------------------------------------------------------------------------

        def _path(self, inode: int) -> str:
            try:
                return self.paths[inode]
            except KeyError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None

        def _child(self, parent: int, name: bytes) -> str:
            return os.path.join(self._path(parent), os.fsdecode(name))

        def _ino(self, st: os.stat_result) -> int:
            return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino

        def _rid(self, inode: int) -> int:
            """The inode as recorded: the source's number, also for the root."""
            return self.root_ino if inode == pyfuse3.ROOT_INODE else inode

        def _attr(self, st: os.stat_result) -> Any:
            a = pyfuse3.EntryAttributes()
            a.st_ino = self._ino(st)
            for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_atime_ns", "st_mtime_ns",
                      "st_ctime_ns"):
                setattr(a, f, getattr(st, f))
            a.st_blksize = 4096
            a.st_blocks = st.st_blocks
            a.generation = 0
            a.entry_timeout = 1.0
            a.attr_timeout = 1.0
            return a

        def _fault(self, op: str, path: str) -> None:
            try:
                m = os.stat(control).st_mtime_ns
            except OSError:
                m = -1
            if m != self.rule_mtime:
                self.rule_mtime = m
                try:
                    with open(control) as f:
                        self.rule = json.load(f)
                except (OSError, ValueError):
                    self.rule = {}
            rule = self.rule
            if rule and op in rule.get("ops", ()):
                under = os.path.join(source, rule.get("under", ""))
                if path == under.rstrip("/") or path.startswith(under.rstrip("/") + "/") or not rule.get("under"):
                    raise pyfuse3.FUSEError(getattr(errno, rule["errno"]))

        async def _io_rules(self, op: str, path: str, off: int, size: int) -> None:
            """Apply the byte-range rules of :meth:`FuseMount.inject` to one read, write or fsync."""
            self._fault(op, path)  # also rereads the control file
            for rule in self.rule.get("rules", ()):
                if op not in rule["ops"]:
                    continue
                if rule["file"]:
                    if path != os.path.join(source, rule["file"]):
                        continue
                elif rule["under"] and not path.startswith(os.path.join(source, rule["under"]).rstrip("/") + "/"):
                    continue
                end = rule["end"]
                if op != "fsync" and (off + size <= rule["start"] or (end is not None and off >= end)):
                    continue
                if rule["delay_s"]:
                    await trio.sleep(rule["delay_s"])
                if rule["hang"]:
                    while rule in self.rule.get("rules", ()):
                        await trio.sleep(0.05)
                        self._fault("", path)  # reread: heal() removes the rule
                    continue
                if rule["errno"]:
                    raise pyfuse3.FUSEError(getattr(errno, rule["errno"]))

        def _wrap(self, exc: OSError) -> Exception:
            return pyfuse3.FUSEError(exc.errno or errno.EIO)

        # -- names --------------------------------------------------------------------------------------------

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
            path = self._child(parent_inode, name)
            try:
                st = os.lstat(path)
            except OSError as e:
                raise self._wrap(e) from None
            self.paths[self._ino(st)] = path
            return self._attr(st)

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            fd = next((fd for fd, ino in self.fds.values() if ino == inode), None)
            try:
                st = os.fstat(fd) if fd is not None else os.lstat(self._path(inode))
            except OSError as e:
                raise self._wrap(e) from None
            return self._attr(st)

        async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
            path = self._path(inode)
            try:
                if fields.update_size:
                    self._fault("truncate", path)
                    if fh is not None and fh in self.fds:
                        os.ftruncate(self.fds[fh][0], attr.st_size)
                    else:
                        os.truncate(path, attr.st_size)
                    if rec:
                        rec.add("truncate", self._rid(inode), attr.st_size)
                if fields.update_mode:
                    os.chmod(path, stat.S_IMODE(attr.st_mode))
                if fields.update_atime or fields.update_mtime:
                    st = os.lstat(path)
                    os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                       attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
                return self._attr(os.lstat(path))
            except OSError as e:
                raise self._wrap(e) from None

        async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
            path = self._child(parent_inode, name)
            self._fault("mkdir", path)
            try:
                os.mkdir(path, mode)
                st = os.lstat(path)
            except OSError as e:
                raise self._wrap(e) from None
            self.paths[self._ino(st)] = path
            if rec:
                rec.add("mkdir", st.st_ino, 0, f"{self._rid(parent_inode)}/{os.fsdecode(name)}".encode())
            return self._attr(st)

        async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
            self._remove("rmdir", parent_inode, name, os.rmdir)

        async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
            self._remove("unlink", parent_inode, name, os.unlink)

        def _remove(self, kind: str, parent_inode: int, name: bytes, remove: Any) -> None:
            path = self._child(parent_inode, name)
            self._fault("unlink", path)
            try:
                ino = os.lstat(path).st_ino
                remove(path)
            except OSError as e:
                raise self._wrap(e) from None
            if rec:
                rec.add(kind, ino, 0, f"{self._rid(parent_inode)}/{os.fsdecode(name)}".encode())

        async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int,
                         ctx: Any) -> None:
            old, new = self._child(parent_old, name_old), self._child(parent_new, name_new)
            self._fault("rename", old)
            if flags:
                raise pyfuse3.FUSEError(errno.EINVAL)
            try:
                ino = os.lstat(old).st_ino
                os.rename(old, new)
            except OSError as e:
                raise self._wrap(e) from None
            for i, p in list(self.paths.items()):
                if p == old or p.startswith(old + "/"):
                    self.paths[i] = new + p[len(old):]
            if rec:
                rec.add("rename", ino, 0, f"{self._rid(parent_old)}/{os.fsdecode(name_old)}\0"
                                          f"{self._rid(parent_new)}/{os.fsdecode(name_new)}".encode())

        async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
            old, new = self._path(inode), self._child(new_parent_inode, new_name)
            self._fault("create", new)
            try:
                os.link(old, new)
                st = os.lstat(new)
            except OSError as e:
                raise self._wrap(e) from None
            self.paths[inode] = new  # the old name may go next (a link-then-unlink commit)
            if rec:
                rec.add("link", st.st_ino, 0, f"{self._rid(new_parent_inode)}/{os.fsdecode(new_name)}".encode())
            return self._attr(st)

        # -- directories --------------------------------------------------------------------------------------

        async def opendir(self, inode: int, ctx: Any) -> int:
            self._path(inode)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            path = self._path(fh)
            entries = sorted((e.inode(), e.name) for e in os.scandir(path))
            for ino, name in entries:
                if ino <= start_id:
                    continue
                try:
                    st = os.lstat(os.path.join(path, name))
                except OSError:
                    continue
                self.paths[self._ino(st)] = os.path.join(path, name)
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(st), ino):
                    break

        async def releasedir(self, fh: int) -> None:
            return None

        async def fsyncdir(self, fh: int, datasync: bool) -> None:
            fd = os.open(self._path(fh), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            except OSError as e:
                raise self._wrap(e) from None
            finally:
                os.close(fd)
            if rec:
                rec.add("fsyncdir", self._rid(fh))

        async def statfs(self, ctx: Any) -> Any:
            st = os.statvfs(source)
            out = pyfuse3.StatvfsData()
            for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                      "f_namemax"):
                setattr(out, f, getattr(st, f))
            return out

        # -- files --------------------------------------------------------------------------------------------

        def _new_fh(self, fd: int, inode: int) -> int:
            fh = fd  # descriptors are unique while open
            self.fds[fh] = (fd, inode)
            return fh

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            path = self._path(inode)
            if flags & (os.O_WRONLY | os.O_RDWR) and flags & os.O_TRUNC:
                self._fault("truncate", path)
            try:
                fd = os.open(path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT))
            except OSError as e:
                raise self._wrap(e) from None
            if rec and flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
                rec.add("truncate", self._rid(inode), 0)
            return pyfuse3.FileInfo(fh=self._new_fh(fd, inode))

        async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            path = self._child(parent_inode, name)
            self._fault("create", path)
            try:
                fd = os.open(path, (flags | os.O_CREAT | os.O_TRUNC) & ~(os.O_NOCTTY | os.O_DIRECT), mode)
                st = os.fstat(fd)
            except OSError as e:
                raise self._wrap(e) from None
            inode = self._ino(st)
            self.paths[inode] = path
            if rec:
                rec.add("create", st.st_ino, 0, f"{self._rid(parent_inode)}/{os.fsdecode(name)}".encode())
            return pyfuse3.FileInfo(fh=self._new_fh(fd, inode)), self._attr(st)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            await self._io_rules("read", self.paths.get(self.fds[fh][1], ""), off, size)
            try:
                return os.pread(self.fds[fh][0], size, off)
            except OSError as e:
                raise self._wrap(e) from None

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            fd, inode = self.fds[fh]
            await self._io_rules("write", self.paths.get(inode, ""), off, len(buf))
            t = time.monotonic()
            try:
                n = os.pwrite(fd, buf, off)
            except OSError as e:
                raise self._wrap(e) from None
            if rec:
                rec.add("write", self._rid(inode), off, bytes(buf[:n]), t)
            return n

        async def fsync(self, fh: int, datasync: bool) -> None:
            fd, inode = self.fds[fh]
            await self._io_rules("fsync", self.paths.get(inode, ""), 0, 0)
            try:
                (os.fdatasync if datasync else os.fsync)(fd)
            except OSError as e:
                raise self._wrap(e) from None
            if rec:
                rec.add("fdatasync" if datasync else "fsync", self._rid(inode))

        async def flush(self, fh: int) -> None:
            return None

        async def release(self, fh: int) -> None:
            fd, _ = self.fds.pop(fh)
            os.close(fd)

    ops = Passthrough()
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=lunsync-fusefs", "allow_other"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
        if rec:
            rec.close()


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="FUSE passthrough with fault injection and write recording (tests)")
    ap.add_argument("source")
    ap.add_argument("mountpoint")
    ap.add_argument("--control", required=True)
    ap.add_argument("--record", default=None)
    a = ap.parse_args(argv)
    _serve(os.path.abspath(a.source), a.mountpoint, a.control, a.record)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
