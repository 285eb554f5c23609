"""The filesystem helpers: every place in lunsync that commits a file, copies a byte range, makes a range read as
zeros, or turns an ``OSError`` into the storage error family does it through this module, one way.

It owns the atomic commit of a small file (the rtslib way: a temporary file in the same directory, written, fsync'ed,
renamed over the name, then the directory fsync'ed, so a crash leaves the old file or the new one and never a torn
one), the offloaded copy (``os.copy_file_range``, a reflink on XFS/btrfs) with its buffered fallback, the "make this
range read as zeros" ladder (punch a hole, then ``FALLOC_FL_ZERO_RANGE``, then written zeros), full-length
``pwritev``/``preadv`` loops, and the OSError -> storage-error mapping that DESIGN.md gives to the storage layer
alone. Everything here blocks: callers on the event loop run it in a thread. It imports only the error family, so
the SCSI layer (persistent-reservation state) and the control plane (configuration, API token, backups) may use it
too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import os
import tempfile

from lunsync.snapshots.errors import MediumError, NotReady, OutOfSpace, ReadOnly, StorageError

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "atomic_write",
    "commit_file",
    "copy_range",
    "fallocate",
    "fsync_dir",
    "is_hole",
    "may_hang",
    "open_error",
    "pread_full",
    "punch",
    "pwrite_full",
    "remove_file",
    "storage_error",
    "write_zeros",
    "zero_range",
]

Buffer = bytes | bytearray | memoryview

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# fallocate errnos that mean "this filesystem or file cannot do that mode", so the next way is tried. ENODEV is what
# fallocate says for a descriptor that is neither a regular file nor a device it knows (a FUSE file, a pipe).
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENODEV)
# copy_file_range cannot cross filesystems on every kernel (EXDEV), nor work on every file (EINVAL, EOPNOTSUPP,
# ENOSYS on old kernels, EBADF for a file opened O_APPEND); then the copy goes through a buffer.
_NO_OFFLOAD = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTSUP, errno.EBADF)
# The bounce buffer of the fallback copy: large enough that a resync batch is a few syscalls, allocated per call.
_COPY_BUFFER = 8 << 20
# Zeros for the last-resort "write zeros" path; one shared immutable buffer, written repeatedly.
_ZEROS = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
# fallocate64 takes a 64-bit off_t even on 32-bit builds; on 64-bit glibc it is the same symbol as fallocate.
_fallocate_c = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate_c.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate_c.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode; ``os.posix_fallocate`` cannot pass flags such as PUNCH_HOLE."""
    if _fallocate_c(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- whole-range reads and writes --------------------------------------------------------------------------------


_fstatfs_c = _libc.fstatfs
_fstatfs_c.argtypes = (ctypes.c_int, ctypes.c_void_p)
_fstatfs_c.restype = ctypes.c_int
# statfs f_type of file systems whose page-cache writes can wait on a server or a user-space process for as long as
# it pleases (<linux/magic.h>): FUSE, NFS, CIFS/SMB2, Ceph, 9p, AFS.
_MAY_HANG = frozenset({0x65735546, 0x6969, 0xFF534D42, 0xFE534D42, 0x00C36400, 0x01021997, 0x5346414F, 0x6B414653})


def may_hang(fd: int) -> bool:
    """Whether even a buffered write to ``fd`` may block for as long as something outside this host decides (its file
    system is remote or in user space). False when it cannot be told."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first member, a long
    if _fstatfs_c(fd, buf) != 0:
        return False
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little", signed=True) & 0xFFFFFFFF in _MAY_HANG


def pread_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset``; past EOF it keeps what it already holds (callers pass zero-filled buffers)."""
    while buf:
        got = os.preadv(fd, [buf], offset)
        if got == 0:
            return
        buf = buf[got:]
        offset += got


def pwrite_full(fd: int, data: Buffer, offset: int) -> None:
    """Write all of ``data`` at ``offset``. pwritev may write short (a signal, a quota edge, the 2 GiB per-call cap);
    the rest must still land or fail, and a write that makes no progress is an error, never a spin."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    while view:
        done = os.pwritev(fd, [view], offset)
        if done <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[done:]
        offset += done


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset``: the way to zero that every file and device supports."""
    while length > 0:
        n = min(length, len(_ZEROS))
        pwrite_full(fd, memoryview(_ZEROS)[:n], offset)
        offset += n
        length -= n


# --- ranges that read as zeros -----------------------------------------------------------------------------------


def zero_range(fd: int, offset: int, length: int, *, deallocate: bool = True) -> None:
    """Make ``[offset, offset + length)`` read as zeros, trying the cheapest way first.

    With ``deallocate`` the blocks go back to the filesystem (a punched hole; on a block device the kernel's
    discard-that-reads-zeros); without it (a thick LUN, which must never need space again) the range becomes
    allocated zeros. Either way a mode the file cannot do falls through to the next, and last to written zeros; any
    other error is real and raised.
    """
    modes: tuple[int, ...] = (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,)
    if deallocate:
        modes = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, *modes)
    for mode in modes:
        try:
            fallocate(fd, mode, offset, length)
            return
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
    write_zeros(fd, offset, length)


def punch(fd: int, offset: int, length: int) -> bool:
    """Give the blocks of a range whose contents no longer matter back to the filesystem. False where holes cannot
    be punched: then the range keeps its blocks and its bytes, which is harmless for a slot about to be reused."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        if exc.errno not in _NO_FALLOCATE:
            raise
        return False
    return True


def is_hole(fd: int, offset: int, length: int) -> bool:
    """Whether ``[offset, offset + length)`` of ``fd`` holds no data (reads as zeros), by SEEK_DATA; False where the
    file system or device cannot tell. Data still in the page cache counts as data."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data at or after offset


# --- copies ------------------------------------------------------------------------------------------------------


def copy_range(src_fd: int, dst_fd: int, length: int, src_off: int, dst_off: int) -> None:
    """Copy ``length`` bytes with ``os.copy_file_range`` (a reflink or an in-kernel copy), or through a buffer where
    the kernel refuses to offload it.

    Bytes past the source's EOF (a pool slot never written to its end) are written to the destination as zeros:
    the destination may hold older data there, and a copy must leave it equal to what the source reads as.
    Not durable: the caller syncs the destination.
    """
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
            if n == 0:
                write_zeros(dst_fd, dst_off + done, length - done)
                return
            done += n
        return
    except OSError as exc:
        if exc.errno not in _NO_OFFLOAD:
            raise
    buf = bytearray(min(length - done, _COPY_BUFFER))
    while done < length:
        view = memoryview(buf)[: min(len(buf), length - done)]
        got = os.preadv(src_fd, [view], src_off + done)
        if got == 0:
            write_zeros(dst_fd, dst_off + done, length - done)
            return
        pwrite_full(dst_fd, view[:got], dst_off + done)
        done += got


# --- committing files --------------------------------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that the names created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: str, path: str, *, exclusive: bool = False) -> None:
    """Make the complete file ``tmp`` durable and give it the name ``path`` in one step: fsync it, rename it over
    ``path`` (with ``exclusive``: link it, so an existing ``path`` is kept and FileExistsError raised), fsync the
    directory. Durable on return. ``tmp`` must be in ``path``'s directory; it is gone afterwards either way."""
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_file(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` and any temporary file an interrupted :func:`atomic_write` of it left beside it; a missing
    file is not an error. The removal is made durable (directory fsync) only by the caller's next commit."""
    name = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(name))
    for p in (name, *glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(base)}.*.tmp"))):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o600,
                 exclusive: bool = False) -> None:
    """Replace ``path`` with ``data`` so that a crash at any moment leaves either the old file or the complete new
    one, never a torn or empty file. Durable on return (file and directory entry).

    The temporary file is a fresh name in the same directory (two writers never share one), created with ``mode``
    (0600 by default: these files hold secrets and reservation keys). With ``exclusive`` an existing ``path`` is
    left alone and FileExistsError raised, for files created once (the API token). ``str`` is written as UTF-8.
    """
    name = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(name))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(name)}.", suffix=".tmp", dir=directory)  # 0600
    try:
        try:
            if mode != 0o600:
                os.fchmod(fd, mode)
            pwrite_full(fd, data.encode() if isinstance(data, str) else data, 0)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    commit_file(tmp, name, exclusive=exclusive)


# --- OSError -> the storage error family -------------------------------------------------------------------------


def storage_error(exc: OSError, what: str, lba: int | None, *, write: bool) -> StorageError:
    """Map one OSError from the data path (a read, write, flush, unmap or copy) to the storage family.

    ENOSPC/EDQUOT are out of space. On a write, EROFS/EPERM mean the filesystem went read-only (errors=remount-ro)
    or the file became immutable: the data is intact but nothing can land, which is DATA PROTECT rather than a medium
    error. EBADF, ENODEV, ENXIO and ESTALE mean the store went away under us (a read-only store is opened O_RDONLY
    and its writes refused before any syscall, so EBADF never means "read-only" here). Everything else is a medium
    error at ``lba``.
    """
    err = _storage_error(exc, f"{what}: {exc.strerror or exc}", lba, write)
    # The OSError is the cause, set here and not only by the callers' ``raise ... from exc``: a module compiled with
    # mypyc raises from an async function without setting ``__cause__``, and the chain is what a log shows.
    err.__cause__ = exc
    return err


def _storage_error(exc: OSError, message: str, lba: int | None, write: bool) -> StorageError:
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpace(message)
    if write and code in (errno.EROFS, errno.EPERM):
        return ReadOnly(message)
    if code in (errno.EBADF, errno.ENODEV, errno.ENXIO, errno.ESTALE):
        return NotReady(message)
    return MediumError(message, lba, write=write)


def open_error(exc: OSError, path: str) -> StorageError:
    """Map an OSError from opening or creating a backing store."""
    if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return NotReady(f"{path}: backing store is gone ({exc.strerror})")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpace(f"{path}: {exc.strerror}")
    if exc.errno == errno.EROFS:
        return ReadOnly(f"{path}: {exc.strerror}")
    return StorageError(f"{path}: {exc.strerror or exc}")
